"""Client sessions: exactly-once writes over retries (Raft dissertation §6.3).

A write that carries ``session`` (16 bytes) and ``seq`` (uint) is applied at most once:
the table remembers the result of the most recent ``SESSION_WINDOW`` seqs of each session
and hands the first result back to a retry. Storage is bounded and every replica makes
the same choices, because time here is *log time* (the largest ``time_ms`` of any applied
command), never a clock:

- a session expires once log time reaches ``SESSION_TTL_MS`` past the log time of its
  last applied command;
- at most ``MAX_SESSIONS`` sessions are kept; a new one evicts the least recently used.

The table lives in ``state.db`` (tables ``sessions`` and ``session_results``) and is
written inside the state machine's apply transaction, so it is exactly as durable as
the writes it deduplicates. ``used`` is the position of a session's last command in
the log (its entry's index x 4096 + its place in the entry's batch; older versions
stored the bare index, which is smaller, so the order holds): it orders sessions by
last use, and since log time never decreases along the log, the least recently used
session is also the one idle longest.

The sessions themselves (at most ``max_sessions`` small rows) are also held in memory,
in order of last use, and written back once per apply batch (``flush``): a write in a
session then costs no query for its session and one row for its result, instead of
three statements. Results are read from the database only for a retry.
"""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from typing import Any

import cbor2

from liferaft import safecbor

SESSION_WINDOW = 128
SESSION_TTL_MS = 10 * 60 * 1000
MAX_SESSIONS = 10_000

Result = dict[str, Any]

RESULT_MAX_DEPTH = 8  # result map -> txn results -> kvs list -> kv map

_REVISION_ONLY = b"\xa1hrevision"  # CBOR: a map of one pair, its key "revision"


def encode_result(result: Result) -> bytes:
    """``result`` as canonical CBOR, as stored for a retry. A put's result,
    ``{"revision": n}``, is most results: its encoding is a fixed head and ``n``, made
    in a fifth of the time ``cbor2.dumps`` takes for the map (~1.4 µs of a put's
    ~20 µs of apply)."""
    if len(result) == 1:
        revision = result.get("revision")
        if type(revision) is int and revision >= 0:
            return _REVISION_ONLY + cbor2.dumps(revision)
    return cbor2.dumps(result, canonical=True)


class SeqTooOld(Exception):
    """The seq is older than the window: its result, if it ever had one, is forgotten."""


class SessionTable:
    """The session table of one writer connection; ``flush`` before COMMIT."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        window: int = SESSION_WINDOW,
        ttl_ms: int = SESSION_TTL_MS,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.window = window
        self.ttl_ms = ttl_ms
        self.max_sessions = max_sessions
        self._conn = conn
        self.reload()

    def reload(self) -> None:
        """Re-read the table as committed (after open, or a rolled-back transaction),
        forgetting changes not flushed."""
        # id -> [last_ms, max_seq, used], least recently used first.
        self._sessions: OrderedDict[bytes, list[int]] = OrderedDict(
            (bytes(sid), [last_ms, max_seq, used])
            for sid, last_ms, max_seq, used in self._conn.execute(
                "SELECT id, last_ms, max_seq, used FROM sessions ORDER BY used"
            )
        )
        self._dirty: set[bytes] = set()  # changed or new since the last flush
        self._results: dict[tuple[bytes, int], bytes] = {}  # not yet written

    def __len__(self) -> int:
        return len(self._sessions)

    def _drop_oldest(self) -> None:
        """Rare (expiry, eviction), so written at once: a session created again with the
        same id later in the batch must not see the old one's results."""
        sid, _ = self._sessions.popitem(last=False)
        self._dirty.discard(sid)
        self._conn.execute("DELETE FROM session_results WHERE id = ?", (sid,))
        self._conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))
        for key in [k for k in self._results if k[0] == sid]:
            del self._results[key]

    def expire(self, log_time: int) -> None:
        """Drop every session idle for ``ttl_ms`` of log time or longer."""
        sessions = self._sessions
        while sessions and log_time - next(iter(sessions.values()))[0] >= self.ttl_ms:
            self._drop_oldest()

    def lookup(self, session: bytes, seq: int) -> Result | None:
        """The first result of ``seq`` if it was applied, None if it is new; raises
        SeqTooOld when it is older than the window. Changes nothing."""
        s = self._sessions.get(session)
        if s is None or seq > s[1]:
            return None  # never applied: nothing above max_seq has a result
        if seq <= s[1] - self.window:
            raise SeqTooOld(seq)
        blob = self._results.get((session, seq))
        if blob is None:
            found = self._conn.execute(
                "SELECT result FROM session_results WHERE id = ? AND seq = ?", (session, seq)
            ).fetchone()
            if found is None:
                return None
            blob = found[0]
        result = safecbor.loads(blob, max_depth=RESULT_MAX_DEPTH)
        if type(result) is not dict:
            raise ValueError(f"stored result of a session is {type(result).__name__}")
        return result

    def record(self, session: bytes, seq: int, result: Result, log_time: int, used: int) -> None:
        """Remember the result of a newly applied ``seq`` (``lookup`` returned None);
        ``used`` is the command's position in the log (unique per command)."""
        sessions = self._sessions
        s = sessions.get(session)
        if s is None:
            while len(sessions) >= self.max_sessions:
                self._drop_oldest()
            sessions[session] = [log_time, seq, used]
            known = None
        else:
            known = s[1]
            s[0], s[1], s[2] = log_time, max(known, seq), used
            sessions.move_to_end(session)
        self._dirty.add(session)
        self._results[(session, seq)] = encode_result(result)
        # Results at or below the window's floor are never returned (lookup checks the
        # floor first); prune them each time max_seq enters a new block of ``window``
        # seqs, so a write costs O(1) on average whatever steps the client's seqs take.
        # The points depend on the seqs alone, so every replica prunes alike.
        max_seq = sessions[session][1]
        if known is not None and max_seq // self.window > known // self.window:
            floor = max_seq - self.window
            self._conn.execute(
                "DELETE FROM session_results WHERE id = ? AND seq <= ?", (session, floor)
            )
            for key in [k for k in self._results if k[0] == session and k[1] <= floor]:
                del self._results[key]

    def flush(self) -> None:
        """Write the changes since the last flush (inside the open transaction)."""
        conn = self._conn
        if self._dirty:
            # ``used`` is unique: rows may swap order within a batch, so the upserts go
            # in order of use (a row's new ``used`` never collides with a later one's).
            conn.executemany(
                "INSERT OR REPLACE INTO sessions (id, last_ms, max_seq, used) VALUES (?, ?, ?, ?)",
                [(sid, *self._sessions[sid]) for sid in self._sessions if sid in self._dirty],
            )
            self._dirty.clear()
        if self._results:
            conn.executemany(
                "INSERT OR REPLACE INTO session_results (id, seq, result) VALUES (?, ?, ?)",
                [(sid, seq, blob) for (sid, seq), blob in self._results.items()],
            )
            self._results.clear()
