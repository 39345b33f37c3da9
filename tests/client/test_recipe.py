"""The lock and election recipe without I/O (liferaft.client.recipe), which both client
flavours use: contender keys, the create txn's result, holder and predecessor, and the
leaders an observer shows (one revision judged as a whole, never two at once)."""

from __future__ import annotations

import pytest

from liferaft.client import InvalidRequest, KeyValue, LeaseLost, TxnResult, WatchEvent
from liferaft.client.recipe import (
    LeaderView,
    contender_key,
    contender_prefix,
    create_txn,
    created,
    first_created,
    predecessor,
    proclaim_txn,
)

P = "_liferaft/lock/job/"


def kv(lease: int, create: int, mod: int | None = None, value: bytes = b"") -> KeyValue:
    return KeyValue(contender_key(P, lease), value, create, mod or create, 1)


def test_keys_and_txns() -> None:
    assert contender_prefix("_liferaft/lock/", "job") == P
    assert contender_key(P, 0xAB) == P + "ab"
    for bad in ("", None, 3):
        with pytest.raises(InvalidRequest):
            contender_prefix("_liferaft/lock/", bad)
    compare, success, failure = create_txn(P, P + "ab", b"v", 0xAB)
    assert compare == [{"key": P + "ab", "target": "create_revision", "result": "==", "value": 0}]
    assert [op["op"] for op in success] == ["put", "range"] and success[0]["lease"] == 0xAB
    assert [op["op"] for op in failure] == ["get", "range"]
    compare, success = proclaim_txn(P + "ab", b"w", 0xAB, 7)
    assert compare[0]["value"] == 7 and success[0]["value"] == b"w"


def test_created_reads_the_txn_result() -> None:
    others = [kv(1, 3), kv(2, 5)]
    c = created(P + "2", TxnResult(True, [{"revision": 5}, {"kvs": others}], 5))
    assert (c.created, c.create_revision, c.kvs, c.revision) == (True, 5, others, 5)
    again = created(P + "2", TxnResult(False, [{"kv": kv(2, 5, 9)}, {"kvs": others}], 9))
    assert (again.created, again.create_revision, again.revision) == (False, 5, 9)


def test_holder_and_predecessor() -> None:
    kvs = [kv(3, 9), kv(1, 4), kv(2, 6), KeyValue(P + "sub/1", b"", 1, 1, 1)]
    first = first_created(kvs, P)
    assert first is not None and first.key == P + "1"  # the nested key does not count
    assert predecessor(kvs, P, P + "1", 4, 1) is None  # ours is first: the lock is ours
    pred = predecessor(kvs, P, P + "3", 9, 3)
    assert pred is not None and pred.key == P + "2"  # the one just before, not the holder
    with pytest.raises(LeaseLost):
        predecessor(kvs, P, P + "7", 12, 7)  # our key is gone


def test_leader_view_judges_a_revision_as_a_whole() -> None:
    view = LeaderView(P)
    view.reset([kv(1, 4, value=b"a"), kv(2, 6, value=b"b")], 6)
    shown = view.leader()
    assert shown is not None and shown.value == b"a"
    assert view.leader() is None  # not shown twice
    # one revision deletes the leader (its lease revoked) and adds a contender: the
    # revision is judged once its last event is in, showing b only
    delete_a = WatchEvent("delete", KeyValue(P + "1", b"", 0, 8, 0))
    put_c = WatchEvent("put", kv(3, 8, value=b"c"))
    assert view.event(delete_a, put_c) is None  # more of revision 8 to come
    now = view.event(put_c, None)
    assert now is not None and now.value == b"b" and view.revision == 8
    proclaimed = WatchEvent("put", kv(2, 6, 9, value=b"b2"))
    now = view.event(proclaimed, None)
    assert now is not None and now.value == b"b2"
    assert view.event(WatchEvent("put", kv(4, 10)), None) is None  # a waiter: no change
    assert view.event(WatchEvent("delete", KeyValue(P + "2", b"", 0, 11, 0)), None) is not None
    view.event(WatchEvent("delete", KeyValue(P + "3", b"", 0, 12, 0)), None)
    assert view.event(WatchEvent("delete", KeyValue(P + "4", b"", 0, 13, 0)), None) is None
