"""The client commands (README.md, "Using it"): put, get, del, txn, watch, status,
member, transfer-leader, compact. Each opens a :class:`liferaft.client.Client`, does one
thing and prints the result for people (``-o text``, the default) or programs
(``-o json``).

Every command takes ``--endpoints URL[,URL...]`` (default ``wss://127.0.0.1:8001``; a bare
``host:port`` means ``wss://host:port/v1``), ``--cacert FILE``, ``--token TOKEN`` or
``--token-file FILE``, ``-o text|json`` and ``--timeout SECONDS`` (per call, retries
included). ``LIFERAFT_ENDPOINTS``, ``LIFERAFT_CACERT`` and ``LIFERAFT_TOKEN`` give the
defaults; a ``--token-file`` given on the command line wins over ``LIFERAFT_TOKEN``.

Exit codes: 0 done; 1 the operation failed (the server refused it: member_error,
compacted, too_large, internal); 2 usage or configuration error (bad flags, unreadable
files, no token, a server certificate that does not verify against ``--cacert``, a request
the server calls invalid_request, such as a malformed txn); 3 the token was
refused (401) or lacks the permission; 4 the cluster is unavailable (nothing reachable, no
quorum, no answer within ``--timeout``). Errors go to stderr, one line.

Values: text output prints a value as UTF-8 when it is valid UTF-8, else as ``base64:``
followed by its base64. JSON output prints one document (``watch``: one document per line,
per event); a key-value is ``{"key", "value", "value_base64", "create_revision",
"mod_revision", "version"}`` where ``value`` is the UTF-8 text (null when the bytes are not
valid UTF-8) and ``value_base64`` always the exact bytes in standard base64.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import click
import trio

from liferaft.client import (
    DEFAULT_ENDPOINT,
    Client,
    InvalidRequest,
    KeyValue,
    LiferaftError,
    NotLeader,
    PermissionDenied,
    TLSError,
    TxnResult,
    Unauthenticated,
    Unavailable,
    open_client,
)
from liferaft.client.api import Member
from liferaft.client.wire import parse_endpoint

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_UNAVAILABLE = 4


class CommandFailed(click.ClickException):
    """An error printed as one line on stderr, exiting with the code the README gives
    ("Using it"); make one with :func:`failure`."""

    exit_code = EXIT_FAILED


class _UsageFailure(CommandFailed):
    exit_code = EXIT_USAGE


class _AuthFailure(CommandFailed):
    exit_code = EXIT_AUTH


class _UnavailableFailure(CommandFailed):
    exit_code = EXIT_UNAVAILABLE


_FAILURES: dict[int, type[CommandFailed]] = {
    EXIT_FAILED: CommandFailed,
    EXIT_USAGE: _UsageFailure,
    EXIT_AUTH: _AuthFailure,
    EXIT_UNAVAILABLE: _UnavailableFailure,
}


def failure(message: str, exit_code: int) -> CommandFailed:
    return _FAILURES[exit_code](message)


def exit_code_for(exc: LiferaftError) -> int:
    if isinstance(exc, Unauthenticated | PermissionDenied):
        return EXIT_AUTH
    if isinstance(exc, TLSError | InvalidRequest):
        return EXIT_USAGE  # a CA that does not fit, a bad key or a malformed transaction
    if isinstance(exc, Unavailable | NotLeader):
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


# ---------------------------------------------------------------- common options


@dataclass(frozen=True)
class Settings:
    endpoints: list[str]
    cacert: Path | None
    token: str
    output: str
    timeout: float

    @property
    def json(self) -> bool:
        return self.output == "json"


def client_options(f: F) -> F:
    """The options every client command takes (README.md, "Using it")."""
    options = [
        click.option(
            "--endpoints",
            envvar="LIFERAFT_ENDPOINTS",
            default=DEFAULT_ENDPOINT,
            show_default=True,
            help="Comma-separated client URLs of the cluster [env LIFERAFT_ENDPOINTS].",
        ),
        click.option(
            "--cacert",
            envvar="LIFERAFT_CACERT",
            type=click.Path(dir_okay=False, path_type=Path),
            help="CA certificate to verify the nodes with (certs/ca.pem) [env LIFERAFT_CACERT].",
        ),
        click.option("--token", envvar="LIFERAFT_TOKEN", help="JWT [env LIFERAFT_TOKEN]."),
        click.option(
            "--token-file",
            type=click.Path(dir_okay=False, path_type=Path),
            help="File holding the JWT (instead of --token).",
        ),
        click.option(
            "-o",
            "--output",
            type=click.Choice(["text", "json"]),
            default="text",
            show_default=True,
            help="Output format.",
        ),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=5.0,
            show_default=True,
            help="Seconds one operation may take, retries included.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def settings(
    endpoints: str,
    cacert: Path | None,
    token: str | None,
    token_file: Path | None,
    output: str,
    timeout: float,
) -> Settings:
    """Check the common options; usage errors exit 2."""
    ctx = click.get_current_context()
    urls = [e.strip() for e in endpoints.split(",") if e.strip()]
    if not urls:
        raise click.BadParameter("no endpoint given", param_hint="--endpoints")
    for url in urls:
        try:
            parse_endpoint(url)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--endpoints") from None
    if cacert is not None and not cacert.is_file():
        raise click.BadParameter(f"no such file: {cacert}", param_hint="--cacert")
    from_cli = ctx.get_parameter_source("token") == click.core.ParameterSource.COMMANDLINE
    if token_file is not None:
        if token is not None and from_cli:
            raise click.UsageError("give --token or --token-file, not both")
        try:
            token = token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(
                f"cannot read {token_file}: {exc}", param_hint="--token-file"
            ) from None
    if not token or not token.strip():
        raise click.UsageError("no token: give --token, --token-file or set LIFERAFT_TOKEN")
    return Settings(urls, cacert, token.strip(), output, timeout)


def run_client(s: Settings, fn: Callable[[Client], Awaitable[T]]) -> T:
    """Connect, run ``fn(client)`` and map errors to exit codes."""

    async def main() -> T:
        async with open_client(
            s.endpoints, token=s.token, cacert=s.cacert, timeout=s.timeout
        ) as client:
            return await fn(client)

    try:
        return trio.run(main)
    except LiferaftError as exc:
        raise failure(str(exc), exit_code_for(exc)) from None
    except (ValueError, OSError) as exc:  # e.g. an unreadable or malformed CA file
        raise failure(f"configuration error: {exc}", EXIT_USAGE) from None


# ---------------------------------------------------------------- printing


def value_text(value: bytes) -> str:
    """UTF-8 text when valid, else ``base64:`` and the base64 of the bytes."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(value).decode("ascii")


def kv_json(kv: KeyValue) -> dict[str, Any]:
    try:
        text: str | None = kv.value.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {
        "key": kv.key,
        "value": text,
        "value_base64": base64.b64encode(kv.value).decode("ascii"),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
    }


def print_json(doc: object, *, indent: int | None = 2) -> None:
    click.echo(json.dumps(doc, indent=indent, sort_keys=False))


def print_kvs(kvs: Sequence[KeyValue]) -> None:
    for kv in kvs:
        click.echo(kv.key)
        click.echo(value_text(kv.value))


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces, with an upper-case header."""
    cells = [[str(h).upper() for h in header]] + [
        ["-" if c is None else str(c) for c in r] for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def human_bytes(n: object) -> str:
    if type(n) is not int:
        return "-"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


# ---------------------------------------------------------------- put, get, del


@click.command()
@click.argument("key")
@click.argument("value", required=False)
@click.option(
    "--value-file",
    type=click.File("rb"),
    help="Read the value's bytes from this file ('-' for stdin) instead of VALUE.",
)
@click.option(
    "--lease",
    "lease_hex",
    metavar="ID",
    help="Attach the key to this lease (hex id): it is deleted when the lease goes.",
)
@client_options
def put(
    key: str,
    value: str | None,
    value_file: IO[bytes] | None,
    lease_hex: str | None,
    **common: Any,
) -> None:
    """Set KEY to VALUE (stored as UTF-8), or to the bytes of --value-file."""
    s = settings(**common)
    if (value is None) == (value_file is None):
        raise click.UsageError("give VALUE or --value-file (one of them)")
    lease = None
    if lease_hex is not None:
        try:
            lease = int(lease_hex.strip().lower().removeprefix("0x"), 16)
        except ValueError:
            raise click.BadParameter("not a lease id (hexadecimal)", param_hint="--lease") from None
    data = value_file.read() if value_file is not None else (value or "").encode("utf-8")
    revision = run_client(s, lambda c: c.put(key, data, lease=lease))
    if s.json:
        print_json({"revision": revision})
    else:
        click.echo(f"OK (revision {revision})")


@click.command()
@click.argument("key")
@click.option("--prefix", is_flag=True, help="Read every key that starts with KEY.")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="At most N keys (0: all).")
@click.option(
    "--serializable",
    is_flag=True,
    help="Let the node answer from its own state (faster, possibly stale).",
)
@click.option(
    "--rev",
    type=click.IntRange(min=0),
    default=0,
    help="Read the store as it was right after revision N (0: now).",
)
@click.option("--after", help="With --prefix: start after this key (paging).")
@client_options
def get(
    key: str,
    prefix: bool,
    limit: int,
    serializable: bool,
    rev: int,
    after: str | None,
    **common: Any,
) -> None:
    """Print KEY and its value (or every key under the prefix KEY). Prints nothing when
    the key does not exist."""
    s = settings(**common)
    if after is not None and not prefix:
        raise click.UsageError("--after pages a --prefix read")

    async def read(c: Client) -> tuple[list[KeyValue], bool]:
        if prefix:
            return await c.range(
                key, limit=limit, serializable=serializable, after=after, revision=rev
            )
        kv = await c.get(key, serializable=serializable, revision=rev)
        return ([] if kv is None else [kv]), False

    kvs, more = run_client(s, read)
    if s.json:
        print_json({"kvs": [kv_json(kv) for kv in kvs], "count": len(kvs), "more": more})
        return
    print_kvs(kvs)
    if more:
        click.echo(f"(more keys after these {len(kvs)}; raise --limit)", err=True)


@click.command("del")
@click.argument("key")
@click.option("--prefix", is_flag=True, help="Delete every key that starts with KEY.")
@client_options
def delete(key: str, prefix: bool, **common: Any) -> None:
    """Delete KEY (or every key under the prefix KEY); prints how many were deleted."""
    s = settings(**common)
    if prefix:
        deleted = run_client(s, lambda c: c.delete(prefix=key))
    else:
        deleted = run_client(s, lambda c: c.delete(key))
    if s.json:
        print_json({"deleted": deleted})
    else:
        click.echo(str(deleted))


# ---------------------------------------------------------------- txn


def _bytes_from_json(value: object, where: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict) and set(value) == {"base64"} and isinstance(value["base64"], str):
        try:
            return base64.b64decode(value["base64"], validate=True)
        except binascii.Error:
            raise click.BadParameter(f"{where}: not valid base64") from None
    raise click.BadParameter(f'{where}: a value is a string or {{"base64": "..."}}')


def parse_txn(
    doc: object,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The compare, success and failure lists of a txn document, values as bytes."""
    if not isinstance(doc, dict) or not set(doc) <= {"compare", "success", "failure"}:
        raise click.BadParameter('expected {"compare": [...], "success": [...], "failure": [...]}')
    lists: list[list[dict[str, Any]]] = []
    for part in ("compare", "success", "failure"):
        items = doc.get(part, [])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise click.BadParameter(f"{part} must be a list of objects")
        out = []
        for n, item in enumerate(items):
            item = dict(item)
            where = f"{part}[{n}]"
            is_value = (
                item.get("target") == "value" if part == "compare" else item.get("op") == "put"
            )
            if is_value and item.get("value") is not None:
                item["value"] = _bytes_from_json(item.get("value"), where)
            out.append(item)
        lists.append(out)
    return lists[0], lists[1], lists[2]


@click.command()
@click.option(
    "--file",
    "txn_file",
    type=click.File("r"),
    default="-",
    help="JSON file with the transaction (default: stdin).",
)
@client_options
def txn(txn_file: IO[str], **common: Any) -> None:
    """Run a transaction given as JSON (from stdin, or --file).

    \b
      {"compare": [{"key": "k", "target": "version", "result": "==", "value": 0}],
       "success": [{"op": "put", "key": "k", "value": "v1"}],
       "failure": [{"op": "get", "key": "k"}]}

    \b
    target: value | version | create_revision | mod_revision; result: == != < >.
    ops: put (key, value), get (key), delete (key or prefix), range (prefix, limit).
    A value is a UTF-8 string, or {"base64": "..."} for arbitrary bytes.
    Prints SUCCESS or FAILURE, then each op's result.
    """
    s = settings(**common)
    try:
        doc = json.load(txn_file)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--file") from None
    compare, success, failure = parse_txn(doc)
    result = run_client(s, lambda c: c.txn(compare, success, failure))
    ops = success if result.succeeded else failure
    if s.json:
        print_json(_txn_json(result))
        return
    click.echo("SUCCESS" if result.succeeded else "FAILURE")
    for op, r in zip(ops, result.results, strict=False):
        click.echo("")
        _print_result(op.get("op"), r)


def _txn_json(result: TxnResult) -> dict[str, Any]:
    results = []
    for r in result.results:
        out = dict(r)
        if isinstance(out.get("kv"), KeyValue):
            out["kv"] = kv_json(out["kv"])
        if isinstance(out.get("kvs"), list):
            out["kvs"] = [kv_json(kv) if isinstance(kv, KeyValue) else kv for kv in out["kvs"]]
        results.append(out)
    return {"succeeded": result.succeeded, "revision": result.revision, "results": results}


def _print_result(op: object, r: dict[str, Any]) -> None:
    if op == "put":
        click.echo(f"OK (revision {r.get('revision')})")
    elif op == "delete":
        click.echo(str(r.get("deleted", 0)))
    elif op == "get":
        kv = r.get("kv")
        print_kvs([kv] if isinstance(kv, KeyValue) else [])
    else:
        print_kvs([kv for kv in r.get("kvs", []) if isinstance(kv, KeyValue)])


# ---------------------------------------------------------------- watch


@click.command()
@click.argument("key")
@click.option("--prefix", is_flag=True, help="Watch every key that starts with KEY.")
@click.option(
    "--rev", type=click.IntRange(min=0), default=0, help="Start at this revision (0: from now)."
)
@client_options
def watch(key: str, prefix: bool, rev: int, **common: Any) -> None:
    """Print changes to KEY (or under the prefix KEY) until Ctrl-C. Text: three lines per
    event (PUT or DELETE, the key, the value); JSON: one object per line per event."""
    s = settings(**common)

    async def stream(c: Client) -> None:
        w = c.watch(prefix=key, start_revision=rev) if prefix else c.watch(key, start_revision=rev)
        async with w:
            async for ev in w:
                if s.json:
                    print_json({"type": ev.type, "kv": kv_json(ev.kv)}, indent=None)
                else:
                    click.echo(ev.type.upper())
                    click.echo(ev.kv.key)
                    if ev.type == "put":
                        click.echo(value_text(ev.kv.value))
                sys.stdout.flush()

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a watch ends
        run_client(s, stream)


# ---------------------------------------------------------------- status, members


@click.command()
@client_options
def status(**common: Any) -> None:
    """One row per endpoint: its node id, role, term, leader, commit and applied index,
    lag (entries it has yet to apply of what the leader committed), revision, database
    size, version, raised alarms and its last logged error. Exit 1 if some endpoints
    failed, the error's exit code if all did."""
    s = settings(**common)
    rows = trio.run(_status_all, s)
    errors = [(url, err) for url, _, err in rows if err is not None]
    if s.json:
        doc: list[dict[str, Any]] = []
        for url, st, err in rows:
            if err is not None:
                doc.append({"endpoint": url, "error": {"code": err.code, "message": err.message}})
            else:
                doc.append({"endpoint": url, "status": st})
        print_json({"endpoints": doc})
    else:
        good = [(url, st) for url, st, err in rows if err is None and st is not None]
        leader_commit = max(
            (st.get("commit_index", 0) for _, st in good if st.get("role") == "leader"),
            default=None,
        )
        if good:
            click.echo(
                table(
                    [
                        "endpoint",
                        "id",
                        "role",
                        "term",
                        "leader",
                        "commit",
                        "applied",
                        "lag",
                        "revision",
                        "db size",
                        "version",
                        "alarms",
                        "last error",
                    ],
                    [
                        [
                            url,
                            st.get("node_id"),
                            st.get("role"),
                            st.get("term"),
                            st.get("leader_id") or "none",
                            st.get("commit_index"),
                            st.get("applied_index"),
                            _lag(leader_commit, st),
                            st.get("revision"),
                            human_bytes(st.get("db_size", st.get("db_size_bytes"))),
                            st.get("version", "?"),
                            ",".join(st.get("alarms") or []) or "none",
                            _last_error(st.get("last_error")),
                        ]
                        for url, st in good
                    ],
                )
            )
    for url, err in errors:
        click.echo(f"Error: {url}: {err}", err=True)
    if errors:
        code = exit_code_for(errors[0][1]) if len(errors) == len(rows) else EXIT_FAILED
        sys.exit(code)


def _last_error(err: object) -> str:
    """``event (N s ago)`` of the node's last logged error; its log has the rest."""
    if not isinstance(err, dict) or not isinstance(err.get("event"), str):
        return "none"
    at = err.get("at")
    if not isinstance(at, int | float):
        return str(err["event"])
    return f"{err['event']} ({_ago(time.time() - at)} ago)"


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 2 * 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _lag(leader_commit: int | None, st: dict[str, Any]) -> str:
    """Entries committed by the leader that this node has not applied (- if no leader
    answered)."""
    applied = st.get("applied_index")
    if leader_commit is None or not isinstance(applied, int):
        return "-"
    return str(max(0, leader_commit - applied))


async def _status_all(
    s: Settings,
) -> list[tuple[str, dict[str, Any] | None, LiferaftError | None]]:
    results: list[tuple[str, dict[str, Any] | None, LiferaftError | None]] = [
        (url, None, None) for url in s.endpoints
    ]

    async def one(i: int, url: str) -> None:
        try:
            async with open_client([url], token=s.token, cacert=s.cacert, timeout=s.timeout) as c:
                results[i] = (url, (await c.status()).as_dict(), None)
        except LiferaftError as exc:
            results[i] = (url, None, exc)

    async with trio.open_nursery() as nursery:
        for i, url in enumerate(s.endpoints):
            nursery.start_soon(one, i, url)
    return results


@click.group()
def endpoint() -> None:
    """Check the endpoints one by one."""


@endpoint.command("health")
@client_options
def endpoint_health(**common: Any) -> None:
    """One row per endpoint: whether it serves a linearizable read (a get of the key
    "health", confirmed with a quorum, as etcd's check does) and how long that took.
    Exit 0 only if every endpoint is healthy; 1 if some are not, the error's exit code
    if none is."""
    s = settings(**common)
    rows = trio.run(_health_all, s)
    errors = [(url, err) for url, _, err in rows if err is not None]
    if s.json:
        print_json(
            {
                "endpoints": [
                    {
                        "endpoint": url,
                        "health": err is None,
                        "took_ms": round(took * 1000, 1),
                        **({"error": {"code": err.code, "message": err.message}} if err else {}),
                    }
                    for url, took, err in rows
                ]
            }
        )
    else:
        click.echo(
            table(
                ["endpoint", "health", "took", "error"],
                [
                    [url, "true" if err is None else "false", f"{took * 1000:.1f} ms", err or ""]
                    for url, took, err in rows
                ],
            )
        )
    if errors:
        code = exit_code_for(errors[0][1]) if len(errors) == len(rows) else EXIT_FAILED
        sys.exit(code)


async def _health_all(s: Settings) -> list[tuple[str, float, LiferaftError | None]]:
    results: list[tuple[str, float, LiferaftError | None]] = [(u, 0.0, None) for u in s.endpoints]

    async def one(i: int, url: str) -> None:
        started = trio.current_time()
        try:
            async with open_client([url], token=s.token, cacert=s.cacert, timeout=s.timeout) as c:
                await c.get("health")  # linearizable: the node confirms with a quorum
            results[i] = (url, trio.current_time() - started, None)
        except LiferaftError as exc:
            results[i] = (url, trio.current_time() - started, exc)

    async with trio.open_nursery() as nursery:
        for i, url in enumerate(s.endpoints):
            nursery.start_soon(one, i, url)
    return results


def _print_members(members: list[Member], leader: str | None, s: Settings) -> None:
    if s.json:
        print_json({"members": [m.as_dict() for m in members]})
        return
    rows = []
    for m in sorted(members, key=lambda m: m.id):
        role = "voter" if m.voter else "learner"
        if leader is not None and m.id == leader:
            role += " (leader)"
        rows.append([m.id, role, m.peer, m.client])
    click.echo(table(["id", "role", "peer", "client"], rows))


@click.group()
def member() -> None:
    """List and change the cluster's members (admin role for changes)."""


@member.command("list")
@client_options
def member_list(**common: Any) -> None:
    """The members: id, voter or learner (and which leads), peer and client address."""
    s = settings(**common)
    st = run_client(s, lambda c: c.status())
    _print_members(st.members, st.leader_id, s)


@member.command("add")
@click.argument("member_id", metavar="ID")
@click.option("--peer", required=True, help="The new node's peer address, host:port.")
@click.option("--client", "client_addr", required=True, help="Its client address, host:port.")
@click.option(
    "--learner",
    is_flag=True,
    help="Add it as a learner (catches up without counting for a quorum); promote it later.",
)
@client_options
def member_add(member_id: str, peer: str, client_addr: str, learner: bool, **common: Any) -> None:
    """Add node ID as a voter (or, with --learner, as a learner)."""
    s = settings(**common)
    members = run_client(s, lambda c: c.member_add(member_id, peer, client_addr, learner=learner))
    if not s.json:
        click.echo(f"Member {member_id} added as a {'learner' if learner else 'voter'}.")
    _print_members(members, None, s)


@member.command("promote")
@click.argument("member_id", metavar="ID")
@client_options
def member_promote(member_id: str, **common: Any) -> None:
    """Make learner ID a voter (with [cluster] auto_promote the leader does this by
    itself once ID has caught up)."""
    s = settings(**common)
    members = run_client(s, lambda c: c.member_promote(member_id))
    if not s.json:
        click.echo(f"Member {member_id} promoted to voter.")
    _print_members(members, None, s)


@member.command("remove")
@click.argument("member_id", metavar="ID")
@client_options
def member_remove(member_id: str, **common: Any) -> None:
    """Remove member ID from the cluster; removing the leader hands leadership to the
    most caught-up voter first. Stop ID's process afterwards."""
    s = settings(**common)
    members = run_client(s, lambda c: c.member_remove(member_id))
    if not s.json:
        click.echo(f"Member {member_id} removed.")
    _print_members(members, None, s)


@click.command()
@click.argument("revision", type=click.IntRange(min=1))
@client_options
def compact(revision: int, **common: Any) -> None:
    """Drop the history before REVISION on every node (admin role): reads at older
    revisions and watches from REVISION or before get 'compacted'."""
    s = settings(**common)
    current = run_client(s, lambda c: c.compact(revision))
    if s.json:
        print_json({"compact_revision": revision, "revision": current})
    else:
        click.echo(f"Compacted before revision {revision} (store at revision {current}).")


@click.command("transfer-leader")
@click.argument("member_id", metavar="[ID]", required=False)
@client_options
def transfer_leader(member_id: str | None, **common: Any) -> None:
    """Hand leadership to voter ID (default: the one most caught up)."""
    s = settings(**common)
    leader = run_client(s, lambda c: c.transfer_leader(member_id))
    if s.json:
        print_json({"leader_id": leader})
    else:
        click.echo(f"Leader is now {leader}.")
