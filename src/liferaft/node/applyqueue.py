"""The queue between the core loop and the applier.

The core loop must never wait for the applier: a core loop blocked on a full queue
sends no heartbeats, and a busy leader would lose its followers to an election. So the
queue takes everything at once (it holds references to entries the in-memory log holds
anyway; writes are bounded where they enter: at the API on the leader, and on a follower
by the core loop refusing appends while ``bytes`` is too large), and the applier takes runs
bounded in entries AND bytes, so one apply transaction stays short whatever the entries
carry (an entry may be a batch of a thousand writes).
"""

from __future__ import annotations

from collections import deque

import trio

from liferaft.core import Entry, Snapshot


class ApplyQueue:
    def __init__(self, *, max_entries: int, max_bytes: int) -> None:
        self._items: deque[Snapshot | Entry] = deque()
        self._ready = trio.Event()
        self.bytes = 0  # entry data queued: committed, not yet taken for applying
        self.max_entries = max_entries
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self._items)

    def put_snapshot(self, snap: Snapshot) -> None:
        self._items.append(snap)
        self._ready.set()

    def put_entries(self, entries: tuple[Entry, ...]) -> None:
        if entries:
            self._items.extend(entries)
            self.bytes += sum(len(e.data) for e in entries)
            self._ready.set()

    async def get(self) -> Snapshot | list[Entry]:
        """The next snapshot, or the next run of entries (at least one, and at most
        ``max_entries`` and about ``max_bytes`` of data), in queue order."""
        while not self._items:
            self._ready = trio.Event()
            await self._ready.wait()
        items = self._items
        first = items[0]
        if isinstance(first, Snapshot):
            return items.popleft()  # type: ignore[return-value]  # first is a Snapshot
        run: list[Entry] = []
        size = 0
        while items and len(run) < self.max_entries and size < self.max_bytes:
            e = items[0]
            if isinstance(e, Snapshot):
                break
            run.append(items.popleft())  # type: ignore[arg-type]  # e is an Entry
            size += len(e.data)
        self.bytes -= size
        return run
