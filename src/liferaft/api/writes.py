"""The writes of one client connection, proposed and answered without a task of their
own.

A message's writes (all the writes one read brought, in fact) are one batch: the
connection hands it to the node (``Node.submit_writes``) and goes on reading; the
applier (or the core loop, for a refusal) calls back with the results, which are
queued as responses at once. Per batch that saves a task, a cancel scope with a
deadline, a semaphore and two wake-ups: on the leader, with one write per message,
about a sixth of its CPU per write (docs/performance.md).

Two things still need waiting, and take the old path (``handlers.write_batch`` in a
task of its own): a batch that cannot be submitted at once (the node's proposal places
or the core loop's inputs are full), and a batch refused because no leader is known or
this node has just been elected (it waits out the election, as every request does).
The request timeout is kept by one timer task per connection: a batch still unanswered
at its deadline is answered ``unavailable`` (the write may or may not have happened)
and its late result, if any, is dropped.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import trio

from liferaft.api import handlers
from liferaft.api.errors import ApiError
from liferaft.core import NotLeader
from liferaft.observability.logs import event

if TYPE_CHECKING:
    from collections.abc import Callable

    from liferaft.api.connection import Connection

log = logging.getLogger("liferaft.api")

MAX_WRITE_BATCHES = 256  # batches of writes waiting for the log per connection


class _Batch:
    """One batch of checked write requests, waiting for its results."""

    __slots__ = ("deadline", "give_up", "owner", "reqs", "size", "started", "waiting")

    def __init__(self, owner: ConnectionWrites, reqs: list[dict[str, Any]], size: int) -> None:
        self.owner = owner
        self.reqs = reqs
        self.size = size
        self.started = time.perf_counter()
        self.deadline = trio.current_time() + handlers.REQUEST_TIMEOUT
        self.waiting = True
        self.give_up: Callable[[], None] | None = None

    # The node calls these (Settable), from the core loop or the applier.
    def set(self, value: object) -> None:
        if self.waiting:
            self.waiting = False
            self.give_up = None  # (a reference cycle through the node's waiter)
            self.owner.answered(self, value)
            self.reqs = []  # the timer keeps an answered batch until its deadline: light

    def fail(self, error: BaseException) -> None:
        if self.waiting:
            self.waiting = False
            self.give_up = None
            self.owner.failed(self, error)
            self.reqs = []


class ConnectionWrites:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._node = conn.server.node
        self._slots = trio.Semaphore(MAX_WRITE_BATCHES)
        self._nursery: trio.Nursery | None = None
        self._timed: deque[_Batch] = deque()  # submitted, oldest deadline first
        self._timer_wake = trio.Event()

    async def submit(self, reqs: list[dict[str, Any]], size: int) -> None:
        """Propose ``reqs`` (checked writes); returns once they are on their way. Waits
        only when MAX_WRITE_BATCHES of this connection's batches are unanswered (each
        holds a slot from here until it is answered, on whichever path)."""
        try:
            self._slots.acquire_nowait()  # no trip through the scheduler
        except trio.WouldBlock:
            await self._slots.acquire()
        batch = _Batch(self, reqs, size)
        give_up = self._node.submit_writes(handlers.write_commands(reqs), size, batch)
        if give_up is None:  # the node is full: wait for a place, in a task
            batch.waiting = False
            self._slow(batch)
            return
        batch.give_up = give_up
        if not self._timed:
            self._timer_wake.set()
        self._timed.append(batch)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The timer: answer each batch still waiting at its deadline. Also the nursery
        in which the slow path's tasks run."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await self._expire()
            finally:
                self._nursery = None  # closed to new tasks from here: see ``_slow``

    async def _expire(self) -> None:
        timed = self._timed
        while True:
            while timed and not timed[0].waiting:
                timed.popleft()  # answered meanwhile
            if not timed:
                await self._timer_wake.wait()
                self._timer_wake = trio.Event()
                continue
            batch = timed[0]
            if batch.deadline > trio.current_time():
                await trio.sleep_until(batch.deadline)
                continue
            timed.popleft()
            if batch.give_up is not None:
                batch.give_up()  # its place among the node's proposals
            batch.fail(trio.TooSlowError(f"no result in {handlers.REQUEST_TIMEOUT} s"))

    # ---------------------------------------------------------------- answers

    def answered(self, batch: _Batch, value: object) -> None:
        self._slots.release()
        try:
            results = handlers.write_results(value, len(batch.reqs))
        except ApiError as exc:
            results = [{"error": exc.body()}] * len(batch.reqs)
        self._conn.answer_writes(batch.reqs, results, batch.started)

    def failed(self, batch: _Batch, error: BaseException) -> None:
        if isinstance(error, NotLeader) and (
            error.leader in (None, self._node.id) or not self._node.reaches(error.leader)
        ):
            # An election is under way (or due: the leader is out of reach), or this
            # node won it since the batch left: wait for its outcome and propose again,
            # as write_batch does.
            self._slow(batch)
            return
        self._slots.release()
        try:
            err = handlers.write_failure(self._node, error)
        except Exception as exc:  # a bug of ours: answer it, log it, keep serving
            event(log, "request_failed", level=logging.ERROR, op="write", error=repr(exc))
            err = ApiError("internal", "internal error")
        failure = [{"error": err.body()}] * len(batch.reqs)
        self._conn.answer_writes(batch.reqs, failure, batch.started)

    # ---------------------------------------------------------------- waiting

    def _slow(self, batch: _Batch) -> None:
        """Run ``batch`` through ``write_batch`` in a task of its own, which answers it
        and releases its slot. Once the connection has ended (``run`` is over) there is
        nobody to answer: the batch, which the log never took, is let go. This is called
        from the core loop too (``failed``), which must never see it raise."""
        if self._nursery is None:
            self._slots.release()
            return
        self._nursery.start_soon(self._wait_and_write, batch.reqs, batch.size, batch.started)

    async def _wait_and_write(self, reqs: list[dict[str, Any]], size: int, started: float) -> None:
        try:
            results = await handlers.write_batch(self._node, reqs, size)
        except ApiError as exc:
            results = [{"error": exc.body()}] * len(reqs)
        except Exception as exc:  # a bug of ours: answer it, log it, keep serving
            event(log, "request_failed", level=logging.ERROR, op="write", error=repr(exc)[:300])
            internal = {"error": {"code": "internal", "message": "internal error"}}
            results = [internal] * len(reqs)
        finally:
            self._slots.release()
        self._conn.answer_writes(reqs, results, started)
