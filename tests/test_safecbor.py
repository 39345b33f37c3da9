"""liferaft.safecbor: the one decoder for CBOR from outside (peers, clients, the log)."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from liferaft.safecbor import CBORError, dumps, loads


def test_plain_values_round_trip() -> None:
    value = {"id": 1, "op": "put", "key": "k", "value": b"\x00\xff", "ok": True, "xs": [1, 2]}
    assert loads(dumps(value)) == value


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("a tag (bignum)", cbor2.dumps(cbor2.CBORTag(2, b"\x01" * 64))),
        ("a tag (regex)", cbor2.dumps(cbor2.CBORTag(35, "a+"))),
        ("trailing bytes", dumps({"a": 1}) + b"\x00"),
        ("an indefinite-length array", b"\x9f\x01\xff"),
        ("a duplicate map key", b"\xa2\x61a\x01\x61a\x02"),
        ("nesting beyond the limit", b"\x81" * 40 + b"\x00"),
        ("a truncated item", dumps({"a": b"x" * 10})[:-3]),
        ("not CBOR at all", b"\xff\xfe"),
    ],
)
def test_refuses(name: str, data: bytes) -> None:
    with pytest.raises(CBORError):
        loads(data, max_depth=16)


@settings(max_examples=300, derandomize=True)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_cbor_error(data: bytes) -> None:
    with contextlib.suppress(CBORError):  # any other exception fails the test
        loads(data)
