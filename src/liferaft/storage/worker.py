"""``WorkerThread``: one long-lived OS thread that runs blocking calls in order for Trio.

Why not ``trio.to_thread.run_sync``: on this project's machine a trip through it cost
160-200 µs of CPU and as much latency (its thread cache, limiter, context copy and the
wake-up through ``run_sync_soon``), paid on every Ready of every node (the fsync'd
write) and on the path of every lone write. Here a call is put on a ``SimpleQueue``
that the thread waits on, and the thread answers by writing one byte to a pipe that
Trio waits on with ``wait_readable``: 56-72 µs a trip, measured the same way
(docs/performance.md).

Calls run one at a time, in the order they were made (a ``trio.Lock`` hands out
turns), so a SQLite connection used only through one worker needs no more locking.
A call that was asked for always runs to the end: the caller's wait for its turn and
for the result is shielded from cancellation, which is delivered at its next
checkpoint; so cancelling a caller never leaves a write half-done, nor the next call
running beside one. ``close`` ends the thread after the calls before it.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import trio

T = TypeVar("T")


class _Call(Generic[T]):
    __slots__ = ("error", "fn", "value")

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.value: T | None = None
        self.error: BaseException | None = None


class Turns:
    """One call at a time, in the order asked, and none after close: what
    ``WorkerThread`` and the simulator's ``offload.InlineWorker`` share."""

    def __init__(self) -> None:
        self._turn = trio.Lock()
        self._closed = False

    def run_now(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the calling thread, now, if no call is running or waiting (it
        holds the turn meanwhile); raises ``trio.WouldBlock`` otherwise. For calls
        cheaper than the trip to the thread and back."""
        if self._closed:
            raise RuntimeError("the worker is closed")
        self._turn.acquire_nowait()
        try:
            return fn()
        finally:
            self._turn.release()


class WorkerThread(Turns):
    def __init__(self, name: str) -> None:
        super().__init__()
        self._calls: queue.SimpleQueue[_Call[Any] | None] = queue.SimpleQueue()
        self._done_r, self._done_w = os.pipe()
        os.set_blocking(self._done_r, False)
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            try:
                call.value = call.fn()
            except BaseException as exc:  # handed to the caller, re-raised there
                call.error = exc
            os.write(self._done_w, b"\0")

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the thread, after the calls before it; its result or exception."""
        with trio.CancelScope(shield=True):
            await self._take_turn()
            try:
                if self._closed:
                    raise RuntimeError("the worker is closed")
                call = await self._call(fn)
            finally:
                self._turn.release()
        if call.error is not None:
            raise call.error
        return call.value  # type: ignore[return-value]

    async def _take_turn(self) -> None:
        try:
            self._turn.acquire_nowait()  # the usual case: no trip through the scheduler
        except trio.WouldBlock:
            await self._turn.acquire()

    async def _call(self, fn: Callable[[], T]) -> _Call[T]:
        call: _Call[T] = _Call(fn)
        self._calls.put(call)
        while True:
            try:
                os.read(self._done_r, 1)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._done_r)
            else:
                return call

    async def close(self, last: Callable[[], object] | None = None) -> None:
        """Run ``last`` (if given) as the final call, then end the thread and release
        its pipe; later calls raise RuntimeError. ``last``'s exception is raised after."""
        with trio.CancelScope(shield=True):
            await self._take_turn()
            try:
                if self._closed:
                    return
                self._closed = True
                call = await self._call(last) if last is not None else None
                self._calls.put(None)
                self._thread.join()  # idle: no call is in flight while we hold the turn
                for fd in (self._done_r, self._done_w):
                    os.close(fd)
            finally:
                self._turn.release()
        if call is not None and call.error is not None:
            raise call.error
