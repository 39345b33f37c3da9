"""The key-value state machine: etcd's revisions, txn, exactly-once sessions, the watch
history, snapshots, and that ``apply`` is deterministic and never raises on entry data."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liferaft.core import Entry, EntryKind
from liferaft.kv import (
    MAX_SESSIONS,
    SESSION_TTL_MS,
    SESSION_WINDOW,
    Compacted,
    KVStore,
    SnapshotError,
    encode_command,
)
from liferaft.kv.store import KV

S1 = b"\x01" * 16
S2 = b"\x02" * 16


class Log:
    """Feeds commands to a store as consecutive NORMAL entries."""

    def __init__(self, store: KVStore | None = None, time_ms: int = 1_000) -> None:
        self.store = store if store is not None else KVStore()
        self.index = self.store.index
        self.time_ms = time_ms

    def entry(self, kind: EntryKind = EntryKind.NORMAL, data: bytes = b"") -> Any:
        self.index += 1
        return self.store.apply(Entry(self.index, 1, kind, data))

    def __call__(self, op: str, time_ms: int | None = None, **fields: Any) -> dict[str, Any]:
        if time_ms is not None:
            self.time_ms = time_ms
        result = self.entry(data=encode_command({"op": op, **fields, "time_ms": self.time_ms}))
        assert isinstance(result, dict)
        return result


def kv(key: str, value: bytes, create: int, mod: int, version: int) -> KV:
    return {
        "key": key,
        "value": value,
        "create_revision": create,
        "mod_revision": mod,
        "version": version,
    }


def cmp(key: str, target: str, result: str, value: object) -> dict[str, object]:
    return {"key": key, "target": target, "result": result, "value": value}


@pytest.fixture
def log() -> Log:
    return Log()


# ---------------------------------------------------------------- put, get, delete


def test_put_get_overwrite_delete_recreate(log: Log) -> None:
    store = log.store
    assert store.get("a") is None and store.revision == 0
    assert log("put", key="a", value=b"1") == {"revision": 1}
    assert store.get("a") == kv("a", b"1", 1, 1, 1)
    assert log("put", key="b", value=b"x") == {"revision": 2}
    assert log("put", key="a", value=b"2") == {"revision": 3}
    assert store.get("a") == kv("a", b"2", 1, 3, 2)  # create kept, mod and version move
    assert log("delete", key="a") == {"deleted": 1, "revision": 4}
    assert store.get("a") is None
    assert log("put", key="a", value=b"3") == {"revision": 5}
    assert store.get("a") == kv("a", b"3", 5, 5, 1)  # re-created: version starts again
    assert store.revision == 5 and len(store) == 2 and store.index == 5


def test_delete_of_nothing_changes_no_revision(log: Log) -> None:
    log("put", key="a", value=b"")
    assert log("delete", key="b") == {"deleted": 0, "revision": 1}
    assert log("delete", prefix="b") == {"deleted": 0, "revision": 1}
    assert log.store.revision == 1 and len(log.store.events_since(1)) == 1


def test_delete_by_prefix_counts_and_is_one_revision(log: Log) -> None:
    for k in ("a", "a/1", "a/2", "ab", "b"):
        log("put", key=k, value=k.encode())
    assert log("delete", prefix="a/") == {"deleted": 2, "revision": 6}
    assert [x["key"] for x in log.store.range("")[0]] == ["a", "ab", "b"]
    events = log.store.events_since(6)
    assert [(e["type"], e["kv"]["key"], e["revision"]) for e in events] == [
        ("delete", "a/1", 6),
        ("delete", "a/2", 6),
    ]
    assert log("delete", prefix="") == {"deleted": 3, "revision": 7}  # "" is every key
    assert len(log.store) == 0


def test_range_sorted_with_limit_and_more(log: Log) -> None:
    for k in ("b", "a/2", "é", "a/10", "a/1", "a", "z"):
        log("put", key=k, value=b"v")
    keys = [x["key"] for x in log.store.range("")[0]]
    assert keys == ["a", "a/1", "a/10", "a/2", "b", "z", "é"]  # code point = UTF-8 order
    assert log.store.range("a/") == (
        [kv("a/1", b"v", 5, 5, 1), kv("a/10", b"v", 4, 4, 1), kv("a/2", b"v", 2, 2, 1)],
        False,
    )
    kvs, more = log.store.range("a/", limit=2)
    assert [x["key"] for x in kvs] == ["a/1", "a/10"] and more
    assert log.store.range("a/", limit=3)[1] is False  # exactly the limit: nothing more
    assert log.store.range("a/", limit=0)[1] is False  # 0: no limit
    assert log.store.range("c") == ([], False)
    assert log.store.range("zz") == ([], False)


def test_noop_and_config_entries_only_advance_the_index(log: Log) -> None:
    log("put", key="a", value=b"")
    before = log.store.snapshot()
    assert log.entry(EntryKind.NOOP) is None
    assert log.entry(EntryKind.CONFIG, b"\x00whatever") is None
    assert log.store.index == 3 and log.store.revision == 1
    restored = KVStore()
    restored.restore(before)
    restored.index = 3
    assert restored.snapshot() == log.store.snapshot()


# ---------------------------------------------------------------- txn


def test_txn_applies_atomically_at_one_revision(log: Log) -> None:
    log("put", key="a", value=b"old")
    result = log(
        "txn",
        compare=[cmp("a", "value", "==", b"old")],
        success=[
            {"op": "put", "key": "a", "value": b"new"},
            {"op": "put", "key": "b", "value": b"b"},
            {"op": "get", "key": "a"},  # sees the put before it
            {"op": "delete", "key": "a"},
            {"op": "get", "key": "a"},
            {"op": "range", "prefix": "", "limit": 5},
            {"op": "delete", "prefix": "zzz"},
        ],
        failure=[{"op": "put", "key": "f", "value": b""}],
    )
    assert result == {
        "succeeded": True,
        "results": [
            {"revision": 2},
            {"revision": 2},
            {"kv": kv("a", b"new", 1, 2, 2), "revision": 2},
            {"deleted": 1, "revision": 2},
            {"kv": None, "revision": 2},
            {"kvs": [kv("b", b"b", 2, 2, 1)], "more": False, "revision": 2},
            {"deleted": 0, "revision": 2},
        ],
        "revision": 2,
    }
    assert log.store.revision == 2
    assert [(e["type"], e["kv"]["key"]) for e in log.store.events_since(2)] == [
        ("put", "a"),
        ("put", "b"),
        ("delete", "a"),
    ]


def test_txn_failure_branch_and_read_only_txn_keep_the_revision(log: Log) -> None:
    log("put", key="a", value=b"1")
    result = log(
        "txn",
        compare=[cmp("a", "version", ">", 1)],
        success=[{"op": "put", "key": "s", "value": b""}],
        failure=[{"op": "get", "key": "a"}, {"op": "range", "prefix": "a"}],
    )
    assert result == {
        "succeeded": False,
        "results": [
            {"kv": kv("a", b"1", 1, 1, 1), "revision": 1},
            {"kvs": [kv("a", b"1", 1, 1, 1)], "more": False, "revision": 1},
        ],
        "revision": 1,
    }
    assert log("txn") == {"succeeded": True, "results": [], "revision": 1}
    assert log.store.get("s") is None and log.store.revision == 1


def test_create_if_absent(log: Log) -> None:
    create: dict[str, Any] = {
        "compare": [cmp("lock", "version", "==", 0)],
        "success": [{"op": "put", "key": "lock", "value": b"me"}],
        "failure": [{"op": "get", "key": "lock"}],
    }
    assert log("txn", **create)["succeeded"] is True
    second = log("txn", **{**create, "success": [{"op": "put", "key": "lock", "value": b"you"}]})
    assert second["succeeded"] is False
    assert second["results"][0]["kv"]["value"] == b"me"


@pytest.mark.parametrize(
    ("target", "result", "value", "expected"),
    [
        # "k" is at create_revision 1, mod_revision 2, version 2, value b"m".
        ("version", "==", 2, True),
        ("version", "!=", 2, False),
        ("version", "<", 3, True),
        ("version", ">", 2, False),
        ("create_revision", "==", 1, True),
        ("create_revision", ">", 0, True),
        ("create_revision", "<", 1, False),
        ("mod_revision", "==", 2, True),
        ("mod_revision", "!=", 1, True),
        ("mod_revision", ">", 2, False),
        ("value", "==", b"m", True),
        ("value", "!=", b"m", False),
        ("value", "<", b"n", True),
        ("value", "<", b"m", False),
        ("value", ">", b"l", True),
        ("value", ">", b"m\x00", False),  # lexicographic on bytes
        ("value", "==", None, False),
        ("value", "!=", None, True),
    ],
)
def test_compare_on_an_existing_key(
    target: str, result: str, value: object, expected: bool
) -> None:
    log = Log()
    log("put", key="k", value=b"a")
    log("put", key="k", value=b"m")
    out = log("txn", compare=[cmp("k", target, result, value)])
    assert out["succeeded"] is expected


@pytest.mark.parametrize(
    ("target", "result", "value", "expected"),
    [
        ("version", "==", 0, True),
        ("version", ">", 0, False),
        ("create_revision", "==", 0, True),
        ("mod_revision", "<", 1, True),
        ("mod_revision", "!=", 0, False),
        ("value", "==", None, True),
        ("value", "!=", None, False),
        ("value", "==", b"", False),
        ("value", "!=", b"", True),
        ("value", "<", b"z", False),  # null is not ordered against bytes
        ("value", ">", b"", False),
    ],
)
def test_compare_on_a_missing_key(target: str, result: str, value: object, expected: bool) -> None:
    log = Log()
    log("put", key="other", value=b"x")
    out = log("txn", compare=[cmp("k", target, result, value)])
    assert out["succeeded"] is expected


def test_all_compares_must_hold(log: Log) -> None:
    log("put", key="a", value=b"1")
    yes, no = cmp("a", "version", "==", 1), cmp("a", "version", "==", 2)
    assert log("txn", compare=[yes, yes])["succeeded"] is True
    assert log("txn", compare=[yes, no])["succeeded"] is False


def test_txn_putting_a_key_twice_counts_two_versions(log: Log) -> None:
    put = {"op": "put", "key": "a", "value": b"x"}
    assert log("txn", success=[put, put])["revision"] == 1
    assert log.store.get("a") == kv("a", b"x", 1, 1, 2)


# ---------------------------------------------------------------- exactly-once sessions


def test_same_session_and_seq_applies_once(log: Log) -> None:
    first = log("put", key="a", value=b"1", session=S1, seq=1)
    again = log("put", key="a", value=b"1", session=S1, seq=1)
    assert first == again == {"revision": 1}
    assert log.store.get("a") == kv("a", b"1", 1, 1, 1) and log.store.revision == 1
    # A retry gets the first result even when the state has moved on since.
    log("put", key="a", value=b"2")
    assert log("put", key="a", value=b"3", session=S1, seq=1) == {"revision": 1}
    assert log.store.get("a")["value"] == b"2"  # type: ignore[index]
    # Another seq, or the same seq in another session, is a new write.
    assert log("put", key="a", value=b"4", session=S1, seq=2) == {"revision": 3}
    assert log("put", key="a", value=b"5", session=S2, seq=1) == {"revision": 4}


def test_retried_txn_and_delete_return_the_first_result(log: Log) -> None:
    log("put", key="a", value=b"1")
    txn: dict[str, Any] = {"success": [{"op": "delete", "key": "a"}, {"op": "get", "key": "a"}]}
    first = log("txn", **txn, session=S1, seq=7)
    assert first["results"][0] == {"deleted": 1, "revision": 2}
    assert log("txn", **txn, session=S1, seq=7) == first
    assert log("delete", prefix="", session=S1, seq=8) == {"deleted": 0, "revision": 2}
    log("put", key="b", value=b"")
    assert log("delete", prefix="", session=S1, seq=8) == {"deleted": 0, "revision": 2}


def test_the_returned_map_is_fresh(log: Log) -> None:
    first = log("put", key="a", value=b"1", session=S1, seq=1)
    first["id"], first["ok"] = 9, True  # what the API does to a result
    assert log("put", key="a", value=b"1", session=S1, seq=1) == {"revision": 1}


def test_seqs_older_than_the_window_are_refused() -> None:
    log = Log()
    for seq in range(1, SESSION_WINDOW + 3):  # 1..130
        log("put", key="k", value=b"%d" % seq, session=S1, seq=seq)
    revision = log.store.revision
    too_old = {"error": {"code": "invalid_request", "message": "sequence number too old"}}
    assert log("put", key="k", value=b"", session=S1, seq=1) == too_old
    assert log("put", key="k", value=b"", session=S1, seq=2) == too_old
    assert log("put", key="k", value=b"", session=S1, seq=3) == {"revision": 3}  # in window
    assert log.store.revision == revision
    # A seq never seen but inside the window (pipelined, committed out of order) applies.
    log("put", key="k", value=b"", session=S1, seq=300)
    assert log("put", key="k", value=b"", session=S1, seq=200)["revision"] == revision + 2
    assert log("put", key="k", value=b"", session=S1, seq=172) == too_old


def test_dedupe_survives_snapshot_and_restore(log: Log) -> None:
    first = log("txn", success=[{"op": "put", "key": "a", "value": b"1"}], session=S1, seq=5)
    restored = Log(KVStore())
    restored.store.restore(log.store.snapshot())
    restored.index = log.index
    assert restored("txn", success=[], session=S1, seq=5) == first
    assert restored.store.revision == 1
    assert restored("put", key="a", value=b"", session=S1, seq=6) == {"revision": 2}


def test_sessions_expire_after_ttl_of_log_time() -> None:
    log = Log(time_ms=0)
    log("put", key="a", value=b"", session=S1, seq=1, time_ms=1_000)
    # Log time is the largest time_ms seen: a leader with a slower clock does not undo it.
    log("put", key="x", value=b"", time_ms=1_000 + SESSION_TTL_MS - 1)
    log("put", key="x", value=b"", time_ms=5)
    assert log.store.log_time_ms == 1_000 + SESSION_TTL_MS - 1
    assert log("put", key="a", value=b"", session=S1, seq=1) == {"revision": 1}  # still known
    assert log.store.session_count == 1
    log("put", key="x", value=b"", time_ms=1_000 + SESSION_TTL_MS)
    assert log.store.session_count == 0
    # Expired: the same seq is a new write now.
    assert log("put", key="a", value=b"", session=S1, seq=1) == {"revision": 5}


def test_a_used_session_stays_alive() -> None:
    log = Log(time_ms=0)
    for i in range(5):
        log("put", key="a", value=b"", session=S1, seq=i, time_ms=i * (SESSION_TTL_MS - 1))
    assert log.store.session_count == 1
    assert log("put", key="a", value=b"", session=S1, seq=0)["revision"] == 1


def test_at_most_max_sessions_least_recently_used_evicted() -> None:
    log = Log()
    sessions = [i.to_bytes(16, "big") for i in range(MAX_SESSIONS + 1)]
    log("put", key="a", value=b"", session=sessions[0], seq=1)
    log("put", key="a", value=b"", session=sessions[1], seq=1)
    log("put", key="a", value=b"", session=sessions[0], seq=2)  # 0 used again: 1 is LRU
    for s in sessions[2:]:
        log("put", key="a", value=b"", session=s, seq=1)
    assert log.store.session_count == MAX_SESSIONS
    revision = log.store.revision
    assert log("put", key="a", value=b"", session=sessions[0], seq=2) == {"revision": 3}
    assert log("put", key="a", value=b"", session=sessions[1], seq=1) == {"revision": revision + 1}


# ---------------------------------------------------------------- watch history


def test_events_since_with_key_and_prefix(log: Log) -> None:
    log("put", key="a", value=b"1")  # 1
    log("put", key="b/1", value=b"2")  # 2
    log("put", key="a", value=b"3")  # 3
    log("delete", key="a")  # 4
    log("put", key="b/2", value=b"4")  # 5
    store = log.store
    assert [e["revision"] for e in store.events_since(1)] == [1, 2, 3, 4, 5]
    assert store.events_since(3, key="a") == [
        {"type": "put", "kv": kv("a", b"3", 1, 3, 2), "revision": 3},
        {
            "type": "delete",
            "kv": {
                "key": "a",
                "value": None,
                "create_revision": 0,
                "mod_revision": 4,
                "version": 0,
            },
            "revision": 4,
        },
    ]
    assert [e["kv"]["key"] for e in store.events_since(1, prefix="b/")] == ["b/1", "b/2"]
    assert store.events_since(1, key="b") == []
    assert store.events_since(0) == []  # from now
    assert store.events_since(6) == []  # not yet


def test_old_revisions_are_compacted() -> None:
    log = Log(KVStore(history_revisions=3))
    for i in range(5):
        log("put", key="k", value=b"%d" % i)
    store = log.store
    assert store.compact_revision == 2
    assert [e["revision"] for e in store.events_since(3)] == [3, 4, 5]
    with pytest.raises(Compacted) as info:
        store.events_since(2)
    assert info.value.compact_revision == 2 == info.value.args[0]
    assert "revision 2 and older are compacted" in str(info.value)
    with pytest.raises(Compacted):
        store.events_since(1)


def test_history_keeps_ten_thousand_revisions() -> None:
    log = Log()
    for i in range(10_005):
        log("put", key="k", value=b"%d" % (i % 3))
    assert log.store.compact_revision == 5
    assert len(log.store.events_since(6)) == 10_000


def test_subscribers_get_the_events_of_each_apply(log: Log) -> None:
    seen: list[list[dict[str, Any]]] = []
    unsubscribe = log.store.subscribe(seen.append)
    log("put", key="a", value=b"1")
    log("delete", key="nothing")  # no events, no call
    log("txn", success=[{"op": "put", "key": "b", "value": b""}, {"op": "delete", "key": "a"}])
    log("put", key="a", value=b"1", session=S1, seq=1)
    log("put", key="a", value=b"1", session=S1, seq=1)  # a retry changes nothing
    assert [[(e["type"], e["kv"]["key"], e["revision"]) for e in evs] for evs in seen] == [
        [("put", "a", 1)],
        [("put", "b", 2), ("delete", "a", 2)],
        [("put", "a", 3)],
    ]
    unsubscribe()
    log("put", key="a", value=b"2")
    assert len(seen) == 3


# ---------------------------------------------------------------- bad entries


def test_bad_command_returns_an_error_and_changes_nothing(log: Log) -> None:
    log("put", key="a", value=b"1")
    before = log.store.snapshot()
    for data in (b"", b"junk", encode_command({"op": "put", "key": "", "value": b""})):
        result = log.entry(data=data)
        assert result["error"]["code"] == "invalid_request"
        assert result["error"]["message"].startswith("bad command")
    assert log.store.index == 4
    log.store.index = 1
    assert log.store.snapshot() == before


def test_an_internal_failure_is_a_result_not_a_crash(
    log: Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(log.store, "_execute", boom)
    result = log("put", key="a", value=b"")
    assert result["error"]["code"] == "internal" and "bug" in result["error"]["message"]
    assert log.store.index == 1


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), kind=st.sampled_from(list(EntryKind)))
def test_apply_never_raises_on_entry_data(data: bytes, kind: EntryKind) -> None:
    store = KVStore()
    store.apply(Entry(1, 1, EntryKind.NORMAL, encode_command(_put("a"))))
    before = store.snapshot()
    result = store.apply(Entry(2, 1, kind, data))
    assert result is None or isinstance(result, dict)
    store.index = 1
    if result is None or "error" in result:
        assert store.snapshot() == before


def _put(key: str) -> dict[str, object]:
    return {"op": "put", "key": key, "value": b"v", "time_ms": 0}


# ---------------------------------------------------------------- snapshots and determinism

_keys = st.sampled_from(["a", "ab", "b", "b/1", "b/2", "é"])
_values = st.binary(max_size=3)
_put_op = st.fixed_dictionaries({"op": st.just("put"), "key": _keys, "value": _values})
_get_op = st.fixed_dictionaries({"op": st.just("get"), "key": _keys})
_range_op = st.fixed_dictionaries(
    {"op": st.just("range"), "prefix": st.sampled_from(["", "a", "b/"])},
    optional={"limit": st.integers(0, 3)},
)
_delete_op = st.one_of(
    st.fixed_dictionaries({"op": st.just("delete"), "key": _keys}),
    st.fixed_dictionaries({"op": st.just("delete"), "prefix": st.sampled_from(["", "a", "b/"])}),
)
_compare = st.one_of(
    st.fixed_dictionaries(
        {
            "key": _keys,
            "target": st.sampled_from(["version", "create_revision", "mod_revision"]),
            "result": st.sampled_from(["==", "!=", "<", ">"]),
            "value": st.integers(0, 6),
        }
    ),
    st.fixed_dictionaries(
        {
            "key": _keys,
            "target": st.just("value"),
            "result": st.sampled_from(["==", "!=", "<", ">"]),
            "value": _values,
        }
    ),
)
_txn_ops = st.lists(st.one_of(_put_op, _get_op, _range_op, _delete_op), max_size=4)
_txn = st.fixed_dictionaries(
    {"op": st.just("txn")},
    optional={"compare": st.lists(_compare, max_size=2), "success": _txn_ops, "failure": _txn_ops},
)
_session: st.SearchStrategy[dict[str, Any]] = st.one_of(
    st.just({}),
    st.fixed_dictionaries(
        {"session": st.sampled_from([S1, S2, b"\x03" * 16]), "seq": st.integers(0, 12)}
    ),
)


@st.composite
def _commands(draw: st.DrawFn) -> list[bytes | None]:
    """Encoded commands (None: a NOOP entry), with leader clocks that mostly advance."""
    out: list[bytes | None] = []
    time_ms = 0
    for _ in range(draw(st.integers(1, 40))):
        if draw(st.integers(0, 9)) == 0:
            out.append(None)
            continue
        time_ms = max(0, time_ms + draw(st.integers(-20, 60)))
        cmd = {**draw(st.one_of(_put_op, _delete_op, _txn)), **draw(_session), "time_ms": time_ms}
        out.append(encode_command(cmd))
    return out


def _small_store() -> KVStore:
    """Tiny limits, so that random runs evict, expire and compact."""
    return KVStore(history_revisions=4, session_window=4, session_ttl_ms=100, max_sessions=2)


def _feed(store: KVStore, commands: list[bytes | None], start: int) -> list[Any]:
    results = []
    for i, data in enumerate(commands, start=start + 1):
        kind = EntryKind.NOOP if data is None else EntryKind.NORMAL
        results.append(store.apply(Entry(i, 1, kind, data or b"")))
    return results


def _history(store: KVStore) -> object:
    try:
        return store.events_since(store.compact_revision + 1)
    except Compacted as exc:  # pragma: no cover - compact_revision + 1 is always kept
        raise AssertionError from exc


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=_commands(), then=_commands())
def test_snapshot_restore_gives_an_identical_store(
    first: list[bytes | None], then: list[bytes | None]
) -> None:
    a = _small_store()
    _feed(a, first, 0)
    b = _small_store()
    b.restore(a.snapshot())
    assert b.snapshot() == a.snapshot()
    assert (b.index, b.revision, b.compact_revision) == (a.index, a.revision, a.compact_revision)
    assert _feed(a, then, len(first)) == _feed(b, then, len(first))
    assert a.snapshot() == b.snapshot()
    assert a.range("") == b.range("") and _history(a) == _history(b)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands=_commands())
def test_same_entries_give_byte_identical_snapshots(commands: list[bytes | None]) -> None:
    a, b = _small_store(), _small_store()
    assert _feed(a, commands, 0) == _feed(b, commands, 0)
    assert a.snapshot() == b.snapshot()
    # And the default limits too.
    c, d = KVStore(), KVStore()
    _feed(c, commands, 0)
    _feed(d, list(commands), 0)
    assert c.snapshot() == d.snapshot()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands=_commands())
def test_revision_and_versions_follow_the_events(commands: list[bytes | None]) -> None:
    """Replaying the event history rebuilds exactly the store's key-values."""
    store = KVStore()
    _feed(store, commands, 0)
    model: dict[str, KV] = {}
    revisions = []
    for e in store.events_since(1):
        revisions.append(e["revision"])
        key = e["kv"]["key"]
        if e["type"] == "put":
            old = model.get(key)
            assert e["kv"]["version"] == (old["version"] + 1 if old else 1)
            assert e["kv"]["create_revision"] == (old["create_revision"] if old else e["revision"])
            model[key] = e["kv"]
        else:
            del model[key]
    assert sorted(set(revisions)) == list(range(1, store.revision + 1))
    assert store.range("") == ([model[k] for k in sorted(model)], False)


def test_restore_refuses_junk_and_changes_nothing(log: Log) -> None:
    log("put", key="a", value=b"1")
    before = log.store.snapshot()
    for data in (b"", b"\xa0", before + b"\x00", before[:-1], b"\xc1\x00", encode_command({})):
        with pytest.raises(SnapshotError):
            log.store.restore(data)
    assert log.store.snapshot() == before
