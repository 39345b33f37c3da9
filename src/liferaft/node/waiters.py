"""Callers waiting for the outcome of something the core loop will do later.

A proposal waits until its entry is applied (or until a different entry lands at its
index, which means it was lost with a deposed leader); a read waits for its read
index and then for the state machine to reach it. Trio is single-threaded, so plain
dicts shared by the core loop and the applier are safe.
"""

from __future__ import annotations

import itertools
from typing import Generic, Protocol, TypeVar

import trio

T = TypeVar("T")


class ProposalDropped(Exception):
    """The entry was overwritten by a new leader's log: it will never apply."""


class ReadFailed(Exception):
    """The read lost its leader before it could be confirmed."""


class NodeStopped(ReadFailed):
    """The node stopped (shut down, or failed on its storage) while the caller waited:
    a write may or may not have been committed by the others."""


class Outcome(Generic[T]):
    """A single-assignment result that one task sets and another awaits."""

    __slots__ = ("_error", "_event", "_value")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    def set(self, value: T) -> None:
        if not self._event.is_set():
            self._value = value
            self._event.set()

    def fail(self, error: BaseException) -> None:
        if not self._event.is_set():
            self._error = error
            self._event.set()

    @property
    def done(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> T:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class Settable(Protocol):
    """What a proposal's waiter must do: take the entry's result, or its failure."""

    def set(self, value: object) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class Split:
    """The waiter of an entry that merged the write batches of several callers: each
    gets its own slice of the entry's results (or the entry's failure)."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[tuple[Settable, int, int]] = []  # (out, start, count)

    def set(self, value: object) -> None:
        for out, start, count in self.parts:
            if type(value) is list:
                out.set(value[start : start + count])
            else:  # the entry failed as a whole: every caller gets that
                out.set(value)

    def fail(self, error: BaseException) -> None:
        for out, _, _ in self.parts:
            out.fail(error)


class Waiters:
    def __init__(self) -> None:
        self.proposals: dict[int, tuple[int, Settable]] = {}  # index -> (term, waiter)
        self.reads: dict[bytes, Outcome[int]] = {}  # ctx -> read index
        self._read_times: dict[bytes, float] = {}  # ctx -> when it was asked (Trio time)
        self.applied: list[tuple[int, Outcome[None]]] = []  # wait for applied >= index
        self._ctx = itertools.count(1)

    def new_read(self) -> tuple[bytes, Outcome[int]]:
        ctx = b"r%d" % next(self._ctx)
        out: Outcome[int] = Outcome()
        self.reads[ctx] = out
        self._read_times[ctx] = trio.current_time()
        return ctx, out

    def pop_read(self, ctx: bytes) -> Outcome[int] | None:
        self._read_times.pop(ctx, None)
        return self.reads.pop(ctx, None)

    def expire_reads(self, max_age: float) -> None:
        """Fail the reads asked more than ``max_age`` seconds ago. A read whose request
        or answer was lost is otherwise failed only by the next answered read, and with
        no other read (or a follower that keeps losing its requests one way) it would
        stay here for good: one per round, growing through a partition."""
        if not self._read_times:
            return
        oldest = trio.current_time() - max_age
        old = []
        for ctx, t in self._read_times.items():  # oldest first
            if t > oldest:
                break
            old.append(ctx)
        for ctx in old:
            out = self.pop_read(ctx)
            if out is not None:
                out.fail(ReadFailed("the read was not confirmed in time"))

    def answer_read(self, ctx: bytes, index: int) -> None:
        """The read ``ctx`` is confirmed at ``index``. Reads are answered in the order
        they were asked (the leader releases them in order, over one ordered link), so
        any read asked before it and still waiting was lost on the way (its request or
        answer dropped, or sent to a leader that was deposed): it fails now instead of
        waiting forever once its caller has given up."""
        out = self.pop_read(ctx)
        if out is None:
            return
        number = int(ctx[1:])
        lost = []
        for older in self.reads:  # oldest first: the order they were asked in
            if int(older[1:]) > number:
                break
            lost.append(older)
        for older in lost:
            lost_out = self.pop_read(older)
            assert lost_out is not None
            lost_out.fail(ReadFailed("the read's request or answer was lost"))
        out.set(index)

    def on_applied(self, index: int, term: int, result: object) -> None:
        w = self.proposals.pop(index, None)
        if w is not None:
            if w[0] == term:
                w[1].set(result)
            else:
                w[1].fail(ProposalDropped(f"entry {index} was replaced by a new leader"))

    def fail_through(self, index: int, error: BaseException) -> None:
        """Fail the proposals at ``index`` or below: a snapshot installed past them
        means no entry at their index will ever be applied here to answer them."""
        for i in [i for i in self.proposals if i <= index]:
            self.proposals.pop(i)[1].fail(error)

    def on_applied_index(self, applied: int) -> None:
        if not self.applied:
            return
        keep = []
        for index, out in self.applied:
            if index <= applied:
                out.set(None)
            else:
                keep.append((index, out))
        self.applied = keep

    def fail_all(self, error: BaseException) -> None:
        for _, out in self.proposals.values():
            out.fail(error)
        for r in self.reads.values():
            r.fail(error)
        for _, a in self.applied:
            a.fail(error)
        self.proposals.clear()
        self.reads.clear()
        self._read_times.clear()
        self.applied.clear()
