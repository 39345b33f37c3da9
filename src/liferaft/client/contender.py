"""What a Lock and an Election do, written once for the Trio and the asyncio client
(docs/coordination.md). Each flavour's ``_Contender`` supplies what differs: how the
lease is kept alive, how a waiter waits, and how the block is guarded (cancelled when
the lease is lost); the requests and the rules are here and in ``client.recipe``."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Self

from liferaft.client.errors import LeaseLost
from liferaft.client.models import KeyValue, Lease, to_bytes
from liferaft.client.recipe import (
    LockLost,
    NotElected,
    contender_key,
    create_txn,
    created,
    first_created,
    not_ours,
    proclaim_txn,
)

if TYPE_CHECKING:
    from liferaft.client.api import ClientAPI


class ContenderOps:
    """A contender's key: created under the prefix with its lease, its value changed."""

    _client: ClientAPI
    name: str
    prefix: str
    key: str | None
    lease: Lease | None
    create_revision: int

    if TYPE_CHECKING:  # supplied by each flavour's _Contender

        async def _start_lease(self) -> None: ...
        async def _contend(self, value: bytes) -> None: ...
        async def _leave(self) -> None: ...
        def _enter_guard(self) -> None: ...
        async def _exit_guard(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> bool: ...

    async def _create(self, value: bytes) -> tuple[bool, list[KeyValue], int]:
        """Create our key if absent: (whether we created it, the contenders, the
        revision they were read at)."""
        assert self.lease is not None
        key = self.key = contender_key(self.prefix, self.lease.id)
        c = created(
            key, await self._client.txn(*create_txn(self.prefix, key, value, self.lease.id))
        )
        self.create_revision = c.create_revision
        return c.created, c.kvs, c.revision

    async def _proclaim_own(self, value: bytes) -> None:
        """Set our key's value, if the key is still the one we created."""
        assert self.key is not None and self.lease is not None
        r = await self._client.txn(
            *proclaim_txn(self.key, value, self.lease.id, self.create_revision)
        )
        if not r.succeeded:
            raise not_ours(self.key)


class LockOps(ContenderOps):
    held: bool
    _value: bytes

    @property
    def token(self) -> int:
        """The fencing token: the create_revision of our key (held locks only)."""
        if not self.held:
            raise RuntimeError("the lock is not held")
        return self.create_revision

    async def acquire(self) -> int:
        """Wait until the lock is ours; its fencing token. Raises LockLost if its lease
        is lost while waiting. Without ``async with`` nothing cancels the caller when
        the lease is lost later: watch ``lost``."""
        if self.held or self.lease is not None:
            raise RuntimeError("this Lock is held or being acquired already")
        try:
            await self._contend(self._value)
        except LeaseLost as exc:
            raise LockLost(f"lock {self.name!r}: {exc.message}", **exc.details) from None
        self.held = True
        return self.create_revision

    async def release(self) -> None:
        """Release the lock (revoke its lease, which deletes its key)."""
        self.held = False
        await self._leave()

    async def __aenter__(self) -> Self:
        await self.acquire()
        self._enter_guard()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            return await self._exit_guard(exc_type, exc, tb)
        except LeaseLost as lost:
            raise LockLost(f"lock {self.name!r}: {lost.message}", **lost.details) from None
        finally:
            await self.release()


class ElectionOps(ContenderOps):
    leading: bool

    async def campaign(self, value: bytes | str) -> None:
        """Stand with ``value``; return once elected. Raises LeaseLost if the lease is
        lost while waiting. Cancel it to stop standing (then call :meth:`resign`)."""
        if self.leading:
            raise RuntimeError("already leading: proclaim a new value instead")
        await self._contend(to_bytes(value))
        self.leading = True

    async def proclaim(self, value: bytes | str) -> None:
        """Change the leader's value (observers see it); NotElected unless leading."""
        if not self.leading or self.key is None:
            raise NotElected(f"not the leader of {self.name!r}")
        await self._proclaim_own(to_bytes(value))

    async def resign(self) -> None:
        """Stop leading (or standing): the next contender takes over at once."""
        self.leading = False
        await self._leave()

    async def leader(self) -> KeyValue | None:
        """The current leader's key and value; None when nobody leads."""
        kvs, _ = await self._client._range_at(self.prefix)
        return first_created(kvs, self.prefix)

    async def __aenter__(self) -> Self:
        await self._start_lease()
        self._enter_guard()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            return await self._exit_guard(exc_type, exc, tb)
        finally:
            await self.resign()
