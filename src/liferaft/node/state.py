"""``StateService``: the node's key-value state (``liferaft.kv.StateDB``) off the event loop.

Writes (apply, the durability barrier, installing a snapshot file) run one at a time on
a worker thread, shielded from cancellation like the Raft log's writes
(``liferaft.storage.writer``): a batch asked for is applied whole (a small one on the
event loop, see ``apply``). Reads run on up to
``READ_THREADS`` threads at once, each on its own read connection, so a long range or a
watch's backlog never blocks the event loop, and SQLite (which releases the GIL while it
steps) works on the second core.

Installing a snapshot replaces the database file under every reader: it waits until
the reads in progress are done and holds new ones until the new file is open.

Files in ``<data_dir>``: ``state.db`` (and its WAL), and under ``snapshots/``:
``install-<transfer>.db`` (a snapshot received from the leader, checked, waiting to
replace ``state.db``), ``incoming-<transfer>.part`` (one being received),
``send-<peer>-<transfer>.db`` (a copy being streamed to a follower). See
docs/storage.md for what survives which crash.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from liferaft.kv.state import DB_NAME, Applied, EntryLike, StateCorrupt, StateDB, read_applied
from liferaft.storage import offload
from liferaft.storage.offload import Worker
from liferaft.storage.sqlite import fsync_dir

T = TypeVar("T")

READ_THREADS = 4
INLINE_APPLY_BYTES = 16 * 1024  # entry data of a run small enough to apply on the loop
SNAPSHOT_DIR = "snapshots"


class StateBehind(Exception):
    """The state database is older than the log's snapshot and no snapshot file can
    bring it forward: the node cannot start without losing committed writes."""


def install_path(data_dir: Path, transfer: int) -> Path:
    return data_dir / SNAPSHOT_DIR / f"install-{transfer:d}.db"


def _promote(data_dir: Path, transfer: int) -> None:
    """Make ``install-<transfer>.db`` the state database (the old one is closed). The
    rename is atomic; the old WAL goes first, so it can never be replayed onto the new
    file. A crash in between leaves the old file (consistent, just older) and the
    install file, and the next start promotes it again."""
    src = install_path(data_dir, transfer)
    dest = data_dir / DB_NAME
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            (data_dir / (DB_NAME + suffix)).unlink()
    os.replace(src, dest)
    fsync_dir(data_dir)


def _clean(data_dir: Path, *, at_start: bool) -> None:
    """Drop leftover snapshot files: at start every one (half-received, being sent,
    superseded); after an install only other received files (a transfer in progress
    keeps its ``.part``)."""
    snapdir = data_dir / SNAPSHOT_DIR
    for p in snapdir.iterdir():
        leftover = at_start and p.suffix in (".part", ".db")
        if leftover or p.name.startswith("install-"):
            p.unlink(missing_ok=True)


def open_state(
    data_dir: Path, *, snapshot_index: int, transfer: int | None, history_revisions: int
) -> StateDB:
    """Open ``state.db``, first finishing a snapshot install a crash interrupted: the log
    (``raft.db``) says which snapshot it stands on; if the state is older than that, the
    snapshot file it came with must replace it."""
    (data_dir / SNAPSHOT_DIR).mkdir(mode=0o700, exist_ok=True)
    db = StateDB.open(data_dir / DB_NAME, history_revisions=history_revisions)
    if db.applied < snapshot_index:
        db.close()
        src = install_path(data_dir, transfer) if transfer is not None else None
        if src is None or not src.exists():
            raise StateBehind(
                f"{data_dir / DB_NAME} has applied up to {db.applied}, but the log starts "
                f"after the snapshot at {snapshot_index} and no snapshot file is left to "
                "install: this data dir cannot be recovered; remove it and rejoin"
            )
        if read_applied(src) < snapshot_index:
            raise StateBehind(f"{src} is older than the log's snapshot at {snapshot_index}")
        _promote(data_dir, transfer)  # type: ignore[arg-type]  # not None: src exists
        db = StateDB.open(data_dir / DB_NAME, history_revisions=history_revisions)
    _clean(data_dir, at_start=True)
    return db


class StateService:
    def __init__(self, data_dir: Path, db: StateDB, history_revisions: int, writer: Worker) -> None:
        """Use ``StateService.open``."""
        self.data_dir = data_dir
        self.db = db
        self._history = history_revisions
        self._writer = writer  # every write, one at a time, on one thread
        self._readers = trio.CapacityLimiter(READ_THREADS)
        self._reading = 0
        self._installing = False
        self._idle = trio.Event()
        self._installed = trio.Event()
        self._closed = False

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        *,
        snapshot_index: int,
        transfer: int | None,
        history_revisions: int,
    ) -> StateService:
        writer = offload.new_worker("liferaft-state.db")
        try:
            db = await writer.run(
                lambda: open_state(
                    data_dir,
                    snapshot_index=snapshot_index,
                    transfer=transfer,
                    history_revisions=history_revisions,
                )
            )
        except BaseException:
            await writer.close()
            raise
        return cls(data_dir, db, history_revisions, writer)

    @property
    def snapshot_dir(self) -> Path:
        return self.data_dir / SNAPSHOT_DIR

    async def _write(self, fn: Callable[[], T]) -> T:
        return await self._writer.run(fn)

    async def apply(self, entries: list[EntryLike]) -> Applied:
        """Apply a run of committed entries. A small run (at most INLINE_APPLY_BYTES of
        entry data) is applied right here on the event loop when no other write holds
        the writer. The trip to a worker thread and back costs more than such a run:
        80 µs on one CPU, 260-330 µs of CPU and as much latency when the thread wakes on
        the other CPU, as it mostly does (docs/performance.md), on the path of every
        lone write. Applying is Python holding the GIL, so on a thread it would hold up
        the event loop about as long. A commit of ``state.db`` never fsyncs
        (``synchronous=NORMAL``), so this never waits for the disk."""
        db = self.db
        if sum(len(e.data) for e in entries) <= INLINE_APPLY_BYTES:
            with contextlib.suppress(trio.WouldBlock):  # else a sync or WAL restart runs
                return self._writer.run_now(lambda: db.apply(entries))
        return await self._write(lambda: db.apply(entries))

    async def sync(self) -> int:
        """Everything applied so far made durable; returns that applied index. The
        applied index is taken on the writer's turn, the fsyncs run beside it on another
        thread (``StateDB.fsync_files``): fsyncing a large WAL took 0.4 s here, and on
        the writer's turn every apply, and so every answer, waited for it."""
        db = self.db
        applied = await self._write(lambda: db.applied)
        await offload.run_sync(db.fsync_files)
        return applied

    async def restart_wal(self) -> int:
        """``StateDB.restart_wal`` on the writer's turn (between two applies)."""
        db = self.db
        return await self._write(db.restart_wal)

    def read_now(self, fn: Callable[[StateDB], T]) -> T:
        """Run ``fn(db)`` right here, on the event loop: for a read of bounded, small
        cost (a get), where the trip to a reader thread and back costs several times
        the read (docs/performance.md). Raises ``trio.WouldBlock`` while a snapshot is
        being installed (use ``read``, which waits for it); an install cannot start
        during the call, which never yields."""
        if self._installing or self._closed:
            raise trio.WouldBlock
        return fn(self.db)

    async def read_small(self, fn: Callable[[StateDB], T]) -> T:
        """``read_now`` for a read of bounded cost, or ``read`` while an install runs."""
        try:
            return self.read_now(fn)
        except trio.WouldBlock:
            return await self.read(fn)

    async def read(self, fn: Callable[[StateDB], T]) -> T:
        """Run ``fn(db)`` on a reader thread (not during an install, never after close)."""
        while self._installing and not self._closed:
            await self._installed.wait()
        if self._closed:
            raise trio.ClosedResourceError("the state database is closed")
        self._reading += 1
        try:
            db = self.db
            if offload.inline():
                return await offload.run_sync(lambda: fn(db))
            return await trio.to_thread.run_sync(
                lambda: fn(db), limiter=self._readers, abandon_on_cancel=False
            )
        finally:
            self._reading -= 1
            if self._reading == 0:
                self._idle.set()

    async def backup(self, dest: Path) -> int:
        """A consistent copy at ``dest``; returns its applied index."""
        return await self.read(lambda db: db.backup(dest))

    async def install(self, transfer: int) -> None:
        """Replace the state with the received snapshot file ``install-<transfer>.db``."""
        self._installing = True
        self._installed = trio.Event()
        try:
            await self._readers_done()

            def swap() -> StateDB:
                self.db.close()
                _promote(self.data_dir, transfer)
                db = StateDB.open(self.data_dir / DB_NAME, history_revisions=self._history)
                _clean(self.data_dir, at_start=False)
                return db

            self.db = await self._write(swap)
        finally:
            self._installing = False
            self._installed.set()

    async def _readers_done(self) -> None:
        """Wait until no read runs: a connection closed under a reader thread crashes
        the process (sqlite3 with check_same_thread=False does not guard it)."""
        while self._reading:
            self._idle = trio.Event()
            await self._idle.wait()

    async def close(self) -> None:
        """Close the database once the reads in progress are done; later reads fail."""
        self._closed = True
        self._installed.set()  # reads held by an install see the close
        with trio.CancelScope(shield=True):
            await self._readers_done()
            await self._writer.close(self.db.close)


__all__ = ["StateBehind", "StateCorrupt", "StateService", "install_path"]
