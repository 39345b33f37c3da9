"""Client requests and the write commands carried in log entries.

``validate_request`` checks one decoded client request (docs/client-protocol.md) field by
field and raises ``RequestError(code, message)``; the API server calls it on every request
before doing anything else, and the state machine runs it again on every command it
applies.

A write command is what a ``put``, ``delete`` or ``txn`` request becomes in the log: the
request's own fields (``op``, ``key``, ``value``, ``prefix``, ``compare``, ``success``,
``failure``, and ``session``/``seq`` when given) without ``id``, plus ``time_ms``, the
proposing leader's wall clock and the only notion of time the state machine has::

    {"op": "put", "key": "a", "value": b"1", "session": b"<16>", "seq": 7,
     "time_ms": 1718000000000}

The API puts the writes of one client message into ONE log entry, a batch (so a batch
costs one entry in the log, on the wire and in the core, not one per write)::

    {"batch": [{"op": "put", "key": "a", "value": b"1", "session": ..., "seq": 7}, ...],
     "time_ms": 1718000000000}

``encode_batch`` makes it; ``decode_entry`` reads either shape at apply. The bytes are
opaque through log, storage and wire. At apply they come from the leader, which
validated every request already, so ``decode_entry`` decodes them defensively (bounded
CBOR, no tags: docs/security.md) and ``check_command`` checks only what could make the
state machine fail (types and sizes of what goes into the database), cheaply for puts;
any other write is validated in full. A malformed command in a batch is answered alone;
the others apply. ``decode_command`` is the strict form for one command (canonical
encoding required), for tools and tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import cbor2

from liferaft import safecbor

MAX_KEY_BYTES = 4096
MAX_TXN_OPS = 128  # per branch (success, failure)
MAX_TXN_COMPARES = 128
SESSION_ID_BYTES = 16
MAX_UINT = 2**63 - 1  # revisions, seqs, limits, times: SQLite's signed 64-bit INTEGER
MAX_REQUEST_ID = 2**64 - 1
MAX_TEXT_BYTES = 4096  # node ids, addresses
MAX_TOKEN_BYTES = 65536

# command map -> txn branch (array) -> op or compare (map): three containers deep.
COMMAND_MAX_DEPTH = 3

# Requests that go through the log. ``compact`` (admin) changes no key but moves the
# compaction point on every replica at the same log index.
WRITE_OPS = frozenset({"put", "delete", "txn", "compact", "lease_grant", "lease_revoke"})
# Commands only a leader proposes (never a client): the lease checkpoints (node/lessor.py).
INTERNAL_OPS = frozenset({"lease_checkpoint"})
LEASE_OPS = frozenset({"lease_keepalive", "lease_ttl", "lease_list"})  # not in the log
MAX_LEASE_TTL_S = 86400
MAX_CHECKPOINT_LEASES = 1024  # leases in one lease_checkpoint command
TXN_OPS = frozenset({"put", "get", "delete", "range"})
COMPARE_TARGETS = frozenset({"value", "version", "create_revision", "mod_revision"})
COMPARE_RESULTS = frozenset({"==", "!=", "<", ">"})

INVALID_REQUEST = "invalid_request"
TOO_LARGE = "too_large"

Command = dict[str, Any]


class RequestError(ValueError):
    """A client request that breaks docs/client-protocol.md; ``code`` is the wire error
    code (``invalid_request`` or ``too_large``) and ``message`` says which field and why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)  # str(exc) is the message alone
        self.code = code
        self.message = message


class CommandError(ValueError):
    """Bytes that are not a well-formed, canonically encoded write command."""


# ---------------------------------------------------------------- bounded CBOR


def cbor_loads_strict(data: bytes, *, max_depth: int) -> object:
    """One CBOR item without tags, indefinite lengths, duplicate keys or trailing bytes,
    at most ``max_depth`` containers deep (liferaft.safecbor); ValueError otherwise."""
    return safecbor.loads(data, max_depth=max_depth)


# ---------------------------------------------------------------- commands


def encode_command(cmd: Mapping[str, Any]) -> bytes:
    """The canonical CBOR encoding of a command (see ``command_from_request``)."""
    return cbor2.dumps(dict(cmd), canonical=True)


def command_from_request(req: Mapping[str, Any], *, time_ms: int) -> Command:
    """The command to propose for a validated ``put``/``delete``/``txn`` request: its
    fields without ``id``, stamped with the leader's wall clock ``time_ms``."""
    if req.get("op") not in WRITE_OPS:
        raise RequestError(INVALID_REQUEST, f"op {req.get('op')!r:.40} is not a write")
    cmd = {k: v for k, v in req.items() if k != "id"}
    cmd["time_ms"] = time_ms
    return cmd


def encode_batch(cmds: list[Command], *, time_ms: int) -> bytes:
    """The entry for the write commands ``cmds`` (requests without ``id``), proposed
    together at the leader's wall clock ``time_ms``."""
    return cbor2.dumps({"batch": cmds, "time_ms": time_ms})


# Commands in one batch entry at most (the API makes batches of at most 1024 requests).
MAX_BATCH_COMMANDS = 4096

# batch map -> commands (array) -> command map -> txn branch (array) -> op or compare (map)
ENTRY_MAX_DEPTH = COMMAND_MAX_DEPTH + 2


def decode_entry(data: bytes) -> tuple[int, list[Any], bool]:
    """``(time_ms, commands, batch)`` of a client entry: a batch, or one command (with
    its ``time_ms`` inside; ``batch`` False). The commands are NOT checked yet (each goes
    through ``check_command``, so one bad command fails alone). CommandError (and
    nothing else) if the entry itself is malformed."""
    try:
        obj = safecbor.loads(data, max_depth=ENTRY_MAX_DEPTH)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if type(obj) is not dict:
        raise CommandError("a command must be a CBOR map")
    time_ms = obj.pop("time_ms", None)
    if type(time_ms) is not int or not 0 <= time_ms <= MAX_UINT:
        raise CommandError("a command must carry time_ms, an unsigned integer below 2**63")
    if "batch" not in obj:
        return time_ms, [obj], False
    cmds = obj.pop("batch")
    if obj or type(cmds) is not list or not 1 <= len(cmds) <= MAX_BATCH_COMMANDS:
        raise CommandError(
            f"a batch is {{batch: [command, ...], time_ms}} with 1..{MAX_BATCH_COMMANDS} commands"
        )
    return time_ms, cmds, True


def plain_put(req: dict[str, Any], *, id_field: bool) -> bool:
    """Whether ``req`` is a well-formed ``put`` (with a request ``id`` if ``id_field``):
    the common request, checked here in a few steps instead of ``validate_request``'s
    walk. False means "check it in full", not "invalid"."""
    if req.get("op") != "put":
        return False
    key, value = req.get("key"), req.get("value")
    n = 3
    if id_field:
        rid = req.get("id")
        if type(rid) is not int or not 0 <= rid <= MAX_REQUEST_ID:
            return False
        n = 4
    if "session" in req:
        session, seq = req["session"], req.get("seq")
        if (
            type(session) is not bytes
            or len(session) != SESSION_ID_BYTES
            or type(seq) is not int
            or not 0 <= seq <= MAX_UINT
        ):
            return False
        n += 2
    return (
        type(key) is str
        and key != ""
        and type(value) is bytes
        and len(req) == n
        and (len(key) <= MAX_KEY_BYTES // 4 or len(key.encode("utf-8")) <= MAX_KEY_BYTES)
    )


def check_command(cmd: object) -> Command:
    """``cmd`` if it is a write command the state machine can apply; CommandError
    otherwise. Puts (nearly every command) are checked inline; the rest in full."""
    if type(cmd) is not dict or "id" in cmd or "time_ms" in cmd:
        raise CommandError("a command is a map without id or time_ms")
    if plain_put(cmd, id_field=False):
        return cmd
    try:
        if cmd.get("op") not in WRITE_OPS and cmd.get("op") not in INTERNAL_OPS:
            raise RequestError(INVALID_REQUEST, f"op {cmd.get('op')!r:.40} is not a write")
        validate_request(cmd)
    except RequestError as exc:
        raise CommandError(f"{exc.code}: {exc.message}") from None
    return cmd


def decode_command(data: bytes) -> Command:
    """The command encoded in ``data``; CommandError (and nothing else) if it is not one."""
    try:
        obj = cbor_loads_strict(data, max_depth=COMMAND_MAX_DEPTH)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if type(obj) is not dict:
        raise CommandError("a command must be a CBOR map")
    if "id" in obj:
        raise CommandError("a command carries no request id")
    if "time_ms" not in obj:
        raise CommandError("a command must carry time_ms")
    req = dict(obj)
    time_ms = req.pop("time_ms")
    try:
        _uint(time_ms, "time_ms")
        if req.get("op") not in WRITE_OPS:
            raise RequestError(INVALID_REQUEST, f"op {req.get('op')!r:.40} is not a write")
        validate_request(req)
    except RequestError as exc:
        raise CommandError(f"{exc.code}: {exc.message}") from None
    # Only now is ``obj`` known to hold nothing but ints, bools, None, strings, lists and
    # maps, so re-encoding it is cheap and safe.
    canonical = cbor2.dumps(obj, canonical=True)
    if canonical != data:
        if bytes(data[: len(canonical)]) == canonical:
            raise CommandError("trailing bytes after the command")
        raise CommandError("command is not canonically encoded")
    return obj


# ---------------------------------------------------------------- request validation


def validate_request(req: object) -> None:
    """Check one client request (docs/client-protocol.md): its ``op``, optional ``id`` and
    every field of that op, including ``txn``'s compares and nested ops. Unknown fields
    are refused too, so a misspelt optional field is an error, not silently ignored.

    Raises ``RequestError("too_large", ...)`` for a key or prefix over 4096 bytes and a
    txn with more than 128 compares or 128 ops in a branch, ``RequestError(
    "invalid_request", ...)`` for everything else."""
    if type(req) is not dict:
        raise RequestError(INVALID_REQUEST, "a request must be a map")
    for name in req:
        if type(name) is not str:
            raise RequestError(INVALID_REQUEST, f"field names must be text, got {name!r:.40}")
    op = req.get("op")
    if op is None:
        raise RequestError(INVALID_REQUEST, "missing field 'op'")
    if type(op) is not str:
        raise RequestError(INVALID_REQUEST, "'op' must be text")
    check = _OPS.get(op)
    if check is None:
        raise RequestError(INVALID_REQUEST, f"unknown op {op!r:.40}")
    if "id" in req and (type(req["id"]) is not int or not 0 <= req["id"] <= MAX_REQUEST_ID):
        raise RequestError(INVALID_REQUEST, "'id' must be an unsigned integer below 2**64")
    fields = check(req, "")
    if op in WRITE_OPS:
        fields |= {"session", "seq"}
        if ("session" in req) != ("seq" in req):
            raise RequestError(INVALID_REQUEST, "'session' and 'seq' go together")
        if "session" in req:
            session = req["session"]
            if type(session) is not bytes or len(session) != SESSION_ID_BYTES:
                raise RequestError(INVALID_REQUEST, "'session' must be 16 bytes")
            _uint(req["seq"], "seq")
    _no_other_fields(req, fields | {"op", "id"}, "")


def _no_other_fields(req: dict[str, Any], allowed: set[str], where: str) -> None:
    for name in req:
        if name not in allowed:
            raise RequestError(
                INVALID_REQUEST, f"unknown field '{where}{name:.60}' for op {req['op']!r}"
            )


def _fail(where: str, name: str, what: str, code: str = INVALID_REQUEST) -> NoReturn:
    raise RequestError(code, f"'{where}{name}' {what}")


def _required(req: dict[str, Any], name: str, where: str) -> Any:
    if name not in req:
        raise RequestError(INVALID_REQUEST, f"{req['op']}: missing field '{where}{name}'")
    return req[name]


def _uint(value: object, name: str, where: str = "") -> int:
    # ``type(...) is int`` also refuses bool, which is an int subclass.
    if type(value) is not int or not 0 <= value <= MAX_UINT:
        _fail(where, name, "must be an unsigned integer below 2**63")
    return value


def _text(value: object, name: str, where: str, *, max_bytes: int, empty: bool) -> str:
    if type(value) is not str:
        _fail(where, name, "must be text")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        _fail(where, name, "must be valid UTF-8 (no lone surrogates)")
    if size == 0 and not empty:
        _fail(where, name, "must not be empty")
    if size > max_bytes:
        _fail(where, name, f"is {size} bytes, at most {max_bytes} allowed", TOO_LARGE)
    return value


def _key(value: object, name: str, where: str) -> str:
    return _text(value, name, where, max_bytes=MAX_KEY_BYTES, empty=False)


def _prefix(value: object, where: str) -> str:
    return _text(value, "prefix", where, max_bytes=MAX_KEY_BYTES, empty=True)


def _bytes(value: object, name: str, where: str) -> bytes:
    if type(value) is not bytes:
        _fail(where, name, "must be bytes")
    return value


def _bool(value: object, name: str, where: str) -> bool:
    if type(value) is not bool:
        _fail(where, name, "must be a boolean")
    return value


# Each checker validates the op's fields and returns their names (for the unknown-field
# check); ``where`` prefixes field names in messages ("success[2].").


def _check_put(req: dict[str, Any], where: str) -> set[str]:
    _key(_required(req, "key", where), "key", where)
    _bytes(_required(req, "value", where), "value", where)
    if "lease" in req:  # the key goes when the lease does
        _lease_id(req["lease"], where)
        return {"key", "value", "lease"}
    return {"key", "value"}


def _lease_id(value: object, where: str) -> int:
    lease = _uint(value, "lease", where)
    if lease == 0:
        _fail(where, "lease", "must be a lease id (not 0)")
    return lease


def _check_lease_grant(req: dict[str, Any], where: str) -> set[str]:
    ttl = _uint(_required(req, "ttl", where), "ttl", where)
    if not 1 <= ttl <= MAX_LEASE_TTL_S:
        _fail(where, "ttl", f"must be 1..{MAX_LEASE_TTL_S} seconds")
    if "lease" in req:  # a chosen id
        _lease_id(req["lease"], where)
        return {"ttl", "lease"}
    return {"ttl"}


def _check_lease(req: dict[str, Any], where: str) -> set[str]:
    _lease_id(_required(req, "lease", where), where)
    return {"lease"}


def _check_lease_ttl(req: dict[str, Any], where: str) -> set[str]:
    fields = _check_lease(req, where)
    if "keys" in req:
        _bool(req["keys"], "keys", where)
        fields.add("keys")
    return fields


def _check_lease_checkpoint(req: dict[str, Any], where: str) -> set[str]:
    leases = _required(req, "leases", where)
    if type(leases) is not list or len(leases) > MAX_CHECKPOINT_LEASES:
        _fail(where, "leases", f"must be a list of at most {MAX_CHECKPOINT_LEASES} pairs")
    for pair in leases:
        if type(pair) is not list or len(pair) != 2:
            _fail(where, "leases", "must hold [lease id, remaining ms] pairs")
        _lease_id(pair[0], where)
        _uint(pair[1], "leases", where)
    return {"leases"}


def _check_read_options(req: dict[str, Any], where: str, fields: set[str]) -> set[str]:
    """``serializable`` and ``revision``: options of a top-level read, not of a txn op."""
    if where:
        return fields
    if "serializable" in req:
        _bool(req["serializable"], "serializable", where)
        fields.add("serializable")
    if "revision" in req:
        _uint(req["revision"], "revision", where)
        fields.add("revision")
    return fields


def _check_get(req: dict[str, Any], where: str) -> set[str]:
    _key(_required(req, "key", where), "key", where)
    return _check_read_options(req, where, {"key"})


def _check_range(req: dict[str, Any], where: str) -> set[str]:
    _prefix(_required(req, "prefix", where), where)
    fields = {"prefix"}
    if "limit" in req:
        _uint(req["limit"], "limit", where)
        fields.add("limit")
    if not where and "after" in req:
        _key(req["after"], "after", where)
        fields.add("after")
    return _check_read_options(req, where, fields)


def _key_or_prefix(req: dict[str, Any], where: str) -> set[str]:
    if ("key" in req) == ("prefix" in req):
        raise RequestError(
            INVALID_REQUEST, f"{req['op']}: give exactly one of '{where}key' and '{where}prefix'"
        )
    if "key" in req:
        _key(req["key"], "key", where)
        return {"key"}
    _prefix(req["prefix"], where)
    return {"prefix"}


def _check_delete(req: dict[str, Any], where: str) -> set[str]:
    return _key_or_prefix(req, where)


_TXN_CHECKS: dict[str, Callable[[dict[str, Any], str], set[str]]] = {
    "put": _check_put,
    "get": _check_get,
    "delete": _check_delete,
    "range": _check_range,
}


def _check_txn(req: dict[str, Any], where: str) -> set[str]:
    compares = req.get("compare", [])
    if type(compares) is not list:
        _fail(where, "compare", "must be a list")
    if len(compares) > MAX_TXN_COMPARES:
        _fail(where, "compare", f"has {len(compares)} items, at most {MAX_TXN_COMPARES}", TOO_LARGE)
    for i, c in enumerate(compares):
        _check_compare(c, f"compare[{i}].")
    for branch in ("success", "failure"):
        ops = req.get(branch, [])
        if type(ops) is not list:
            _fail(where, branch, "must be a list")
        if len(ops) > MAX_TXN_OPS:
            _fail(where, branch, f"has {len(ops)} ops, at most {MAX_TXN_OPS}", TOO_LARGE)
        for i, sub in enumerate(ops):
            _check_txn_op(sub, f"{branch}[{i}].")
    return {"compare", "success", "failure"}


def _check_txn_op(sub: object, where: str) -> None:
    if type(sub) is not dict:
        raise RequestError(INVALID_REQUEST, f"'{where[:-1]}' must be a map")
    op = sub.get("op")
    if op is None:
        raise RequestError(INVALID_REQUEST, f"missing field '{where}op'")
    if type(op) is not str or op not in _TXN_CHECKS:
        raise RequestError(
            INVALID_REQUEST, f"'{where}op' must be one of put, get, delete, range, got {op!r:.40}"
        )
    for name in sub:
        if type(name) is not str:
            raise RequestError(INVALID_REQUEST, f"field names must be text, got {name!r:.40}")
    fields = _TXN_CHECKS[op](sub, where)
    _no_other_fields(sub, fields | {"op"}, where)


def _check_compare(c: object, where: str) -> None:
    if type(c) is not dict:
        raise RequestError(INVALID_REQUEST, f"'{where[:-1]}' must be a map")
    for name in c:
        if name not in ("key", "target", "result", "value"):
            raise RequestError(INVALID_REQUEST, f"unknown field '{where}{name!s:.60}' in a compare")
    for name in ("key", "target", "result", "value"):
        if name not in c:
            raise RequestError(INVALID_REQUEST, f"compare: missing field '{where}{name}'")
    _key(c["key"], "key", where)
    target, result, value = c["target"], c["result"], c["value"]
    if type(target) is not str or target not in COMPARE_TARGETS:
        _fail(where, "target", "must be one of value, version, create_revision, mod_revision")
    if type(result) is not str or result not in COMPARE_RESULTS:
        _fail(where, "result", "must be one of ==, !=, <, >")
    if target == "value":
        if value is None:
            if result not in ("==", "!="):
                _fail(where, "value", "null compares only with == and !=")
        else:
            _bytes(value, "value", where)
    else:
        _uint(value, "value", where)


def _check_watch(req: dict[str, Any], where: str) -> set[str]:
    fields = _key_or_prefix(req, where)
    if "start_revision" in req:
        _uint(req["start_revision"], "start_revision", where)
        fields.add("start_revision")
    return fields


def _check_unwatch(req: dict[str, Any], where: str) -> set[str]:
    _uint(_required(req, "watch_id", where), "watch_id", where)
    return {"watch_id"}


def _check_refresh(req: dict[str, Any], where: str) -> set[str]:
    _text(_required(req, "token", where), "token", where, max_bytes=MAX_TOKEN_BYTES, empty=False)
    return {"token"}


def _check_compact(req: dict[str, Any], where: str) -> set[str]:
    _uint(_required(req, "revision", where), "revision", where)
    return {"revision"}


def _check_status(req: dict[str, Any], where: str) -> set[str]:
    return set()


def _check_snapshot_chunk(req: dict[str, Any], where: str) -> set[str]:
    for name in ("snapshot_id", "offset"):
        _uint(_required(req, name, where), name, where)
    return {"snapshot_id", "offset"}


def _node_text(req: dict[str, Any], name: str, where: str) -> None:
    _text(_required(req, name, where), name, where, max_bytes=MAX_TEXT_BYTES, empty=False)


# ``id`` is the request id (an unsigned integer), so a member's node id is carried as
# ``member_id`` (docs/client-protocol.md).


def _check_member_add(req: dict[str, Any], where: str) -> set[str]:
    for name in ("member_id", "peer", "client"):
        _node_text(req, name, where)
    if "learner" in req:  # an extension: add a learner, to be promoted later
        _bool(req["learner"], "learner", where)
        return {"member_id", "peer", "client", "learner"}
    return {"member_id", "peer", "client"}


def _check_member_id(req: dict[str, Any], where: str) -> set[str]:
    _node_text(req, "member_id", where)
    return {"member_id"}


def _check_transfer_leader(req: dict[str, Any], where: str) -> set[str]:
    if "to" in req:
        _text(req["to"], "to", where, max_bytes=MAX_TEXT_BYTES, empty=False)
        return {"to"}
    return set()


_OPS: dict[str, Callable[[dict[str, Any], str], set[str]]] = {
    **_TXN_CHECKS,
    "txn": _check_txn,
    "compact": _check_compact,
    "watch": _check_watch,
    "unwatch": _check_unwatch,
    "refresh": _check_refresh,
    "status": _check_status,
    "lease_grant": _check_lease_grant,
    "lease_revoke": _check_lease,
    "lease_keepalive": _check_lease,
    "lease_ttl": _check_lease_ttl,
    "lease_list": _check_status,  # no fields
    "lease_checkpoint": _check_lease_checkpoint,
    "snapshot": _check_status,  # no fields
    "snapshot_chunk": _check_snapshot_chunk,
    "member_add": _check_member_add,
    "member_promote": _check_member_id,
    "member_remove": _check_member_id,
    "transfer_leader": _check_transfer_leader,
}
