"""The session window: which seqs of this client's session may be in flight at once
(docs/client-protocol.md, "Writes, sessions and retries").

The server remembers the results of the newest ``session_window`` seqs of a session and
refuses a seq older than that, even one it never saw (it cannot tell a retry of a
forgotten write from a new one). So a seq is handed out only while it is within the
window of the oldest write still in flight: with more writes in flight than that, the
newer ones wait in line (:meth:`SessionWindow.release` hands them their seqs, first come,
first served), and every taker must release what it took.
"""

from __future__ import annotations

from collections import deque

import trio

from liferaft.client.errors import Unavailable

SESSION_WINDOW = 128  # results per session the server remembers (liferaft.kv.sessions)


class SessionWindow:
    """The seqs of one session: handed out in order, as a range per write (or per turn
    of put_many), and released in any order."""

    def __init__(self, size: int, timeout: float) -> None:
        self.size = size
        self._timeout = timeout  # only to say how long a write waited in vain
        self._seq = 0  # the last seq handed out
        # the seqs handed out and not yet released, oldest first, and those released
        # behind an older one
        self._open: deque[range] = deque()
        self._done: set[range] = set()
        self._waiters: deque[_Waiter] = deque()  # writes waiting for a seq, in turn

    def _room(self) -> int:
        if not self._open:
            return self.size
        return self._open[0].start + self.size - 1 - self._seq

    def try_take(self, count: int) -> range | None:
        """What :meth:`take` would return at once, if it would; None else. Not a
        coroutine: a single write, the common case, should not pay for one."""
        if self._waiters:
            return None
        room = self._room()
        return self._grant(min(count, room)) if room > 0 else None

    async def take(self, count: int, deadline: float) -> range:
        """The next seqs: ``count`` of them, or fewer (at least one) when the window has
        less room; Unavailable if none is free by ``deadline``."""
        seqs = self.try_take(count)
        if seqs is not None:
            return seqs
        waiter = _Waiter(count)
        self._waiters.append(waiter)
        try:
            with trio.move_on_at(deadline):
                await waiter.granted.wait()
        except BaseException:
            if waiter.seqs is not None:
                self.release(waiter.seqs)
            else:
                self._waiters.remove(waiter)
            raise
        if waiter.seqs is None:
            self._waiters.remove(waiter)
            raise Unavailable(
                f"the oldest of this client's {self.size} newest writes is "
                f"still unanswered after {self._timeout:g}s"
            )
        return waiter.seqs

    def _grant(self, count: int) -> range:
        first = self._seq + 1
        self._seq += count
        seqs = range(first, self._seq + 1)
        self._open.append(seqs)
        return seqs

    def release(self, seqs: range) -> None:
        """The writes of ``seqs`` (as handed out) are over: move the window, hand the
        room it makes to the writes waiting for it, in turn."""
        open_seqs = self._open
        if open_seqs[0] is not seqs:
            self._done.add(seqs)  # behind an older one: the window stays
            return
        open_seqs.popleft()
        done = self._done
        while open_seqs and open_seqs[0] in done:
            done.discard(open_seqs.popleft())
        waiters = self._waiters
        while waiters and (room := self._room()) > 0:
            waiter = waiters.popleft()
            waiter.seqs = self._grant(min(waiter.count, room))
            waiter.granted.set()


class _Waiter:
    """A write waiting for room in the window."""

    __slots__ = ("count", "granted", "seqs")

    def __init__(self, count: int) -> None:
        self.count = count  # how many seqs it wants (it takes fewer if that is the room)
        self.seqs: range | None = None  # what it was handed
        self.granted = trio.Event()
