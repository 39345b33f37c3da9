"""The client wire protocol (docs/client-protocol.md) against a real 3-node cluster, spoken
raw so the tests see exactly what goes over the wire."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
import trio_websocket

import liferaft
from liferaft.api.connection import Connection
from liferaft.api.watch import RESET, WatchHub
from liferaft.core import AnyMessage
from liferaft.core.messages import AppendEntries
from liferaft.kv.queries import event_map
from liferaft.node.node import Node
from liferaft.testing.localcluster import LocalCluster, wait_until

HANG = 60  # a guard against hangs, not a performance claim


@asynccontextmanager
async def cluster(
    tmp: Path, certs: Path, n: int = 3, *, kv_history: int = 10_000
) -> AsyncIterator[LocalCluster]:
    c = LocalCluster(tmp, certs, [f"n{i}" for i in range(1, n + 1)], kv_history=kv_history)
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            await c.wait_leader()
            yield c
        nursery.cancel_scope.cancel()


class Raw:
    """A bare protocol client: send maps or arrays, read responses by id."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.next_id = 1
        self.pending: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.arrived: list[int] = []  # response ids in the order they came
        self.messages = 0

    async def send(self, *reqs: dict[str, Any], array: bool = False) -> list[int]:
        ids = []
        for r in reqs:
            r.setdefault("id", self.next_id)
            self.next_id = max(self.next_id, r["id"]) + 1
            ids.append(r["id"])
        payload: Any = list(reqs) if array or len(reqs) > 1 else reqs[0]
        await self.ws.send_message(cbor2.dumps(payload))
        return ids

    async def _pump(self) -> None:
        data = await self.ws.get_message()
        self.messages += 1
        obj = cbor2.loads(data)
        for item in obj if isinstance(obj, list) else [obj]:
            if "watch_id" in item and "events" in item:
                self.events.append(item)
            else:
                self.pending[item["id"]] = item
                self.arrived.append(item["id"])

    async def response(self, rid: int) -> dict[str, Any]:
        while rid not in self.pending:
            await self._pump()
        return self.pending.pop(rid)

    async def call(self, **req: Any) -> dict[str, Any]:
        (rid,) = await self.send(req)
        return await self.response(rid)


def ctx(certs: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs / "ca.pem"))


@asynccontextmanager
async def connect(c: LocalCluster, token: str, node: int = 0) -> AsyncIterator[Raw]:
    url = c.endpoints()[node]
    headers = [(b"authorization", f"Bearer {token}".encode())]
    async with trio_websocket.open_websocket_url(
        url, ssl_context=ctx(c.certs), extra_headers=headers
    ) as ws:
        yield Raw(ws)


async def leader_index(c: LocalCluster) -> int:
    return c.ids.index(await c.wait_leader())


@contextmanager
def appends_blocked(c: LocalCluster, src: str, dst: str) -> Iterator[None]:
    """Drop the log appends ``src`` sends ``dst``, one way, and nothing else: ``dst`` keeps
    getting heartbeats (so it follows ``src`` and does not campaign) and read-index
    answers, but no new entries. Wraps ``src``'s fault-layer filter: the fault layer's
    ``blocked`` pairs would cut every message, read-index answers included."""
    node = c.nodes[src]
    inner = node._send_filter

    def drop_appends(msgs: list[AnyMessage]) -> list[AnyMessage]:
        out = inner(msgs) if inner is not None else msgs
        return [m for m in out if not (isinstance(m, AppendEntries) and m.dst == dst)]

    node._send_filter = drop_appends
    try:
        yield
    finally:
        node._send_filter = inner


def waiting_to_apply(node: Node) -> bool:
    """A linearizable read on ``node`` got its read index and waits for the state machine
    to reach it."""
    return any(index > node.applied for index, _ in node.waiters.applied)


async def test_put_get_range_delete_and_revisions(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c, connect(c, c.token(), await leader_index(c)) as r:
        p1 = await r.call(op="put", key="a/1", value=b"one")
        assert p1["ok"] and p1["revision"] >= 1
        p2 = await r.call(op="put", key="a/1", value=b"uno")
        assert p2["revision"] == p1["revision"] + 1
        await r.call(op="put", key="a/2", value=b"two")
        got = await r.call(op="get", key="a/1")
        kv = got["kv"]
        assert kv["value"] == b"uno" and kv["version"] == 2
        assert kv["create_revision"] == p1["revision"] and kv["mod_revision"] == p2["revision"]
        missing = await r.call(op="get", key="nope")
        assert missing["ok"] and missing["kv"] is None
        rng = await r.call(op="range", prefix="a/", limit=1)
        assert [x["key"] for x in rng["kvs"]] == ["a/1"] and rng["more"] is True
        dl = await r.call(op="delete", prefix="a/")
        assert dl["deleted"] == 2
        assert (await r.call(op="get", key="a/2"))["kv"] is None


async def test_write_answers_leave_from_the_applier_not_the_connections_sender(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answers of an applied run are sent by the applier itself, at the end of the
    run (``ClientServer.send_answers``): with every connection's sender task stopped,
    writes are still answered, each by its id."""

    async def no_sender(self: Connection) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(Connection, "_sender", no_sender)
    async with cluster(tmp_path, certs) as c, connect(c, c.token(), await leader_index(c)) as r:
        first = await r.call(op="put", key="k", value=b"1")
        assert first["ok"]
        ids = [(await r.send({"op": "put", "key": f"k{i}", "value": b"v"}))[0] for i in range(5)]
        answers = [await r.response(rid) for rid in ids]
        assert [a["id"] for a in answers] == ids
        revisions = [a["revision"] for a in answers]
        assert all(a["ok"] for a in answers) and len(set(revisions)) == 5
        assert min(revisions) > first["revision"]


async def test_txn_compares_and_applies_atomically(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c, connect(c, c.token(), await leader_index(c)) as r:
        create = {
            "op": "txn",
            "compare": [{"key": "lock", "target": "version", "result": "==", "value": 0}],
            "success": [
                {"op": "put", "key": "lock", "value": b"me"},
                {"op": "get", "key": "lock"},
            ],
            "failure": [{"op": "get", "key": "lock"}],
        }
        first = await r.call(**create)
        assert first["ok"] and first["succeeded"] is True
        assert first["results"][1]["kv"]["value"] == b"me"
        second = await r.call(**create)
        assert second["succeeded"] is False and second["results"][0]["kv"]["value"] == b"me"


async def test_pipelined_requests_complete_out_of_order_and_batch(
    tmp_path: Path, certs: Path
) -> None:
    async with cluster(tmp_path, certs) as c:
        lead = await leader_index(c)
        follower = (lead + 1) % 3
        lid, fid = c.ids[lead], c.ids[follower]
        async with connect(c, c.token(), lead) as w, connect(c, c.token(), follower) as r:
            await w.call(op="put", key="k", value=b"v")
            await wait_until(lambda: c.nodes[fid].applied >= c.nodes[lid].applied)
            with appends_blocked(c, lid, fid):
                await w.call(op="put", key="k", value=b"w")  # committed without the follower
                # One message: a linearizable read first, then two requests that need
                # nothing from the cluster. The read cannot be answered while the follower
                # lacks the put (it waits to apply it), so the later ones overtake it.
                slow, *fast = await r.send(
                    {"op": "get", "key": "k"},
                    {"op": "get", "key": "k", "serializable": True},
                    {"op": "status"},
                )
                await wait_until(lambda: waiting_to_apply(c.nodes[fid]))
                stale, status = [await r.response(i) for i in fast]
                assert stale["kv"]["value"] == b"v" and status["ok"]
                assert sorted(r.arrived) == fast  # both answered (in either order), not the read
            got = await r.response(slow)  # the follower gets the put and answers the read
            assert got["ok"] and got["kv"]["value"] == b"w"
            assert r.arrived[-1] == slow and slow < min(fast)  # sent first, answered last
            many = await r.send(
                *({"op": "get", "key": "k", "serializable": True} for _ in range(50))
            )
            before = r.messages
            for i in many:
                await r.response(i)
            assert r.messages - before < 50  # responses ready together share a message


async def test_errors_are_answered_by_id_and_the_connection_survives(
    tmp_path: Path, certs: Path
) -> None:
    async with cluster(tmp_path, certs) as c, connect(c, c.token("read")) as r:
        unknown = await r.call(op="frobnicate")
        assert unknown["error"]["code"] == "invalid_request"
        wrong_type = await r.call(op="get", key=42)
        assert wrong_type["error"]["code"] == "invalid_request"
        denied = await r.call(op="put", key="k", value=b"v")
        assert denied["error"]["code"] == "permission_denied"
        assert (await r.call(op="status"))["ok"]


async def test_too_large_and_member_error(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c, connect(c, c.token(), await leader_index(c)) as r:
        big = await r.call(op="put", key="k" * 5000, value=b"v")
        assert big["error"]["code"] == "too_large"
        not_a_learner = await r.call(op="member_promote", member_id="n2")
        assert not_a_learner["error"]["code"] == "member_error"


async def test_prefix_limited_tokens_touch_only_their_keys(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c:
        token = c.token("read,write", prefixes=["app/"])
        async with connect(c, token, await leader_index(c)) as r:
            assert (await r.call(op="put", key="app/x", value=b"1"))["ok"]
            other = await r.call(op="put", key="other", value=b"1")
            assert other["error"]["code"] == "permission_denied"
            wide = await r.call(op="range", prefix="")
            assert wide["error"]["code"] == "permission_denied"


async def test_a_follower_redirects_writes_and_serves_linearizable_reads(
    tmp_path: Path, certs: Path
) -> None:
    async with cluster(tmp_path, certs) as c:
        lead = await leader_index(c)
        follower = (lead + 1) % 3
        lid, fid = c.ids[lead], c.ids[follower]
        async with connect(c, c.token(), lead) as w, connect(c, c.token(), follower) as r:
            await w.call(op="put", key="seen", value=b"old")
            redirected = await r.call(op="put", key="k", value=b"v")
            assert redirected["error"]["code"] == "not_leader"
            assert redirected["error"]["leader_endpoint"] == c.endpoints()[lead]
            await wait_until(lambda: c.nodes[fid].applied >= c.nodes[lid].applied)
            with appends_blocked(c, lid, fid):
                new = await w.call(op="put", key="seen", value=b"new")
                written = c.nodes[lid].applied  # the put's entry is applied on the leader
                # The follower really is behind: its own state still has the old value.
                stale = await r.call(op="get", key="seen", serializable=True)
                assert stale["kv"]["value"] == b"old"
                (rid,) = await r.send({"op": "get", "key": "seen"})
                # The read got a read index from the leader and waits to apply it...
                await wait_until(lambda: waiting_to_apply(c.nodes[fid]))
                assert c.nodes[fid].applied < written
                still = await r.call(op="get", key="seen", serializable=True)
                assert still["kv"]["value"] == b"old" and rid not in r.arrived
            # ...and answers with the new value once the follower has the entry: it waits,
            # neither stale nor refused (docs/client-protocol.md, "Reads").
            got = await r.response(rid)
            assert got["ok"] and got["kv"]["value"] == b"new"
            assert got["kv"]["mod_revision"] == new["revision"]
            assert c.nodes[fid].applied >= written


async def test_watch_streams_changes_from_a_revision(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c, connect(c, c.token(), await leader_index(c)) as r:
        first = await r.call(op="put", key="w/a", value=b"1")
        await r.call(op="put", key="w/b", value=b"2")
        watch = await r.call(op="watch", prefix="w/", start_revision=first["revision"])
        wid = watch["watch_id"]
        await r.call(op="delete", key="w/a")
        await r.call(op="put", key="other", value=b"x")

        def seen() -> list[tuple[str, str]]:
            return [
                (e["type"], e["kv"]["key"])
                for m in r.events
                if m["watch_id"] == wid
                for e in m["events"]
            ]

        while len(seen()) < 3:
            await r._pump()
        assert seen() == [("put", "w/a"), ("put", "w/b"), ("delete", "w/a")]
        assert (await r.call(op="unwatch", watch_id=wid))["ok"]


async def test_a_watch_from_before_the_kept_history_is_compacted(
    tmp_path: Path, certs: Path
) -> None:
    async with (
        cluster(tmp_path, certs, kv_history=5) as c,
        connect(c, c.token(), await leader_index(c)) as r,
    ):
        for i in range(12):
            await r.call(op="put", key="h", value=b"%d" % i)
        old = await r.call(op="watch", key="h", start_revision=1)
        assert old["error"]["code"] == "compacted"
        recent = await r.call(op="watch", key="h", start_revision=10)
        assert recent["ok"]


async def test_without_a_quorum_requests_are_unavailable(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c:
        lead = await c.wait_leader()
        for i in c.ids:
            if i != lead:
                c.crash(i)
        async with connect(c, c.token(), c.ids.index(lead)) as r:
            w = await r.call(op="put", key="k", value=b"v")
            assert w["error"]["code"] == "unavailable"
            rd = await r.call(op="get", key="k")
            assert rd["error"]["code"] == "unavailable"
            assert (await r.call(op="get", key="k", serializable=True))["ok"]


async def test_a_node_restarted_after_compaction_has_the_same_data(
    tmp_path: Path, certs: Path
) -> None:
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"], snapshot_entries=20)
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            lead = await c.wait_leader()
            async with connect(c, c.token(), c.ids.index(lead)) as r:
                for i in range(70):
                    await r.call(op="put", key=f"k{i:02d}", value=b"%d" % i)
            victim = next(i for i in c.ids if i != lead)
            await wait_until(lambda: c.nodes[victim].applied >= c.nodes[lead].applied)
            before = c.nodes[victim].kv.db.range("")[0]
            c.crash(victim)
            node = await c.start_node(victim)
            assert node.storage is not None
            await wait_until(lambda: node.applied >= c.nodes[lead].applied)
            assert node.kv.db.range("")[0] == before
            assert node.snapshot_index > 0  # it restarted from a snapshot
        nursery.cancel_scope.cancel()


async def test_status_reports_the_cluster(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c, connect(c, c.token("read")) as r:
        st = await r.call(op="status")
        assert st["node_id"] == "n1" and st["leader_id"] in c.ids
        assert st["version"] == liferaft.__version__ and st["alarms"] == []
        assert {m["id"] for m in st["members"]} == set(c.ids)
        assert all(m["voter"] for m in st["members"])
        assert st["last_error"] is None


async def test_status_shows_the_nodes_last_error(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c, connect(c, c.token("read")) as r:
        # A request that fails inside the node logs an error event as that node.
        node = c.nodes["n1"]
        assert node.reload_tls() is True  # (a good reload is no error)
        broken = tmp_path / "broken.pem"
        broken.write_text("not a certificate")
        node.settings = replace(node.settings, tls=replace(node.settings.tls, cert=broken))
        assert node.reload_tls() is False
        st = await r.call(op="status")
        err = st["last_error"]
        assert err["event"] == "tls_reload_refused" and err["at"] > 0
        other = c.nodes["n2"].last_error.last
        assert other is None  # recorded for the node that logged it only


async def test_bad_frames_close_only_that_connection(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c:
        codes = []
        for payload in ("text frame", b"\xff\xfe not cbor", cbor2.dumps(42), b"x" * (2 << 20)):
            async with connect(c, c.token()) as r:
                with pytest.raises(trio_websocket.ConnectionClosed) as info:
                    await r.ws.send_message(payload)  # a big one is cut off mid-send
                    await r.ws.get_message()
                assert info.value.reason is not None
                codes.append(info.value.reason.code)
        assert codes == [1003, 1007, 1007, 1009]
        async with connect(c, c.token()) as r:
            assert (await r.call(op="status"))["ok"]
        assert all(n.healthy() for n in c.nodes.values())
        await wait_until(lambda: c.leader() is not None)


async def test_a_watch_on_a_follower_that_installs_a_snapshot_misses_no_event(
    tmp_path: Path, certs: Path
) -> None:
    """A follower that installs a snapshot never applied (nor published) the entries in
    between; a watch open on it must neither end nor skip them: it reads the revisions
    it did not see from the installed database, then goes on live."""
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"], snapshot_entries=20)
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            lead = await leader_index(c)
            follower = (lead + 1) % 3
            lid, fid = c.ids[lead], c.ids[follower]
            leader, node = c.nodes[lid], c.nodes[fid]
            sender, leader_log = leader.sender, leader.raft
            assert sender is not None and leader_log is not None and node.raft is not None
            async with connect(c, c.token(), lead) as w:
                await w.call(op="put", key="w/0", value=b"0")
                await wait_until(lambda: node.applied >= leader.applied)
                async with connect(c, c.token(), follower) as r:
                    watch = await r.call(op="watch", prefix="w/")
                    wid, seen = watch["watch_id"], watch["revision"]
                    behind = node.raft.log.last_index
                    sent = sender.sent
                    with appends_blocked(c, lid, fid):
                        for i in range(1, 50):
                            await w.call(op="put", key=f"w/{i}", value=b"%d" % i)
                        # The leader compacted its log past everything the follower has:
                        # only a snapshot can bring the follower up to date now.
                        await wait_until(lambda: leader_log.log.snapshot_index > behind)
                        assert node.applied <= behind
                        assert (await r.call(op="status"))["ok"]  # the watcher is connected

                    def keys() -> list[str]:
                        return [e["kv"]["key"] for m in r.events for e in m["events"]]

                    while len(keys()) < 49:
                        await r._pump()
                    assert node.snapshot_meta is not None
                    assert node.snapshot_meta.index > behind  # it did install a snapshot
                    await wait_until(lambda: sender.sent > sent)  # a state file came
                    assert keys() == [f"w/{i}" for i in range(1, 50)]
                    assert all(m["watch_id"] == wid and not m.get("canceled") for m in r.events)
                    revs = [e["revision"] for m in r.events for e in m["events"]]
                    assert revs == list(range(seen + 1, seen + 50))
                    # ... and it goes on live after that.
                    await w.call(op="put", key="w/after", value=b"")
                    while len(keys()) < 50:
                        await r._pump()
                    assert keys()[-1] == "w/after"
        nursery.cancel_scope.cancel()


def test_the_watch_hub_reset_reaches_every_subscription_after_what_is_queued() -> None:
    """The hub's half of the above: reset() sends RESET to every subscription, after what
    was published before it."""
    hub = WatchHub()
    with hub.subscription() as events:
        hub.publish([("k", 1, 1, 1, b"v")])
        hub.reset()
        assert events.receive_nowait() == [event_map("k", 1, 1, 1, b"v")]
        assert events.receive_nowait() is RESET


async def test_a_client_that_does_not_read_large_answers_is_let_go_by_bytes(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Pipelined gets of a large value from a client that never reads would pile up in
    the node's memory: far fewer than MAX_QUEUED answers, but each one large. The
    connection is bounded by the bytes of values it holds too: past MAX_QUEUED_BYTES the
    node closes it with 1013 (try again later), and serves other clients meanwhile.
    (The client may see 1006 instead: its last requests were still unread when the node
    hung up, and TCP resets such a connection.)"""
    import logging

    from liferaft.api import connection

    monkeypatch.setattr(connection, "MAX_QUEUED_BYTES", 1024 * 1024)
    caplog.set_level(logging.INFO, logger="liferaft.api")
    value = b"v" * (100 * 1024)
    async with cluster(tmp_path, certs) as c:
        lead = await leader_index(c)
        token = c.token()
        async with connect(c, token, lead) as raw:
            assert (await raw.call(op="put", key="big", value=value))["ok"]
        url = c.endpoints()[lead]
        headers = [(b"authorization", f"Bearer {token}".encode())]
        async with trio_websocket.open_websocket_url(
            url, ssl_context=ctx(c.certs), extra_headers=headers, max_message_size=1 << 28
        ) as ws:
            # 400 x 100 KiB = 40 MiB of answers, more than the socket buffers take
            answered = 0
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                for i in range(400):
                    await ws.send_message(cbor2.dumps({"id": i + 1, "op": "get", "key": "big"}))
                while True:
                    obj = cbor2.loads(await ws.get_message())
                    answered += len(obj) if isinstance(obj, list) else 1
        assert closed.value.reason.code in (1013, 1006)
        assert answered < 400
        closes = [
            getattr(r, "liferaft_fields", {})
            for r in caplog.records
            if r.getMessage() == "client_closed"
        ]
        assert [f.get("code") for f in closes] == [1013], closes
        async with connect(c, token, lead) as other:  # the node is fine
            assert (await other.call(op="get", key="big"))["kv"]["value"] == value


async def test_a_watch_catching_up_over_large_values_is_paced_not_cut_off(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watch from revision 1 over far more history than MAX_QUEUED_BYTES reads it a
    page at a time and waits for the client to take each: every event arrives, and the
    connection is not closed for holding too much."""
    from liferaft.api import connection

    monkeypatch.setattr(connection, "MAX_QUEUED_BYTES", 1024 * 1024)
    monkeypatch.setattr(connection, "CATCH_UP_WATERMARK", 256 * 1024)
    monkeypatch.setattr(connection, "CATCH_UP_PAGE_BYTES", 128 * 1024)
    value = b"v" * (100 * 1024)
    async with cluster(tmp_path, certs) as c:
        lead = await leader_index(c)
        async with connect(c, c.token(), lead) as raw:
            for i in range(40):  # 4 MiB of history
                assert (await raw.call(op="put", key=f"w/{i:02d}", value=value))["ok"]
            answer = await raw.call(op="watch", prefix="w/", start_revision=1)
            assert answer["ok"]
            while sum(len(e["events"]) for e in raw.events) < 40:
                await raw._pump()
            keys = [ev["kv"]["key"] for e in raw.events for ev in e["events"]]
            assert keys == [f"w/{i:02d}" for i in range(40)]
            assert len(raw.events) >= 4  # paced: several messages, not one


async def test_two_watches_catching_up_at_once_on_one_connection_both_finish(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both catch-ups wait for the client to take what is queued: every message sent
    must wake both, not only the one that waited last."""
    from liferaft.api import connection

    monkeypatch.setattr(connection, "MAX_QUEUED_BYTES", 1024 * 1024)
    monkeypatch.setattr(connection, "CATCH_UP_WATERMARK", 256 * 1024)
    monkeypatch.setattr(connection, "CATCH_UP_PAGE_BYTES", 128 * 1024)
    value = b"v" * (100 * 1024)
    async with cluster(tmp_path, certs) as c:
        lead = await leader_index(c)
        async with connect(c, c.token(), lead) as raw:
            for i in range(40):  # 4 MiB of history
                assert (await raw.call(op="put", key=f"w/{i:02d}", value=value))["ok"]
            await raw.send(
                {"op": "watch", "prefix": "w/", "start_revision": 1},
                {"op": "watch", "prefix": "w/", "start_revision": 1},
                array=True,
            )
            with trio.fail_after(20):
                while True:
                    per_watch: dict[int, int] = {}
                    for e in raw.events:
                        per_watch[e["watch_id"]] = per_watch.get(e["watch_id"], 0) + len(
                            e["events"]
                        )
                    if len(per_watch) == 2 and all(n == 40 for n in per_watch.values()):
                        break
                    await raw._pump()
