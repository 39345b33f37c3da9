"""Locks and elections on leases, with only the public protocol (docs/coordination.md).

Both follow etcd's recipe. A contender grants itself a lease and puts the key
``<prefix><name>/<lease id in hex>`` with that lease, in a txn that creates it only if
absent. Contenders are ordered by their key's ``create_revision``: the lowest holds the
lock (or leads). A waiter watches only the key just before its own (its predecessor),
for a delete, then looks again: one release wakes one waiter, not all of them. The
holder's ``create_revision`` is its **fencing token**: every later holder's is higher,
so a resource that remembers the highest token it saw can refuse a holder that lost the
lock without knowing it (paused past its TTL, say).

If the holder dies, its lease expires and its key goes with it; the next waiter takes
over within the TTL (plus an election timeout if the cluster's leader changes too).

This is the Trio flavour; what the recipe decides without I/O (the keys, the txns,
holder and predecessor, what an observer shows) is liferaft.client.recipe, shared with
the asyncio flavour (liferaft.client.aio_coordination).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING

import trio

from liferaft.client.contender import ContenderOps, ElectionOps, LockOps
from liferaft.client.errors import (
    Compacted,
    LiferaftError,
)
from liferaft.client.leases import KeepAlive
from liferaft.client.models import (
    KeyValue,
    Lease,
    to_bytes,
)
from liferaft.client.recipe import (
    DEFAULT_TTL,
    ELECTION_PREFIX,
    LOCK_PREFIX,
    LeaderView,
    LockLost,
    NotElected,
    contender_prefix,
    first_created,
    predecessor,
)

if TYPE_CHECKING:
    from liferaft.client.client import Client

__all__ = [
    "DEFAULT_TTL",
    "ELECTION_PREFIX",
    "LOCK_PREFIX",
    "Election",
    "LeaderWatch",
    "Lock",
    "LockLost",
    "NotElected",
    "first_created",
]


class _Contender(ContenderOps):
    """The recipe shared by Lock and Election: a key with our lease, and the wait for
    every key created before it to go."""

    _client: Client

    def __init__(self, client: Client, name: str, *, ttl: int, prefix: str) -> None:
        self.prefix = contender_prefix(prefix, name)
        self._client = client
        self.name = name
        self.ttl = ttl
        self.lease: Lease | None = None
        self.key: str | None = None
        self.create_revision = 0  # of our key, once created
        self.keeper: KeepAlive | None = None
        self.watches = 0  # watches opened while waiting (one per predecessor)
        self.watching: str | None = None  # the predecessor's key, while waiting
        self._body: AbstractContextManager[None] | None = None

    @property
    def lost(self) -> trio.Event:
        """Set when the lease behind our key is lost (so is the lock or leadership)."""
        if self.keeper is None:
            raise RuntimeError("not contending yet")
        return self.keeper.lost

    async def _start_lease(self) -> None:
        if self.lease is not None:
            return
        client = self._client
        granted_at = trio.current_time()  # before the grant: the deadline errs early
        self.lease = await client.lease_grant(self.ttl)
        self.keeper = KeepAlive(client, cancel_on_loss=False)
        self.keeper.add(self.lease, renewed_at=granted_at)
        await self.keeper.start()

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
            assert self.keeper is not None
            with self.keeper.guard():
                created, kvs, revision = await self._create(value)
                if not created:
                    await self._proclaim_own(value)
                await self._wait_turn(kvs, revision)
        except BaseException:
            if self._body is not None:
                # Inside the contender's block (a campaign given up in an election's
                # block): keep the lease the block's guard watches, drop only our key;
                # a later campaign reuses the lease. The block's end releases it.
                await self._drop_key()
            else:
                await self._leave()
            raise

    async def _drop_key(self) -> None:
        key = self.key
        self.key = None
        self.create_revision = 0
        if key is not None:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(self._client._retrier.timeout),
                contextlib.suppress(LiferaftError, trio.ClosedResourceError),
            ):
                await self._client.delete(key)

    async def _leave(self) -> None:
        """Stop renewing and revoke the lease (which deletes our key), bounded and
        shielded; a failure leaves the lease to expire by its TTL."""
        keeper, lease = self.keeper, self.lease
        self.keeper = None
        self.lease = None
        if keeper is not None:
            keeper.stop()
        if lease is not None:
            # gone already, or the cluster cannot say: then the TTL frees it
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(self._client._retrier.timeout),
                contextlib.suppress(LiferaftError, trio.ClosedResourceError),
            ):
                await self._client.lease_revoke(lease.id)
        self.key = None
        self.create_revision = 0

    def _enter_guard(self) -> None:
        assert self.keeper is not None
        self._body = self.keeper.guard()
        self._body.__enter__()

    async def _exit_guard(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        body, self._body = self._body, None
        return bool(body.__exit__(exc_type, exc, tb)) if body is not None else False


class Lock(LockOps, _Contender):
    """A cluster-wide lock that frees itself when its holder dies::

        async with Lock(client, "jobs/nightly", ttl=10) as lock:
            await storage.write(data, fencing_token=lock.token)

    Entering waits for the lock (cancel it to give up: ``trio.move_on_after``); leaving
    releases it. The block is cancelled, and :class:`LockLost` raised, if the lock's
    lease is lost while it runs (it may then already be someone else's). ``token`` is
    the fencing token: higher for every later holder. The key is
    ``_liferaft/lock/<name>/<lease hex>`` (``prefix`` changes the first part).
    """

    def __init__(
        self,
        client: Client,
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
    """A leader election among the replicas of a service::

        election = Election(client, "billing", ttl=10)
        async with election:                     # leaving resigns
            await election.campaign(b"10.0.0.5:80")   # waits until elected
            await serve_as_leader()              # cancelled if leadership is lost

    Observers follow the leader without campaigning::

        async with election.observe() as leaders:
            async for kv in leaders:
                print("leader:", kv.value)

    The leader is the contender whose key ``_liferaft/elect/<name>/<lease hex>`` has the
    lowest create_revision; its value is what it campaigned with or last proclaimed.
    """

    def __init__(
        self,
        client: Client,
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
    cluster made them. Between two it yields nothing when nobody leads. A context
    manager that stops watching on exit."""

    def __init__(self, client: Client, prefix: str) -> None:
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
