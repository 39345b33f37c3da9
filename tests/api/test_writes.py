"""A connection's write batches without a task each (``api.writes``): answered from the
node's callback, by request; the waiting cases (node full, an election) take the slow
path; a batch the cluster never answers is answered ``unavailable`` at its deadline
(MockClock) and its late result dropped; a connection holds at most MAX_WRITE_BATCHES.

The node and the connection are stand-ins that record what happens, so each case can be
driven exactly."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from liferaft.api import handlers
from liferaft.api.writes import MAX_WRITE_BATCHES, ConnectionWrites
from liferaft.core import NotLeader
from liferaft.node.waiters import NodeStopped, ProposalDropped, Settable


class FakeNode:
    def __init__(self, node_id: str = "n1") -> None:
        self.id = node_id
        self.full = False  # submit_writes finds no place
        self.submitted: list[tuple[list[dict[str, Any]], Settable]] = []
        self.given_up = 0
        self.proposed: list[list[dict[str, Any]]] = []  # through propose_writes
        self.leader_after_wait: str | None = node_id
        self.refusal: NotLeader | None = None  # propose_writes raises it, if set
        self.out_of_reach: set[str] = set()  # nodes whose link is down
        self.settings = type("S", (), {"raft": type("R", (), {"election_timeout_ms": 300})()})()

    def submit_writes(self, cmds: list[dict[str, Any]], size: int, out: Settable) -> Any:
        if self.full:
            return None
        self.submitted.append((cmds, out))

        def give_up() -> None:
            self.given_up += 1

        return give_up

    async def propose_writes(self, cmds: list[dict[str, Any]], size: int) -> object:
        self.proposed.append(cmds)
        if self.refusal is not None:
            raise self.refusal
        return [{"revision": 100 + i} for i in range(len(cmds))]

    async def wait_for_leader(self, seconds: float) -> str | None:
        return self.leader_after_wait

    def reaches(self, node_id: str) -> bool:
        return node_id not in self.out_of_reach

    def client_endpoint(self, node_id: str) -> str | None:
        return f"wss://{node_id}.example:2379/v1"


class FakeConnection:
    def __init__(self, node: FakeNode) -> None:
        self.server = type("Server", (), {"node": node})()
        self.answers: list[tuple[list[int], list[dict[str, Any]]]] = []

    def answer_writes(
        self, reqs: list[dict[str, Any]], results: list[dict[str, Any]], started: float
    ) -> None:
        self.answers.append(([r["id"] for r in reqs], results))


def puts(*ids: int) -> list[dict[str, Any]]:
    return [{"id": i, "op": "put", "key": f"k{i}", "value": b"v"} for i in ids]


async def started(node: FakeNode, nursery: trio.Nursery) -> tuple[ConnectionWrites, FakeConnection]:
    conn = FakeConnection(node)
    writes = ConnectionWrites(conn)  # type: ignore[arg-type]
    await nursery.start(writes.run)
    return writes, conn


async def test_results_are_answered_request_by_request_without_the_id_in_the_log() -> None:
    node = FakeNode()
    async with trio.open_nursery() as nursery:
        writes, conn = await started(node, nursery)
        await writes.submit(puts(1, 2, 3), 90)
        ((cmds, out),) = node.submitted
        assert cmds == [{"op": "put", "key": f"k{i}", "value": b"v"} for i in (1, 2, 3)]
        out.set([{"revision": 7}, {"error": {"code": "invalid_request", "message": "x"}}, {}])
        assert conn.answers == [
            (
                [1, 2, 3],
                [{"revision": 7}, {"error": {"code": "invalid_request", "message": "x"}}, {}],
            )
        ]
        nursery.cancel_scope.cancel()


async def test_an_entry_that_failed_as_a_whole_answers_every_write_with_its_error() -> None:
    node = FakeNode()
    async with trio.open_nursery() as nursery:
        writes, conn = await started(node, nursery)
        await writes.submit(puts(1, 2), 60)
        node.submitted[0][1].set({"error": {"code": "internal", "message": "bad entry"}})
        assert conn.answers == [
            ([1, 2], [{"error": {"code": "internal", "message": "bad entry"}}] * 2)
        ]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (NotLeader("n2"), "not_leader"),
        (ProposalDropped("entry 9 was replaced by a new leader"), "unavailable"),
        # the node stopped (a storage failure) before the entry's fate was known: the
        # client is told so, not "internal" (found by the whole-node simulator)
        (NodeStopped("node stopped"), "unavailable"),
    ],
)
async def test_a_refused_batch_is_answered_with_the_reason(error: Exception, code: str) -> None:
    node = FakeNode()
    async with trio.open_nursery() as nursery:
        writes, conn = await started(node, nursery)
        await writes.submit(puts(1, 2), 60)
        node.submitted[0][1].fail(error)
        ((ids, results),) = conn.answers
        assert ids == [1, 2]
        assert [r["error"]["code"] for r in results] == [code, code]
        if code == "not_leader":
            assert results[0]["error"]["leader_endpoint"] == "wss://n2.example:2379/v1"
        nursery.cancel_scope.cancel()


async def test_a_batch_refused_during_an_election_waits_for_it_and_is_proposed_again() -> None:
    node = FakeNode("n1")
    async with trio.open_nursery() as nursery:
        writes, conn = await started(node, nursery)
        await writes.submit(puts(1), 30)
        node.submitted[0][1].fail(NotLeader(None))  # no leader known yet
        await trio.testing.wait_all_tasks_blocked()
        # this node won the election: the batch went through propose_writes
        assert node.proposed == [[{"op": "put", "key": "k1", "value": b"v"}]]
        assert conn.answers == [([1], [{"revision": 100}])]
        nursery.cancel_scope.cancel()


async def test_a_batch_refused_after_its_connection_ended_is_dropped_not_a_crash() -> None:
    """The core loop fails a batch (NotLeader, an election under way) after the client's
    connection has ended: nobody is left to answer and nothing was proposed, so the
    batch is let go. Raising there would stop the node (it runs in the core loop)."""
    node = FakeNode("n1")
    async with trio.open_nursery() as nursery:
        writes, conn = await started(node, nursery)
        await writes.submit(puts(1), 30)
        nursery.cancel_scope.cancel()  # the connection ends
    node.submitted[0][1].fail(NotLeader(None))  # must not raise
    assert node.proposed == [] and conn.answers == []
    assert writes._slots.value == MAX_WRITE_BATCHES  # its slot is back


async def test_a_batch_refused_naming_a_leader_out_of_reach_waits_for_the_next_one() -> None:
    # The follower's link to n2 broke (n2 was killed): rather than send the client to a
    # dead node, the batch waits for the election and names its winner.
    node = FakeNode("n1")
    node.out_of_reach = {"n2"}
    node.refusal = NotLeader("n2")
    node.leader_after_wait = "n3"
    async with trio.open_nursery() as nursery:
        writes, conn = await started(node, nursery)
        await writes.submit(puts(1), 30)
        node.submitted[0][1].fail(NotLeader("n2"))
        await trio.testing.wait_all_tasks_blocked()
        ((ids, (result,)),) = conn.answers
        assert ids == [1] and result["error"]["code"] == "not_leader"
        assert result["error"]["leader_endpoint"] == "wss://n3.example:2379/v1"
        nursery.cancel_scope.cancel()


async def test_when_the_node_is_full_the_batch_waits_in_a_task() -> None:
    node = FakeNode()
    node.full = True
    async with trio.open_nursery() as nursery:
        writes, conn = await started(node, nursery)
        await writes.submit(puts(5, 6), 60)
        await trio.testing.wait_all_tasks_blocked()
        assert node.submitted == []
        assert len(node.proposed) == 1
        assert conn.answers == [([5, 6], [{"revision": 100}, {"revision": 101}])]
        nursery.cancel_scope.cancel()


async def test_an_unanswered_batch_is_unavailable_at_its_deadline_and_its_late_result_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = FakeNode()
    async with trio.open_nursery() as nursery:
        writes, conn = await started(node, nursery)
        await writes.submit(puts(1), 30)
        await trio.sleep(handlers.REQUEST_TIMEOUT / 2)
        await writes.submit(puts(2), 30)
        await trio.sleep(handlers.REQUEST_TIMEOUT / 2 - 0.01)
        assert conn.answers == []  # not yet: batch 1 has 10 ms left
        await trio.sleep(0.02)
        assert [ids for ids, _ in conn.answers] == [[1]]
        await trio.sleep(handlers.REQUEST_TIMEOUT / 2)
        assert [ids for ids, _ in conn.answers] == [[1], [2]]
        for _, results in conn.answers:
            assert results[0]["error"]["code"] == "unavailable"
            assert "may or may not" in results[0]["error"]["message"]
        assert node.given_up == 2  # their places among the node's proposals went back
        node.submitted[0][1].set([{"revision": 1}])  # too late: nobody hears it twice
        assert len(conn.answers) == 2
        nursery.cancel_scope.cancel()


async def test_a_connection_holds_at_most_max_write_batches_unanswered() -> None:
    node = FakeNode()
    async with trio.open_nursery() as nursery:
        writes, _ = await started(node, nursery)
        for i in range(MAX_WRITE_BATCHES):
            await writes.submit(puts(i), 30)
        blocked = trio.Event()

        async def one_more() -> None:
            await writes.submit(puts(9999), 30)
            blocked.set()

        nursery.start_soon(one_more)
        await trio.testing.wait_all_tasks_blocked()
        assert not blocked.is_set()
        assert len(node.submitted) == MAX_WRITE_BATCHES
        node.submitted[0][1].set([{"revision": 1}])  # one answered: a slot frees
        await blocked.wait()
        assert len(node.submitted) == MAX_WRITE_BATCHES + 1
        nursery.cancel_scope.cancel()


async def test_an_answered_batch_keeps_nothing_heavy_while_it_waits_for_the_timer() -> None:
    """The timer drops a batch only at its deadline; until then an answered batch must
    hold neither its requests nor the node's waiter (a reference cycle): at 15,000
    writes/s those kept 5 s of requests alive, and the garbage collector's passes over
    them paused the leader for up to 117 ms (an election at 20/100 ms)."""
    node = FakeNode()
    async with trio.open_nursery() as nursery:
        writes, conn = await started(node, nursery)
        await writes.submit(puts(1, 2, 3), 90)
        (batch,) = writes._timed
        assert batch.reqs and batch.give_up is not None
        node.submitted[0][1].set([{}, {}, {}])
        assert len(conn.answers) == 1
        assert batch.reqs == [] and batch.give_up is None
        nursery.cancel_scope.cancel()
