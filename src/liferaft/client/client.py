"""The async client on Trio: its configuration and lifecycle, and the Trio transport
under the operations of the protocol (docs/client-protocol.md), which it inherits from
:class:`~liferaft.client.api.ClientAPI` (shared with the asyncio client).

Writes (put, delete, txn, compact) carry this client's ``session`` and a ``seq`` drawn
once per call, so every retry of a call is the same request to the server and applies at
most once. The parts it is made of: the connections (liferaft.client.pool), the retries
and redirects of a call (liferaft.client.retry), the seqs a session may have in flight
(liferaft.client.session), and put_many's turns (liferaft.client.put_many).
"""

from __future__ import annotations

import os
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

from liferaft.client import backup, put_many
from liferaft.client.api import ClientAPI
from liferaft.client.connection import ConnectionLost, Dial, tls_dialer
from liferaft.client.errors import ConnectionFailed, error_from_wire
from liferaft.client.leases import KeepAlive
from liferaft.client.models import Lease
from liferaft.client.pool import ConnectionPool
from liferaft.client.retry import Retrier, Retry
from liferaft.client.session import SESSION_WINDOW, SessionWindow
from liferaft.client.watch import Watch
from liferaft.client.wire import MAX_BATCH, parse_endpoint

DEFAULT_ENDPOINT = "wss://127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024  # the server's default [client] max_message_bytes


class Client(ClientAPI):
    """An async (Trio) client for a liferaft cluster.

    Open one with :meth:`connect` (close it with :meth:`aclose`) or with
    :func:`open_client`; either connects before returning, so a bad token, a bad CA or an
    unreachable cluster shows up at once. One Client holds one connection at a time and
    is meant to be shared: any number of tasks may call it at once, and requests made at
    the same moment travel together in one WebSocket message::

        import trio
        from liferaft.client import open_client

        async def main():
            async with open_client(["wss://127.0.0.1:8001", "wss://127.0.0.1:8002"],
                                   token=open("token.jwt").read().strip(),
                                   cacert="certs/ca.pem") as client:
                rev = await client.put("greeting", "hello")
                kv = await client.get("greeting")
                assert kv is not None and kv.value == b"hello" and kv.mod_revision == rev
                async with trio.open_nursery() as nursery:  # 100 puts, a message or two
                    for i in range(100):
                        nursery.start_soon(client.put, f"k/{i}", b"v")
                # the same in one call, one message, for a fraction of the CPU
                revs = await client.put_many([(f"k/{i}", b"v") for i in range(100)])
                kvs, more = await client.range("k/", limit=10)

        trio.run(main)

    ``timeout`` bounds each call, retries included; ``attempt_timeout`` (default half of
    it, at most 2 s) bounds one try, and the connection handshake: a node that is paused
    or partitioned keeps its TCP connection open, and only this moves the call on to
    another node (a retried write keeps its session and seq, so it is applied once).
    ``reads="followers"`` sends gets and ranges over a second connection, to a node other
    than the leader where there is one: still linearizable (the node confirms its read
    index with the leader, docs/client-protocol.md), and the leader's CPU goes to writes.
    ``max_batch`` caps the requests per message (the protocol allows 1..1024),
    ``max_message_bytes`` the size of one message (keep it at or below the server's
    ``max_message_bytes``). ``session_window`` bounds
    the span of seqs in flight at once; keep it at or below the number of results per
    session the server remembers (128 in liferaft), or retries of old writes are refused.
    ``rng`` seeds the retry back-off; ``dial`` opens the byte stream to an endpoint in
    place of TCP and TLS (the whole-node simulator's in-memory streams).
    """

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
        dial: Dial | None = None,
    ) -> None:
        """Configure a client without connecting: use :meth:`connect` or
        :func:`open_client` instead, which also start it."""
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        if not endpoints:
            raise ValueError("no endpoints given")
        parsed = [parse_endpoint(e) for e in endpoints]
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
        if dial is None:
            cafile = str(cacert) if cacert is not None else None
            dial = tls_dialer(ssl.create_default_context(cafile=cafile))
        if attempt_timeout is None:
            attempt_timeout = min(timeout / 2, 2.0)
        self._max_message_bytes = max_message_bytes
        rng = rng if rng is not None else random.Random()
        pool = partial(
            ConnectionPool,
            parsed,
            dial=dial,
            token=token.strip(),
            max_batch=max_batch,
            max_message_bytes=max_message_bytes,
            attempt_timeout=attempt_timeout,
        )
        retrier = partial(Retrier, timeout=timeout, attempt_timeout=attempt_timeout, rng=rng)
        self._pool = pool()
        self._retrier = retrier(self._pool)
        # Reads (get, range) go through this one: the same as writes, or with
        # reads="followers" a connection of their own to a node other than the leader.
        self._reads = self._retrier
        self._read_pool: ConnectionPool | None = None
        if reads == "followers":
            # clients start at random endpoints, so that they spread over the followers
            self._read_pool = pool(avoid_leader=True, first=rng.randrange(len(parsed)))
            self._reads = retrier(self._read_pool)
        #: the exactly-once session of this client's writes (docs/client-protocol.md)
        self.session = os.urandom(16)
        self._window = SessionWindow(session_window, timeout)

    # ---------------------------------------------------------------- opening, closing

    @classmethod
    async def connect(
        cls,
        endpoints: Sequence[str] | str,
        *,
        token: str,
        cacert: Path | str | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109 - the client's per-call budget, kept
        max_batch: int = MAX_BATCH,
        attempt_timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        session_window: int = SESSION_WINDOW,
        reads: str = "leader",
        rng: random.Random | None = None,
        dial: Dial | None = None,
    ) -> Client:
        """A connected client. Raises Unauthenticated (HTTP 401), TLSError (the server's
        certificate does not verify) or ConnectionFailed (no endpoint answered within
        ``timeout``). Close it with ``await client.aclose()`` or ``async with``::

            client = await Client.connect(["wss://127.0.0.1:8001"], token=jwt,
                                          cacert="certs/ca.pem")
            async with client:
                print(await client.status())
        """
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
            dial=dial,
        )
        await client._pool.start()
        if client._read_pool is not None:
            await client._read_pool.start()
        try:
            await client._retrier.first_connection()
        except BaseException:
            await client.aclose()
            raise
        return client

    async def aclose(self) -> None:
        """Close the connections (in-flight requests fail) and stop; safe to call twice."""
        await self._pool.aclose()
        if self._read_pool is not None:
            await self._read_pool.aclose()

    async def __aenter__(self) -> Client:
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

    # ---------------------------------------------------------------- key-value

    async def put_many(self, items: Sequence[tuple[str, bytes | str]]) -> list[int]:
        """Put every ``(key, value)`` of ``items``; the revision each put made, in order::

            revs = await client.put_many([("user/1", b"ann"), ("user/2", "bob")])

        Each put is a request of its own, with its own seq in this client's session (so,
        as with :meth:`put`, each applies at most once whatever the retries), but they
        are queued together on one connection: they leave in one WebSocket message
        (several beyond ``max_batch`` requests or ``max_message_bytes``), the server
        writes the writes of one message into one log entry, and the call waits once
        for all. Far cheaper, for this client and for the cluster, than as many
        concurrent :meth:`put` calls. The puts are not one transaction: each gets its
        own revision, and other writes may come in between (use :meth:`txn` for
        all-or-nothing).

        The session window: at most ``session_window`` writes of this client are in
        flight at once (see :class:`Client`). Longer lists are not refused: the puts go
        in turns, as many as the window has room for (a turn shares it with the
        client's other writes), then the next ones once those are answered.
        ``timeout`` bounds each turn, its wait for room included, so a call of n puts
        may take up to ``ceil(n / session_window)`` timeouts.

        A put answered ``not_leader`` or ``unavailable``, cut off with its connection
        or unanswered within ``attempt_timeout`` is retried with its session and seq
        as :meth:`put` retries: the puts to retry go again together, in their order,
        after the same verdicts and one back-off; the others are not sent again. So
        the puts apply in the order given, except that a retried put lands after those
        of its turn that needed no retry: put each key at most once per call.

        Errors: a bad key or value (InvalidRequest) or a put too large for a message
        (TooLarge) is raised before anything is sent. Any other failure of a put
        (refused: PermissionDenied, InvalidRequest, TooLarge, ...; or Unavailable when
        its retries ran out of time) is raised only after every other put of the call
        has been carried to its end; if several failed, the error of the *first* failed
        put in the order of ``items`` is raised, with a note saying how many failed. The
        puts that succeeded are applied and stay applied; a put that failed with
        Unavailable may or may not have been applied.
        """
        return await put_many.put_many(
            items,
            retrier=self._retrier,
            window=self._window,
            session=self.session,
            max_message_bytes=self._max_message_bytes,
        )

    def watch(
        self, key: str | None = None, *, prefix: str | None = None, start_revision: int = 0
    ) -> Watch:
        """Changes to ``key`` (or under ``prefix``) from ``start_revision`` (0: from now),
        as an async iterator of :class:`WatchEvent`. Use it as a context manager, which
        sends ``unwatch`` on exit::

            async with client.watch(prefix="jobs/") as events:
                async for ev in events:
                    print(ev.type, ev.kv.key, ev.kv.value)

        A watch survives reconnects: it resubscribes from the revision after the last
        event it delivered, so no event is missed or repeated (unless that revision was
        compacted meanwhile: then it raises Compacted).
        """
        selector = self._watch_selector(key, prefix, start_revision)
        return Watch(self._retrier, selector, start_revision)

    # ---------------------------------------------------------------- leases

    def keep_alive(
        self, *leases: Lease | int, fraction: float = 1 / 3, cancel_on_loss: bool = True
    ) -> KeepAlive:
        """Keep ``leases`` alive while a block runs, renewing each at ``fraction`` of its
        TTL, the renewals due together in one message::

            lease = await client.lease_grant(10)
            await client.put("service/me", "10.0.0.5:80", lease=lease.id)
            async with client.keep_alive(lease) as ka:
                await serve()   # cancelled, and LeaseLost raised, if the lease is lost

        A lease is lost when the cluster says it is gone or when no renewal was
        confirmed within its TTL (the cluster may have expired it); ``ka.lost`` is then
        set. With ``cancel_on_loss=False`` the block is not cancelled. Leaving the block
        stops renewing (the leases then expire, unless revoked). See
        :class:`~liferaft.client.leases.KeepAlive`.
        """
        return KeepAlive(self, leases, fraction=fraction, cancel_on_loss=cancel_on_loss)

    async def _spawn(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Run ``fn`` among the client's background tasks (it must catch its errors)."""
        await self._pool.spawn(fn)

    # ---------------------------------------------------------------- the transport

    async def _request(
        self,
        fields: Mapping[str, Any],
        *,
        retry: Retry = Retry.ALWAYS,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        return await self._retrier.request(fields, retry=retry, deadline=deadline)

    async def _read(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        return await self._reads.request(fields)

    # ---------------------------------------------------------------- cluster

    async def snapshot_save(
        self, dest: Path | str, *, progress: Callable[[int, int], object] | None = None
    ) -> dict[str, Any]:
        """Save a backup of the whole store (admin) from the node this client is connected
        to into the file ``dest``, written atomically (``liferaft snapshot status`` reads
        it); ``progress(received, total)`` is called per chunk. The backup holds every
        write acknowledged before the call. Returns its description (``revision``,
        ``applied``, ``keys``, ``members``, ...). Not retried: a failure raises and leaves
        no file."""
        conn = await self._retrier.pool.connection()
        pull = backup.BackupPull(Path(dest), progress)
        try:
            with trio.fail_after(backup.BEGIN_TIMEOUT):
                pull.begin(await conn.wait(conn.submit(backup.BEGIN)))
            waiting: deque[Any] = deque()
            while not pull.done:
                waiting += [conn.submit(req) for req in pull.requests()]
                with trio.fail_after(backup.CHUNK_TIMEOUT):
                    pull.chunk(await conn.wait(waiting.popleft()))
            return pull.finish()
        except ConnectionLost as exc:
            raise ConnectionFailed(f"connection lost during the backup: {exc.reason}") from None
        except trio.TooSlowError:
            raise ConnectionFailed("the node stopped answering during the backup") from None
        finally:
            pull.close()

    async def refresh(self, token: str) -> None:
        """Replace the token: on the open connection (before the old one expires) and for
        every connection opened later."""
        if not isinstance(token, str) or not token.strip():
            raise ValueError("a token is required")
        pools = [self._pool] if self._read_pool is None else [self._pool, self._read_pool]
        for pool in pools:  # (with reads="followers", the reads' connection too)
            pool.token = token.strip()
            conn = pool.conn
            if conn is None or not conn.alive:
                continue  # the next connection presents the new token at its handshake
            try:
                p = conn.submit({"op": "refresh", "token": pool.token})
                with trio.fail_after(self._retrier.attempt_timeout):
                    resp = await conn.wait(p)
            except (ConnectionLost, trio.TooSlowError):
                pool.lost(conn)  # a new connection will present the new token
                continue
            if resp.get("ok") is not True:
                raise error_from_wire(resp.get("error"))

    async def _write(self, op: str, **fields: Any) -> dict[str, Any]:
        """Run a write under the next seq of this client's session, retried with it. It
        takes at most ``timeout`` in all, its wait for a seq (liferaft.client.session)
        included."""
        deadline = trio.current_time() + self._retrier.timeout
        window = self._window
        seqs = window.try_take(1)
        if seqs is None:
            seqs = await window.take(1, deadline)
        try:
            request = {"op": op, **fields, "session": self.session, "seq": seqs.start}
            return await self._retrier.request(request, deadline=deadline)
        finally:
            window.release(seqs)


@asynccontextmanager
async def open_client(
    endpoints: Sequence[str] | str,
    *,
    token: str,
    cacert: Path | str | None = None,
    timeout: float = 5.0,  # noqa: ASYNC109 - the client's per-call budget, kept
    max_batch: int = MAX_BATCH,
    attempt_timeout: float | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    session_window: int = SESSION_WINDOW,
    reads: str = "leader",
) -> AsyncIterator[Client]:
    """``async with open_client(endpoints, token=..., cacert=...) as client:`` connects
    like :meth:`Client.connect` and closes the client on exit."""
    client = await Client.connect(
        endpoints,
        token=token,
        cacert=cacert,
        timeout=timeout,
        max_batch=max_batch,
        attempt_timeout=attempt_timeout,
        max_message_bytes=max_message_bytes,
        session_window=session_window,
        reads=reads,
    )
    try:
        yield client
    finally:
        await client.aclose()
