"""``StorageWriter``: the Trio face of ``Storage``, running every call on the node's
storage thread.

Every call that touches the log runs on one long-lived ``WorkerThread`` (``worker.py``),
in the order made, one at a time, so the SQLite connection is only ever used by that
thread. It belongs to the writer, not the process: several nodes in one test process
fsync in parallel, as separate processes would.

Cancellation: a write that was asked for is carried out whole. The wait for the thread
is shielded, so cancelling the caller never leaves a write half-done, nor a write
running while the next caller already believes the storage idle. The cancellation is
delivered at the caller's next checkpoint, once the write is durable.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from liferaft.core import Membership, Ready, Restored, Snapshot
from liferaft.storage import offload
from liferaft.storage.offload import Worker
from liferaft.storage.sqlite import Storage

T = TypeVar("T")


class StorageWriter:
    def __init__(self, storage: Storage, worker: Worker) -> None:
        self.storage = storage
        self._worker = worker

    @classmethod
    async def open(cls, data_dir: Path, *, initial: Membership | None = None) -> StorageWriter:
        """``Storage.open`` (with its integrity check) on the storage thread."""
        worker = offload.new_worker("liferaft-raft.db")
        try:
            storage = await worker.run(lambda: Storage.open(data_dir, initial=initial))
        except BaseException:
            await worker.close()
            raise
        return cls(storage, worker)

    async def _write(self, fn: Callable[[], T]) -> T:
        return await self._worker.run(fn)

    async def load(self) -> Restored:
        return await self._worker.run(self.storage.load)

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

    async def cluster_id(self) -> str | None:
        return await self._write(self.storage.cluster_id)

    async def set_cluster_id(self, value: str) -> None:
        await self._write(lambda: self.storage.set_cluster_id(value))

    async def checkpoint(self) -> None:
        """``Storage.checkpoint`` on a thread of its own (its own connection): it runs
        beside the writes instead of between them."""
        await offload.run_sync(self.storage.checkpoint)

    async def size_bytes(self) -> int:
        """File sizes only; off the storage thread, so a metrics scrape never waits
        behind a long write."""
        return await offload.run_sync(self.storage.size_bytes)

    async def close(self) -> None:
        await self._worker.close(self.storage.close)
