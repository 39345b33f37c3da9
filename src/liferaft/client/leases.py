"""Keeping leases alive (docs/coordination.md, "Leases").

Two parts. :class:`~liferaft.client.core.KeepAliveSchedule`, in the protocol core,
decides without I/O or a clock of its own (times are passed in) when each lease is
renewed and when it must be given up as lost; the asyncio client drives it too.
:class:`KeepAlive` drives it on Trio: it sleeps until the next renewal, sends the
keepalives that are due together (they leave in one WebSocket message), and reports a
lease it could not keep instead of stopping quietly.

When: a lease is renewed every ``fraction`` (1/3) of its TTL, counted from when the last
renewal that the cluster confirmed was *sent* (the server counts from when it received
it, which is later, so the client's view of the deadline errs early). When one lease is
due, every lease due within the shortest renewal interval goes along, so leases of the
same TTL settle into one message per round. A keepalive is retried (and follows the
leader) like any request, until the lease's deadline; a lease whose deadline passes
with no confirmed renewal is lost, since the cluster may have expired it: the holder
cannot know otherwise, and must not act as if it still held what the lease guarded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import TYPE_CHECKING

import trio

from liferaft.client.core import FRACTION, KeepAliveSchedule
from liferaft.client.errors import LeaseLost, LiferaftError, NotFound
from liferaft.client.models import Lease, check_lease_id

if TYPE_CHECKING:
    from liferaft.client.client import Client

__all__ = ["FRACTION", "KeepAlive", "KeepAliveSchedule"]


class KeepAlive:
    """Keeps leases alive in the background, from :meth:`Client.keep_alive`::

        lease = await client.lease_grant(10)
        async with client.keep_alive(lease) as ka:
            ...  # cancelled, and LeaseLost raised, if the lease is lost meanwhile

    Inside ``async with`` the block is cancelled when a lease is lost and
    :class:`LeaseLost` comes out of it (with ``cancel_on_loss=False`` the block goes on:
    watch ``ka.lost``). Either way ``lost`` (a ``trio.Event``) is set, ``error`` holds the
    first loss and ``lost_leases`` each lost lease's error. Renewals of every kept lease
    due at the same time leave in one message; they follow leader changes like any
    request. ``add`` and ``remove`` change the set of leases while it runs.
    """

    def __init__(
        self,
        client: Client,
        leases: Iterable[Lease | int] = (),
        *,
        fraction: float = FRACTION,
        cancel_on_loss: bool = True,
    ) -> None:
        self._client = client
        self.schedule = KeepAliveSchedule(fraction)
        self._cancel_on_loss = cancel_on_loss
        self.lost = trio.Event()
        self.error: LeaseLost | None = None
        self.lost_leases: dict[int, LeaseLost] = {}
        self._callbacks: list[Callable[[LeaseLost], object]] = []
        self._renewed: list[Callable[[int, int], object]] = []
        self._guards: set[trio.CancelScope] = set()
        self._wake = trio.Event()
        self._task: trio.CancelScope | None = None
        self._stopped = False
        self._body: AbstractContextManager[None] | None = None
        # Seams for tests that drive a frozen clock: ``parked`` is set while the task
        # sleeps with no renewal in flight, ``woke`` when it wakes from that sleep.
        self.parked = trio.Event()
        self.woke = trio.Event()
        for lease in leases:
            self.add(lease)

    # ---------------------------------------------------------------- the leases

    @property
    def leases(self) -> list[int]:
        """The ids of the leases kept now (lost ones are dropped)."""
        return self.schedule.leases

    def add(self, lease: Lease | int, *, renewed_at: float | None = None) -> None:
        """Keep ``lease`` too. A :class:`Lease` from ``lease_grant`` with ``renewed_at``
        (``trio.current_time()`` taken before the grant was sent) is first renewed a
        third of its TTL after that; otherwise it is renewed at once."""
        now = trio.current_time()
        if isinstance(lease, Lease):
            self.schedule.add(lease.id, lease.ttl, now, renewed_at=renewed_at)
        else:
            self.schedule.add(check_lease_id(lease), None, now)
        self._wake.set()

    def remove(self, lease_id: int) -> None:
        """Stop renewing ``lease_id`` (it then expires after its TTL, unless revoked)."""
        self.schedule.remove(lease_id)
        self._wake.set()

    def time_left(self, lease_id: int) -> float | None:
        """Seconds until ``lease_id`` may expire as far as this client knows (the last
        confirmed renewal's send time plus its TTL); None if not kept."""
        deadline = self.schedule.deadline(lease_id)
        return None if deadline is None else deadline - trio.current_time()

    def on_lost(self, callback: Callable[[LeaseLost], object]) -> None:
        """Call ``callback(error)`` (in the Trio thread, synchronously) when a lease is
        lost; at once if one already was."""
        self._callbacks.append(callback)
        if self.error is not None:
            callback(self.error)

    def on_renewed(self, callback: Callable[[int, int], object]) -> None:
        """Call ``callback(lease_id, ttl)`` after each confirmed renewal (in the Trio
        thread, synchronously)."""
        self._renewed.append(callback)

    # ---------------------------------------------------------------- running

    async def start(self) -> None:
        """Start renewing in the client's background tasks (until :meth:`stop`, or the
        client closes)."""
        if self._task is not None:
            return
        self._task = trio.CancelScope()
        await self._client._spawn(self._run)

    def stop(self) -> None:
        """Stop renewing every lease (they expire after their TTL, unless revoked)."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()

    @contextmanager
    def guard(self) -> Iterator[None]:
        """A block that is cancelled when a lease is lost, and that raises LeaseLost
        when a lease was lost before it ended, even if it ended before it noticed:
        its work may then have overlapped another holder's."""
        with trio.CancelScope() as scope:
            self._guards.add(scope)
            if self.error is not None:
                scope.cancel()
            try:
                yield
            finally:
                self._guards.discard(scope)
        if self.error is not None:
            raise self._copy_error()

    def check(self) -> None:
        """Raise LeaseLost if a lease has been lost."""
        if self.error is not None:
            raise self._copy_error()

    def _copy_error(self) -> LeaseLost:
        assert self.error is not None
        err = self.error
        return LeaseLost(err.message, lease=err.lease)

    async def __aenter__(self) -> KeepAlive:
        await self.start()
        if self._cancel_on_loss:
            self._body = self.guard()
            self._body.__enter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            if self._body is not None:
                body, self._body = self._body, None
                return bool(body.__exit__(exc_type, exc, tb))
            return False
        finally:
            self.stop()

    async def _run(self) -> None:
        assert self._task is not None
        try:
            with self._task:
                try:
                    async with trio.open_nursery() as nursery:
                        await self._loop(nursery)
                except Exception as exc:  # a bug: never stop quietly, report every loss
                    self._lose_all(f"its keepalive task failed: {exc!r:.200}")
        finally:
            if not self._stopped:  # not stop(): the client closed, cancelling us
                self._client_closed()

    def _client_closed(self) -> None:
        """The client closed under the keeper: nobody renews its leases any more."""
        self._lose_all("its client was closed, so nothing renews it")
        self.stop()

    def _lose_all(self, why: str) -> None:
        for lease_id in self.schedule.remove_all():
            self._lose(lease_id, why)

    async def _loop(self, nursery: trio.Nursery) -> None:
        schedule = self.schedule
        while not self._stopped:
            now = trio.current_time()
            for lease_id, last in schedule.expired(now):
                why = f"; the last renewal failed: {last}" if last is not None else ""
                self._lose(lease_id, f"no renewal confirmed within its TTL{why}")
            for lease_id in schedule.take_due(now):
                nursery.start_soon(self._renew, lease_id, now)
            self._wake = trio.Event()
            parked = not schedule.in_flight
            if parked:
                self.parked.set()
            with trio.move_on_at(schedule.next_wakeup()):
                await self._wake.wait()
            if parked:
                self.parked = trio.Event()
                woke, self.woke = self.woke, trio.Event()
                woke.set()

    async def _renew(self, lease_id: int, sent_at: float) -> None:
        schedule = self.schedule
        deadline = schedule.deadline(lease_id)
        if deadline is None:
            return
        try:
            limit = min(deadline, sent_at + self._client._retrier.timeout)
            ttl = await self._client._lease_keepalive(lease_id, deadline=limit)
        except NotFound as exc:
            if lease_id in schedule:
                schedule.remove(lease_id)
                self._lose(lease_id, f"the cluster no longer has it ({exc.message or exc.code})")
        except LiferaftError as exc:
            schedule.failed(lease_id, trio.current_time(), exc)
        except trio.ClosedResourceError:
            self._client_closed()
        else:
            if lease_id in schedule:
                schedule.renewed(lease_id, ttl, sent_at)
                for callback in list(self._renewed):
                    callback(lease_id, ttl)
        finally:
            self._wake.set()

    def _lose(self, lease_id: int, why: str) -> None:
        err = LeaseLost(f"lease {lease_id:x} lost: {why}", lease=lease_id)
        self.lost_leases[lease_id] = err
        if self.error is None:
            self.error = err
        self.lost.set()
        for scope in list(self._guards):
            scope.cancel()
        for callback in list(self._callbacks):
            callback(err)
