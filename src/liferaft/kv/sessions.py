"""Client sessions: exactly-once writes over retries (Raft dissertation §6.3).

A write that carries ``session`` (16 bytes) and ``seq`` (uint) is applied at most once:
the table remembers the result of the most recent ``SESSION_WINDOW`` seqs of each session
and hands the first result back to a retry. Memory is bounded and every replica makes the
same choices, because time here is *log time* (the largest ``time_ms`` of any applied
command), never a clock:

- a session expires once log time reaches ``SESSION_TTL_MS`` past the log time of its
  last applied command;
- at most ``MAX_SESSIONS`` sessions are kept; a new one evicts the least recently used.

Sessions live in insertion order of last use (an ``OrderedDict``), and the last-use time
is the log time then, which never decreases, so the front is always the oldest session:
expiry and eviction only ever pop from the front.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

SESSION_WINDOW = 128
SESSION_TTL_MS = 10 * 60 * 1000
MAX_SESSIONS = 10_000

Result = dict[str, Any]


class SeqTooOld(Exception):
    """The seq is older than the window: its result, if it ever had one, is forgotten."""


class _Session:
    __slots__ = ("last_ms", "max_seq", "results")

    def __init__(self, last_ms: int, max_seq: int, results: dict[int, Result]) -> None:
        self.last_ms = last_ms  # log time of the last command applied in this session
        self.max_seq = max_seq  # the highest seq applied
        # seq -> first result, exactly the applied seqs in (max_seq - window, max_seq].
        self.results = results


class SessionTable:
    def __init__(
        self,
        *,
        window: int = SESSION_WINDOW,
        ttl_ms: int = SESSION_TTL_MS,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.window = window
        self.ttl_ms = ttl_ms
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session: object) -> bool:
        return session in self._sessions

    def expire(self, log_time: int) -> None:
        """Drop every session idle for ``ttl_ms`` of log time or longer."""
        sessions = self._sessions
        while sessions:
            sid, s = next(iter(sessions.items()))
            if log_time - s.last_ms < self.ttl_ms:
                break
            del sessions[sid]

    def lookup(self, session: bytes, seq: int) -> Result | None:
        """The first result of ``seq`` if it was applied, None if it is new; raises
        SeqTooOld when it is older than the window. Changes nothing."""
        s = self._sessions.get(session)
        if s is None:
            return None
        if seq <= s.max_seq - self.window:
            raise SeqTooOld(seq)
        return s.results.get(seq)

    def record(self, session: bytes, seq: int, result: Result, log_time: int) -> None:
        """Remember the result of a newly applied ``seq`` (``lookup`` returned None)."""
        sessions = self._sessions
        s = sessions.get(session)
        if s is None:
            while len(sessions) >= self.max_sessions:
                sessions.popitem(last=False)
            s = sessions[session] = _Session(log_time, seq, {})
        else:
            sessions.move_to_end(session)
            s.last_ms = log_time
        s.results[seq] = result
        if seq > s.max_seq:
            s.max_seq = seq
        # Results at or below the window's floor are never returned (lookup checks the
        # floor first); prune them in bulk, so an apply costs O(1) on average. Every
        # replica prunes at the same points, so snapshots stay identical.
        if len(s.results) > 2 * self.window:
            floor = s.max_seq - self.window
            s.results = {q: r for q, r in s.results.items() if q > floor}

    # ------------------------------------------------------------ snapshot

    def dump(self) -> list[list[Any]]:
        """``[[session, last_ms, max_seq, [[seq, result], ...]], ...]``, least recently
        used first; results sorted by seq, so equal tables dump equally."""
        return [
            [sid, s.last_ms, s.max_seq, [[q, s.results[q]] for q in sorted(s.results)]]
            for sid, s in self._sessions.items()
        ]

    def load(self, raw: object) -> None:
        """Replace the table with a ``dump``; ValueError if ``raw`` is not one."""
        if type(raw) is not list:
            raise ValueError("sessions must be a list")
        sessions: OrderedDict[bytes, _Session] = OrderedDict()
        for item in raw:
            if type(item) is not list or len(item) != 4:
                raise ValueError("a session is [id, last_ms, max_seq, results]")
            sid, last_ms, max_seq, results = item
            if type(sid) is not bytes or type(last_ms) is not int or type(max_seq) is not int:
                raise ValueError("bad session id, last_ms or max_seq")
            if type(results) is not list:
                raise ValueError("session results must be a list")
            table: dict[int, Result] = {}
            for pair in results:
                if type(pair) is not list or len(pair) != 2:
                    raise ValueError("a session result is [seq, result]")
                seq, result = pair
                if type(seq) is not int or type(result) is not dict:
                    raise ValueError("bad session result")
                table[seq] = result
            sessions[sid] = _Session(last_ms, max_seq, table)
        self._sessions = sessions
