"""A linearizability checker for client histories of a key-value store.

Each key is a register (put writes it, get reads it), and linearizability is local
(Herlihy & Wing): a history is linearizable iff its restriction to every key is. Per
key, the checker searches for an order of the operations that respects real time (an
operation that completed before another was invoked comes first) and the register's
semantics, in the style of Wing & Gong with Lowe's memoization: the state of a search
is (operations linearized so far, register value), and a state seen once is not
explored again.

An operation whose outcome the client does not know (a put that timed out) has no
completion: it may take effect at any point after its invocation, or never.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

INF = float("inf")


@dataclass(frozen=True, slots=True)
class Op:
    """One client operation. ``value`` is what a put wrote or what a get returned
    (None: the key was absent). ``complete`` is None when the outcome is unknown."""

    client: int
    kind: str  # "put" or "get"
    key: str
    value: bytes | None
    invoke: float
    complete: float | None


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    key: str | None = None  # the first key whose history has no linearization
    ops: int = 0

    def __bool__(self) -> bool:
        return self.ok


def check(history: Iterable[Op], *, initial: bytes | None = None) -> Verdict:
    """Whether ``history`` is linearizable; gets of unknown outcome are ignored."""
    by_key: dict[str, list[Op]] = defaultdict(list)
    n = 0
    for op in history:
        if op.kind == "get" and op.complete is None:
            continue  # a read that never answered constrains nothing
        if op.kind not in ("put", "get"):
            raise ValueError(f"unknown op kind {op.kind!r}")
        by_key[op.key].append(op)
        n += 1
    for key in sorted(by_key):
        if not _register_linearizable(by_key[key], initial):
            return Verdict(False, key, n)
    return Verdict(True, None, n)


def _register_linearizable(ops: list[Op], initial: bytes | None) -> bool:
    ops = sorted(ops, key=lambda o: o.invoke)
    done_at = [o.complete if o.complete is not None else INF for o in ops]
    # Puts of unknown outcome need not be linearized at all.
    required = frozenset(i for i, o in enumerate(ops) if o.complete is not None)
    seen: set[tuple[frozenset[int], bytes | None]] = set()
    stack: list[tuple[frozenset[int], bytes | None]] = [(frozenset(), initial)]
    while stack:
        taken, value = stack.pop()
        if required <= taken:
            return True
        if (taken, value) in seen:
            continue
        seen.add((taken, value))
        remaining = [i for i in range(len(ops)) if i not in taken]
        # Only an op invoked before every remaining op has completed can go next.
        horizon = min(done_at[i] for i in remaining if i in required)
        for i in remaining:
            op = ops[i]
            if op.invoke > horizon:
                break  # sorted by invocation: the rest start later still
            if op.kind == "put":
                stack.append((taken | {i}, op.value))
            elif op.value == value:
                stack.append((taken | {i}, value))
    return False
