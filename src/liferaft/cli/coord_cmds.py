"""The coordination commands (docs/coordination.md): ``lease``, ``lock`` and ``elect``.

They take the common client options and exit codes of liferaft.cli.client_cmds. Lease
ids are printed and read in hexadecimal, as etcdctl does (``694d77aa9e38260f``; a
leading ``0x`` is accepted). ``lock NAME -- COMMAND`` runs COMMAND while it holds the lock
and exits with COMMAND's code; if the lock is lost meanwhile it terminates COMMAND
(SIGTERM, then SIGKILL after 5 s) and exits 1, saying so. ``elect`` and ``lease
keepalive`` hold on until Ctrl-C, and exit 1 if their lease is lost first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import trio

from liferaft.cli.client_cmds import (
    EXIT_FAILED,
    EXIT_USAGE,
    Settings,
    client_options,
    failure,
    kv_json,
    print_json,
    run_client,
    settings,
    value_text,
)
from liferaft.client import (
    Client,
    Election,
    KeyValue,
    LeaseLost,
    Lock,
)
from liferaft.client.models import MAX_LEASE_TTL, MAX_UINT

STOP_SECONDS = 5.0  # a lost lock's COMMAND gets this long after SIGTERM before SIGKILL

T = TypeVar("T")


def parse_lease_id(text: str) -> int:
    """A lease id from its hex form (``0x`` optional); usage error else."""
    raw = text.strip().lower().removeprefix("0x")
    try:
        value = int(raw, 16)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a lease id (hexadecimal)") from None
    if not 1 <= value <= MAX_UINT:
        raise click.BadParameter(f"{text!r} is out of range for a lease id")
    return value


class LeaseId(click.ParamType):
    name = "ID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        return value if isinstance(value, int) else parse_lease_id(str(value))


LEASE_ID = LeaseId()
TTL = click.IntRange(1, MAX_LEASE_TTL)


def _flush() -> None:
    sys.stdout.flush()


def hold(s: Settings, fn: Callable[[Client], Awaitable[T]]) -> T | None:
    """run_client for commands that run until Ctrl-C: that ends them quietly (None)."""
    try:
        return run_client(s, fn)
    except KeyboardInterrupt:
        return None


# ---------------------------------------------------------------- lease


@click.group()
def lease() -> None:
    """Grant, renew, revoke and inspect leases (ids in hexadecimal)."""


@lease.command("grant")
@click.argument("ttl", type=TTL)
@click.option("--id", "lease_id", type=LEASE_ID, help="Grant the lease with this id (hex).")
@client_options
def lease_grant(ttl: int, lease_id: int | None, **common: Any) -> None:
    """Grant a lease of TTL seconds (1..86400); prints its id. Keys put with it go when
    it expires (no keepalive for TTL seconds) or is revoked."""
    s = settings(**common)
    granted = run_client(s, lambda c: c.lease_grant(ttl, lease=lease_id))
    if s.json:
        print_json({"id": granted.id, "id_hex": f"{granted.id:x}", "ttl": granted.ttl})
    else:
        click.echo(f"lease {granted.id:x} granted with TTL {granted.ttl}s")


@lease.command("keepalive")
@click.argument("lease_id", metavar="ID", type=LEASE_ID)
@client_options
def lease_keepalive(lease_id: int, **common: Any) -> None:
    """Renew lease ID (at a third of its TTL) until Ctrl-C; a line per renewal. Exit 1
    if the lease is lost (revoked, expired, or no renewal confirmed within its TTL)."""
    s = settings(**common)

    def renewed(renewed_id: int, ttl: int) -> None:
        if s.json:
            print_json({"id": renewed_id, "id_hex": f"{renewed_id:x}", "ttl": ttl}, indent=None)
        else:
            click.echo(f"lease {renewed_id:x} renewed, TTL {ttl}s")
        _flush()

    async def keep(c: Client) -> None:
        ka = c.keep_alive(lease_id)
        ka.on_renewed(renewed)
        try:
            async with ka:
                await trio.sleep_forever()
        except LeaseLost as exc:
            raise failure(exc.message, EXIT_FAILED) from None

    hold(s, keep)


@lease.command("revoke")
@click.argument("lease_id", metavar="ID", type=LEASE_ID)
@client_options
def lease_revoke(lease_id: int, **common: Any) -> None:
    """Revoke lease ID: its keys are deleted (at one revision)."""
    s = settings(**common)
    revision = run_client(s, lambda c: c.lease_revoke(lease_id))
    if s.json:
        print_json({"id": lease_id, "id_hex": f"{lease_id:x}", "revision": revision})
    else:
        click.echo(f"lease {lease_id:x} revoked (revision {revision})")


@lease.command("ttl")
@click.argument("lease_id", metavar="ID", type=LEASE_ID)
@click.option("--keys", is_flag=True, help="List the keys attached to the lease too.")
@client_options
def lease_ttl(lease_id: int, keys: bool, **common: Any) -> None:
    """The seconds lease ID has left, the TTL it was granted with, and its keys."""
    s = settings(**common)
    info = run_client(s, lambda c: c.lease_ttl(lease_id, keys=keys))
    if s.json:
        doc: dict[str, Any] = {
            "id": info.id,
            "id_hex": f"{info.id:x}",
            "ttl": info.ttl,
            "granted_ttl": info.granted_ttl,
        }
        if info.keys is not None:
            doc["keys"] = info.keys
        print_json(doc)
        return
    click.echo(f"lease {info.id:x} granted with TTL {info.granted_ttl}s, {info.ttl}s left")
    if info.keys is not None:
        click.echo(f"keys: {', '.join(info.keys) if info.keys else '(none)'}")


@lease.command("list")
@client_options
def lease_list(**common: Any) -> None:
    """Every lease the cluster holds, one id per line."""
    s = settings(**common)
    ids = run_client(s, lambda c: c.lease_list())
    if s.json:
        print_json({"leases": [{"id": i, "id_hex": f"{i:x}"} for i in ids]})
        return
    for i in ids:
        click.echo(f"{i:x}")


# ---------------------------------------------------------------- lock


@click.command(
    context_settings={"ignore_unknown_options": True},
    short_help="Run a command while holding a cluster-wide lock.",
)
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--ttl",
    type=TTL,
    default=10,
    show_default=True,
    help="Seconds the lock outlives a holder that died (its lease's TTL).",
)
@client_options
def lock(name: str, command: tuple[str, ...], ttl: int, **common: Any) -> None:
    """Run COMMAND while holding the cluster-wide lock NAME, then release it:

    \b
      liferaft lock nightly-report -- ./make-report.sh --full

    Waits for the lock first. Exits with COMMAND's code. COMMAND gets the lock's key
    and fencing token in LIFERAFT_LOCK_KEY and LIFERAFT_LOCK_TOKEN: pass the token to
    what it writes to, so that a holder that lost the lock without knowing it is
    refused. If this process dies the lock frees itself after TTL seconds; if the lock
    is lost while COMMAND runs, COMMAND is terminated and the exit code is 1. Without
    COMMAND, prints the key and token and holds the lock until Ctrl-C.
    """
    s = settings(**common)
    if command and command[0] == "--":
        command = command[1:]

    async def locked(c: Client) -> int:
        try:
            return await run_locked(c)
        except LeaseLost as exc:
            what = "while the command ran (it was terminated)" if command else "while held"
            raise failure(
                f"lock {name!r} lost {what}; another holder may have it now: {exc.message}",
                EXIT_FAILED,
            ) from None

    async def run_locked(c: Client) -> int:
        async with Lock(c, name, ttl=ttl) as held:
            if not command:  # (with one, stdout is COMMAND's)
                if s.json:
                    print_json({"key": held.key, "token": held.token}, indent=None)
                else:
                    click.echo(held.key)
                    click.echo(f"token {held.token}")
                _flush()
                await trio.sleep_forever()
            env = {
                **os.environ,
                "LIFERAFT_LOCK_KEY": str(held.key),
                "LIFERAFT_LOCK_TOKEN": str(held.token),
            }
            try:
                proc = await trio.run_process(
                    list(command),
                    check=False,
                    stdin=None,
                    env=env,
                    start_new_session=True,  # its own process group: see _stop_group
                    deliver_cancel=_stop_group,
                )
            except OSError as exc:
                raise failure(f"cannot run {command[0]!r}: {exc}", EXIT_USAGE) from None
            code = proc.returncode
            return code if code >= 0 else 128 - code
        return EXIT_FAILED  # (never: leaving the lock swallows no error)

    code = hold(s, locked)
    if code:
        sys.exit(code)


async def _stop_group(proc: trio.Process) -> None:
    """The lock was lost (or Ctrl-C): end COMMAND and everything it started, not just
    COMMAND itself (a shell script's own children would go on working without the
    lock): SIGTERM to its process group, SIGKILL to what is left after 5 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with trio.move_on_after(STOP_SECONDS):
        await proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------- elect


@click.command()
@click.argument("name")
@click.argument("proposal", required=False)
@click.option("--listen", is_flag=True, help="Print each leader of NAME as it changes.")
@click.option(
    "--ttl",
    type=TTL,
    default=10,
    show_default=True,
    help="Seconds leadership outlives a leader that died (its lease's TTL).",
)
@client_options
def elect(name: str, proposal: str | None, listen: bool, ttl: int, **common: Any) -> None:
    """Campaign for leadership of NAME with PROPOSAL (its value while leading), print
    the leader's key and value when elected, and lead until Ctrl-C (then resign). With
    --listen, print every leader (key, then value) as it changes instead. Exit 1 if
    leadership is lost."""
    s = settings(**common)
    if listen == (proposal is not None):
        raise click.UsageError("give PROPOSAL to campaign, or --listen to follow the leader")

    def show(kv: KeyValue) -> None:
        if s.json:
            print_json(kv_json(kv), indent=None)
        else:
            click.echo(kv.key)
            click.echo(value_text(kv.value))
        _flush()

    async def listening(c: Client) -> None:
        async with Election(c, name, ttl=ttl).observe() as leaders:
            async for kv in leaders:
                show(kv)

    async def campaigning(c: Client) -> None:
        assert proposal is not None
        election = Election(c, name, ttl=ttl)
        try:
            async with election:
                await election.campaign(proposal)
                me = await election.leader()
                if me is not None and me.key == election.key:
                    show(me)
                await trio.sleep_forever()
        except LeaseLost as exc:
            raise failure(f"leadership of {name!r} lost: {exc.message}", EXIT_FAILED) from None

    hold(s, listening if listen else campaigning)
