"""One client message holding many requests (docs/client-protocol.md, "Messages"): the
writes of a message become one log entry, yet every request is checked, answered and
audited on its own, by its id, against a real 3-node cluster spoken raw."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_protocol import Raw, cluster, connect, leader_index

from liferaft.observability.logs import JsonFormatter
from liferaft.testing.localcluster import wait_until


async def answers_once(r: Raw, ids: list[int]) -> dict[int, dict[str, Any]]:
    """The response to each of ``ids``; then, once a later write is answered (so every
    response to the earlier message has been sent before it), that none came twice."""
    got = {i: await r.response(i) for i in ids}
    after = await r.call(op="put", key="app/zz-fence", value=b"")
    assert after["ok"], after
    counts = Counter(r.arrived)
    assert all(counts[i] == 1 for i in ids), counts
    return got


def audit_lines(caplog: pytest.LogCaptureFixture, subject: str) -> list[dict[str, Any]]:
    formatter = JsonFormatter()
    lines = [
        json.loads(formatter.format(rec)) for rec in caplog.records if rec.name == "liferaft.audit"
    ]
    return [x for x in lines if x.get("subject") == subject]


async def test_one_message_of_mixed_requests_is_answered_request_by_request(
    tmp_path: Path, certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="liferaft.audit")
    async with cluster(tmp_path, certs) as c:
        lead = await leader_index(c)
        # A write-only token (no admin: no compact) limited to app/.
        token = c.token("write", sub="batcher", prefixes=["app/"])
        async with connect(c, token, lead) as r:
            seed = await r.call(op="put", key="app/gone", value=b"old")
            base = seed["revision"]
            reqs: list[dict[str, Any]] = [
                {"id": 101, "op": "put", "key": "app/a", "value": b"1"},
                {"id": 102, "op": "put", "key": "app/b", "value": b"2", "colour": "red"},
                {"id": 103, "op": "put", "key": "other/x", "value": b"3"},  # outside app/
                {"id": 104, "op": "put", "key": "app/b", "value": b"4"},
                {
                    "id": 105,
                    "op": "txn",  # holds only if it sees the put of app/a before it
                    "compare": [{"key": "app/a", "target": "value", "result": "==", "value": b"1"}],
                    "success": [
                        {"op": "put", "key": "app/t", "value": b"t"},
                        {"op": "get", "key": "app/b"},
                    ],
                    "failure": [{"op": "put", "key": "app/failed", "value": b""}],
                },
                {"id": 106, "op": "delete", "key": "app/gone"},
                {"id": 107, "op": "compact", "revision": 1},  # needs admin
                {"id": 108, "op": "get", "key": "app/b"},
                {"id": 109, "op": "put", "key": "app/c", "value": b"9"},
                {"id": 110, "op": "put", "key": "", "value": b""},  # empty key
            ]
            ids = await r.send(*reqs, array=True)
            got = await answers_once(r, ids)
            codes = {i: "ok" if a["ok"] else a["error"]["code"] for i, a in got.items()}
            assert codes == {
                101: "ok",
                102: "invalid_request",
                103: "permission_denied",
                104: "ok",
                105: "ok",
                106: "ok",
                107: "permission_denied",
                108: "ok",
                109: "ok",
                110: "invalid_request",
            }
            assert "colour" in got[102]["error"]["message"]
            # The good writes apply in message order, one revision each.
            assert [got[i]["revision"] for i in (101, 104, 105, 106, 109)] == [
                base + 1,
                base + 2,
                base + 3,
                base + 4,
                base + 5,
            ]
            assert got[105]["succeeded"] is True
            assert got[105]["results"][1]["kv"]["value"] == b"4"  # the put before it
            assert got[106]["deleted"] == 1
            # The read runs on its own, before or after the writes: one or the other.
            assert got[108]["kv"] is None or got[108]["kv"]["value"] == b"4"
            # Read back.
            a = (await r.call(op="get", key="app/a"))["kv"]
            assert (a["value"], a["mod_revision"]) == (b"1", base + 1)
            b = (await r.call(op="get", key="app/b"))["kv"]
            assert (b["value"], b["mod_revision"], b["version"]) == (b"4", base + 2, 1)
            t = (await r.call(op="get", key="app/t"))["kv"]
            assert (t["value"], t["mod_revision"]) == (b"t", base + 3)
            assert (await r.call(op="get", key="app/gone"))["kv"] is None
            cc = (await r.call(op="get", key="app/c"))["kv"]
            assert (cc["value"], cc["mod_revision"]) == (b"9", base + 5)
            assert (await r.call(op="get", key="app/failed"))["kv"] is None
        async with connect(c, c.token(), lead) as admin:
            assert (await admin.call(op="get", key="other/x"))["kv"] is None
            assert (await admin.call(op="status"))["revision"] == base + 6  # + the fence
    lines = audit_lines(caplog, "batcher")
    records = [(x["op"], x["result"], x["keys"]) for x in lines]
    # The accepted puts of the message: ONE record, their keys in message order.
    assert ("put", "ok", ["app/a", "app/b", "app/c"]) in records
    assert [x for x in records if x[:2] == ("put", "ok")] == [
        ("put", "ok", ["app/gone"]),  # the seed
        ("put", "ok", ["app/a", "app/b", "app/c"]),
        ("put", "ok", ["app/zz-fence"]),
    ]
    assert ("delete", "ok", ["app/gone"]) in records
    assert [x for x in records if x[:2] == ("txn", "ok")] == [("txn", "ok", [None])]
    # Each refused write: a record of its own.
    refused = sorted(x for x in records if x[1] != "ok")
    assert refused == [
        ("compact", "permission_denied", [None]),
        ("put", "invalid_request", [""]),
        ("put", "invalid_request", ["app/b"]),
        ("put", "permission_denied", ["other/x"]),
    ]
    assert all(x["op"] != "get" for x in lines)  # reads that succeed are not audited


async def test_a_message_of_writes_sent_to_a_follower_is_answered_not_leader_each(
    tmp_path: Path, certs: Path
) -> None:
    async with cluster(tmp_path, certs) as c:
        lead = await leader_index(c)
        follower = (lead + 1) % 3
        lid, fid = c.ids[lead], c.ids[follower]

        def knows_the_leader() -> bool:
            raft = c.nodes[fid].raft
            return raft is not None and raft.leader == lid

        await wait_until(knows_the_leader)
        async with connect(c, c.token(), follower) as r:
            writes: list[dict[str, Any]] = [
                {"op": "put", "key": "f/a", "value": b"1"},
                {"op": "put", "key": "f/b", "value": b"2", "session": b"\x07" * 16, "seq": 1},
                {
                    "op": "txn",
                    "compare": [],
                    "success": [{"op": "put", "key": "f/t", "value": b""}],
                    "failure": [],
                },
                {"op": "delete", "prefix": "f/"},
                {"op": "compact", "revision": 0},
            ]
            ids = await r.send(*writes, {"op": "get", "key": "f/a", "serializable": True})
            got = {i: await r.response(i) for i in ids}
            for i in ids[:-1]:
                assert got[i]["ok"] is False, got[i]
                assert got[i]["error"]["code"] == "not_leader", got[i]
                assert got[i]["error"]["leader_endpoint"] == c.endpoints()[lead]
            assert got[ids[-1]]["ok"] and got[ids[-1]]["kv"] is None
            assert sorted(r.arrived) == sorted(ids)
        async with connect(c, c.token(), lead) as w:
            assert (await w.call(op="range", prefix="f/"))["kvs"] == []
