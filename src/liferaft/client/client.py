"""The async client: one pipelined connection at a time, leader discovery, and retries
that keep a write's session and seq so that it applies at most once
(docs/client-protocol.md, "Writes, sessions and retries").

A call's life: take the current connection (or open one to the next endpoint, shared by
every call that needs it), queue the request, wait for its response under the attempt
timeout. On ``not_leader`` with a ``leader_endpoint`` the client moves to that endpoint
(at once the first time); on ``unavailable``, a lost connection or a timeout it moves to
the next endpoint and waits a jittered, capped exponential back-off; all within the
call's ``timeout``. Writes (put, delete, txn) carry this client's ``session`` and a
``seq`` drawn once per call, so every retry of a call is the same request to the server.
Membership changes and leader transfers have no session: they are retried only when the
server surely did not run them (no connection, not sent, ``not_leader``).

``put_many`` is many puts in one call: each has its own seq, all are queued at once and
waited for once, and only those that fail in a retriable way go again (together, with
the same verdicts as a single call's). The attempt deadline of a single call on an open
connection is kept by the connection's timer, not by a cancel scope per request: the
client's CPU per write should stay well below what a node spends on it.
"""

from __future__ import annotations

import builtins
import copy
import enum
import itertools
import os
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import trio
import trio_websocket

from liferaft.client.connection import (
    AttemptExpired,
    Connection,
    ConnectionLost,
    OnOk,
    describe,
    find,
)
from liferaft.client.errors import (
    ConnectionFailed,
    InternalError,
    InvalidRequest,
    LiferaftError,
    NotLeader,
    PermissionDenied,
    TLSError,
    TooLarge,
    Unauthenticated,
    Unavailable,
    error_from_wire,
)
from liferaft.client.models import (
    KeyValue,
    TxnResult,
    check_key,
    check_limit,
    check_prefix,
    check_revision,
    compare_to_wire,
    kv_from_wire,
    ops_to_wire,
    result_from_wire,
    to_bytes,
)
from liferaft.client.watch import Watch
from liferaft.client.wire import MAX_BATCH, Endpoint, encode_request, parse_endpoint

DEFAULT_ENDPOINT = "wss://127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024  # the server's default [client] max_message_bytes
BACKOFF_BASE = 0.05  # seconds: the first retry waits 25-50 ms, doubling up to the cap
BACKOFF_CAP = 1.0
CLOSE_WAIT = 2.0  # how long aclose() waits for connections to say goodbye
SESSION_WINDOW = 128  # results per session the server remembers (liferaft.kv.sessions)


class _Retry(enum.Enum):
    ALWAYS = "always"  # reads, and writes with a session: any failure may be retried
    SAFE = "safe"  # no session: only when the server surely did not run the request


class Client:
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
    ``max_batch`` caps the requests per message (the protocol allows 1..1024),
    ``max_message_bytes`` the size of one message (keep it at or below the server's
    ``max_message_bytes``). ``session_window`` bounds
    the span of seqs in flight at once; keep it at or below the number of results per
    session the server remembers (128 in liferaft), or retries of old writes are refused.
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
        rng: random.Random | None = None,
    ) -> None:
        """Configure a client without connecting: use :meth:`connect` or
        :func:`open_client` instead, which also start it."""
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        if not endpoints:
            raise ValueError("no endpoints given")
        self._endpoints: list[Endpoint] = [parse_endpoint(e) for e in endpoints]
        if not isinstance(token, str) or not token.strip():
            raise ValueError("a token is required")
        if not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"max_batch must be 1..{MAX_BATCH}")
        if timeout <= 0 or (attempt_timeout is not None and attempt_timeout <= 0):
            raise ValueError("timeouts must be positive")
        if session_window < 1:
            raise ValueError("session_window must be at least 1")
        self._token = token.strip()
        self._ssl_context = ssl.create_default_context(
            cafile=str(cacert) if cacert is not None else None
        )
        self._timeout = timeout
        self._attempt_timeout = (
            attempt_timeout if attempt_timeout is not None else min(timeout / 2, 2.0)
        )
        self._max_batch = max_batch
        self._max_message_bytes = max_message_bytes
        self._rng = rng if rng is not None else random.Random()
        self._ids = itertools.count(1)
        #: the exactly-once session of this client's writes (docs/client-protocol.md)
        self.session = os.urandom(16)
        self._seq = 0  # the last seq handed out
        self._session_window = session_window
        # the seqs handed out and not yet released, oldest first, as handed out (a range
        # per write, or per turn of put_many), and those released behind an older one
        self._open_seqs: deque[builtins.range] = deque()
        self._done_seqs: set[builtins.range] = set()
        self._seq_waiters: deque[_SeqWaiter] = deque()  # writes waiting for a seq, in turn
        self._index = 0  # the endpoint to try next
        self._override: Endpoint | None = None  # a leader_endpoint to try next
        self._conn: Connection | None = None
        self._connecting: _Attempt | None = None
        self._conns: list[Connection] = []
        self._nursery: trio.Nursery | None = None
        self._stopped = trio.Event()
        self._closed = False

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
        )
        await client._start()
        try:
            await client._first_connection()
        except BaseException:
            await client.aclose()
            raise
        return client

    async def _start(self) -> None:
        # The connection tasks live in a nursery of their own, run as a Trio system task,
        # so that connect() can return a client without taking a nursery from the caller
        # and so that errors in the caller's code are never wrapped in ExceptionGroups.
        # Nothing in it raises: each connection catches its own failures.
        ready = trio.Event()

        async def host() -> None:
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    ready.set()
                    await self._stopped.wait()
                    nursery.cancel_scope.cancel()
            except Exception:  # pragma: no cover - a bug; never crash the Trio run for it
                self._closed = True
            finally:
                ready.set()

        trio.lowlevel.spawn_system_task(host, name=f"liferaft.client {self._endpoints[0].url}")
        await ready.wait()

    async def _first_connection(self) -> None:
        deadline = trio.current_time() + self._timeout
        failures = 0
        last: ConnectionFailed | None = None
        while True:
            try:
                with trio.fail_at(deadline):
                    await self._connection()
                return
            except trio.TooSlowError:
                urls = ", ".join(e.url for e in self._endpoints)
                why = f"; last error: {last.message}" if last is not None else ""
                raise ConnectionFailed(
                    f"cannot connect to any endpoint within {self._timeout:g}s ({urls}){why}"
                ) from None
            except ConnectionFailed as exc:
                last = exc
                if trio.current_time() + self._backoff_delay(failures) >= deadline:
                    raise ConnectionFailed(
                        f"{exc.message} (and no endpoint connected within {self._timeout:g}s)"
                    ) from None
                await self._backoff(failures, deadline)
                failures += 1

    async def aclose(self) -> None:
        """Close the connections (in-flight requests fail) and stop; safe to call twice."""
        if self._closed and self._stopped.is_set():
            return
        self._closed = True
        conns = [c for c in self._conns if not c.finished.is_set()]
        for c in conns:
            c.close()
        with trio.move_on_after(CLOSE_WAIT) as scope:
            scope.shield = True
            for c in conns:
                await c.finished.wait()
        self._stopped.set()

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
        conn = self._conn
        return conn.endpoint.url if conn is not None and conn.alive else None

    # ---------------------------------------------------------------- key-value

    async def put(self, key: str, value: bytes | str) -> int:
        """Set ``key`` to ``value`` (``str`` is stored as UTF-8); the revision it made.

        Retried, with the same session and seq, until it succeeds or ``timeout`` passes.
        """
        resp = await self._write("put", key=check_key(key), value=to_bytes(value))
        return _uint(resp, "revision")

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
        if self._closed:
            raise trio.ClosedResourceError("the client is closed")
        if isinstance(items, str | bytes | Mapping):
            raise InvalidRequest("items must be a sequence of (key, value) pairs")
        puts: list[tuple[str, bytes]] = []
        for item in items:
            pair = type(item) is tuple or (
                isinstance(item, Sequence) and not isinstance(item, str | bytes)
            )
            if not pair or len(item) != 2:
                raise InvalidRequest(f"put_many item {len(puts)}: not a (key, value) pair")
            key, value = item
            value = to_bytes(value)
            puts.append((check_key(key), value))
            if len(value) + 4 * len(key) + 128 > self._max_message_bytes:  # maybe too big
                self._check_size({"op": "put", "key": key, "value": value}, len(puts) - 1)
        n = len(puts)
        revisions = [0] * n
        errors: dict[int, Exception] = {}
        done = 0
        while done < n:
            deadline = trio.current_time() + self._timeout
            try:
                seqs = await self._take_seqs(n - done, deadline)
            except Unavailable as exc:  # not sent: surely not applied
                errors.update(dict.fromkeys(range(done, n), exc))
                break
            try:
                await self._put_turn(puts, done, seqs, deadline, revisions, errors)
            finally:
                self._release_seqs(seqs)
            done += len(seqs)
        if errors:
            first = min(errors)
            err = errors[first]
            if isinstance(err, LiferaftError):
                # A copy: the same error object may have failed other calls too (a
                # connection attempt shared by several), and the note is this call's.
                err = copy.copy(err)
                err.__notes__ = list(getattr(err, "__notes__", ()))
                err.add_note(
                    f"put_many: {len(errors)} of {n} puts failed, the first of them "
                    f"#{first} (key {puts[first][0]!r}); the other {n - len(errors)} succeeded"
                )
            raise err
        return revisions

    def _check_size(self, request: dict[str, Any], index: int) -> None:
        """TooLarge if ``request`` cannot fit one message, whatever its id and seq."""
        biggest = {"id": 2**64 - 1, **request, "session": self.session, "seq": 2**63 - 1}
        size = len(encode_request(biggest))
        if size > self._max_message_bytes:
            raise TooLarge(
                f"put_many item {index}: request of {size} bytes exceeds max_message_bytes "
                f"({self._max_message_bytes})"
            )

    async def _put_turn(
        self,
        puts: list[tuple[str, bytes]],
        base: int,
        seqs: builtins.range,
        deadline: float,
        revisions: list[int],
        errors: dict[int, Exception],
    ) -> None:
        """The puts ``puts[base:base + len(seqs)]`` under ``seqs``, all in one attempt on
        one connection; then the ones to retry, again together and in order, as
        :meth:`_request` retries one request (the same verdicts on each failure, one
        back-off for all), until ``deadline``."""
        session = self.session
        requests = [
            {"op": "put", "key": key, "value": value, "session": session, "seq": seq}
            for (key, value), seq in zip(puts[base : base + len(seqs)], seqs, strict=True)
        ]
        todo = list(range(len(requests)))  # the offsets of the puts still to do, in order
        tries: dict[int, _Tries] = {}  # of the puts that failed an attempt
        failures = 0
        while True:
            now = trio.current_time()
            if now >= deadline:
                for off in todo:
                    last = tries[off].last if off in tries else None
                    errors[base + off] = last or Unavailable(f"no answer within {self._timeout:g}s")
                return
            conn: Connection | None = None
            batch = None
            failed: Exception | None = None  # what failed the attempt before any answer
            with trio.move_on_at(min(deadline, now + self._attempt_timeout)):
                try:
                    conn = self._conn
                    if conn is None or not conn.alive or conn.retired:
                        conn = None
                        conn = await self._connection()
                    batch, group = conn.submit_many(
                        requests if len(todo) == len(requests) else [requests[o] for o in todo]
                    )
                    await conn.wait_all(batch, group)
                except (ConnectionFailed, ConnectionLost, TooLarge) as exc:
                    failed = exc
            again: list[int] = []
            at_once = True  # every put to retry follows its first redirect: no back-off
            for i, off in enumerate(todo):
                p = batch[i] if batch is not None else None
                resp = p.response if p is not None else None
                try:
                    if resp is not None and resp.get("ok") is True:
                        revisions[base + off] = _uint(resp, "revision")
                        continue
                    t = tries.get(off)
                    if t is None:
                        t = tries[off] = _Tries()
                    if resp is not None:
                        assert conn is not None
                        at_once &= self._judge_error(conn, resp, _Retry.ALWAYS, t)
                    else:
                        at_once = False
                        lost = p.error if p is not None else failed
                        if isinstance(lost, ConnectionLost):
                            assert conn is not None
                            self._judge_lost(conn, lost, _Retry.ALWAYS, t)
                        elif isinstance(lost, LiferaftError):  # ConnectionFailed, TooLarge
                            if not isinstance(lost, ConnectionFailed):
                                raise lost
                            t.last = lost
                        else:
                            self._judge_silence(conn, _Retry.ALWAYS, t, deadline)
                except LiferaftError as exc:  # refused: this put is over
                    errors[base + off] = exc
                    continue
                again.append(off)
            todo = again
            if not todo:
                return
            if not at_once:
                await self._backoff(failures, deadline)
                failures += 1

    async def get(
        self, key: str, *, serializable: bool = False, revision: int = 0
    ) -> KeyValue | None:
        """The key-value of ``key``, or None. ``serializable=True`` lets any node answer
        from its own state (faster, possibly stale); the default is linearizable.
        ``revision`` reads the store as it was right after that revision (0: now);
        raises Compacted when that history is gone."""
        fields: dict[str, Any] = {"op": "get", "key": check_key(key)}
        if serializable:
            fields["serializable"] = True
        if check_revision(revision):
            fields["revision"] = revision
        kv = (await self._request(fields)).get("kv")
        return None if kv is None else kv_from_wire(kv)

    async def range(
        self,
        prefix: str,
        *,
        limit: int = 0,
        serializable: bool = False,
        after: str | None = None,
        revision: int = 0,
    ) -> tuple[list[KeyValue], bool]:
        """The keys under ``prefix`` in key order, at most ``limit`` of them (0: all), and
        whether there are more. ``prefix=""`` is every key. Page with ``after`` (the
        last key of the previous page) and, for one consistent view, ``revision``."""
        fields: dict[str, Any] = {"op": "range", "prefix": check_prefix(prefix)}
        if check_limit(limit):
            fields["limit"] = limit
        if serializable:
            fields["serializable"] = True
        if after is not None:
            fields["after"] = check_key(after, "after")
        if check_revision(revision):
            fields["revision"] = revision
        resp = await self._request(fields)
        kvs = resp.get("kvs")
        if not isinstance(kvs, list):
            raise InternalError("range response without a kvs list")
        return [kv_from_wire(kv) for kv in kvs], resp.get("more") is True

    async def delete(self, key: str | None = None, *, prefix: str | None = None) -> int:
        """Delete ``key``, or every key under ``prefix``; how many keys were deleted."""
        if (key is None) == (prefix is None):
            raise InvalidRequest("give exactly one of key and prefix")
        if key is not None:
            resp = await self._write("delete", key=check_key(key))
        else:
            resp = await self._write("delete", prefix=check_prefix(prefix))
        return _uint(resp, "deleted")

    async def txn(
        self,
        compare: Sequence[Mapping[str, Any]] = (),
        success: Sequence[Mapping[str, Any]] = (),
        failure: Sequence[Mapping[str, Any]] = (),
    ) -> TxnResult:
        """If every compare holds run ``success``, else ``failure``, atomically at one
        revision. Compares and ops are dicts as on the wire, or made with
        :func:`~liferaft.client.compare`, :func:`~liferaft.client.op_put`, ...::

            r = await client.txn([compare("lock", "version", "==", 0)],
                                 [op_put("lock", "me")], [op_get("lock")])
        """
        if isinstance(compare, str | bytes | Mapping):
            raise InvalidRequest("compare must be a list of compares")
        resp = await self._write(
            "txn",
            compare=[compare_to_wire(c) for c in compare],
            success=ops_to_wire(success, "success"),
            failure=ops_to_wire(failure, "failure"),
        )
        results = resp.get("results", [])
        if not isinstance(results, list) or type(resp.get("succeeded")) is not bool:
            raise InternalError("txn response without succeeded and results")
        return TxnResult(
            resp["succeeded"],
            [result_from_wire(r) for r in results],
            _uint(resp, "revision"),
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
        if (key is None) == (prefix is None):
            raise InvalidRequest("give exactly one of key and prefix")
        selector = {"key": check_key(key)} if key is not None else {"prefix": check_prefix(prefix)}
        if type(start_revision) is not int or start_revision < 0:
            raise InvalidRequest("start_revision must be an int >= 0")
        return Watch(self, selector, start_revision)

    # ---------------------------------------------------------------- cluster

    async def status(self) -> dict[str, Any]:
        """The answering node's view: ``node_id``, ``role``, ``term``, ``leader_id``,
        ``leader_endpoint``, ``commit_index``, ``applied_index``, ``revision``,
        ``members`` (and whatever else the server adds)."""
        resp = await self._request({"op": "status"})
        return {k: v for k, v in resp.items() if k not in ("id", "ok")}

    async def member_list(self) -> list[dict[str, Any]]:
        """The members, each ``{"id", "peer", "client", "voter"}`` (= status()["members"])."""
        return _members(await self.status())

    async def member_add(
        self, id: str, peer: str, client: str, *, learner: bool = False
    ) -> list[dict[str, Any]]:
        """Add node ``id``, dialled at ``peer`` and serving clients at ``client`` (both
        ``host:port``), as a voter, or with ``learner=True`` as a learner that catches up
        before it counts for a quorum (then :meth:`member_promote` it); the new members."""
        fields: dict[str, Any] = {"op": "member_add", "member_id": id, "peer": peer}
        fields["client"] = client
        if learner:
            fields["learner"] = True
        return _members(await self._request(fields, retry=_Retry.SAFE))

    async def member_promote(self, id: str) -> list[dict[str, Any]]:
        """Make learner ``id`` a voter; the new member list."""
        resp = await self._request({"op": "member_promote", "member_id": id}, retry=_Retry.SAFE)
        return _members(resp)

    async def member_remove(self, id: str) -> list[dict[str, Any]]:
        """Remove member ``id``; the new member list."""
        resp = await self._request({"op": "member_remove", "member_id": id}, retry=_Retry.SAFE)
        return _members(resp)

    async def transfer_leader(self, to: str | None = None) -> str:
        """Hand leadership to ``to`` (None: the most caught-up voter); the new leader id."""
        fields: dict[str, Any] = {"op": "transfer_leader"}
        if to is not None:
            fields["to"] = to
        leader = (await self._request(fields, retry=_Retry.SAFE)).get("leader_id")
        if not isinstance(leader, str):
            raise InternalError("transfer_leader response without leader_id")
        return leader

    async def compact(self, revision: int) -> int:
        """Drop the history before ``revision`` on every node (admin); the store's
        revision. Reads before it, and watches from it or before, get Compacted."""
        if not check_revision(revision):
            raise InvalidRequest("compact needs a revision >= 1")
        resp = await self._write("compact", revision=revision)
        return _uint(resp, "revision")

    async def refresh(self, token: str) -> None:
        """Replace the token: on the open connection (before the old one expires) and for
        every connection opened later."""
        if not isinstance(token, str) or not token.strip():
            raise ValueError("a token is required")
        self._token = token.strip()
        conn = self._conn
        if conn is None or not conn.alive:
            return  # the next connection presents the new token at its handshake
        try:
            p = conn.submit({"op": "refresh", "token": self._token})
            with trio.fail_after(self._attempt_timeout):
                resp = await conn.wait(p)
        except (ConnectionLost, trio.TooSlowError):
            self._lost(conn)  # a new connection will present the new token
            return
        if resp.get("ok") is not True:
            raise error_from_wire(resp.get("error"))

    # ---------------------------------------------------------------- requests, retries

    async def _write(self, op: str, **fields: Any) -> dict[str, Any]:
        """Run a write under the next seq of this client's session, retried with it
        (the seq is handed out as :meth:`_take_seqs` says). It takes at most ``timeout``
        in all, its wait for a seq included."""
        deadline = trio.current_time() + self._timeout
        if not self._seq_waiters and self._window_room() > 0:
            seqs = self._grant(1)  # (what _take_seqs does, without its await)
        else:
            seqs = await self._take_seqs(1, deadline)
        try:
            request = {"op": op, **fields, "session": self.session, "seq": seqs.start}
            return await self._request(request, deadline=deadline)
        finally:
            self._release_seqs(seqs)

    def _window_room(self) -> int:
        """How many new seqs may be handed out now (see :meth:`_take_seqs`)."""
        if not self._open_seqs:
            return self._session_window
        return self._open_seqs[0].start + self._session_window - 1 - self._seq

    async def _take_seqs(self, count: int, deadline: float) -> builtins.range:
        """The next seqs of this client's session: ``count`` of them, or fewer (at least
        one) when the window has less room; Unavailable if none is free by ``deadline``.

        The server remembers the results of the newest ``session_window`` seqs of a
        session and refuses a seq older than that, even one it never saw (it cannot tell
        a retry of a forgotten write from a new one). So a seq is handed out only while
        it is within the window of the oldest write still in flight: with more writes in
        flight than that, the newer ones wait in line (:meth:`_release_seqs` hands them
        their seqs, first come, first served), and every taker must release what it took.
        """
        if not self._seq_waiters:
            room = self._window_room()
            if room > 0:
                return self._grant(min(count, room))
        waiter = _SeqWaiter(count)
        self._seq_waiters.append(waiter)
        try:
            with trio.move_on_at(deadline):
                await waiter.granted.wait()
        except BaseException:
            if waiter.seqs is not None:
                self._release_seqs(waiter.seqs)
            else:
                self._seq_waiters.remove(waiter)
            raise
        if waiter.seqs is None:
            self._seq_waiters.remove(waiter)
            raise Unavailable(
                f"the oldest of this client's {self._session_window} newest writes is "
                f"still unanswered after {self._timeout:g}s"
            )
        return waiter.seqs

    def _grant(self, count: int) -> builtins.range:
        first = self._seq + 1
        self._seq += count
        seqs = builtins.range(first, self._seq + 1)
        self._open_seqs.append(seqs)
        return seqs

    def _release_seqs(self, seqs: builtins.range) -> None:
        """The writes of ``seqs`` (as handed out) are over: move the window, hand the
        room it makes to the writes waiting for it, in turn."""
        open_seqs = self._open_seqs
        if open_seqs[0] is not seqs:
            self._done_seqs.add(seqs)  # behind an older one: the window stays
            return
        open_seqs.popleft()
        done = self._done_seqs
        while open_seqs and open_seqs[0] in done:
            done.discard(open_seqs.popleft())
        waiters = self._seq_waiters
        while waiters and (room := self._window_room()) > 0:
            waiter = waiters.popleft()
            waiter.seqs = self._grant(min(waiter.count, room))
            waiter.granted.set()

    async def _request(
        self,
        fields: Mapping[str, Any],
        *,
        retry: _Retry = _Retry.ALWAYS,
        on_ok: OnOk | None = None,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """The success response to ``fields``, retried per ``retry`` until ``deadline``
        (default: ``timeout`` from now)."""
        if self._closed:
            raise trio.ClosedResourceError("the client is closed")
        if deadline is None:
            deadline = trio.current_time() + self._timeout
        t = _Tries()
        while True:
            now = trio.current_time()
            if now >= deadline:
                raise t.last or Unavailable(f"no answer within {self._timeout:g}s")
            conn = self._conn
            if (
                conn is not None
                and conn.alive
                and not conn.retired
                and now + self._attempt_timeout <= deadline
            ):
                # The common case, without a cancel scope: a connection is up and the
                # attempt ends before the call's deadline, so the connection's timer can
                # keep the attempt's deadline (AttemptExpired).
                try:
                    resp = await conn.wait(conn.submit(fields, on_ok=on_ok, timed=True))
                except ConnectionLost as exc:
                    self._judge_lost(conn, exc, retry, t)
                except AttemptExpired:
                    self._judge_silence(conn, retry, t, deadline)
                else:
                    if resp.get("ok") is True:
                        return resp
                    if self._judge_error(conn, resp, retry, t):
                        continue  # follow the first redirect at once
                await self._backoff(t.failures, deadline)
                t.failures += 1
                continue
            conn = None
            with trio.move_on_at(min(deadline, now + self._attempt_timeout)) as attempt:
                try:
                    conn = await self._connection()
                    resp = await conn.wait(conn.submit(fields, on_ok=on_ok))
                except ConnectionFailed as exc:  # nothing was sent
                    t.last = exc
                except ConnectionLost as exc:
                    assert conn is not None
                    self._judge_lost(conn, exc, retry, t)
                else:
                    if resp.get("ok") is True:
                        return resp
                    if self._judge_error(conn, resp, retry, t):
                        continue  # follow the first redirect at once
            if attempt.cancelled_caught:
                self._judge_silence(conn, retry, t, deadline)
            await self._backoff(t.failures, deadline)
            t.failures += 1

    # The verdicts on a failed attempt, shared by _request and put_many: each notes the
    # error in ``t.last`` and moves the client off ``conn`` as the failure calls for, or
    # raises the error when it must not be retried.

    def _judge_lost(self, conn: Connection, exc: ConnectionLost, retry: _Retry, t: _Tries) -> None:
        self._lost(conn)
        if exc.too_big:
            raise TooLarge(f"{conn.endpoint.url} refused a message as too big") from None
        t.last = ConnectionFailed(f"{conn.endpoint.url}: {exc.reason}")
        if exc.sent and retry is _Retry.SAFE:
            raise t.last from None

    def _judge_error(
        self, conn: Connection, resp: Mapping[str, Any], retry: _Retry, t: _Tries
    ) -> bool:
        """True: retry at once (the first redirect), without a back-off."""
        err = error_from_wire(resp.get("error"))
        if isinstance(err, NotLeader):
            t.last = err
            leader = _parse_or_none(err.leader_endpoint)
            if leader is not None:
                self._redirect(conn, leader)
                t.redirects += 1
                return t.redirects == 1
            self._rotate(conn)
        elif isinstance(err, Unavailable) and retry is _Retry.ALWAYS:
            t.last = err
            self._rotate(conn)
        else:
            raise err
        return False

    def _judge_silence(
        self, conn: Connection | None, retry: _Retry, t: _Tries, deadline: float
    ) -> None:
        """The attempt ran out of time (connecting, if ``conn`` is None, or waiting)."""
        if conn is not None:
            t.last = Unavailable(
                f"no answer from {conn.endpoint.url} within {self._attempt_timeout:g}s"
            )
            self._rotate(conn)
            if retry is _Retry.SAFE:
                raise t.last
        elif t.last is None or trio.current_time() < deadline:
            # (cut short by the call's deadline, the error before it says more)
            t.last = ConnectionFailed(
                f"cannot connect to an endpoint within {self._attempt_timeout:g}s"
            )

    def _backoff_delay(self, failures: int) -> float:
        cap = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(failures, 16))
        return cap / 2 + self._rng.uniform(0, cap / 2)  # "equal jitter": never ~0

    async def _backoff(self, failures: int, deadline: float) -> None:
        await trio.sleep_until(min(deadline, trio.current_time() + self._backoff_delay(failures)))

    # ---------------------------------------------------------------- endpoints

    async def _connection(self) -> Connection:
        """The current connection, or a new one to the next endpoint. Concurrent callers
        share one attempt; a failed attempt raises its typed error in each of them."""
        while True:
            if self._nursery is None:
                raise RuntimeError("the client is not started: use Client.connect or open_client")
            if self._closed:
                raise trio.ClosedResourceError("the client is closed")
            conn = self._conn
            if conn is not None and conn.alive and not conn.retired:
                return conn
            pending = self._connecting
            if pending is not None:
                await pending.done.wait()
                if pending.error is not None:
                    raise pending.error
                continue
            pending = self._connecting = _Attempt()
            endpoint = self._override or self._endpoints[self._index % len(self._endpoints)]
            self._override = None
            conn = Connection(
                endpoint,
                ssl_context=self._ssl_context,
                token=self._token,
                ids=self._ids,
                max_batch=self._max_batch,
                max_message_bytes=self._max_message_bytes,
                connect_timeout=self._attempt_timeout,
                attempt_timeout=self._attempt_timeout,
            )
            try:
                await self._nursery.start(conn.run)
            except Exception as exc:
                self._index += 1
                pending.error = _connect_error(endpoint, exc)
                raise pending.error from None
            except BaseException:
                # Cancelled: the attempt ran out of time (a paused node accepts TCP but
                # never finishes TLS). Try the next endpoint next time, not this one.
                self._index += 1
                raise
            finally:
                self._connecting = None
                pending.done.set()
            self._conns = [c for c in self._conns if not c.finished.is_set()]
            self._conns.append(conn)
            self._conn = conn
            return conn

    def _lost(self, conn: Connection) -> None:
        """``conn`` broke: the next request connects to the next endpoint."""
        if self._conn is conn:
            self._conn = None
            self._index += 1

    def _rotate(self, conn: Connection) -> None:
        """``conn``'s node cannot serve us now: move on, let its in-flight requests end."""
        if self._conn is conn:
            self._conn = None
            self._index += 1
            conn.retire()

    def _redirect(self, conn: Connection, leader: Endpoint) -> None:
        if self._conn is conn:
            self._conn = None
            self._override = leader
            conn.retire()


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
    )
    try:
        yield client
    finally:
        await client.aclose()


# ---------------------------------------------------------------- helpers


class _Tries:
    """How the attempts of one request went so far (see Client._request)."""

    __slots__ = ("failures", "last", "redirects")

    def __init__(self) -> None:
        self.failures = 0  # attempts followed by a back-off
        self.redirects = 0  # not_leader answers with a leader_endpoint
        self.last: LiferaftError | None = None  # the error to raise at the deadline


class _SeqWaiter:
    """A write waiting for room in the session window (Client._take_seqs)."""

    __slots__ = ("count", "granted", "seqs")

    def __init__(self, count: int) -> None:
        self.count = count  # how many seqs it wants (it takes fewer if that is the room)
        self.seqs: builtins.range | None = None  # what it was handed
        self.granted = trio.Event()


class _Attempt:
    """A connection attempt in progress, which concurrent callers wait on."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: LiferaftError | None = None


def _connect_error(endpoint: Endpoint, exc: BaseException) -> LiferaftError:
    """The typed error for a failed connection attempt."""
    rejected = find(exc, trio_websocket.ConnectionRejected)
    if isinstance(rejected, trio_websocket.ConnectionRejected):
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


def _parse_or_none(url: str | None) -> Endpoint | None:
    if not url:
        return None
    try:
        return parse_endpoint(url)
    except ValueError:
        return None


def _uint(resp: Mapping[str, Any], name: str) -> int:
    value = resp.get(name)
    if type(value) is not int or value < 0:
        raise InternalError(f"response without an integer {name}")
    return value


def _members(resp: Mapping[str, Any]) -> list[dict[str, Any]]:
    members = resp.get("members")
    if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
        raise InternalError("response without a members list")
    return [dict(m) for m in members]
