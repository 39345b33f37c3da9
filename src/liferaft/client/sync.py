"""A blocking wrapper around :class:`~liferaft.client.Client` for scripts and REPLs.

It runs a Trio event loop in a background thread that owns one connected Client; each
method hands the call to that loop with ``trio.from_thread.run`` and blocks until the
result (or the typed error) comes back::

    from liferaft.client import SyncClient

    with SyncClient(["wss://127.0.0.1:8001"], token=jwt, cacert="certs/ca.pem") as c:
        c.put("greeting", "hello")
        print(c.get("greeting").value)          # b'hello'
        with c.watch(prefix="jobs/") as events:
            for ev in events:                   # blocks until the next event
                print(ev.type, ev.kv.key)

Calls from several threads at once are fine: they run concurrently on the one loop and
are batched like concurrent tasks would be. Do not call it from inside a Trio run (use
the async Client there).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import trio

from liferaft.client.api import Member, Status
from liferaft.client.client import DEFAULT_MAX_MESSAGE_BYTES, Client
from liferaft.client.coordination import (
    DEFAULT_TTL,
    ELECTION_PREFIX,
    LOCK_PREFIX,
    Election,
    Lock,
    LockLost,
)
from liferaft.client.errors import LeaseLost
from liferaft.client.leases import KeepAlive
from liferaft.client.models import KeyValue, Lease, LeaseTTL, TxnResult, WatchEvent
from liferaft.client.watch import Watch
from liferaft.client.wire import MAX_BATCH

T = TypeVar("T")


class SyncClient:
    """The blocking twin of :class:`Client`: same methods, same errors. It connects in
    the constructor and must be closed (``close()`` or ``with``)."""

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        token: str,
        cacert: Path | str | None = None,
        timeout: float = 5.0,
        max_batch: int = MAX_BATCH,
        attempt_timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        reads: str = "leader",
    ) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._client: Client | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._closed = False

        async def main() -> None:
            try:
                client = await Client.connect(
                    endpoints,
                    token=token,
                    cacert=cacert,
                    timeout=timeout,
                    max_batch=max_batch,
                    attempt_timeout=attempt_timeout,
                    max_message_bytes=max_message_bytes,
                    reads=reads,
                )
            except BaseException as exc:  # handed to the constructor's thread
                self._error = exc
                self._ready.set()
                return
            self._client = client
            self._trio_token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await client.aclose()

        self._thread = threading.Thread(
            target=trio.run, args=(main,), name="liferaft-sync-client", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            error, self._error = self._error, None
            raise error

    def _run(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        if self._closed or self._trio_token is None:
            raise RuntimeError("the SyncClient is closed")

        async def call() -> T:
            return await fn(*args, **kwargs)

        return trio.from_thread.run(call, trio_token=self._trio_token)

    @property
    def client(self) -> Client:
        """The async Client underneath (for use on its own loop only)."""
        assert self._client is not None
        return self._client

    def close(self) -> None:
        """Close the connection and stop the background loop; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._trio_token is not None and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._trio_token)
        self._thread.join()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- the methods

    def put(self, key: str, value: bytes | str, *, lease: int | None = None) -> int:
        """See :meth:`Client.put`."""
        return self._run(self.client.put, key, value, lease=lease)

    def put_many(self, items: Sequence[tuple[str, bytes | str]]) -> list[int]:
        """See :meth:`Client.put_many`."""
        return self._run(self.client.put_many, items)

    def get(self, key: str, *, serializable: bool = False, revision: int = 0) -> KeyValue | None:
        """See :meth:`Client.get`."""
        return self._run(self.client.get, key, serializable=serializable, revision=revision)

    def range(
        self,
        prefix: str,
        *,
        limit: int = 0,
        serializable: bool = False,
        after: str | None = None,
        revision: int = 0,
    ) -> tuple[list[KeyValue], bool]:
        """See :meth:`Client.range`."""
        return self._run(
            self.client.range,
            prefix,
            limit=limit,
            serializable=serializable,
            after=after,
            revision=revision,
        )

    def compact(self, revision: int) -> int:
        """See :meth:`Client.compact`."""
        return self._run(self.client.compact, revision)

    def delete(self, key: str | None = None, *, prefix: str | None = None) -> int:
        """See :meth:`Client.delete`."""
        return self._run(self.client.delete, key, prefix=prefix)

    def txn(
        self,
        compare: Sequence[Mapping[str, Any]] = (),
        success: Sequence[Mapping[str, Any]] = (),
        failure: Sequence[Mapping[str, Any]] = (),
    ) -> TxnResult:
        """See :meth:`Client.txn`."""
        return self._run(self.client.txn, compare, success, failure)

    def watch(
        self, key: str | None = None, *, prefix: str | None = None, start_revision: int = 0
    ) -> SyncWatch:
        """See :meth:`Client.watch`; iterate it in a ``with`` block."""
        w = self.client.watch(key, prefix=prefix, start_revision=start_revision)
        return SyncWatch(self, w)

    def status(self) -> Status:
        """See :meth:`Client.status`."""
        return self._run(self.client.status)

    def member_list(self) -> list[Member]:
        """See :meth:`Client.member_list`."""
        return self._run(self.client.member_list)

    def member_add(self, id: str, peer: str, client: str) -> list[Member]:
        """See :meth:`Client.member_add`."""
        return self._run(self.client.member_add, id, peer, client)

    def member_promote(self, id: str) -> list[Member]:
        """See :meth:`Client.member_promote`."""
        return self._run(self.client.member_promote, id)

    def member_remove(self, id: str) -> list[Member]:
        """See :meth:`Client.member_remove`."""
        return self._run(self.client.member_remove, id)

    def transfer_leader(self, to: str | None = None) -> str:
        """See :meth:`Client.transfer_leader`."""
        return self._run(self.client.transfer_leader, to)

    def refresh(self, token: str) -> None:
        """See :meth:`Client.refresh`."""
        self._run(self.client.refresh, token)

    # ---------------------------------------------------------------- leases, locks

    def lease_grant(self, ttl: int, *, lease: int | None = None) -> Lease:
        """See :meth:`Client.lease_grant`."""
        return self._run(self.client.lease_grant, ttl, lease=lease)

    def lease_keepalive_once(self, lease: int) -> int:
        """See :meth:`Client.lease_keepalive_once`."""
        return self._run(self.client.lease_keepalive_once, lease)

    def lease_revoke(self, lease: int) -> int:
        """See :meth:`Client.lease_revoke`."""
        return self._run(self.client.lease_revoke, lease)

    def lease_ttl(self, lease: int, *, keys: bool = False) -> LeaseTTL:
        """See :meth:`Client.lease_ttl`."""
        return self._run(self.client.lease_ttl, lease, keys=keys)

    def lease_list(self) -> list[int]:
        """See :meth:`Client.lease_list`."""
        return self._run(self.client.lease_list)

    def keep_alive(self, *leases: Lease | int, fraction: float = 1 / 3) -> SyncKeepAlive:
        """Keep ``leases`` alive while a ``with`` block runs (see :meth:`Client.keep_alive`).
        A thread cannot be cancelled: check ``lost`` (a ``threading.Event``); leaving
        the block raises LeaseLost if a lease was lost meanwhile."""
        keeper = self._run(_call_soon, KeepAlive, self.client, leases, fraction=fraction)
        return SyncKeepAlive(self, keeper)

    def lock(
        self,
        name: str,
        *,
        ttl: int = DEFAULT_TTL,
        prefix: str = LOCK_PREFIX,
        value: bytes | str = b"",
    ) -> SyncLock:
        """A cluster-wide lock (see :class:`Lock`) for ``with``::

            with c.lock("jobs/nightly", ttl=10) as lock:
                write(data, fencing_token=lock.token)

        Entering blocks until the lock is held. A thread cannot be cancelled when the
        lock's lease is lost: ``lock.lost`` (a ``threading.Event``) is set, and leaving
        the block raises LockLost, since the work it did may have overlapped another
        holder's (hence the fencing token)."""
        return SyncLock(self, Lock(self.client, name, ttl=ttl, prefix=prefix, value=value))

    def election(
        self, name: str, *, ttl: int = DEFAULT_TTL, prefix: str = ELECTION_PREFIX
    ) -> SyncElection:
        """An election (see :class:`Election`): ``campaign``, ``proclaim``, ``resign``,
        ``leader``, ``observe``; as a ``with`` block it resigns on exit."""
        return SyncElection(self, Election(self.client, name, ttl=ttl, prefix=prefix))


class _LossFlag:
    """A ``threading.Event`` set from the Trio thread when a lease is lost."""

    def __init__(self) -> None:
        self.lost = threading.Event()
        self.error: LeaseLost | None = None

    def __call__(self, error: LeaseLost) -> None:
        if self.error is None:
            self.error = error
        self.lost.set()


class SyncKeepAlive:
    """Leases kept alive by the background loop while a ``with`` block runs."""

    def __init__(self, owner: SyncClient, keeper: KeepAlive) -> None:
        self._owner = owner
        self.keeper = keeper
        self._flag = _LossFlag()
        owner._run(_call_soon, keeper.on_lost, self._flag)

    @property
    def lost(self) -> threading.Event:
        """Set when a lease is lost."""
        return self._flag.lost

    @property
    def error(self) -> LeaseLost | None:
        return self._flag.error

    def __enter__(self) -> SyncKeepAlive:
        self._owner._run(self.keeper.start)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._owner._run(_call_soon, self.keeper.stop)
        if exc is None and self._flag.error is not None:
            raise LeaseLost(self._flag.error.message, **self._flag.error.details)


class SyncLock:
    """A held lock in a ``with`` block (from :meth:`SyncClient.lock`)."""

    def __init__(self, owner: SyncClient, lock: Lock) -> None:
        self._owner = owner
        self.lock = lock
        self._flag = _LossFlag()

    @property
    def token(self) -> int:
        """The fencing token (see :attr:`Lock.token`)."""
        return self.lock.token

    @property
    def key(self) -> str | None:
        return self.lock.key

    @property
    def lost(self) -> threading.Event:
        """Set when the lock's lease is lost: the lock may be someone else's now."""
        return self._flag.lost

    def acquire(self) -> int:
        """Block until the lock is held; the fencing token."""
        token = self._owner._run(self.lock.acquire)
        assert self.lock.keeper is not None
        self._owner._run(_call_soon, self.lock.keeper.on_lost, self._flag)
        return token

    def release(self) -> None:
        """Release the lock."""
        self._owner._run(self.lock.release)

    def __enter__(self) -> SyncLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
        if exc is None and self._flag.error is not None:
            raise LockLost(f"lock {self.lock.name!r}: {self._flag.error.message}")


class SyncElection:
    """An election for threads (from :meth:`SyncClient.election`)."""

    def __init__(self, owner: SyncClient, election: Election) -> None:
        self._owner = owner
        self.election = election
        self._flag = _LossFlag()

    @property
    def lost(self) -> threading.Event:
        """Set when the lease behind our candidacy or leadership is lost."""
        return self._flag.lost

    @property
    def leading(self) -> bool:
        return self.election.leading

    def campaign(self, value: bytes | str) -> None:
        """Block until elected (see :meth:`Election.campaign`)."""
        self._owner._run(self.election.campaign, value)
        assert self.election.keeper is not None
        self._owner._run(_call_soon, self.election.keeper.on_lost, self._flag)

    def proclaim(self, value: bytes | str) -> None:
        """See :meth:`Election.proclaim`."""
        self._owner._run(self.election.proclaim, value)

    def resign(self) -> None:
        """See :meth:`Election.resign`."""
        self._owner._run(self.election.resign)

    def leader(self) -> KeyValue | None:
        """See :meth:`Election.leader`."""
        return self._owner._run(self.election.leader)

    def observe(self) -> Iterator[KeyValue]:
        """The leaders as they change (see :meth:`Election.observe`); blocks between."""
        watch = self.election.observe()
        try:
            while True:
                try:
                    yield self._owner._run(watch.__anext__)
                except StopAsyncIteration:
                    return
        finally:
            if not self._owner._closed:
                self._owner._run(watch.aclose)

    def __enter__(self) -> SyncElection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.resign()


async def _call_soon(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a plain function on the client's loop (the objects it touches live there)."""
    return fn(*args, **kwargs)


class SyncWatch:
    """A blocking iterator of :class:`WatchEvent`; a context manager that unwatches."""

    def __init__(self, owner: SyncClient, watch: Watch) -> None:
        self._owner = owner
        self._watch = watch

    def __enter__(self) -> SyncWatch:
        self._owner._run(self._watch.__aenter__)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[WatchEvent]:
        return self

    def __next__(self) -> WatchEvent:
        try:
            return self._owner._run(self._watch.__anext__)
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        """Stop watching."""
        if not self._owner._closed:
            self._owner._run(self._watch.aclose)
