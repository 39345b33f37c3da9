"""Locks and elections in the client library against the fake server
(tests/client/fakeserver.py): holders in create_revision order, each waiter watching its
predecessor only (one release wakes one waiter), fencing tokens that only grow, a lost
lease cancelling the holder, clean-up of a waiter that gives up, and elections seen by
an observer in order."""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from fakeserver import TOKEN, FakeCluster, make_certs

from liferaft.client import (
    LOCK_PREFIX,
    Client,
    Election,
    KeyValue,
    LeaseLost,
    Lock,
    LockLost,
    NotElected,
    SyncClient,
    open_client,
)

HANG = 60  # seconds: a guard against hangs, not a performance claim


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("coord-certs")
    make_certs(d)
    return d


@pytest.fixture
async def cluster(nursery: trio.Nursery, certs: Path) -> FakeCluster:
    return await FakeCluster(certs).start(nursery)


@asynccontextmanager
async def opened(cluster: FakeCluster, certs: Path, **kw: Any) -> AsyncIterator[Client]:
    async with open_client(cluster.urls[:1], token=TOKEN, cacert=certs / "ca.pem", **kw) as c:
        yield c


def keys_under(cluster: FakeCluster, prefix: str) -> list[dict[str, Any]]:
    """The key-values under ``prefix``, oldest first (by create_revision)."""
    kvs = [kv for k, kv in cluster.store.data.items() if k.startswith(prefix)]
    return sorted(kvs, key=lambda kv: kv["create_revision"])


# ---------------------------------------------------------------- locks


async def test_lock_hands_over_in_order_waking_one_waiter_each_time(
    cluster: FakeCluster, certs: Path
) -> None:
    """Five contenders queue in the order their keys were created. Each waiter watches
    only the key just before its own; each release sends one watch event, to one
    waiter; critical sections never overlap and fencing tokens strictly increase."""
    st = cluster.store
    n = 5
    pfx = LOCK_PREFIX + "job/"
    release = [trio.Event() for _ in range(n)]
    acquired = [trio.Event() for _ in range(n)]
    holder: list[int] = []  # who is in the critical section now
    sections: list[tuple[int, int]] = []  # (contender, token) in the order they entered
    with trio.fail_after(HANG):
        async with opened(cluster, certs) as c:
            locks = [Lock(c, "job") for _ in range(n)]

            async def contender(i: int) -> None:
                async with locks[i] as lock:
                    assert not holder, f"{i} entered while {holder} held the lock"
                    holder.append(i)
                    sections.append((i, lock.token))
                    acquired[i].set()
                    await release[i].wait()
                    holder.remove(i)

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(contender, i)
                    await st.until(lambda i=i: len(keys_under(cluster, pfx)) == i + 1)
                await acquired[0].wait()
                await st.until(lambda: len(st.watchers) == n - 1)
                kvs = keys_under(cluster, pfx)
                assert [kv["key"] for kv in kvs] == [lock.key for lock in locks]
                assert all(w.prefix is None for w in st.watchers)  # single keys, no prefix
                for i in range(1, n):
                    assert locks[i].watching == locks[i - 1].key
                for i in range(n):
                    await acquired[i].wait()
                    assert st.event_pushes == i  # one release, one event, one waiter
                    release[i].set()
    assert [i for i, _ in sections] == list(range(n))
    tokens = [t for _, t in sections]
    assert all(a < b for a, b in itertools.pairwise(tokens)), tokens
    assert [lock.watches for lock in locks] == [0] + [1] * (n - 1)
    assert len([r for r in cluster["n1"].requests if r["op"] == "watch"]) == n - 1
    assert keys_under(cluster, pfx) == [] and st.leases == {}  # every lease revoked


async def test_waiter_whose_predecessor_dies_waits_for_the_one_before(
    cluster: FakeCluster, certs: Path
) -> None:
    """A holder and two waiters; the middle one's lease expires. The last waiter wakes,
    looks again, watches the holder instead (not taking the lock); the middle one is
    told its lease is gone."""
    st = cluster.store
    pfx = LOCK_PREFIX + "m/"
    with trio.fail_after(HANG):
        async with opened(cluster, certs) as c:
            first, middle, last = (Lock(c, "m", ttl=1) for _ in range(3))
            release = trio.Event()
            got_last = trio.Event()
            middle_error: list[BaseException] = []

            tokens: dict[str, int] = {}

            async def hold_first() -> None:
                async with first:
                    tokens["first"] = first.token
                    await release.wait()

            async def wait_middle() -> None:
                try:
                    async with middle:
                        pytest.fail("the middle contender got the lock without its lease")
                except LockLost as exc:
                    middle_error.append(exc)

            async def wait_last() -> None:
                async with last:
                    tokens["last"] = last.token
                    got_last.set()

            async with trio.open_nursery() as nursery:
                for i, task in enumerate((hold_first, wait_middle, wait_last)):
                    nursery.start_soon(task)
                    await st.until(lambda i=i: len(keys_under(cluster, pfx)) == i + 1)
                await st.until(lambda: len(st.watchers) == 2)
                assert last.watching == middle.key
                assert middle.lease is not None
                st.expire(middle.lease.id)
                await st.until(lambda: last.watches == 2)
                assert last.watching == first.key and not got_last.is_set()
                release.set()
                await got_last.wait()
            assert tokens["first"] < tokens["last"]
            assert middle_error and isinstance(middle_error[0], LeaseLost)


async def test_lost_lock_cancels_the_holder(cluster: FakeCluster, certs: Path) -> None:
    """The cluster expires the holder's lease (it was paused past its TTL, say): the
    holder's block is cancelled and LockLost raised; the next holder's token is higher."""
    st = cluster.store
    with trio.fail_after(HANG):
        async with opened(cluster, certs) as c:
            with pytest.raises(LockLost) as info:
                async with Lock(c, "x", ttl=1) as lock:
                    token = lock.token
                    assert lock.lease is not None
                    st.expire(lock.lease.id)
                    await trio.sleep_forever()  # cancelled at the next renewal (1/3 s)
            assert "lock 'x'" in str(info.value) and not lock.held
            async with Lock(c, "x") as again:
                assert again.token > token


async def test_giving_up_while_waiting_leaves_no_key(cluster: FakeCluster, certs: Path) -> None:
    st = cluster.store
    pfx = LOCK_PREFIX + "g/"
    with trio.fail_after(HANG):
        async with opened(cluster, certs) as c, Lock(c, "g") as held:
            waiter = Lock(c, "g")
            with trio.CancelScope() as scope:

                async def cancel_once_waiting() -> None:
                    await st.until(lambda: len(st.watchers) == 1)
                    scope.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_once_waiting)
                    await waiter.acquire()
            assert scope.cancelled_caught and not waiter.held
            assert [kv["key"] for kv in keys_under(cluster, pfx)] == [held.key]
            assert list(st.leases) == [held.lease.id]  # type: ignore[union-attr]


async def test_sync_lock(cluster: FakeCluster, certs: Path) -> None:
    def work() -> list[int]:
        tokens = []
        with SyncClient(cluster.urls[:1], token=TOKEN, cacert=certs / "ca.pem") as c:
            for _ in range(2):
                with c.lock("sync", ttl=5) as lock:
                    tokens.append(lock.token)
                    assert not lock.lost.is_set()
                    assert c.get(str(lock.key)) is not None
            with pytest.raises(LockLost), c.lock("sync", ttl=1) as lock:
                trio.from_thread.run_sync(cluster.store.expire, lock.lock.lease.id)  # type: ignore[union-attr]
                assert lock.lost.wait(HANG)
        return tokens

    tokens = await trio.to_thread.run_sync(work)
    assert tokens[0] < tokens[1]


# ---------------------------------------------------------------- elections


async def test_election_campaign_proclaim_resign_observe(cluster: FakeCluster, certs: Path) -> None:
    """An observer sees each leader and value once, in order: one, its new value, then
    two after one resigns. A contender that is not leading cannot proclaim."""
    st = cluster.store
    send, seen = trio.open_memory_channel[KeyValue](math.inf)
    with trio.fail_after(HANG):
        async with opened(cluster, certs) as c, trio.open_nursery() as nursery:
            one, two = Election(c, "svc"), Election(c, "svc")
            assert await one.leader() is None

            async def observe() -> None:
                async with Election(c, "svc").observe() as leaders:
                    async for kv in leaders:
                        send.send_nowait(kv)

            nursery.start_soon(observe)
            two_won = trio.Event()

            async def second() -> None:
                async with two:
                    await two.campaign("two")
                    two_won.set()
                    await trio.sleep_forever()

            async with one:
                await one.campaign("one")
                assert (await seen.receive()).value == b"one"
                nursery.start_soon(second)
                await st.until(lambda: len(keys_under(cluster, "_liferaft/elect/svc/")) == 2)
                leader = await one.leader()
                assert leader is not None and leader.key == one.key and one.leading
                await one.proclaim("one, again")
                assert (await seen.receive()).value == b"one, again"
                with pytest.raises(NotElected):
                    await two.proclaim("me")
            await two_won.wait()
            assert (await seen.receive()).value == b"two"
            assert not one.leading and two.leading
            nursery.cancel_scope.cancel()
    assert seen.statistics().current_buffer_used == 0  # nothing seen twice or between


async def test_crashed_leader_is_replaced(cluster: FakeCluster, certs: Path) -> None:
    """The leader's lease expires (it crashed): the waiting contender takes over, the
    observer sees it next, and the old leader's block ends with LeaseLost."""
    st = cluster.store
    send, seen = trio.open_memory_channel[KeyValue](math.inf)
    with trio.fail_after(HANG):
        async with opened(cluster, certs) as c, trio.open_nursery() as nursery:
            first, second = Election(c, "db", ttl=1), Election(c, "db", ttl=1)

            async def observe() -> None:
                async with first.observe() as leaders:
                    async for kv in leaders:
                        send.send_nowait(kv)

            async def run_second() -> None:
                async with second:
                    await second.campaign("b")
                    await trio.sleep_forever()

            nursery.start_soon(observe)
            with pytest.raises(LeaseLost):
                async with first:
                    await first.campaign("a")
                    assert (await seen.receive()).value == b"a"
                    nursery.start_soon(run_second)
                    await st.until(lambda: len(st.watchers) == 2)  # observer + waiter
                    assert first.lease is not None
                    st.expire(first.lease.id)
                    await trio.sleep_forever()
            assert (await seen.receive()).value == b"b"
            assert second.leading
            nursery.cancel_scope.cancel()


async def test_sync_election(cluster: FakeCluster, certs: Path) -> None:
    def work() -> list[bytes]:
        with SyncClient(cluster.urls[:1], token=TOKEN, cacert=certs / "ca.pem") as c:
            observed = c.election("sync").observe()
            with c.election("sync", ttl=5) as first:
                assert first.leader() is None
                first.campaign("a")
                assert first.leading and not first.lost.is_set()
                first.proclaim("b")
                leader = first.leader()
                assert leader is not None and leader.value == b"b"
                seen = [next(observed).value]
            assert c.election("sync").leader() is None  # resigned on leaving
            observed.close()
            return seen

    assert await trio.to_thread.run_sync(work) == [b"b"]


async def test_a_campaign_given_up_inside_the_block_keeps_the_block_guarded(
    cluster: FakeCluster, certs: Path
) -> None:
    """A campaign cancelled inside ``async with election`` drops its key but keeps the
    lease the block's guard watches; the next campaign reuses it, so losing that lease
    still cancels the block."""
    st = cluster.store
    with trio.fail_after(30):
        async with opened(cluster, certs) as c:
            election = Election(c, "regroup", ttl=1)
            with pytest.raises(LeaseLost):
                async with election:
                    first = election.lease
                    with trio.move_on_after(0):
                        await election.campaign(b"me")  # given up at once
                    await election.campaign(b"me")
                    assert election.lease is first is not None
                    st.expire(first.id)
                    await trio.sleep_forever()  # leading, until the guard cancels us
