"""The client on asyncio: :class:`AsyncioClient`, the same API as the Trio
:class:`~liferaft.client.Client` over the ``websockets`` package (docs/client-library.md,
"asyncio")::

    import asyncio
    from liferaft.client.aio import open_client

    async def main():
        async with open_client(["wss://127.0.0.1:8001"], token=jwt,
                               cacert="certs/ca.pem") as client:
            rev = await client.put("greeting", "hello")
            print((await client.get("greeting")).text)

    asyncio.run(main())

Locks and elections are here too (:class:`Lock`, :class:`Election`, from
liferaft.client.aio_coordination), with the Trio ones' API and guarantees::

    from liferaft.client.aio import Lock

    async with Lock(client, "jobs/nightly", ttl=10) as lock:
        await storage.write(data, fencing_token=lock.token)

It is a thin transport. Every operation (put, get, range, delete, txn, lease ops, status,
members, compact) is :class:`~liferaft.client.api.ClientAPI`'s, the Trio client's own
code; which requests leave together in one message, the session window, the verdict on
each failed attempt (retry, follow ``not_leader``, move on, raise), the back-off, where a
watch resumes and when a lease is renewed are decided by the sans-I/O protocol core
(liferaft.client.core). What is here: the WebSocket (TLS with the cluster CA, the bearer
token at the upgrade), one reader and one sender task per connection, and the waiting.

Needs ``websockets`` (``pip install 'liferaft[asyncio]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import random
import ssl
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

try:
    from websockets.asyncio.client import ClientConnection
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "liferaft.client.aio needs the websockets package: "
        "pip install 'liferaft[asyncio]' (or pip install websockets)"
    ) from exc

from liferaft.client import backup
from liferaft.client.aio_coordination import Election, LeaderWatch, Lock, LockLost, NotElected
from liferaft.client.api import ClientAPI
from liferaft.client.core import (
    SESSION_WINDOW,
    AvoidLeader,
    Backoff,
    EndpointRing,
    KeepAliveSchedule,
    Move,
    Retry,
    SeqWaiter,
    SeqWindow,
    Tries,
    Verdict,
    WatchState,
    encode,
    on_connect_timeout,
    on_error,
    on_lost,
    on_silence,
    out_of_time,
    take_batch,
    window_full,
)
from liferaft.client.errors import (
    ConnectionFailed,
    InvalidRequest,
    LeaseLost,
    LiferaftError,
    NotFound,
    PermissionDenied,
    TLSError,
    Unauthenticated,
    error_from_wire,
)
from liferaft.client.models import Lease, WatchEvent, check_key, check_lease_id, to_bytes
from liferaft.client.wire import MAX_BATCH, Endpoint, ProtocolError, decode_message, pack
from liferaft.client.wire import parse_endpoint as _parse_endpoint

__all__ = [
    "AsyncioClient",
    "AsyncioKeepAlive",
    "AsyncioWatch",
    "Election",
    "LeaderWatch",
    "Lock",
    "LockLost",
    "NotElected",
    "open_client",
]

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024  # the server's default [client] max_message_bytes
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # a range over many keys can be large
WATCH_BUFFER = 1024  # event messages a watch may hold before it is resubscribed
CLOSE_TIMEOUT = 1.0
MESSAGE_TOO_BIG = 1009

OnOk = Callable[["_Connection", dict[str, Any]], None]


class _Lost(Exception):
    """The connection closed before the answer came (``sent``: the request had left)."""

    def __init__(self, reason: str, *, sent: bool, too_big: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent
        self.too_big = too_big


class _Request:
    __slots__ = ("cancelled", "encoded", "future", "id", "on_ok", "sent")

    def __init__(
        self, request_id: int, encoded: bytes, future: asyncio.Future[dict[str, Any]] | None
    ) -> None:
        self.id = request_id
        self.encoded = encoded
        self.future = future
        self.on_ok: OnOk | None = None
        self.sent = False
        self.cancelled = False


class _Connection:
    """One WebSocket to one endpoint: requests queued by the callers leave in batches
    (liferaft.client.core.take_batch) from a sender task; a reader task matches each
    response to its request by id and routes watch events to their queues."""

    def __init__(
        self,
        endpoint: Endpoint,
        ws: ClientConnection,
        ids: Iterable[int],
        max_batch: int,
        max_message_bytes: int,
    ) -> None:
        self.endpoint = endpoint
        self._ws = ws
        self._ids = iter(ids)
        self._max_batch = max_batch
        self._max_message_bytes = max_message_bytes
        self._pending: dict[int, _Request] = {}
        self._outbox: list[_Request] = []
        self._wake = asyncio.Event()
        self.watches: dict[int, asyncio.Queue[dict[str, Any] | None]] = {}
        self.alive = True
        self.retired = False
        self.lost_reason = ""
        self._closer: asyncio.Task[None] | None = None
        self._tasks = [
            asyncio.create_task(self._send_loop()),
            asyncio.create_task(self._receive_loop()),
        ]

    def submit(self, fields: Mapping[str, Any], on_ok: OnOk | None = None) -> _Request:
        if not self.alive:
            raise _Lost(self.lost_reason or "not connected", sent=False)
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        req = _Request(request_id, encode(fields, request_id, self._max_message_bytes), future)
        req.on_ok = on_ok
        self._pending[request_id] = req
        self._outbox.append(req)
        self._wake.set()
        return req

    async def wait(self, req: _Request) -> dict[str, Any]:
        assert req.future is not None
        try:
            return await req.future
        except asyncio.CancelledError:
            req.cancelled = True  # not sent yet: never sent
            self._pending.pop(req.id, None)
            self._maybe_close()
            raise

    def send_and_forget(self, fields: Mapping[str, Any]) -> None:
        if self.alive:
            request_id = next(self._ids)
            req = _Request(request_id, encode(fields, request_id, self._max_message_bytes), None)
            self._outbox.append(req)
            self._wake.set()

    def subscribe(self, watch_id: int) -> asyncio.Queue[dict[str, Any] | None]:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(WATCH_BUFFER)
        old = self.watches.pop(watch_id, None)
        if old is not None:
            _end(old)
        self.watches[watch_id] = queue
        return queue

    def unsubscribe(self, watch_id: int, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        if self.watches.get(watch_id) is queue:
            del self.watches[watch_id]
            self.send_and_forget({"op": "unwatch", "watch_id": watch_id})
        _end(queue)
        self._maybe_close()

    def retire(self) -> None:
        self.retired = True
        self._maybe_close()

    def _maybe_close(self) -> None:
        idle = not self._pending and not self.watches and not self._outbox
        if self.retired and self.alive and idle:
            self._die("connection retired")

    async def aclose(self) -> None:
        """Close now; whatever is waiting fails with _Lost."""
        self.retired = True
        self._die("connection closed by the client")
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._closer is not None:
            await asyncio.gather(self._closer, return_exceptions=True)

    async def _close_ws(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._ws.close(), CLOSE_TIMEOUT)

    def _die(self, reason: str, *, too_big: bool = False) -> None:
        """Mark the connection lost, fail everything waiting on it, stop its tasks and
        close the WebSocket (in the background, bounded)."""
        if self.alive:
            self.alive = False
            self.lost_reason = reason
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        if self._closer is None:
            self._closer = asyncio.get_running_loop().create_task(self._close_ws())
        for req in self._pending.values():
            if req.future is not None and not req.future.done():
                req.future.set_exception(_Lost(reason, sent=req.sent, too_big=too_big and req.sent))
        self._pending.clear()
        self._outbox.clear()
        for queue in self.watches.values():
            _end(queue)
        self.watches.clear()

    async def _send_loop(self) -> None:
        try:
            while True:
                while not self._outbox:
                    await self._wake.wait()
                    self._wake.clear()
                # One more turn of the loop: requests made in this one join the batch.
                await asyncio.sleep(0)
                messages = []
                while self._outbox:
                    batch = take_batch(self._outbox, self._max_batch, self._max_message_bytes)
                    if batch:
                        for req in batch:
                            req.sent = True
                        messages.append(pack([req.encoded for req in batch]))
                for message in messages:
                    await self._ws.send(message)
                self._maybe_close()
        except (ConnectionClosed, OSError) as exc:
            self._die(f"connection to {self.endpoint.url} lost while sending: {exc}")

    async def _receive_loop(self) -> None:
        try:
            async for data in self._ws:
                if not isinstance(data, bytes):
                    raise ProtocolError("a text message")
                for item in decode_message(data):
                    self._dispatch(item)
                self._maybe_close()
            self._die(f"connection to {self.endpoint.url} closed: {_close_text(self._ws)}")
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            self._die(
                f"connection to {self.endpoint.url} closed: code {code}",
                too_big=code == MESSAGE_TOO_BIG,
            )
        except (ProtocolError, OSError) as exc:
            self._die(f"bad message from {self.endpoint.url}: {exc}")

    def _dispatch(self, item: dict[str, Any]) -> None:
        request_id = item.get("id")
        if type(request_id) is int:
            req = self._pending.pop(request_id, None)
            if req is None or req.future is None or req.future.done():
                return  # withdrawn, or an unwatch nobody waits for
            if item.get("ok") is True and req.on_ok is not None:
                req.on_ok(self, item)  # before the next item: a watch's events find it
            req.future.set_result(item)
            return
        watch_id = item.get("watch_id")
        if type(watch_id) is int:
            queue = self.watches.get(watch_id)
            if queue is not None:
                try:
                    queue.put_nowait(item)
                except asyncio.QueueFull:
                    # The consumer fell behind: drop the subscription; the watch
                    # resubscribes from the revision after the last event it delivered.
                    self.unsubscribe(watch_id, queue)


def _end(queue: asyncio.Queue[dict[str, Any] | None]) -> None:
    """Tell the watch reading ``queue`` that its subscription is over."""
    with contextlib.suppress(asyncio.QueueFull):
        queue.put_nowait(None)
        return
    # Full: make room for the end marker (the watch resubscribes from its last event).
    with contextlib.suppress(asyncio.QueueEmpty):
        queue.get_nowait()
    queue.put_nowait(None)


def _close_text(ws: ClientConnection) -> str:
    rcvd = ws.close_code
    return f"code {rcvd}" if rcvd is not None else "abnormal closure"


def _connect_error(endpoint: Endpoint, exc: BaseException) -> LiferaftError:
    """The typed error for a failed connection attempt (as the Trio client's)."""
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        body = (exc.response.body or b"").decode("utf-8", "replace")[:200]
        detail = f"{endpoint.url}: HTTP {status} at the WebSocket upgrade" + (
            f": {body}" if body else ""
        )
        if status == 401:
            return Unauthenticated(f"{detail} (token refused: missing, expired or invalid)")
        if status == 403:
            return PermissionDenied(detail)
        return ConnectionFailed(detail)
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return TLSError(
                f"{endpoint.url}: server certificate not accepted: "
                f"{cause.verify_message or cause} (check --cacert and the host name)"
            )
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, TimeoutError):
        return ConnectionFailed(f"cannot connect to {endpoint.url}: timed out connecting")
    return ConnectionFailed(f"cannot connect to {endpoint.url}: {type(exc).__name__}: {exc}")


class _Pool:
    """The connections of one purpose (every request; with ``reads="followers"`` a
    second pool for gets and ranges): the current one, the endpoint to try next, and
    the retired ones still finishing their requests. As the Trio client's
    ``ConnectionPool``, whose rules it follows."""

    def __init__(
        self,
        endpoints: list[Endpoint],
        open_: Callable[[Endpoint], Awaitable[_Connection]],
        *,
        attempt_timeout: float,
        avoid_leader: bool = False,
        first: int = 0,
    ) -> None:
        self.ring = EndpointRing(endpoints, first)
        self._open = open_
        self._attempt_timeout = attempt_timeout
        # Connect to a node other than the leader where one answers (for reads).
        self._avoid = AvoidLeader(avoid_leader, len(endpoints))
        self.conn: _Connection | None = None
        self.conns: set[_Connection] = set()
        self._connecting: asyncio.Future[_Connection] | None = None
        self.closed = False

    async def connection(self) -> _Connection:
        """The current connection, or a new one to the next endpoint (one attempt at a
        time, shared by every caller that needs it)."""
        while True:
            if self.closed:
                raise RuntimeError("the client is closed")
            conn = self.conn
            if conn is not None and conn.alive and not conn.retired:
                return conn
            if self._connecting is not None:
                await asyncio.shield(self._connecting)
                continue
            self._connecting = asyncio.get_running_loop().create_future()
            attempt = self._connecting
            try:
                conn = await self._open(self.ring.next())
                self.conns = {c for c in self.conns if c.alive}
                self.conns.add(conn)
                # Still inside the attempt: callers waiting on it must not open another
                # connection beside this one while it is being checked.
                try:
                    skip = await self._is_leader_to_skip(conn)
                except BaseException:
                    conn.retire()
                    raise
            except BaseException as exc:
                self.ring.advance()
                attempt.set_exception(exc if isinstance(exc, Exception) else ConnectionFailed())
                attempt.exception()  # retrieved: no "never retrieved" warning
                raise
            finally:
                self._connecting = None
            attempt.set_result(conn)
            if skip:
                continue
            self.conn = conn
            return conn

    async def _is_leader_to_skip(self, conn: _Connection) -> bool:
        """With ``avoid_leader``: whether ``conn`` reached the leader and another
        endpoint is left to try (then ``conn`` is retired and the next one is up)."""
        if not self._avoid.check():
            return False
        try:
            async with asyncio.timeout(self._attempt_timeout):
                resp = await conn.wait(conn.submit(AvoidLeader.STATUS))
        except (_Lost, TimeoutError):
            return False  # the requests will find out what is wrong
        if not self._avoid.skip(resp):
            return False
        self.ring.advance()
        conn.retire()
        return True

    def apply(self, conn: _Connection, verdict: Verdict) -> bool:
        """Leave ``conn`` as the core's verdict says; raise a fatal error; True: retry
        at once."""
        if verdict.move is not Move.STAY and self.conn is conn:
            self.conn = None
            if verdict.move is Move.REDIRECT:
                assert verdict.leader is not None
                self.ring.redirect(verdict.leader)
            else:
                self.ring.advance()
            if verdict.move is not Move.LOST:
                conn.retire()
        if verdict.fatal:
            raise verdict.error
        return verdict.at_once

    async def aclose(self) -> None:
        self.closed = True
        conns, self.conns = list(self.conns), set()
        self.conn = None
        await asyncio.gather(*(c.aclose() for c in conns), return_exceptions=True)


class AsyncioClient(ClientAPI):
    """An asyncio client for a liferaft cluster: the methods, results, errors and retries
    of the Trio :class:`~liferaft.client.Client` (docs/client-library.md). Open it with
    :meth:`connect` or :func:`open_client`; share one among every task of a program
    (requests made at the same moment leave in one WebSocket message).

    Options as the Trio client's: ``timeout`` bounds each call, retries included;
    ``attempt_timeout`` (default half of it, at most 2 s) one try and each handshake;
    ``max_batch``, ``max_message_bytes``, ``session_window``, ``reads`` (``"followers"``:
    gets and ranges over a second connection, to a node other than the leader where
    there is one, still linearizable) and ``rng`` (the back-off's jitter). Not here:
    ``dial`` (the Trio client's hook for the simulator's in-memory streams); give an
    ``ssl_context`` instead of ``cacert`` to choose the TLS settings."""

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        token: str,
        cacert: Path | str | None = None,
        timeout: float = 5.0,
        attempt_timeout: float | None = None,
        max_batch: int = MAX_BATCH,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        session_window: int = SESSION_WINDOW,
        reads: str = "leader",
        rng: random.Random | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Configure a client without connecting: use :meth:`connect` or
        :func:`open_client` instead."""
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        if not endpoints:
            raise ValueError("no endpoints given")
        parsed = [_parse_endpoint(e) for e in endpoints]
        if not isinstance(token, str) or not token.strip():
            raise ValueError("a token is required")
        if not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"max_batch must be 1..{MAX_BATCH}")
        if timeout <= 0 or (attempt_timeout is not None and attempt_timeout <= 0):
            raise ValueError("timeouts must be positive")
        if session_window < 1:
            raise ValueError("session_window must be at least 1")
        if reads not in ("leader", "followers"):
            raise ValueError("reads must be 'leader' or 'followers'")
        if ssl_context is None:
            ssl_context = ssl.create_default_context(
                cafile=str(cacert) if cacert is not None else None
            )
        self._ssl = ssl_context
        self.token = token.strip()
        self.timeout = timeout
        self.attempt_timeout = (
            attempt_timeout if attempt_timeout is not None else min(timeout / 2, 2.0)
        )
        self._max_batch = max_batch
        self._max_message_bytes = max_message_bytes
        rng = rng if rng is not None else random.Random()
        self._pool = _Pool(parsed, self._open, attempt_timeout=self.attempt_timeout)
        # Gets and ranges go through this one: the same, or with reads="followers" a
        # connection of their own (clients start at random endpoints, so that they
        # spread over the followers).
        self._read_pool = self._pool
        if reads == "followers":
            self._read_pool = _Pool(
                parsed,
                self._open,
                attempt_timeout=self.attempt_timeout,
                avoid_leader=True,
                first=rng.randrange(len(parsed)),
            )
        self._backoff = Backoff(rng)
        self._window = SeqWindow(session_window)
        self._granted: dict[SeqWaiter, asyncio.Future[None]] = {}
        self._ids = _counter()
        self._background: set[asyncio.Task[Any]] = set()
        self.closed = False
        #: the exactly-once session of this client's writes (docs/client-protocol.md)
        self.session = os.urandom(16)

    # ---------------------------------------------------------------- opening, closing

    @classmethod
    async def connect(
        cls,
        endpoints: Sequence[str] | str,
        *,
        token: str,
        cacert: Path | str | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109 - the client's per-call budget, kept
        attempt_timeout: float | None = None,
        max_batch: int = MAX_BATCH,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        session_window: int = SESSION_WINDOW,
        reads: str = "leader",
        rng: random.Random | None = None,
    ) -> AsyncioClient:
        """A connected client; raises Unauthenticated (HTTP 401), PermissionDenied (403),
        TLSError or ConnectionFailed (no endpoint connected within ``timeout``)."""
        client = cls(
            endpoints,
            token=token,
            cacert=cacert,
            timeout=timeout,
            attempt_timeout=attempt_timeout,
            max_batch=max_batch,
            max_message_bytes=max_message_bytes,
            session_window=session_window,
            reads=reads,
            rng=rng,
        )
        try:
            await client._first_connection()
        except BaseException:
            await client.aclose()
            raise
        return client

    async def aclose(self) -> None:
        """Close the connections (in-flight requests fail) and stop; safe to call twice."""
        self.closed = True
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._pool.aclose()
        await self._read_pool.aclose()

    async def __aenter__(self) -> AsyncioClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def endpoint(self) -> str | None:
        """The URL of the endpoint currently connected, if any."""
        conn = self._pool.conn
        return conn.endpoint.url if conn is not None and conn.alive else None

    # ---------------------------------------------------------------- connections

    async def _first_connection(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        failures = 0
        last: LiferaftError | None = None
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._pool.connection()
                return
            except TimeoutError:
                urls = ", ".join(e.url for e in self._pool.ring.endpoints)
                why = f"; last error: {last.message}" if last is not None else ""
                raise ConnectionFailed(
                    f"cannot connect to any endpoint within {self.timeout:g}s ({urls}){why}"
                ) from None
            except ConnectionFailed as exc:
                last = exc
                delay = self._backoff.delay(failures)
                if loop.time() + delay >= deadline:
                    raise ConnectionFailed(
                        f"{exc.message} (and no endpoint connected within {self.timeout:g}s)"
                    ) from None
                await asyncio.sleep(delay)
                failures += 1

    async def _open(self, endpoint: Endpoint) -> _Connection:
        try:
            ws = await ws_connect(
                endpoint.url,
                ssl=self._ssl,
                server_hostname=endpoint.host,
                additional_headers={"Authorization": f"Bearer {self.token}"},
                compression=None,
                proxy=None,
                open_timeout=self.attempt_timeout,
                ping_interval=None,
                max_size=MAX_RESPONSE_BYTES,
                user_agent_header=None,
            )
        except (OSError, WebSocketException, TimeoutError, ssl.SSLError) as exc:
            raise _connect_error(endpoint, exc) from None
        return _Connection(endpoint, ws, self._ids, self._max_batch, self._max_message_bytes)

    # ---------------------------------------------------------------- the transport

    async def _request(
        self,
        fields: Mapping[str, Any],
        *,
        retry: Retry = Retry.ALWAYS,
        deadline: float | None = None,
        on_ok: OnOk | None = None,
        pool: _Pool | None = None,
    ) -> dict[str, Any]:
        """The success response to ``fields``, retried as the protocol core decides
        until ``deadline`` (default: ``timeout`` from now), over ``pool``'s connections
        (default: the client's own)."""
        pool = pool if pool is not None else self._pool
        if self.closed:
            raise RuntimeError("the client is closed")
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.timeout
        t = Tries()
        while True:
            now = loop.time()
            if now >= deadline:
                raise out_of_time(t, self.timeout)
            conn: _Connection | None = None
            attempt = asyncio.timeout_at(min(deadline, now + self.attempt_timeout))
            try:
                async with attempt:
                    conn = await pool.connection()
                    resp = await conn.wait(conn.submit(fields, on_ok))
            except ConnectionFailed as exc:  # nothing was sent
                t.last = exc
            except _Lost as exc:
                assert conn is not None
                verdict = on_lost(
                    conn.endpoint.url,
                    exc.reason,
                    sent=exc.sent,
                    too_big=exc.too_big,
                    retry=retry,
                    t=t,
                )
                pool.apply(conn, verdict)
            except TimeoutError:
                if not attempt.expired():
                    raise
                if conn is not None:
                    pool.apply(conn, on_silence(conn.endpoint.url, self.attempt_timeout, retry, t))
                else:
                    on_connect_timeout(
                        self.attempt_timeout, t, cut_by_deadline=loop.time() >= deadline
                    )
            else:
                if resp.get("ok") is True:
                    return resp
                assert conn is not None
                if pool.apply(conn, on_error(resp.get("error"), retry, t)):
                    continue  # follow the first redirect at once
            delay = self._backoff.delay(t.failures)
            await asyncio.sleep(max(0.0, min(deadline, loop.time() + delay) - loop.time()))
            t.failures += 1

    async def _read(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        return await self._request(fields, pool=self._read_pool)

    async def _write(self, op: str, **fields: Any) -> dict[str, Any]:
        """A write under the next seq of this client's session, retried with it."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        seqs = await self._take_seq(deadline)
        try:
            request = {"op": op, **fields, "session": self.session, "seq": seqs.start}
            return await self._request(request, deadline=deadline)
        finally:
            self._release_seq(seqs)

    async def _take_seq(self, deadline: float) -> range:
        window = self._window
        seqs = window.try_take(1)
        if seqs is not None:
            return seqs
        waiter = window.wait(1)
        granted = self._granted[waiter] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout_at(deadline):
                await granted
        except TimeoutError:
            if waiter.seqs is None:
                window.withdraw(waiter)
                raise window_full(window.size, self.timeout) from None
        except BaseException:
            window.withdraw(waiter)
            raise
        finally:
            self._granted.pop(waiter, None)
        assert waiter.seqs is not None
        return waiter.seqs

    def _release_seq(self, seqs: range) -> None:
        for waiter in self._window.release(seqs):
            granted = self._granted.get(waiter)
            if granted is not None and not granted.done():
                granted.set_result(None)

    # ---------------------------------------------------------------- the rest of the API

    async def put_many(self, items: Sequence[tuple[str, bytes | str]]) -> list[int]:
        """Put every ``(key, value)`` of ``items``; the revision each put made, in order.
        Each put is a request with its own seq (applied at most once, like :meth:`put`),
        all queued at once so that they leave in one message (several past
        ``max_batch``); not a transaction. A failed put is raised after every other put
        is over: the first failed one in the order of ``items``, with a note saying how
        many failed."""
        if isinstance(items, str | bytes | Mapping):
            raise InvalidRequest("items must be a sequence of (key, value) pairs")
        puts: list[tuple[str, bytes]] = []
        for item in items:
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise InvalidRequest(f"put_many item {len(puts)}: not a (key, value) pair")
            puts.append((check_key(item[0]), to_bytes(item[1])))
        results = await asyncio.gather(*(self.put(k, v) for k, v in puts), return_exceptions=True)
        failed = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        if failed:
            first, err = failed[0]
            if isinstance(err, LiferaftError):
                err = copy.copy(err)
                err.__notes__ = list(getattr(err, "__notes__", ()))
                err.add_note(
                    f"put_many: {len(failed)} of {len(puts)} puts failed, the first of them "
                    f"#{first} (key {puts[first][0]!r}); the other "
                    f"{len(puts) - len(failed)} succeeded"
                )
            raise err
        return [r for r in results if isinstance(r, int)]

    def watch(
        self, key: str | None = None, *, prefix: str | None = None, start_revision: int = 0
    ) -> AsyncioWatch:
        """Changes to ``key`` (or under ``prefix``) from ``start_revision`` (0: from now),
        an async iterator of :class:`~liferaft.client.WatchEvent`; ``async with`` it to
        unwatch on exit. It survives reconnects without a gap (see the Trio client)."""
        selector = self._watch_selector(key, prefix, start_revision)
        return AsyncioWatch(self, selector, start_revision)

    def keep_alive(
        self, *leases: Lease | int, fraction: float = 1 / 3, cancel_on_loss: bool = True
    ) -> AsyncioKeepAlive:
        """Keep ``leases`` alive while a block runs (see the Trio client's
        ``keep_alive``): ``async with client.keep_alive(lease) as ka:``; the block is
        cancelled and LeaseLost raised if a lease is lost (``ka.lost``, an
        ``asyncio.Event``)."""
        return AsyncioKeepAlive(self, leases, fraction=fraction, cancel_on_loss=cancel_on_loss)

    async def refresh(self, token: str) -> None:
        """Replace the token: on the open connection and for every later connection."""
        if not isinstance(token, str) or not token.strip():
            raise ValueError("a token is required")
        self.token = token.strip()  # what every connection opened from now on presents
        pools = [self._pool] if self._read_pool is self._pool else [self._pool, self._read_pool]
        for pool in pools:
            conn = pool.conn
            if conn is None or not conn.alive:
                continue
            try:
                async with asyncio.timeout(self.attempt_timeout):
                    resp = await conn.wait(conn.submit({"op": "refresh", "token": self.token}))
            except (_Lost, TimeoutError):
                pool.apply(conn, Verdict(Move.LOST, ConnectionFailed()))
                continue
            if resp.get("ok") is not True:
                raise error_from_wire(resp.get("error"))

    async def snapshot_save(
        self, dest: Path | str, *, progress: Callable[[int, int], object] | None = None
    ) -> dict[str, Any]:
        """Save a backup of the whole store (admin) from the node this client is connected
        to into the file ``dest``, written atomically; as the Trio client's
        ``snapshot_save`` (``progress(received, total)`` per chunk; not retried: a failure
        raises and leaves no file)."""
        conn = await self._pool.connection()
        pull = backup.BackupPull(Path(dest), progress)
        try:
            async with asyncio.timeout(backup.BEGIN_TIMEOUT):
                pull.begin(await conn.wait(conn.submit(backup.BEGIN)))
            waiting: deque[_Request] = deque()
            while not pull.done:
                waiting += [conn.submit(req) for req in pull.requests()]
                async with asyncio.timeout(backup.CHUNK_TIMEOUT):
                    pull.chunk(await conn.wait(waiting.popleft()))
            return pull.finish()
        except _Lost as exc:
            raise ConnectionFailed(f"connection lost during the backup: {exc.reason}") from None
        except TimeoutError:
            raise ConnectionFailed("the node stopped answering during the backup") from None
        finally:
            pull.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


def _counter() -> Iterator[int]:
    n = 0
    while True:
        n += 1
        yield n


class AsyncioWatch:
    """An async iterator of :class:`~liferaft.client.WatchEvent` for one key or prefix,
    from :meth:`AsyncioClient.watch`; it resubscribes after a reconnect from the revision
    after the last event it delivered (:class:`liferaft.client.core.WatchState`)."""

    def __init__(
        self, client: AsyncioClient, selector: dict[str, Any], start_revision: int
    ) -> None:
        self._client = client
        self._state = WatchState(selector, start_revision)
        self._conn: _Connection | None = None
        self._watch_id = 0
        self._queue: asyncio.Queue[dict[str, Any] | None] | None = None
        self._buffer: deque[WatchEvent] = deque()
        self._closed = False

    @property
    def next_revision(self) -> int:
        """The revision a resubscription would start from (0 until one is known)."""
        return self._state.next_revision

    def peek(self) -> WatchEvent | None:
        """The next event if it has arrived already, without taking it (see the Trio
        client's ``Watch.peek``: the events of one revision arrive together)."""
        return self._buffer[0] if self._buffer else None

    async def __aenter__(self) -> AsyncioWatch:
        if self._queue is None:
            await self._subscribe()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncioWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        while True:
            if self._buffer:
                return self._buffer.popleft()
            if self._closed:
                raise StopAsyncIteration
            if self._queue is None:
                await self._subscribe()
            assert self._queue is not None
            msg = await self._queue.get()
            if msg is None:  # the connection broke or we fell behind: resubscribe
                self._queue = None
                continue
            try:
                self._buffer.extend(self._state.events(msg))
            except LiferaftError:
                if self._state.closed:
                    self.close()
                raise

    async def _subscribe(self) -> None:
        if self._closed:
            raise RuntimeError("the watch is closed")

        def on_ok(conn: _Connection, resp: dict[str, Any]) -> None:
            watch_id = resp.get("watch_id")
            if type(watch_id) is int:
                self._conn, self._watch_id = conn, watch_id
                self._queue = conn.subscribe(watch_id)

        resp = await self._client._request(self._state.subscribe_request(), on_ok=on_ok)
        self._state.subscribed(resp)

    def close(self) -> None:
        """Stop watching (sends ``unwatch``); iteration ends after buffered events."""
        self._closed = True
        if self._conn is not None and self._queue is not None:
            self._conn.unsubscribe(self._watch_id, self._queue)
        self._queue = None

    async def aclose(self) -> None:
        self.close()
        await asyncio.sleep(0)


class AsyncioKeepAlive:
    """Keeps leases alive in a background task, driving the core's
    :class:`~liferaft.client.core.KeepAliveSchedule` (renewals due together leave in one
    message); from :meth:`AsyncioClient.keep_alive`."""

    def __init__(
        self,
        client: AsyncioClient,
        leases: Iterable[Lease | int] = (),
        *,
        fraction: float = 1 / 3,
        cancel_on_loss: bool = True,
    ) -> None:
        self._client = client
        self.schedule = KeepAliveSchedule(fraction)
        self._cancel_on_loss = cancel_on_loss
        self.lost = asyncio.Event()
        self.error: LeaseLost | None = None
        self.lost_leases: dict[int, LeaseLost] = {}
        self._callbacks: list[Callable[[LeaseLost], object]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._body: asyncio.Task[Any] | None = None
        self._cancelled_body = False
        self._stopped = False  # stop() was called (a cancel from elsewhere: the client closed)
        self._pending: list[Lease | int] = list(leases)

    @property
    def leases(self) -> list[int]:
        return self.schedule.leases

    def add(self, lease: Lease | int, *, renewed_at: float | None = None) -> None:
        """Keep ``lease`` too (a Lease with ``renewed_at``, the loop time taken before
        the grant was sent, is first renewed a third of its TTL after; else at once)."""
        now = asyncio.get_running_loop().time()
        if isinstance(lease, Lease):
            self.schedule.add(lease.id, lease.ttl, now, renewed_at=renewed_at)
        else:
            self.schedule.add(check_lease_id(lease), None, now)
        self._wake.set()

    def remove(self, lease_id: int) -> None:
        self.schedule.remove(lease_id)
        self._wake.set()

    def on_lost(self, callback: Callable[[LeaseLost], object]) -> None:
        self._callbacks.append(callback)
        if self.error is not None:
            callback(self.error)

    async def start(self) -> None:
        if self._task is None:
            for lease in self._pending:
                self.add(lease)
            self._pending = []
            self._task = self._client._spawn(self._run())
            self._task.add_done_callback(self._ended)

    def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()

    def check(self) -> None:
        """Raise LeaseLost if a lease has been lost."""
        if self.error is not None:
            raise LeaseLost(self.error.message, lease=self.error.lease)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """The keeper's task ended. Not through stop(): the client closed and cancelled
        it (perhaps before it ever ran, so this is a done callback, not an except)."""
        if not self._stopped:
            self._client_closed()

    def _client_closed(self) -> None:
        """The client closed under the keeper: nobody renews its leases any more."""
        self._lose_all("its client was closed, so nothing renews it")
        self.stop()

    def _lose_all(self, why: str) -> None:
        for lease_id in self.schedule.remove_all():
            self._lose(lease_id, why)

    async def __aenter__(self) -> AsyncioKeepAlive:
        await self.start()
        if self._cancel_on_loss:
            self._body = asyncio.current_task()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self.stop()
        body, self._body = self._body, None
        if body is None:
            return False
        if self._cancelled_body:
            body.uncancel()  # the cancellation was ours: LeaseLost instead
        if self.error is not None and exc_type in (None, asyncio.CancelledError):
            self.check()  # a lease was lost while the block ran: its work may overlap
        return False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        schedule = self.schedule
        try:
            while True:
                now = loop.time()
                for lease_id, last in schedule.expired(now):
                    why = f"; the last renewal failed: {last}" if last is not None else ""
                    self._lose(lease_id, f"no renewal confirmed within its TTL{why}")
                for lease_id in schedule.take_due(now):
                    self._client._spawn(self._renew(lease_id, now))
                self._wake.clear()
                wakeup = schedule.next_wakeup()
                timeout = None if wakeup == float("inf") else max(0.0, wakeup - loop.time())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
        except Exception as exc:  # a bug: never stop quietly, report every lease lost
            self._lose_all(f"its keepalive task failed: {exc!r:.200}")

    async def _renew(self, lease_id: int, sent_at: float) -> None:
        schedule = self.schedule
        deadline = schedule.deadline(lease_id)
        if deadline is None:
            return
        try:
            limit = min(deadline, sent_at + self._client.timeout)
            ttl = await self._client._lease_keepalive(lease_id, deadline=limit)
        except NotFound as exc:
            if lease_id in schedule:
                schedule.remove(lease_id)
                self._lose(lease_id, f"the cluster no longer has it ({exc.message or exc.code})")
        except LiferaftError as exc:
            schedule.failed(lease_id, asyncio.get_running_loop().time(), exc)
        except RuntimeError:  # the client closed
            self._client_closed()
        else:
            if lease_id in schedule:
                schedule.renewed(lease_id, ttl, sent_at)
        finally:
            self._wake.set()

    def _lose(self, lease_id: int, why: str) -> None:
        err = LeaseLost(f"lease {lease_id:x} lost: {why}", lease=lease_id)
        self.lost_leases[lease_id] = err
        if self.error is None:
            self.error = err
        self.lost.set()
        if self._body is not None and not self._cancelled_body:
            self._cancelled_body = True
            self._body.cancel()
        for callback in list(self._callbacks):
            callback(err)


@asynccontextmanager
async def open_client(
    endpoints: Sequence[str] | str,
    *,
    token: str,
    cacert: Path | str | None = None,
    timeout: float = 5.0,  # noqa: ASYNC109 - the client's per-call budget, kept
    attempt_timeout: float | None = None,
    max_batch: int = MAX_BATCH,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    session_window: int = SESSION_WINDOW,
    reads: str = "leader",
    rng: random.Random | None = None,
) -> AsyncIterator[AsyncioClient]:
    """``async with open_client(endpoints, token=..., cacert=...) as client:`` connects
    like :meth:`AsyncioClient.connect` and closes the client on exit."""
    client = await AsyncioClient.connect(
        endpoints,
        token=token,
        cacert=cacert,
        timeout=timeout,
        attempt_timeout=attempt_timeout,
        max_batch=max_batch,
        max_message_bytes=max_message_bytes,
        session_window=session_window,
        reads=reads,
        rng=rng,
    )
    try:
        yield client
    finally:
        await client.aclose()
