"""Scaling a running cluster (docs/operations.md, "Scaling a running cluster"): learners
promoted by the leader itself, and the leader's removal handing leadership over first.
Nodes in one process (``LocalCluster``); the real-process run is test_scaling_process.py."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from liferaft.client import Client, MemberError, open_client
from liferaft.core import ConfChangeType, ConfEntry, EntryKind, Role
from liferaft.testing.localcluster import LocalCluster, wait_until

HANG = 60  # a guard against hangs, not a performance claim


@asynccontextmanager
async def scaling_cluster(
    tmp: Path, certs: Path, *, auto_promote: bool
) -> AsyncIterator[tuple[LocalCluster, Client]]:
    c = LocalCluster(tmp, certs, ["n1", "n2", "n3"], auto_promote=auto_promote)
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            await c.wait_leader()
            async with open_client(
                c.endpoints(), token=c.token(), cacert=certs / "ca.pem", timeout=30
            ) as client:
                yield c, client
        nursery.cancel_scope.cancel()


def voters(members: list[dict[str, object]]) -> set[str]:
    return {str(m["id"]) for m in members if m["voter"]}


async def test_a_removed_node_stops_and_added_back_under_its_id_catches_up_and_stays(
    tmp_path: Path, certs: Path
) -> None:
    """The procedure of operations.md: remove a follower (it stops by itself), delete
    its data, add it back as a learner and start it: it catches up, is promoted, and
    is not stopped by the removal the members remember."""
    async with scaling_cluster(tmp_path, certs, auto_promote=True) as (c, client):
        for i in range(20):
            await client.put(f"k{i}", f"v{i}")
        lead = await c.wait_leader()
        gone = next(i for i in c.ids if i != lead)
        node = c.nodes[gone]
        await client.member_remove(gone)
        await node.stopped.wait()  # (the others told it: HTTP 410)
        assert node.removal.why is not None
        await wait_until(lambda: gone not in c.nodes)
        shutil.rmtree(tmp_path / "data" / gone)
        c.joiners.add(gone)
        peer, client_port = c.ports[gone][:2]
        await client.member_add(gone, f"127.0.0.1:{peer}", f"127.0.0.1:{client_port}", learner=True)
        back = await c.start_node(gone)
        nodes = list(c.nodes.values())
        await wait_until(lambda: all(gone in n.status().membership.voters for n in nodes))
        await client.put("after", "re-add")
        leader = c.nodes[await c.wait_leader()]
        await wait_until(lambda: back.applied >= leader.applied)
        assert back.removal.why is None and c.nodes.get(gone) is back
        kv, _ = back.kv.db.get("after")
        assert kv is not None and kv["value"] == b"re-add"


async def test_a_caught_up_learner_is_promoted_by_the_leader_itself(
    tmp_path: Path, certs: Path
) -> None:
    async with scaling_cluster(tmp_path, certs, auto_promote=True) as (c, client):
        for i in range(20):
            await client.put(f"k{i}", f"v{i}")
        members = await client.member_add("n4", *c.reserve("n4"), learner=True)
        assert "n4" not in voters(members)
        await c.start_node("n4")
        nodes = list(c.nodes.values())
        await wait_until(lambda: all("n4" in n.status().membership.voters for n in nodes))
        leader = c.nodes[await c.wait_leader()]
        assert leader.status().membership.learners == frozenset()
        await client.put("after", "promotion")  # four voters take writes


async def test_removing_the_leader_hands_leadership_over_first(tmp_path: Path, certs: Path) -> None:
    """One election (the transfer's), then the old leader is a follower the others no
    longer hear, and that a member tells it was removed: it stops, having never moved
    their term."""
    async with scaling_cluster(tmp_path, certs, auto_promote=False) as (c, client):
        await client.put("before", "x")
        old = await c.wait_leader()
        term = c.nodes[old].status().term
        removed_node = c.nodes[old]
        members = await client.member_remove(old)
        assert {m["id"] for m in members} == set(c.ids) - {old}
        new = await c.wait_leader()
        assert new != old
        rest = [c.nodes[i] for i in c.ids if i != old]
        assert all(n.status().term == term + 1 for n in rest)  # exactly one election
        # ... and it came first: the new leader proposed the removal, in its own term
        log = c.nodes[new].raft.log  # type: ignore[union-attr]
        removal = [
            e
            for e in log.slice(log.first_index, log.last_index + 1)
            if e.kind is EntryKind.CONFIG
            and ConfEntry.decode(e.data).change.type is ConfChangeType.REMOVE
        ]
        assert [e.term for e in removal] == [term + 1]
        await client.put("after", "x")
        # It stops itself: a member that applied the removal answers its dial with 410
        # and the removal's index (node/removal.py); it never moved anyone's term.
        with trio.fail_after(10):
            await removed_node.stopped.wait()
        why = removed_node.removal.why
        assert why is not None and f"removed from the cluster at index {removal[0].index}" in why
        await wait_until(lambda: old not in c.nodes)  # (the harness saw it end)
        assert c.leader() == new
        assert all(n.status().term == term + 1 for n in rest)
        kvs, _ = await client.range("")
        assert sorted(kv.key for kv in kvs) == ["after", "before"]


async def cli(c: LocalCluster, *args: str) -> list[dict[str, object]]:
    """``liferaft <args> -o json`` as an operator runs it; the members it prints."""
    env = dict(os.environ)
    env["LIFERAFT_ENDPOINTS"] = ",".join(c.endpoints())
    env["LIFERAFT_CACERT"] = str(c.certs / "ca.pem")
    env["LIFERAFT_TOKEN"] = c.token()
    proc = await trio.run_process(
        [sys.executable, "-m", "liferaft", *args, "-o", "json"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    members: list[dict[str, object]] = json.loads(proc.stdout)["members"]
    return members


async def test_an_operator_scales_with_the_member_commands(tmp_path: Path, certs: Path) -> None:
    """Add a learner, promote it, remove the leader: each command exits 0 with the new
    member list."""
    async with scaling_cluster(tmp_path, certs, auto_promote=False) as (c, client):
        peer, client_addr = c.reserve("n4")
        members = await cli(
            c, "member", "add", "n4", "--peer", peer, "--client", client_addr, "--learner"
        )
        assert "n4" not in voters(members) and len(members) == 4
        n4 = await c.start_node("n4")
        lead = c.nodes[await c.wait_leader()]
        await wait_until(lambda: n4.applied >= lead.applied > 0)
        assert voters(await cli(c, "member", "promote", "n4")) == {"n1", "n2", "n3", "n4"}
        old = await c.wait_leader()
        members = await cli(c, "member", "remove", old)
        assert voters(members) == {"n1", "n2", "n3", "n4"} - {old}
        await client.put("after", "shrink")


async def test_a_transfer_the_target_never_takes_is_refused_not_left_hanging(
    tmp_path: Path, certs: Path
) -> None:
    """The core gives a transfer up after an election timeout: the caller hears
    member_error at once, and the leader goes on leading."""
    async with scaling_cluster(tmp_path, certs, auto_promote=False) as (c, client):
        old = await c.wait_leader()
        target = next(i for i in c.ids if i != old)
        c.faults.isolate(target, c.ids)
        with pytest.raises(MemberError, match="did not take over"):
            await client.transfer_leader(target)
        assert c.nodes[old].status().role is Role.LEADER
        await client.put("still", "writable")
