"""Applying committed log entries to ``state.db``: the state machine's transitions.

A run of entries is applied in ONE transaction, together with the ``applied`` index it
brings the state to (etcd's consistent index), so state and index never disagree,
whatever instant a crash picks. Entries at or below ``applied`` are skipped: the log may
be replayed over a state that already holds them.

Apply is deterministic: the state (``StateDB.digest``) after a given log prefix is the
same on every replica and for every way of cutting the log into batches. Time is the
``time_ms`` the leader stamped on each command (``liferaft.kv.sessions``); the logical
compaction point moves per command; a command that hits a bug in this module is rolled
back alone and answered ``internal`` on every replica alike.

Revisions: as etcd's (see ``liferaft.kv.watch`` for events). A put always bumps the
revision, a delete only if it deleted a key, a txn once for its chosen branch if any of
its writes changed something, a ``compact`` never.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from liferaft.crashpoint import crashpoint
from liferaft.kv.commands import (
    INVALID_REQUEST,
    MAX_BATCH_COMMANDS,
    TOO_LARGE,
    CommandError,
    check_command,
    decode_entry,
)
from liferaft.kv.queries import event_map, get_at, key_bounds, range_at
from liferaft.kv.sessions import SeqTooOld, SessionTable
from liferaft.kv.watch import Event

Result = dict[str, Any]

NORMAL = 0  # liferaft.core.EntryKind.NORMAL: kv stays importable without the core
COMPACT_STEP = 4096  # revisions of history physically compacted per batch, at least
MAX_LEASES = 10_000  # leases in the store at once
MAX_KEYS_PER_LEASE = 10_000
NOT_FOUND = "not_found"

# An event as a row of the events table: (key, rev, create_rev, version, value), value
# None for a delete. Maps (``liferaft.kv.watch``) are made only for those who watch.
EventRow = tuple[str, int, int, int, bytes | None]


class EntryLike(Protocol):
    """What ``apply`` reads of a ``liferaft.core.Entry``."""

    @property
    def index(self) -> int: ...

    @property
    def kind(self) -> int: ...

    @property
    def data(self) -> bytes: ...


@dataclass
class Applied:
    """What one ``apply`` did: a result per input entry (None for entries that are not
    client commands or were applied before; a list for a batch entry, one per command)
    and the events as rows, in revision order (and by key within a revision)."""

    results: list[Result | list[Result] | None] = field(default_factory=list)
    rows: list[EventRow] = field(default_factory=list)
    # leases granted (id, ttl ms) or gone (id, None), in order: the leader's lessor
    # follows them (node/lessor.py)
    leases: list[tuple[int, int | None]] = field(default_factory=list)

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


class Applier:
    """The writer's side of a ``StateDB``, the only code that changes the database.

    Its ``applied``, ``revision``, ``compact_revision``, ``compacted_to`` and
    ``log_time_ms`` are the working values, changed command by command inside a run and
    rolled back with it; the ``StateDB`` shows readers its own copies, taken once a run
    has committed."""

    def __init__(
        self,
        writer: sqlite3.Connection,
        meta: dict[str, int],
        *,
        history_revisions: int,
        sessions: SessionTable,
    ) -> None:
        self.history_revisions = history_revisions
        self._w = writer
        self._sessions = sessions
        self.applied = meta["applied"]  # the last log index applied
        self.revision = meta["revision"]  # the number of changing writes so far
        self.compact_revision = meta["compact_revision"]  # reads before it: gone
        self.compacted_to = meta["compacted_to"]  # history physically compacted
        self.log_time_ms = meta["log_time_ms"]  # the largest time_ms applied
        self._pending: dict[str, EventRow] = {}  # a txn's or delete's changed keys
        self._put_kv: list[tuple[str, int, int, int]] = []  # buffered puts (_flush_puts)
        self._put_rows: list[EventRow] = []
        self._known: dict[str, tuple[int, int] | None] = {}
        self._leases: list[tuple[int, int | None]] = []  # this run's lease changes
        # Whether any key may hold a lease: plain puts then detach their keys (a put
        # without a lease takes the key off its lease, as in etcd); never cleared.
        # (fetchall: a statement left unfinished would hold a read transaction open)
        self._maybe_leased = (
            writer.execute("SELECT EXISTS (SELECT 1 FROM lease_keys)").fetchall()[0][0] == 1
        )

    def apply(self, entries: Sequence[EntryLike]) -> Applied:
        """Apply a run of committed entries in one transaction; see the module doc.
        A SQLite error (disk full, I/O error) rolls the whole run back and propagates:
        the node must stop, never go on with a state it could not write."""
        todo = [e for e in entries if e.index > self.applied]
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
            out.leases, self._leases = self._leases, []
            self._sessions.flush()
            # at least as many revisions as this run wrote (an entry may hold many)
            self._compact_some(max(len(todo), self.revision - before[1]))
            w.executemany(
                "UPDATE meta SET value = ? WHERE name = ?",
                [
                    (self.applied, "applied"),
                    (self.revision, "revision"),
                    (self.compact_revision, "compact_revision"),
                    (self.compacted_to, "compacted_to"),
                    (self.log_time_ms, "log_time_ms"),
                ],
            )
            crashpoint("apply_before_commit")
            w.execute("COMMIT")
            crashpoint("apply_after_commit")
        except BaseException:
            if w.in_transaction:
                w.execute("ROLLBACK")
            self._restore(before)
            raise
        return out

    def _mirror(self) -> tuple[int, ...]:
        return (
            self.applied,
            self.revision,
            self.compact_revision,
            self.compacted_to,
            self.log_time_ms,
        )

    def _restore(self, m: tuple[int, ...]) -> None:
        (
            self.applied,
            self.revision,
            self.compact_revision,
            self.compacted_to,
            self.log_time_ms,
        ) = m
        self._sessions.reload()
        self._pending = {}
        self._put_kv = []
        self._put_rows = []
        self._known.clear()
        self._leases = []

    def _apply_run(
        self, todo: Sequence[EntryLike], out: Applied, offset: int, *, guarded: bool
    ) -> None:
        rows = out.rows
        for i, e in enumerate(todo, offset):
            if e.kind == NORMAL:
                out.results[i] = self._entry(e, rows, guarded=guarded)
            self.applied = e.index

    def _entry(
        self, e: EntryLike, rows: list[EventRow], *, guarded: bool = False
    ) -> Result | list[Result]:
        """Apply one client entry: a batch (a result per command) or one command.
        ``guarded``: each command in a savepoint, so a bug in one fails it alone."""
        try:
            time_ms, cmds, batch = decode_entry(e.data)
        except CommandError as exc:
            return error(INVALID_REQUEST, f"bad command: {exc}")
        if time_ms > self.log_time_ms:
            self.log_time_ms = time_ms
        self._sessions.expire(self.log_time_ms)
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
        mark, lease_mark = len(rows), len(self._leases)
        w.execute("SAVEPOINT cmd")
        try:
            result = self._command(cmd, used, rows)
            self._flush_puts()
        except sqlite3.Error:
            raise
        except Exception as exc:  # every replica fails alike: same answer
            w.execute("ROLLBACK TO cmd")
            leases = self._leases[:lease_mark]
            self._restore(before)
            self._leases = leases
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
        if cmd["op"] == "put" and "lease" not in cmd:
            result = self._put_buffered(cmd["key"], cmd["value"], rows)
        else:
            self._flush_puts()  # what follows reads the tables
            result = self._execute(cmd, rows, used)
        if session is not None:
            self._sessions.record(session, seq, result, self.log_time_ms, used)
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
        rev = self.revision + 1
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
        self.revision = rev
        if rev - self.history_revisions > self.compact_revision:
            self.compact_revision = rev - self.history_revisions
        return {"revision": rev}

    def _flush_puts(self) -> None:
        if self._put_kv:
            w = self._w
            w.executemany(_SET_KV, self._put_kv)
            w.executemany(_INSERT_EVENT, self._put_rows)
            if self._maybe_leased:  # a plain put takes its key off any lease
                keys = [k[0] for k in self._put_kv]
                for start in range(0, len(keys), 500):
                    chunk = keys[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    w.execute(f"DELETE FROM lease_keys WHERE key IN ({marks})", chunk)
            self._put_kv = []
            self._put_rows = []
        self._known.clear()

    def _execute(self, cmd: dict[str, Any], rows: list[EventRow], used: int) -> Result:
        op = cmd["op"]
        if op == "compact":
            return self._compact_op(cmd["revision"])
        if op == "lease_grant":
            return self._lease_grant(cmd, used)
        if op == "lease_checkpoint":
            return self._lease_checkpoint(cmd["leases"])
        rev = self.revision + 1  # the revision of this write, if it changes anything
        self._pending = {}
        result: Result
        if op == "put":
            refused = self._leases_refuse([cmd])
            if refused is not None:
                return refused
            self._put(cmd["key"], cmd["value"], rev, cmd.get("lease"))
            result = {}
        elif op == "delete":
            result = {"deleted": self._delete(cmd, rev)}
        elif op == "lease_revoke":
            if not self._revoke(cmd["lease"], rev):
                return error(NOT_FOUND, f"lease {cmd['lease']:x} not found")
            result = {}
        else:
            succeeded = all(self._compare(c) for c in cmd.get("compare", []))
            ops = cmd.get("success" if succeeded else "failure", [])
            refused = self._leases_refuse(ops)
            if refused is not None:
                return refused
            results = [self._txn_op(sub, rev) for sub in ops]
            result = {"succeeded": succeeded, "results": results}
        changed = [self._pending[k] for k in sorted(self._pending)]
        self._pending = {}
        if changed:
            rows.extend(changed)
            self.revision = rev
            self.compact_revision = max(self.compact_revision, rev - self.history_revisions)
        if op == "txn":
            for r in result["results"]:
                r["revision"] = self.revision
        result["revision"] = self.revision
        return result

    def _compact_op(self, revision: int) -> Result:
        if revision > self.revision:
            return error(
                INVALID_REQUEST, f"revision {revision} is in the future (now {self.revision})"
            )
        if revision < self.compact_revision:
            return {
                "error": {
                    "code": "compacted",
                    "message": f"revisions before {self.compact_revision} are compacted",
                    "compact_revision": self.compact_revision,
                }
            }
        self.compact_revision = revision
        return {"revision": self.revision}

    # ------------------------------------------------------------ leases

    def _lease_grant(self, cmd: dict[str, Any], used: int) -> Result:
        """A lease with a chosen id, or one made from the command's place in the log
        (unique, and the same on every replica)."""
        lease = cmd.get("lease") or used
        w = self._w
        if w.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone():
            return error(INVALID_REQUEST, f"lease {lease:x} exists already")
        (count,) = w.execute("SELECT COUNT(*) FROM leases").fetchone()
        if count >= MAX_LEASES:
            return error(TOO_LARGE, f"at most {MAX_LEASES} leases at once")
        ttl_ms = cmd["ttl"] * 1000
        w.execute(
            "INSERT INTO leases (id, ttl_ms, remaining_ms, granted_ms) VALUES (?, ?, ?, ?)",
            (lease, ttl_ms, ttl_ms, self.log_time_ms),
        )
        self._leases.append((lease, ttl_ms))
        return {"lease": lease, "ttl": cmd["ttl"]}

    def _lease_checkpoint(self, pairs: list[list[int]]) -> Result:
        """The leader's record of the TTL each lease had left: where a new leader
        starts counting from."""
        self._w.executemany(
            "UPDATE leases SET remaining_ms = MIN(?, ttl_ms) WHERE id = ?",
            [(remaining, lease) for lease, remaining in pairs],
        )
        return {}

    def _leases_refuse(self, ops: list[dict[str, Any]]) -> Result | None:
        """The error for puts that name a lease that does not exist or holds too many
        keys (checked before anything is written: a txn applies whole or not at all)."""
        added: dict[int, set[str]] = {}
        for sub in ops:
            if sub.get("op") == "put" and "lease" in sub:
                added.setdefault(sub["lease"], set()).add(sub["key"])
        w = self._w
        for lease, keys in added.items():
            if not w.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone():
                return error(NOT_FOUND, f"lease {lease:x} not found")
            marks = ",".join("?" * len(keys))
            (held,) = w.execute(
                f"SELECT COUNT(*) FROM lease_keys WHERE lease = ? AND key NOT IN ({marks})",
                (lease, *keys),
            ).fetchone()
            if held + len(keys) > MAX_KEYS_PER_LEASE:
                return error(
                    TOO_LARGE, f"lease {lease:x} would hold over {MAX_KEYS_PER_LEASE} keys"
                )
        return None

    def _revoke(self, lease: int, rev: int) -> bool:
        """Delete the lease and every key it holds (at revision ``rev``)."""
        w = self._w
        if not w.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone():
            return False
        keys = [
            r[0]
            for r in w.execute("SELECT key FROM lease_keys WHERE lease = ? ORDER BY key", (lease,))
        ]
        self._delete_keys(keys, rev)
        w.execute("DELETE FROM leases WHERE id = ?", (lease,))
        self._leases.append((lease, None))
        return True

    def _txn_op(self, sub: dict[str, Any], rev: int) -> Result:
        op = sub["op"]
        if op == "put":
            self._put(sub["key"], sub["value"], rev, sub.get("lease"))
            return {}
        if op == "delete":
            return {"deleted": self._delete(sub, rev)}
        if op == "get":
            return {"kv": get_at(self._w, sub["key"], rev)}
        kvs, more = range_at(self._w, sub["prefix"], sub.get("limit", 0), None, 0)
        return {"kvs": kvs, "more": more}

    def _put(self, key: str, value: bytes, rev: int, lease: int | None = None) -> None:
        """A put (its lease, if any, checked by ``_leases_refuse``)."""
        w = self._w
        create, version = w.execute(_UPSERT_KV, (key, rev, rev)).fetchone()
        row = (key, rev, create, version, value)
        w.execute(_INSERT_EVENT, row)
        self._pending[key] = row
        if lease is not None:
            w.execute(_SET_LEASE, (key, lease))
            self._maybe_leased = True
        elif self._maybe_leased:
            w.execute("DELETE FROM lease_keys WHERE key = ?", (key,))

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
        self._delete_keys(keys, rev)
        return len(keys)

    def _delete_keys(self, keys: list[str], rev: int) -> None:
        """Delete ``keys`` (which exist) at revision ``rev``, off their leases too."""
        if not keys:
            return
        w = self._w
        w.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in keys])
        w.executemany(
            "INSERT OR REPLACE INTO events (key, rev, create_rev, version, value) "
            "VALUES (?, ?, 0, 0, NULL)",
            [(k, rev) for k in keys],
        )
        if self._maybe_leased:
            w.executemany("DELETE FROM lease_keys WHERE key = ?", [(k,) for k in keys])
        for k in keys:
            self._pending[k] = (k, rev, 0, 0, None)

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
        target = self.compact_revision
        if self.compacted_to >= target:
            return
        upto = min(target, self.compacted_to + max(COMPACT_STEP, 2 * commands))
        w = self._w
        rows = w.execute(
            "SELECT key, MAX(rev), value IS NULL FROM events INDEXED BY events_by_rev "
            "WHERE rev > ? AND rev <= ? GROUP BY key",
            (self.compacted_to, upto),
        ).fetchall()
        w.executemany("DELETE FROM events WHERE key = ? AND rev < ?", [r[:2] for r in rows])
        w.executemany("DELETE FROM events WHERE key = ? AND rev = ?", [r[:2] for r in rows if r[2]])
        self.compacted_to = upto


_SET_KV = (
    "INSERT INTO kv (key, mod_rev, create_rev, version) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET mod_rev = excluded.mod_rev, version = excluded.version"
)
_SET_LEASE = (
    "INSERT INTO lease_keys (key, lease) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET lease = excluded.lease"
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
