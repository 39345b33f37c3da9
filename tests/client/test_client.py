"""The async client and SyncClient against the fake server (tests/client/fakeserver.py):
each method, pipelining and batching, retries that keep a write's session and seq,
redirects, typed errors, the handshake's 401."""

from __future__ import annotations

import itertools
import random
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from fakeserver import TOKEN, FakeCluster, make_certs, refusing_port
from trio.testing import MockClock

from liferaft.client import (
    Client,
    Compacted,
    ConnectionFailed,
    InternalError,
    InvalidRequest,
    KeyValue,
    LiferaftError,
    Member,
    MemberError,
    NotLeader,
    PermissionDenied,
    Status,
    SyncClient,
    TLSError,
    TooLarge,
    Unauthenticated,
    Unavailable,
    compare,
    error_from_wire,
    op_delete,
    op_get,
    op_put,
    op_range,
    open_client,
)
from liferaft.client.retry import BACKOFF_BASE, BACKOFF_CAP
from liferaft.client.wire import decode_message, pack, parse_endpoint

HANG = 60  # seconds: a guard against hangs, not a performance claim


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("client-certs")
    make_certs(d)
    return d


@pytest.fixture
async def cluster(nursery: trio.Nursery, certs: Path) -> FakeCluster:
    return await FakeCluster(certs).start(nursery)


def opener(
    cluster: FakeCluster, certs: Path, *nodes: str, **kw: Any
) -> AbstractAsyncContextManager[Client]:
    """``open_client`` to the given fake nodes (default: n1 only)."""
    urls = [cluster[n].url for n in nodes] if nodes else cluster.urls[:1]
    return open_client(urls, token=TOKEN, cacert=certs / "ca.pem", **kw)


# ---------------------------------------------------------------- each method


async def test_put_get_range_delete(cluster: FakeCluster, certs: Path) -> None:
    async with opener(cluster, certs) as c:
        r1 = await c.put("a/1", b"one")
        r2 = await c.put("a/2", "two")  # str is stored as UTF-8
        await c.put("b/1", b"\xff\x00")
        assert r2 == r1 + 1
        kv = await c.get("a/1")
        assert kv == KeyValue("a/1", b"one", r1, r1, 1)
        assert (await c.get("a/2", serializable=True)).text == "two"  # type: ignore[union-attr]
        assert await c.get("missing") is None
        kvs, more = await c.range("a/")
        assert [k.key for k in kvs] == ["a/1", "a/2"] and not more
        kvs, more = await c.range("", limit=2)
        assert len(kvs) == 2 and more
        assert await c.delete("a/1") == 1
        assert await c.delete(prefix="a/") == 1
        assert await c.delete("nothing") == 0
        assert [k.key for k in (await c.range(""))[0]] == ["b/1"]
    sent = cluster["n1"].requests
    assert {r["op"] for r in sent} >= {"put", "get", "range", "delete"}
    gets = [r for r in sent if r["op"] == "get"]
    assert gets[1]["serializable"] is True and "serializable" not in gets[0]


async def test_txn(cluster: FakeCluster, certs: Path) -> None:
    async with opener(cluster, certs) as c:
        r = await c.txn(
            [compare("lock", "version", "==", 0)],
            [op_put("lock", "me"), op_put("x/1", b"1"), op_get("lock")],
            [op_get("lock")],
        )
        assert r.succeeded and r.revision == 1
        assert r.results[2]["kv"] == KeyValue("lock", b"me", 1, 1, 1)
        r = await c.txn(
            compare=[compare("lock", "value", "==", "you")],
            success=[op_delete("lock")],
            failure=[op_range("x/"), op_delete(prefix="x/"), op_get("lock")],
        )
        assert not r.succeeded
        assert [kv.key for kv in r.results[0]["kvs"]] == ["x/1"]
        assert r.results[1]["deleted"] == 1
        assert r.results[2]["kv"].value == b"me"
        # plain wire-shaped dicts work too; str values become bytes
        r = await c.txn(
            [{"key": "lock", "target": "value", "result": "==", "value": "me"}],
            [{"op": "put", "key": "lock", "value": "them"}],
        )
        assert r.succeeded and (await c.get("lock")).value == b"them"  # type: ignore[union-attr]
        with pytest.raises(InvalidRequest):
            await c.txn([{"key": "k", "target": "colour", "result": "==", "value": 1}])
        with pytest.raises(InvalidRequest):
            await c.txn([], [{"op": "launch"}])
    txns = [r for r in cluster["n1"].requests if r["op"] == "txn"]
    assert txns[1]["compare"][0]["value"] == b"you"


async def test_watch_key_and_prefix(cluster: FakeCluster, certs: Path) -> None:
    async with opener(cluster, certs) as c:
        rev = await c.put("w/old", b"0")
        async with c.watch(prefix="w/") as events:
            await c.put("w/a", b"1")
            await c.put("other", b"x")
            await c.delete("w/a")
            ev1 = await events.__anext__()
            ev2 = await events.__anext__()
        assert (ev1.type, ev1.kv.key, ev1.kv.value) == ("put", "w/a", b"1")
        assert (ev2.type, ev2.kv.key) == ("delete", "w/a")
        # from a past revision: the history first
        seen = []
        async with c.watch("w/old", start_revision=rev) as events:
            async for ev in events:
                seen.append(ev)
                break
        assert seen[0].kv.key == "w/old" and seen[0].kv.mod_revision == rev
        await c.get("w/old")  # sent after the unwatch, so answered after it
        ops = [r["op"] for r in cluster["n1"].requests]
        assert ops.count("watch") == 2 and ops.count("unwatch") == 2
        assert cluster.store.watchers == []


async def test_watch_resumes_after_a_dropped_connection(cluster: FakeCluster, certs: Path) -> None:
    async with opener(cluster, certs, "n1", "n2") as c:
        async with c.watch(prefix="r/") as events:
            await c.put("r/1", b"1")
            assert (await events.__anext__()).kv.key == "r/1"
            await cluster["n1"].drop_all()
            await c.put("r/2", b"2")  # may land before the watch is back: not missed
            await c.put("r/3", b"3")
            keys = [(await events.__anext__()).kv.key for _ in range(2)]
        assert keys == ["r/2", "r/3"]
    watches = [r for n in cluster.nodes.values() for r in n.requests if r["op"] == "watch"]
    assert len(watches) == 2 and watches[1]["start_revision"] == 2


async def test_status_members_transfer(cluster: FakeCluster, certs: Path) -> None:
    async with opener(cluster, certs) as c:
        st = await c.status()
        assert isinstance(st, Status) and st.is_leader
        assert st.node_id == "n1" and st.leader_id == "n1" and "id" not in st
        assert st["leader_id"] == "n1"  # read by name too, as when it was a dict
        assert [m.id for m in await c.member_list()] == ["n1", "n2"]
        members = await c.member_add("n3", "127.0.0.1:7003", "127.0.0.1:8003", learner=True)
        assert members[-1] == Member("n3", "127.0.0.1:7003", "127.0.0.1:8003", voter=False)
        assert members[-1].as_dict() == {
            "id": "n3",
            "peer": "127.0.0.1:7003",
            "client": "127.0.0.1:8003",
            "voter": False,
        }
        assert (await c.member_promote("n3"))[-1].voter is True
        assert [m.id for m in await c.member_remove("n3")] == ["n1", "n2"]
        with pytest.raises(MemberError):
            await c.member_remove("n9")
        assert await c.transfer_leader("n2") == "n2"
        assert await c.transfer_leader() == "n1"
        await c.refresh(TOKEN)
        with pytest.raises(Unauthenticated):
            await c.refresh("not-the-token")
    adds = [r for r in cluster["n1"].requests if r["op"] == "member_add"]
    assert adds[0]["member_id"] == "n3" and adds[0]["learner"] is True


async def test_argument_checks(cluster: FakeCluster, certs: Path) -> None:
    async with opener(cluster, certs) as c:
        with pytest.raises(InvalidRequest):
            await c.put("", b"v")
        with pytest.raises(InvalidRequest):
            await c.put("k" * 4097, b"v")
        with pytest.raises(InvalidRequest):
            await c.put("k", 5)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest):
            await c.delete()
        with pytest.raises(InvalidRequest):
            c.watch("k", prefix="k")
    with pytest.raises(ValueError):
        Client(["http://127.0.0.1:1"], token=TOKEN)
    with pytest.raises(ValueError):
        Client(["wss://127.0.0.1:1"], token="")


# ---------------------------------------------------------------- batching, pipelining


async def test_concurrent_puts_share_a_few_messages(cluster: FakeCluster, certs: Path) -> None:
    server = cluster["n1"]
    async with opener(cluster, certs) as c:
        server.messages.clear()
        revisions: list[int] = []

        async def one(i: int) -> None:
            revisions.append(await c.put(f"k/{i:03}", f"v{i}"))

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(one, i)
        assert sorted(revisions) == list(range(1, 101))
        assert len(server.messages) < 10, [len(m) for m in server.messages]
        assert isinstance(server.messages[0], list)  # an array of requests
        puts = server.requests
        assert len(puts) == 100 and len({r["id"] for r in puts}) == 100
        assert len({r["seq"] for r in puts}) == 100
        assert {r["session"] for r in puts} == {c.session} and len(c.session) == 16
        kvs, _ = await c.range("k/")
        assert len(kvs) == 100


async def test_max_batch_splits_messages(cluster: FakeCluster, certs: Path) -> None:
    server = cluster["n1"]
    async with opener(cluster, certs, max_batch=10) as c:
        server.messages.clear()
        async with trio.open_nursery() as nursery:
            for i in range(35):
                nursery.start_soon(c.put, f"b/{i}", b"v")
        assert all(not isinstance(m, list) or len(m) <= 10 for m in server.messages)
        assert len(server.requests) == 35 and len(server.messages) >= 4


async def test_max_batch_one_sends_one_request_per_message_even_when_written_together(
    cluster: FakeCluster, certs: Path
) -> None:
    """Requests queued together leave in one write, but still as one message each."""
    server = cluster["n1"]
    async with opener(cluster, certs, max_batch=1) as c:
        server.messages.clear()
        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(c.put, f"one/{i}", b"v")
        assert len(server.messages) == 40
        assert all(isinstance(m, dict) for m in server.messages)  # a request, not an array
        assert sorted(r["key"] for r in server.requests) == sorted(f"one/{i}" for i in range(40))


async def test_pipelined_responses_out_of_order(cluster: FakeCluster, certs: Path) -> None:
    server = cluster["n1"]
    async with opener(cluster, certs) as c:
        for i in range(5):
            await c.put(f"o/{i}", f"value-{i}")
        server.reverse = True  # each response alone, last request first
        server.messages.clear()
        results: dict[int, bytes] = {}

        async def read(i: int) -> None:
            kv = await c.get(f"o/{i}")
            assert kv is not None
            results[i] = kv.value

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(read, i)
        assert results == {i: f"value-{i}".encode() for i in range(5)}
        assert len(server.messages) == 1  # five requests in one message, five answers


def test_wire_packing() -> None:
    assert decode_message(pack([b"\xa1aa\x01"])) == [{"a": 1}]
    assert decode_message(pack([b"\xa1aa\x01"] * 30)) == [{"a": 1}] * 30
    with pytest.raises(ValueError):
        decode_message(b"\xc1\x00")  # a tag
    with pytest.raises(ValueError):
        decode_message(b"\x01")  # neither a map nor an array of maps
    assert parse_endpoint("127.0.0.1:8002").url == "wss://127.0.0.1:8002/v1"
    with pytest.raises(ValueError):
        parse_endpoint("ws://127.0.0.1:8002")


# ---------------------------------------------------------------- put_many


async def test_put_many_sends_one_message_and_returns_revisions_in_order(
    cluster: FakeCluster, certs: Path
) -> None:
    server = cluster["n1"]
    async with opener(cluster, certs) as c:
        assert await c.put("first", b"0") == 1
        assert await c.put_many([]) == []
        server.messages.clear()
        items = [(f"m/{i:02}", f"v{i}") for i in range(50)]
        assert await c.put_many(items) == list(range(2, 52))
        assert len(server.messages) == 1 and len(server.messages[0]) == 50  # type: ignore[arg-type]
        reqs = server.requests
        assert [(r["op"], r["key"], r["value"]) for r in reqs] == [
            ("put", k, v.encode()) for k, v in items
        ]
        assert [r["seq"] for r in reqs] == list(range(2, 52))  # a seq each, in the session
        assert {r["session"] for r in reqs} == {c.session}
        assert (await c.get("m/07")).value == b"v7"  # type: ignore[union-attr]
        # answers one by one, last first: still each revision at its put's place
        server.reverse = True
        revs = await c.put_many([("r/a", b"1"), ("r/b", b"2"), ("r/c", b"3")])
        assert revs == [52, 53, 54]


async def test_put_many_splits_at_max_batch_and_the_session_window(
    cluster: FakeCluster, certs: Path
) -> None:
    server = cluster["n1"]
    async with opener(cluster, certs, max_batch=10) as c:
        server.messages.clear()
        assert await c.put_many([(f"b/{i}", b"v") for i in range(35)]) == list(range(1, 36))
        assert [len(m) for m in server.messages] == [10, 10, 10, 5]  # type: ignore[arg-type]
    async with opener(cluster, certs, session_window=8) as c:
        server.messages.clear()
        server.seqs.clear()
        revs = await c.put_many([(f"w/{i}", b"v") for i in range(20)])
        assert revs == list(range(36, 56))
        assert [len(m) for m in server.messages] == [8, 8, 4]  # type: ignore[arg-type]
        # the server never sees a seq more than the window ahead of what it answered
        assert all(seq <= answered + 8 for seq, answered in server.seqs), server.seqs
    assert len(cluster.store.applied) == 55


async def test_put_many_retries_only_the_failed_puts_with_their_seqs(
    cluster: FakeCluster, certs: Path
) -> None:
    n1, n2 = cluster["n1"], cluster["n2"]
    async with opener(cluster, certs, "n1", "n2") as c:
        n1.inject("unavailable", op="put", times=3)  # the first three puts of the message
        revs = await c.put_many([(f"u/{i}", b"v") for i in range(10)])
        assert revs == [8, 9, 10, *range(1, 8)]  # the retried ones after, in their order
        first = {r["key"]: (r["session"], r["seq"]) for r in n1.requests}
        retried = {r["key"]: (r["session"], r["seq"]) for r in n2.requests}
        assert set(retried) == {"u/0", "u/1", "u/2"} and len(n2.messages) == 1  # together
        assert all(retried[k] == first[k] for k in retried)
        assert c.endpoint == parse_endpoint(n2.url).url  # moved on, as put does
    assert len(cluster.store.applied) == 10


async def test_put_many_after_a_lost_connection_applies_each_put_once(
    cluster: FakeCluster, certs: Path
) -> None:
    n1, n2 = cluster["n1"], cluster["n2"]
    async with opener(cluster, certs, "n1", "n2") as c:
        n1.inject("drop", op="put", apply=True)  # the first put applied, then all is lost
        revs = await c.put_many([(f"d/{i}", b"v") for i in range(5)])
    assert revs == [1, 2, 3, 4, 5]  # the first put's retry gets its first result
    assert [r["seq"] for r in n2.requests] == [r["seq"] for r in n1.requests]
    assert len(cluster.store.applied) == 5


async def test_put_many_follows_not_leader_and_times_out_attempts(
    cluster: FakeCluster, certs: Path
) -> None:
    n1, n2 = cluster["n1"], cluster["n2"]
    n1.redirect_to = n2.url
    async with opener(cluster, certs, "n1", attempt_timeout=0.3) as c:
        assert await c.put_many([(f"l/{i}", b"v") for i in range(6)]) == list(range(1, 7))
        assert len(n2.messages) == 1  # the retries travel together
        n2.inject("silence", op="put", times=2)
        assert await c.put_many([(f"s/{i}", b"v") for i in range(4)]) == [9, 10, 7, 8]
    silent = [r for r in n2.requests if r["key"] in ("s/0", "s/1")]
    assert len(silent) == 4 and silent[0]["seq"] == silent[2]["seq"]


async def test_put_many_raises_the_first_refusal_after_the_rest(
    cluster: FakeCluster, certs: Path
) -> None:
    n1 = cluster["n1"]
    n1.forbidden = ("no/",)
    async with opener(cluster, certs) as c:
        items = [("ok/0", b"0"), ("no/1", b"1"), ("ok/2", b"2"), ("no/3", b"3"), ("ok/4", b"4")]
        with pytest.raises(PermissionDenied, match="no/1") as info:
            await c.put_many(items)
        assert "2 of 5 puts failed" in "".join(info.value.__notes__)
        kvs, _ = await c.range("")
        assert [kv.key for kv in kvs] == ["ok/0", "ok/2", "ok/4"]
    assert len([r for r in n1.requests if r["op"] == "put"]) == 5  # refusals not retried


async def test_put_many_argument_errors_send_nothing(cluster: FakeCluster, certs: Path) -> None:
    server = cluster["n1"]
    async with opener(cluster, certs, max_message_bytes=1000) as c:
        server.messages.clear()
        for bad in (
            [("ok", b"v"), ("", b"v")],
            [("k", 5)],
            [("k",)],
            ["kv"],
            "kv",
            {"k": b"v"},
        ):
            with pytest.raises(InvalidRequest):
                await c.put_many(bad)  # type: ignore[arg-type]
        with pytest.raises(TooLarge):
            await c.put_many([("small", b"v"), ("big", b"x" * 1000)])
        assert server.messages == []
        assert await c.put_many([("k", b"v")]) == [1]  # no seq was lost to the errors


async def test_sync_client_put_many(cluster: FakeCluster, certs: Path) -> None:
    def script() -> None:
        with SyncClient(cluster.urls, token=TOKEN, cacert=certs / "ca.pem") as c:
            assert c.put_many([("a", "1"), ("b", b"2")]) == [1, 2]
            assert c.get("b").value == b"2"  # type: ignore[union-attr]

    await trio.to_thread.run_sync(script)


# ---------------------------------------------------------------- retries


async def test_seqs_in_flight_stay_within_the_session_window(
    cluster: FakeCluster, certs: Path
) -> None:
    n1 = cluster["n1"]
    async with opener(cluster, certs, session_window=4, attempt_timeout=0.3) as c:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(c.put, f"s/{i}", b"v")
        assert len(cluster.store.applied) == 20
        # the server never sees a seq more than the window ahead of what it answered
        assert all(seq <= answered + 4 for seq, answered in n1.seqs), n1.seqs
        # a write stuck unanswered holds the newer ones back, not the ones within reach
        n1.seqs.clear()
        n1.inject("silence", op="put")
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(c.put, f"t/{i}", b"v")
        order = [seq for seq, _ in n1.seqs]
        stuck = order[0]
        retried = order.index(stuck, 1)
        assert set(order[1:retried]) == {stuck + 1, stuck + 2, stuck + 3}
        assert len(cluster.store.applied) == 28


async def test_writes_cancelled_in_or_waiting_for_the_window_leak_nothing(
    cluster: FakeCluster, certs: Path
) -> None:
    n1 = cluster["n1"]
    async with opener(cluster, certs, session_window=2, attempt_timeout=0.4) as c:
        n1.inject("silence", op="put", times=1000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.put, "a", b"v")  # seq 1, unanswered
            nursery.start_soon(c.put, "b", b"v")  # seq 2, unanswered
            await trio.sleep(0.1)
            with trio.move_on_after(0.2) as waited:  # no room: waits, then is cancelled
                await c.put_many([("m/1", b"v"), ("m/2", b"v")])
            assert waited.cancelled_caught
            assert c._window._core._waiters == deque() and not c._window._events
            nursery.cancel_scope.cancel()  # a and b give up too
        assert not c._window._core._open and not c._window._core._done
        n1.faults.clear()
        assert await c.put_many([("x", b"1"), ("y", b"2"), ("z", b"3")]) == [1, 2, 3]
    # the cancelled put_many took no seq; x, y and z went in turns of the window's 2
    assert [r["seq"] for r in n1.requests if r["key"] in ("x", "y", "z")] == [3, 4, 5]
    last = n1.messages[-2:]
    assert isinstance(last[0], list) and len(last[0]) == 2 and isinstance(last[1], dict)


async def test_retry_after_dropped_connection_keeps_session_and_seq(
    cluster: FakeCluster, certs: Path
) -> None:
    n1, n2 = cluster["n1"], cluster["n2"]
    async with opener(cluster, certs, "n1", "n2") as c:
        n1.inject("drop", op="put", apply=True)  # applied, then the answer is lost
        rev = await c.put("once", b"v")
    attempts = [r for n in (n1, n2) for r in n.requests if r["op"] == "put"]
    assert len(attempts) == 2
    assert attempts[0]["session"] == attempts[1]["session"]
    assert attempts[0]["seq"] == attempts[1]["seq"]
    # The fake applies a (session, seq) once, so this only shows the client resent the
    # same pair; that the real cluster applies it once: test_client_cluster.py.
    assert len(cluster.store.applied) == 1
    assert rev == 1 and n2.accepted == 1  # the retry went to the next endpoint


async def test_not_leader_redirect_keeps_session_and_seq(cluster: FakeCluster, certs: Path) -> None:
    n1, n2 = cluster["n1"], cluster["n2"]
    n1.redirect_to = n2.url  # a follower: every write answers not_leader -> n2
    async with opener(cluster, certs, "n1") as c:  # n2 is not even in the list
        await c.put("k", b"1")
        await c.delete("k")
        assert c.endpoint == parse_endpoint(n2.url).url
    first, retried = n1.requests[0], n2.requests[0]
    assert (first["op"], retried["op"]) == ("put", "put")
    assert (first["session"], first["seq"]) == (retried["session"], retried["seq"])
    assert [r["op"] for r in n1.requests] == ["put"]  # later writes go to n2 directly


class Jitter(random.Random):
    """The client's source of jitter (seeded): records each draw, and tells the clock
    driver that the client is about to sleep (it draws right before it sleeps)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.draws: list[float] = []
        self.drawn = trio.Event()

    def uniform(self, a: float, b: float) -> float:
        x = super().uniform(a, b)
        self.draws.append(x)
        self.drawn.set()
        return x


async def advance_through_backoffs(clock: MockClock, jitter: Jitter) -> None:
    """Move the frozen clock only while the client sleeps its back-off: after each draw,
    to the next deadline, which is the client's wake-up (its attempt's timeout is gone,
    its call's deadline is later). Network waits never see time pass."""
    while True:
        await jitter.drawn.wait()
        jitter.drawn = trio.Event()
        clock.jump(trio.lowlevel.current_statistics().seconds_to_next_deadline)


@contextmanager
def real_time_limit(seconds: float) -> Iterator[None]:
    """A hang guard for a test on a frozen MockClock, where trio.fail_after would never
    fire: cancel the block after ``seconds`` of real time."""
    token = trio.lowlevel.current_trio_token()
    with trio.CancelScope() as scope:
        timer = threading.Timer(seconds, token.run_sync_soon, (scope.cancel,))
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
    if scope.cancelled_caught:
        pytest.fail(f"still running after {seconds:g} s of real time")


def backoff_bounds(failures: int) -> tuple[float, float]:
    """The client's back-off after ``failures`` earlier failures of a call: "equal
    jitter" in [cap/2, cap], the cap doubling from BACKOFF_BASE up to BACKOFF_CAP."""
    cap = min(BACKOFF_CAP, BACKOFF_BASE * 2**failures)
    return cap / 2, cap


async def test_unavailable_is_retried_with_backoff(
    cluster: FakeCluster, certs: Path, mock_clock: MockClock
) -> None:
    """On a frozen clock that moves only to the client's own wake-ups, the time between
    two attempts (as the server sees them) is exactly the back-off the client slept."""
    n1 = cluster["n1"]
    jitter = Jitter(seed=5)
    with real_time_limit(HANG):
        async with opener(cluster, certs, "n1") as c, trio.open_nursery() as nursery:
            c._retrier.rng = jitter  # open_client takes no rng; Client(rng=...) is the seam
            nursery.start_soon(advance_through_backoffs, mock_clock, jitter)
            n1.inject("unavailable", op="put", times=3)
            n1.inject("unavailable", op="get", times=1)
            start = trio.current_time()
            assert await c.put("k", b"v") == 1
            put_done = trio.current_time()
            assert (await c.get("k")) is not None
            nursery.cancel_scope.cancel()
    timed = list(zip(n1.arrivals, n1.requests, strict=True))
    puts = [r for _, r in timed if r["op"] == "put"]
    assert len(puts) == 4 and len({(r["session"], r["seq"]) for r in puts}) == 1
    assert len(cluster.store.applied) == 1
    put_times = [t for t, r in timed if r["op"] == "put"]
    get_times = [t for t, r in timed if r["op"] == "get"]
    put_gaps = [b - a for a, b in itertools.pairwise(put_times)]
    get_gaps = [b - a for a, b in itertools.pairwise(get_times)]
    # Each gap is the back-off after that many failures, and exactly the jitter drawn:
    # 25-50 ms, then 50-100 ms, then 100-200 ms; a new call starts again at 25-50 ms.
    for gaps in (put_gaps, get_gaps):
        for failures, gap in enumerate(gaps):
            low, high = backoff_bounds(failures)
            assert low <= gap <= high, (failures, gap)
    expected = [backoff_bounds(f)[0] + u for f, u in zip([0, 1, 2, 0], jitter.draws, strict=True)]
    assert [*put_gaps, *get_gaps] == pytest.approx(expected, abs=1e-9)
    assert put_times[0] == start and put_done == put_times[-1]  # no time but the back-offs


async def test_timeout_is_retried(cluster: FakeCluster, certs: Path) -> None:
    n1 = cluster["n1"]
    async with opener(cluster, certs, "n1", attempt_timeout=0.3, timeout=5) as c:
        n1.inject("silence", op="put")
        assert await c.put("slow", b"v") == 1
    puts = [r for r in n1.requests if r["op"] == "put"]
    assert len(puts) == 2 and puts[0]["seq"] == puts[1]["seq"]


async def test_deadline_gives_the_last_error(cluster: FakeCluster, certs: Path) -> None:
    n1 = cluster["n1"]
    async with opener(cluster, certs, "n1", timeout=0.5) as c:
        n1.inject("unavailable", times=1000)
        with pytest.raises(Unavailable):
            await c.put("k", b"v")
        n1.faults.clear()
        n1.inject("not_leader", times=1000)  # no leader_endpoint: keeps trying
        with pytest.raises(NotLeader):
            await c.get("k")


async def test_admin_ops_are_not_retried_when_they_may_have_run(
    cluster: FakeCluster, certs: Path
) -> None:
    n1 = cluster["n1"]
    async with opener(cluster, certs, "n1", "n2") as c:
        n1.inject("unavailable", op="member_remove")
        with pytest.raises(Unavailable):
            await c.member_remove("n2")
        n1.inject("drop", op="transfer_leader")
        with pytest.raises(ConnectionFailed):
            await c.transfer_leader("n2")
    assert sum(r["op"] == "member_remove" for n in cluster.nodes.values() for r in n.requests) == 1


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("invalid_request", InvalidRequest),
        ("too_large", TooLarge),
        ("unauthenticated", Unauthenticated),
        ("permission_denied", PermissionDenied),
        ("compacted", Compacted),
        ("member_error", MemberError),
        ("internal", InternalError),
    ],
)
async def test_error_codes_are_typed(
    cluster: FakeCluster, certs: Path, code: str, cls: type[LiferaftError]
) -> None:
    async with opener(cluster, certs) as c:
        cluster["n1"].inject("error", code=code, compact_revision=7)
        with pytest.raises(cls) as info:
            await c.put("k", b"v")
    assert info.value.code == code and "injected" in info.value.message
    if cls is Compacted:
        assert info.value.compact_revision == 7  # type: ignore[attr-defined]
    assert len([r for r in cluster["n1"].requests if r["op"] == "put"]) == 1  # not retried


def test_error_from_wire() -> None:
    err = error_from_wire({"code": "not_leader", "message": "m", "leader_endpoint": "wss://x:1"})
    assert isinstance(err, NotLeader) and err.leader_endpoint == "wss://x:1"
    assert isinstance(error_from_wire({"code": "unavailable"}), Unavailable)
    odd = error_from_wire({"code": "brand_new", "message": "?"})
    assert type(odd) is LiferaftError and odd.code == "brand_new"
    assert isinstance(error_from_wire("garbage"), InternalError)


async def test_bad_token_is_unauthenticated(cluster: FakeCluster, certs: Path) -> None:
    with pytest.raises(Unauthenticated, match="401"):
        await Client.connect(cluster.urls, token="wrong", cacert=certs / "ca.pem")
    assert cluster["n1"].rejected == 1 and cluster["n2"].rejected == 0  # not retried


async def test_wrong_ca_is_a_tls_error(
    cluster: FakeCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = tmp_path_factory.mktemp("other-ca")
    make_certs(other, ("n1",))
    with pytest.raises(TLSError):
        await Client.connect(cluster.urls, token=TOKEN, cacert=other / "ca.pem")


async def test_nothing_listening_is_connection_failed(certs: Path) -> None:
    async with refusing_port() as port:
        with pytest.raises(ConnectionFailed, match="refused"):
            await Client.connect([f"wss://127.0.0.1:{port}"], token=TOKEN, timeout=0.5)


async def test_connect_and_aclose(cluster: FakeCluster, certs: Path) -> None:
    c = await Client.connect(cluster.urls, token=TOKEN, cacert=str(certs / "ca.pem"))
    async with c:
        assert await c.put("k", b"v") == 1
    with pytest.raises(trio.ClosedResourceError):
        await c.get("k")
    await c.aclose()  # twice is fine


# ---------------------------------------------------------------- SyncClient


async def test_sync_client(cluster: FakeCluster, certs: Path) -> None:
    def script() -> None:
        with SyncClient(cluster.urls, token=TOKEN, cacert=certs / "ca.pem") as c:
            assert c.put("s/1", "one") == 1
            kv = c.get("s/1")
            assert kv is not None and kv.value == b"one"
            assert [k.key for k in c.range("s/")[0]] == ["s/1"]
            assert c.txn([compare("s/1", "version", "==", 1)], [op_put("s/2", b"2")]).succeeded
            assert c.delete(prefix="s/") == 2
            assert c.status()["node_id"] == "n1"
            assert len(c.member_list()) == 2
            with c.watch("s/w") as events:
                c.put("s/w", b"w")
                ev = next(events)
            assert (ev.type, ev.kv.key, ev.kv.value) == ("put", "s/w", b"w")
            with pytest.raises(InvalidRequest):
                c.put("", b"")
        with pytest.raises(Unauthenticated):
            SyncClient(cluster.urls, token="wrong", cacert=certs / "ca.pem")

    await trio.to_thread.run_sync(script)


async def test_an_endpoint_that_accepts_but_never_answers_is_skipped(
    cluster: FakeCluster, certs: Path, nursery: trio.Nursery
) -> None:
    """A paused node's kernel still accepts TCP, but TLS never completes: after one
    attempt's time the client must move on to the next endpoint, not wait there again."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)  # accept, then say nothing
        await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, hold, listeners)
    stuck = f"wss://127.0.0.1:{port}"
    async with open_client(
        [cluster["n1"].url, stuck],
        token=TOKEN,
        cacert=certs / "ca.pem",
        timeout=10,
        attempt_timeout=0.5,
    ) as c:
        await c.put("k", b"1")
        cluster["n1"].inject("unavailable", op="put", times=1)  # rotate to the stuck one
        await c.put("k", b"2")
        assert c.endpoint == parse_endpoint(cluster["n1"].url).url
    assert held  # the stuck endpoint really was tried
