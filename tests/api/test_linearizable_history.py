"""Client histories through a leader crash are linearizable (checked per key, as
registers, by liferaft.testing.linearizability)."""

from __future__ import annotations

import random
from pathlib import Path

import trio
from test_failover import crash_and_restart_the_leader
from test_protocol import cluster

from liferaft.client import Client, LiferaftError, open_client
from liferaft.testing.linearizability import Op, check

KEYS = ["a", "b", "c"]
OPS_PER_CLIENT = 40


async def test_a_history_with_a_leader_crash_is_linearizable(tmp_path: Path, certs: Path) -> None:
    history: list[Op] = []
    async with cluster(tmp_path, certs) as c:
        progress = trio.Event()

        async def client(cid: int, conn: Client) -> None:
            rng = random.Random(cid)  # seeded: the workload is the same every run
            for n in range(OPS_PER_CLIENT):
                key = rng.choice(KEYS)
                start = trio.current_time()
                if rng.random() < 0.5:
                    value = b"c%d-%d" % (cid, n)
                    try:
                        await conn.put(key, value)
                        end: float | None = trio.current_time()
                    except LiferaftError:
                        end = None  # unknown: it may or may not have happened
                    history.append(Op(cid, "put", key, value, start, end))
                else:
                    try:
                        kv = await conn.get(key)
                    except LiferaftError:
                        continue  # a read that failed says nothing
                    value = kv.value if kv is not None else None
                    history.append(Op(cid, "get", key, value, start, trio.current_time()))
                if len(history) == 40:
                    progress.set()

        async def one(cid: int) -> None:
            async with open_client(
                c.endpoints(), token=c.token(), cacert=certs / "ca.pem", timeout=30
            ) as conn:
                await client(cid, conn)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(crash_and_restart_the_leader, c, progress)
            for cid in range(5):
                nursery.start_soon(one, cid)
    verdict = check(history)
    assert verdict, f"not linearizable on key {verdict.key!r} ({verdict.ops} ops)"
    assert verdict.ops >= 150
