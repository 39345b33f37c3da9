"""Storage keeps exactly what the simulator's Disk keeps, durably, and refuses damage.

Round trips through a close and reopen; a damaged or foreign database refused at open
with a message that says what is wrong; the async writer finishing a write whose caller
was cancelled.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import sqlite3
from pathlib import Path
from types import ModuleType

import pytest
import trio
import trio.testing

from liferaft.core import (
    Entry,
    EntryKind,
    HardState,
    Membership,
    Ready,
    Restored,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
)
from liferaft.storage import sqlite as storage_sqlite
from liferaft.storage.errors import StorageCorrupt, StorageError
from liferaft.storage.sqlite import Storage
from liferaft.storage.writer import StorageWriter
from liferaft.testing.sim import Disk

MEMBERS = Membership.of(["n1", "n2", "n3"])
SOFT = SoftState(Role.FOLLOWER, None, 1)


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def ready(
    *,
    hs: HardState | None = None,
    entries: tuple[Entry, ...] = (),
    snap: Snapshot | None = None,
) -> Ready:
    return Ready(soft_state=SOFT, hard_state=hs, entries=entries, snapshot=snap)


def ents(first: int, last: int, term: int, tag: bytes = b"") -> tuple[Entry, ...]:
    return tuple(
        Entry(i, term, EntryKind.NORMAL, b"%s%d" % (tag, i)) for i in range(first, last + 1)
    )


def snapshot(index: int, term: int, data: bytes = b"state") -> Snapshot:
    return Snapshot(SnapshotMeta(index, term, MEMBERS), data)


def reopened(data_dir: Path) -> Restored:
    with Storage.open(data_dir) as s:
        return s.load()


def raw(data_dir: Path, *sql: str) -> None:
    """Change the database behind Storage's back (it must be closed)."""
    conn = sqlite3.connect(data_dir / "raft.db", isolation_level=None)
    try:
        for stmt in sql:
            conn.execute(stmt)
    finally:
        conn.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data" / "n1"


def stored(data_dir: Path, *readies: Ready) -> None:
    with Storage.open(data_dir, initial=MEMBERS) as s:
        for rd in readies:
            s.save(rd)


# ---------------------------------------------------------------- round trips


def test_a_fresh_data_dir_is_private_and_holds_only_the_bootstrap_membership(
    data_dir: Path,
) -> None:
    with Storage.open(data_dir, initial=MEMBERS) as s:
        assert s.load() == Restored(HardState(), None, (), MEMBERS)
        s.save(ready(entries=ents(1, 1, 1), hs=HardState(1, "n1", 0)))
        assert (data_dir / "raft.db-wal").stat().st_mode & 0o777 == 0o600
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert (data_dir / "raft.db").stat().st_mode & 0o777 == 0o600


def test_the_bootstrap_membership_is_recorded_only_when_the_data_dir_is_first_created(
    tmp_path: Path,
) -> None:
    stored(tmp_path / "a")
    with Storage.open(tmp_path / "a", initial=Membership.of(["x"])) as s:
        assert s.load().initial_membership == MEMBERS
    with Storage.open(tmp_path / "b", initial=None) as s:  # a node that joins as a learner
        assert s.load().initial_membership == Membership(frozenset())
    with Storage.open(tmp_path / "b", initial=MEMBERS) as s:
        assert s.load().initial_membership == Membership(frozenset())


def test_what_was_saved_is_what_is_loaded_after_reopening(data_dir: Path) -> None:
    config = Entry(3, 1, EntryKind.CONFIG, b'{"type":"add"}')
    stored(
        data_dir,
        ready(hs=HardState(1, "n1", 0)),
        ready(entries=(Entry(1, 1, EntryKind.NOOP), Entry(2, 1, data=b"")), hs=HardState(1, "n1")),
        ready(entries=(config, *ents(4, 6, 1))),
        ready(hs=HardState(1, "n1", 5)),
    )
    assert reopened(data_dir) == Restored(
        HardState(1, "n1", 5),
        None,
        (Entry(1, 1, EntryKind.NOOP), Entry(2, 1), config, *ents(4, 6, 1)),
        MEMBERS,
    )


def test_entries_replace_the_stored_suffix_from_their_first_index(data_dir: Path) -> None:
    stored(
        data_dir,
        ready(entries=ents(1, 10, 1), hs=HardState(1, "n1", 4)),
        ready(entries=ents(6, 7, 2, b"new"), hs=HardState(2, "n2", 4)),  # conflict at 6
    )
    assert reopened(data_dir).entries == ents(1, 5, 1) + ents(6, 7, 2, b"new")


def test_a_snapshot_in_a_ready_replaces_the_whole_log(data_dir: Path) -> None:
    stored(
        data_dir,
        ready(entries=ents(1, 10, 1), hs=HardState(1, "n1", 3)),
        ready(snap=snapshot(50, 3), entries=ents(51, 52, 3), hs=HardState(3, None, 50)),
    )
    got = reopened(data_dir)
    assert got.snapshot == snapshot(50, 3)
    assert got.entries == ents(51, 52, 3)
    assert got.hard_state == HardState(3, None, 50)


def test_compaction_drops_the_entries_the_snapshot_covers_and_the_log_goes_on(
    data_dir: Path,
) -> None:
    with Storage.open(data_dir, initial=MEMBERS) as s:
        s.save(ready(entries=ents(1, 10, 1), hs=HardState(1, "n1", 8)))
        s.save_snapshot(snapshot(6, 1))
        s.save(ready(entries=ents(9, 12, 2, b"b"), hs=HardState(2, "n1", 8)))
    got = reopened(data_dir)
    assert got.snapshot == snapshot(6, 1)
    assert got.entries == ents(7, 8, 1) + ents(9, 12, 2, b"b")
    with Storage.open(data_dir) as s:  # and a second compaction, after a restart
        s.save_snapshot(snapshot(12, 2, b"later"))
        s.save(ready(entries=ents(13, 13, 2)))
    got = reopened(data_dir)
    assert (got.snapshot, got.entries) == (snapshot(12, 2, b"later"), ents(13, 13, 2))


def test_compacted_entries_are_removed_a_few_at_a_time_and_ignored_until_then(
    data_dir: Path,
) -> None:
    """A compaction stores its snapshot at once but removes the entries it covers at
    most TRIM_ENTRIES per write (removing them all in one transaction stalled the node
    for 0.7 s at 35 MB); the ones not removed yet are invisible to load and check."""

    def rows() -> int:
        conn = sqlite3.connect(data_dir / "raft.db")
        try:
            return int(conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
        finally:
            conn.close()

    trim = storage_sqlite.TRIM_ENTRIES
    with Storage.open(data_dir, initial=MEMBERS) as s:
        s.save(ready(entries=ents(1, 3 * trim + 10, 1), hs=HardState(1, "n1", 3 * trim)))
        s.save_snapshot(snapshot(3 * trim, 1))
        assert rows() == 2 * trim + 10  # one step removed with the snapshot
    got = reopened(data_dir)  # a restart in between: the rest is ignored, not refused
    assert (got.snapshot, got.entries) == (
        snapshot(3 * trim, 1),
        ents(3 * trim + 1, 3 * trim + 10, 1),
    )
    with Storage.open(data_dir) as s:
        for i in range(3):
            s.save(ready(hs=HardState(1, "n1", 3 * trim + i)))
            assert rows() == max(10, (1 - i) * trim + 10)
    assert reopened(data_dir).entries == ents(3 * trim + 1, 3 * trim + 10, 1)


def test_a_compaction_superseded_by_an_installed_snapshot_is_ignored(data_dir: Path) -> None:
    with Storage.open(data_dir, initial=MEMBERS) as s:
        s.save(ready(entries=ents(1, 10, 1), hs=HardState(1, "n1", 8)))
        s.save(ready(snap=snapshot(20, 2), hs=HardState(2, None, 20)))
        s.save_snapshot(snapshot(8, 1))
    got = reopened(data_dir)
    assert (got.snapshot, got.entries) == (snapshot(20, 2), ())


def test_storage_does_what_the_simulators_disk_does(tmp_path: Path) -> None:
    plan = load_helper("torn_child").plan
    for seed in range(3):
        data_dir = tmp_path / f"seed{seed}"
        disk = Disk()
        ops = plan(Restored(initial_membership=MEMBERS), random.Random(seed), max_batch=40)
        for step in range(60):
            op = next(ops)
            with Storage.open(data_dir, initial=MEMBERS) as s:
                if isinstance(op, Snapshot):
                    s.save_snapshot(op)
                    disk.save_snapshot(op)
                else:
                    s.save(op)
                    disk.write(op)
            assert reopened(data_dir) == disk.restored(MEMBERS), f"seed {seed} step {step}"


def test_a_ready_with_nothing_to_persist_writes_nothing(data_dir: Path) -> None:
    with Storage.open(data_dir, initial=MEMBERS) as s:
        s.save(ready(entries=ents(1, 3, 1), hs=HardState(1, "n1", 0)))
        before = (s.size_bytes(), s.last_commit_seconds)
        s.save(ready())
        assert (s.size_bytes(), s.last_commit_seconds) == before


def test_the_database_is_in_wal_mode_with_synchronous_full(data_dir: Path) -> None:
    with Storage.open(data_dir, initial=MEMBERS) as s:
        conn = s._conn
        assert conn is not None
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
        s.save(ready(entries=ents(1, 100, 1), hs=HardState(1, "n1", 0)))
        assert s.last_commit_seconds > 0
        assert (data_dir / "raft.db-wal").exists()
        assert s.size_bytes() > os.path.getsize(data_dir / "raft.db")


def test_a_batch_that_would_break_the_log_is_refused_before_anything_is_written(
    data_dir: Path,
) -> None:
    with Storage.open(data_dir, initial=MEMBERS) as s:
        s.save(ready(entries=ents(1, 5, 1), hs=HardState(1, "n1", 0)))
        with pytest.raises(ValueError, match="entries start at 8"):
            s.save(ready(entries=ents(8, 9, 1), hs=HardState(1, "n1", 9)))
        with pytest.raises(ValueError, match="not contiguous: 4 follows 2"):
            s.save(ready(entries=(*ents(1, 2, 1), *ents(4, 4, 1))))
        s.save(ready(entries=ents(6, 6, 1)))  # still usable
    assert reopened(data_dir).entries == ents(1, 6, 1)


# ---------------------------------------------------------------- errors


def test_a_full_disk_is_a_storage_error_and_the_storage_refuses_to_go_on(
    data_dir: Path,
) -> None:
    with Storage.open(data_dir, initial=MEMBERS) as s:
        s.save(ready(entries=ents(1, 5, 1), hs=HardState(1, "n1", 2)))
        assert s._conn is not None
        s._conn.execute("PRAGMA max_page_count = 20")  # the "disk" is 80 KiB
        big = tuple(Entry(i, 1, EntryKind.NORMAL, b"x" * 2000) for i in range(6, 200))
        with pytest.raises(StorageError, match="save: database or disk is full"):
            s.save(ready(entries=big, hs=HardState(1, "n1", 100)))
        with pytest.raises(StorageError, match="unusable after an earlier error"):
            s.save(ready(hs=HardState(2, None, 2)))
    got = reopened(data_dir)
    assert (got.hard_state, got.entries) == (HardState(1, "n1", 2), ents(1, 5, 1))


def test_a_data_dir_in_use_by_another_storage_is_refused(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_sqlite, "LOCK_WAIT_SECONDS", 0.05)
    with (
        Storage.open(data_dir, initial=MEMBERS),
        pytest.raises(StorageError, match="in use by another liferaft process"),
    ):
        Storage.open(data_dir)
    reopened(data_dir)  # released on close


# ---------------------------------------------------------------- damage refused at open


def test_a_damaged_page_is_refused_by_quick_check(data_dir: Path) -> None:
    stored(data_dir, ready(entries=ents(1, 2000, 1, b"x" * 100), hs=HardState(1, "n1", 1000)))
    db = data_dir / "raft.db"
    pages = db.stat().st_size // 4096
    with db.open("r+b") as f:
        f.seek(pages // 2 * 4096)
        f.write(random.Random(7).randbytes(4096))
    with pytest.raises(StorageCorrupt, match="quick_check"):
        Storage.open(data_dir)


def test_a_file_that_is_not_a_database_is_refused(data_dir: Path) -> None:
    stored(data_dir, ready(entries=ents(1, 5, 1), hs=HardState(1)))
    db = data_dir / "raft.db"
    with db.open("r+b") as f:
        f.write(b"\0" * 100)  # the header
    with pytest.raises(StorageCorrupt, match="file is not a database"):
        Storage.open(data_dir)


def test_a_gap_in_the_log_is_refused(data_dir: Path) -> None:
    stored(data_dir, ready(entries=ents(1, 33, 1), hs=HardState(1, "n1", 10)))
    raw(data_dir, "DELETE FROM entries WHERE idx = 16")
    with pytest.raises(StorageCorrupt, match=exactly("log not contiguous: entry 17 follows 15")):
        Storage.open(data_dir)


def test_a_log_that_does_not_start_right_after_the_snapshot_is_refused(
    tmp_path: Path,
) -> None:
    stored(tmp_path / "a", ready(entries=ents(1, 5, 1), hs=HardState(1)))
    raw(tmp_path / "a", "DELETE FROM entries WHERE idx = 1")
    with pytest.raises(StorageCorrupt, match=r"entry 2 follows the start of the log \(0\)"):
        Storage.open(tmp_path / "a")
    stored(tmp_path / "b", ready(snap=snapshot(10, 1), entries=ents(11, 15, 1), hs=HardState(1)))
    raw(tmp_path / "b", "DELETE FROM entries WHERE idx = 11")
    with pytest.raises(StorageCorrupt, match="entry 12 follows snapshot index 10"):
        Storage.open(tmp_path / "b")


def test_a_commit_beyond_the_log_is_refused(tmp_path: Path) -> None:
    stored(tmp_path / "a", ready(entries=ents(1, 33, 1), hs=HardState(1, "n1", 30)))
    raw(tmp_path / "a", 'UPDATE hard_state SET "commit" = 40')
    with pytest.raises(
        StorageCorrupt, match=exactly("hard state commit 40 beyond last log index 33")
    ):
        Storage.open(tmp_path / "a")
    stored(tmp_path / "b", ready(snap=snapshot(10, 1), hs=HardState(1, None, 10)))
    raw(tmp_path / "b", 'UPDATE hard_state SET "commit" = 11')
    with pytest.raises(StorageCorrupt, match="commit 11 beyond last log index 10"):
        Storage.open(tmp_path / "b")


def test_terms_that_decrease_along_the_log_are_refused(tmp_path: Path) -> None:
    stored(tmp_path / "a", ready(entries=ents(1, 10, 1) + ents(11, 20, 2), hs=HardState(2)))
    raw(tmp_path / "a", "UPDATE entries SET term = 1 WHERE idx = 15")
    with pytest.raises(
        StorageCorrupt, match=exactly("log terms decrease: entry 15 has term 1 after term 2")
    ):
        Storage.open(tmp_path / "a")
    stored(tmp_path / "b", ready(snap=snapshot(10, 3), entries=ents(11, 12, 3), hs=HardState(3)))
    raw(tmp_path / "b", "UPDATE entries SET term = 2 WHERE idx = 11")
    with pytest.raises(StorageCorrupt, match="entry 11 has term 2 after the snapshot's term 3"):
        Storage.open(tmp_path / "b")


def test_a_hard_state_term_behind_the_log_is_refused(data_dir: Path) -> None:
    stored(data_dir, ready(entries=ents(1, 3, 4), hs=HardState(4, "n1", 1)))
    raw(data_dir, "UPDATE hard_state SET term = 3")
    with pytest.raises(StorageCorrupt, match=exactly("hard state term 3 behind last log term 4")):
        Storage.open(data_dir)


def test_an_unknown_entry_kind_is_refused(data_dir: Path) -> None:
    stored(data_dir, ready(entries=ents(1, 3, 1), hs=HardState(1)))
    raw(data_dir, "UPDATE entries SET kind = 9 WHERE idx = 2")
    with pytest.raises(StorageCorrupt, match=exactly("entry 2 has unknown kind 9")):
        Storage.open(data_dir)


def test_a_newer_schema_is_refused(data_dir: Path) -> None:
    stored(data_dir)
    raw(data_dir, "PRAGMA user_version = 7")
    with pytest.raises(
        StorageCorrupt, match=exactly("schema version 7 is newer than this liferaft (1)")
    ):
        Storage.open(data_dir)


def test_another_applications_database_is_refused_not_initialised(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    raw(data_dir, "CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    with pytest.raises(StorageCorrupt, match="not a liferaft database"):
        Storage.open(data_dir)
    raw(data_dir, "PRAGMA application_id = 1234")
    with pytest.raises(StorageCorrupt, match="not a liferaft database"):
        Storage.open(data_dir)


def test_an_empty_database_file_is_initialised(data_dir: Path) -> None:
    """A crash while creating the file leaves it empty: nothing was durable yet."""
    data_dir.mkdir(parents=True)
    (data_dir / "raft.db").touch()
    with Storage.open(data_dir, initial=MEMBERS) as s:
        assert s.load() == Restored(initial_membership=MEMBERS)


# ---------------------------------------------------------------- the async writer


async def test_the_writer_saves_and_loads_on_its_worker_thread(data_dir: Path) -> None:
    writer = await StorageWriter.open(data_dir, initial=MEMBERS)
    seconds = await writer.save(ready(entries=ents(1, 100, 1), hs=HardState(1, "n1", 50)))
    assert seconds > 0
    await writer.save_snapshot(snapshot(40, 1))
    assert await writer.save(ready()) == 0.0
    assert await writer.size_bytes() > 0
    got = await writer.load()
    await writer.close()
    assert (got.snapshot, got.entries, got.hard_state) == (
        snapshot(40, 1),
        ents(41, 100, 1),
        HardState(1, "n1", 50),
    )
    assert reopened(data_dir) == got


async def test_a_cancelled_caller_does_not_abort_its_write(data_dir: Path) -> None:
    writer = await StorageWriter.open(data_dir, initial=MEMBERS)
    big = tuple(Entry(i, 1, EntryKind.NORMAL, b"y" * 500) for i in range(1, 5001))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.save, ready(entries=big, hs=HardState(1, "n1", 0)))
        await trio.testing.wait_all_tasks_blocked()  # the save is on its thread
        nursery.cancel_scope.cancel()
    with trio.CancelScope() as scope:
        scope.cancel()  # cancelled before the call: the write is still done, whole
        await writer.save(ready(hs=HardState(2, None, 5000)))
        await trio.lowlevel.checkpoint()  # and the cancellation arrives afterwards
    assert scope.cancelled_caught
    await writer.close()
    got = reopened(data_dir)
    assert (got.entries, got.hard_state) == (big, HardState(2, None, 5000))


def load_helper(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failed_checkpoint_leaves_a_save_in_progress_alone(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """checkpoint runs on its own connection beside save: its failure is its own, and
    must not roll back the writer's transaction on another thread."""
    with Storage.open(data_dir, initial=MEMBERS) as s:
        writer = s._conn
        assert writer is not None
        writer.execute("BEGIN IMMEDIATE")  # a save in progress

        def refuse(*_args: object, **_kwargs: object) -> sqlite3.Connection:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(storage_sqlite.sqlite3, "connect", refuse)
        with pytest.raises(StorageError, match="checkpoint: disk I/O error"):
            s.checkpoint()
        assert writer.in_transaction
        writer.execute("ROLLBACK")


@pytest.mark.parametrize("cut_pages", [1, 10])
def test_a_truncated_raft_database_is_refused(data_dir: Path, cut_pages: int) -> None:
    """raft.db cut short (a bad copy or restore) is refused at open, never read as a
    shorter log: its last entries may have been acknowledged."""
    stored(data_dir, ready(entries=ents(1, 2000, 1, b"x" * 100), hs=HardState(1, "n1", 1000)))
    s = Storage.open(data_dir)
    s.checkpoint()
    s.close()
    db = data_dir / "raft.db"
    with db.open("r+b") as f:
        f.truncate(db.stat().st_size - 4096 * cut_pages)
    with pytest.raises(StorageCorrupt):
        Storage.open(data_dir)


def test_commits_fsync_except_under_the_simulator(tmp_path: Path) -> None:
    """synchronous=FULL (every COMMIT fsyncs the WAL) in a node; OFF only inside the
    whole-node simulator, whose crashes keep the page cache (offload.durable)."""
    from liferaft.storage.offload import inline_io

    real = Storage.open(tmp_path / "real")
    try:
        assert real._conn is not None
        assert real._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        real.close()
    with inline_io():
        sim = Storage.open(tmp_path / "sim")
    try:
        assert sim._conn is not None
        assert sim._conn.execute("PRAGMA synchronous").fetchone()[0] == 0  # OFF
    finally:
        sim.close()
