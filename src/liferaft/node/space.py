"""The nospace alarm: a node whose disk is nearly full stops taking writes that grow the
store, before SQLite runs out of room.

Why before: a write that fails for want of space fails the node (fail-stop: after a
failed write whether anything reached the disk is unknowable, docs/storage.md), which
loses nothing but is an outage, and a client sees only ``unavailable``. With a reserve
left, the leader answers ``no_space`` at once, keeps serving reads, deletes and
compaction (the ways to make room), and takes writes again by itself once space is
back, as etcd's NOSPACE alarm does. The reserve is 5 % of the filesystem, at most
64 MiB; the alarm clears at twice the reserve, so it does not flap.
"""

from __future__ import annotations

RESERVE_MAX = 64 * 1024 * 1024
RESERVE_SHARE = 0.05
CHECK_SECONDS = 0.25  # a reading this often when nothing is written
WRITING_SECONDS = 0.01  # ... and this often while writes come in (statvfs: microseconds)
MIN_BUDGET = 16 * 1024  # bytes proposed between two readings, at least
# A byte proposed costs several on disk: in raft.db and state.db, each first in its WAL
# and then again in the database file until the WAL is reset, on every node that shares
# the filesystem (three, in a local cluster). Readings come after 1/64 of the room.
ROOM_SHARE = 64


def reserve_bytes(total: int) -> int:
    return min(RESERVE_MAX, int(total * RESERVE_SHARE))


class SpaceAlarm:
    """Readings come every CHECK_SECONDS, and while writes come in (``wrote``) every
    WRITING_SECONDS or after 1/ROOM_SHARE of the room left above the reserve was
    proposed, whichever is first: a burst of writes, or another program filling the
    disk, cannot run through the reserve between two readings."""

    def __init__(self) -> None:
        self.raised = False
        self._since = 0  # bytes proposed since the last reading
        self._budget = 0  # ... after which to take a reading at once
        self._last = float("-inf")  # when the last reading was taken

    def wrote(self, size: int, now: float) -> bool:
        """Count ``size`` bytes proposed at ``now``; True when a reading is due."""
        self._since += size
        return self._since > self._budget or now - self._last >= WRITING_SECONDS

    def update(self, free: int, total: int, now: float) -> str | None:
        """Take a new reading; returns "raised" or "cleared" when the alarm changes."""
        reserve = reserve_bytes(total)
        self._since = 0
        self._last = now
        self._budget = max(MIN_BUDGET, (free - reserve) // ROOM_SHARE)
        if not self.raised and free < reserve:
            self.raised = True
            return "raised"
        if self.raised and free >= 2 * reserve:
            self.raised = False
            return "cleared"
        return None
