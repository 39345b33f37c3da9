"""Leases over the client protocol on a live cluster (docs/client-protocol.md, "Leases"):
keys vanish with their lease, at one revision with delete events, never before the TTL
that the last keepalive promised; keepalives carry a lease across leader changes;
the leader answers lease_ttl and keepalives, followers redirect; unknown leases are
not_found."""

from __future__ import annotations

from pathlib import Path

import trio
from test_protocol import HANG, cluster, connect, leader_index

from liferaft.testing.localcluster import LocalCluster, wait_until


async def test_keys_go_with_an_expired_lease_at_one_revision_never_before_its_ttl(
    tmp_path: Path, certs: Path
) -> None:
    async with cluster(tmp_path, certs) as c:
        lead = await leader_index(c)
        async with connect(c, c.token(), lead) as r:
            granted = await r.call(op="lease_grant", ttl=1)
            assert granted["ok"] and granted["ttl"] == 1
            lease = granted["lease"]
            for k in ("lock/a", "lock/b"):
                assert (await r.call(op="put", key=k, value=b"me", lease=lease))["ok"]
            watch = await r.call(op="watch", prefix="lock/")
            assert watch["ok"]
            renewed_at = trio.current_time()
            kept = await r.call(op="lease_keepalive", lease=lease)
            assert kept["ok"] and kept["ttl"] == 1
            with trio.fail_after(HANG):
                while not r.events:
                    await r._pump()
            gone_at = trio.current_time()
            # (the leader's deadline is its receipt of the keepalive + TTL: after ours)
            assert gone_at >= renewed_at + 1
            (message,) = r.events
            assert [e["type"] for e in message["events"]] == ["delete", "delete"]
            assert {e["kv"]["key"] for e in message["events"]} == {"lock/a", "lock/b"}
            got = await r.call(op="get", key="lock/a")
            assert got["kv"] is None
            missing = await r.call(op="lease_keepalive", lease=lease)
            assert missing["error"]["code"] == "not_found"
            put = await r.call(op="put", key="lock/c", value=b"x", lease=lease)
            assert put["error"]["code"] == "not_found"


async def test_keepalives_carry_a_lease_across_leader_changes(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c:
        token = c.token()
        async with connect(c, token, await leader_index(c)) as r:
            lease = (await r.call(op="lease_grant", ttl=2))["lease"]
            assert (await r.call(op="put", key="svc/1", value=b"up", lease=lease))["ok"]
        stop = trio.Event()

        async def keep_alive() -> None:
            """Every 0.5 s, at whichever node leads (a client follows not_leader)."""
            while not stop.is_set():
                try:
                    async with connect(c, token, await leader_index(c)) as k:
                        while not stop.is_set():
                            answer = await k.call(op="lease_keepalive", lease=lease)
                            assert answer["ok"] or answer["error"]["code"] in (
                                "not_leader",
                                "unavailable",
                            ), answer
                            if not answer["ok"]:
                                break
                            with trio.move_on_after(0.5):
                                await stop.wait()
                except OSError:  # the connection went with a leader change: reconnect
                    continue

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_alive)
            for _ in range(3):  # three leader changes, each well inside the TTL
                async with connect(c, c.token("read,write,admin"), await leader_index(c)) as a:
                    moved = await a.call(op="transfer_leader")
                    assert moved["ok"], moved
                with trio.move_on_after(1.0):
                    await stop.wait()
            async with connect(c, token, await leader_index(c)) as r:
                assert (await r.call(op="get", key="svc/1"))["kv"]["value"] == b"up"
                ttl = await r.call(op="lease_ttl", lease=lease, keys=True)
                assert ttl["ok"] and ttl["granted_ttl"] == 2 and ttl["keys"] == ["svc/1"]
                assert 0 <= ttl["ttl"] <= 2
            stop.set()
        # Keepalives stopped: the key goes (within a TTL and an election timeout).
        async with connect(c, token, await leader_index(c)) as r:
            with trio.fail_after(HANG):
                while (await r.call(op="get", key="svc/1"))["kv"] is not None:  # noqa: ASYNC110 - polling the cluster
                    await trio.sleep(0.1)


async def test_followers_redirect_lease_questions_and_revoke_and_list_work(
    tmp_path: Path, certs: Path
) -> None:
    async with cluster(tmp_path, certs) as c:
        lead = await leader_index(c)
        follower = next(i for i in range(3) if i != lead)
        async with connect(c, c.token(), lead) as r:
            a = (await r.call(op="lease_grant", ttl=60, lease=7))["lease"]
            b = (await r.call(op="lease_grant", ttl=60))["lease"]
            assert a == 7 and b != 7
            await r.call(op="put", key="k1", value=b"1", lease=a)
            listed = await r.call(op="lease_list")
            assert sorted(listed["leases"]) == sorted([a, b])
            revoked = await r.call(op="lease_revoke", lease=a)
            assert revoked["ok"] and (await r.call(op="get", key="k1"))["kv"] is None
            again = await r.call(op="lease_revoke", lease=a)
            assert again["error"]["code"] == "not_found"
            bad = await r.call(op="lease_grant", ttl=0)
            assert bad["error"]["code"] == "invalid_request"
        async with connect(c, c.token(), follower) as f:
            answer = await f.call(op="lease_keepalive", lease=b)
            assert answer["error"]["code"] == "not_leader"
            assert answer["error"]["leader_endpoint"] == c.endpoints()[lead]
            listed = await f.call(op="lease_list")  # a read: any node
            assert listed["leases"] == [b]
        async with connect(c, c.token("read"), lead) as ro:
            denied = await ro.call(op="lease_grant", ttl=5)
            assert denied["error"]["code"] == "permission_denied"


async def test_a_new_leader_restarts_the_countdown_and_never_expires_a_lease_early(
    tmp_path: Path, certs: Path
) -> None:
    """The leader that granted a lease dies right away; the new leader counts the lease's
    TTL (plus an election timeout) from its own election, so the key outlives the old
    leader's deadline."""
    async with cluster(tmp_path, certs) as c:
        lead = await leader_index(c)
        async with connect(c, c.token(), lead) as r:
            lease = (await r.call(op="lease_grant", ttl=2))["lease"]
            await r.call(op="put", key="k", value=b"v", lease=lease)
            written = trio.current_time()
        old = c.ids[lead]
        nodes = dict(c.nodes)
        c.crash(old)
        await nodes[old].stopped.wait()
        with trio.fail_after(HANG):
            await LocalCluster.wait_leader(c)
            new_lead = await leader_index(c)
            async with connect(c, c.token(), new_lead) as r:
                while (await r.call(op="get", key="k"))["kv"] is not None:  # noqa: ASYNC110 - polling the cluster
                    await trio.sleep(0.05)
        assert trio.current_time() >= written + 2


async def test_leases_survive_a_restart_of_every_node_and_a_snapshot_install(
    tmp_path: Path, certs: Path
) -> None:
    """Leases are state: a whole-cluster restart keeps them (and their keys), a follower
    that catches up from a snapshot file holds them too, and they still expire."""
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"], snapshot_entries=50)
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            await c.wait_leader()
            lead = await leader_index(c)
            lagging = c.ids[(lead + 1) % 3]
            stopped = c.nodes[lagging]
            c.crash(lagging)
            await stopped.stopped.wait()
            async with connect(c, c.token(), lead) as r:
                lease = (await r.call(op="lease_grant", ttl=3))["lease"]
                await r.call(op="put", key="held", value=b"1", lease=lease)
                for i in range(120):  # compactions: the lagging node needs a snapshot
                    await r.call(op="put", key=f"filler{i}", value=b"x")
            for node_id in list(c.nodes):
                node = c.nodes[node_id]
                c.crash(node_id)
                await node.stopped.wait()
            for node_id in c.ids:
                await c.start_node(node_id)
            await c.wait_leader()
            node = c.nodes[lagging]
            async with connect(c, c.token(), await leader_index(c)) as r:
                ttl = await r.call(op="lease_ttl", lease=lease, keys=True)
                assert ttl["ok"] and ttl["keys"] == ["held"], ttl
            await LocalCluster.wait_leader(c)
            leader_node = c.nodes[c.ids[await leader_index(c)]]
            await wait_until(lambda: node.applied >= leader_node.applied)
            assert leader_node.sender is not None and leader_node.sender.sent >= 1  # a file
            assert node.kv.db.lease_keys(lease) == ["held"]
            # No keepalive since the grant: it expires (the new leader's countdown).
            async with connect(c, c.token(), await leader_index(c)) as r:
                while (await r.call(op="get", key="held"))["kv"] is not None:  # noqa: ASYNC110 - polling the cluster
                    await trio.sleep(0.1)
            await wait_until(lambda: node.kv.db.lease(lease) is None)
        nursery.cancel_scope.cancel()


async def test_a_renewal_after_a_checkpoint_survives_a_leader_change(
    tmp_path: Path, certs: Path
) -> None:
    """A checkpoint writes the TTL left into the log; a keepalive after it must write
    the whole TTL back before it is acknowledged, or the next leader counts from the
    old value and expires the lease early."""
    async with cluster(tmp_path, certs) as c:
        for node in c.nodes.values():
            node.lessor.checkpoint_seconds = 0.5  # (3 s leases are then checkpointed)
        lead = await leader_index(c)
        async with connect(c, c.token(), lead) as r:
            lease = (await r.call(op="lease_grant", ttl=3))["lease"]
            await r.call(op="put", key="k", value=b"v", lease=lease)
            leader = c.nodes[c.ids[lead]]
            await wait_until(lambda: leader.kv.db.lease(lease)[1] < 3000)  # checkpointed
            renewed = trio.current_time()
            assert (await r.call(op="lease_keepalive", lease=lease))["ok"]
            moved = await r.call(op="transfer_leader")
            assert moved["ok"]
        async with connect(c, c.token(), await leader_index(c)) as r:
            with trio.fail_after(HANG):
                while (await r.call(op="get", key="k"))["kv"] is not None:  # noqa: ASYNC110 - polling the cluster
                    await trio.sleep(0.05)
        assert trio.current_time() >= renewed + 3


async def test_a_token_for_some_prefixes_ends_and_sees_only_leases_of_its_own_keys(
    tmp_path: Path, certs: Path
) -> None:
    async with cluster(tmp_path, certs) as c:
        lead = await leader_index(c)
        async with (
            connect(c, c.token("read,write", prefixes=["a/"]), lead) as a,
            connect(c, c.token("read,write", prefixes=["b/"]), lead) as b,
        ):
            mine = (await a.call(op="lease_grant", ttl=60))["lease"]
            theirs = (await b.call(op="lease_grant", ttl=60))["lease"]
            assert (await a.call(op="put", key="a/x", value=b"1", lease=mine))["ok"]
            assert (await b.call(op="put", key="b/secret", value=b"1", lease=theirs))["ok"]
            denied = await a.call(op="lease_revoke", lease=theirs)
            assert denied["error"]["code"] == "permission_denied"
            peek = await a.call(op="lease_ttl", lease=theirs, keys=True)
            assert peek["error"]["code"] == "permission_denied"
            listed = await a.call(op="lease_list")
            assert listed["error"]["code"] == "permission_denied"
            assert (await a.call(op="lease_ttl", lease=mine, keys=True))["keys"] == ["a/x"]
            assert (await a.call(op="lease_revoke", lease=mine))["ok"]
            assert (await b.call(op="get", key="b/secret"))["kv"] is not None
