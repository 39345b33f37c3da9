"""When committed entries reach the state machine, beside a Ready's own write or after it.

A Ready can carry both committed entries (already on this node's disk) and new entries
to write. On the leader the committed ones are applied, and their writers answered,
while the new ones are still being written. A follower, whom no writer waits on, writes
the new ones and answers the leader first (docs/architecture.md, "The life of a
write").
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from liferaft.core import Ready
from liferaft.testing.localcluster import LocalCluster, wait_until

HANG = 60  # seconds: a guard against hangs, not a performance claim


@asynccontextmanager
async def warm_cluster(
    tmp_path: Path, certs: Path
) -> AsyncIterator[tuple[LocalCluster, str, trio.Nursery]]:
    """Three nodes, a leader elected and its no-op behind us: the cluster, the leader's
    id and the cluster's nursery, within the guard against hangs."""
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"])
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            leader_id = await c.wait_leader()
            await c.nodes[leader_id].propose(b"warm-up")
            yield c, leader_id, nursery
        nursery.cancel_scope.cancel()


async def test_a_commit_is_answered_while_the_next_batch_is_being_written(
    tmp_path: Path, certs: Path
) -> None:
    async with warm_cluster(tmp_path, certs) as (c, leader_id, nursery):
        leader = c.nodes[leader_id]
        storage = leader.storage
        assert storage is not None and leader.raft is not None
        permits = trio.Semaphore(0)  # one per leader write of entries let through
        save = storage.save

        async def gated(rd: Ready) -> float:
            if rd.entries:
                await permits.acquire()
            return await save(rd)

        storage.save = gated  # type: ignore[method-assign]
        a_done, b_done = trio.Event(), trio.Event()

        async def propose(data: bytes, done: trio.Event) -> None:
            await leader.propose(data)
            done.set()

        raft = leader.raft
        before = raft.log.last_index
        nursery.start_soon(propose, b"a", a_done)
        await wait_until(lambda: raft.log.last_index > before)
        a_index = raft.log.last_index
        followers = [n for i, n in c.nodes.items() if i != leader_id]
        # A is on both followers' disks and their answers wait in the leader's
        # inputs, behind the leader's own write of A (held by the gate).
        await wait_until(
            lambda: all(
                f.raft is not None and f.raft.log.unstable_from > a_index for f in followers
            )
        )
        nursery.start_soon(propose, b"b", b_done)
        await trio.testing.wait_all_tasks_blocked()  # B waits in the core loop's inputs
        permits.release()  # the write of A only: B's write stays held
        await a_done.wait()  # would hang if A's answer waited for B's write
        assert raft.log.last_index > a_index  # B was proposed: its write is held
        assert not b_done.is_set()
        permits.release()
        await b_done.wait()


async def test_a_follower_applies_after_writing_the_entries_that_came_with_the_commit(
    tmp_path: Path, certs: Path
) -> None:
    async with warm_cluster(tmp_path, certs) as (c, leader_id, _nursery):
        leader = c.nodes[leader_id]
        follower = next(n for i, n in c.nodes.items() if i != leader_id)
        storage = follower.storage
        assert storage is not None
        save = storage.save
        release = trio.Event()
        held: list[Ready] = []  # writes of new entries that also commit older ones

        async def gated(rd: Ready) -> float:
            committed = rd.committed_entries
            # Committed entries this node held on disk before this Ready (not only ones
            # that arrived with it): the leader would hand those over before the write.
            if rd.entries and committed and committed[0].index < rd.entries[0].index and not held:
                held.append(rd)
                await release.wait()
            return await save(rd)

        storage.save = gated  # type: ignore[method-assign]
        # The commit index of each write rides on the next append, so a stream of
        # writes soon brings the follower a Ready of both kinds.
        while not held:
            await leader.propose(b"w")
        rd = held[0]
        await trio.testing.wait_all_tasks_blocked()
        # Its first committed entry was on disk already; it waits all the same.
        assert follower.kv.db.applied < rd.committed_entries[0].index
        release.set()
        last = rd.committed_entries[-1].index
        await wait_until(lambda: follower.kv.db.applied >= last)
