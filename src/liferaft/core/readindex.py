"""Bookkeeping for ReadIndex reads on the leader.

A read registered while the commit index is ``c`` may be served at ``c`` once a quorum
has acknowledged a heartbeat sent *after* it was registered: that proves no other leader
had been elected at that moment. Heartbeats carry a round number; a new read asks for
the next round, so all reads that arrive between two heartbeats share one round trip.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PendingRead:
    ctx: bytes
    index: int
    requester: str | None  # None: the leader's own client; else the follower that asked
    round: int


class ReadQueue:
    __slots__ = ("_reads", "need_round", "round", "waiting_for_commit")

    def __init__(self) -> None:
        self.round = 0  # the newest round sent in a heartbeat
        self.need_round = False  # a read waits for a round not yet sent
        self._reads: deque[PendingRead] = deque()
        # reads that came before the leader committed an entry of its term
        self.waiting_for_commit: list[tuple[bytes, str | None]] = []

    def add(self, ctx: bytes, index: int, requester: str | None) -> None:
        self._reads.append(PendingRead(ctx, index, requester, self.round + 1))
        self.need_round = True

    def next_round(self) -> int:
        """The round to put in the heartbeat being sent now."""
        if self.need_round:
            self.round += 1
            self.need_round = False
        return self.round

    def release(self, confirmed_round: int) -> list[PendingRead]:
        out: list[PendingRead] = []
        while self._reads and self._reads[0].round <= confirmed_round:
            out.append(self._reads.popleft())
        return out

    def drain(self) -> list[tuple[bytes, str | None]]:
        """Everything still pending (the leader lost its leadership)."""
        out = [(r.ctx, r.requester) for r in self._reads] + self.waiting_for_commit
        self._reads.clear()
        self.waiting_for_commit = []
        self.need_round = False
        return out

    def __len__(self) -> int:
        return len(self._reads) + len(self.waiting_for_commit)
