"""``liferaft node --config FILE``: run one node in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import gc
import logging
import signal
import sys
from pathlib import Path

import click
import trio

from liferaft.config import ConfigError, Settings, load
from liferaft.node.removal import NodeRemoved
from liferaft.observability.logs import configure, event, reopen_audit_files
from liferaft.storage.errors import StorageError

log = logging.getLogger("liferaft.cli")

# Python's default (700, 10, 10) runs a young collection every 700 allocations; a busy
# node allocates per request and keeps large live structures (the store, its history),
# so collections were frequent and long. Rarer collections cost a little memory.
GC_THRESHOLDS = (50_000, 20, 20)


@click.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The node's TOML config file (docs/operations.md, Configuration).",
)
def node(config_path: Path) -> None:
    """Run one cluster node. Logs JSON lines to stderr (audit records to [audit] file
    if set). SIGHUP reopens the audit file and reloads the TLS certificate, key and CA
    and the JWT public keys; SIGINT or SIGTERM stops it cleanly (exit 0). A config
    error exits 2, a storage error 1."""
    try:
        settings = load(config_path)
    except ConfigError as exc:
        click.echo(f"liferaft node: config error: {exc}", err=True)
        sys.exit(2)
    configure(settings.node.id, level=settings.log.level, audit_file=settings.audit.file)
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        trio.run(_run, settings)
    except* StorageError as group:
        event(log, "fatal_storage_error", level=logging.CRITICAL, error=str(_first(group)))
        sys.exit(1)
    except* NodeRemoved:
        sys.exit(0)  # (logged as node_removed) a removed node is done: no restart


def _first(group: BaseExceptionGroup[StorageError]) -> BaseException:
    """The first real error inside (nested nurseries nest their groups)."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _run(settings: Settings) -> None:
    # imported here: the other commands stay light to start
    from liferaft.api.service import reload_credentials, serve
    from liferaft.node.node import Node

    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            api = await nursery.start(serve, Node(settings))
            async for signum in signals:
                if signum == signal.SIGHUP:
                    reopen_audit_files()  # logrotate moved the audit file
                    event(log, "audit_file_reopened", file=str(settings.audit.file))
                    reload_credentials(api)  # a renewed certificate, rotated token keys
                    continue
                event(log, "stopping", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
