"""The client's sans-I/O protocol core (liferaft.client.core), without a network or an
event loop: batching, the session window, endpoint choice, the verdicts on failed
attempts, the back-off and watch resumption. (KeepAliveSchedule: test_lease_client.py.)"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from liferaft.client import Compacted, ConnectionFailed, PermissionDenied, TooLarge, Unavailable
from liferaft.client.api import status_from_wire
from liferaft.client.core import (
    BACKOFF_CAP,
    AvoidLeader,
    Backoff,
    EndpointRing,
    Move,
    Retry,
    SeqWindow,
    Tries,
    WatchState,
    encode,
    on_connect_timeout,
    on_error,
    on_lost,
    on_silence,
    out_of_time,
    take_batch,
)
from liferaft.client.wire import decode_message, pack, parse_endpoint


@dataclass
class Q:
    encoded: bytes
    cancelled: bool = False


def test_take_batch_respects_max_batch_bytes_and_withdrawn_requests() -> None:
    outbox = [Q(encode({"op": "get", "key": f"k{i}"}, i, 1000)) for i in range(10)]
    outbox[1].cancelled = True
    first = take_batch(outbox, 4, 1 << 20)
    assert len(first) == 4 and outbox[1] not in first and len(outbox) == 5
    msg = decode_message(pack([q.encoded for q in first]))
    assert [m["id"] for m in msg] == [0, 2, 3, 4]
    size = len(outbox[0].encoded)
    two = take_batch(outbox, 1024, 2 * size + 1)  # the array header costs a byte
    assert len(two) == 2 and len(outbox) == 3
    one = take_batch(outbox, 1024, 2 * size)
    assert len(one) == 1  # always at least one
    with pytest.raises(TooLarge):
        encode({"op": "put", "key": "k", "value": b"x" * 100}, 1, 50)


def test_seq_window_hands_out_in_order_and_grants_waiters_first_come() -> None:
    w = SeqWindow(4)
    a, b = w.try_take(3), w.try_take(3)
    assert a == range(1, 4) and b == range(4, 5)  # only the room left
    assert w.try_take(1) is None
    first, second = w.wait(2), w.wait(1)
    assert w.try_take(1) is None  # waiters come first
    assert w.release(b) == []  # behind an older one: the window stays
    granted = w.release(a)
    assert granted == [first, second] and first.seqs == range(5, 7) and second.seqs == range(7, 8)
    late = w.wait(1)
    w.withdraw(late)
    assert w.release(first.seqs) == [] and w.release(second.seqs) == []
    assert w.try_take(10) == range(8, 12)


def test_endpoint_ring_rotates_and_follows_a_redirect_once() -> None:
    eps = [parse_endpoint(f"127.0.0.1:{p}") for p in (1, 2, 3)]
    ring = EndpointRing(eps, first=1)
    assert ring.next() == eps[1]
    ring.advance()
    assert ring.next() == eps[2]
    leader = parse_endpoint("10.0.0.9:8001")
    ring.redirect(leader)
    assert ring.next() == leader and ring.next() == eps[2]


def test_verdicts() -> None:
    t = Tries()
    leader = {"code": "not_leader", "message": "", "leader_endpoint": "wss://10.0.0.2:8001/v1"}
    v = on_error(leader, Retry.ALWAYS, t)
    assert v.move is Move.REDIRECT and v.at_once and not v.fatal
    assert v.leader == parse_endpoint("10.0.0.2:8001")
    assert not on_error(leader, Retry.SAFE, t).at_once  # only the first redirect is at once
    v = on_error({"code": "not_leader", "message": ""}, Retry.ALWAYS, t)
    assert v.move is Move.ROTATE and not v.fatal
    assert on_error({"code": "unavailable"}, Retry.ALWAYS, t).move is Move.ROTATE
    v = on_error({"code": "unavailable"}, Retry.SAFE, t)  # a member change may have run
    assert v.fatal and isinstance(v.error, Unavailable)
    v = on_error({"code": "compacted", "compact_revision": 7}, Retry.ALWAYS, t)
    assert v.fatal and isinstance(v.error, Compacted) and v.error.compact_revision == 7
    assert isinstance(on_error({"code": "permission_denied"}, Retry.ALWAYS, t).error,
                      PermissionDenied)  # fmt: skip
    t = Tries()
    v = on_lost("wss://a", "reset", sent=True, too_big=False, retry=Retry.ALWAYS, t=t)
    assert v.move is Move.LOST and not v.fatal and isinstance(t.last, ConnectionFailed)
    assert on_lost("wss://a", "r", sent=True, too_big=False, retry=Retry.SAFE, t=t).fatal
    assert not on_lost("wss://a", "r", sent=False, too_big=False, retry=Retry.SAFE, t=t).fatal
    v = on_lost("wss://a", "r", sent=True, too_big=True, retry=Retry.ALWAYS, t=t)
    assert v.fatal and isinstance(v.error, TooLarge)
    v = on_silence("wss://a", 2.0, Retry.ALWAYS, t)
    assert v.move is Move.ROTATE and not v.fatal and "2s" in str(v.error)
    assert on_silence("wss://a", 2.0, Retry.SAFE, t).fatal
    before = t.last
    on_connect_timeout(1.0, t, cut_by_deadline=True)
    assert t.last is before  # the error before the deadline says more
    on_connect_timeout(1.0, t, cut_by_deadline=False)
    assert isinstance(t.last, ConnectionFailed) and out_of_time(t, 5) is t.last
    assert "5s" in str(out_of_time(Tries(), 5))


def test_backoff_is_jittered_capped_and_replayable() -> None:
    a, b = Backoff(random.Random(7)), Backoff(random.Random(7))
    delays = [a.delay(n) for n in range(12)]
    assert delays == [b.delay(n) for n in range(12)]
    assert 0.025 <= delays[0] <= 0.05
    assert all(BACKOFF_CAP / 2 <= d <= BACKOFF_CAP for d in delays[6:])


def test_watch_state_resumes_after_the_last_event() -> None:
    w = WatchState({"prefix": "a/"}, 0)
    assert w.subscribe_request() == {"op": "watch", "prefix": "a/"}
    assert w.subscribed({"watch_id": 3, "revision": 10}) == 3
    assert w.next_revision == 11
    kv = {"key": "a/x", "value": b"1", "create_revision": 12, "mod_revision": 12, "version": 1}
    events = w.events({"watch_id": 3, "events": [{"type": "put", "kv": kv}], "revision": 12})
    assert [e.kv.key for e in events] == ["a/x"] and w.next_revision == 13
    assert w.subscribe_request() == {"op": "watch", "prefix": "a/", "start_revision": 13}
    w.subscribed({"watch_id": 4, "revision": 20})
    assert w.next_revision == 13  # a resubscription keeps its place
    with pytest.raises(Compacted):
        w.events({"watch_id": 4, "events": [], "canceled": True, "error": {"code": "compacted"}})
    assert w.closed


def test_status_from_the_wire() -> None:
    st = status_from_wire(
        {
            "id": 1,
            "ok": True,
            "node_id": "n2",
            "role": "follower",
            "term": 3,
            "leader_id": "n1",
            "leader_endpoint": "wss://127.0.0.1:8001/v1",
            "commit_index": 9,
            "applied_index": 8,
            "revision": 5,
            "members": [{"id": "n1", "peer": "p", "client": "c", "voter": True}],
            "db_size": 4096,
            "version": "0.1.0",
            "alarms": [],
            "last_error": None,
            "future_field": 1,
        }
    )
    assert st.leader_id == "n1" and not st.is_leader and st.members[0].id == "n1"
    assert st["term"] == 3 and st.get("nope", 0) == 0 and st.extra == {"future_field": 1}
    doc = st.as_dict()
    assert doc["future_field"] == 1 and doc["members"][0]["voter"] is True and "id" not in doc


def test_avoid_leader_moves_on_from_the_leader_until_every_endpoint_was_tried() -> None:
    leader = {"ok": True, "node_id": "n1", "leader_id": "n1"}
    follower = {"ok": True, "node_id": "n2", "leader_id": "n1"}
    a = AvoidLeader(True, 3)
    assert a.check() and a.skip(leader)  # the leader: try the next endpoint
    assert a.check() and a.skip(leader)  # (a new leader, say)
    assert not a.check()  # every other endpoint tried: keep this one, whatever it is
    assert a.check() and not a.skip(follower)  # counting starts again; a follower stays
    assert a.check() and not a.skip({"ok": False})  # no answer to judge by: stay
    assert not AvoidLeader(True, 1).check()  # one endpoint: nothing to avoid
    assert not AvoidLeader(False, 3).check()
