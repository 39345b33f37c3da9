"""Clients through leader failure: no acknowledged write lost, no retried write applied
twice. Uses the client library against a real cluster."""

from __future__ import annotations

from pathlib import Path

import trio
from test_protocol import cluster

from liferaft.client import compare, op_put, open_client
from liferaft.testing.localcluster import LocalCluster, wait_until

INCREMENTS = 60
WRITES = 150


async def crash_and_restart_the_leader(c: LocalCluster, progress: trio.Event) -> None:
    await progress.wait()  # some traffic first
    old = await c.wait_leader()
    c.crash(old)
    await wait_until(lambda: c.leader() not in (None, old))
    await c.start_node(old)


async def test_a_txn_counter_equals_acknowledged_increments_across_a_leader_crash(
    tmp_path: Path, certs: Path
) -> None:
    async with (
        cluster(tmp_path, certs) as c,
        open_client(c.endpoints(), token=c.token(), cacert=certs / "ca.pem", timeout=30) as client,
    ):
        await client.put("counter", b"0")
        acked = 0
        progress = trio.Event()

        async def increment() -> None:
            nonlocal acked
            while acked < INCREMENTS:
                kv = await client.get("counter")
                assert kv is not None
                r = await client.txn(
                    compare=[compare("counter", "mod_revision", "==", kv.mod_revision)],
                    success=[op_put("counter", str(int(kv.value) + 1))],
                    failure=[],
                )
                if r.succeeded:  # a retried txn answers with its first result
                    acked += 1
                    if acked == 10:
                        progress.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(crash_and_restart_the_leader, c, progress)
            nursery.start_soon(increment)
        final = await client.get("counter")
        assert final is not None and int(final.value) == acked == INCREMENTS


async def test_every_acknowledged_write_survives_a_leader_crash(
    tmp_path: Path, certs: Path
) -> None:
    async with (
        cluster(tmp_path, certs) as c,
        open_client(c.endpoints(), token=c.token(), cacert=certs / "ca.pem", timeout=30) as client,
    ):
        acked: list[str] = []
        progress = trio.Event()

        async def writer(w: int) -> None:
            for i in range(WRITES // 5):
                key = f"w{w}/{i}"
                await client.put(key, key)
                acked.append(key)
                if len(acked) == 20:
                    progress.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(crash_and_restart_the_leader, c, progress)
            for w in range(5):
                nursery.start_soon(writer, w)
        assert len(acked) == WRITES
        kvs, more = await client.range("w", limit=0)
        assert not more and sorted(kv.key for kv in kvs) == sorted(acked)
        assert all(kv.version == 1 for kv in kvs)  # each write applied exactly once


async def test_reads_and_writes_through_a_follower_endpoint(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c:
        lead = await c.wait_leader()
        follower = next(i for i in c.ids if i != lead)
        url = c.endpoints()[c.ids.index(follower)]
        async with open_client([url], token=c.token(), cacert=certs / "ca.pem") as client:
            rev = await client.put("via", "follower")  # redirected to the leader
            kv = await client.get("via")
            assert kv is not None and kv.value == b"follower" and kv.mod_revision == rev
