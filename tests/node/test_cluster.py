"""Real nodes in one process: Trio, mutual-TLS WebSockets and SQLite on loopback.

Timing is never asserted: tests wait for conditions, and ``trio.fail_after`` only
guards against a hang (its bound is far above what the condition needs).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from liferaft.core import AnyMessage, Entry, NotLeader, Role
from liferaft.node import loop
from liferaft.node.node import Node
from liferaft.node.waiters import ProposalDropped
from liferaft.security.tls import peer_client_context
from liferaft.storage.errors import StorageCorrupt, StorageError
from liferaft.storage.sqlite import Storage
from liferaft.testing.localcluster import LocalCluster, wait_until

HANG = 60  # seconds: a guard against hangs, not a performance claim


@asynccontextmanager
async def running(tmp: Path, certs: Path, n: int) -> AsyncIterator[LocalCluster]:
    c = LocalCluster(tmp, certs, [f"n{i}" for i in range(1, n + 1)])
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            yield c
        nursery.cancel_scope.cancel()


async def write(c: LocalCluster, data: bytes) -> None:
    """Write through whoever leads, retrying across leader changes like a client."""
    while True:
        leader = await c.wait_leader()
        try:
            await c.nodes[leader].propose(data)
            return
        except (NotLeader, ProposalDropped):
            await trio.sleep(0.01)


def converged(c: LocalCluster) -> bool:
    nodes = list(c.nodes.values())
    return (
        all(n.applied == nodes[0].applied for n in nodes)
        and len({n.kv.db.digest() for n in nodes}) == 1
    )


def leaders(c: LocalCluster) -> list[str]:
    return [i for i, n in c.nodes.items() if n.raft is not None and n.raft.role is Role.LEADER]


def one_leader_per_term(c: LocalCluster) -> bool:
    """Election safety, which holds at every instant (unlike "exactly one leader now",
    which a late heartbeat on a loaded machine can break for a moment)."""
    terms = [
        n.raft.term for n in c.nodes.values() if n.raft is not None and n.raft.role is Role.LEADER
    ]
    return len(terms) == len(set(terms))


@pytest.mark.parametrize("size", [3, 5])
async def test_a_cluster_elects_exactly_one_leader_and_replicates_to_all(
    tmp_path: Path, certs: Path, size: int
) -> None:
    async with running(tmp_path, certs, size) as c:
        await c.wait_leader()
        for i in range(30):
            await write(c, b"entry %d" % i)
        await wait_until(lambda: converged(c))
        assert all(n.applied >= 31 for n in c.nodes.values())  # 30 writes + the no-op
        assert one_leader_per_term(c)
        # A follower that missed a heartbeat may be campaigning right now: wait for the
        # cluster to settle on one leader rather than expect it at this instant.
        await wait_until(lambda: len(leaders(c)) == 1)


async def test_losing_the_leader_leads_to_a_new_election_and_healing_converges(
    tmp_path: Path, certs: Path
) -> None:
    async with running(tmp_path, certs, 3) as c:
        old = await c.wait_leader()
        await write(c, b"before")
        stale = c.nodes[old].raft
        assert stale is not None
        old_term = stale.term
        c.faults.isolate(old, c.ids)
        await wait_until(lambda: c.leader() not in (None, old))
        await write(c, b"during")
        c.faults.heal()
        await write(c, b"after")
        await wait_until(lambda: converged(c))
        raft = c.nodes[old].raft
        assert raft is not None
        assert raft.term > old_term  # it took the new leader's entries: its old term is over

        def rejoined() -> bool:
            # A follower again; or, if a missed heartbeat on a loaded machine started yet
            # another election, possibly the elected leader of a newer term.
            r = c.nodes[old].raft
            return r is not None and (r.role is Role.FOLLOWER or c.leader() == old)

        await wait_until(rejoined)


async def test_writes_commit_through_message_loss_and_delay(tmp_path: Path, certs: Path) -> None:
    async with running(tmp_path, certs, 3) as c:
        await c.wait_leader()
        c.faults.drop = 0.2
        c.faults.max_delay = 0.03
        for i in range(20):
            await write(c, b"lossy %d" % i)
        c.faults.heal()
        await write(c, b"clean")
        await wait_until(lambda: converged(c))


async def test_a_crashed_node_restarts_with_its_term_vote_and_log(
    tmp_path: Path, certs: Path
) -> None:
    async with running(tmp_path, certs, 3) as c:
        leader = await c.wait_leader()
        for i in range(10):
            await write(c, b"w%d" % i)
        await wait_until(lambda: converged(c))
        victim = next(i for i in c.ids if i != leader)
        node = c.nodes[victim]
        raft = node.raft
        assert raft is not None
        before = (raft.term, raft.vote, list(raft.log.entries))
        c.crash(victim)
        await node.stopped.wait()
        storage = Storage.open(tmp_path / "data" / victim)
        restored = storage.load()
        storage.close()
        hs = restored.hard_state
        assert (hs.term, hs.vote, list(restored.entries)) == before
        await c.start_node(victim)
        await write(c, b"after restart")
        await wait_until(lambda: converged(c))


async def test_a_whole_cluster_restart_keeps_every_committed_entry(
    tmp_path: Path, certs: Path
) -> None:
    async with running(tmp_path, certs, 3) as c:
        await c.wait_leader()
        for i in range(25):
            await write(c, b"durable %d" % i)
        await wait_until(lambda: converged(c))
        some = next(iter(c.nodes.values()))
        applied = some.applied
        assert some.raft is not None
        # Only what is applied is surely committed: a leader elected after a missed
        # heartbeat may already have appended its no-op past it.
        committed = [(e.index, e.term, e.data) for e in some.raft.log.entries if e.index <= applied]
        for node_id in list(c.nodes):
            c.crash(node_id)
        for node_id in c.ids:
            await c.start_node(node_id)
        await write(c, b"after")
        await wait_until(lambda: converged(c))
        for node in c.nodes.values():
            assert node.raft is not None
            kept = [(e.index, e.term, e.data) for e in node.raft.log.entries if e.index <= applied]
            assert kept == committed


async def _refused(port: int, ctx: ssl.SSLContext) -> None:
    """The node hangs up on us: during the handshake, or right after it (TLS 1.3 reports
    a refused client certificate only once the client has finished)."""
    try:
        stream = trio.SSLStream(
            await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="n1"
        )
        await stream.do_handshake()
        assert await stream.receive_some() == b""
    except trio.BrokenResourceError:
        pass


async def test_the_peer_port_refuses_strangers_and_the_node_stays_healthy(
    tmp_path: Path, certs: Path, other_ca: Path
) -> None:
    async with running(tmp_path, certs, 3) as c:
        await c.wait_leader()
        n1 = c.nodes["n1"]
        assert n1.transport is not None
        port = c.ports["n1"][0]
        no_cert = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        await _refused(port, no_cert)
        foreign = peer_client_context(
            certs / "ca.pem", other_ca / "n2.pem", other_ca / "n2-key.pem"
        )
        await _refused(port, foreign)
        intruder = peer_client_context(
            certs / "ca.pem", certs / "intruder.pem", certs / "intruder-key.pem"
        )
        await _refused(port, intruder)
        stats = n1.transport.stats
        await wait_until(lambda: stats.rejects["tls"] >= 2 and stats.rejects["not_member"] >= 1)
        assert n1.healthy()
        await write(c, b"still fine")
        await wait_until(lambda: converged(c))


async def test_a_corrupted_database_is_refused_at_start(tmp_path: Path, certs: Path) -> None:
    async with running(tmp_path, certs, 3) as c:
        await c.wait_leader()
        await write(c, b"x")
        await wait_until(lambda: converged(c))
        c.crash("n3")
    db = tmp_path / "data" / "n3" / "raft.db"
    with db.open("r+b") as f:
        f.write(b"\x00" * 100)  # the database header: SQLite no longer knows the file
    node = Node(c.settings("n3"))
    with pytest.raises(StorageCorrupt):
        await node.run()


async def test_a_storage_error_stops_the_node(tmp_path: Path, certs: Path) -> None:
    """Fail-stop: after a failed write the node does not carry on."""
    c = LocalCluster(tmp_path, certs, ["n1"])
    node: Node | None = None
    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            await c.start(nursery)
            node = c.nodes["n1"]
            with trio.fail_after(HANG):
                await c.wait_leader()
                assert node.storage is not None

                async def broken(rd: object) -> float:
                    raise StorageError("disk I/O error")

                node.storage.save = broken  # type: ignore[method-assign]
                await node.propose(b"never durable")
    assert info.group_contains(StorageError)
    assert node is not None and not node.healthy()


async def test_a_proposal_covered_by_an_installed_snapshot_is_answered_not_left_waiting(
    tmp_path: Path, certs: Path
) -> None:
    """A deposed leader's proposal that never committed, when the node catches up by a
    snapshot past its index (no entry at that index is ever applied there), fails with
    ProposalDropped at the install instead of waiting for its caller's timeout; and no
    waiter is left behind (issue: proposal waiters leaked at snapshot installs)."""
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"], snapshot_entries=5)
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            old = await c.wait_leader()
            await write(c, b"before")
            c.faults.isolate(old, c.ids)
            outcome: list[BaseException | object] = []

            async def stranded() -> None:
                try:
                    outcome.append(await c.nodes[old].propose(b"stranded"))
                except (ProposalDropped, NotLeader) as exc:
                    outcome.append(exc)

            nursery.start_soon(stranded)
            await wait_until(lambda: len(c.nodes[old].waiters.proposals) == 1)
            await wait_until(lambda: c.leader() not in (None, old))
            for i in range(30):  # the others compact their logs well past that index
                await write(c, b"during %d" % i)
            new = c.leader()
            assert new is not None
            await wait_until(lambda: c.nodes[new].snapshot_index > 10)
            c.faults.heal()
            await wait_until(lambda: c.nodes[old].snapshot_index > 10)  # it installed one
            with trio.fail_after(10):  # a hang guard: a propose has no timeout of its own
                await wait_until(lambda: bool(outcome))
            assert isinstance(outcome[0], ProposalDropped), outcome
            assert c.nodes[old].waiters.proposals == {}
        nursery.cancel_scope.cancel()


async def test_a_read_whose_request_was_lost_is_failed_by_the_next_answered_read(
    tmp_path: Path, certs: Path
) -> None:
    """A follower's ReadIndex request that never reaches the leader leaves its waiter
    behind once its caller gives up (issue: read waiters leak during a partition).
    Reads are answered in the order asked, so the next answered read proves the older
    one lost: it is failed then, and no waiter is left."""
    from liferaft.core import ReadIndexRequest

    async with running(tmp_path, certs, 3) as c:
        leader = await c.wait_leader()
        await write(c, b"x")
        follower = next(i for i in c.ids if i != leader)
        node = c.nodes[follower]
        normal = node._send_filter
        assert normal is not None
        dropped: list[object] = []

        def drop_first_read_request(msgs: list[AnyMessage]) -> list[AnyMessage]:
            kept = []
            for m in msgs:
                if isinstance(m, ReadIndexRequest) and not dropped:
                    dropped.append(m)
                else:
                    kept.append(m)
            return normal(kept)

        node._send_filter = drop_first_read_request
        with trio.move_on_after(0.3):  # the caller gives up: its request was lost
            await node.read_index()
        assert dropped and len(node.waiters.reads) == 1
        assert await node.read_index() >= 1  # the next read is answered...
        assert node.waiters.reads == {}  # ...and the lost one is gone with it


async def test_a_read_whose_request_was_lost_is_failed_in_time_without_another_read(
    tmp_path: Path, certs: Path
) -> None:
    """With every ReadIndex request of a follower lost (a one-way loss: it still hears
    the leader's heartbeats, so it never looks for another), no later read is answered
    to fail the lost ones; they expire after READ_ROUNDS_MAX election timeouts instead
    of piling up (found by the whole-node simulator)."""
    from liferaft.core import ReadIndexRequest
    from liferaft.node.loop import READ_ROUNDS_MAX
    from liferaft.node.waiters import ReadFailed

    async with running(tmp_path, certs, 3) as c:
        leader = await c.wait_leader()
        await write(c, b"x")
        follower = next(i for i in c.ids if i != leader)
        node = c.nodes[follower]
        normal = node._send_filter
        assert normal is not None

        def drop_read_requests(msgs: list[AnyMessage]) -> list[AnyMessage]:
            return normal([m for m in msgs if not isinstance(m, ReadIndexRequest)])

        node._send_filter = drop_read_requests
        for _ in range(5):
            with trio.move_on_after(0.05):  # each caller gives up; the next asks anew
                await node.read_index()
        assert len(node.waiters.reads) == 5
        with pytest.raises(ReadFailed):  # a caller that waits is told, in time
            await node.read_index()
        assert node.waiters.reads == {}
        age = READ_ROUNDS_MAX * node.settings.raft.election_timeout_ms / 1000
        assert age < HANG


async def test_a_snapshot_carries_only_the_addresses_of_applied_config_entries(
    tmp_path: Path, certs: Path
) -> None:
    """A leader cut off from the others appends a CONFIG entry that adds n9 (with its
    addresses) and can never commit it. The snapshot it takes meanwhile must not carry
    n9's addresses: a snapshot holds the state as of applied entries, and a follower
    installing it would learn a member that never was."""
    from liferaft.core import ConfChange, ConfChangeType
    from liferaft.node import transfer

    async with running(tmp_path, certs, 3) as c:
        leader = await c.wait_leader()
        await write(c, b"x")
        node = c.nodes[leader]
        c.faults.isolate(leader, c.ids)
        ctx = Node.encode_addresses("127.0.0.1:1", "127.0.0.1:2")
        await node.call(
            lambda r: r.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "n9", ctx))
        )
        await wait_until(lambda: "n9" in node.addresses)  # appended: dialled already
        assert node.raft is not None and node.raft.commit < node.raft.log.last_index
        before = node.snapshot_index
        node._applier._compact_send.send_nowait(None)
        await wait_until(lambda: node.snapshot_index > before)
        about = transfer.parse(node.raft._snapshot.data)  # type: ignore[union-attr]
        assert set(about["members"]) == set(c.ids)


def stall_applier(node: Node) -> trio.Event:
    """Hold ``node``'s applier (as a slow disk would) until the returned event is set."""
    release = trio.Event()
    applier = node._applier
    real_apply = applier._apply

    async def stalled(entries: list[Entry]) -> None:
        await release.wait()
        await real_apply(entries)

    applier._apply = stalled  # type: ignore[method-assign]
    return release


async def test_a_stalled_applier_never_holds_up_the_core_loop(tmp_path: Path, certs: Path) -> None:
    """The leader's applier hangs (a slow disk, a huge run) while thousands of entries
    commit: the core loop never waits for it, so heartbeats go on, nobody calls an
    election, and the applier catches up once it moves again (issue: the applier
    blocking the core loop on a full apply channel could stall heartbeats)."""
    async with running(tmp_path, certs, 3) as c:
        leader = await c.wait_leader()
        await write(c, b"x")
        node = c.nodes[leader]
        assert node.raft is not None
        term = node.raft.term
        release = stall_applier(node)
        applied = node.applied
        for _ in range(40):  # 40 x 100 entries, more than any queue between them held
            await node.call(lambda r: [r.propose(b"y") for _ in range(100)])
        target = node.raft.log.last_index
        await wait_until(lambda: node.raft is not None and node.raft.commit >= target)
        for _ in range(5):  # several election timeouts with the applier stalled
            await trio.sleep(node.settings.raft.election_timeout_ms / 1000)
        assert node.applied == applied
        assert all(n.raft is not None and n.raft.term == term for n in c.nodes.values())
        assert all(n.raft is not None and n.raft.leader == leader for n in c.nodes.values())
        release.set()
        await wait_until(lambda: node.applied >= target)


async def test_a_follower_whose_applier_lags_refuses_appends_past_its_backlog_bound(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower's applier hangs (a slower disk) while writes commit through the
    leader and the other follower: the follower holds about APPLY_BACKLOG_BYTES of
    committed, unapplied entries at most, refusing the appends that would bring more,
    and catches up once its applier moves again."""
    bound = 64 * 1024
    value = b"v" * 8192
    monkeypatch.setattr(loop, "APPLY_BACKLOG_BYTES", bound)
    async with running(tmp_path, certs, 3) as c:
        leader_id = await c.wait_leader()
        await write(c, b"x")
        leader = c.nodes[leader_id]
        slow = next(n for i, n in c.nodes.items() if i != leader_id)
        release = stall_applier(slow)
        queue = slow._applier.queue
        real_put = queue.put_entries
        most = 0

        def put_entries(entries: tuple[Entry, ...]) -> None:
            nonlocal most
            real_put(entries)
            most = max(most, queue.bytes)

        queue.put_entries = put_entries  # type: ignore[method-assign]
        for _ in range(64):  # 512 KiB, eight times the bound
            await write(c, value)
        leader = c.nodes[await c.wait_leader()]
        assert leader.raft is not None and slow.raft is not None
        assert bound < most <= bound + 4 * len(value)
        assert slow.raft.log.last_index < leader.raft.log.last_index  # appends refused
        target = leader.raft.commit
        release.set()
        await wait_until(lambda: slow.applied >= target)


async def test_the_leader_times_heartbeat_round_trips_to_each_peer(
    tmp_path: Path, certs: Path
) -> None:
    """liferaft_network_peer_round_trip_time_seconds{peer}: heartbeat to answer."""
    async with running(tmp_path, certs, 3) as c:
        leader = await c.wait_leader()
        node = c.nodes[leader]
        others = sorted(i for i in c.ids if i != leader)

        rtt = "liferaft_network_peer_round_trip_time_seconds"
        await wait_until(lambda: all(by_peer(node, f"{rtt}_count").get(p, 0) >= 3 for p in others))
        sums = by_peer(node, f"{rtt}_sum")
        assert sorted(by_peer(node, f"{rtt}_count")) == others
        assert all(sums[p] > 0 for p in others)


async def test_the_peer_connected_gauge_follows_the_links(tmp_path: Path, certs: Path) -> None:
    """liferaft_network_peer_connected{peer}: 1 while the link is up, 0 once the member
    is gone (the LiferaftPeerUnreachable alert rests on it)."""
    async with running(tmp_path, certs, 3) as c:
        leader = await c.wait_leader()
        node = c.nodes[leader]
        others = sorted(i for i in c.ids if i != leader)

        def gauge() -> dict[str, float]:
            return by_peer(node, "liferaft_network_peer_connected")

        await wait_until(lambda: gauge() == dict.fromkeys(others, 1.0))
        c.crash(others[0])
        await wait_until(lambda: gauge() == {others[0]: 0.0, others[1]: 1.0})


def by_peer(node: Node, sample: str) -> dict[str, float]:
    """The values of the ``sample`` series of the node's metrics, by their peer label."""
    return {
        s.labels["peer"]: s.value
        for fam in node.metrics.registry.collect()
        for s in fam.samples
        if s.name == sample
    }
