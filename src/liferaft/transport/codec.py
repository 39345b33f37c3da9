"""The peer wire format: a batch of peer messages as one canonical CBOR item.

A batch is ``[version, [message, ...]]`` and each message a compact array
``[type_code, term, src, dst, *fields]`` with the fields of its dataclass in the order of
``_LAYOUT``; an entry is ``[index, term, kind, data]`` and a snapshot's metadata
``[index, term, [voters...], [learners...]]`` with both id lists sorted. Only unsigned
integers, booleans, byte strings, text strings and arrays occur; no maps, floats, nulls or
tags.

``decode`` treats its input as hostile (docs/transport.md) and raises nothing but CodecError:
the size is checked first, cbor2 is told to refuse every tag (cbor2 6 decodes its
built-in tags, such as bignums, decimal fractions, regexes and shared references, without
consulting ``tag_hook``, so each tag is mapped to a decoder that refuses it), indefinite
lengths and duplicate keys, and to stop at the schema's nesting depth; the result is then
checked against the schema, re-encoded canonically and compared with the input (which
refuses trailing bytes, non-minimal lengths and integers, unsorted id lists and anything
else with two spellings), and finally each message goes through the core's ``validate``,
or, for the messages the core never sees (``files.py``: SnapshotChunk and SnapshotAck,
type codes 100 and up), through ``validate_file_message``. So ``encode(decode(b)) == b``
holds for every ``b`` that decodes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import cbor2

from liferaft import safecbor
from liferaft.core.membership import Membership
from liferaft.core.messages import (
    AppendEntries,
    AppendResponse,
    Entry,
    EntryKind,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    MalformedMessage,
    ReadIndexRequest,
    ReadIndexResponse,
    SnapshotMeta,
    SnapshotResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
    validate,
)
from liferaft.transport.files import (
    PeerMessage,
    SnapshotAck,
    SnapshotChunk,
    validate_file_message,
)

PROTOCOL_VERSION = 1

# [batch [messages [message [entries|meta [entry|voters]]]]]: five arrays deep at most.
MAX_DEPTH = 5
# Every integer on the wire is an index, a term, an offset or a counter: unsigned, and
# small enough for SQLite's signed 64-bit INTEGER.
MAX_UINT = 2**63 - 1
MAX_NODE_ID = 255  # characters; ids are DNS labels (63), this only bounds garbage

# Field kinds.
_UINT, _BOOL, _BYTES, _ENTRIES, _META = range(5)

_LAYOUT: tuple[tuple[int, type[PeerMessage], tuple[tuple[str, int], ...]], ...] = (
    (
        1,
        VoteRequest,
        (("last_index", _UINT), ("last_term", _UINT), ("pre_vote", _BOOL), ("transfer", _BOOL)),
    ),
    (2, VoteResponse, (("granted", _BOOL), ("pre_vote", _BOOL))),
    (
        3,
        AppendEntries,
        (("prev_index", _UINT), ("prev_term", _UINT), ("entries", _ENTRIES), ("commit", _UINT)),
    ),
    (
        4,
        AppendResponse,
        (("success", _BOOL), ("index", _UINT), ("hint_index", _UINT), ("hint_term", _UINT)),
    ),
    (5, Heartbeat, (("commit", _UINT), ("read_round", _UINT))),
    (6, HeartbeatResponse, (("read_round", _UINT),)),
    (7, InstallSnapshot, (("meta", _META), ("offset", _UINT), ("data", _BYTES), ("done", _BOOL))),
    (8, SnapshotResponse, (("index", _UINT), ("next_offset", _UINT), ("done", _BOOL))),
    (9, TimeoutNow, ()),
    (10, ReadIndexRequest, (("ctx", _BYTES),)),
    (11, ReadIndexResponse, (("ctx", _BYTES), ("index", _UINT), ("ok", _BOOL))),
    # Messages outside the Raft core (files.py): codes from 100 leave room for core ones.
    (
        100,
        SnapshotChunk,
        (
            ("transfer", _UINT),
            ("offset", _UINT),
            ("data", _BYTES),
            ("done", _BOOL),
            ("size", _UINT),
            ("checksum", _BYTES),
        ),
    ),
    (101, SnapshotAck, (("transfer", _UINT), ("next_offset", _UINT), ("ok", _BOOL))),
)
_BY_TYPE = {cls: (code, fields) for code, cls, fields in _LAYOUT}
_BY_CODE = {code: (cls, fields) for code, cls, fields in _LAYOUT}
_KINDS = {k.value: k for k in EntryKind}


class CodecError(ValueError):
    """Bytes from a peer that are not a well-formed batch of this protocol version."""


# ---------------------------------------------------------------- encoding


def encode(msgs: Sequence[PeerMessage]) -> bytes:
    """One canonical CBOR item holding the whole batch (one WebSocket message)."""
    return cbor2.dumps([PROTOCOL_VERSION, [_encode_message(m) for m in msgs]], canonical=True)


def _encode_message(m: PeerMessage) -> list[object]:
    code, fields = _BY_TYPE[type(m)]
    out: list[object] = [code, m.term, m.src, m.dst]
    for name, kind in fields:
        value = getattr(m, name)
        if kind == _ENTRIES:
            out.append([[e.index, e.term, int(e.kind), e.data] for e in value])
        elif kind == _META:
            ms = value.membership
            out.append([value.index, value.term, sorted(ms.voters), sorted(ms.learners)])
        else:
            out.append(value)
    return out


# ---------------------------------------------------------------- decoding


def decode(data: bytes, *, max_bytes: int) -> list[PeerMessage]:
    """The messages of one batch; CodecError (and nothing else) if ``data`` is not one."""
    if len(data) > max_bytes:
        raise CodecError(f"batch of {len(data)} bytes exceeds {max_bytes}")
    try:
        obj = safecbor.loads(data, max_depth=MAX_DEPTH)
    except safecbor.CBORError as exc:
        raise CodecError(str(exc)) from None
    if type(obj) is not list or len(obj) != 2:
        raise CodecError("a batch is [version, messages]")
    version, raw = obj
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise CodecError(f"unsupported protocol version {version!r}")
    if type(raw) is not list:
        raise CodecError("messages must be an array")
    msgs = [_decode_message(r) for r in raw]
    # Only now is ``obj`` known to hold nothing but ints, bools, strings and arrays, so
    # re-encoding it is cheap and safe.
    canonical = cbor2.dumps(obj, canonical=True)
    if canonical != data:
        if bytes(data[: len(canonical)]) == canonical:
            raise CodecError("trailing bytes after the batch")
        raise CodecError("not canonically encoded")
    for m in msgs:
        try:
            if isinstance(m, (SnapshotChunk, SnapshotAck)):
                validate_file_message(m)
            else:
                validate(m)
        except MalformedMessage as exc:
            raise CodecError(f"{type(m).__name__}: {exc}") from None
    return msgs


def _decode_message(raw: object) -> PeerMessage:
    if type(raw) is not list or len(raw) < 4:
        raise CodecError("a message is [type, term, src, dst, ...]")
    code = raw[0]
    if type(code) is not int or code not in _BY_CODE:
        raise CodecError(f"unknown message type {code!r}")
    cls, fields = _BY_CODE[code]
    if len(raw) != 4 + len(fields):
        raise CodecError(f"{cls.__name__} takes {4 + len(fields)} items, got {len(raw)}")
    kwargs: dict[str, Any] = {
        "term": _uint(raw[1]),
        "src": _node_id(raw[2]),
        "dst": _node_id(raw[3]),
    }
    for (name, kind), value in zip(fields, raw[4:], strict=True):
        if kind == _UINT:
            kwargs[name] = _uint(value)
        elif kind == _BOOL:
            if type(value) is not bool:
                raise CodecError(f"{name} must be a boolean")
            kwargs[name] = value
        elif kind == _BYTES:
            if type(value) is not bytes:
                raise CodecError(f"{name} must be a byte string")
            kwargs[name] = value
        elif kind == _ENTRIES:
            kwargs[name] = _entries(value)
        else:
            kwargs[name] = _snapshot_meta(value)
    return cls(**kwargs)


def _uint(value: object) -> int:
    # ``type(...) is int`` also refuses bool, which is an int subclass.
    if type(value) is not int or not 0 <= value <= MAX_UINT:
        raise CodecError(f"expected an unsigned integer below 2**63, got {value!r:.40}")
    return value


def _node_id(value: object) -> str:
    if type(value) is not str or len(value) > MAX_NODE_ID:
        raise CodecError("a node id must be a short text string")
    return value


def _entries(value: object) -> tuple[Entry, ...]:
    if type(value) is not list:
        raise CodecError("entries must be an array")
    out = []
    for e in value:
        if type(e) is not list or len(e) != 4:
            raise CodecError("an entry is [index, term, kind, data]")
        index, term, kind, data = e
        if type(data) is not bytes:
            raise CodecError("entry data must be a byte string")
        if type(kind) is not int or kind not in _KINDS:
            raise CodecError(f"unknown entry kind {kind!r:.40}")
        out.append(Entry(_uint(index), _uint(term), _KINDS[kind], data))
    return tuple(out)


def _snapshot_meta(value: object) -> SnapshotMeta:
    if type(value) is not list or len(value) != 4:
        raise CodecError("snapshot metadata is [index, term, voters, learners]")
    index, term, voters, learners = value
    try:
        membership = Membership(_id_set(voters), _id_set(learners))
    except ValueError as exc:  # a node both voter and learner
        raise CodecError(str(exc)) from None
    return SnapshotMeta(_uint(index), _uint(term), membership)


def _id_set(value: object) -> frozenset[str]:
    if type(value) is not list:
        raise CodecError("a member list must be an array")
    ids = [_node_id(v) for v in value]
    if any(a >= b for a, b in itertools.pairwise(ids)):
        raise CodecError("member lists must be sorted and free of duplicates")
    return frozenset(ids)
