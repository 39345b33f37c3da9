"""Client request validation (docs/client-protocol.md) and the write command encoding."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from liferaft.kv.commands import (
    MAX_KEY_BYTES,
    MAX_TXN_COMPARES,
    MAX_TXN_OPS,
    CommandError,
    RequestError,
    command_from_request,
    decode_command,
    encode_command,
    validate_request,
)

SESSION = bytes(range(16))


def invalid(req: object, *words: str, code: str = "invalid_request") -> RequestError:
    with pytest.raises(RequestError) as info:
        validate_request(req)
    assert info.value.code == code, info.value
    assert str(info.value) == info.value.message
    for w in words:
        assert w in info.value.message, info.value.message
    return info.value


# ---------------------------------------------------------------- valid requests

VALID: list[dict[str, Any]] = [
    {"id": 1, "op": "put", "key": "a", "value": b"1"},
    {"id": 2, "op": "put", "key": "a", "value": b"", "session": SESSION, "seq": 0},
    {"id": 3, "op": "get", "key": "a"},
    {"id": 4, "op": "get", "key": "a", "serializable": True},
    {"id": 5, "op": "range", "prefix": ""},
    {"id": 6, "op": "range", "prefix": "a/", "limit": 10, "serializable": False},
    {"id": 7, "op": "delete", "key": "a"},
    {"id": 8, "op": "delete", "prefix": ""},
    {"id": 9, "op": "txn"},
    {
        "id": 10,
        "op": "txn",
        "compare": [
            {"key": "a", "target": "version", "result": "==", "value": 0},
            {"key": "a", "target": "value", "result": "!=", "value": None},
            {"key": "a", "target": "value", "result": "<", "value": b"z"},
            {"key": "a", "target": "create_revision", "result": ">", "value": 3},
            {"key": "a", "target": "mod_revision", "result": "<", "value": 9},
        ],
        "success": [
            {"op": "put", "key": "a", "value": b"1"},
            {"op": "get", "key": "a"},
            {"op": "range", "prefix": "a", "limit": 2},
            {"op": "delete", "prefix": "b"},
        ],
        "failure": [{"op": "delete", "key": "a"}],
        "session": SESSION,
        "seq": 2**63 - 1,
    },
    {"id": 11, "op": "watch", "key": "a"},
    {"id": 12, "op": "watch", "prefix": "", "start_revision": 5},
    {"id": 13, "op": "unwatch", "watch_id": 3},
    {"id": 14, "op": "refresh", "token": "eyJ..."},
    {"id": 15, "op": "status"},
    {"id": 16, "op": "member_add", "member_id": "n4", "peer": "h:7004", "client": "h:8004"},
    {"op": "member_add", "member_id": "n5", "peer": "h:1", "client": "h:2", "learner": True},
    {"id": 17, "op": "member_promote", "member_id": "n4"},
    {"id": 18, "op": "member_remove", "member_id": "n4"},
    {"id": 19, "op": "transfer_leader"},
    {"id": 20, "op": "transfer_leader", "to": "n2"},
    {"id": 2**64 - 1, "op": "put", "key": "k" * MAX_KEY_BYTES, "value": b"x"},
    {"op": "put", "key": "é" * (MAX_KEY_BYTES // 2), "value": b"x"},  # id is optional
    {"id": 21, "op": "get", "key": "a", "revision": 5},
    {"id": 22, "op": "get", "key": "a", "revision": 0, "serializable": True},
    {"id": 23, "op": "range", "prefix": "a/", "limit": 2, "after": "a/1", "revision": 2**63 - 1},
    {"id": 24, "op": "range", "prefix": "", "after": "é", "serializable": False},
    {"id": 25, "op": "compact", "revision": 7},
    {"id": 26, "op": "compact", "revision": 0, "session": SESSION, "seq": 3},
]


@pytest.mark.parametrize("req", VALID, ids=lambda r: f"{r['op']}-{r.get('id')}")
def test_valid_requests_pass(req: dict[str, Any]) -> None:
    validate_request(req)


# ---------------------------------------------------------------- the envelope


def test_a_request_must_be_a_map_with_a_known_op() -> None:
    invalid([1, 2], "map")
    invalid(b"x", "map")
    invalid({"id": 1}, "missing field 'op'")
    invalid({"id": 1, "op": 3}, "'op' must be text")
    invalid({"id": 1, "op": "frobnicate"}, "unknown op", "frobnicate")
    invalid({1: "x", "op": "status"}, "field names must be text")


@pytest.mark.parametrize("bad", [-1, 2**64, "1", 1.0, True, None])
def test_request_id_must_be_a_uint(bad: object) -> None:
    invalid({"id": bad, "op": "status"}, "'id'")


def test_unknown_fields_are_refused_by_name() -> None:
    invalid({"op": "put", "key": "a", "value": b"", "prevkv": True}, "unknown field 'prevkv'")
    invalid({"op": "get", "key": "a", "session": SESSION, "seq": 1}, "unknown field 'se")
    invalid({"op": "status", "x": 1}, "unknown field 'x'")


# ---------------------------------------------------------------- keys and values


@pytest.mark.parametrize("op", ["put", "get", "delete"])
def test_key_is_required_text(op: str) -> None:
    extra = {"value": b""} if op == "put" else {}
    if op != "delete":
        invalid({"op": op, **extra}, "missing field 'key'")
    invalid({"op": op, "key": b"a", **extra}, "'key' must be text")
    invalid({"op": op, "key": 1, **extra}, "'key' must be text")
    invalid({"op": op, "key": "", **extra}, "'key' must not be empty")
    invalid({"op": op, "key": "\ud800", **extra}, "'key' must be valid UTF-8")


def test_key_over_4096_utf8_bytes_is_too_large() -> None:
    err = invalid(
        {"op": "put", "key": "é" * 2049, "value": b""}, "'key'", "4098 bytes", code="too_large"
    )
    assert "4096" in err.message
    invalid({"op": "range", "prefix": "k" * 4097}, "'prefix'", code="too_large")


def test_value_must_be_bytes() -> None:
    invalid({"op": "put", "key": "a"}, "missing field 'value'")
    invalid({"op": "put", "key": "a", "value": "text"}, "'value' must be bytes")
    invalid({"op": "put", "key": "a", "value": None}, "'value' must be bytes")


def test_range_fields() -> None:
    invalid({"op": "range"}, "missing field 'prefix'")
    invalid({"op": "range", "prefix": None}, "'prefix' must be text")
    invalid({"op": "range", "prefix": "", "limit": -1}, "'limit' must be an unsigned integer")
    invalid({"op": "range", "prefix": "", "limit": True}, "'limit'")
    invalid({"op": "range", "prefix": "", "serializable": 1}, "'serializable' must be a boolean")
    invalid({"op": "get", "key": "a", "serializable": "yes"}, "'serializable' must be a boolean")


def test_delete_takes_exactly_one_of_key_and_prefix() -> None:
    invalid({"op": "delete"}, "exactly one of 'key' and 'prefix'")
    invalid({"op": "delete", "key": "a", "prefix": "a"}, "exactly one of")


def test_session_and_seq() -> None:
    put = {"op": "put", "key": "a", "value": b""}
    invalid({**put, "session": SESSION}, "'session' and 'seq' go together")
    invalid({**put, "seq": 1}, "'session' and 'seq' go together")
    invalid({**put, "session": b"short", "seq": 1}, "'session' must be 16 bytes")
    invalid({**put, "session": "x" * 16, "seq": 1}, "'session' must be 16 bytes")
    invalid({**put, "session": SESSION, "seq": -1}, "'seq'")
    invalid({**put, "session": SESSION, "seq": 2**63}, "'seq'")


# ---------------------------------------------------------------- txn


def test_txn_branches_and_compares_must_be_lists() -> None:
    invalid({"op": "txn", "compare": {}}, "'compare' must be a list")
    invalid({"op": "txn", "success": None}, "'success' must be a list")
    invalid({"op": "txn", "failure": "x"}, "'failure' must be a list")


def test_txn_ops_are_put_get_delete_range_only() -> None:
    invalid({"op": "txn", "success": [1]}, "'success[0]' must be a map")
    invalid({"op": "txn", "success": [{"key": "a"}]}, "missing field 'success[0].op'")
    invalid({"op": "txn", "failure": [{"op": "txn"}]}, "'failure[0].op' must be one of")
    invalid({"op": "txn", "success": [{"op": "watch", "key": "a"}]}, "must be one of")


def test_txn_nested_op_fields_are_checked_with_their_path() -> None:
    ok = {"op": "get", "key": "a"}
    invalid({"op": "txn", "success": [ok, {"op": "put", "key": "a"}]}, "'success[1].value'")
    invalid({"op": "txn", "success": [{"op": "get", "key": ""}]}, "'success[0].key'")
    invalid({"op": "txn", "failure": [{"op": "range", "prefix": "", "limit": "2"}]}, "limit")
    invalid({"op": "txn", "success": [{"op": "delete"}]}, "'success[0].key'")
    # Request-level fields make no sense inside a txn.
    invalid({"op": "txn", "success": [{**ok, "serializable": True}]}, "unknown field")
    invalid({"op": "txn", "success": [{**ok, "session": SESSION}]}, "unknown field")


def test_txn_size_limits() -> None:
    put = {"op": "put", "key": "a", "value": b""}
    cmp = {"key": "a", "target": "version", "result": "==", "value": 0}
    validate_request({"op": "txn", "success": [put] * MAX_TXN_OPS, "compare": [cmp] * 128})
    invalid({"op": "txn", "success": [put] * (MAX_TXN_OPS + 1)}, "success", code="too_large")
    invalid({"op": "txn", "failure": [put] * (MAX_TXN_OPS + 1)}, "failure", code="too_large")
    invalid({"op": "txn", "compare": [cmp] * (MAX_TXN_COMPARES + 1)}, "compare", code="too_large")


@pytest.mark.parametrize(
    ("compare", "words"),
    [
        ("x", ["'compare[0]' must be a map"]),
        ({"target": "version", "result": "==", "value": 0}, ["missing field 'compare[0].key'"]),
        ({"key": "a", "result": "==", "value": 0}, ["compare[0].target"]),
        ({"key": "a", "target": "version", "value": 0}, ["compare[0].result"]),
        ({"key": "a", "target": "version", "result": "=="}, ["compare[0].value"]),
        ({"key": "a", "target": "lease", "result": "==", "value": 0}, ["target", "one of"]),
        ({"key": "a", "target": "version", "result": "<=", "value": 0}, ["result", "one of"]),
        ({"key": "a", "target": "version", "result": "==", "value": b"0"}, ["unsigned"]),
        ({"key": "a", "target": "mod_revision", "result": "==", "value": -1}, ["unsigned"]),
        ({"key": "a", "target": "value", "result": "==", "value": 0}, ["must be bytes"]),
        ({"key": "a", "target": "value", "result": "<", "value": None}, ["null compares only"]),
        ({"key": "a", "target": "value", "result": "==", "value": b"", "x": 1}, ["'compare[0].x'"]),
    ],
)
def test_bad_compares(compare: object, words: list[str]) -> None:
    invalid({"op": "txn", "compare": [compare]}, *words)


# ---------------------------------------------------------------- other ops


def test_watch_and_admin_fields() -> None:
    invalid({"op": "watch"}, "exactly one of 'key' and 'prefix'")
    invalid({"op": "watch", "key": "a", "start_revision": -1}, "'start_revision'")
    invalid({"op": "unwatch"}, "missing field 'watch_id'")
    invalid({"op": "unwatch", "watch_id": "1"}, "'watch_id'")
    invalid({"op": "refresh"}, "missing field 'token'")
    invalid({"op": "refresh", "token": ""}, "'token' must not be empty")
    invalid({"op": "member_add", "member_id": "n4", "peer": "h:1"}, "missing field 'client'")
    invalid({"op": "member_remove"}, "missing field 'member_id'")
    add = {"op": "member_add", "member_id": "n4", "peer": "h:1", "client": "h:2"}
    invalid({**add, "learner": 1}, "'learner' must be a boolean")
    # The member is "member_id": "id" is the request id, an unsigned integer.
    invalid({**add, "id": "n4"}, "'id' must be an unsigned integer")
    invalid({"op": "member_promote", "member_id": 4}, "'member_id' must be text")
    invalid({"op": "transfer_leader", "to": ""}, "'to' must not be empty")


# ---------------------------------------------------------------- reads at a revision, compact


@pytest.mark.parametrize("bad", [-1, 2**63, "1", 1.0, True, None, b"1"])
def test_read_revision_must_be_a_uint(bad: object) -> None:
    invalid({"op": "get", "key": "a", "revision": bad}, "'revision' must be an unsigned integer")
    invalid(
        {"op": "range", "prefix": "", "revision": bad}, "'revision' must be an unsigned integer"
    )


def test_range_after_is_a_key() -> None:
    invalid({"op": "range", "prefix": "", "after": b"a"}, "'after' must be text")
    invalid({"op": "range", "prefix": "", "after": None}, "'after' must be text")
    invalid({"op": "range", "prefix": "", "after": 3}, "'after' must be text")
    invalid({"op": "range", "prefix": "", "after": ""}, "'after' must not be empty")
    invalid({"op": "range", "prefix": "", "after": "\ud800"}, "'after' must be valid UTF-8")
    invalid({"op": "range", "prefix": "", "after": "k" * 4097}, "'after'", code="too_large")
    validate_request({"op": "range", "prefix": "", "after": "k" * MAX_KEY_BYTES})
    # Paging is for ranges: a get has no ``after``.
    invalid({"op": "get", "key": "a", "after": "a"}, "unknown field 'after'")


@pytest.mark.parametrize("bad", [-1, 2**63, "1", 1.0, True, None])
def test_compact_revision_must_be_a_uint(bad: object) -> None:
    invalid({"op": "compact", "revision": bad}, "'revision' must be an unsigned integer")


def test_compact_fields() -> None:
    invalid({"op": "compact"}, "compact: missing field 'revision'")
    invalid({"op": "compact", "revision": 1, "key": "a"}, "unknown field 'key'")
    invalid({"op": "compact", "revision": 1, "session": SESSION}, "'session' and 'seq' go together")
    invalid({"op": "compact", "revision": 1, "serializable": True}, "unknown field 'serializable'")


def test_compact_is_a_write_command() -> None:
    cmd = command_from_request({"id": 1, "op": "compact", "revision": 3}, time_ms=9)
    assert cmd == {"op": "compact", "revision": 3, "time_ms": 9}
    assert decode_command(encode_command(cmd)) == cmd
    with pytest.raises(CommandError, match="missing field 'revision'"):
        decode_command(encode_command({"op": "compact", "time_ms": 9}))


@pytest.mark.parametrize(
    ("sub", "field"),
    [
        ({"op": "get", "key": "a", "revision": 1}, "revision"),
        ({"op": "get", "key": "a", "serializable": False}, "serializable"),
        ({"op": "range", "prefix": "", "revision": 1}, "revision"),
        ({"op": "range", "prefix": "", "after": "a"}, "after"),
        ({"op": "range", "prefix": "", "serializable": True}, "serializable"),
        ({"op": "range", "prefix": "", "limit": 1, "after": "a", "revision": 0}, "after"),
    ],
)
def test_read_options_are_refused_inside_a_txn(sub: dict[str, Any], field: str) -> None:
    """A txn reads at its own revision: ``revision``, ``after`` and ``serializable``
    belong to top-level reads only."""
    invalid({"op": "txn", "success": [sub]}, f"unknown field 'success[0].{field}'")
    put = {"op": "put", "key": "a", "value": b""}
    invalid({"op": "txn", "failure": [put, sub]}, f"unknown field 'failure[1].{field}'")


def test_compact_is_not_a_txn_op() -> None:
    invalid({"op": "txn", "success": [{"op": "compact", "revision": 1}]}, "'success[0].op'")


# ---------------------------------------------------------------- commands


def test_command_round_trip_and_canonical_encoding() -> None:
    req = VALID[9]
    cmd = command_from_request(req, time_ms=1234)
    assert "id" not in cmd and cmd["time_ms"] == 1234 and cmd["seq"] == req["seq"]
    data = encode_command(cmd)
    assert decode_command(data) == cmd
    # The same command built in another field order encodes to the same bytes.
    assert encode_command(dict(reversed(list(cmd.items())))) == data


def test_only_writes_become_commands() -> None:
    with pytest.raises(RequestError, match="not a write"):
        command_from_request({"id": 1, "op": "get", "key": "a"}, time_ms=0)
    with pytest.raises(CommandError, match="not a write"):
        decode_command(encode_command({"op": "get", "key": "a", "time_ms": 0}))


def _cmd(**fields: object) -> dict[str, object]:
    return {"op": "put", "key": "a", "value": b"1", "time_ms": 5, **fields}


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "not a CBOR item"),
        (b"\xff", "not a CBOR item"),
        (cbor2.dumps([1, 2]), "must be a CBOR map"),
        (cbor2.dumps({"op": "put", "key": "a", "value": b"1"}), "time_ms"),
        (cbor2.dumps(_cmd(time_ms=-5), canonical=True), "time_ms"),
        (cbor2.dumps(_cmd(id=3), canonical=True), "request id"),
        (cbor2.dumps(_cmd(key=""), canonical=True), "'key' must not be empty"),
        (cbor2.dumps(_cmd(extra=1), canonical=True), "unknown field"),
        (encode_command(_cmd()) + b"\x00", "trailing bytes"),
        # cbor2's default keeps insertion order; canonical order is by length, then bytes.
        (cbor2.dumps({"time_ms": 5, "op": "put", "key": "a", "value": b"1"}), "not canonically"),
        (encode_command(_cmd())[:-1] + b"\x18\x05", "not canonically"),  # time_ms not minimal
        (b"\xc1\x00", "tag 1"),  # epoch datetime
        (b"\xd9\xd9\xf7\xa0", "tag 55799"),  # self-described CBOR
        (cbor2.dumps(_cmd(value=cbor2.CBORTag(2, b"\x01")), canonical=True), "tag 2"),  # bignum
        (b"\xbf\xff", "indefinite"),
        (b"\xa2\x61a\x01\x61a\x02", "Duplicate"),
        (encode_command(_cmd(op="txn", success=[[[[1]]]])), "depth"),
    ],
)
def test_decode_refuses_junk(data: bytes, words: str) -> None:
    with pytest.raises(CommandError) as info:
        decode_command(data)
    assert words in str(info.value), str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decode_raises_only_command_error(data: bytes) -> None:
    try:
        cmd = decode_command(data)
    except CommandError:
        return
    assert encode_command(cmd) == data


_names = st.sampled_from(
    [
        "op",
        "id",
        "key",
        "value",
        "prefix",
        "limit",
        "compare",
        "success",
        "failure",
        "target",
        "result",
        "session",
        "seq",
        "start_revision",
        "revision",
        "after",
        "serializable",
        "member_id",
        "x",
    ]
)
_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-3, 2**65)
    | st.binary(max_size=17)
    | st.text(max_size=5)
    | st.sampled_from(
        ["put", "get", "delete", "range", "txn", "compact", "watch", "version", "value", "=="]
    )
)
_anything = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(_names | st.text(max_size=3), inner, max_size=5)
    ),
    max_leaves=25,
)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(_names, _anything, max_size=6))
def test_validate_raises_only_request_error(req: dict[str, object]) -> None:
    try:
        validate_request(req)
    except RequestError as exc:
        assert exc.code in ("invalid_request", "too_large")
        assert exc.message
