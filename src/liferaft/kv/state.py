"""The replicated key-value state machine on disk: etcd's MVCC in ``state.db``.

Why on disk: a store held in Python memory costs memory ~10x its data and must be
encoded whole for every snapshot, on the event loop. Here the state is SQLite (WAL) and
costs what a query costs, whatever the size of the data; a snapshot is a copy of the file.

Apply (``apply``) takes a run of committed log entries and applies them in ONE
transaction, together with the ``applied`` index they bring the state to (etcd's
consistent index), so state and index never disagree, whatever instant a crash picks.
Entries at or below ``applied`` are skipped: the log may be replayed over a state that
already holds them. The database runs with ``synchronous=NORMAL``: a commit survives a
crash of the process but may be lost with the machine; the Raft log (fsynced) is the
durable source, replayed after ``applied`` on restart, and ``sync`` is the barrier the
node takes before it drops log entries (docs/storage.md).

Apply is deterministic: the state (``digest``) after a given log prefix is the same on
every replica and for every way of cutting the log into batches. Time is the ``time_ms``
the leader stamped on each command (``liferaft.kv.sessions``); the logical compaction
point moves per command; a command that hits a bug in this module is rolled back alone
and answered ``internal`` on every replica alike.

Threads: one writer at a time (``apply``, ``sync``, ``close``), on any thread; reads
(``get``, ``range``, ``events``, ``backup``, ``digest``) on any threads, concurrently with
the writer, each on a pooled read connection that sees the last committed state.
Revisions: as etcd's (see ``liferaft.kv.watch`` for events). A put always bumps the
revision, a delete only if it deleted a key, a txn once for its chosen branch if any of
its writes changed something, a ``compact`` never.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from liferaft.crashpoint import crashpoint
from liferaft.kv import schema
from liferaft.kv.commands import (
    INVALID_REQUEST,
    MAX_BATCH_COMMANDS,
    CommandError,
    check_command,
    decode_entry,
)
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
    SeqTooOld,
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

Result = dict[str, Any]

DB_NAME = "state.db"
NORMAL = 0  # liferaft.core.EntryKind.NORMAL: kv stays importable without the core
HISTORY_REVISIONS = 100_000
COMPACT_STEP = 4096  # revisions of history physically compacted per batch, at least
WRITER_CACHE_KIB = 32 * 1024
READER_CACHE_KIB = 8 * 1024
EVENTS_PAGE = 1024  # rows per page when reading history


class FutureRevision(ValueError):
    """A read at a revision the store has not reached."""


class EntryLike(Protocol):
    """What ``apply`` reads of a ``liferaft.core.Entry``."""

    @property
    def index(self) -> int: ...

    @property
    def kind(self) -> int: ...

    @property
    def data(self) -> bytes: ...


# An event as a row of the events table: (key, rev, create_rev, version, value), value
# None for a delete. Maps (``liferaft.kv.watch``) are made only for those who watch.
EventRow = tuple[str, int, int, int, bytes | None]


@dataclass
class Applied:
    """What one ``apply`` did: a result per input entry (None for entries that are not
    client commands or were applied before; a list for a batch entry, one per command)
    and the events as rows, in revision order (and by key within a revision)."""

    results: list[Result | list[Result] | None] = field(default_factory=list)
    rows: list[EventRow] = field(default_factory=list)

    @property
    def events(self) -> list[list[Event]]:
        """The events as maps, one list per revision."""
        out: list[list[Event]] = []
        for row in self.rows:
            if not out or out[-1][0]["revision"] != row[1]:
                out.append([])
            out[-1].append(event_map(*row))
        return out


def error(code: str, message: str) -> Result:
    return {"error": {"code": code, "message": message}}


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
        self._pending: dict[str, EventRow] = {}  # a txn's or delete's changed keys
        self._put_kv: list[tuple[str, int, int, int]] = []  # buffered puts (_flush_puts)
        self._put_rows: list[EventRow] = []
        self._known: dict[str, tuple[int, int] | None] = {}
        self._load_meta()

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

    def _load_meta(self) -> None:
        meta = dict(self._w.execute("SELECT name, value FROM meta").fetchall())
        missing = set(schema.META_NAMES) - meta.keys()
        if missing:
            raise StateCorrupt(f"{self.path}: meta lacks {sorted(missing)}")
        # The working values, changed command by command inside ``apply``.
        self._applied: int = meta["applied"]  # the last log index applied
        self._revision: int = meta["revision"]  # the number of changing writes so far
        self._compact_revision: int = meta["compact_revision"]  # reads before it: gone
        self._compacted_to: int = meta["compacted_to"]  # history physically compacted
        self._log_time_ms: int = meta["log_time_ms"]  # the largest time_ms applied
        self._publish()
        self._sessions.reload()

    def _publish(self) -> None:
        """Copy the working values to the public ones, which other threads read: they
        only ever show committed state (a reader started now sees at least this)."""
        self.applied = self._applied
        self.revision = self._revision
        self.compact_revision = self._compact_revision
        self.log_time_ms = self._log_time_ms

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
    ) -> tuple[list[Event], int]:
        """The events of revisions ``start`` .. ``end`` (default: now), at most
        ``max_revisions`` of them, for ``key`` or keys under ``prefix`` (all with
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
            return [event_map(*r) for r in rows], last

    def key_count(self) -> int:
        with self.reader() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM kv").fetchone()[0])

    def digest(self) -> str:
        """A hash of the logical state: applied index, revisions, log time, live keys,
        the history after the compaction point and the sessions. Two replicas with the
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
        busy, frames, copied = self._w.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        return max(0, int(frames) - int(copied)) if not busy else int(frames)

    def sync(self) -> int:
        """Make everything applied so far durable (fsync the database and its WAL);
        returns the applied index that is now safe from a power loss. Call it on the
        writer's turn."""
        applied = self._applied
        for p in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return applied

    def close(self) -> None:
        for conn in self._all_readers:
            conn.close()
        self._all_readers.clear()
        self._w.close()

    # ------------------------------------------------------------ apply

    def apply(self, entries: Sequence[EntryLike]) -> Applied:
        """Apply a run of committed entries in one transaction; see the module doc.
        A SQLite error (disk full, I/O error) rolls the whole run back and propagates:
        the node must stop, never go on with a state it could not write."""
        todo = [e for e in entries if e.index > self._applied]
        out = Applied([None] * len(entries))
        if not todo:
            return out
        w = self._w
        before = self._mirror()
        offset = len(entries) - len(todo)
        w.execute("BEGIN IMMEDIATE")
        try:
            try:
                self._apply_run(todo, out, offset, guarded=False)
            except sqlite3.Error:
                raise
            except Exception:  # a bug in one command: redo the run, isolating each
                w.execute("ROLLBACK")
                self._restore(before)
                out = Applied([None] * len(entries))
                w.execute("BEGIN IMMEDIATE")
                self._apply_run(todo, out, offset, guarded=True)
            self._sessions.flush()
            # at least as many revisions as this run wrote (an entry may hold many)
            self._compact_some(max(len(todo), self._revision - before[1]))
            w.executemany(
                "UPDATE meta SET value = ? WHERE name = ?",
                [
                    (self._applied, "applied"),
                    (self._revision, "revision"),
                    (self._compact_revision, "compact_revision"),
                    (self._compacted_to, "compacted_to"),
                    (self._log_time_ms, "log_time_ms"),
                ],
            )
            crashpoint("apply_before_commit")
            w.execute("COMMIT")
            crashpoint("apply_after_commit")
            self._publish()
        except BaseException:
            if w.in_transaction:
                w.execute("ROLLBACK")
            self._restore(before)
            raise
        return out

    def _mirror(self) -> tuple[int, ...]:
        return (
            self._applied,
            self._revision,
            self._compact_revision,
            self._compacted_to,
            self._log_time_ms,
        )

    def _restore(self, m: tuple[int, ...]) -> None:
        (
            self._applied,
            self._revision,
            self._compact_revision,
            self._compacted_to,
            self._log_time_ms,
        ) = m
        self._sessions.reload()
        self._pending = {}
        self._put_kv = []
        self._put_rows = []
        self._known.clear()

    def _apply_run(
        self, todo: Sequence[EntryLike], out: Applied, offset: int, *, guarded: bool
    ) -> None:
        rows = out.rows
        for i, e in enumerate(todo, offset):
            if e.kind == NORMAL:
                out.results[i] = self._entry(e, rows, guarded=guarded)
            self._applied = e.index

    def _entry(
        self, e: EntryLike, rows: list[EventRow], *, guarded: bool = False
    ) -> Result | list[Result]:
        """Apply one client entry: a batch (a result per command) or one command.
        ``guarded``: each command in a savepoint, so a bug in one fails it alone."""
        try:
            time_ms, cmds, batch = decode_entry(e.data)
        except CommandError as exc:
            return error(INVALID_REQUEST, f"bad command: {exc}")
        if time_ms > self._log_time_ms:
            self._log_time_ms = time_ms
        self._sessions.expire(self._log_time_ms)
        # ``used`` orders sessions by last use and is unique: one value per command.
        used = e.index * MAX_BATCH_COMMANDS
        if guarded:
            results = [self._guarded(cmd, e.index, used + i, rows) for i, cmd in enumerate(cmds)]
        else:
            self._prefetch(cmds)
            results = [self._command(cmd, used + i, rows) for i, cmd in enumerate(cmds)]
            self._flush_puts()
        return results if batch else results[0]

    def _guarded(self, cmd: object, index: int, used: int, rows: list[EventRow]) -> Result:
        w = self._w
        before = self._mirror()
        self._sessions.flush()  # so a rollback to the savepoint can reload
        mark = len(rows)
        w.execute("SAVEPOINT cmd")
        try:
            result = self._command(cmd, used, rows)
            self._flush_puts()
        except sqlite3.Error:
            raise
        except Exception as exc:  # every replica fails alike: same answer
            w.execute("ROLLBACK TO cmd")
            self._restore(before)
            del rows[mark:]
            result = error("internal", f"applying entry {index} failed: {exc!r:.200}")
        w.execute("RELEASE cmd")
        return result

    def _command(self, cmd: object, used: int, rows: list[EventRow]) -> Result:
        try:
            cmd = check_command(cmd)
        except CommandError as exc:
            return error(INVALID_REQUEST, f"bad command: {exc}")
        session: bytes | None = cmd.get("session")
        seq: int = cmd.get("seq", 0)
        if session is not None:
            try:
                first = self._sessions.lookup(session, seq)
            except SeqTooOld:
                return error(INVALID_REQUEST, "sequence number too old")
            if first is not None:
                return first
        if cmd["op"] == "put":
            result = self._put_buffered(cmd["key"], cmd["value"], rows)
        else:
            self._flush_puts()  # what follows reads the tables
            result = self._execute(cmd, rows)
        if session is not None:
            self._sessions.record(session, seq, result, self._log_time_ms, used)
        return result

    # A run of puts is written with two ``executemany`` at the end of its entry (or
    # before any other command) instead of two statements per put; the keys' rows are
    # read up front in one query. ``_known`` holds each key's (create_rev, version) as
    # of the buffered puts, None for a key that does not exist.

    def _prefetch(self, cmds: list[Any]) -> None:
        keys = [
            c["key"]
            for c in cmds
            if type(c) is dict and c.get("op") == "put" and type(c.get("key")) is str
        ]
        known = self._known
        for k in keys:
            known[k] = None
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, create, version in self._w.execute(
                f"SELECT key, create_rev, version FROM kv WHERE key IN ({marks})", chunk
            ):
                known[key] = (create, version)

    def _put_buffered(self, key: str, value: bytes, rows: list[EventRow]) -> Result:
        rev = self._revision + 1
        known = self._known
        if key in known:
            state = known[key]
        else:
            state = self._w.execute(
                "SELECT create_rev, version FROM kv WHERE key = ?", (key,)
            ).fetchone()
        create, version = (rev, 1) if state is None else (state[0], state[1] + 1)
        known[key] = (create, version)
        self._put_kv.append((key, rev, create, version))
        row = (key, rev, create, version, value)
        self._put_rows.append(row)
        rows.append(row)
        self._revision = rev
        if rev - self.history_revisions > self._compact_revision:
            self._compact_revision = rev - self.history_revisions
        return {"revision": rev}

    def _flush_puts(self) -> None:
        if self._put_kv:
            w = self._w
            w.executemany(_SET_KV, self._put_kv)
            w.executemany(_INSERT_EVENT, self._put_rows)
            self._put_kv = []
            self._put_rows = []
        self._known.clear()

    def _execute(self, cmd: dict[str, Any], rows: list[EventRow]) -> Result:
        op = cmd["op"]
        if op == "compact":
            return self._compact_op(cmd["revision"])
        rev = self._revision + 1  # the revision of this write, if it changes anything
        self._pending = {}
        result: Result
        if op == "put":
            self._put(cmd["key"], cmd["value"], rev)
            result = {}
        elif op == "delete":
            result = {"deleted": self._delete(cmd, rev)}
        else:
            succeeded = all(self._compare(c) for c in cmd.get("compare", []))
            ops = cmd.get("success" if succeeded else "failure", [])
            results = [self._txn_op(sub, rev) for sub in ops]
            result = {"succeeded": succeeded, "results": results}
        changed = [self._pending[k] for k in sorted(self._pending)]
        self._pending = {}
        if changed:
            rows.extend(changed)
            self._revision = rev
            self._compact_revision = max(self._compact_revision, rev - self.history_revisions)
        if op == "txn":
            for r in result["results"]:
                r["revision"] = self._revision
        result["revision"] = self._revision
        return result

    def _compact_op(self, revision: int) -> Result:
        if revision > self._revision:
            return error(
                INVALID_REQUEST, f"revision {revision} is in the future (now {self._revision})"
            )
        if revision < self._compact_revision:
            return {
                "error": {
                    "code": "compacted",
                    "message": f"revisions before {self._compact_revision} are compacted",
                    "compact_revision": self._compact_revision,
                }
            }
        self._compact_revision = revision
        return {"revision": self._revision}

    def _txn_op(self, sub: dict[str, Any], rev: int) -> Result:
        op = sub["op"]
        if op == "put":
            self._put(sub["key"], sub["value"], rev)
            return {}
        if op == "delete":
            return {"deleted": self._delete(sub, rev)}
        if op == "get":
            return {"kv": get_at(self._w, sub["key"], rev)}
        kvs, more = range_at(self._w, sub["prefix"], sub.get("limit", 0), None, 0)
        return {"kvs": kvs, "more": more}

    def _put(self, key: str, value: bytes, rev: int) -> None:
        w = self._w
        create, version = w.execute(_UPSERT_KV, (key, rev, rev)).fetchone()
        row = (key, rev, create, version, value)
        w.execute(_INSERT_EVENT, row)
        self._pending[key] = row

    def _delete(self, req: dict[str, Any], rev: int) -> int:
        w = self._w
        if "key" in req:
            keys = (
                [req["key"]]
                if w.execute("SELECT 1 FROM kv WHERE key = ?", (req["key"],)).fetchone()
                else []
            )
        else:
            where, params = key_bounds(req["prefix"], None)
            keys = [r[0] for r in w.execute(f"SELECT key FROM kv WHERE {where}", params)]
        if keys:
            w.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in keys])
            w.executemany(
                "INSERT OR REPLACE INTO events (key, rev, create_rev, version, value) "
                "VALUES (?, ?, 0, 0, NULL)",
                [(k, rev) for k in keys],
            )
            for k in keys:
                self._pending[k] = (k, rev, 0, 0, None)
        return len(keys)

    def _compare(self, c: dict[str, Any]) -> bool:
        target, op, want = c["target"], c["result"], c["value"]
        row = self._w.execute(
            "SELECT mod_rev, create_rev, version FROM kv WHERE key = ?", (c["key"],)
        ).fetchone()
        have: Any
        if target == "value":
            if row is not None:
                (have,) = self._w.execute(
                    "SELECT value FROM events WHERE key = ? AND rev = ?", (c["key"], row[0])
                ).fetchone()
            else:
                have = None
            if have is None or want is None:  # null is equal to null only, never ordered
                if op == "==":
                    return have is want
                return op == "!=" and have is not want
        else:
            column = {"mod_revision": 0, "create_revision": 1, "version": 2}[target]
            have = 0 if row is None else row[column]
        if op == "==":
            return bool(have == want)
        if op == "!=":
            return bool(have != want)
        if op == "<":
            return bool(have < want)
        return bool(have > want)

    def _compact_some(self, commands: int) -> None:
        """Physically drop history below the compaction point, a bounded step per run:
        for each key changed in the step, every row older than its newest row there,
        and that row too if it is a delete. What is left below the point is exactly the
        newest put of each key, which is what a read at the point needs."""
        target = self._compact_revision
        if self._compacted_to >= target:
            return
        upto = min(target, self._compacted_to + max(COMPACT_STEP, 2 * commands))
        w = self._w
        rows = w.execute(
            "SELECT key, MAX(rev), value IS NULL FROM events INDEXED BY events_by_rev "
            "WHERE rev > ? AND rev <= ? GROUP BY key",
            (self._compacted_to, upto),
        ).fetchall()
        w.executemany("DELETE FROM events WHERE key = ? AND rev < ?", [r[:2] for r in rows])
        w.executemany("DELETE FROM events WHERE key = ? AND rev = ?", [r[:2] for r in rows if r[2]])
        self._compacted_to = upto


_SET_KV = (
    "INSERT INTO kv (key, mod_rev, create_rev, version) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET mod_rev = excluded.mod_rev, version = excluded.version"
)
_INSERT_EVENT = (
    "INSERT OR REPLACE INTO events (key, rev, create_rev, version, value) VALUES (?, ?, ?, ?, ?)"
)

# A put's key row: new (version 1, created now) or updated (version + 1), in one step.
_UPSERT_KV = (
    "INSERT INTO kv (key, mod_rev, create_rev, version) VALUES (?, ?, ?, 1) "
    "ON CONFLICT (key) DO UPDATE SET mod_rev = excluded.mod_rev, version = version + 1 "
    "RETURNING create_rev, version"
)
