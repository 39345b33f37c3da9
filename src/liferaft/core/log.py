"""The in-memory Raft log since the last snapshot, with its persistence bookkeeping.

Invariants (checked by ``check``):
- ``entries[i].index == snapshot_index + 1 + i``;
- ``snapshot_index <= applied <= committed <= last_index``;
- ``stable <= last_index``: entries up to ``stable`` are durable, entries from
  ``unstable_from`` on must still be handed to the shell;
- committed entries are never truncated.
"""

from __future__ import annotations

from collections.abc import Sequence

from liferaft.core.errors import UsageError
from liferaft.core.messages import Entry


class RaftLog:
    __slots__ = (
        "applied",
        "committed",
        "entries",
        "snapshot_index",
        "snapshot_term",
        "stable",
        "unstable_from",
    )

    def __init__(
        self,
        snapshot_index: int = 0,
        snapshot_term: int = 0,
        entries: Sequence[Entry] = (),
        committed: int = 0,
    ) -> None:
        self.snapshot_index = snapshot_index
        self.snapshot_term = snapshot_term
        self.entries: list[Entry] = list(entries)
        self.committed = max(committed, snapshot_index)
        self.applied = snapshot_index
        self.stable = self.last_index
        self.unstable_from = self.last_index + 1
        self.check()

    # -- reading -------------------------------------------------------------------

    @property
    def first_index(self) -> int:
        return self.snapshot_index + 1

    @property
    def last_index(self) -> int:
        return self.snapshot_index + len(self.entries)

    @property
    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.snapshot_term

    def term(self, index: int) -> int | None:
        """The term at ``index``; None if compacted away or beyond the end."""
        if index == self.snapshot_index:
            return self.snapshot_term
        if index < self.snapshot_index or index > self.last_index:
            return None
        return self.entries[index - self.snapshot_index - 1].term

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def entry(self, index: int) -> Entry:
        return self.entries[index - self.snapshot_index - 1]

    def slice(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries [lo, hi), at least one if any, stopping before ``max_bytes``."""
        if lo < self.first_index or hi > self.last_index + 1:
            raise UsageError(f"slice [{lo}, {hi}) outside [{self.first_index}, {self.last_index}]")
        out = self.entries[lo - self.first_index : hi - self.first_index]
        if max_bytes is None:
            return out
        total = 0
        for n, e in enumerate(out):
            total += e.size()
            if total > max_bytes and n > 0:
                return out[:n]
        return out

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft §5.4.1: is a candidate's log at least as up to date as ours?"""
        return last_term > self.last_term or (
            last_term == self.last_term and last_index >= self.last_index
        )

    def find_conflict(self, entries: Sequence[Entry]) -> int:
        """Index of the first entry that is new or conflicts with ours; 0 if none."""
        for e in entries:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= ``index`` whose term is <= ``term``, and that term.

        Used on both sides of a rejected append so the leader skips a whole term of
        mismatching entries per round trip. Stops at the snapshot boundary.
        """
        index = min(index, self.last_index)
        while index > self.snapshot_index:
            t = self.entry(index).term
            if t <= term:
                return index, t
            index -= 1
        if index == self.snapshot_index and self.snapshot_term <= term:
            return index, self.snapshot_term
        # Below the snapshot the terms are unknown: point just before it, term unknown (0).
        return max(0, min(index, self.snapshot_index - 1)), 0

    # -- changing ------------------------------------------------------------------

    def append(self, entries: Sequence[Entry]) -> None:
        """Append, truncating any suffix that starts at ``entries[0].index``."""
        if not entries:
            return
        at = entries[0].index
        if at <= self.committed:
            raise UsageError(f"truncating committed entry {at} (committed {self.committed})")
        if at > self.last_index + 1:
            raise UsageError(f"gap: appending {at} after {self.last_index}")
        del self.entries[at - self.first_index :]
        self.entries.extend(entries)
        self.unstable_from = min(self.unstable_from, at)
        self.stable = min(self.stable, at - 1)

    def commit_to(self, index: int) -> bool:
        if index <= self.committed:
            return False
        if index > self.last_index:
            raise UsageError(f"commit {index} beyond last index {self.last_index}")
        self.committed = index
        return True

    def unstable_entries(self) -> list[Entry]:
        if self.unstable_from > self.last_index:
            return []
        return self.entries[self.unstable_from - self.first_index :]

    def stable_to(self, index: int) -> None:
        """The shell made entries up to ``index`` durable."""
        self.stable = max(self.stable, min(index, self.last_index))
        self.unstable_from = max(self.unstable_from, index + 1)

    def compact(self, index: int) -> None:
        """Drop entries up to ``index`` (covered by a snapshot the shell made)."""
        if index <= self.snapshot_index:
            return
        if index > self.applied or index > self.stable:
            raise UsageError(f"compacting to {index} beyond applied {self.applied}")
        term = self.term(index)
        assert term is not None
        del self.entries[: index - self.snapshot_index]
        self.snapshot_index, self.snapshot_term = index, term

    def restore(self, index: int, term: int) -> None:
        """Replace the whole log with a snapshot's position."""
        self.entries.clear()
        self.snapshot_index, self.snapshot_term = index, term
        self.committed = self.applied = index
        self.stable = index
        self.unstable_from = index + 1

    def check(self) -> None:
        for n, e in enumerate(self.entries):
            if e.index != self.snapshot_index + 1 + n:
                raise UsageError(f"log not contiguous at position {n}: index {e.index}")
        if not self.snapshot_index <= self.applied <= self.committed <= self.last_index:
            raise UsageError(
                f"log positions out of order: snapshot {self.snapshot_index}, applied "
                f"{self.applied}, committed {self.committed}, last {self.last_index}"
            )
