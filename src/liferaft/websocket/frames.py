"""WebSocket frames (RFC 6455 §5) without I/O: bytes in, messages out; messages in,
bytes out.

liferaft's messages are short and many, so this path is kept lean: one pass over the
buffer per read yields every whole message in it, a binary message is a plain ``bytes``
and a text message a plain ``str``; only control frames become objects. No extensions
are negotiated, so any reserved bit is a protocol error. docs/protocol.md lists the
close codes a peer sees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Opcodes (§5.2).
CONTINUATION = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA

# Close codes (§7.4.1).
NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
NO_STATUS = 1005  # never sent: a Close frame without a code reads as this
ABNORMAL = 1006  # never sent: the connection ended without a Close frame
INVALID_PAYLOAD = 1007
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011

MAX_CONTROL_PAYLOAD = 125


class ProtocolError(Exception):
    """The peer broke RFC 6455 (or our size limit); ``code`` is the close code to send."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{reason} (close code {code})")
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    code: int  # NO_STATUS if the frame carried none
    reason: str


Event = bytes | str | Ping | Pong | Close


def mask(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``key`` repeated (§5.3); its own inverse."""
    n = len(payload)
    if n == 0:
        return payload
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        n, "little"
    )


def encode(opcode: int, payload: bytes, *, masked: bool) -> bytes:
    """One final frame. A client masks every frame it sends (§5.1), a server none."""
    n = len(payload)
    flag = 0x80 if masked else 0
    if n < 126:
        header = bytes((0x80 | opcode, flag | n))
    elif n < 0x10000:
        header = bytes((0x80 | opcode, flag | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, flag | 127)) + n.to_bytes(8, "big")
    if masked:
        key = os.urandom(4)
        return header + key + mask(payload, key)
    return header + payload


def encode_close(code: int, reason: str, *, masked: bool) -> bytes:
    """A Close frame; the reason is cut to fit a control frame."""
    if code == NO_STATUS:
        return encode(CLOSE, b"", masked=masked)
    data = reason.encode()[: MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore").encode()
    return encode(CLOSE, code.to_bytes(2, "big") + data, masked=masked)


def _valid_close_code(code: int) -> bool:
    """Codes a peer may send (§7.4): the defined ones that are not reserved for local
    use, and the ranges for libraries (3000-3999) and applications (4000-4999)."""
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or 3000 <= code <= 4999


class FrameReader:
    """Parses what a peer sends. A server reads masked frames only and a client
    unmasked ones (§5.1); a message (all its fragments) may be at most
    ``max_message`` bytes, checked from the frame headers, before the payload is
    buffered, so an oversized message costs no memory."""

    def __init__(self, *, from_client: bool, max_message: int) -> None:
        self._masked = 0x80 if from_client else 0
        self._max = max_message
        self._buf = bytearray()
        self._parts: list[bytes] | None = None  # fragments of an unfinished message
        self._part_opcode = 0
        self._part_size = 0

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data

    def buffered(self) -> int:
        return len(self._buf)

    def events(self) -> list[Event]:
        """Every whole message and control frame now in the buffer, in order. Raises
        ProtocolError on a violation; what came before it in the same call is lost with
        the connection, which the caller closes."""
        buf = self._buf
        end = len(buf)
        pos = 0
        out: list[Event] = []
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if b0 & 0x70:
                raise ProtocolError(PROTOCOL_ERROR, "reserved bits set (no extension agreed)")
            if b1 & 0x80 != self._masked:
                raise ProtocolError(
                    PROTOCOL_ERROR,
                    "unmasked frame from a client"
                    if self._masked
                    else "masked frame from a server",
                )
            opcode = b0 & 0x0F
            final = b0 & 0x80
            n = b1 & 0x7F
            p = pos + 2
            if n == 126:
                if end - p < 2:
                    break
                n = int.from_bytes(buf[p : p + 2], "big")
                p += 2
            elif n == 127:
                if end - p < 8:
                    break
                n = int.from_bytes(buf[p : p + 8], "big")
                p += 8
                if n >> 63:
                    raise ProtocolError(PROTOCOL_ERROR, "frame length out of range")
            if opcode >= 0x8:
                if opcode > PONG:
                    raise ProtocolError(PROTOCOL_ERROR, f"unknown opcode {opcode}")
                if not final or n > MAX_CONTROL_PAYLOAD:
                    raise ProtocolError(PROTOCOL_ERROR, "fragmented or oversized control frame")
            elif opcode > BINARY:
                raise ProtocolError(PROTOCOL_ERROR, f"unknown opcode {opcode}")
            elif opcode == CONTINUATION:
                if self._parts is None:
                    raise ProtocolError(PROTOCOL_ERROR, "continuation without a message")
                if self._part_size + n > self._max:
                    raise ProtocolError(MESSAGE_TOO_BIG, f"message over {self._max} bytes")
            else:
                if self._parts is not None:
                    raise ProtocolError(PROTOCOL_ERROR, "new message inside a fragmented one")
                if n > self._max:
                    raise ProtocolError(MESSAGE_TOO_BIG, f"message over {self._max} bytes")
            if self._masked:
                if end - p < 4 + n:
                    break
                payload = mask(bytes(buf[p + 4 : p + 4 + n]), bytes(buf[p : p + 4]))
                p += 4
            else:
                if end - p < n:
                    break
                payload = bytes(buf[p : p + n])
            pos = p + n
            if opcode == BINARY and final:
                out.append(payload)
            elif opcode < 0x8:
                self._data_frame(opcode, final, payload, out)
            else:
                out.append(self._control(opcode, payload))
        if pos:
            del buf[:pos]
        return out

    def _data_frame(self, opcode: int, final: int, payload: bytes, out: list[Event]) -> None:
        if opcode != CONTINUATION:
            self._parts = []
            self._part_opcode = opcode
            self._part_size = 0
        assert self._parts is not None
        self._parts.append(payload)
        self._part_size += len(payload)
        if not final:
            return
        whole = b"".join(self._parts)
        self._parts = None
        if self._part_opcode == TEXT:
            try:
                out.append(whole.decode("utf-8"))
            except UnicodeDecodeError:
                raise ProtocolError(INVALID_PAYLOAD, "text message not UTF-8") from None
        else:
            out.append(whole)

    @staticmethod
    def _control(opcode: int, payload: bytes) -> Event:
        if opcode == PING:
            return Ping(payload)
        if opcode == PONG:
            return Pong(payload)
        if not payload:
            return Close(NO_STATUS, "")
        if len(payload) == 1:
            raise ProtocolError(PROTOCOL_ERROR, "close frame of one byte")
        code = int.from_bytes(payload[:2], "big")
        if not _valid_close_code(code):
            raise ProtocolError(PROTOCOL_ERROR, f"invalid close code {code}")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(INVALID_PAYLOAD, "close reason not UTF-8") from None
        return Close(code, reason)
