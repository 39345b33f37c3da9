"""``StorageWriter``: the Trio face of ``Storage``, running every call on a worker thread.

Every call goes through ``trio.to_thread.run_sync`` with one ``CapacityLimiter(1)`` per
writer. Trio may run successive calls on different OS threads (it keeps a cache of idle
workers), so the SQLite connection is opened with ``check_same_thread=False``; the
limiter is what makes that safe, since it lets exactly one call use the connection at a
time, and its acquire/release hand-off orders one call's effects before the next's.
The limiter belongs to the writer, not the process: several nodes in one test process
fsync in parallel, as separate processes would.

Cancellation: a write that was asked for is carried out whole. ``save``,
``save_snapshot`` and ``close`` wait for their turn and for the thread in a shielded
scope, and the thread is never abandoned (``abandon_on_cancel=False``), so cancelling the
caller never leaves a write half-done, nor a write running while the next caller already
believes the storage idle. The cancellation is delivered at the caller's next checkpoint,
once the write is durable. (``load`` and ``size_bytes`` change nothing and may be
cancelled while waiting for their turn.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from liferaft.core import Membership, Ready, Restored, Snapshot
from liferaft.storage.sqlite import Storage

T = TypeVar("T")


class StorageWriter:
    def __init__(self, storage: Storage, limiter: trio.CapacityLimiter | None = None) -> None:
        self.storage = storage
        self._limiter = limiter or trio.CapacityLimiter(1)

    @classmethod
    async def open(cls, data_dir: Path, *, initial: Membership | None = None) -> StorageWriter:
        """``Storage.open`` (with its integrity check) on the worker thread."""
        limiter = trio.CapacityLimiter(1)
        storage = await trio.to_thread.run_sync(
            lambda: Storage.open(data_dir, initial=initial),
            limiter=limiter,
            abandon_on_cancel=False,
        )
        return cls(storage, limiter)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self._limiter, abandon_on_cancel=False)

    async def _write(self, fn: Callable[[], T]) -> T:
        with trio.CancelScope(shield=True):
            result = await self._run(fn)
        return result

    async def load(self) -> Restored:
        return await self._run(self.storage.load)

    async def save(self, rd: Ready) -> float:
        """Persist ``rd`` (one transaction, one fsync); returns the COMMIT's duration in
        seconds, for the fsync histogram."""

        def save() -> float:
            self.storage.save(rd)
            return self.storage.last_commit_seconds

        if not rd.must_persist():
            await trio.lowlevel.checkpoint()
            return 0.0
        return await self._write(save)

    async def save_snapshot(self, snap: Snapshot) -> None:
        await self._write(lambda: self.storage.save_snapshot(snap))

    async def checkpoint(self) -> None:
        """``Storage.checkpoint`` on its own thread, outside the limiter: it runs beside
        the writes instead of between them."""
        await trio.to_thread.run_sync(self.storage.checkpoint, abandon_on_cancel=False)

    async def size_bytes(self) -> int:
        """File sizes only; runs outside the limiter so a metrics scrape never waits
        behind a long write."""
        return await trio.to_thread.run_sync(self.storage.size_bytes, abandon_on_cancel=False)

    async def close(self) -> None:
        await self._write(self.storage.close)
