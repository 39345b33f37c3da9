"""The client's endpoints and its connections to them: one current connection, opened to
the next endpoint when a call needs one, and the retired ones still finishing their
requests.

Opening is shared: every call that finds no connection waits on the same attempt, and a
failed attempt raises its typed error in each of them. Which endpoint comes next is
decided by how the last one failed (``lost``, ``rotate``, ``redirect``), as judged by
the retry logic (liferaft.client.retry).
"""

from __future__ import annotations

import itertools
import ssl
from collections.abc import Awaitable, Callable

import trio

from liferaft.client.connection import Connection, Dial, describe, find
from liferaft.client.core import AvoidLeader, EndpointRing, Move, Verdict
from liferaft.client.errors import (
    ConnectionFailed,
    LiferaftError,
    PermissionDenied,
    TLSError,
    Unauthenticated,
)
from liferaft.client.wire import Endpoint
from liferaft.websocket import ConnectionRejected

CLOSE_WAIT = 2.0  # how long aclose() waits for connections to say goodbye


class ConnectionPool:
    """The connections of one client. ``conn`` is the current one, if any; a caller may
    use it while it is ``alive`` and not ``retired``, else it asks :meth:`connection`."""

    def __init__(
        self,
        endpoints: list[Endpoint],
        *,
        dial: Dial,
        token: str,
        max_batch: int,
        max_message_bytes: int,
        attempt_timeout: float,
        avoid_leader: bool = False,
        first: int = 0,
    ) -> None:
        self.endpoints = endpoints
        # Connect to a node other than the leader where one answers (for reads).
        self._avoid = AvoidLeader(avoid_leader, len(endpoints))
        self._dial = dial
        self.token = token  # presented by every connection opened from now on
        self._max_batch = max_batch
        self._max_message_bytes = max_message_bytes
        self._attempt_timeout = attempt_timeout
        self._ids = itertools.count(1)
        self.ring = EndpointRing(endpoints, first)  # which endpoint to try next
        self.conn: Connection | None = None
        self._connecting: _Attempt | None = None
        self._conns: list[Connection] = []
        self._nursery: trio.Nursery | None = None
        self._stopped = trio.Event()
        self.closed = False

    async def start(self) -> None:
        # The connection tasks live in a nursery of their own, run as a Trio system task,
        # so that Client.connect can return a client without taking a nursery from the
        # caller and so that errors in the caller's code are never wrapped in
        # ExceptionGroups. Nothing in it raises: each connection catches its own failures.
        ready = trio.Event()

        async def host() -> None:
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    ready.set()
                    await self._stopped.wait()
                    nursery.cancel_scope.cancel()
            except Exception:  # pragma: no cover - a bug; never crash the Trio run for it
                self.closed = True
            finally:
                ready.set()

        trio.lowlevel.spawn_system_task(host, name=f"liferaft.client {self.endpoints[0].url}")
        await ready.wait()

    async def spawn(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Run ``fn`` in the background, alongside the connections, until it returns or
        the pool closes; it must catch its own errors (one would close the client)."""
        if self._nursery is None:
            raise RuntimeError("the client is not started: use Client.connect or open_client")
        if self.closed:
            raise trio.ClosedResourceError("the client is closed")
        self._nursery.start_soon(fn)
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Close the connections (in-flight requests fail) and stop; safe to call twice."""
        if self.closed and self._stopped.is_set():
            return
        self.closed = True
        conns = [c for c in self._conns if not c.finished.is_set()]
        for c in conns:
            c.close()
        with trio.move_on_after(CLOSE_WAIT) as scope:
            scope.shield = True
            for c in conns:
                await c.finished.wait()
        self._stopped.set()

    async def connection(self) -> Connection:
        """The current connection, or a new one to the next endpoint."""
        while True:
            if self._nursery is None:
                raise RuntimeError("the client is not started: use Client.connect or open_client")
            if self.closed:
                raise trio.ClosedResourceError("the client is closed")
            conn = self.conn
            if conn is not None and conn.alive and not conn.retired:
                return conn
            pending = self._connecting
            if pending is not None:
                await pending.done.wait()
                if pending.error is not None:
                    raise pending.error
                continue
            pending = self._connecting = _Attempt()
            endpoint = self.ring.next()
            conn = Connection(
                endpoint,
                dial=self._dial,
                token=self.token,
                ids=self._ids,
                max_batch=self._max_batch,
                max_message_bytes=self._max_message_bytes,
                connect_timeout=self._attempt_timeout,
                attempt_timeout=self._attempt_timeout,
            )
            try:
                try:
                    await self._nursery.start(conn.run)
                except Exception as exc:
                    self.ring.advance()
                    pending.error = _connect_error(endpoint, exc)
                    raise pending.error from None
                except BaseException:
                    # Cancelled: the attempt ran out of time (a paused node accepts TCP
                    # but never finishes TLS). Try the next endpoint next time.
                    self.ring.advance()
                    raise
                self._conns = [c for c in self._conns if not c.finished.is_set()]
                self._conns.append(conn)
                # Still inside the attempt: callers waiting on it must not open another
                # connection beside this one while it is being checked.
                try:
                    skip = await self._is_leader_to_skip(conn)
                except BaseException:
                    conn.close()
                    raise
            finally:
                self._connecting = None
                pending.done.set()
            if skip:
                continue
            self.conn = conn
            return conn

    async def _is_leader_to_skip(self, conn: Connection) -> bool:
        """With ``avoid_leader``: whether ``conn`` reached the leader and another
        endpoint is left to try (then ``conn`` is closed and the next one is up)."""
        if not self._avoid.check():
            return False
        try:
            resp = await conn.wait(conn.submit(AvoidLeader.STATUS))
        except LiferaftError:
            return False  # the requests will find out what is wrong
        if not self._avoid.skip(resp):
            return False
        self.ring.advance()
        conn.close()
        return True

    def lost(self, conn: Connection) -> None:
        """``conn`` broke: the next request connects to the next endpoint."""
        if self.conn is conn:
            self.conn = None
            self.ring.advance()

    def rotate(self, conn: Connection) -> None:
        """``conn``'s node cannot serve us now: move on, let its in-flight requests end."""
        if self.conn is conn:
            self.conn = None
            self.ring.advance()
            conn.retire()

    def redirect(self, conn: Connection, leader: Endpoint) -> None:
        """``conn``'s node named the leader: connect there next, not to the next one."""
        if self.conn is conn:
            self.conn = None
            self.ring.redirect(leader)
            conn.retire()

    def apply(self, conn: Connection, verdict: Verdict) -> None:
        """Leave ``conn`` as the protocol core's verdict on a failed attempt says."""
        if verdict.move is Move.LOST:
            self.lost(conn)
        elif verdict.move is Move.ROTATE:
            self.rotate(conn)
        elif verdict.move is Move.REDIRECT:
            assert verdict.leader is not None
            self.redirect(conn, verdict.leader)


class _Attempt:
    """A connection attempt in progress, which concurrent callers wait on."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: LiferaftError | None = None


def _connect_error(endpoint: Endpoint, exc: BaseException) -> LiferaftError:
    """The typed error for a failed connection attempt."""
    rejected = find(exc, ConnectionRejected)
    if isinstance(rejected, ConnectionRejected):
        status = rejected.status_code
        body = (rejected.body or b"").decode("utf-8", "replace")[:200]
        detail = f"{endpoint.url}: HTTP {status} at the WebSocket upgrade" + (
            f": {body}" if body else ""
        )
        if status == 401:
            return Unauthenticated(f"{detail} (token refused: missing, expired or invalid)")
        if status == 403:
            return PermissionDenied(detail)
        return ConnectionFailed(detail)
    bad_cert = find(exc, ssl.SSLCertVerificationError)
    if isinstance(bad_cert, ssl.SSLCertVerificationError):
        return TLSError(
            f"{endpoint.url}: server certificate not accepted: "
            f"{bad_cert.verify_message or bad_cert} (check --cacert and the host name)"
        )
    return ConnectionFailed(f"cannot connect to {endpoint.url}: {describe(exc)}")
