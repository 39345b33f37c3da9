"""The sans-I/O frame codec: what a peer may send (RFC 6455 §5) is parsed the same
however the bytes are split, and every violation is refused with the right close code."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from liferaft.websocket.frames import (
    BINARY,
    CLOSE,
    CONTINUATION,
    INVALID_PAYLOAD,
    MESSAGE_TOO_BIG,
    NO_STATUS,
    PING,
    PONG,
    PROTOCOL_ERROR,
    TEXT,
    Close,
    FrameReader,
    Ping,
    Pong,
    ProtocolError,
    encode,
    encode_close,
    mask,
)

KEY = b"\x01\x02\x03\x04"


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """A frame built by hand (``encode`` always sets FIN and a random key)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    flag = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, flag | n))
    elif n < 0x10000:
        head = bytes((b0, flag | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, flag | 127)) + n.to_bytes(8, "big")
    return head + KEY + mask(payload, KEY) if masked else head + payload


def server_reader(max_message: int = 1 << 20) -> FrameReader:
    return FrameReader(from_client=True, max_message=max_message)


def read_all(reader: FrameReader, data: bytes) -> list[object]:
    reader.feed(data)
    return list(reader.events())


def refused(data: bytes, *, from_client: bool = True, max_message: int = 1 << 20) -> ProtocolError:
    reader = FrameReader(from_client=from_client, max_message=max_message)
    reader.feed(data)
    with pytest.raises(ProtocolError) as info:
        reader.events()
    return info.value


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
@pytest.mark.parametrize("masked", [True, False])
def test_a_binary_message_of_any_length_round_trips(size: int, masked: bool) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    reader = FrameReader(from_client=masked, max_message=1 << 20)
    assert read_all(reader, encode(BINARY, payload, masked=masked)) == [payload]
    assert reader.buffered() == 0


def test_a_text_message_is_a_str() -> None:
    assert read_all(server_reader(), frame(TEXT, "héllo".encode())) == ["héllo"]


def test_masking_is_its_own_inverse_and_uses_the_key() -> None:
    data = b"liferaft masks every client frame"
    assert mask(mask(data, KEY), KEY) == data
    assert mask(b"\x00\x00\x00\x00\x00", KEY) == KEY + KEY[:1]


def test_an_encoded_client_frame_is_masked_with_a_fresh_key() -> None:
    a = encode(BINARY, b"same payload", masked=True)
    b = encode(BINARY, b"same payload", masked=True)
    assert a[1] & 0x80 and b[1] & 0x80
    assert a != b  # the keys differ (2**-32 chance of a false failure)


def test_several_frames_in_one_read_come_out_in_order() -> None:
    data = frame(BINARY, b"a") + frame(PING, b"p") + frame(TEXT, b"b") + frame(PONG, b"")
    assert read_all(server_reader(), data) == [b"a", Ping(b"p"), "b", Pong(b"")]


def test_a_fragmented_message_is_joined_and_control_frames_may_interleave() -> None:
    data = (
        frame(BINARY, b"one ", fin=False)
        + frame(PING, b"x")
        + frame(CONTINUATION, b"two ", fin=False)
        + frame(CONTINUATION, b"three")
    )
    assert read_all(server_reader(), data) == [Ping(b"x"), b"one two three"]


def test_a_partial_frame_waits_for_the_rest() -> None:
    reader = server_reader()
    data = frame(BINARY, b"x" * 300)
    assert read_all(reader, data[:1]) == []
    assert read_all(reader, data[1:3]) == []
    assert read_all(reader, data[3:200]) == []
    assert read_all(reader, data[200:]) == [b"x" * 300]


@given(
    messages=st.lists(st.binary(max_size=300), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12),
)
def test_any_split_of_the_bytes_gives_the_same_messages(
    messages: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(encode(BINARY, m, masked=True) for m in messages)
    points = sorted({c % (len(data) + 1) for c in cuts})
    reader = server_reader()
    got: list[object] = []
    start = 0
    for p in [*points, len(data)]:
        got += read_all(reader, data[start:p])
        start = p
    assert got == messages


def test_close_frames_carry_code_and_reason() -> None:
    reader = FrameReader(from_client=False, max_message=1024)
    got = read_all(reader, encode_close(1001, "going away", masked=False))
    assert got == [Close(1001, "going away")]
    assert read_all(reader, encode(CLOSE, b"", masked=False)) == [Close(NO_STATUS, "")]


def test_a_long_close_reason_is_cut_to_fit_a_control_frame() -> None:
    data = encode_close(1000, "é" * 200, masked=False)
    (got,) = read_all(FrameReader(from_client=False, max_message=1024), data)
    assert isinstance(got, Close)
    assert len(got.reason.encode()) <= 123
    assert set(got.reason) == {"é"}


@pytest.mark.parametrize(
    ("data", "code", "from_client"),
    [
        (bytes((0x80 | 0x40 | BINARY, 0x80)) + KEY, PROTOCOL_ERROR, True),  # RSV1
        (frame(BINARY, b"x", masked=False), PROTOCOL_ERROR, True),  # unmasked from a client
        (frame(BINARY, b"x", masked=True), PROTOCOL_ERROR, False),  # masked from a server
        (frame(0x3, b"x"), PROTOCOL_ERROR, True),  # reserved data opcode
        (frame(0xB, b"x"), PROTOCOL_ERROR, True),  # reserved control opcode
        (frame(PING, b"x", fin=False), PROTOCOL_ERROR, True),  # fragmented control frame
        (frame(PING, b"x" * 126), PROTOCOL_ERROR, True),  # control frame over 125 bytes
        (frame(CONTINUATION, b"x"), PROTOCOL_ERROR, True),  # continuation of nothing
        (frame(BINARY, b"a", fin=False) + frame(BINARY, b"b"), PROTOCOL_ERROR, True),
        (frame(TEXT, b"\xff\xfe"), INVALID_PAYLOAD, True),  # text not UTF-8
        (frame(CLOSE, b"\x03"), PROTOCOL_ERROR, True),  # close payload of one byte
        (frame(CLOSE, (1005).to_bytes(2, "big")), PROTOCOL_ERROR, True),  # reserved code
        (frame(CLOSE, (999).to_bytes(2, "big")), PROTOCOL_ERROR, True),
        (frame(CLOSE, (1000).to_bytes(2, "big") + b"\xff"), INVALID_PAYLOAD, True),
        (bytes((0x80 | BINARY, 0x80 | 127)) + (1 << 63).to_bytes(8, "big"), PROTOCOL_ERROR, True),
    ],
    ids=[
        "reserved-bit",
        "unmasked-from-client",
        "masked-from-server",
        "data-opcode-3",
        "control-opcode-11",
        "fragmented-ping",
        "long-ping",
        "lone-continuation",
        "message-inside-fragments",
        "text-not-utf8",
        "close-one-byte",
        "close-code-1005",
        "close-code-999",
        "close-reason-not-utf8",
        "length-over-63-bits",
    ],
)
def test_a_protocol_violation_is_refused_with_its_close_code(
    data: bytes, code: int, from_client: bool
) -> None:
    assert refused(data, from_client=from_client).code == code


def test_an_oversized_message_is_refused_from_its_header_alone() -> None:
    head = frame(BINARY, b"x" * 2000)[:8]  # header and key: no payload yet
    assert refused(head, max_message=1000).code == MESSAGE_TOO_BIG


def test_an_oversized_fragmented_message_is_refused() -> None:
    data = frame(BINARY, b"x" * 600, fin=False) + frame(CONTINUATION, b"x" * 600)
    assert refused(data, max_message=1000).code == MESSAGE_TOO_BIG


def test_a_message_of_exactly_the_limit_is_accepted() -> None:
    assert read_all(server_reader(max_message=1000), frame(BINARY, b"x" * 1000)) == [b"x" * 1000]
