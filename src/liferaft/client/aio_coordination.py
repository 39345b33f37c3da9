"""Locks and elections on asyncio: :class:`Lock`, :class:`Election` and
:class:`LeaderWatch` over :class:`~liferaft.client.aio.AsyncioClient`, with the API and
guarantees of the Trio ones (liferaft.client.coordination, docs/coordination.md)::

    from liferaft.client.aio import Lock, open_client

    async with open_client(endpoints, token=jwt, cacert="certs/ca.pem") as client:
        async with Lock(client, "jobs/nightly", ttl=10) as lock:
            await storage.write(data, fencing_token=lock.token)

The recipe is etcd's and is decided, without I/O, by liferaft.client.recipe, the same
module the Trio flavour uses: a key per contender under the prefix with the contender's
lease, created only if absent; the lowest create_revision holds; a waiter watches only
its predecessor, for a delete; the lock key's create_revision is the fencing token.
What is here is the waiting, asyncio's way: the lease is kept alive by
:meth:`AsyncioClient.keep_alive` in a background task, and when it is lost the task
that waits for the lock, or runs the holder's block, is cancelled and the cancellation
turned into :class:`LockLost` (or ``LeaseLost``), as the asyncio ``keep_alive`` block is.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import TYPE_CHECKING

from liferaft.client.contender import ContenderOps, ElectionOps, LockOps
from liferaft.client.errors import Compacted, LeaseLost, LiferaftError
from liferaft.client.models import KeyValue, Lease, to_bytes
from liferaft.client.recipe import (
    DEFAULT_TTL,
    ELECTION_PREFIX,
    LOCK_PREFIX,
    LeaderView,
    LockLost,
    NotElected,
    contender_prefix,
    predecessor,
)

if TYPE_CHECKING:
    from liferaft.client.aio import AsyncioClient, AsyncioKeepAlive

__all__ = ["Election", "LeaderWatch", "Lock", "LockLost", "NotElected"]


class _Guard:
    """A block of one task that is cancelled when the contender's lease is lost, and
    that then raises LeaseLost; also when the lease was lost before the block ended
    even if it ended before it noticed (its work may have overlapped another holder's).
    Guards nest (the election's block, a campaign inside it): the innermost one is
    cancelled; the LeaseLost it raises goes out through the others."""

    def __init__(self, contender: _Contender) -> None:
        self._contender = contender
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a Lock or Election must be used from an asyncio task")
        self._task = task
        self._cancelled = False

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._task.cancel()

    def enter(self) -> None:
        self._contender._guards.append(self)
        if self._contender._error() is not None:
            self.cancel()

    async def __aenter__(self) -> None:
        self.enter()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        await self.exit(exc_type)
        return False

    async def exit(self, exc_type: type[BaseException] | None) -> None:
        """Leave the block; raise LeaseLost (or CancelledError, if the task was also
        cancelled by someone else) as the loss of the lease says."""
        guards = self._contender._guards
        if self in guards:
            guards.remove(self)
        outer_cancel = False
        if self._cancelled:
            if exc_type is not asyncio.CancelledError:
                # Our cancellation has not been delivered yet (the block ended first):
                # take it here, or it would hit the caller's next await.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0)
            outer_cancel = self._task.uncancel() > 0
        error = self._contender._error()
        if error is None:
            return
        if outer_cancel and exc_type in (None, asyncio.CancelledError):
            raise asyncio.CancelledError
        if exc_type is None or (exc_type is asyncio.CancelledError and self._cancelled):
            raise LeaseLost(error.message, lease=error.lease) from None


class _Contender(ContenderOps):
    """The recipe shared by Lock and Election: a key with our lease, and the wait for
    every key created before it to go."""

    _client: AsyncioClient

    def __init__(self, client: AsyncioClient, name: str, *, ttl: int, prefix: str) -> None:
        self.prefix = contender_prefix(prefix, name)
        self._client = client
        self.name = name
        self.ttl = ttl
        self.lease: Lease | None = None
        self.key: str | None = None
        self.create_revision = 0  # of our key, once created
        self.keeper: AsyncioKeepAlive | None = None
        self.watches = 0  # watches opened while waiting (one per predecessor)
        self.watching: str | None = None  # the predecessor's key, while waiting
        self._guards: list[_Guard] = []
        self._body: _Guard | None = None
        self._lost_error: LeaseLost | None = None

    @property
    def lost(self) -> asyncio.Event:
        """Set when the lease behind our key is lost (so is the lock or leadership)."""
        if self.keeper is None:
            raise RuntimeError("not contending yet")
        return self.keeper.lost

    def _error(self) -> LeaseLost | None:
        return self._lost_error

    def _on_lost(self, keeper: AsyncioKeepAlive, error: LeaseLost) -> None:
        if keeper is not self.keeper:
            return  # a late word from the keeper of an earlier lease
        if self._lost_error is None:
            self._lost_error = error
        if self._guards:
            self._guards[-1].cancel()

    async def _start_lease(self) -> None:
        if self.lease is not None:
            return
        client = self._client
        granted_at = asyncio.get_running_loop().time()  # before the grant: errs early
        self.lease = await client.lease_grant(self.ttl)
        self._lost_error = None
        keeper = self.keeper = client.keep_alive(cancel_on_loss=False)
        keeper.add(self.lease, renewed_at=granted_at)
        keeper.on_lost(lambda error: self._on_lost(keeper, error))
        await keeper.start()

    async def _wait_turn(self, kvs: list[KeyValue], revision: int) -> None:
        """Return once no key under the prefix was created before ours."""
        while True:
            lease = self.lease.id if self.lease is not None else None
            pred = predecessor(kvs, self.prefix, self.key, self.create_revision, lease)
            if pred is None:
                return
            self.watches += 1
            self.watching = pred.key
            try:
                async with self._client.watch(pred.key, start_revision=revision + 1) as events:
                    async for ev in events:
                        if ev.type == "delete":
                            break
            except Compacted:
                pass  # look again from now
            finally:
                self.watching = None
            kvs, revision = await self._client._range_at(self.prefix)

    async def _contend(self, value: bytes) -> None:
        """Grant the lease, create the key and wait for our turn, cancelled (with
        LeaseLost) if the lease is lost meanwhile; on any failure, leave."""
        try:
            await self._start_lease()
            async with _Guard(self):
                created, kvs, revision = await self._create(value)
                if not created:
                    await self._proclaim_own(value)
                await self._wait_turn(kvs, revision)
        except BaseException:
            await self._leave()
            raise

    async def _leave(self) -> None:
        """Stop renewing and revoke the lease (which deletes our key), bounded and
        shielded from cancellation (a cancelled caller leaves the revoke running in the
        client's background); a failure leaves the lease to expire by its TTL."""
        keeper, lease = self.keeper, self.lease
        self.keeper = None
        self.lease = None
        if keeper is not None:
            keeper.stop()
        try:
            if lease is not None:
                await asyncio.shield(self._client._spawn(self._revoke(lease.id)))
        finally:
            self.key = None
            self.create_revision = 0

    async def _revoke(self, lease_id: int) -> None:
        # gone already, or the cluster cannot say, or the client closed: the TTL frees it
        with contextlib.suppress(LiferaftError, RuntimeError, TimeoutError):
            async with asyncio.timeout(self._client.timeout):
                await self._client.lease_revoke(lease_id)

    def _enter_guard(self) -> None:
        self._body = _Guard(self)
        self._body.enter()

    async def _exit_guard(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        body, self._body = self._body, None
        if body is not None:
            await body.exit(exc_type)
        return False


class Lock(LockOps, _Contender):
    """A cluster-wide lock that frees itself when its holder dies (the Trio
    :class:`liferaft.client.Lock` on asyncio)::

        async with Lock(client, "jobs/nightly", ttl=10) as lock:
            await storage.write(data, fencing_token=lock.token)

    Entering waits for the lock (cancel it to give up: ``asyncio.timeout``); leaving
    releases it. The block is cancelled, and :class:`LockLost` raised, if the lock's
    lease is lost while it runs (it may then already be someone else's). ``token`` is
    the fencing token: higher for every later holder. The key is
    ``_liferaft/lock/<name>/<lease hex>`` (``prefix`` changes the first part).
    """

    def __init__(
        self,
        client: AsyncioClient,
        name: str,
        *,
        ttl: int = DEFAULT_TTL,
        prefix: str = LOCK_PREFIX,
        value: bytes | str = b"",
    ) -> None:
        super().__init__(client, name, ttl=ttl, prefix=prefix)
        self._value = to_bytes(value)
        self.held = False


class Election(ElectionOps, _Contender):
    """A leader election among the replicas of a service (the Trio
    :class:`liferaft.client.Election` on asyncio)::

        election = Election(client, "billing", ttl=10)
        async with election:                     # leaving resigns
            await election.campaign(b"10.0.0.5:80")   # waits until elected
            await serve_as_leader()              # cancelled if leadership is lost

    Observers follow the leader without campaigning::

        async with election.observe() as leaders:
            async for kv in leaders:
                print("leader:", kv.value)
    """

    def __init__(
        self,
        client: AsyncioClient,
        name: str,
        *,
        ttl: int = DEFAULT_TTL,
        prefix: str = ELECTION_PREFIX,
    ) -> None:
        super().__init__(client, name, ttl=ttl, prefix=prefix)
        self.leading = False

    def observe(self) -> LeaderWatch:
        """The leader now (if any) and each new leader or value after it; see
        :class:`LeaderWatch`."""
        return LeaderWatch(self._client, self.prefix)


class LeaderWatch:
    """An async iterator of the leaders of one election, as :class:`KeyValue`: the one
    at the start (if any), then each change of leader or of its value, in the order the
    cluster made them, judged by liferaft.client.recipe.LeaderView (never two at once).
    A context manager that stops watching on exit."""

    def __init__(self, client: AsyncioClient, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._gen: AsyncGenerator[KeyValue, None] | None = None

    async def __aenter__(self) -> LeaderWatch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> LeaderWatch:
        return self

    async def __anext__(self) -> KeyValue:
        if self._gen is None:
            self._gen = self._leaders()
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        gen, self._gen = self._gen, None
        if gen is not None:
            await gen.aclose()

    async def _leaders(self) -> AsyncGenerator[KeyValue, None]:
        pfx = self._prefix
        view = LeaderView(pfx)
        view.reset(*await self._client._range_at(pfx))
        while True:
            now = view.leader()
            if now is not None:
                yield now
            try:
                async with self._client.watch(
                    prefix=pfx, start_revision=view.revision + 1
                ) as events:
                    async for ev in events:
                        now = view.event(ev, events.peek())
                        if now is not None:
                            yield now
                return  # the watch ended (closed)
            except Compacted:
                view.reset(*await self._client._range_at(pfx))
