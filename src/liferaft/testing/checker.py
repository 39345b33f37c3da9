"""Raft's safety properties, checked as the simulator runs.

Each check is incremental, so it can run after every step of thousands of clusters:

- Election safety: at most one leader per term.
- Log matching: an entry is identified by (index, term); every node that persists it
  must hold the same payload *and* the same term just before it. By induction on the
  index that is the Log Matching Property.
- Committed entries are never lost: no node ever removes from its durable log an entry
  known to be committed (a stale leader may still *write* a different entry at a
  committed index it never held; that one is doomed and never commits).
- Leader completeness: a node that becomes leader holds every entry committed so far.
- One vote per term: a node never grants its vote in a term to two candidates, whether
  seen in the granted (non-pre-vote) VoteResponses it sends or in the hard states its
  disk persists, across crashes and restarts; a vote is durable before it is sent, and
  once on disk it is never forgotten within its term.
- The disk never goes back: the term and commit of each node's persisted hard state are
  monotonic over the whole run.
- State machine safety: after applying index ``i`` every node's state digest is the same.
- Linearizable reads: a read index released for a read is at least the highest index any
  node had applied when the read was asked (a client may have seen that write).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from liferaft.core import Entry, HardState, Raft, Snapshot, VoteResponse


class SimulationFailure(AssertionError):
    """A simulated run went wrong; the message names the seed that replays it."""


class SafetyViolation(SimulationFailure):
    """A Raft safety property failed; the message says which and where."""


class DiskRefused(SafetyViolation):
    """The simulated disk was asked for a write real storage refuses (a log with a gap,
    a truncation at or below the snapshot, a hard state that storage would not load
    back): the core broke the Ready contract."""


@dataclass
class Checker:
    leaders: dict[int, str] = field(default_factory=dict)  # term -> leader
    entries: dict[tuple[int, int], tuple[bytes, int, int]] = field(default_factory=dict)
    committed: dict[int, int] = field(default_factory=dict)  # index -> term
    digests: dict[int, bytes] = field(default_factory=dict)  # index -> state digest
    max_applied: int = 0
    reads: dict[bytes, int] = field(default_factory=dict)  # ctx -> index it must reach
    reads_checked: int = 0
    votes: dict[tuple[str, int], str] = field(default_factory=dict)  # (node, term) -> vote
    disk_states: dict[str, HardState] = field(default_factory=dict)  # node -> last on disk

    def fail(self, what: str) -> None:
        raise SafetyViolation(what)

    def on_leader(self, node: str, term: int, raft: Raft) -> None:
        prev = self.leaders.setdefault(term, node)
        if prev != node:
            self.fail(f"election safety: {prev} and {node} both lead term {term}")
        log = raft.log
        for index, t in self.committed.items():
            if index > log.snapshot_index and log.term(index) != t:
                self.fail(
                    f"leader completeness: {node} leads term {term} without committed "
                    f"entry {index} (term {t}); it has term {log.term(index)}"
                )

    def on_vote(self, node: str, term: int, candidate: str) -> None:
        """``node`` voted for ``candidate`` in ``term`` (a grant it sent, or its disk)."""
        prev = self.votes.setdefault((node, term), candidate)
        if prev != candidate:
            self.fail(f"double vote: {node} voted for {prev} and for {candidate} in term {term}")

    def on_vote_sent(self, node: str, m: VoteResponse, disk: HardState) -> None:
        """``node`` sends ``m``, a granted real vote, while ``disk`` is its durable hard
        state: the vote must already be on disk (or its term be over there)."""
        if disk.term < m.term or (disk.term == m.term and disk.vote != m.dst):
            self.fail(
                f"vote not durable: {node} grants {m.dst} its vote in term {m.term} while "
                f"its disk holds term {disk.term}, vote {disk.vote}"
            )
        self.on_vote(node, m.term, m.dst)

    def on_hard_state(self, node: str, hs: HardState) -> None:
        """``node``'s disk now holds ``hs``: term and commit never go back, a vote is
        never forgotten or changed within its term, and counts as a vote granted."""
        prev = self.disk_states.get(node)
        if prev is not None:
            if hs.term < prev.term:
                self.fail(f"disk went back: {node} persisted term {hs.term} after {prev.term}")
            if hs.commit < prev.commit:
                self.fail(
                    f"disk went back: {node} persisted commit {hs.commit} after {prev.commit}"
                )
            if hs.term == prev.term and prev.vote is not None and hs.vote is None:
                self.fail(
                    f"vote forgotten: {node} persisted no vote in term {hs.term} after "
                    f"voting for {prev.vote}"
                )
            if hs.term == prev.term and hs.vote == prev.vote:
                self.disk_states[node] = hs
                return  # the same vote, already recorded
        self.disk_states[node] = hs
        if hs.vote is not None:
            self.on_vote(node, hs.term, hs.vote)

    def on_persist(self, node: str, entry: Entry, prev_term: int) -> None:
        key = (entry.index, entry.term)
        value = (entry.data, int(entry.kind), prev_term)
        seen = self.entries.setdefault(key, value)
        if seen != value:
            self.fail(
                f"log matching: {node} persisted entry {key} with prev term {prev_term} "
                f"and payload {entry.data!r}, another node has prev term {seen[2]} and "
                f"payload {seen[0]!r}"
            )

    def on_remove(self, node: str, removed: list[Entry], snapshot: Snapshot | None) -> None:
        """A node dropped entries from its durable log: never a committed one, unless a
        snapshot that covers it replaced the log."""
        covered = snapshot.meta.index if snapshot is not None else 0
        for e in removed:
            if e.index > covered and self.committed.get(e.index) == e.term:
                self.fail(f"committed entry lost: {node} removed committed entry {e.index}")

    def on_commit(self, node: str, entry: Entry) -> None:
        t = self.committed.setdefault(entry.index, entry.term)
        if t != entry.term:
            self.fail(
                f"state machine safety: {node} committed index {entry.index} at term "
                f"{entry.term}, another node at term {t}"
            )

    def on_apply(self, node: str, index: int, digest: bytes) -> None:
        d = self.digests.setdefault(index, digest)
        if d != digest:
            self.fail(f"state machine safety: {node} has a different state at index {index}")
        self.max_applied = max(self.max_applied, index)

    def on_read_asked(self, ctx: bytes) -> None:
        self.reads[ctx] = self.max_applied

    def on_read_released(self, node: str, ctx: bytes, index: int) -> None:
        need = self.reads.pop(ctx, None)
        if need is None:
            return  # a duplicate answer to a read already answered
        self.reads_checked += 1
        if index < need:
            self.fail(
                f"linearizability: {node} released a read at index {index}, but index "
                f"{need} had been applied before the read was asked"
            )

    def on_read_failed(self, ctx: bytes) -> None:
        self.reads.pop(ctx, None)
