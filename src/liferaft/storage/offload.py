"""Where a node's blocking calls (SQLite, file I/O) run: on threads in a real node,
inline on the event loop under the whole-node simulator.

Why a switch: the simulator (``liferaft.testing.nodesim``) runs real nodes under Trio's
``MockClock``, which jumps ahead whenever every task is blocked. A task waiting for a
thread counts as blocked, so with threads the clock would jump by however long the
thread happened to take, and no run could be replayed from its seed. Inline, a call
takes no simulated time and happens at the same point of every replay. Only the
simulator turns it on (``inline_io()``); the mode is a context variable, so it holds for
the tasks started inside that ``with`` block and nowhere else.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Protocol, TypeVar

import trio

from liferaft.storage.worker import Turns, WorkerThread

T = TypeVar("T")

_INLINE: ContextVar[bool] = ContextVar("liferaft_inline_io", default=False)


@contextlib.contextmanager
def inline_io() -> Iterator[None]:
    """Blocking calls started inside run inline, and ``wall_ms`` follows Trio's clock."""
    token = _INLINE.set(True)
    try:
        yield
    finally:
        _INLINE.reset(token)


def inline() -> bool:
    return _INLINE.get()


def durable() -> bool:
    """Whether commits must reach the disk (fsync). Not under the simulator: its crashes
    are process crashes, which keep what the page cache holds, so an fsync there only
    costs time (a third of a run's); power loss is the storage tests' business."""
    return not _INLINE.get()


class Worker(Protocol):
    """One at a time, in order: ``WorkerThread``'s interface."""

    async def run(self, fn: Callable[[], T]) -> T: ...

    def run_now(self, fn: Callable[[], T]) -> T: ...

    async def close(self, last: Callable[[], object] | None = None) -> None: ...


class InlineWorker(Turns):
    """``WorkerThread`` without the thread: each call runs on the event loop when its
    turn comes. The checkpoint after it keeps ``run`` a real yield point (a cancellation
    is delivered after the call, never in the middle, as with the thread)."""

    async def run(self, fn: Callable[[], T]) -> T:
        with trio.CancelScope(shield=True):
            async with self._turn:
                if self._closed:
                    raise RuntimeError("the worker is closed")
                value = fn()
        await trio.lowlevel.checkpoint()
        return value

    async def close(self, last: Callable[[], object] | None = None) -> None:
        with trio.CancelScope(shield=True):
            async with self._turn:
                if self._closed:
                    return
                self._closed = True
                if last is not None:
                    last()


def new_worker(name: str) -> Worker:
    """A thread named ``name``, or inline under the simulator."""
    return InlineWorker() if _INLINE.get() else WorkerThread(name)


async def run_sync(fn: Callable[[], T]) -> T:
    """``fn()`` on a Trio worker thread (run to the end even if the caller is
    cancelled), or inline under the simulator."""
    if _INLINE.get():
        value = fn()
        await trio.lowlevel.checkpoint()
        return value
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=False)


def wall_ms() -> int:
    """Milliseconds since the epoch; under the simulator, Trio's (mock) clock instead,
    so that what nodes write into their logs replays exactly."""
    if _INLINE.get():
        return int(trio.current_time() * 1000)
    return int(time.time() * 1000)
