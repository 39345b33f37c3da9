"""A WebSocket over a Trio stream: the HTTP upgrade (with h11) and then frames
(``frames``), with no task of its own.

Why not trio-websocket, which liferaft used first: it runs a reader task per
connection that hands each message to the caller through a memory channel, takes a
lock per send and parses through wsproto's generic frame machinery. Measured on this
project's machine (docs/performance.md), that cost 110-140 µs of CPU per message each
way, against 60 here, and every node and client message paid it. Here the caller's own
task reads: one ``receive_some`` yields every whole message it brought
(``get_messages``), and a send is one ``send_all`` of one or more frames. A ping is
answered by whoever is reading; a close handshake is completed by ``aclose`` (reading
itself when no task is reading, else waiting for the reader to see the peer's Close).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from collections.abc import Iterable, Sequence

import h11
import trio

from liferaft.websocket.frames import (
    ABNORMAL,
    BINARY,
    NO_STATUS,
    NORMAL,
    PONG,
    Close,
    FrameReader,
    Ping,
    Pong,
    ProtocolError,
    encode,
    encode_close,
)

Headers = list[tuple[bytes, bytes]]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
MAX_REJECT_BODY = 64 * 1024  # what a client reads of a refused upgrade's body


class WebSocketError(Exception):
    """Base of this module's errors."""


class ConnectionClosed(WebSocketError):
    """The connection is closed: by a Close frame (``code``, ``reason``), or abnormally
    (``code`` 1006: it ended without one, or a send failed)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"code {code}" + (f" {reason}" if reason else ""))
        self.code = code
        self.reason = reason


class ConnectionRejected(WebSocketError):
    """The server answered the upgrade with an HTTP status other than 101."""

    def __init__(self, status_code: int, headers: Headers, body: bytes) -> None:
        super().__init__(f"HTTP {status_code} at the WebSocket upgrade")
        self.status_code = status_code
        self.headers = headers
        self.body = body


class HandshakeFailed(WebSocketError):
    """The HTTP upgrade was malformed or not a WebSocket upgrade."""


def accept_token(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


class WebSocket:
    """One open WebSocket. At most one task reads and any tasks send (sends are
    serialised); the caller owns the stream and closes it in the end (``aclose`` does
    too)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        client: bool,
        max_message_size: int,
        receive_buffer: int,
        trailing: bytes = b"",
    ) -> None:
        self._stream = stream
        self._masked = client  # a client masks what it sends
        self._reader = FrameReader(from_client=not client, max_message=max_message_size)
        self._receive_buffer = receive_buffer
        self._send_lock = trio.StrictFIFOLock()
        self._tail = b""  # what ``send_now`` could not write: the next write sends it first
        self._reading = False
        self._close_sent = False
        self._peer_closed = trio.Event()
        self.closed: ConnectionClosed | None = None  # why, once closed
        if trailing:
            self._reader.feed(trailing)

    # ---------------------------------------------------------------- receiving

    async def get_messages(self) -> list[bytes | str]:
        """The next messages (at least one), in order: ``bytes`` for binary, ``str`` for
        text. Raises ConnectionClosed once the peer closed, the stream ended, or the
        peer broke the protocol (then we sent the Close with the code first)."""
        if self._reading:
            raise trio.BusyResourceError("another task is reading this WebSocket")
        self._reading = True
        try:
            while True:
                if self.closed is not None:
                    raise self._closed_error()
                messages = await self._take_events()
                if messages:
                    return messages  # a Close after them raises on the next call
                if self.closed is None:
                    await self._read_more()
        finally:
            self._reading = False

    async def _take_events(self) -> list[bytes | str]:
        try:
            events = self._reader.events()
        except ProtocolError as exc:
            raise await self._fail(exc.code, exc.reason) from None
        messages: list[bytes | str] = []
        for ev in events:
            if type(ev) is bytes or type(ev) is str:
                messages.append(ev)
            elif isinstance(ev, Ping):
                await self._write_quietly(encode(PONG, ev.payload, masked=self._masked))
            elif isinstance(ev, Close):
                await self._peer_close(ev)
                break  # nothing after a Close counts (§5.5.1)
            else:
                assert isinstance(ev, Pong)  # unsolicited pongs are allowed and ignored
        return messages

    async def _read_more(self) -> None:
        try:
            data = await self._stream.receive_some(self._receive_buffer)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._closed(ABNORMAL, f"stream broken: {exc}")
            raise self._closed_error() from exc
        if not data:
            self._closed(ABNORMAL, "connection ended without a close frame")
            raise self._closed_error()
        self._reader.feed(data)

    async def _peer_close(self, ev: Close) -> None:
        if not self._close_sent:  # echo it (§5.5.1), then the connection is done
            self._close_sent = True
            code = NORMAL if ev.code == NO_STATUS else ev.code
            await self._write_quietly(encode_close(code, "", masked=self._masked))
        self._closed(ev.code, ev.reason)

    async def _fail(self, code: int, reason: str) -> ConnectionClosed:
        """Close with ``code`` after a protocol error; returns the error to raise."""
        if not self._close_sent:
            self._close_sent = True
            await self._write_quietly(encode_close(code, reason, masked=self._masked))
        self._closed(code, reason)
        return self._closed_error()

    def _closed(self, code: int, reason: str) -> None:
        if self.closed is None:
            self.closed = ConnectionClosed(code, reason)
        self._peer_closed.set()

    def _closed_error(self) -> ConnectionClosed:
        assert self.closed is not None
        return ConnectionClosed(self.closed.code, self.closed.reason)

    # ---------------------------------------------------------------- sending

    async def send_message(self, data: bytes) -> None:
        """Send one binary message. Raises ConnectionClosed if the connection is closed
        or closing, or the stream broke."""
        await self._send(encode(BINARY, data, masked=self._masked))

    async def send_messages(self, messages: Sequence[bytes]) -> None:
        """Send several binary messages with one write."""
        m = self._masked
        await self._send(b"".join([encode(BINARY, d, masked=m) for d in messages]))

    def send_now(self, messages: Sequence[bytes]) -> bool:
        """Send binary messages from the caller's task, without waiting, if
        ``can_send_now``: True. What the socket did not
        take now goes first with the next send: the caller must see that one happens
        (``flush``; ``pending`` says whether it is needed). False: nothing was sent (use
        ``send_messages``). Raises ConnectionClosed like ``send_messages``."""
        if not self.can_send_now:
            return False
        send_now = self._stream.send_now  # type: ignore[attr-defined]  # can_send_now checked
        m = self._masked
        frame = b"".join([encode(BINARY, d, masked=m) for d in messages])
        try:
            sent = send_now(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._closed(ABNORMAL, f"stream broken: {exc}")
            raise self._closed_error() from exc
        if sent is None:
            return False
        self._tail = frame[sent:]
        return True

    @property
    def can_send_now(self) -> bool:
        """Whether ``send_now`` would send: the stream can (a ``TLSStream``), the
        connection is open and no write is under way or owed."""
        return hasattr(self._stream, "send_now") and not (
            self.closed is not None or self._close_sent or self._tail or self._send_lock.locked()
        )

    @property
    def pending(self) -> bool:
        """Bytes that ``send_now`` left for the next send."""
        return bool(self._tail)

    async def flush(self) -> None:
        """Send what ``send_now`` left, if anything."""
        if self._tail:
            await self._write(b"")

    async def _send(self, frame: bytes) -> None:
        if self.closed is not None:
            raise self._closed_error()
        if self._close_sent:
            raise ConnectionClosed(ABNORMAL, "closing")
        await self._write(frame)

    async def _write(self, data: bytes) -> None:
        lock = self._send_lock
        try:
            lock.acquire_nowait()  # the common case costs no trip through the scheduler
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if self._tail:  # the rest of a ``send_now``: it goes first, whole
                data, self._tail = self._tail + data, b""
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._closed(ABNORMAL, f"stream broken: {exc}")
            raise self._closed_error() from exc
        finally:
            lock.release()

    async def _write_quietly(self, data: bytes) -> None:
        """A pong or close: if the stream broke meanwhile, the reader finds out next."""
        with contextlib.suppress(ConnectionClosed):  # _write recorded it in self.closed
            await self._write(data)

    # ---------------------------------------------------------------- closing

    async def aclose(self, code: int = NORMAL, reason: str = "") -> None:
        """Send a Close (once), wait for the peer's (bound it with a timeout), then close
        the stream. Messages that arrive meanwhile are dropped."""
        try:
            if not self._close_sent and self.closed is None:
                self._close_sent = True
                await self._write_quietly(encode_close(code, reason, masked=self._masked))
            if self.closed is None:
                if self._reading:
                    await self._peer_closed.wait()  # the reading task sees the Close
                else:
                    await self._drain()
        finally:
            self._closed(code, reason)
            await trio.aclose_forcefully(self._stream)

    async def _drain(self) -> None:
        self._reading = True
        try:
            while self.closed is None:
                await self._take_events()
                if self.closed is None:
                    await self._read_more()
        except ConnectionClosed:
            pass  # what we waited for
        finally:
            self._reading = False


# -------------------------------------------------------------------- the upgrade


async def connect(
    stream: trio.abc.Stream,
    host: str,
    path: str,
    *,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
    max_message_size: int,
    receive_buffer: int = 64 * 1024,
) -> WebSocket:
    """The client's side of the upgrade. Raises ConnectionRejected on a non-101 answer,
    HandshakeFailed on a malformed one, ConnectionClosed if the stream ends."""
    key = base64.b64encode(os.urandom(16))
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target=path,
        headers=[
            (b"host", host.encode()),
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-key", key),
            (b"sec-websocket-version", b"13"),
            *extra_headers,
        ],
    )
    await stream.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
    while True:
        ev = await _next_event(conn, stream, receive_buffer)
        if isinstance(ev, h11.InformationalResponse):
            if ev.status_code != 101:
                continue  # e.g. 100 Continue: not the answer yet
            headers = {name.lower(): value for name, value in ev.headers}
            if (
                headers.get(b"upgrade", b"").lower() != b"websocket"
                or b"upgrade" not in headers.get(b"connection", b"").lower()
                or headers.get(b"sec-websocket-accept") != accept_token(key)
            ):
                raise HandshakeFailed("the server's 101 answer is not a WebSocket upgrade")
            if b"sec-websocket-extensions" in headers:
                raise HandshakeFailed("the server chose an extension we did not offer")
            return WebSocket(
                stream,
                client=True,
                max_message_size=max_message_size,
                receive_buffer=receive_buffer,
                trailing=conn.trailing_data[0],
            )
        if isinstance(ev, h11.Response):
            body = await _read_body(conn, stream, receive_buffer)
            raise ConnectionRejected(ev.status_code, list(ev.headers), body)
        raise HandshakeFailed(f"unexpected answer to the upgrade: {type(ev).__name__}")


async def _read_body(conn: h11.Connection, stream: trio.abc.Stream, receive_buffer: int) -> bytes:
    body = b""
    while len(body) <= MAX_REJECT_BODY:
        ev = await _next_event(conn, stream, receive_buffer)
        if isinstance(ev, h11.Data):
            body += bytes(ev.data)
        else:
            break  # EndOfMessage, or the connection closed
    return body[:MAX_REJECT_BODY]


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream, receive_buffer: int) -> object:
    while True:
        try:
            ev = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HandshakeFailed(f"malformed HTTP: {exc}") from None
        if ev is not h11.NEED_DATA:
            return ev
        data = await stream.receive_some(receive_buffer)
        if not data and conn.their_state is not h11.SEND_BODY:
            raise ConnectionClosed(ABNORMAL, "connection ended during the upgrade")
        conn.receive_data(bytes(data))


class UpgradeRequest:
    """A client's upgrade request, read by ``read_request``: accept or reject it."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        request: h11.Request,
        key: bytes,
        *,
        max_message_size: int,
        receive_buffer: int,
    ) -> None:
        self._stream = stream
        self._conn = conn
        self._key = key
        self._max_message_size = max_message_size
        self._receive_buffer = receive_buffer
        self.path = request.target.decode("ascii", "replace")
        self.headers: Headers = [(n.lower(), v) for n, v in request.headers]

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    async def accept(self) -> WebSocket:
        answer = h11.InformationalResponse(
            status_code=101,
            headers=[
                (b"upgrade", b"websocket"),
                (b"connection", b"Upgrade"),
                (b"sec-websocket-accept", accept_token(self._key)),
            ],
        )
        await self._stream.send_all(self._conn.send(answer) or b"")
        return WebSocket(
            self._stream,
            client=False,
            max_message_size=self._max_message_size,
            receive_buffer=self._receive_buffer,
            trailing=self._conn.trailing_data[0],
        )

    async def reject(
        self, status: int, *, extra_headers: Iterable[tuple[bytes, bytes]] = (), body: bytes = b""
    ) -> None:
        await _respond(self._stream, self._conn, status, list(extra_headers), body)


async def _respond(
    stream: trio.abc.Stream, conn: h11.Connection, status: int, headers: Headers, body: bytes
) -> None:
    head = h11.Response(
        status_code=status,
        headers=[
            *headers,
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    )
    data = (conn.send(head) or b"") + (conn.send(h11.Data(data=body)) or b"")
    await stream.send_all(data + (conn.send(h11.EndOfMessage()) or b""))


async def read_request(
    stream: trio.abc.Stream, *, max_message_size: int, receive_buffer: int = 64 * 1024
) -> UpgradeRequest:
    """The server's side: read the client's upgrade request. A request that is not a
    WebSocket upgrade is answered with 400 (426 for a wrong version) and raises
    HandshakeFailed."""
    conn = h11.Connection(h11.SERVER)
    ev = await _next_event(conn, stream, receive_buffer)
    if not isinstance(ev, h11.Request):
        raise HandshakeFailed(f"expected an HTTP request, got {type(ev).__name__}")
    headers = {name.lower(): value for name, value in ev.headers}
    problem = None
    status = 400
    if ev.method != b"GET":
        problem = "the upgrade must be a GET"
    elif headers.get(b"upgrade", b"").lower() != b"websocket":
        problem = "missing 'Upgrade: websocket'"
    elif b"upgrade" not in headers.get(b"connection", b"").lower():
        problem = "missing 'Connection: Upgrade'"
    elif headers.get(b"sec-websocket-version") != b"13":
        problem, status = "WebSocket version 13 only", 426
    elif not _valid_key(headers.get(b"sec-websocket-key", b"")):
        problem = "missing or malformed Sec-WebSocket-Key"
    if problem is not None:
        extra = [(b"sec-websocket-version", b"13")] if status == 426 else []
        await _respond(stream, conn, status, extra, f"{problem}\n".encode())
        raise HandshakeFailed(problem)
    return UpgradeRequest(
        stream,
        conn,
        ev,
        headers[b"sec-websocket-key"],
        max_message_size=max_message_size,
        receive_buffer=receive_buffer,
    )


def _valid_key(key: bytes) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False
