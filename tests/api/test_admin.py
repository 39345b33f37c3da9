"""Admin ops end to end: leadership transfer and growing/shrinking the cluster."""

from __future__ import annotations

from pathlib import Path

from test_protocol import cluster

from liferaft.client import open_client
from liferaft.testing.localcluster import wait_until


async def test_transfer_leader_hands_over_to_the_named_node(tmp_path: Path, certs: Path) -> None:
    async with (
        cluster(tmp_path, certs) as c,
        open_client(c.endpoints(), token=c.token(), cacert=certs / "ca.pem", timeout=30) as client,
    ):
        old = await c.wait_leader()
        target = next(i for i in c.ids if i != old)
        assert await client.transfer_leader(target) == target
        await wait_until(lambda: c.leader() == target)
        await client.put("after", "transfer")  # the new leader takes writes


async def test_a_learner_joins_catches_up_is_promoted_and_removed(
    tmp_path: Path, certs: Path
) -> None:
    async with (
        cluster(tmp_path, certs) as c,
        open_client(c.endpoints(), token=c.token(), cacert=certs / "ca.pem", timeout=30) as client,
    ):
        for i in range(20):
            await client.put(f"k{i}", f"v{i}")
        peer, client_addr = c.reserve("n4")
        members = await client.member_add("n4", peer, client_addr, learner=True)
        assert {m["id"]: m["voter"] for m in members}["n4"] is False
        n4 = await c.start_node("n4")  # starts empty, with join = true
        leader = c.nodes[await c.wait_leader()]
        await wait_until(lambda: n4.applied >= leader.applied > 0)
        kv, _ = n4.kv.db.get("k19")
        assert kv is not None and kv["value"] == b"v19"
        members = await client.member_promote("n4")
        assert all(m["voter"] for m in members) and len(members) == 4
        members = await client.member_remove("n4")
        assert {m["id"] for m in members} == {"n1", "n2", "n3"}
        await client.put("still", "writable")
