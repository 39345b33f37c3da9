"""The leader's view of each follower: how far it matches, and how much is in flight.

PROBE: the follower's log is unknown; send one append and wait for the answer.
REPLICATE: appends stream optimistically, bounded by a window of unacknowledged
messages (count and bytes); this is what pipelines replication.
SNAPSHOT: the follower is behind the log's start and is being sent the snapshot.
"""

from __future__ import annotations

import enum
from collections import deque


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


class Inflights:
    """Appends sent but not yet acknowledged: (last index, bytes) per message."""

    __slots__ = ("_queue", "bytes", "max_bytes", "max_count")

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._queue: deque[tuple[int, int]] = deque()
        self.bytes = 0

    def add(self, last_index: int, size: int) -> None:
        self._queue.append((last_index, size))
        self.bytes += size

    def free_to(self, index: int) -> None:
        q = self._queue
        while q and q[0][0] <= index:
            self.bytes -= q.popleft()[1]

    def free_first(self) -> None:
        if self._queue:
            self.bytes -= self._queue.popleft()[1]

    def full(self) -> bool:
        return len(self._queue) >= self.max_count or self.bytes >= self.max_bytes

    def reset(self) -> None:
        self._queue.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._queue)


class Progress:
    __slots__ = (
        "commit_sent",
        "inflights",
        "match",
        "next",
        "probe_sent",
        "read_round",
        "recent_active",
        "snapshot_index",
        "snapshot_offset",
        "snapshot_stalled",
        "state",
    )

    def __init__(self, next_index: int, inflights: Inflights) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.recent_active = False
        self.inflights = inflights
        self.snapshot_index = 0  # index of the snapshot being sent (SNAPSHOT state)
        self.snapshot_offset = 0  # bytes of it the follower acknowledged
        self.snapshot_stalled = False  # no chunk acknowledged since the last heartbeat
        self.read_round = 0  # the newest read-confirmation round it answered
        self.commit_sent = 0  # the highest commit index a message to it could teach it

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT:
            self.next = max(self.match + 1, self.snapshot_index + 1)
        else:
            self.next = self.match + 1
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.inflights.reset()

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflights.reset()

    def become_snapshot(self, index: int) -> None:
        self.state = ProgressState.SNAPSHOT
        self.snapshot_index = index
        self.snapshot_offset = 0
        self.snapshot_stalled = False
        self.probe_sent = False
        self.inflights.reset()

    def maybe_update(self, index: int) -> bool:
        """An acknowledgement up to ``index``; True if it moved ``match``."""
        updated = index > self.match
        if updated:
            self.match = index
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        return updated

    def maybe_decrease_to(self, rejected: int, match_hint: int) -> bool:
        """A rejection of the append at ``rejected``; False if it is stale."""
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def paused(self) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return self.inflights.full()
        return True
