"""One client connection: TLS, the WebSocket upgrade with the bearer token, and two tasks
that pipeline requests over it (batching: docs/architecture.md, "The life of a write").

Requests are queued synchronously by the tasks that make them. One sender task wakes when
the queue is non-empty, yields once more to the scheduler so that every request issued in
the same tick is queued too, then ships the whole queue as one CBOR array message (split
at ``max_batch`` requests or ``max_message_bytes``); requests queued while it is sending
go out together in the next message. One reader task decodes each message (a map or an
array of maps), hands each response to the waiter with that ``id`` and each watch event
message to its watch's channel. A task waits for one response (``submit``/``wait``) or
for a group of them at once (``submit_many``/``wait_all``: one wake-up for them all).

A third task keeps the attempt deadlines of requests submitted with ``timed=True``: it
withdraws one still unanswered ``attempt_timeout`` after it was submitted (its waiter
gets :class:`AttemptExpired`). One timer for the connection costs far less than a cancel
scope per request; as these deadlines grow in submit order, it only ever looks at the
oldest request.

When the connection breaks, every request still waiting fails with
:class:`ConnectionLost`, which says whether the request had been handed to the socket;
the client above decides what to retry.
"""

from __future__ import annotations

import itertools
import math
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import trio

from liferaft.client.core import encode, take_batch
from liferaft.client.errors import TooLarge
from liferaft.client.wire import (
    Endpoint,
    ProtocolError,
    decode_message,
    encode_request,
    pack,
)
from liferaft.websocket import (
    MESSAGE_TOO_BIG,
    ConnectionClosed,
    ConnectionRejected,
    WebSocket,
    connect,
)
from liferaft.websocket.tls import TLSStream

RECEIVE_BUFFER = 64 * 1024  # bytes read from TLS at a time
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # a range over many keys can be large
WATCH_BUFFER = 1024  # event messages a watch may hold before it is resubscribed
CLOSE_TIMEOUT = 1.0
MAX_MESSAGES_PER_WRITE = 256  # WebSocket messages the sender writes to the socket at once
MAX_WRITE_BYTES = 1024 * 1024  # ...and about this many bytes of them
_CLOSE_NAMES = {1000: "normal closure", 1001: "going away", 1006: "abnormal closure"}

OnOk = Callable[["Connection", dict[str, Any]], None]


class AttemptExpired(Exception):
    """No response came within the connection's ``attempt_timeout`` (see ``submit``)."""


class ConnectionLost(Exception):
    """The connection closed before the response came. ``sent`` is False when the request
    never reached the socket (so it cannot have been executed)."""

    def __init__(self, reason: str, *, sent: bool, too_big: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent
        self.too_big = too_big


class WatchStream:
    """The event messages of one server-side watch on one connection. ``receive`` ends
    (EndOfChannel) when the connection is lost or the buffer overflowed."""

    def __init__(self, conn: Connection, watch_id: int) -> None:
        self.conn = conn
        self.watch_id = watch_id
        self._send, self.receive_channel = trio.open_memory_channel[dict[str, Any]](WATCH_BUFFER)

    def deliver(self, msg: dict[str, Any]) -> bool:
        """Queue ``msg``; False if the consumer is too far behind or gone."""
        try:
            self._send.send_nowait(msg)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def end(self) -> None:
        self._send.close()


class Countdown:
    """What the task that submitted a group of requests waits on: it is set when the last
    of them is answered or failed (each ``_Pending`` of the group calls ``set`` once)."""

    __slots__ = ("event", "left")

    def __init__(self, left: int) -> None:
        self.left = left
        self.event = trio.Event()
        if left <= 0:
            self.event.set()

    def set(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.event.set()

    async def wait(self) -> None:
        await self.event.wait()


class _Pending:
    __slots__ = (
        "cancelled",
        "done",
        "encoded",
        "error",
        "expired",
        "id",
        "on_ok",
        "response",
        "sent",
    )

    def __init__(
        self,
        request_id: int,
        encoded: bytes,
        on_ok: OnOk | None,
        done: trio.Event | Countdown | None = None,
    ) -> None:
        self.id = request_id
        self.encoded = encoded
        self.on_ok = on_ok
        self.done = trio.Event() if done is None else done
        self.response: dict[str, Any] | None = None
        self.error: ConnectionLost | None = None
        self.sent = False
        self.cancelled = False
        self.expired = False  # unanswered at its deadline: withdrawn


# Opens the byte stream to an endpoint: TCP and TLS (``tls_dialer``), or the whole-node
# simulator's in-memory streams.
Dial = Callable[[Endpoint], Awaitable[trio.abc.Stream]]


def tls_dialer(ctx: ssl.SSLContext) -> Dial:
    async def dial(ep: Endpoint) -> trio.abc.Stream:
        tcp = await trio.open_tcp_stream(ep.host, ep.port)
        stream = TLSStream(tcp, ctx, server_side=False, server_hostname=ep.host)
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    return dial


class Connection:
    """A pipelined connection to one endpoint. Start it with ``await nursery.start(
    conn.run)``: that returns once the upgrade succeeded, or raises what failed."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        dial: Dial,
        token: str,
        ids: itertools.count[int],
        max_batch: int,
        max_message_bytes: int,
        connect_timeout: float,
        attempt_timeout: float = math.inf,
    ) -> None:
        self.endpoint = endpoint
        self._dial = dial
        self._token = token
        self._ids = ids
        self._max_batch = max_batch
        self._max_message_bytes = max_message_bytes
        self._connect_timeout = connect_timeout
        self._attempt_timeout = attempt_timeout
        # (deadline, id) of the requests submitted with a deadline, oldest first; those
        # answered meanwhile stay until the timer passes them (light: no _Pending kept)
        self._timed: deque[tuple[float, int]] = deque()
        self._timer_wake = trio.Event()
        self._pending: dict[int, _Pending] = {}
        self._outbox: list[_Pending] = []
        self._wake = trio.Event()
        self._watches: dict[int, WatchStream] = {}
        self._close_requested = trio.Event()
        self._closing = False  # a graceful close is under way: _die must not cancel it
        self._scope: trio.CancelScope | None = None
        self._stream: trio.abc.Stream | None = None
        self._ws: WebSocket | None = None
        self.alive = False  # True between a successful upgrade and the first failure
        self.retired = False  # no new requests; closes once idle
        self.lost_reason = ""
        self.messages_sent = 0
        self.finished = trio.Event()  # set when run() has returned, whatever the outcome

    # ---------------------------------------------------------------- requests

    def submit(
        self, request: Mapping[str, Any], *, on_ok: OnOk | None = None, timed: bool = False
    ) -> _Pending:
        """Queue ``request`` (an ``id`` is added) and return its waiter. Raises TooLarge if
        it cannot fit one message, ConnectionLost if the connection is already gone.
        ``on_ok`` runs in the reader, before any later message is read, on success.
        ``timed``: if no response comes within ``attempt_timeout`` from now, the request
        is withdrawn and :meth:`wait` raises AttemptExpired (a deadline kept by one timer
        task for the whole connection, cheaper than a cancel scope per request)."""
        if not self.alive:
            raise ConnectionLost(self.lost_reason or "not connected", sent=False)
        request_id = next(self._ids)
        encoded = encode(request, request_id, self._max_message_bytes)
        p = _Pending(request_id, encoded, on_ok)
        self._pending[request_id] = p
        self._outbox.append(p)
        self._wake.set()
        if timed:
            # Deadlines of timed requests grow in submit order: the timer needs only
            # look at the oldest. It sleeps on _timer_wake only when there is none.
            if not self._timed:
                self._timer_wake.set()
            self._timed.append((trio.current_time() + self._attempt_timeout, request_id))
        return p

    def submit_many(self, requests: Sequence[dict[str, Any]]) -> tuple[list[_Pending], Countdown]:
        """Queue ``requests`` together (they leave in one message, or in consecutive ones
        past ``max_batch`` or ``max_message_bytes``) and return their waiters and what
        to wait on for all of them (:meth:`wait_all`). Each request's ``id`` is set in
        place (a later submit of the same dict sets a new one). Raises TooLarge (a
        request cannot fit one message) or ConnectionLost (the connection is gone)
        before queuing any."""
        if not self.alive:
            raise ConnectionLost(self.lost_reason or "not connected", sent=False)
        group = Countdown(len(requests))
        ids = self._ids
        limit = self._max_message_bytes
        batch: list[_Pending] = []
        for request in requests:
            request_id = request["id"] = next(ids)
            encoded = encode_request(request)
            if len(encoded) > limit:
                raise TooLarge(
                    f"request of {len(encoded)} bytes exceeds max_message_bytes ({limit})"
                )
            batch.append(_Pending(request_id, encoded, None, group))
        pending = self._pending
        for p in batch:
            pending[p.id] = p
        self._outbox += batch
        self._wake.set()
        return batch, group

    def send_and_forget(self, request: Mapping[str, Any]) -> None:
        """Queue a request whose answer nobody waits for (``unwatch``)."""
        if not self.alive:
            return
        p = _Pending(next(self._ids), b"", None)
        p.encoded = encode_request({"id": p.id, **request})
        self._outbox.append(p)
        self._wake.set()

    async def wait(self, p: _Pending) -> dict[str, Any]:
        """The response to ``p``; ConnectionLost if the connection went first. If the
        caller is cancelled the request is withdrawn (if not yet sent) and forgotten."""
        try:
            await p.done.wait()
        except BaseException:
            p.cancelled = True
            self._pending.pop(p.id, None)
            self._maybe_close()
            raise
        if p.response is not None:
            return p.response
        if p.error is not None:
            raise p.error
        assert p.expired
        raise AttemptExpired(
            f"no answer from {self.endpoint.url} within {self._attempt_timeout:g}s"
        )

    async def wait_all(self, batch: list[_Pending], group: Countdown) -> None:
        """Wait until every request of ``batch`` (from :meth:`submit_many`) is answered or
        failed: then each has its ``response`` or ``error``. If the caller is cancelled,
        the ones still unanswered are withdrawn (those not yet sent are not sent) and
        keep neither."""
        try:
            await group.wait()
        except BaseException:
            pending = self._pending
            for p in batch:
                if p.response is None and p.error is None:
                    p.cancelled = True
                    pending.pop(p.id, None)
            self._maybe_close()
            raise

    def unsubscribe(self, stream: WatchStream) -> None:
        """Forget a watch (send ``unwatch`` if the connection is still up)."""
        if self._watches.get(stream.watch_id) is stream:
            del self._watches[stream.watch_id]
            self.send_and_forget({"op": "unwatch", "watch_id": stream.watch_id})
        stream.end()
        self._maybe_close()

    def subscribe(self, watch_id: int) -> WatchStream:
        """Route event messages of ``watch_id`` to a new stream (called from ``on_ok``)."""
        stream = WatchStream(self, watch_id)
        old = self._watches.pop(watch_id, None)
        if old is not None:
            old.end()
        self._watches[watch_id] = stream
        return stream

    # ---------------------------------------------------------------- lifecycle

    def retire(self) -> None:
        """Take no new requests; close once the ones in flight and the watches are done."""
        self.retired = True
        self._maybe_close()

    def close(self) -> None:
        """Close now (gracefully, bounded); whatever is waiting fails with ConnectionLost."""
        self.retired = True
        self._close_requested.set()

    @property
    def idle(self) -> bool:
        return not self._pending and not self._watches and not self._outbox

    def _maybe_close(self) -> None:
        if self.retired and self.idle:
            self._close_requested.set()

    def _die(self, reason: str, *, too_big: bool = False) -> None:
        """Mark the connection lost and fail everything waiting on it."""
        if self.alive:
            self.alive = False
            self.lost_reason = reason
        for p in self._pending.values():
            p.error = ConnectionLost(reason, sent=p.sent, too_big=too_big and p.sent)
            p.done.set()
        self._pending.clear()
        self._outbox.clear()
        self._timed.clear()
        for stream in self._watches.values():
            stream.end()
        self._watches.clear()
        if self._scope is not None and not self._closing:
            self._scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, report started, then serve until closed or broken. Before ``started``
        it raises what failed (an ExceptionGroup may wrap a ConnectionRejected); after,
        it never raises except Cancelled."""
        started = False
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                try:
                    with trio.fail_after(self._connect_timeout):
                        await self._open()
                except BaseException:
                    nursery.cancel_scope.cancel()
                    raise
                self.alive = True
                started = True
                task_status.started()
                nursery.start_soon(self._send_loop)
                nursery.start_soon(self._receive_loop)
                nursery.start_soon(self._timer_loop)
                await self._close_requested.wait()
                # Fail what still waits, then say goodbye while the receive loop still
                # runs (it reads the server's Close, which ends the handshake), bounded.
                self._closing = True
                self._die("connection closed by the client")
                with trio.move_on_after(CLOSE_TIMEOUT):
                    assert self._ws is not None
                    await self._ws.aclose()
                nursery.cancel_scope.cancel()
        except Exception as exc:
            if not started:
                raise
            self._die(f"connection failed: {describe(exc)}")
        finally:
            self._die(self.lost_reason or "connection closed")
            self.finished.set()
            if self._stream is not None:
                await trio.aclose_forcefully(self._stream)

    async def _open(self) -> None:
        ep = self.endpoint
        self._stream = await self._dial(ep)
        self._ws = await connect(
            self._stream,
            ep.host_header,
            ep.path,
            extra_headers=[(b"authorization", f"Bearer {self._token}".encode())],
            max_message_size=MAX_RESPONSE_BYTES,
            receive_buffer=RECEIVE_BUFFER,
        )

    # ---------------------------------------------------------------- the two tasks

    async def _send_loop(self) -> None:
        assert self._ws is not None
        try:
            while True:
                while not self._outbox:
                    await self._wake.wait()
                    self._wake = trio.Event()
                # One more turn of the scheduler: requests made in this tick join the batch.
                await trio.lowlevel.checkpoint()
                # Everything queued leaves in one write to the socket: as many messages
                # as the batch limit makes (one per request with max_batch=1), but one
                # TLS record and one system call for all of them where they fit.
                messages: list[bytes] = []
                size = 0
                while self._outbox and len(messages) < MAX_MESSAGES_PER_WRITE:
                    batch = self._take()
                    if not batch:
                        continue
                    for p in batch:
                        p.sent = True
                    messages.append(pack([p.encoded for p in batch]))
                    size += len(messages[-1])
                    if size >= MAX_WRITE_BYTES:
                        break
                if not messages:
                    continue
                await self._ws.send_messages(messages)
                self.messages_sent += len(messages)
                self._maybe_close()
        except (ConnectionClosed, trio.BrokenResourceError) as exc:
            self._die(f"connection to {self.endpoint.url} lost while sending: {describe(exc)}")

    def _take(self) -> list[_Pending]:
        """The next message's worth of queued requests (withdrawn ones dropped)."""
        batch = take_batch(self._outbox, self._max_batch, self._max_message_bytes)
        if self._outbox:
            self._wake.set()
        return batch

    async def _timer_loop(self) -> None:
        """Withdraw each timed request still unanswered at its deadline (see ``submit``).
        It wakes at the oldest one's deadline, or when one is submitted if none is."""
        timed = self._timed
        pending = self._pending
        while True:
            if not timed:
                await self._timer_wake.wait()
                self._timer_wake = trio.Event()
                continue
            deadline, request_id = timed[0]
            if request_id not in pending:
                timed.popleft()  # answered, failed or withdrawn meanwhile
                continue
            if deadline > trio.current_time():
                await trio.sleep_until(deadline)
                continue
            timed.popleft()
            p = pending.pop(request_id)
            p.cancelled = True  # not sent yet: never sent
            p.expired = True
            p.done.set()
            self._maybe_close()

    async def _receive_loop(self) -> None:
        assert self._ws is not None
        try:
            while True:
                for data in await self._ws.get_messages():
                    if not isinstance(data, bytes):
                        raise ProtocolError("a text message")
                    for item in decode_message(data):
                        self._dispatch(item)
                self._maybe_close()
        except ConnectionClosed as exc:
            code = exc.code
            self._die(
                f"connection to {self.endpoint.url} closed: {describe(exc)}",
                too_big=code == MESSAGE_TOO_BIG,
            )
        except ProtocolError as exc:
            self._die(f"bad message from {self.endpoint.url}: {exc}")

    def _dispatch(self, item: dict[str, Any]) -> None:
        request_id = item.get("id")
        if type(request_id) is int:
            p = self._pending.pop(request_id, None)
            if p is None:  # withdrawn, or an unwatch nobody waits for
                return
            p.response = item
            if item.get("ok") is True and p.on_ok is not None:
                p.on_ok(self, item)
            p.done.set()
            return
        watch_id = item.get("watch_id")
        if type(watch_id) is int:
            stream = self._watches.get(watch_id)
            if stream is not None and not stream.deliver(item):
                # The consumer fell behind (or left): drop the subscription; its iterator
                # resubscribes from the revision after the last event it delivered.
                self.unsubscribe(stream)


def describe(exc: BaseException) -> str:
    """A short description of a connection failure, looking into groups and causes."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions if not isinstance(e, trio.Cancelled))
    if isinstance(exc, ConnectionClosed):
        return f"code {exc.code} {exc.reason or _CLOSE_NAMES.get(exc.code, '')}".rstrip()
    if isinstance(exc, ConnectionRejected):
        return f"HTTP {exc.status_code} at the WebSocket upgrade"
    if isinstance(exc, trio.TooSlowError):
        return "timed out connecting"
    text = str(exc)
    if exc.__cause__ is not None:  # trio puts the ssl error, or each refused try, there
        cause = describe(exc.__cause__)
        text = f"{text} ({cause})" if text else cause
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of type ``kind`` in ``exc``, its groups and causes."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        if e.__cause__ is not None:
            todo.append(e.__cause__)
        if e.__context__ is not None:
            todo.append(e.__context__)
    return None
