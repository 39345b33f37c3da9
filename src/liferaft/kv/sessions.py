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
changed inside the state machine's apply transaction, so it is exactly as durable as
the writes it deduplicates. ``used`` is the log index of a session's last command: it
orders sessions by last use, and since log time never decreases along the log, the
least recently used session is also the one idle longest. The count and that oldest
session's time are mirrored in memory, so the per-command expiry check costs no query.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import cbor2

from liferaft import safecbor

SESSION_WINDOW = 128
SESSION_TTL_MS = 10 * 60 * 1000
MAX_SESSIONS = 10_000

Result = dict[str, Any]

RESULT_MAX_DEPTH = 8  # result map -> txn results -> kvs list -> kv map


class SeqTooOld(Exception):
    """The seq is older than the window: its result, if it ever had one, is forgotten."""


class SessionTable:
    """The session table inside an open write transaction on ``conn``; one writer."""

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
        """Re-read the in-memory mirror (after open, or a rolled-back transaction)."""
        self.count = int(self._conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])
        self._looked_up: tuple[bytes, int | None] | None = None
        self._load_oldest()

    def __len__(self) -> int:
        return self.count

    def _load_oldest(self) -> None:
        row = self._conn.execute(
            "SELECT id, last_ms FROM sessions ORDER BY used LIMIT 1"
        ).fetchone()
        self._oldest_id: bytes | None = None if row is None else bytes(row[0])
        self._oldest_ms: int | None = None if row is None else int(row[1])

    def _drop_oldest(self) -> None:
        sid = self._oldest_id
        self._conn.execute("DELETE FROM session_results WHERE id = ?", (sid,))
        self._conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))
        self.count -= 1
        self._load_oldest()

    def expire(self, log_time: int) -> None:
        """Drop every session idle for ``ttl_ms`` of log time or longer."""
        while self._oldest_ms is not None and log_time - self._oldest_ms >= self.ttl_ms:
            self._drop_oldest()

    def lookup(self, session: bytes, seq: int) -> Result | None:
        """The first result of ``seq`` if it was applied, None if it is new; raises
        SeqTooOld when it is older than the window. Changes nothing."""
        row = self._conn.execute("SELECT max_seq FROM sessions WHERE id = ?", (session,)).fetchone()
        max_seq = None if row is None else int(row[0])
        self._looked_up = (session, max_seq)  # saves record() the same query
        if max_seq is None or seq > max_seq:
            return None  # never applied: nothing above max_seq has a result
        if seq <= max_seq - self.window:
            raise SeqTooOld(seq)
        found = self._conn.execute(
            "SELECT result FROM session_results WHERE id = ? AND seq = ?", (session, seq)
        ).fetchone()
        if found is None:
            return None
        result = safecbor.loads(found[0], max_depth=RESULT_MAX_DEPTH)
        if type(result) is not dict:
            raise ValueError(f"stored result of a session is {type(result).__name__}")
        return result

    def record(self, session: bytes, seq: int, result: Result, log_time: int, used: int) -> None:
        """Remember the result of a newly applied ``seq`` (``lookup`` returned None);
        ``used`` is the command's log index."""
        conn = self._conn
        looked_up, self._looked_up = self._looked_up, None
        if looked_up is not None and looked_up[0] == session:
            known = looked_up[1]
        else:
            row = conn.execute("SELECT max_seq FROM sessions WHERE id = ?", (session,)).fetchone()
            known = None if row is None else int(row[0])
        if known is None:
            while self.count >= self.max_sessions:
                self._drop_oldest()
            conn.execute(
                "INSERT INTO sessions (id, last_ms, max_seq, used) VALUES (?, ?, ?, ?)",
                (session, log_time, seq, used),
            )
            self.count += 1
            if self._oldest_id is None:
                self._oldest_id, self._oldest_ms = session, log_time
            max_seq = seq
        else:
            max_seq = max(known, seq)
            conn.execute(
                "UPDATE sessions SET last_ms = ?, max_seq = ?, used = ? WHERE id = ?",
                (log_time, max_seq, used, session),
            )
            if session == self._oldest_id:
                self._load_oldest()
        conn.execute(
            "INSERT OR REPLACE INTO session_results (id, seq, result) VALUES (?, ?, ?)",
            (session, seq, cbor2.dumps(result, canonical=True)),
        )
        # Results at or below the window's floor are never returned (lookup checks the
        # floor first); prune them each time max_seq enters a new block of ``window``
        # seqs, so a write costs O(1) on average whatever steps the client's seqs take.
        # The points depend on the seqs alone, so every replica prunes alike.
        if known is not None and max_seq // self.window > known // self.window:
            conn.execute(
                "DELETE FROM session_results WHERE id = ? AND seq <= ?",
                (session, max_seq - self.window),
            )
