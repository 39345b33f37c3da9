"""Leases in the client library against the fake server (tests/client/fakeserver.py):
the lease ops and their errors, puts with a lease, and keep_alive: when it renews (on a
frozen clock moved only to its own wake-ups), that renewals due together leave in one
message, that it follows the leader, and that a lost lease is reported, never dropped
quietly."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from fakeserver import TOKEN, FakeCluster, make_certs
from trio.testing import MockClock

from liferaft.client import (
    Client,
    InvalidRequest,
    KeepAlive,
    Lease,
    LeaseLost,
    NotFound,
    SyncClient,
    Unavailable,
    compare,
    op_put,
    open_client,
)
from liferaft.client.leases import KeepAliveSchedule

HANG = 60  # seconds of real time: a guard against hangs, not a performance claim


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("lease-certs")
    make_certs(d)
    return d


@pytest.fixture
async def cluster(nursery: trio.Nursery, certs: Path) -> FakeCluster:
    return await FakeCluster(certs).start(nursery)


@asynccontextmanager
async def opened(
    cluster: FakeCluster, certs: Path, *nodes: str, **kw: Any
) -> AsyncIterator[Client]:
    urls = [cluster[n].url for n in nodes] if nodes else cluster.urls[:1]
    async with open_client(urls, token=TOKEN, cacert=certs / "ca.pem", **kw) as c:
        yield c


def keepalive_messages(cluster: FakeCluster, node: str = "n1") -> list[list[int]]:
    """The lease ids of the keepalives of each message that carried any, in order."""
    out = []
    for m in cluster[node].messages:
        reqs = m if isinstance(m, list) else [m]
        ids = [r["lease"] for r in reqs if r["op"] == "lease_keepalive"]
        if ids:
            out.append(ids)
    return out


async def next_round(clock: MockClock, ka: KeepAlive) -> float:
    """Move a frozen clock to the keeper's next wake-up once it sleeps with nothing in
    flight, and wait until the renewals it then sends are answered; the time it woke
    at. Network waits never see time pass."""
    await ka.parked.wait()
    woke = ka.woke
    wake = ka.schedule.next_wakeup()
    assert not math.isinf(wake), "nothing left to do"
    clock.jump(max(0.0, wake - trio.current_time()))
    await woke.wait()
    await ka.parked.wait()
    return wake


# ---------------------------------------------------------------- the ops


async def test_lease_ops(cluster: FakeCluster, certs: Path) -> None:
    st = cluster.store
    async with opened(cluster, certs) as c:
        lease = await c.lease_grant(30)
        assert lease == Lease(lease.id, 30) and lease.id in st.leases
        chosen = await c.lease_grant(5, lease=0xABC)
        assert chosen == Lease(0xABC, 5)
        rev = await c.put("svc/a", "10.0.0.1", lease=lease.id)
        r = await c.txn(
            [compare("svc/b", "version", "==", 0)], [op_put("svc/b", "10.0.0.2", lease=lease.id)]
        )
        assert r.succeeded and r.revision == rev + 1
        await c.put("svc/c", "x", lease=chosen.id)
        assert sorted(await c.lease_list()) == sorted([lease.id, 0xABC])
        ttl = await c.lease_ttl(lease.id, keys=True)
        assert (ttl.id, ttl.ttl, ttl.granted_ttl, ttl.keys) == (
            lease.id,
            30,
            30,
            ["svc/a", "svc/b"],
        )
        assert (await c.lease_ttl(lease.id)).keys is None
        assert await c.lease_keepalive_once(lease.id) == 30
        # a put without the lease takes the key off it
        await c.put("svc/b", "plain")
        assert (await c.lease_ttl(lease.id, keys=True)).keys == ["svc/a"]
        async with c.watch(prefix="svc/", start_revision=st.revision + 1) as events:
            gone = await c.lease_revoke(chosen.id)
            ev = await events.__anext__()
        assert (ev.type, ev.kv.key, ev.kv.mod_revision) == ("delete", "svc/c", gone)
        assert await c.get("svc/c") is None and await c.get("svc/a") is not None
    sent = cluster["n1"].requests
    grants = [r for r in sent if r["op"] in ("lease_grant", "lease_revoke")]
    assert all(isinstance(r["session"], bytes) and r["seq"] >= 1 for r in grants)
    keepalives = [r for r in sent if r["op"] in ("lease_keepalive", "lease_ttl", "lease_list")]
    assert all("session" not in r for r in keepalives)  # not logged writes
    assert [r for r in sent if r["op"] == "lease_ttl"][1].get("keys") is None


async def test_unknown_lease_is_not_found(cluster: FakeCluster, certs: Path) -> None:
    async with opened(cluster, certs) as c:
        for call in (
            c.lease_keepalive_once(77),
            c.lease_revoke(77),
            c.lease_ttl(77),
            c.put("k", "v", lease=77),
            c.txn([], [op_put("k", "v", lease=77)]),
        ):
            with pytest.raises(NotFound):
                await call
        assert cluster.store.data == {}
        for bad in (0, -1, 2**63, "1", 1.5):
            with pytest.raises(InvalidRequest):
                await c.lease_grant(10, lease=bad)  # type: ignore[arg-type]
        for ttl in (0, 86401, 2.5):
            with pytest.raises(InvalidRequest):
                await c.lease_grant(ttl)  # type: ignore[arg-type]
    assert not [r for r in cluster["n1"].requests if r["op"] == "lease_grant"]


async def test_grant_is_retried_exactly_once(cluster: FakeCluster, certs: Path) -> None:
    """A grant whose answer was lost (the node applied it, then dropped the connection)
    is retried with its session and seq: one lease, not two."""
    n1 = cluster["n1"]
    async with opened(cluster, certs, "n1", "n2") as c:
        n1.inject("drop", op="lease_grant", apply=True)
        lease = await c.lease_grant(10)
    assert list(cluster.store.leases) == [lease.id]
    grants = [r for n in ("n1", "n2") for r in cluster[n].requests if r["op"] == "lease_grant"]
    assert len(grants) == 2 and len({(r["session"], r["seq"]) for r in grants}) == 1


# ---------------------------------------------------------------- the schedule, alone


def test_schedule_renews_at_a_third_and_batches_what_is_nearly_due() -> None:
    s = KeepAliveSchedule()
    s.add(1, 9, now=0, renewed_at=0)  # due at 3, deadline 9
    s.add(2, 9, now=1, renewed_at=1)  # due at 4
    s.add(3, 60, now=2, renewed_at=2)  # due at 22
    assert s.next_wakeup() == 3
    assert s.take_due(2.9) == []
    assert s.take_due(3) == [1, 2]  # 2 is due before the next round (3 + 3): it goes too
    assert s.in_flight == 2 and s.next_wakeup() == 9  # only deadlines while in flight
    s.renewed(1, 9, sent_at=3)
    s.renewed(2, 9, sent_at=3)
    assert s.next_wakeup() == 6 and s.deadline(1) == 12
    assert s.take_due(6) == [1, 2]
    s.renewed(1, 9, sent_at=6)
    s.renewed(2, 9, sent_at=6)
    assert s.take_due(19) == [1, 2, 3]  # 3 is due at 22 <= 19 + 3


def test_schedule_retries_failures_and_expires_at_the_deadline() -> None:
    s = KeepAliveSchedule()
    s.add(1, 6, now=0, renewed_at=0)
    assert s.take_due(2) == [1]
    s.failed(1, 2.5, Unavailable("no quorum"))
    assert 2.5 < s.next_wakeup() <= 3.5  # soon, well before the deadline
    assert s.expired(5.9) == []
    [(lease, last)] = s.expired(6)
    assert lease == 1 and isinstance(last, Unavailable)
    assert s.leases == [] and math.isinf(s.next_wakeup())


def test_schedule_with_an_unknown_ttl_renews_at_once() -> None:
    s = KeepAliveSchedule()
    s.add(5, None, now=10)
    assert s.take_due(10) == [5]
    assert math.isinf(s.next_wakeup())
    s.renewed(5, 30, sent_at=10)
    assert (s.next_wakeup(), s.deadline(5)) == (20, 40)


# ---------------------------------------------------------------- keep_alive on a clock


async def test_keep_alive_renews_at_a_third_in_one_message(
    cluster: FakeCluster, certs: Path, mock_clock: MockClock
) -> None:
    """Three leases of 9 s granted a second apart and one of 60 s: after the first round
    the short ones always travel together, each renewed every 3 s; the long one only
    when due within a round, never less than 17 s apart, and never separately."""
    st = cluster.store
    async with opened(cluster, certs) as c:
        t0 = trio.current_time()
        leases = []
        for ttl in (9, 9, 9, 60):
            if leases:
                mock_clock.jump(1)
            leases.append((await c.lease_grant(ttl), trio.current_time()))
        ka = c.keep_alive(cancel_on_loss=False)
        for lease, at in leases:
            ka.add(lease, renewed_at=at)
        async with ka:
            while trio.current_time() < t0 + 60:
                await next_round(mock_clock, ka)
            assert not ka.lost.is_set()
    short = {lease.id for lease, _ in leases[:3]}
    long_id = leases[3][0].id
    times: dict[int, list[float]] = defaultdict(list)
    for at, lease_id in st.keepalives:
        times[lease_id].append(at - t0)
    for lease_id in short:
        gaps = [b - a for a, b in itertools.pairwise(times[lease_id])]
        assert gaps and all(g == pytest.approx(3) for g in gaps), gaps
    assert times[leases[0][0].id][0] == pytest.approx(3)  # a third of 9 after its grant
    long_gaps = [b - a for a, b in itertools.pairwise(times[long_id])]
    assert times[long_id][0] <= 3 + 20 and all(17 <= g <= 20 for g in long_gaps), times[long_id]
    messages = keepalive_messages(cluster)
    assert sorted(messages[0]) == sorted(short)  # the 2nd and 3rd went early
    for ids in messages:
        assert short <= set(ids), messages  # never a short lease alone


async def test_keep_alive_follows_the_leader(
    cluster: FakeCluster, certs: Path, mock_clock: MockClock
) -> None:
    """Mid-way the first node answers not_leader naming the second: the renewals go on
    there, on time, and no lease is lost."""
    async with opened(cluster, certs, "n1", "n2") as c:
        granted_at = trio.current_time()
        lease = await c.lease_grant(6)
        ka = c.keep_alive(cancel_on_loss=False)
        ka.add(lease, renewed_at=granted_at)
        async with ka:
            await next_round(mock_clock, ka)
            await next_round(mock_clock, ka)
            cluster["n1"].redirect_to = cluster["n2"].url
            for _ in range(4):
                await next_round(mock_clock, ka)
            assert not ka.lost.is_set()
    assert len(keepalive_messages(cluster, "n1")) == 3  # 2 + the one redirected
    assert len(keepalive_messages(cluster, "n2")) == 4
    renewals = [at - granted_at for at, _ in cluster.store.keepalives]
    assert renewals == pytest.approx([2, 4, 6, 8, 10, 12])


async def test_keep_alive_survives_a_dropped_connection(cluster: FakeCluster, certs: Path) -> None:
    """The node drops the connection as a renewal arrives (a crash, say): the renewal
    is retried on a new connection and the lease is never reported lost."""
    n1 = cluster["n1"]
    renewed = trio.Event()
    count = 0

    def on_renewed(lease_id: int, ttl: int) -> None:
        nonlocal count
        count += 1
        if count == 4:
            renewed.set()

    async with opened(cluster, certs) as c:
        lease = await c.lease_grant(1)
        n1.inject("drop", op="lease_keepalive")
        ka = c.keep_alive(lease)
        ka.on_renewed(on_renewed)
        with trio.fail_after(HANG):
            async with ka:
                await renewed.wait()
        assert not ka.lost.is_set()
    assert n1.accepted == 2


async def test_lost_lease_cancels_the_block(
    cluster: FakeCluster, certs: Path, mock_clock: MockClock
) -> None:
    """The cluster expires the lease (its holder was paused, say): the next renewal
    gets not_found, the block is cancelled and LeaseLost comes out, with the lease."""
    async with opened(cluster, certs) as c:
        lease = await c.lease_grant(9)
        other = await c.lease_grant(9)
        with pytest.raises(LeaseLost) as info:
            async with c.keep_alive(lease, other) as ka:
                await next_round(mock_clock, ka)  # both renewed at once
                cluster.store.expire(lease.id)
                for _ in range(10):
                    await next_round(mock_clock, ka)
                pytest.fail("the block went on after its lease was lost")
        assert info.value.lease == lease.id and "no longer has it" in str(info.value)
        assert ka.lost.is_set() and list(ka.lost_leases) == [lease.id]
        assert ka.leases == [other.id]  # the other lease was kept until the block ended


async def test_a_client_closed_under_its_keeper_reports_the_leases_lost(
    cluster: FakeCluster, certs: Path
) -> None:
    """Another task closes the client while a block holds leases: nothing renews them
    any more, so they are reported lost and the block is cancelled with LeaseLost,
    rather than going on as if they were kept."""
    async with opened(cluster, certs) as c:
        lease = await c.lease_grant(60)
        other = await c.lease_grant(60)
        with trio.fail_after(HANG), pytest.raises(LeaseLost) as info:
            async with c.keep_alive(lease, other) as ka:
                await c.aclose()
                await trio.sleep_forever()
        assert "client was closed" in str(info.value)
        assert ka.lost.is_set() and sorted(ka.lost_leases) == sorted([lease.id, other.id])


async def test_silence_loses_the_lease_at_its_deadline(cluster: FakeCluster, certs: Path) -> None:
    """Renewals that get no answer: the lease is reported lost when its TTL has passed
    since the last confirmed renewal was sent (the cluster may have expired it), not
    before, and the block (cancel_on_loss=False) is not cancelled."""
    n1 = cluster["n1"]
    async with opened(cluster, certs, attempt_timeout=0.2) as c:
        granted_at = trio.current_time()
        lease = await c.lease_grant(1)
        n1.inject("silence", op="lease_keepalive", times=10**6)
        ka = c.keep_alive(cancel_on_loss=False)
        ka.add(lease, renewed_at=granted_at)
        async with ka:
            with trio.fail_after(HANG):
                await ka.lost.wait()
            lost_at = trio.current_time()
        assert lost_at >= granted_at + 1
        assert "no renewal confirmed within its TTL" in str(ka.error)
        assert lease.id in cluster.store.leases  # the fake never expires: the client judged


async def test_sync_client_leases(cluster: FakeCluster, certs: Path) -> None:
    def work() -> tuple[int, bool, str]:
        with SyncClient(cluster.urls[:1], token=TOKEN, cacert=certs / "ca.pem") as c:
            lease = c.lease_grant(1)
            c.put("sync/k", "v", lease=lease.id)
            assert c.lease_keepalive_once(lease.id) == 1
            assert c.lease_ttl(lease.id, keys=True).keys == ["sync/k"]
            assert lease.id in c.lease_list()
            with c.keep_alive(lease) as ka:
                assert ka.lost.wait(0.05) is False
            seen = False
            message = ""
            try:
                with c.keep_alive(lease) as ka:
                    trio.from_thread.run_sync(cluster.store.expire, lease.id)
                    seen = ka.lost.wait(HANG)
            except LeaseLost as exc:
                message = str(exc)
            return c.lease_revoke(c.lease_grant(5).id), seen, message

    rev, lost, message = await trio.to_thread.run_sync(work)
    assert lost and "lost" in message and rev >= 1
