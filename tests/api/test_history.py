"""The store's history over the wire: reads at past revisions, paging with ``after``,
``compact``, and watches from a revision, across a restart and under concurrent writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.lowlevel
from test_protocol import HANG, cluster, connect, leader_index

from liferaft.client import Compacted, open_client
from liferaft.testing.localcluster import LocalCluster, wait_until


async def test_reads_at_a_past_revision_see_the_store_as_it_was(
    tmp_path: Path, certs: Path
) -> None:
    async with cluster(tmp_path, certs) as c, connect(c, c.token(), await leader_index(c)) as r:
        r1 = (await r.call(op="put", key="h/a", value=b"1"))["revision"]
        await r.call(op="put", key="h/b", value=b"x")
        r3 = (await r.call(op="put", key="h/a", value=b"2"))["revision"]
        await r.call(op="delete", key="h/b")
        old = await r.call(op="get", key="h/a", revision=r1)
        assert old["kv"]["value"] == b"1" and old["kv"]["version"] == 1
        assert old["revision"] == r3 + 1  # the store's current revision, as in etcd
        then = await r.call(op="range", prefix="h/", revision=r3)
        assert [(kv["key"], kv["value"]) for kv in then["kvs"]] == [("h/a", b"2"), ("h/b", b"x")]
        now = await r.call(op="range", prefix="h/")
        assert [kv["key"] for kv in now["kvs"]] == ["h/a"]
        future = await r.call(op="get", key="h/a", revision=r3 + 100)
        assert future["error"]["code"] == "invalid_request"


async def test_range_pages_with_after_visit_every_key_once(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c, connect(c, c.token(), await leader_index(c)) as r:
        keys = [f"p/{i:02d}" for i in range(23)]
        for k in keys:
            await r.call(op="put", key=k, value=k.encode())
        await r.call(op="put", key="q/outside", value=b"")
        seen: list[str] = []
        after = None
        while True:
            req = {"op": "range", "prefix": "p/", "limit": 5}
            if after is not None:
                req["after"] = after
            page = await r.call(**req)
            seen += [kv["key"] for kv in page["kvs"]]
            if not page["more"]:
                break
            after = page["kvs"][-1]["key"]
        assert seen == keys


async def test_compact_makes_older_revisions_unreadable(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c, connect(c, c.token(), await leader_index(c)) as r:
        revs = [(await r.call(op="put", key="c", value=b"%d" % i))["revision"] for i in range(5)]
        done = await r.call(op="compact", revision=revs[3])
        assert done["ok"], done
        gone = await r.call(op="get", key="c", revision=revs[1])
        assert gone["error"]["code"] == "compacted"
        assert gone["error"]["compact_revision"] == revs[3]
        kept = await r.call(op="get", key="c", revision=revs[3])
        assert kept["kv"]["value"] == b"3"
        watch = await r.call(op="watch", key="c", start_revision=revs[3])
        assert watch["error"]["code"] == "compacted"
        again = await r.call(op="compact", revision=revs[0])
        assert again["error"]["code"] == "compacted"
    async with cluster(tmp_path / "2", certs) as c, connect(c, c.token("read,write")) as r:
        denied = await r.call(op="compact", revision=1)
        assert denied["error"]["code"] == "permission_denied"


async def test_a_watch_from_an_old_revision_replays_history_after_a_restart(
    tmp_path: Path, certs: Path
) -> None:
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"], snapshot_entries=30)
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            lead = await c.wait_leader()
            async with connect(c, c.token(), c.ids.index(lead)) as r:
                for i in range(60):
                    await r.call(op="put", key=f"w/{i % 7}", value=b"%d" % i)
            victim = next(i for i in c.ids if i != lead)
            c.crash(victim)
            node = await c.start_node(victim)
            await wait_until(lambda: node.applied >= c.nodes[lead].applied)
            async with connect(c, c.token(), c.ids.index(victim)) as r:
                w = await r.call(op="watch", prefix="w/", start_revision=1)
                assert w["ok"]
                while sum(len(m["events"]) for m in r.events) < 60:
                    await r._pump()
                events = [e for m in r.events for e in m["events"]]
                assert [e["kv"]["value"] for e in events] == [b"%d" % i for i in range(60)]
                assert [e["revision"] for e in events] == list(range(1, 61))
        nursery.cancel_scope.cancel()


async def test_a_watch_started_during_writes_misses_no_event_and_repeats_none(
    tmp_path: Path, certs: Path
) -> None:
    async with cluster(tmp_path, certs) as c:
        lead = await leader_index(c)
        per_writer, writers = 40, 4
        async with connect(c, c.token(), lead) as watcher:

            async def write(n: int) -> None:
                async with connect(c, c.token(), lead) as w:
                    for i in range(per_writer):
                        await w.call(op="put", key=f"g/{n}/{i}", value=b"")

            async with trio.open_nursery() as nursery:
                for n in range(writers):
                    nursery.start_soon(write, n)
                await trio.lowlevel.checkpoint()  # the writers are under way
                first = await watcher.call(op="put", key="g/start", value=b"")
                start = first["revision"] + 1
                w = await watcher.call(op="watch", prefix="g/", start_revision=start)
                assert w["ok"]
            last = (await watcher.call(op="get", key="g/start"))["revision"]
            want = list(range(start, last + 1))
            while True:
                got = [e["revision"] for m in watcher.events for e in m["events"]]
                if len(got) >= len(want):
                    break
                await watcher._pump()
            assert got == want


async def test_the_client_library_reads_history_pages_and_compacts(
    tmp_path: Path, certs: Path
) -> None:
    async with (
        cluster(tmp_path, certs) as c,
        open_client(c.endpoints(), token=c.token(), cacert=certs / "ca.pem") as client,
    ):
        if True:
            first = await client.put("lib/a", "1")
            await client.put("lib/a", "2")
            await client.put("lib/b", "x")
            old = await client.get("lib/a", revision=first)
            assert old is not None and old.value == b"1"
            page, more = await client.range("lib/", limit=1)
            assert [kv.key for kv in page] == ["lib/a"] and more
            rest, more = await client.range("lib/", after="lib/a")
            assert [kv.key for kv in rest] == ["lib/b"] and not more
            then, _ = await client.range("lib/", revision=first)
            assert [(kv.key, kv.value) for kv in then] == [("lib/a", b"1")]
            await client.compact(first + 1)
            with pytest.raises(Compacted) as caught:
                await client.get("lib/a", revision=first)
            assert caught.value.compact_revision == first + 1
