"""``Storage``: the Raft core's durable state in one SQLite file, ``<data_dir>/raft.db``.

It does exactly what ``liferaft.testing.sim.Disk`` does in memory: ``save`` persists a
``Ready`` atomically (snapshot, then entries replacing any suffix from their first index,
then hard state), ``save_snapshot`` compacts the log, ``load`` gives back a ``Restored``.

Durability: WAL mode with ``synchronous=FULL``, so each COMMIT fsyncs the WAL; a ``save``
is one transaction, hence one fsync, however many entries it carries. A ``kill -9`` at any
instant leaves either all of a ``save`` or none of it.

Threads: the API is synchronous and blocking. ``StorageWriter`` calls it from its one
storage thread (``WorkerThread``); the connection is made with
``check_same_thread=False`` for tests and tools that open it on one thread and use it
on another. Never call one ``Storage`` from two threads at once.

Processes: one data dir belongs to one process. ``open`` takes an exclusive ``flock`` on
``<data_dir>/raft.lock`` (released by the kernel when the process dies, so a ``kill -9``
never leaves it stale): two nodes writing one log would vote twice in a term.

Errors: an SQLite error becomes ``StorageError`` carrying SQLite's message (SQLITE_CORRUPT
and SQLITE_NOTADB become ``StorageCorrupt``). After a failed call the object refuses
every later one: the node must fail-stop and reopen, never retry a failed fsync.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

from liferaft.core import (
    Entry,
    EntryKind,
    HardState,
    Membership,
    Ready,
    Restored,
    Snapshot,
    SnapshotMeta,
)
from liferaft.storage import offload, schema
from liferaft.storage.errors import StorageCorrupt, StorageError

DB_NAME = "raft.db"
LOCK_NAME = "raft.lock"
LOCK_WAIT_SECONDS = 5.0  # a process that is just closing the data dir gets this long

_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_KINDS = tuple(int(k) for k in EntryKind)

_INSERT_ENTRY = "INSERT INTO entries (idx, term, kind, data) VALUES (?, ?, ?, ?)"
TRIM_ENTRIES = 32  # compacted entries removed per write transaction at most

_PUT_HARD_STATE = (
    'INSERT INTO hard_state (id, term, vote, "commit") VALUES (0, ?, ?, ?) '
    "ON CONFLICT (id) DO UPDATE SET term = excluded.term, vote = excluded.vote, "
    '"commit" = excluded."commit"'
)
_PUT_SNAPSHOT = (
    "INSERT INTO snapshot (id, idx, term, voters, learners, data) VALUES (0, ?, ?, ?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET idx = excluded.idx, term = excluded.term, "
    "voters = excluded.voters, learners = excluded.learners, data = excluded.data"
)
_PUT_CLUSTER_ID = (
    "INSERT INTO meta (key, value) VALUES ('cluster_id', ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


def _wrap(what: str, exc: sqlite3.Error) -> StorageError:
    """SQLite's error as ours, keeping its message."""
    code = getattr(exc, "sqlite_errorcode", None)
    cls = StorageCorrupt if code is not None and code & 0xFF in _CORRUPT_CODES else StorageError
    return cls(f"{what}: {exc}")


def _snapshot_row(snap: Snapshot) -> tuple[int, int, str, str, bytes]:
    m = snap.meta
    voters = schema.members_json(m.membership.voters)
    return m.index, m.term, voters, schema.members_json(m.membership.learners), snap.data


def _check_batch(entries: Sequence[Entry], base: int, last: int) -> None:
    """The caller's contract: a batch is contiguous and starts inside (or right after)
    the stored log, after the snapshot. Breaking it would store a log that ``check``
    refuses at the next start, so it is refused here, before anything is written."""
    first = entries[0].index
    if not base < first <= last + 1:
        raise ValueError(
            f"entries start at {first}: the stored log is {base + 1}..{last} "
            f"(after snapshot index {base})"
        )
    for prev, e in itertools.pairwise(entries):
        if e.index != prev.index + 1:
            raise ValueError(f"entries not contiguous: {e.index} follows {prev.index}")


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new or renamed file in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(data_dir: Path) -> int:
    """Take the data dir's exclusive lock, waiting a little for a closing owner."""
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise StorageError(
                    f"data dir {data_dir} is in use by another liferaft process "
                    f"({LOCK_NAME} is locked)"
                ) from None
            time.sleep(0.01)
        except OSError:
            os.close(fd)
            raise


class Storage:
    """Hard state, log and snapshot of one node; see the module docstring for the rules."""

    def __init__(self, conn: sqlite3.Connection, path: Path, lock_fd: int) -> None:
        """Use ``Storage.open``."""
        self._conn: sqlite3.Connection | None = conn
        self.path = path
        self._lock_fd = lock_fd
        self._failed: str | None = None
        self.last_commit_seconds = 0.0  # the COMMIT (fsync) of the last save, for metrics
        self._snap_index = 0  # mirrors what is stored, for save's contract check
        self._last_index = 0
        self._stale_from = 1  # entries from here up to the snapshot index await removal

    # ---------------------------------------------------------------- opening

    @classmethod
    def open(cls, data_dir: Path, *, initial: Membership | None = None) -> Storage:
        """Open (or create) ``data_dir/raft.db``; refuse it with StorageCorrupt if damaged.

        ``initial`` is the bootstrap membership, recorded only when the database is first
        created and ignored afterwards (``None`` for a node that joins as a learner).
        """
        data_dir = Path(data_dir)
        try:
            new_dir = not data_dir.exists()
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if new_dir:
                fsync_dir(data_dir.parent)
            lock_fd = _lock(data_dir)
        except OSError as exc:
            raise StorageError(f"cannot use data dir {data_dir}: {exc}") from exc
        path = data_dir / DB_NAME
        conn: sqlite3.Connection | None = None
        try:
            new_db = not path.exists()
            if new_db:  # private, like its directory (snapshots hold the users' values)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            storage = cls(conn, path, lock_fd)
            storage._quick_check()  # before anything below writes to the file
            with storage._errors(f"open {path}"):
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    raise StorageError(f"open {path}: journal_mode is {mode}, not wal")
                # FULL: each COMMIT fsyncs. OFF only under the simulator (offload.durable)
                sync = "FULL" if offload.durable() else "OFF"
                conn.execute(f"PRAGMA synchronous = {sync}")
                conn.execute("PRAGMA cell_size_check = ON")
                conn.execute("PRAGMA journal_size_limit = 67108864")  # WAL shrinks back to 64 MiB
                # No checkpoint inside a save's COMMIT (it writes and fsyncs the database
                # file on the path of every write and heartbeat): ``checkpoint`` runs
                # beside the writer instead.
                conn.execute("PRAGMA wal_autocheckpoint = 0")
                schema.ensure(conn, initial)
            storage._check_log()
            if new_db:
                fsync_dir(data_dir)  # the new file's directory entry is durable too
        except BaseException as exc:
            if conn is not None:
                conn.close()
            os.close(lock_fd)
            if isinstance(exc, sqlite3.Error):
                raise _wrap(f"open {path}", exc) from exc
            if isinstance(exc, OSError):
                raise StorageError(f"open {path}: {exc}") from exc
            raise
        return storage

    # ---------------------------------------------------------------- reading

    def load(self) -> Restored:
        """Everything stored, for ``Raft(config, rng, restored)``."""
        conn = self._usable()
        with self._errors("load", poison=True):
            row = conn.execute(
                'SELECT term, vote, "commit" FROM hard_state WHERE id = 0'
            ).fetchone()
            hard_state = HardState(row[0], row[1], row[2]) if row else HardState()
            snapshot = None
            srow = conn.execute(
                "SELECT idx, term, voters, learners, data FROM snapshot WHERE id = 0"
            ).fetchone()
            if srow is not None:
                membership = Membership(
                    schema.members_from_json(srow[2], "snapshot voters"),
                    schema.members_from_json(srow[3], "snapshot learners"),
                )
                snapshot = Snapshot(SnapshotMeta(srow[0], srow[1], membership), srow[4])
            # Entries at or below the snapshot index are compacted, waiting for removal.
            entries = tuple(
                Entry(idx, term, EntryKind(kind), data)
                for idx, term, kind, data in conn.execute(
                    "SELECT idx, term, kind, data FROM entries WHERE idx > ? ORDER BY idx",
                    (snapshot.meta.index if snapshot is not None else 0,),
                )
            )
            return Restored(hard_state, snapshot, entries, self._initial_membership())

    def _initial_membership(self) -> Membership:
        assert self._conn is not None
        meta = dict(
            self._conn.execute(
                "SELECT key, value FROM meta WHERE key IN ('initial_voters', 'initial_learners')"
            ).fetchall()
        )
        return Membership(
            schema.members_from_json(meta.get("initial_voters", "[]"), "meta initial_voters"),
            schema.members_from_json(meta.get("initial_learners", "[]"), "meta initial_learners"),
        )

    def checkpoint(self) -> None:
        """Copy the WAL into the database without blocking the writer (PASSIVE), on a
        connection of its own; any thread, concurrently with ``save``. Keeps the WAL
        short now that commits do not checkpoint."""
        # Not through ``_errors``: that rolls back the *writer's* transaction, which
        # may be a save in progress on another thread.
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise _wrap("checkpoint", exc) from exc

    def size_bytes(self) -> int:
        """The database and WAL file sizes. Touches only the file system, not SQLite."""
        total = 0
        for p in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                total += p.stat().st_size
        return total

    # ---------------------------------------------------------------- writing

    def save(self, rd: Ready) -> None:
        """Persist ``rd``'s snapshot, entries and hard state in ONE transaction (one fsync).

        The snapshot replaces the whole log; entries replace any stored entry at or after
        their first index. A Ready with nothing to persist opens no transaction. The
        COMMIT's duration is left in ``last_commit_seconds``.
        """
        snap, entries, hs = rd.snapshot, rd.entries, rd.hard_state
        if snap is None and not entries and hs is None:
            return
        conn = self._usable()
        base = snap.meta.index if snap is not None else self._snap_index
        last = base if snap is not None else self._last_index
        if entries:
            _check_batch(entries, base, last)
        with self._errors("save", poison=True):
            conn.execute("BEGIN IMMEDIATE")
            if snap is not None:
                conn.execute(_PUT_SNAPSHOT, _snapshot_row(snap))
                conn.execute("DELETE FROM entries")
            else:
                self._trim(conn)
            if entries:
                conn.execute("DELETE FROM entries WHERE idx >= ?", (entries[0].index,))
                conn.executemany(
                    _INSERT_ENTRY, [(e.index, e.term, int(e.kind), e.data) for e in entries]
                )
            if hs is not None:
                conn.execute(_PUT_HARD_STATE, (hs.term, hs.vote, hs.commit))
            start = time.perf_counter()
            conn.execute("COMMIT")
            self.last_commit_seconds = time.perf_counter() - start
        self._snap_index = base
        self._last_index = entries[-1].index if entries else last
        if snap is not None:
            self._stale_from = base + 1

    def _trim(self, conn: sqlite3.Connection) -> None:
        """Remove up to TRIM_ENTRIES compacted entries (inside the caller's transaction).
        Compaction removes its entries a few at a time, with the writes that follow it:
        removing them all at once took 0.7 s for 35 MB of entries on this project's
        machine, a stall of every write and heartbeat behind it."""
        if self._stale_from > self._snap_index:
            return
        upto = min(self._snap_index, self._stale_from + TRIM_ENTRIES - 1)
        conn.execute("DELETE FROM entries WHERE idx <= ?", (upto,))
        self._stale_from = upto + 1

    def save_snapshot(self, snap: Snapshot) -> None:
        """After the node compacted: store ``snap`` (one transaction). The entries it
        covers are ignored from now on and removed a few at a time by this and later
        writes (``_trim``). A snapshot older than the stored one (a newer one was
        installed meanwhile) is superseded already and is ignored."""
        conn = self._usable()
        index = snap.meta.index
        if index < self._snap_index:
            return
        with self._errors("save_snapshot", poison=True):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_PUT_SNAPSHOT, _snapshot_row(snap))
            self._snap_index = index  # (restored below if the commit fails: poisoned)
            self._trim(conn)
            start = time.perf_counter()
            conn.execute("COMMIT")
            self.last_commit_seconds = time.perf_counter() - start
        self._last_index = max(self._last_index, index)

    def install_base(self, snap: Snapshot, hs: HardState, *, cluster_id: str) -> None:
        """Start the log over at ``snap`` with hard state ``hs``, in the cluster
        ``cluster_id`` (one transaction): what ``snapshot restore`` and ``recover`` give
        a new data dir (node/restore.py)."""
        conn = self._usable()
        with self._errors("install_base", poison=True):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_PUT_SNAPSHOT, _snapshot_row(snap))
            conn.execute("DELETE FROM entries")
            conn.execute(_PUT_HARD_STATE, (hs.term, hs.vote, hs.commit))
            conn.execute(_PUT_CLUSTER_ID, (cluster_id,))
            conn.execute("COMMIT")
        self._snap_index = self._last_index = snap.meta.index
        self._stale_from = snap.meta.index + 1

    # ------------------------------------------------------- cluster identity

    def cluster_id(self) -> str | None:
        """The identity of the cluster this log belongs to (None: not known yet, a node
        that joins learns it from the first member that dials it)."""
        conn = self._usable()
        with self._errors("cluster_id"):
            row = conn.execute("SELECT value FROM meta WHERE key = 'cluster_id'").fetchone()
        return None if row is None else str(row[0])

    def set_cluster_id(self, value: str) -> None:
        conn = self._usable()
        with self._errors("set_cluster_id", poison=True):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_PUT_CLUSTER_ID, (value,))
            conn.execute("COMMIT")

    # ---------------------------------------------------------------- checking

    def check(self) -> None:
        """Refuse a damaged database with StorageCorrupt saying what is wrong.

        ``PRAGMA quick_check``, then the log's own invariants: entries contiguous from
        the snapshot index + 1 (1 without a snapshot), terms never decreasing (starting
        at or above the snapshot's), known entry kinds, at most one hard state and one
        snapshot row, hard state commit within the log and its term not behind the last
        entry's. Never repairs or truncates anything.
        """
        self._quick_check()
        self._check_log()

    def _quick_check(self) -> None:
        conn = self._usable()
        try:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.Error as exc:
            raise StorageCorrupt(f"quick_check: {exc}") from exc
        if rows != ["ok"]:
            more = f" (and {len(rows) - 5} more)" if len(rows) > 5 else ""
            raise StorageCorrupt("quick_check: " + "; ".join(map(str, rows[:5])) + more)

    def _check_log(self) -> None:
        conn = self._usable()
        with self._errors("check"):
            for table in ("hard_state", "snapshot"):
                (n,) = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
                (n0,) = conn.execute(f"SELECT COUNT(*) FROM {table} WHERE id = 0").fetchone()
                if n != n0:
                    raise StorageCorrupt(f"{table} has {n} rows, {n0} of them with id 0")
            srow = conn.execute("SELECT idx, term FROM snapshot WHERE id = 0").fetchone()
            snap_index, snap_term = srow if srow else (0, 0)
            after = f"snapshot index {snap_index}" if srow else "the start of the log (0)"
            # Entries at or below the snapshot index are compacted, awaiting removal.
            first, last, count = conn.execute(
                "SELECT MIN(idx), MAX(idx), COUNT(*) FROM entries WHERE idx > ?", (snap_index,)
            ).fetchone()
            (stale_first,) = conn.execute("SELECT MIN(idx) FROM entries").fetchone()
            last_index, last_term = snap_index, snap_term
            if count:
                if first != snap_index + 1:
                    raise StorageCorrupt(f"log not contiguous: entry {first} follows {after}")
                if count != last - first + 1:
                    idx, prev = conn.execute(
                        "SELECT idx, prev FROM (SELECT idx, LAG(idx) OVER (ORDER BY idx) AS prev"
                        " FROM entries WHERE idx > ?) WHERE idx != prev + 1 LIMIT 1",
                        (snap_index,),
                    ).fetchone()
                    raise StorageCorrupt(f"log not contiguous: entry {idx} follows {prev}")
                (first_term,) = conn.execute(
                    "SELECT term FROM entries WHERE idx = ?", (first,)
                ).fetchone()
                if first_term < snap_term:
                    raise StorageCorrupt(
                        f"log terms decrease: entry {first} has term {first_term} "
                        f"after the snapshot's term {snap_term}"
                    )
                bad = conn.execute(
                    "SELECT idx, term, prev FROM (SELECT idx, term, LAG(term) OVER"
                    " (ORDER BY idx) AS prev FROM entries WHERE idx > ?) WHERE term < prev"
                    " LIMIT 1",
                    (snap_index,),
                ).fetchone()
                if bad is not None:
                    raise StorageCorrupt(
                        f"log terms decrease: entry {bad[0]} has term {bad[1]} after term {bad[2]}"
                    )
                marks = ",".join("?" * len(_KINDS))
                bad = conn.execute(
                    f"SELECT idx, kind FROM entries WHERE idx > ? AND kind NOT IN ({marks})"
                    " LIMIT 1",
                    (snap_index, *_KINDS),
                ).fetchone()
                if bad is not None:
                    raise StorageCorrupt(f"entry {bad[0]} has unknown kind {bad[1]}")
                (last_term,) = conn.execute(
                    "SELECT term FROM entries WHERE idx = ?", (last,)
                ).fetchone()
                last_index = last
            hrow = conn.execute('SELECT term, "commit" FROM hard_state WHERE id = 0').fetchone()
            term, commit = hrow if hrow else (0, 0)
            if commit > last_index:
                raise StorageCorrupt(
                    f"hard state commit {commit} beyond last log index {last_index}"
                )
            if term < last_term:
                raise StorageCorrupt(f"hard state term {term} behind last log term {last_term}")
            self._initial_membership()  # decodable
            if srow:
                for col in ("voters", "learners"):
                    (text,) = conn.execute(f"SELECT {col} FROM snapshot WHERE id = 0").fetchone()
                    schema.members_from_json(text, f"snapshot {col}")
        self._snap_index, self._last_index = snap_index, last_index
        self._stale_from = stale_first if stale_first is not None else snap_index + 1

    # ---------------------------------------------------------------- closing

    def close(self) -> None:
        """Close the database (checkpointing the WAL) and release the data dir. Idempotent."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.close()
        except sqlite3.Error as exc:
            raise _wrap("close", exc) from exc
        finally:
            os.close(self._lock_fd)

    def __enter__(self) -> Storage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- helpers

    def _usable(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError(f"{self.path} is closed")
        if self._failed is not None:
            raise StorageError(f"{self.path} is unusable after an earlier error: {self._failed}")
        return self._conn

    @contextlib.contextmanager
    def _errors(self, what: str, *, poison: bool = False) -> Iterator[None]:
        """Roll back an open transaction on any error; SQLite's errors become ours.
        With ``poison``, any error makes this Storage refuse every later call."""
        assert self._conn is not None
        try:
            yield
        except BaseException as exc:
            conn = self._conn
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if poison:
                self._failed = f"{what}: {exc}"
            if isinstance(exc, sqlite3.Error):
                raise _wrap(what, exc) from exc
            raise
