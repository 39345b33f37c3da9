"""A seeded, lossy network for the simulator: drop, duplicate, delay, partition.

Time is counted in ticks. Every random choice comes from the ``random.Random`` the
network was given, so a seed fixes the whole run. Reordering comes from each message
drawing its own delay.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass

from liferaft.core import AnyMessage


@dataclass(frozen=True, slots=True)
class Faults:
    """Probabilities and bounds of the network's misbehaviour."""

    drop: float = 0.0
    duplicate: float = 0.0
    max_delay: int = 0  # extra ticks a message may wait, drawn uniformly in [0, max_delay]

    @classmethod
    def none(cls) -> Faults:
        return cls()

    @classmethod
    def lossy(cls) -> Faults:
        return cls(drop=0.05, duplicate=0.02, max_delay=3)


class Network:
    def __init__(self, rng: random.Random, faults: Faults) -> None:
        self._rng = rng
        self.faults = faults
        self._queue: list[tuple[int, int, AnyMessage]] = []  # (due tick, seq, message)
        self._seq = 0
        self._blocked: set[tuple[str, str]] = set()  # (src, dst) pairs that cannot talk
        self.sent = 0
        self.dropped = 0
        # A test's hook: sees every message sent; returning False drops it.
        self.tap: Callable[[AnyMessage], bool] | None = None

    # ---------------------------------------------------------------- partitions

    def block(self, src: str, dst: str) -> None:
        """One-way: messages from ``src`` to ``dst`` are lost."""
        self._blocked.add((src, dst))

    def cut(self, a: str, b: str) -> None:
        self.block(a, b)
        self.block(b, a)

    def partition(self, *groups: set[str] | frozenset[str] | list[str]) -> None:
        """Only nodes in the same group can talk (nodes in no group are unaffected)."""
        sets = [set(g) for g in groups]
        for i, g in enumerate(sets):
            for h in sets[i + 1 :]:
                for a in g:
                    for b in h:
                        self.cut(a, b)

    def isolate(self, node: str, others: list[str] | set[str] | frozenset[str]) -> None:
        for other in others:
            if other != node:
                self.cut(node, other)

    def heal(self) -> None:
        self._blocked.clear()

    def can_reach(self, src: str, dst: str) -> bool:
        return (src, dst) not in self._blocked

    @property
    def blocked(self) -> frozenset[tuple[str, str]]:
        return frozenset(self._blocked)

    # ---------------------------------------------------------------- traffic

    def send(self, now: int, msg: AnyMessage) -> None:
        self.sent += 1
        f = self.faults
        rng = self._rng
        copies = 1
        if f.drop and rng.random() < f.drop:
            copies = 0
        elif f.duplicate and rng.random() < f.duplicate:
            copies = 2
        if self.tap is not None and not self.tap(msg):
            copies = 0
        if copies == 0 or not self.can_reach(msg.src, msg.dst):
            self.dropped += 1
            return
        for _ in range(copies):
            delay = rng.randint(0, f.max_delay) if f.max_delay else 0
            self._seq += 1
            heapq.heappush(self._queue, (now + delay, self._seq, msg))

    def due(self, now: int) -> list[AnyMessage]:
        """Messages whose time has come, in delivery order; a partition made while a
        message was in flight still stops it."""
        out: list[AnyMessage] = []
        q = self._queue
        while q and q[0][0] <= now:
            msg = heapq.heappop(q)[2]
            if self.can_reach(msg.src, msg.dst):
                out.append(msg)
            else:
                self.dropped += 1
        return out

    def pending(self) -> int:
        return len(self._queue)

    def clear(self) -> None:
        self._queue.clear()
