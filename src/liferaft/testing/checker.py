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
- State machine safety: after applying index ``i`` every node's state digest is the same.
- Linearizable reads: a read index released for a read is at least the highest index any
  node had applied when the read was asked (a client may have seen that write).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from liferaft.core import Entry, Raft, Snapshot


class SimulationFailure(AssertionError):
    """A simulated run went wrong; the message names the seed that replays it."""


class SafetyViolation(SimulationFailure):
    """A Raft safety property failed; the message says which and where."""


@dataclass
class Checker:
    leaders: dict[int, str] = field(default_factory=dict)  # term -> leader
    entries: dict[tuple[int, int], tuple[bytes, int, int]] = field(default_factory=dict)
    committed: dict[int, int] = field(default_factory=dict)  # index -> term
    digests: dict[int, bytes] = field(default_factory=dict)  # index -> state digest
    max_applied: int = 0
    reads: dict[bytes, int] = field(default_factory=dict)  # ctx -> index it must reach
    reads_checked: int = 0

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
