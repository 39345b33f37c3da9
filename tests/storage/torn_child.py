"""Helper of test_torn_write.py (and of the model test in test_storage.py).

``plan`` is a seeded, endless stream of what a follower's storage is asked to do: append
large batches, overwrite an uncommitted suffix in a new term, install a leader's snapshot
(replacing the log), compact after a local snapshot. It is a pure function of the stored
state it starts from and the seed, so the test can replay exactly what the child did.

Run as a script (``python torn_child.py DATA_DIR SEED``) it opens the storage and saves the
plan's operations one after another, printing ``begin N`` before and ``written N`` after
the N-th (counting from 1), until it is killed.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from pathlib import Path

from liferaft.core import (
    Entry,
    EntryKind,
    HardState,
    Membership,
    Ready,
    Restored,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
)
from liferaft.storage.sqlite import Storage
from liferaft.testing.sim import Disk

MEMBERS = Membership.of(["n1", "n2", "n3"])
SOFT = SoftState(Role.FOLLOWER, None, 1)
MAX_OPS = 1000  # a child whose parent died stops by itself

Op = Ready | Snapshot


def apply(disk: Disk, op: Op) -> None:
    if isinstance(op, Snapshot):
        disk.save_snapshot(op)
    else:
        disk.write(op)


def disk_of(restored: Restored) -> Disk:
    return Disk(restored.hard_state, restored.entries, restored.snapshot)


def plan(restored: Restored, rng: random.Random, max_batch: int = 1500) -> Iterator[Op]:
    disk = disk_of(restored)
    while True:
        op = _next_op(disk, rng, max_batch)
        yield op
        apply(disk, op)


def replay(restored: Restored, seed: str, n: int) -> Disk:
    """The stored state after the first ``n`` operations of ``plan(restored, seed)``."""
    disk = disk_of(restored)
    ops = plan(restored, random.Random(seed))
    for _ in range(n):
        apply(disk, next(ops))
    return disk


def _entries(rng: random.Random, first: int, term: int, n: int) -> tuple[Entry, ...]:
    return tuple(
        Entry(
            first + i,
            term,
            EntryKind.NOOP if rng.random() < 0.05 else EntryKind.NORMAL,
            rng.randbytes(rng.randint(0, 600)),
        )
        for i in range(n)
    )


def _next_op(disk: Disk, rng: random.Random, max_batch: int) -> Op:
    hs = disk.hard_state
    last = disk.offset + len(disk.entries)
    term, commit = max(hs.term, 1), hs.commit
    roll = rng.random()
    if roll < 0.12 and commit > disk.offset:  # compaction after a local snapshot
        index = rng.randint(disk.offset + 1, commit)
        meta = SnapshotMeta(index, disk.term_at(index), MEMBERS)
        return Snapshot(meta, rng.randbytes(rng.randint(1_000, 100_000)))
    if roll < 0.2:  # a leader's snapshot, beyond our log: it replaces the log
        index = last + rng.randint(1, 50)
        snap = Snapshot(SnapshotMeta(index, term, MEMBERS), rng.randbytes(rng.randint(0, 50_000)))
        return Ready(
            soft_state=SOFT,
            hard_state=HardState(term, hs.vote, index),
            snapshot=snap,
            entries=_entries(rng, index + 1, term, rng.randint(0, max_batch)),
        )
    if roll < 0.4 and last > commit:  # a new leader overwrites our uncommitted suffix
        first = rng.randint(commit + 1, last)
        new = _entries(rng, first, term + 1, rng.randint(1, max_batch))
        return Ready(soft_state=SOFT, hard_state=HardState(term + 1, "n2", commit), entries=new)
    new = _entries(rng, last + 1, term, rng.randint(1, max_batch))
    hard_state = HardState(term, hs.vote or "n1", rng.randint(commit, new[-1].index))
    return Ready(soft_state=SOFT, hard_state=hard_state, entries=new)


def main(argv: list[str]) -> None:
    data_dir, seed = Path(argv[1]), argv[2]
    with Storage.open(data_dir, initial=MEMBERS) as storage:
        ops = plan(storage.load(), random.Random(seed))
        for n in range(1, MAX_OPS + 1):
            op = next(ops)
            print(f"begin {n}", flush=True)
            if isinstance(op, Snapshot):
                storage.save_snapshot(op)
            else:
                storage.save(op)
            print(f"written {n}", flush=True)


if __name__ == "__main__":
    main(sys.argv)
