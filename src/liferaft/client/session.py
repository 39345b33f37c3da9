"""The session window on Trio: :class:`~liferaft.client.core.SeqWindow` (which seqs of
this client's session may be in flight at once, docs/client-protocol.md, "Writes,
sessions and retries") with a ``trio.Event`` to wake each write that waits for room.
"""

from __future__ import annotations

import trio

from liferaft.client.core import SESSION_WINDOW, SeqWaiter, SeqWindow, window_full

__all__ = ["SESSION_WINDOW", "SessionWindow"]


class SessionWindow:
    """The seqs of one session: handed out in order, as a range per write (or per turn
    of put_many), and released in any order; every taker must release what it took."""

    def __init__(self, size: int, timeout: float) -> None:
        self.size = size
        self._timeout = timeout  # only to say how long a write waited in vain
        self._core = SeqWindow(size)
        self._events: dict[SeqWaiter, trio.Event] = {}

    def try_take(self, count: int) -> range | None:
        """What :meth:`take` would return at once, if it would; None else. Not a
        coroutine: a single write, the common case, should not pay for one."""
        return self._core.try_take(count)

    async def take(self, count: int, deadline: float) -> range:
        """The next seqs: ``count`` of them, or fewer (at least one) when the window has
        less room; Unavailable if none is free by ``deadline``."""
        seqs = self._core.try_take(count)
        if seqs is not None:
            return seqs
        waiter = self._core.wait(count)
        granted = self._events[waiter] = trio.Event()
        try:
            with trio.move_on_at(deadline):
                await granted.wait()
        except BaseException:
            self._events.pop(waiter, None)
            self._core.withdraw(waiter)
            raise
        self._events.pop(waiter, None)
        if waiter.seqs is None:
            self._core.withdraw(waiter)
            raise window_full(self.size, self._timeout)
        return waiter.seqs

    def release(self, seqs: range) -> None:
        """The writes of ``seqs`` (as handed out) are over: move the window, hand the
        room it makes to the writes waiting for it, in turn."""
        for waiter in self._core.release(seqs):
            event = self._events.get(waiter)
            if event is not None:
                event.set()
