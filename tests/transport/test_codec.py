"""The peer wire codec: every message type (the core's and the snapshot-file messages)
round-trips, and decode refuses hostile bytes with CodecError and nothing else."""

from __future__ import annotations

import dataclasses

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liferaft.core.membership import Membership
from liferaft.core.messages import (
    MESSAGE_TYPES,
    AnyMessage,
    AppendEntries,
    AppendResponse,
    Entry,
    EntryKind,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    ReadIndexRequest,
    ReadIndexResponse,
    SnapshotMeta,
    SnapshotResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from liferaft.transport import codec
from liferaft.transport.codec import PROTOCOL_VERSION, CodecError, decode, encode
from liferaft.transport.files import (
    CHECKSUM_BYTES,
    FILE_MESSAGE_TYPES,
    MAX_CHUNK_BYTES,
    PeerMessage,
    SnapshotAck,
    SnapshotChunk,
    file_hasher,
)

MAX = 1 << 20

uints = st.integers(min_value=0, max_value=codec.MAX_UINT)
small = st.integers(min_value=0, max_value=1000)
node_ids = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-"), min_size=1, max_size=8)
blobs = st.binary(max_size=64)


@st.composite
def memberships(draw: st.DrawFn) -> Membership:
    ids = draw(st.lists(node_ids, unique=True, max_size=7))
    cut = draw(st.integers(min_value=0, max_value=len(ids)))
    return Membership(frozenset(ids[:cut]), frozenset(ids[cut:]))


@st.composite
def append_entries(draw: st.DrawFn) -> AppendEntries:
    term = draw(small)
    prev_index = draw(small)
    prev_term = draw(st.integers(min_value=0, max_value=term))
    n = draw(st.integers(min_value=0, max_value=8))
    terms = sorted(
        draw(st.lists(st.integers(min_value=prev_term, max_value=term), min_size=n, max_size=n))
    )
    entries = tuple(
        Entry(prev_index + 1 + i, t, draw(st.sampled_from(EntryKind)), draw(blobs))
        for i, t in enumerate(terms)
    )
    return AppendEntries(
        term=term,
        src=draw(node_ids),
        dst=draw(node_ids),
        prev_index=prev_index,
        prev_term=prev_term,
        entries=entries,
        commit=draw(small),
    )


def _common(draw: st.DrawFn) -> dict[str, object]:
    return {"term": draw(uints), "src": draw(node_ids), "dst": draw(node_ids)}


@st.composite
def messages(draw: st.DrawFn) -> AnyMessage:
    kind = draw(st.sampled_from(MESSAGE_TYPES))
    if kind is AppendEntries:
        return draw(append_entries())
    c = _common(draw)
    b = st.booleans()
    if kind is VoteRequest:
        return VoteRequest(
            **c, last_index=draw(uints), last_term=draw(uints), pre_vote=draw(b), transfer=draw(b)
        )
    if kind is VoteResponse:
        return VoteResponse(**c, granted=draw(b), pre_vote=draw(b))
    if kind is AppendResponse:
        return AppendResponse(
            **c, success=draw(b), index=draw(uints), hint_index=draw(uints), hint_term=draw(uints)
        )
    if kind is Heartbeat:
        return Heartbeat(**c, commit=draw(uints), read_round=draw(uints))
    if kind is HeartbeatResponse:
        return HeartbeatResponse(**c, read_round=draw(uints))
    if kind is InstallSnapshot:
        meta = SnapshotMeta(draw(uints), draw(uints), draw(memberships()))
        return InstallSnapshot(**c, meta=meta, offset=draw(uints), data=draw(blobs), done=draw(b))
    if kind is SnapshotResponse:
        return SnapshotResponse(**c, index=draw(uints), next_offset=draw(uints), done=draw(b))
    if kind is TimeoutNow:
        return TimeoutNow(**c)
    if kind is ReadIndexRequest:
        return ReadIndexRequest(**c, ctx=draw(blobs))
    assert kind is ReadIndexResponse
    return ReadIndexResponse(**c, ctx=draw(blobs), index=draw(uints), ok=draw(b))


@st.composite
def snapshot_chunks(draw: st.DrawFn) -> SnapshotChunk:
    data = draw(blobs)
    offset = draw(st.integers(min_value=0, max_value=codec.MAX_UINT - len(data)))
    done = draw(st.booleans())
    end = offset + len(data)
    return SnapshotChunk(
        **_common(draw),
        transfer=draw(uints),
        offset=offset,
        data=data,
        done=done,
        size=end if done else draw(st.integers(min_value=end, max_value=codec.MAX_UINT)),
        checksum=draw(st.binary(min_size=32, max_size=32)) if done else b"",
    )


@st.composite
def snapshot_acks(draw: st.DrawFn) -> SnapshotAck:
    return SnapshotAck(
        **_common(draw),
        transfer=draw(uints),
        next_offset=draw(uints),
        ok=draw(st.booleans()),
    )


peer_messages: st.SearchStrategy[PeerMessage] = st.one_of(
    messages(), snapshot_chunks(), snapshot_acks()
)
batches = st.lists(peer_messages, max_size=6)


def _ok_or_codec_error(data: bytes) -> None:
    try:
        msgs = decode(data, max_bytes=MAX)
    except CodecError:
        return
    # Anything accepted is in canonical form: it is exactly what encode() makes of it.
    assert encode(msgs) == data


# ---------------------------------------------------------------- round trips


def test_layout_covers_every_message_type_and_field() -> None:
    assert {cls for _, cls, _ in codec._LAYOUT} == {*MESSAGE_TYPES, *FILE_MESSAGE_TYPES}
    for _, cls, fields in codec._LAYOUT:
        names = [f.name for f in dataclasses.fields(cls)]
        assert names == ["term", "src", "dst", *[name for name, _ in fields]], cls


@given(peer_messages)
def test_every_message_round_trips(m: PeerMessage) -> None:
    assert decode(encode([m]), max_bytes=MAX) == [m]


@given(batches)
def test_batches_round_trip_canonically(msgs: list[PeerMessage]) -> None:
    data = encode(msgs)
    assert decode(data, max_bytes=MAX) == msgs
    assert cbor2.dumps(cbor2.loads(data), canonical=True) == data


def test_wire_shape_is_compact_arrays() -> None:
    m = AppendEntries(
        term=3,
        src="n1",
        dst="n2",
        prev_index=4,
        prev_term=2,
        entries=(Entry(5, 3, EntryKind.NORMAL, b"x"),),
        commit=4,
    )
    snap = InstallSnapshot(
        term=3,
        src="n1",
        dst="n2",
        meta=SnapshotMeta(9, 3, Membership.of(["n2", "n1"], ("n3",))),
        offset=0,
        data=b"",
        done=True,
    )
    assert cbor2.loads(encode([m, snap])) == [
        PROTOCOL_VERSION,
        [
            [3, 3, "n1", "n2", 4, 2, [[5, 3, 0, b"x"]], 4],
            [7, 3, "n1", "n2", [9, 3, ["n1", "n2"], ["n3"]], 0, b"", True],
        ],
    ]


# ---------------------------------------------------------------- refusals

HB = [5, 1, "n1", "n2", 0, 0]  # a valid Heartbeat, as wire items


def _raw(*msgs: object, version: object = PROTOCOL_VERSION) -> bytes:
    return cbor2.dumps([version, list(msgs)], canonical=True)


def test_valid_raw_heartbeat_decodes() -> None:
    assert decode(_raw(HB), max_bytes=MAX) == [
        Heartbeat(term=1, src="n1", dst="n2", commit=0, read_round=0)
    ]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (b"\xff", "break code"),
        (b"\x82\x01", "truncated"),
        (_raw(HB) + b"\x00", "trailing bytes"),
        (b"\x9f" + _raw(HB)[1:] + b"\xff", "indefinite outer array"),
        (
            bytes.fromhex("82 18 01 81 86 05 01 62 6e 31 62 6e 32 00 00".replace(" ", "")),
            "non-minimal int",
        ),
        (
            bytes.fromhex("82 01 81 86 05 01 78 02 6e 31 62 6e 32 00 00".replace(" ", "")),
            "non-minimal length",
        ),
        (
            bytes.fromhex("82 01 81 86 05 01 7f 62 6e 31 ff 62 6e 32 00 00".replace(" ", "")),
            "indefinite text",
        ),
        (cbor2.dumps(cbor2.CBORTag(55799, [1, [HB]])), "self-describe tag"),
        (_raw([5, cbor2.CBORTag(2, b"\x01"), "n1", "n2", 0, 0]), "bignum tag"),
        (_raw([5, 1, "n1", "n2", cbor2.CBORTag(4, [2**40, 3]), 0]), "decimal fraction tag"),
        (_raw([10, 1, "n1", "n2", cbor2.CBORTag(35, "(a+)+$")]), "regex tag"),
        (_raw([5, 1, "n1", "n2", cbor2.CBORTag(9999, 0), 0]), "unknown tag"),
        (bytes.fromhex("82 01 d8 1c 81 d8 1d 00".replace(" ", "")), "shared reference cycle"),
        (cbor2.dumps({"v": 1}), "map"),
        (_raw(HB, version=2), "wrong version"),
        (_raw(HB, version=True), "bool version"),
        (cbor2.dumps([PROTOCOL_VERSION, [HB], 0]), "extra top-level item"),
        (cbor2.dumps([PROTOCOL_VERSION, {"m": HB}]), "messages not an array"),
        (_raw([99, 1, "n1", "n2"]), "unknown type code"),
        (_raw([True, 1, "n1", "n2"]), "bool type code"),
        (_raw([5, 1, "n1", "n2", 0]), "too few fields"),
        (_raw([5, 1, "n1", "n2", 0, 0, 0]), "too many fields"),
        (_raw([5, True, "n1", "n2", 0, 0]), "bool as int"),
        (_raw([5, -1, "n1", "n2", 0, 0]), "negative term"),
        (_raw([5, 2**63, "n1", "n2", 0, 0]), "int too large"),
        (_raw([5, 1, b"n1", "n2", 0, 0]), "bytes as node id"),
        (_raw([5, 1, "x" * 300, "n2", 0, 0]), "node id too long"),
        (_raw([5, 1, "", "n2", 0, 0]), "empty node id (validate)"),
        (_raw([5, 1.0, "n1", "n2", 0, 0]), "float"),
        (_raw([5, None, "n1", "n2", 0, 0]), "null"),
        (_raw([2, 1, "n1", "n2", 1, False]), "int as bool"),
        (_raw([10, 1, "n1", "n2", "ctx"]), "text as bytes"),
        (_raw([3, 2, "n1", "n2", 0, 0, [[1, 1, 0]], 0]), "short entry"),
        (_raw([3, 2, "n1", "n2", 0, 0, [[1, 1, 7, b""]], 0]), "unknown entry kind"),
        (_raw([3, 2, "n1", "n2", 0, 0, [[2, 1, 0, b""]], 0]), "entries not contiguous (validate)"),
        (_raw([3, 2, "n1", "n2", 0, 0, [[1, 3, 0, b""]], 0]), "entry term above message term"),
        (_raw([3, 2, "n1", "n2", 0, 0, [[[1], 1, 0, b""]], 0]), "nesting deeper than the schema"),
        (_raw([7, 1, "n1", "n2", [0, 0, ["b", "a"], []], 0, b"", True]), "unsorted voters"),
        (_raw([7, 1, "n1", "n2", [0, 0, ["a", "a"], []], 0, b"", True]), "duplicate voters"),
        (_raw([7, 1, "n1", "n2", [0, 0, ["a"], ["a"]], 0, b"", True]), "voter and learner"),
        (_raw([7, 1, "n1", "n2", [0, 0, ["a"]], 0, b"", True]), "short snapshot meta"),
    ],
)
def test_refuses(data: bytes, why: str) -> None:
    with pytest.raises(CodecError):
        decode(data, max_bytes=MAX)


def test_the_badly_spelled_samples_are_otherwise_valid() -> None:
    # So the refusals of these spellings above are due to the spelling alone.
    for data in (
        b"\x9f" + _raw(HB)[1:] + b"\xff",
        bytes.fromhex("82 18 01 81 86 05 01 62 6e 31 62 6e 32 00 00".replace(" ", "")),
        bytes.fromhex("82 01 81 86 05 01 78 02 6e 31 62 6e 32 00 00".replace(" ", "")),
        bytes.fromhex("82 01 81 86 05 01 7f 62 6e 31 ff 62 6e 32 00 00".replace(" ", "")),
    ):
        assert cbor2.loads(data) == [1, [HB]]
    assert cbor2.loads(_raw(HB) + b"\x00") == [1, [HB]]


def test_canonical_check_alone_refuses_indefinite_and_non_minimal() -> None:
    # decode() also asks cbor2 to refuse indefinite lengths; the re-encoding comparison
    # would catch them on its own, as it catches non-minimal heads cbor2 accepts.
    for data in (
        b"\x9f" + _raw(HB)[1:] + b"\xff",
        bytes.fromhex("82 18 01 81 86 05 01 62 6e 31 62 6e 32 00 00".replace(" ", "")),
    ):
        assert cbor2.dumps(cbor2.loads(data), canonical=True) != data


def test_refuses_oversized_input_before_parsing() -> None:
    data = encode([ReadIndexRequest(term=1, src="a", dst="b", ctx=b"x" * 100)])
    assert decode(data, max_bytes=len(data))
    with pytest.raises(CodecError, match="exceeds"):
        decode(data, max_bytes=len(data) - 1)


def test_refuses_deep_nesting_without_recursion() -> None:
    with pytest.raises(CodecError):
        decode(b"\x81" * 100_000 + b"\x00", max_bytes=MAX)


def test_refuses_huge_claimed_lengths() -> None:
    for head in (b"\x9b", b"\x5b", b"\x7b"):  # array, bytes, text of 2**62 items
        with pytest.raises(CodecError):
            decode(head + (2**62).to_bytes(8, "big"), max_bytes=MAX)


# ---------------------------------------------------------------- fuzzing


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_codec_error(data: bytes) -> None:
    _ok_or_codec_error(data)


@st.composite
def mutated_encodings(draw: st.DrawFn) -> bytes:
    data = bytearray(encode(draw(st.lists(peer_messages, min_size=1, max_size=4))))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(min_value=0, max_value=255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=9))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(min_value=1, max_value=4))]
        else:
            del data[pos:]
    return bytes(data)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_encodings())
def test_mutated_encodings_raise_only_codec_error(data: bytes) -> None:
    _ok_or_codec_error(data)


# ---------------------------------------------------------------- snapshot-file messages

FILE = bytes(range(256)) * 10
FILE_SUM = file_hasher()
FILE_SUM.update(FILE)
# A valid last chunk and ack, as wire items: [type, term, src, dst, *fields].
CHUNK = [100, 3, "n1", "n2", 7, 2000, FILE[2000:], True, len(FILE), FILE_SUM.digest()]
ACK = [101, 3, "n2", "n1", 7, len(FILE), True]


def _chunk(**changes: object) -> list[object]:
    names = ["transfer", "offset", "data", "done", "size", "checksum"]
    return [*CHUNK[:4], *(changes.get(n, v) for n, v in zip(names, CHUNK[4:], strict=True))]


def _ack(**changes: object) -> list[object]:
    names = ["transfer", "next_offset", "ok"]
    return [*ACK[:4], *(changes.get(n, v) for n, v in zip(names, ACK[4:], strict=True))]


def test_file_messages_have_their_own_type_codes_and_compact_arrays() -> None:
    chunk = SnapshotChunk(3, "n1", "n2", 7, 0, b"ab", False, 5, b"")
    ack = SnapshotAck(3, "n2", "n1", 7, 2, True)
    assert cbor2.loads(encode([chunk, ack])) == [
        PROTOCOL_VERSION,
        [[100, 3, "n1", "n2", 7, 0, b"ab", False, 5, b""], [101, 3, "n2", "n1", 7, 2, True]],
    ]
    assert CHECKSUM_BYTES == len(FILE_SUM.digest()) == 32
    assert file_hasher().name == "blake2b"


def test_file_messages_round_trip_in_a_batch_with_core_messages() -> None:
    hb = Heartbeat(term=3, src="n1", dst="n2", commit=4, read_round=1)
    ae = AppendEntries(
        term=3, src="n1", dst="n2", prev_index=4, prev_term=3, entries=(Entry(5, 3),), commit=4
    )
    first = SnapshotChunk(3, "n1", "n2", 7, 0, FILE[:2000], False, len(FILE), b"")
    last = SnapshotChunk(3, "n1", "n2", 7, 2000, FILE[2000:], True, len(FILE), FILE_SUM.digest())
    ack = SnapshotAck(3, "n2", "n1", 7, 2000, True)
    batch: list[PeerMessage] = [hb, first, ae, last, ack]
    data = encode(batch)
    assert decode(data, max_bytes=MAX) == batch
    assert encode(decode(data, max_bytes=MAX)) == data
    assert decode(_raw(CHUNK, ACK), max_bytes=MAX) == [
        last,
        SnapshotAck(3, "n2", "n1", 7, 2560, True),
    ]


@pytest.mark.parametrize(
    "raw",
    [
        CHUNK,
        ACK,
        _chunk(offset=0, data=b"", done=False, size=0, checksum=b""),  # first of an empty file
        _chunk(offset=0, data=b"", done=True, size=0),  # an empty file in one chunk
        _chunk(offset=len(FILE), data=b""),  # a bare "done" marker at the end
        _chunk(transfer=codec.MAX_UINT, offset=0, done=False, size=codec.MAX_UINT, checksum=b""),
        _ack(ok=False, next_offset=0),
        _ack(transfer=codec.MAX_UINT, next_offset=codec.MAX_UINT),
    ],
)
def test_valid_raw_file_messages_decode_canonically(raw: list[object]) -> None:
    data = _raw(raw)
    [m] = decode(data, max_bytes=MAX)
    assert isinstance(m, FILE_MESSAGE_TYPES)
    assert encode([m]) == data


def test_a_full_1_mib_chunk_decodes_and_one_byte_more_is_refused() -> None:
    for n, ok in ((MAX_CHUNK_BYTES, True), (MAX_CHUNK_BYTES + 1, False)):
        raw = _chunk(offset=0, data=b"x" * n, done=False, size=2 * MAX_CHUNK_BYTES, checksum=b"")
        data = _raw(raw)
        if ok:
            assert MAX_CHUNK_BYTES == 1 << 20
            assert encode(decode(data, max_bytes=4 * MAX)) == data
        else:
            with pytest.raises(CodecError, match="exceeds"):
                decode(data, max_bytes=4 * MAX)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        # relations between fields (validate_file_message)
        (_chunk(size=len(FILE) - 1), "beyond the file size"),
        (_chunk(done=False, size=len(FILE) - 1, checksum=b""), "beyond the file size"),
        (_chunk(offset=codec.MAX_UINT, data=b"ab", done=False, checksum=b""), "beyond"),
        (_chunk(size=len(FILE) + 1), "does not end at the file size"),
        (_chunk(checksum=b""), "32-byte checksum"),
        (_chunk(checksum=b"\x00" * 31), "32-byte checksum"),
        (_chunk(checksum=b"\x00" * 33), "32-byte checksum"),
        (_chunk(done=False, size=len(FILE) + 1), "only the last chunk"),
        (_chunk(done=False, size=len(FILE) + 1, checksum=b"\x00"), "only the last chunk"),
        ([100, 3, "", "n2", *CHUNK[4:]], "empty node id"),
        ([101, 3, "n2", "", *ACK[4:]], "empty node id"),
        # integers: negative, too large (2**64 needs a bignum tag), booleans, floats
        (_chunk(transfer=-1), "unsigned"),
        (_chunk(offset=-1), "unsigned"),
        (_chunk(size=-1), "unsigned"),
        ([100, -1, *CHUNK[2:]], "unsigned"),
        (_chunk(transfer=2**63), "unsigned"),
        (_chunk(size=2**63), "unsigned"),
        (_chunk(size=2**64), "tag"),
        (_chunk(offset=True), "unsigned"),
        (_chunk(size=float(len(FILE))), "unsigned"),
        (_ack(next_offset=-1), "unsigned"),
        (_ack(next_offset=2**63), "unsigned"),
        (_ack(transfer=-1), "unsigned"),
        (_ack(transfer=False), "unsigned"),
        ([101, 2**63, *ACK[2:]], "unsigned"),
        # other wrong types
        (_chunk(data=FILE[2000:].decode("latin-1")), "byte string"),
        (_chunk(data=None), "byte string"),
        (_chunk(done=1), "boolean"),
        (_chunk(checksum=FILE_SUM.hexdigest()), "byte string"),
        (_chunk(checksum=list(FILE_SUM.digest())), "byte string"),
        ([100, 3, b"n1", "n2", *CHUNK[4:]], "node id"),
        (_ack(ok=1), "boolean"),
        (_ack(ok=None), "boolean"),
        (_ack(next_offset="0"), "unsigned"),
        # shape
        (CHUNK[:-1], "takes 10 items"),
        ([*CHUNK, b""], "takes 10 items"),
        (ACK[:-1], "takes 7 items"),
        ([*ACK, 0], "takes 7 items"),
        ([102, *ACK[1:]], "unknown message type"),
    ],
)
def test_refuses_malformed_file_messages(raw: list[object], match: str) -> None:
    data = _raw(HB, raw)  # in a batch with a valid core message: the whole batch is refused
    with pytest.raises(CodecError, match=match):
        decode(data, max_bytes=MAX)
