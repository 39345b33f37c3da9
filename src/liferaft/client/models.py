"""The values the client returns, and builders for transactions (docs/client-protocol.md).

Results are frozen dataclasses; keys are ``str`` and values ``bytes`` as on the wire.
Transactions are given as plain dicts in the wire's own shape, or built with the helpers
here, which also turn ``str`` values into UTF-8 bytes::

    from liferaft.client import compare, op_put, op_get

    result = await client.txn(
        compare=[compare("config", "version", "==", 0)],   # "create if absent"
        success=[op_put("config", "v1")],
        failure=[op_get("config")],
    )
    if not result.succeeded:
        print("already there:", result.results[0]["kv"].value)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from liferaft.client.errors import InternalError, InvalidRequest

MAX_KEY_BYTES = 4096
MAX_LEASE_TTL = 86400  # seconds: a lease's TTL is 1..86400 (docs/client-protocol.md)
MAX_UINT = 2**63 - 1  # the largest integer field the protocol takes

CompareTarget = Literal["value", "version", "create_revision", "mod_revision"]
CompareResult = Literal["==", "!=", "<", ">"]
_TARGETS = ("value", "version", "create_revision", "mod_revision")
_RESULTS = ("==", "!=", "<", ">")
_TXN_OPS = ("put", "get", "delete", "range")


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key and its value, as etcd has it: ``mod_revision`` is the revision of the last
    write to the key, ``create_revision`` that of its creation and ``version`` the number
    of writes since it was created (1 for a new key).

    >>> kv = KeyValue("greeting", b"hello", 5, 7, 2)
    >>> kv.text
    'hello'
    """

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int

    @property
    def text(self) -> str:
        """The value decoded as UTF-8 (replacing bytes that are not)."""
        return self.value.decode("utf-8", "replace")

    def as_dict(self) -> dict[str, Any]:
        """The wire's map form: ``{"key", "value", "create_revision", ...}``."""
        return {
            "key": self.key,
            "value": self.value,
            "create_revision": self.create_revision,
            "mod_revision": self.mod_revision,
            "version": self.version,
        }


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change seen by a watch: ``type`` is ``"put"`` or ``"delete"``; for a delete,
    ``kv.mod_revision`` is the revision of the delete and ``kv.value`` is empty."""

    type: str
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class TxnResult:
    """What a transaction did: ``succeeded`` says whether the compares held (so the
    ``success`` ops ran) or not (the ``failure`` ops ran); ``results`` holds one dict per
    op run, as the op would answer alone (``{"revision"}`` for a put, ``{"kv"}`` for a
    get, ``{"deleted"}`` for a delete, ``{"kvs", "more"}`` for a range), with key-values as
    :class:`KeyValue`; ``revision`` is the store revision after the transaction."""

    succeeded: bool
    results: list[dict[str, Any]]
    revision: int


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease the cluster granted: its ``id`` and its ``ttl`` in seconds. Keys put with
    the lease are deleted when it expires (no keepalive reached the leader for ``ttl``)
    or is revoked."""

    id: int
    ttl: int


@dataclass(frozen=True, slots=True)
class LeaseTTL:
    """What the cluster says of a lease: ``ttl``, the seconds it has left; ``granted_ttl``,
    the TTL it was granted with; ``keys``, the keys attached to it when they were asked
    for (else None)."""

    id: int
    ttl: int
    granted_ttl: int
    keys: list[str] | None = None


# ---------------------------------------------------------------- transaction builders


def compare(key: str, target: CompareTarget, result: CompareResult, value: Any) -> dict[str, Any]:
    """A compare: ``compare("k", "version", "==", 0)`` holds when ``k`` does not exist;
    ``compare("k", "value", "==", "v1")`` when its value is ``b"v1"``."""
    return {"key": key, "target": target, "result": result, "value": value}


def op_put(key: str, value: bytes | str, *, lease: int | None = None) -> dict[str, Any]:
    """A put inside a transaction; with ``lease``, the key goes when that lease does."""
    op: dict[str, Any] = {"op": "put", "key": key, "value": value}
    if lease is not None:
        op["lease"] = lease
    return op


def op_get(key: str) -> dict[str, Any]:
    """A get inside a transaction."""
    return {"op": "get", "key": key}


def op_delete(key: str | None = None, *, prefix: str | None = None) -> dict[str, Any]:
    """A delete of one key, or of every key under ``prefix``, inside a transaction."""
    if (key is None) == (prefix is None):
        raise InvalidRequest("give exactly one of key and prefix")
    return {"op": "delete", "key": key} if key is not None else {"op": "delete", "prefix": prefix}


def op_range(prefix: str, *, limit: int = 0) -> dict[str, Any]:
    """A range read of the keys under ``prefix`` inside a transaction."""
    op: dict[str, Any] = {"op": "range", "prefix": prefix}
    if limit:
        op["limit"] = limit
    return op


# ---------------------------------------------------------------- validation, to the wire


def check_key(key: object, what: str = "key") -> str:
    """``key`` if it is a valid key (text, 1..4096 UTF-8 bytes), else InvalidRequest."""
    if not isinstance(key, str):
        raise InvalidRequest(f"{what} must be a str, not {type(key).__name__}")
    if 0 < len(key) <= MAX_KEY_BYTES // 4:  # at most 4 UTF-8 bytes a character
        return key
    size = len(key.encode("utf-8", "surrogatepass"))
    if not 1 <= size <= MAX_KEY_BYTES:
        raise InvalidRequest(f"{what} must be 1..{MAX_KEY_BYTES} UTF-8 bytes, got {size}")
    return key


def check_prefix(prefix: object) -> str:
    """A prefix may be empty (every key); otherwise it follows the key rules."""
    if prefix == "":
        return ""
    return check_key(prefix, "prefix")


def to_bytes(value: object, what: str = "value") -> bytes:
    """``bytes`` for a value given as bytes, bytearray, memoryview or str (UTF-8)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise InvalidRequest(f"{what} must be bytes or str, not {type(value).__name__}")


def check_limit(limit: object) -> int:
    if type(limit) is not int or limit < 0:
        raise InvalidRequest("limit must be an int >= 0 (0 = no limit)")
    return limit


def check_revision(revision: object) -> int:
    if type(revision) is not int or revision < 0:
        raise InvalidRequest("revision must be an int >= 0 (0 = now)")
    return revision


def check_lease_id(lease: object) -> int:
    """A lease id: an int 1..2**63-1 (0 is no lease), else InvalidRequest."""
    if type(lease) is not int or not 1 <= lease <= MAX_UINT:
        raise InvalidRequest(f"a lease id is an int 1..{MAX_UINT}, not {lease!r:.40}")
    return lease


def check_ttl(ttl: object) -> int:
    """A lease TTL in whole seconds, 1..86400, else InvalidRequest."""
    if type(ttl) is not int or not 1 <= ttl <= MAX_LEASE_TTL:
        raise InvalidRequest(f"a lease TTL is whole seconds 1..{MAX_LEASE_TTL}, not {ttl!r:.40}")
    return ttl


def compare_to_wire(c: Mapping[str, Any]) -> dict[str, Any]:
    """A compare checked and normalised for the wire (``str`` values become bytes)."""
    if not isinstance(c, Mapping):
        raise InvalidRequest(f"a compare must be a mapping, not {type(c).__name__}")
    target = c.get("target")
    if target not in _TARGETS:
        raise InvalidRequest(f"compare target must be one of {', '.join(_TARGETS)}")
    if c.get("result") not in _RESULTS:
        raise InvalidRequest(f"compare result must be one of {' '.join(_RESULTS)}")
    if "value" not in c:
        raise InvalidRequest("a compare needs a value")
    value = c["value"]
    if target == "value":
        value = None if value is None else to_bytes(value, "compare value")
    elif type(value) is not int:
        raise InvalidRequest(f"a {target} compare needs an int value")
    return {"key": check_key(c.get("key")), "target": target, "result": c["result"], "value": value}


def txn_op_to_wire(op: Mapping[str, Any]) -> dict[str, Any]:
    """An op inside a txn checked and normalised for the wire."""
    if not isinstance(op, Mapping):
        raise InvalidRequest(f"a txn op must be a mapping, not {type(op).__name__}")
    name = op.get("op")
    if name not in _TXN_OPS:
        raise InvalidRequest(f"a txn op's op must be one of {', '.join(_TXN_OPS)}")
    if name == "put":
        put: dict[str, Any] = {
            "op": "put",
            "key": check_key(op.get("key")),
            "value": to_bytes(op.get("value")),
        }
        if op.get("lease") is not None:
            put["lease"] = check_lease_id(op["lease"])
        return put
    if name == "get":
        return {"op": "get", "key": check_key(op.get("key"))}
    if name == "delete":
        if ("key" in op) == ("prefix" in op):
            raise InvalidRequest("a txn delete needs exactly one of key and prefix")
        if "key" in op:
            return {"op": "delete", "key": check_key(op["key"])}
        return {"op": "delete", "prefix": check_prefix(op["prefix"])}
    out: dict[str, Any] = {"op": "range", "prefix": check_prefix(op.get("prefix"))}
    if op.get("limit"):
        out["limit"] = check_limit(op["limit"])
    return out


def ops_to_wire(ops: Sequence[Mapping[str, Any]], what: str) -> list[dict[str, Any]]:
    if isinstance(ops, str | bytes | Mapping):
        raise InvalidRequest(f"{what} must be a list of ops")
    return [txn_op_to_wire(op) for op in ops]


# ---------------------------------------------------------------- from the wire


def _int(m: Mapping[str, Any], name: str) -> int:
    value = m.get(name, 0)
    if type(value) is not int:
        raise InternalError(f"server sent a non-integer {name}: {value!r:.40}")
    return value


def uint_from_wire(resp: Mapping[str, Any], name: str) -> int:
    """A response's ``name`` field, which must be an int >= 0; InternalError else."""
    value = resp.get(name)
    if type(value) is not int or value < 0:
        raise InternalError(f"response without an integer {name}")
    return value


def kv_from_wire(m: object) -> KeyValue:
    """A KeyValue from the wire's map; InternalError if the server sent something else."""
    if not isinstance(m, Mapping):
        raise InternalError(f"server sent a key-value that is not a map: {m!r:.60}")
    key = m.get("key")
    value = m.get("value", b"")
    if value is None:
        value = b""
    if not isinstance(key, str) or not isinstance(value, bytes):
        raise InternalError("server sent a key-value with a bad key or value type")
    return KeyValue(
        key,
        value,
        _int(m, "create_revision"),
        _int(m, "mod_revision"),
        _int(m, "version"),
    )


def result_from_wire(r: object) -> dict[str, Any]:
    """A txn op's result map with ``kv``/``kvs`` turned into KeyValues."""
    if not isinstance(r, Mapping):
        raise InternalError(f"server sent a txn result that is not a map: {r!r:.60}")
    out = {str(k): v for k, v in r.items()}
    if out.get("kv") is not None:
        out["kv"] = kv_from_wire(out["kv"])
    if isinstance(out.get("kvs"), list):
        out["kvs"] = [kv_from_wire(kv) for kv in out["kvs"]]
    return out


def event_from_wire(e: object) -> WatchEvent:
    if not isinstance(e, Mapping) or e.get("type") not in ("put", "delete"):
        raise InternalError(f"server sent a malformed watch event: {e!r:.60}")
    return WatchEvent(str(e["type"]), kv_from_wire(e.get("kv")))
