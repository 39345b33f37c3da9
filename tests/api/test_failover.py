"""Clients through leader failure: no acknowledged write lost, no retried write applied
twice (the client library against a real cluster); a request that meets an election
waits for its outcome instead of answering ``unavailable`` (raw protocol)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from test_protocol import HANG, Raw, cluster, connect

from liferaft.client import compare, op_put, open_client
from liferaft.core import AnyMessage
from liferaft.core.messages import VoteRequest
from liferaft.node.node import Node
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


# ---------------------------------------------------------------- requests that meet an election
#
# handlers.write_batch/read: a node that knows no leader waits (Node.wait_for_leader, up to
# two election timeouts) for the election's outcome. The elections below are held open
# with the fault layer and decided by the test, so each test takes the path its name
# claims: the request is known to be waiting (LeaderWaits.entered) before a leader can
# emerge.


class LeaderWaits:
    """Records the node's wait_for_leader calls: (seconds allowed, leader returned)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, node: Node) -> None:
        self.entered = trio.Event()  # a request is waiting for the election's outcome
        self.calls: list[tuple[float, str | None]] = []
        inner = node.wait_for_leader

        async def wait_for_leader(seconds: float) -> str | None:
            self.entered.set()
            leader = await inner(seconds)
            self.calls.append((seconds, leader))
            return leader

        monkeypatch.setattr(node, "wait_for_leader", wait_for_leader)

    def leaders(self) -> list[str | None]:
        return [leader for _, leader in self.calls]


def knows_no_leader(node: Node) -> bool:
    return node.raft is not None and node.raft.leader is None


def last_index(node: Node) -> int:
    assert node.raft is not None
    return node.raft.log.last_index


@contextmanager
def votes_dropped(node: Node) -> Iterator[None]:
    """Drop every vote request (pre-votes too) ``node`` sends: it cannot be elected, nor
    start an election that competes with another node's."""
    inner = node._send_filter

    def drop_votes(msgs: list[AnyMessage]) -> list[AnyMessage]:
        out = inner(msgs) if inner is not None else msgs
        return [m for m in out if not isinstance(m, VoteRequest)]

    node._send_filter = drop_votes
    try:
        yield
    finally:
        node._send_filter = inner


@asynccontextmanager
async def election_held_open(
    tmp: Path, certs: Path
) -> AsyncIterator[tuple[LocalCluster, str, str]]:
    """A 3-node cluster holding ``k`` = ``before`` whose leader was stopped and whose two
    survivors cannot reach each other: both know no leader, and neither can be elected
    (pre-vote keeps their terms where they were) until ``elect``. Yields the cluster and
    the two survivors."""
    async with cluster(tmp, certs) as c:
        lead = await c.wait_leader()
        async with connect(c, c.token(), c.ids.index(lead)) as r:
            assert (await r.call(op="put", key="k", value=b"before"))["ok"]
        a, b = (i for i in c.ids if i != lead)
        # Equal logs, so that either survivor can win the other's vote.
        await wait_until(lambda: len({last_index(n) for n in c.nodes.values()}) == 1)
        c.faults.isolate(a, [b])
        c.crash(lead)
        await wait_until(lambda: knows_no_leader(c.nodes[a]) and knows_no_leader(c.nodes[b]))
        yield c, a, b


async def elect(c: LocalCluster, winner: str, loser: str) -> None:
    """Reconnect the survivors and have ``winner`` elected (``loser`` cannot compete)."""
    with votes_dropped(c.nodes[loser]):
        c.faults.heal()
        await c.nodes[winner].call(lambda raft: raft.campaign())
        await wait_until(lambda: c.leader() == winner)


async def ask_during_the_election(
    c: LocalCluster, r: Raw, waits: LeaderWaits, req: dict[str, Any], *, winner: str, loser: str
) -> dict[str, Any]:
    """Send ``req``; once it waits for the election's outcome, elect ``winner``. Returns
    the answer (which may come without any wait: then no one is elected)."""

    async def elect_once_waiting() -> None:
        await waits.entered.wait()
        await elect(c, winner, loser)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(elect_once_waiting)
        answer = await r.call(**req)
        if not waits.entered.is_set():
            nursery.cancel_scope.cancel()
    return answer


async def test_a_put_to_a_node_that_knows_no_leader_is_redirected_to_the_node_elected(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        election_held_open(tmp_path, certs) as (c, asked, other),
        connect(c, c.token(), c.ids.index(asked)) as r,
    ):
        waits = LeaderWaits(monkeypatch, c.nodes[asked])
        put = {"op": "put", "key": "k", "value": b"after"}
        answer = await ask_during_the_election(c, r, waits, put, winner=other, loser=asked)
        assert not answer["ok"] and answer["error"]["code"] == "not_leader", answer
        assert answer["error"]["leader_endpoint"] == c.endpoints()[c.ids.index(other)]
        assert waits.leaders() == [other]
        async with connect(c, c.token(), c.ids.index(other)) as at_leader:
            again = await at_leader.call(**put)
            assert again["ok"], again
            got = await at_leader.call(op="get", key="k")
            assert got["kv"]["value"] == b"after"
            assert got["kv"]["mod_revision"] == again["revision"]


async def test_a_put_to_a_node_that_knows_no_leader_is_carried_out_there_if_it_is_elected(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        election_held_open(tmp_path, certs) as (c, asked, other),
        connect(c, c.token(), c.ids.index(asked)) as r,
    ):
        waits = LeaderWaits(monkeypatch, c.nodes[asked])
        put = {"op": "put", "key": "k", "value": b"after"}
        answer = await ask_during_the_election(c, r, waits, put, winner=asked, loser=other)
        assert answer["ok"], answer
        assert waits.leaders() == [asked]
        got = await r.call(op="get", key="k")
        assert got["kv"]["value"] == b"after"
        assert got["kv"]["mod_revision"] == answer["revision"]


READS = [
    pytest.param({"op": "get", "key": "k"}, id="get"),
    pytest.param({"op": "range", "prefix": "k"}, id="range"),
]


def read_value(answer: dict[str, Any]) -> bytes:
    kv = answer["kv"] if "kv" in answer else answer["kvs"][0]
    value: bytes = kv["value"]
    return value


@pytest.mark.parametrize("read", READS)
async def test_a_linearizable_read_on_a_node_knowing_no_leader_is_answered_once_another_is_elected(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch, read: dict[str, Any]
) -> None:
    async with (
        election_held_open(tmp_path, certs) as (c, asked, other),
        connect(c, c.token(), c.ids.index(asked)) as r,
    ):
        waits = LeaderWaits(monkeypatch, c.nodes[asked])
        answer = await ask_during_the_election(c, r, waits, dict(read), winner=other, loser=asked)
        assert answer["ok"], answer  # the node asked confirms the read with the new leader
        assert read_value(answer) == b"before"
        assert waits.leaders() == [other]


@pytest.mark.parametrize("read", READS)
async def test_a_linearizable_read_on_a_node_knowing_no_leader_is_answered_once_it_is_elected(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch, read: dict[str, Any]
) -> None:
    async with (
        election_held_open(tmp_path, certs) as (c, asked, other),
        connect(c, c.token(), c.ids.index(asked)) as r,
    ):
        waits = LeaderWaits(monkeypatch, c.nodes[asked])
        answer = await ask_during_the_election(c, r, waits, dict(read), winner=asked, loser=other)
        assert answer["ok"], answer
        assert read_value(answer) == b"before"
        assert waits.leaders() == [asked]


# A hang guard on top of the wait (two election timeouts), not a timing claim.
MARGIN = 5.0


async def test_without_a_quorum_a_put_to_a_node_that_knows_no_leader_is_answered_unavailable(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with cluster(tmp_path, certs) as c:
        lead = await c.wait_leader()
        survivor = next(i for i in c.ids if i != lead)
        async with connect(c, c.token(), c.ids.index(survivor)) as r:
            for i in list(c.nodes):
                if i != survivor:
                    c.crash(i)
            node = c.nodes[survivor]
            await wait_until(lambda: knows_no_leader(node))
            waits = LeaderWaits(monkeypatch, node)
            wait_s = 2 * node.settings.raft.election_timeout_ms / 1000
            with trio.fail_after(wait_s + MARGIN):
                answer = await r.call(op="put", key="k", value=b"v")
        assert not answer["ok"] and answer["error"]["code"] == "unavailable", answer
        assert waits.calls == [(wait_s, None)]  # it waited two election timeouts, in vain


@asynccontextmanager
async def cut_off_follower(
    tmp: Path, certs: Path, monkeypatch: pytest.MonkeyPatch, *, election_ms: int
) -> AsyncIterator[tuple[LocalCluster, str, str, str, LeaderWaits]]:
    """A 3-node cluster in which one follower's link to the leader looks down (what a
    killed leader's closed connections look like), while the leader lives and still
    reaches it. Yields the cluster, the leader, that follower, the other follower and
    the follower's LeaderWaits."""
    c = LocalCluster(tmp, certs, ["n1", "n2", "n3"], election_ms=election_ms)
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            await c.nodes["n1"].call(lambda raft: raft.campaign())
            old = await c.wait_leader()
            asked, other = (i for i in c.ids if i != old)
            node = c.nodes[asked]
            await wait_until(lambda: node.raft is not None and node.raft.leader == old)
            assert node.transport is not None
            inner = node.transport.connected
            monkeypatch.setattr(node.transport, "connected", lambda p: p != old and inner(p))
            yield c, old, asked, other, LeaderWaits(monkeypatch, node)
        nursery.cancel_scope.cancel()


async def test_a_put_to_a_follower_cut_off_from_its_leader_is_sent_to_the_next_leader(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The follower holds the put for the election, rather than send the client to a
    # node that is most likely gone. Here the leader hands over to the other follower,
    # so the outcome is decided by the test; the long election timeout gives the
    # hand-over ample time within the follower's wait.
    async with cut_off_follower(tmp_path, certs, monkeypatch, election_ms=2500) as (
        c,
        old,
        asked,
        new,
        waits,
    ):

        async def hand_over_once_waiting() -> None:
            await waits.entered.wait()
            node = c.nodes[asked]
            assert node.raft is not None and node.raft.leader == old  # still its leader
            await c.nodes[old].transfer_leadership(new)

        async with connect(c, c.token(), c.ids.index(asked)) as r, trio.open_nursery() as n:
            n.start_soon(hand_over_once_waiting)
            answer = await r.call(op="put", key="k", value=b"v")
            if not waits.entered.is_set():  # answered without waiting: no hand-over
                n.cancel_scope.cancel()
    assert not answer["ok"] and answer["error"]["code"] == "not_leader", answer
    assert answer["error"]["leader_endpoint"] == c.endpoints()[c.ids.index(new)]
    assert waits.leaders() == [new]


async def test_a_put_to_a_follower_cut_off_from_a_leader_still_heard_is_sent_there(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only our link to the leader is down (a one-way fault): its heartbeats still come,
    # so the wait ends at the next one, not after two election timeouts (here two
    # minutes: longer than a request may take, so the put would be answered
    # `unavailable` at its deadline).
    async with (
        cut_off_follower(tmp_path, certs, monkeypatch, election_ms=60_000) as (
            c,
            old,
            asked,
            _,
            waits,
        ),
        connect(c, c.token(), c.ids.index(asked)) as r,
    ):
        answer = await r.call(op="put", key="k", value=b"v")
    assert not answer["ok"] and answer["error"]["code"] == "not_leader", answer
    assert answer["error"]["leader_endpoint"] == c.endpoints()[c.ids.index(old)]
    assert waits.calls == [(120.0, old)]  # it waited, and the leader was heard
