"""The replicated key-value state machine on disk: etcd's MVCC in ``state.db``.

Why on disk: a store held in Python memory costs memory ~10x its data and must be
encoded whole for every snapshot, on the event loop. Here the state is SQLite (WAL) and
costs what a query costs, whatever the size of the data; a snapshot is a copy of the file.

This module opens the database, reads it and makes it durable; what applying committed
entries does (one transaction per run, the applied index with it, deterministic on every
replica, etcd's revisions) is ``liferaft.kv.apply``. The database runs with
``synchronous=NORMAL``: a commit survives a crash of the process but may be lost with
the machine; the Raft log (fsynced) is the durable source, replayed after ``applied`` on
restart, and ``sync`` is the barrier the node takes before it drops log entries
(docs/storage.md).

Threads: one writer at a time (``apply``, ``sync``, ``close``), on any thread; reads
(``get``, ``range``, ``events``, ``backup``, ``digest``) on any threads, concurrently with
the writer, each on a pooled read connection that sees the last committed state.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

from liferaft.kv import schema
from liferaft.kv.apply import Applied, Applier, EntryLike, EventRow, Result
from liferaft.kv.queries import (
    KV,
    event_map,
    get_at,
    key_bounds,
    prefix_end,
    range_at,
    read_applied,
)
from liferaft.kv.schema import StateCorrupt
from liferaft.kv.sessions import (
    MAX_SESSIONS,
    SESSION_TTL_MS,
    SESSION_WINDOW,
    SessionTable,
)
from liferaft.kv.watch import Compacted, Event

__all__ = [
    "HISTORY_REVISIONS",
    "KV",
    "Applied",
    "Compacted",
    "EntryLike",
    "EventRow",
    "FutureRevision",
    "Result",
    "StateCorrupt",
    "StateDB",
    "prefix_end",
    "read_applied",
]

DB_NAME = "state.db"
BUSY_TIMEOUT_MS = 5000  # sqlite3.connect's default timeout of 5 s
HISTORY_REVISIONS = 100_000
WRITER_CACHE_KIB = 32 * 1024
READER_CACHE_KIB = 8 * 1024
EVENTS_PAGE = 1024  # revisions per page when reading history, at most
EVENTS_PAGE_BYTES = 4 * 1024 * 1024  # ... and values of about this many bytes at most


class FutureRevision(ValueError):
    """A read at a revision the store has not reached."""


def _connect(path: Path, cache_kib: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA cache_size = -{cache_kib:d}")
    conn.execute("PRAGMA cell_size_check = ON")
    return conn


class StateDB:
    """The key-value state of one node in ``<data_dir>/state.db``; see the module doc."""

    def __init__(
        self,
        path: Path,
        writer: sqlite3.Connection,
        *,
        history_revisions: int,
        session_window: int,
        session_ttl_ms: int,
        max_sessions: int,
    ) -> None:
        """Use ``StateDB.open``."""
        # The limits are configuration, not state: every replica must use the same.
        if history_revisions < 1:
            raise ValueError("history_revisions must be at least 1")
        self.path = path
        self.history_revisions = history_revisions
        self._w = writer
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_readers: list[sqlite3.Connection] = []
        self._sessions = SessionTable(
            writer, window=session_window, ttl_ms=session_ttl_ms, max_sessions=max_sessions
        )
        self._applier = Applier(
            writer,
            self._read_meta(),
            history_revisions=history_revisions,
            sessions=self._sessions,
        )
        self._publish()
        self._sessions.reload()

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        history_revisions: int = HISTORY_REVISIONS,
        session_window: int = SESSION_WINDOW,
        session_ttl_ms: int = SESSION_TTL_MS,
        max_sessions: int = MAX_SESSIONS,
    ) -> StateDB:
        """Open (or create) the state database at ``path``. No integrity scan: opening
        costs the same whatever the size of the data (pages are checked as read)."""
        path = Path(path)
        if not path.exists():  # private: it holds the users' values
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        try:
            conn = _connect(path, WRITER_CACHE_KIB)  # its first PRAGMA reads the header
        except sqlite3.DatabaseError as exc:
            raise StateCorrupt(f"{path}: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StateCorrupt(f"{path}: journal_mode is {mode}, not wal")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA journal_size_limit = 67108864")
            # No checkpoint inside an apply's COMMIT (it would fsync on the apply path):
            # the node calls ``checkpoint`` from a reader thread instead.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            schema.ensure(conn)
            return cls(
                path,
                conn,
                history_revisions=history_revisions,
                session_window=session_window,
                session_ttl_ms=session_ttl_ms,
                max_sessions=max_sessions,
            )
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StateCorrupt(f"{path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise

    def _read_meta(self) -> dict[str, int]:
        meta = dict(self._w.execute("SELECT name, value FROM meta").fetchall())
        missing = set(schema.META_NAMES) - meta.keys()
        if missing:
            raise StateCorrupt(f"{self.path}: meta lacks {sorted(missing)}")
        return meta

    def _publish(self) -> None:
        """Copy the applier's working values to the public ones, which other threads
        read: they only ever show committed state (a reader started now sees at least
        this)."""
        a = self._applier
        self.applied = a.applied
        self.revision = a.revision
        self.compact_revision = a.compact_revision
        self.log_time_ms = a.log_time_ms

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    # ------------------------------------------------------------ reads

    @contextlib.contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        """A read connection inside one read transaction: one consistent state."""
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = _connect(self.path, READER_CACHE_KIB)
            conn.execute("PRAGMA query_only = ON")
            self._all_readers.append(conn)
        try:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")
        finally:
            self._readers.put(conn)

    @staticmethod
    def _read_revisions(conn: sqlite3.Connection) -> tuple[int, int]:
        rows = dict(
            conn.execute(
                "SELECT name, value FROM meta WHERE name IN ('revision', 'compact_revision')"
            ).fetchall()
        )
        return rows["revision"], rows["compact_revision"]

    def _at(self, conn: sqlite3.Connection, revision: int) -> tuple[int, int]:
        """The store revision and the revision to read at (0: now), checked."""
        current, compacted = self._read_revisions(conn)
        if revision:
            if revision > current:
                raise FutureRevision(f"revision {revision} is in the future (now {current})")
            if revision < compacted:
                raise Compacted(compacted)
        return current, revision

    def get(self, key: str, *, revision: int = 0) -> tuple[KV | None, int]:
        """The key-value of ``key`` as of ``revision`` (0: now), and the store's revision.
        Raises Compacted below the compaction point, ValueError for a future one."""
        with self.reader() as conn:
            current, at = self._at(conn, revision)
            return get_at(conn, key, at or current), current

    def range(
        self, prefix: str, *, limit: int = 0, after: str | None = None, revision: int = 0
    ) -> tuple[list[KV], bool, int]:
        """The key-values under ``prefix`` (all for ""), after ``after`` if given, sorted
        by key, at most ``limit`` (0: all); whether there are more; the store revision."""
        with self.reader() as conn:
            current, at = self._at(conn, revision)
            kvs, more = range_at(conn, prefix, limit, after, at)
            return kvs, more, current

    def events(
        self,
        start: int,
        *,
        end: int | None = None,
        key: str | None = None,
        prefix: str | None = None,
        max_revisions: int = EVENTS_PAGE,
        max_bytes: int = EVENTS_PAGE_BYTES,
    ) -> tuple[list[Event], int]:
        """The events of revisions ``start`` .. ``end`` (default: now), at most
        ``max_revisions`` of them and whole revisions of about ``max_bytes`` of values
        (at least one revision), for ``key`` or keys under ``prefix`` (all with
        neither); returns them with the last revision covered (read on from the next).
        Raises Compacted if ``start`` is at or before the compaction point."""
        with self.reader() as conn:
            current, compacted = self._read_revisions(conn)
            if start <= compacted:
                raise Compacted(compacted)
            last = min(current if end is None else end, start + max_revisions - 1)
            if last < start:
                return [], start - 1
            cols = "key, rev, create_rev, version, value"
            if key is not None:
                rows = conn.execute(
                    f"SELECT {cols} FROM events WHERE key = ? AND rev >= ? AND rev <= ? "
                    "ORDER BY rev",
                    (key, start, last),
                )
            else:
                where, params = ("", []) if not prefix else key_bounds(prefix, None)
                rows = conn.execute(
                    f"SELECT {cols} FROM events INDEXED BY events_by_rev "
                    f"WHERE rev >= ? AND rev <= ? {'AND ' + where if where else ''} "
                    "ORDER BY rev, key",
                    (start, last, *params),
                )
            out: list[Event] = []
            size = 0
            rev = 0
            for r in rows:
                if size >= max_bytes and r[1] != rev:  # the page ends with a whole revision
                    return out, rev
                out.append(event_map(*r))
                size += len(r[4]) if r[4] is not None else 0
                rev = r[1]
            return out, last

    def key_count(self) -> int:
        with self.reader() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM kv").fetchone()[0])

    # ------------------------------------------------------------ leases

    def lease(self, lease: int) -> tuple[int, int] | None:
        """``(ttl_ms, remaining_ms)`` of a lease (remaining as last checkpointed), or
        None if there is no such lease."""
        with self.reader() as conn:
            row = conn.execute(
                "SELECT ttl_ms, remaining_ms FROM leases WHERE id = ?", (lease,)
            ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def leases(self) -> list[tuple[int, int, int]]:
        """Every lease: ``(id, ttl_ms, remaining_ms)``, by id."""
        with self.reader() as conn:
            return [
                (int(i), int(t), int(r))
                for i, t, r in conn.execute(
                    "SELECT id, ttl_ms, remaining_ms FROM leases ORDER BY id"
                )
            ]

    def lease_keys(self, lease: int) -> list[str]:
        with self.reader() as conn:
            return [
                str(r[0])
                for r in conn.execute(
                    "SELECT key FROM lease_keys WHERE lease = ? ORDER BY key", (lease,)
                )
            ]

    def digest(self) -> str:
        """A hash of the logical state: applied index, revisions, log time, live keys,
        the history after the compaction point, the sessions and the leases. Two replicas with the
        same ``applied`` have the same digest. Reads the whole database: for tests and
        checks, not for the hot path."""
        h = hashlib.blake2b(digest_size=16)
        with self.reader() as conn:
            for row in conn.execute("SELECT name, value FROM meta WHERE name != 'compacted_to'"):
                h.update(repr(row).encode())
            for row in conn.execute(
                "SELECT kv.key, kv.create_rev, kv.mod_rev, kv.version, e.value FROM kv "
                "JOIN events e ON e.key = kv.key AND e.rev = kv.mod_rev ORDER BY kv.key"
            ):
                h.update(repr(row).encode())
            (compacted,) = conn.execute(
                "SELECT value FROM meta WHERE name = 'compact_revision'"
            ).fetchone()
            for row in conn.execute(
                "SELECT key, rev, create_rev, version, value FROM events WHERE rev > ? "
                "ORDER BY rev, key",
                (compacted,),
            ):
                h.update(repr(row).encode())
            for row in conn.execute("SELECT * FROM sessions ORDER BY id"):
                h.update(repr(row).encode())
            for row in conn.execute("SELECT * FROM leases ORDER BY id"):
                h.update(repr(row).encode())
            for row in conn.execute("SELECT * FROM lease_keys ORDER BY key"):
                h.update(repr(row).encode())
            for row in conn.execute(
                "SELECT r.id, r.seq, r.result FROM session_results r JOIN sessions s "
                "ON s.id = r.id WHERE r.seq > s.max_seq - ? ORDER BY r.id, r.seq",
                (self._sessions.window,),
            ):
                h.update(repr(row).encode())
        return h.hexdigest()

    def backup(self, dest: Path) -> int:
        """Write a consistent copy of the database to ``dest`` (which must not exist)
        without stopping the writer; returns the applied index of the copy."""
        with contextlib.closing(_connect(self.path, READER_CACHE_KIB)) as conn:
            conn.execute("VACUUM INTO ?", (str(dest),))
        return read_applied(dest)

    # ------------------------------------------------------------ durability

    def checkpoint(self) -> int:
        """Copy the WAL into the database without blocking the writer (PASSIVE), so the
        WAL stays small; returns the WAL frames left uncopied. Any thread."""
        with contextlib.closing(_connect(self.path, READER_CACHE_KIB)) as conn:
            _busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return max(0, int(frames) - int(copied))

    def restart_wal(self) -> int:
        """On the writer's turn, after ``checkpoint``: copy the few frames appended
        since and start the WAL over (RESTART), so it stays short. Under continuous
        writes a PASSIVE checkpoint never catches the writer, and the WAL would grow
        without bound (440 MB in 40 s here). Returns the frames left (0: restarted)."""
        # Busy (a reader on the WAL, e.g. a backup for a snapshot transfer) means "next
        # time": with the default 5 s busy timeout RESTART would hold the writer's turn,
        # and every write, until that reader ends.
        self._w.execute("PRAGMA busy_timeout = 0")
        try:
            busy, frames, copied = self._w.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        finally:
            self._w.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS:d}")
        return max(0, int(frames) - int(copied)) if not busy else int(frames)

    def sync(self) -> int:
        """Make everything applied so far durable (fsync the database and its WAL);
        returns the applied index that is now safe from a power loss. Call it on the
        writer's turn (or take ``applied`` there and call ``fsync_files`` after)."""
        applied = self._applier.applied
        self.fsync_files()
        return applied

    def fsync_files(self) -> None:
        """fsync the database file and its WAL. Every commit made before the call is
        durable after it: its frames are in the WAL, or were copied into the database
        by a checkpoint, which SQLite syncs before it lets the WAL be written over. So
        this may run beside the writer, on any thread."""
        for p in (self.path.with_name(self.path.name + "-wal"), self.path):
            try:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        for conn in self._all_readers:
            conn.close()
        self._all_readers.clear()
        self._w.close()

    # ------------------------------------------------------------ apply

    def apply(self, entries: Sequence[EntryLike]) -> Applied:
        """Apply a run of committed entries in one transaction (``liferaft.kv.apply``),
        then show readers the state it committed. A SQLite error (disk full, I/O error)
        rolls the whole run back and propagates: the node must stop, never go on with a
        state it could not write."""
        out = self._applier.apply(entries)
        self._publish()
        return out
