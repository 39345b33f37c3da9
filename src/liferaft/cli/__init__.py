"""The ``liferaft`` command: run a node, make certificates and tokens, simulate.
The client commands (README.md, "Using it") join it with the client API, and ``bench``
loads a cluster."""

from __future__ import annotations

import click

from liferaft.cli.bench import bench
from liferaft.cli.certs import certs, token
from liferaft.cli.check import check
from liferaft.cli.client_cmds import (
    compact,
    delete,
    endpoint,
    get,
    member,
    put,
    status,
    transfer_leader,
    txn,
    watch,
)
from liferaft.cli.coord_cmds import elect, lease, lock
from liferaft.cli.node import node
from liferaft.cli.sim import sim
from liferaft.cli.snapshot import recover_cmd, snapshot


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="liferaft")
def cli() -> None:
    """liferaft: a Raft cluster serving a transactional key-value store."""


cli.add_command(node)
cli.add_command(sim)
cli.add_command(check)
cli.add_command(certs)
cli.add_command(token)
cli.add_command(put)
cli.add_command(get)
cli.add_command(delete)
cli.add_command(txn)
cli.add_command(watch)
cli.add_command(endpoint)
cli.add_command(compact)
cli.add_command(status)
cli.add_command(member)
cli.add_command(transfer_leader)
cli.add_command(lease)
cli.add_command(lock)
cli.add_command(elect)
cli.add_command(bench)
cli.add_command(snapshot)
cli.add_command(recover_cmd)


def main() -> None:
    cli(auto_envvar_prefix="LIFERAFT")
