"""The key-value state machine on disk (``liferaft.kv.state.StateDB``): etcd's revisions,
versions and reads at past revisions, txn, compaction, the watch history, exactly-once
sessions, restart and backup, and that ``apply`` is deterministic whatever the batching
and never raises on entry data."""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liferaft.core import Entry, EntryKind
from liferaft.kv import (
    HISTORY_REVISIONS,
    MAX_SESSIONS,
    SESSION_TTL_MS,
    SESSION_WINDOW,
    Applied,
    Compacted,
    StateCorrupt,
    StateDB,
    encode_command,
)
from liferaft.kv import apply as apply_module
from liferaft.kv.commands import encode_batch
from liferaft.kv.sessions import encode_result
from liferaft.kv.state import KV, EventRow, FutureRevision, Result, prefix_end
from liferaft.kv.watch import Event

S1 = b"\x01" * 16
S2 = b"\x02" * 16
S3 = b"\x03" * 16
TOO_OLD = {"error": {"code": "invalid_request", "message": "sequence number too old"}}
# Tiny limits, so that random runs compact, evict and expire.
SMALL: dict[str, int] = {
    "history_revisions": 4,
    "session_window": 4,
    "session_ttl_ms": 100,
    "max_sessions": 2,
}


class Log:
    """Feeds commands to a database as consecutive entries, one ``apply`` each (or a
    batch), and keeps what every ``apply`` returned."""

    def __init__(self, db: StateDB, time_ms: int = 1_000) -> None:
        self.db = db
        self.index = db.applied
        self.time_ms = time_ms
        self.applied: list[Applied] = []

    def command(self, op: str, time_ms: int | None = None, **fields: Any) -> bytes:
        if time_ms is not None:
            self.time_ms = time_ms
        return encode_command({"op": op, **fields, "time_ms": self.time_ms})

    def entry(self, kind: EntryKind = EntryKind.NORMAL, data: bytes = b"") -> Result | None:
        (result,) = self.batch([(kind, data)]).results
        return result

    def batch(self, items: Sequence[bytes | tuple[EntryKind, bytes]]) -> Applied:
        """Apply ``items`` (encoded commands, or (kind, data)) in one ``apply``."""
        entries = []
        for item in items:
            kind, data = item if isinstance(item, tuple) else (EntryKind.NORMAL, item)
            self.index += 1
            entries.append(Entry(self.index, 1, kind, data))
        applied = self.db.apply(entries)
        assert len(applied.results) == len(entries)
        self.applied.append(applied)
        return applied

    def __call__(self, op: str, time_ms: int | None = None, **fields: Any) -> Result:
        result = self.entry(data=self.command(op, time_ms, **fields))
        assert isinstance(result, dict)
        return result


class Dbs:
    """Opens databases in one directory and closes them all at the end."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.opened: list[StateDB] = []

    def __call__(self, name: str = "state.db", /, **limits: int) -> StateDB:
        db = StateDB.open(self.dir / name, **limits)
        self.opened.append(db)
        return db

    def close(self) -> None:
        for db in self.opened:
            db.close()


@contextlib.contextmanager
def scratch(factory: pytest.TempPathFactory) -> Iterator[Dbs]:
    """A fresh directory under pytest's base temp, for one hypothesis example."""
    with tempfile.TemporaryDirectory(dir=factory.getbasetemp()) as d:
        dbs = Dbs(Path(d))
        try:
            yield dbs
        finally:
            dbs.close()


@pytest.fixture
def new_db(tmp_path: Path) -> Iterator[Dbs]:
    dbs = Dbs(tmp_path)
    yield dbs
    dbs.close()


@pytest.fixture
def db(new_db: Dbs) -> StateDB:
    return new_db()


@pytest.fixture
def log(db: StateDB) -> Log:
    return Log(db)


def kv(key: str, value: bytes, create: int, mod: int, version: int) -> KV:
    return {
        "key": key,
        "value": value,
        "create_revision": create,
        "mod_revision": mod,
        "version": version,
    }


def tombstone(key: str, revision: int) -> Event:
    return {
        "type": "delete",
        "kv": {
            "key": key,
            "value": None,
            "create_revision": 0,
            "mod_revision": revision,
            "version": 0,
        },
        "revision": revision,
    }


def cmp(key: str, target: str, result: str, value: object) -> dict[str, object]:
    return {"key": key, "target": target, "result": result, "value": value}


def brief(events: Sequence[Event]) -> list[tuple[str, str, int]]:
    return [(e["type"], e["kv"]["key"], e["revision"]) for e in events]


def history(db: StateDB, start: int | None = None) -> list[Event]:
    """Every event kept from ``start`` (default: the oldest watchable revision) on."""
    first = db.compact_revision + 1 if start is None else start
    events, last = db.events(first, max_revisions=2**40)
    assert last == max(db.revision, first - 1)
    return events


def reads(db: StateDB) -> tuple[object, ...]:
    """What a client can read of ``db``: every key-value, the watchable history and the
    counters."""
    return (
        db.applied,
        db.revision,
        db.compact_revision,
        db.log_time_ms,
        db.session_count,
        db.key_count(),
        db.range(""),
        history(db),
    )


# ---------------------------------------------------------------- put, get, delete


def test_put_get_overwrite_delete_recreate(log: Log) -> None:
    db = log.db
    assert db.get("a") == (None, 0) and db.revision == 0 and db.applied == 0
    assert log("put", key="a", value=b"1") == {"revision": 1}
    assert db.get("a") == (kv("a", b"1", 1, 1, 1), 1)
    assert log("put", key="b", value=b"x") == {"revision": 2}
    assert log("put", key="a", value=b"2") == {"revision": 3}
    assert db.get("a") == (kv("a", b"2", 1, 3, 2), 3)  # create kept, mod and version move
    assert log("delete", key="a") == {"deleted": 1, "revision": 4}
    assert db.get("a") == (None, 4)
    assert log("put", key="a", value=b"3") == {"revision": 5}
    assert db.get("a") == (kv("a", b"3", 5, 5, 1), 5)  # re-created: version starts again
    assert db.revision == 5 and db.key_count() == 2 and db.applied == 5


def test_delete_of_nothing_changes_no_revision(log: Log) -> None:
    log("put", key="a", value=b"")
    assert log("delete", key="b") == {"deleted": 0, "revision": 1}
    assert log("delete", prefix="b") == {"deleted": 0, "revision": 1}
    assert log.db.revision == 1 and log.db.applied == 3
    assert brief(history(log.db, 1)) == [("put", "a", 1)]


def test_delete_by_prefix_counts_and_is_one_revision(log: Log) -> None:
    for k in ("a", "a/1", "a/2", "ab", "b"):
        log("put", key=k, value=k.encode())
    assert log("delete", prefix="a/") == {"deleted": 2, "revision": 6}
    assert [x["key"] for x in log.db.range("")[0]] == ["a", "ab", "b"]
    assert log.db.events(6) == ([tombstone("a/1", 6), tombstone("a/2", 6)], 6)
    assert log("delete", prefix="") == {"deleted": 3, "revision": 7}  # "" is every key
    assert log.db.key_count() == 0 and log.db.range("") == ([], False, 7)


def test_range_sorted_with_limit_and_more(log: Log) -> None:
    for k in ("b", "a/2", "é", "a/10", "a/1", "a", "z"):
        log("put", key=k, value=b"v")
    db = log.db
    keys = [x["key"] for x in db.range("")[0]]
    assert keys == ["a", "a/1", "a/10", "a/2", "b", "z", "é"]  # code point = UTF-8 order
    assert db.range("a/") == (
        [kv("a/1", b"v", 5, 5, 1), kv("a/10", b"v", 4, 4, 1), kv("a/2", b"v", 2, 2, 1)],
        False,
        7,
    )
    kvs, more, _ = db.range("a/", limit=2)
    assert [x["key"] for x in kvs] == ["a/1", "a/10"] and more
    assert db.range("a/", limit=3)[1] is False  # exactly the limit: nothing more
    assert db.range("a/", limit=0)[1] is False  # 0: no limit
    assert db.range("c") == ([], False, 7)
    assert db.range("zz") == ([], False, 7)


def test_range_with_the_largest_limit(log: Log) -> None:
    """A limit of 2**63 - 1 is valid (docs/client-protocol.md): it reads everything, in a
    txn too."""
    for k in ("a", "b"):
        log("put", key=k, value=b"")
    top = 2**63 - 1
    kvs, more, _ = log.db.range("", limit=top)
    assert [x["key"] for x in kvs] == ["a", "b"] and more is False
    assert log.db.range("", limit=top, revision=1)[:2] == ([kv("a", b"", 1, 1, 1)], False)
    out = log("txn", success=[{"op": "range", "prefix": "", "limit": top}])
    assert out["results"][0]["kvs"] == kvs and out["results"][0]["more"] is False


def test_noop_and_config_entries_only_advance_the_index(log: Log, new_db: Dbs) -> None:
    db = log.db
    log("put", key="a", value=b"")
    before = reads(db)
    assert log.entry(EntryKind.NOOP) is None
    assert log.entry(EntryKind.CONFIG, b"\x00whatever") is None
    assert all(a.events == [] for a in log.applied[1:])
    assert db.applied == 3 and reads(db) == (3, *before[1:])
    # The same state as a database that saw the put and two empty NOOPs.
    other = Log(new_db("other.db"))
    other("put", key="a", value=b"")
    other.batch([(EntryKind.NOOP, b""), (EntryKind.NOOP, b"")])
    assert other.db.digest() == db.digest()


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
    assert log.db.revision == 2
    # One event per key, its last change in the txn, sorted by key.
    assert brief(history(log.db, 2)) == [("delete", "a", 2), ("put", "b", 2)]
    assert log.db.get("a", revision=1)[0] == kv("a", b"old", 1, 1, 1)


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
    assert log.db.get("s") == (None, 1) and log.db.revision == 1
    assert [a.events for a in log.applied[1:]] == [[], []]


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
    log: Log, target: str, result: str, value: object, expected: bool
) -> None:
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
def test_compare_on_a_missing_key(
    log: Log, target: str, result: str, value: object, expected: bool
) -> None:
    log("put", key="other", value=b"x")
    log("put", key="k", value=b"gone")
    log("delete", key="k")  # deleted: its history is no longer its value
    out = log("txn", compare=[cmp("k", target, result, value)])
    assert out["succeeded"] is expected


def test_compare_on_an_empty_value_is_not_null(log: Log) -> None:
    log("put", key="k", value=b"")
    assert log("txn", compare=[cmp("k", "value", "==", b"")])["succeeded"] is True
    assert log("txn", compare=[cmp("k", "value", "==", None)])["succeeded"] is False
    assert log("txn", compare=[cmp("k", "value", "!=", None)])["succeeded"] is True


def test_all_compares_must_hold(log: Log) -> None:
    log("put", key="a", value=b"1")
    yes, no = cmp("a", "version", "==", 1), cmp("a", "version", "==", 2)
    assert log("txn", compare=[yes, yes])["succeeded"] is True
    assert log("txn", compare=[yes, no])["succeeded"] is False


def test_txn_putting_a_key_twice_counts_two_versions(log: Log) -> None:
    put = {"op": "put", "key": "a", "value": b"x"}
    assert log("txn", success=[put, put])["revision"] == 1
    assert log.db.get("a") == (kv("a", b"x", 1, 1, 2), 1)
    assert log.applied[-1].events == [
        [{"type": "put", "kv": kv("a", b"x", 1, 1, 2), "revision": 1}]
    ]


# ---------------------------------------------------------------- exactly-once sessions


def test_same_session_and_seq_applies_once(log: Log) -> None:
    first = log("put", key="a", value=b"1", session=S1, seq=1)
    again = log("put", key="a", value=b"1", session=S1, seq=1)
    assert first == again == {"revision": 1}
    assert log.db.get("a") == (kv("a", b"1", 1, 1, 1), 1) and log.db.revision == 1
    assert log.applied[-1].events == []
    # A retry gets the first result even when the state has moved on since.
    log("put", key="a", value=b"2")
    assert log("put", key="a", value=b"3", session=S1, seq=1) == {"revision": 1}
    assert log.db.get("a")[0] == kv("a", b"2", 1, 2, 2)
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
    assert log.db.get("b")[0] is not None


def test_a_retried_txn_returns_the_values_it_read_then(log: Log) -> None:
    log("put", key="a", value=b"1")
    txn: dict[str, Any] = {
        "success": [{"op": "get", "key": "a"}, {"op": "range", "prefix": ""}],
        "session": S1,
        "seq": 1,
    }
    first = log("txn", **txn)
    log("put", key="a", value=b"2")
    assert log("txn", **txn) == first
    assert first["results"][0]["kv"] == kv("a", b"1", 1, 1, 1)


def test_the_returned_map_is_fresh(log: Log) -> None:
    first = log("put", key="a", value=b"1", session=S1, seq=1)
    first["id"], first["ok"] = 9, True  # what the API does to a result
    again = log("put", key="a", value=b"1", session=S1, seq=1)
    assert again == {"revision": 1}
    again["id"] = 10
    assert log("put", key="a", value=b"1", session=S1, seq=1) == {"revision": 1}


def test_seqs_older_than_the_window_are_refused(log: Log) -> None:
    for seq in range(1, SESSION_WINDOW + 3):  # 1..130
        log("put", key="k", value=b"%d" % seq, session=S1, seq=seq)
    revision = log.db.revision
    assert log("put", key="k", value=b"", session=S1, seq=1) == TOO_OLD
    assert log("put", key="k", value=b"", session=S1, seq=2) == TOO_OLD
    assert log("put", key="k", value=b"", session=S1, seq=3) == {"revision": 3}  # in window
    assert log.db.revision == revision
    # A seq never seen but inside the window (pipelined, committed out of order) applies.
    log("put", key="k", value=b"", session=S1, seq=300)
    assert log("put", key="k", value=b"", session=S1, seq=200)["revision"] == revision + 2
    assert log("put", key="k", value=b"", session=S1, seq=172) == TOO_OLD


def test_dedupe_survives_close_and_reopen(new_db: Dbs) -> None:
    db = new_db()
    log = Log(db)
    first = log("txn", success=[{"op": "put", "key": "a", "value": b"1"}], session=S1, seq=5)
    db.close()
    log = Log(new_db())
    assert log.index == 1
    assert log("txn", success=[], session=S1, seq=5) == first
    assert log.db.revision == 1
    assert log("put", key="a", value=b"", session=S1, seq=6) == {"revision": 2}


@given(
    st.one_of(
        st.fixed_dictionaries({"revision": st.integers(min_value=-(2**64), max_value=2**64)}),
        st.fixed_dictionaries({"revision": st.one_of(st.booleans(), st.none(), st.text())}),
        st.dictionaries(st.text(max_size=10), st.integers() | st.text(), max_size=3),
    )
)
def test_a_stored_result_is_its_canonical_cbor_whatever_its_shape(result: dict[str, Any]) -> None:
    """A put's {"revision": n} is encoded by a shortcut; every result, that shape or
    not, must be stored as exactly the bytes cbor2 makes of it (a retry decodes them)."""
    assert encode_result(result) == cbor2.dumps(result, canonical=True)


def test_sessions_expire_after_ttl_of_log_time(new_db: Dbs) -> None:
    log = Log(new_db(), time_ms=0)
    db = log.db
    log("put", key="a", value=b"", session=S1, seq=1, time_ms=1_000)
    # Log time is the largest time_ms seen: a leader with a slower clock does not undo it.
    log("put", key="x", value=b"", time_ms=1_000 + SESSION_TTL_MS - 1)
    log("put", key="x", value=b"", time_ms=5)
    assert db.log_time_ms == 1_000 + SESSION_TTL_MS - 1
    assert log("put", key="a", value=b"", session=S1, seq=1) == {"revision": 1}  # still known
    assert db.session_count == 1
    log("put", key="x", value=b"", time_ms=1_000 + SESSION_TTL_MS)
    assert db.session_count == 0
    # Expired: the same seq is a new write now.
    assert log("put", key="a", value=b"", session=S1, seq=1) == {"revision": 5}


def test_a_used_session_stays_alive(log: Log) -> None:
    for i in range(5):
        log("put", key="a", value=b"", session=S1, seq=i, time_ms=i * (SESSION_TTL_MS - 1))
    assert log.db.session_count == 1
    assert log("put", key="a", value=b"", session=S1, seq=0)["revision"] == 1


def test_at_most_max_sessions_least_recently_used_evicted(log: Log) -> None:
    sessions = [i.to_bytes(16, "big") for i in range(MAX_SESSIONS + 1)]
    log("put", key="a", value=b"", session=sessions[0], seq=1)
    log("put", key="a", value=b"", session=sessions[1], seq=1)
    log("put", key="a", value=b"", session=sessions[0], seq=2)  # 0 used again: 1 is LRU
    log.batch([log.command("put", key="a", value=b"", session=s, seq=1) for s in sessions[2:]])
    assert log.db.session_count == MAX_SESSIONS
    revision = log.db.revision
    assert log("put", key="a", value=b"", session=sessions[0], seq=2) == {"revision": 3}
    assert log("put", key="a", value=b"", session=sessions[1], seq=1) == {"revision": revision + 1}


# ---------------------------------------------------------------- watch history


def test_events_with_key_and_prefix(log: Log) -> None:
    log("put", key="a", value=b"1")  # 1
    log("put", key="b/1", value=b"2")  # 2
    log("put", key="a", value=b"3")  # 3
    log("delete", key="a")  # 4
    log("put", key="b/2", value=b"4")  # 5
    db = log.db
    assert [e["revision"] for e in history(db, 1)] == [1, 2, 3, 4, 5]
    assert db.events(3, key="a") == (
        [{"type": "put", "kv": kv("a", b"3", 1, 3, 2), "revision": 3}, tombstone("a", 4)],
        5,
    )
    assert [e["kv"]["key"] for e in db.events(1, prefix="b/")[0]] == ["b/1", "b/2"]
    assert db.events(1, key="b") == ([], 5)
    assert db.events(6) == ([], 5)  # not yet


def test_old_revisions_are_compacted(new_db: Dbs) -> None:
    log = Log(new_db(history_revisions=3))
    for i in range(5):
        log("put", key="k", value=b"%d" % i)
    db = log.db
    assert db.compact_revision == 2
    assert [e["revision"] for e in history(db, 3)] == [3, 4, 5]
    with pytest.raises(Compacted) as info:
        db.events(2)
    assert info.value.compact_revision == 2 == info.value.args[0]
    assert str(info.value) == "revisions before 2 are compacted"
    with pytest.raises(Compacted):
        db.events(1)
    # A read at the compaction point still works, before it no longer.
    assert db.get("k", revision=2) == (kv("k", b"1", 1, 2, 2), 5)
    with pytest.raises(Compacted) as info:
        db.get("k", revision=1)
    assert info.value.compact_revision == 2


def test_history_keeps_history_revisions(new_db: Dbs) -> None:
    assert new_db("default.db").history_revisions == HISTORY_REVISIONS
    log = Log(new_db(history_revisions=50))
    log.batch([log.command("put", key="k", value=b"%d" % (i % 3)) for i in range(55)])
    assert log.db.compact_revision == 5
    assert len(history(log.db, 6)) == 50


def test_each_apply_returns_the_events_of_its_revisions(log: Log) -> None:
    log("put", key="a", value=b"1")
    log("delete", key="nothing")  # no events
    log("txn", success=[{"op": "put", "key": "b", "value": b""}, {"op": "delete", "key": "a"}])
    log("put", key="a", value=b"1", session=S1, seq=1)
    log("put", key="a", value=b"1", session=S1, seq=1)  # a retry changes nothing
    assert [[brief(evs) for evs in a.events] for a in log.applied] == [
        [[("put", "a", 1)]],
        [],
        [[("delete", "a", 2), ("put", "b", 2)]],
        [[("put", "a", 3)]],
        [],
    ]
    # One list per revision, in order, when several writes share an apply.
    applied = log.batch(
        [
            log.command("put", key="x", value=b""),
            log.command("delete", key="nothing"),
            log.command("delete", prefix=""),
        ]
    )
    assert [brief(evs) for evs in applied.events] == [
        [("put", "x", 4)],
        [("delete", "a", 5), ("delete", "b", 5), ("delete", "x", 5)],
    ]
    assert applied.results == [
        {"revision": 4},
        {"deleted": 0, "revision": 4},
        {"deleted": 3, "revision": 5},
    ]


# ---------------------------------------------------------------- bad entries


def test_bad_command_returns_an_error_and_changes_nothing(log: Log, new_db: Dbs) -> None:
    log("put", key="a", value=b"1")
    bad = (
        b"",
        b"junk",
        encode_command({"op": "put", "key": "", "value": b"", "time_ms": 5}),
        encode_command({"op": "put", "key": "a", "value": b""}),  # no time_ms
        encode_command({"op": "get", "key": "a", "time_ms": 5}),  # not a write
        log.command("put", key="a", value=b"2") + b"\x00",
    )
    for data in bad:
        result = log.entry(data=data)
        assert result is not None
        assert result["error"]["code"] == "invalid_request"
        assert result["error"]["message"].startswith("bad command")
    assert log.db.applied == 1 + len(bad)
    # Exactly the state of a database that saw NOOPs instead.
    ref = Log(new_db("ref.db"))
    ref("put", key="a", value=b"1")
    ref.batch([(EntryKind.NOOP, b"")] * len(bad))
    assert log.db.digest() == ref.db.digest()


def test_an_internal_failure_is_a_result_not_a_crash(
    log: Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(log.db._applier, "_command", boom)
    result = log("put", key="a", value=b"")
    assert result == {
        "error": {"code": "internal", "message": "applying entry 1 failed: RuntimeError('bug')"}
    }
    assert log.db.applied == 1 and log.db.revision == 0 and log.applied[-1].events == []


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=300), kind=st.sampled_from(list(EntryKind)))
def test_apply_never_raises_on_entry_data(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, kind: EntryKind
) -> None:
    with scratch(tmp_path_factory) as new:
        db, ref = new("a.db"), new("ref.db")
        first = Entry(1, 1, EntryKind.NORMAL, encode_command(_put("a")))
        db.apply([first])
        ref.apply([first, Entry(2, 1, EntryKind.NOOP, b"")])
        (result,) = db.apply([Entry(2, 1, kind, data)]).results
        assert result is None or isinstance(result, dict)
        assert db.applied == 2
        if result is None or "error" in result:
            assert db.digest() == ref.digest()


def _put(key: str) -> dict[str, object]:
    return {"op": "put", "key": key, "value": b"v", "time_ms": 0}


# ---------------------------------------------------------------- open, restart, backup


def test_open_refuses_what_is_not_a_state_database(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database " * 50)
    with pytest.raises(StateCorrupt):
        StateDB.open(junk)
    foreign = tmp_path / "foreign.db"
    with contextlib.closing(sqlite3.connect(foreign)) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
    with pytest.raises(StateCorrupt, match="not a liferaft state database"):
        StateDB.open(foreign)


def test_reopen_gives_the_same_state_and_reapplying_changes_nothing(new_db: Dbs) -> None:
    entries = random_entries(random.Random(7), 150)
    db = new_db(**SMALL)
    db.apply(entries[:50])
    db.apply(entries[50:80])
    digest, before = db.digest(), reads(db)
    db.close()
    db = new_db(**SMALL)
    assert db.applied == 80 and db.digest() == digest and reads(db) == before
    # The log replayed over a state that already holds it: nothing is applied twice.
    again = db.apply(entries[:80])
    assert again.results == [None] * 80 and again.events == []
    assert db.digest() == digest and reads(db) == before
    # A replay that overlaps: the old part is skipped, the new part applied once.
    out = db.apply(entries[60:120])
    ref = new_db("ref.db", **SMALL)
    expected = ref.apply(entries[:120])
    assert out.results == [None] * 20 + expected.results[80:]
    assert db.digest() == ref.digest() and reads(db) == reads(ref)


def test_backup_answers_the_same_reads(log: Log, new_db: Dbs, tmp_path: Path) -> None:
    log("put", key="a", value=b"1")
    log("put", key="b", value=b"2", session=S1, seq=1)
    log("delete", key="a")
    log("put", key="a", value=b"3")
    assert log.db.backup(tmp_path / "copy.db") == 4
    log("put", key="c", value=b"after the backup")
    copy = Log(new_db("copy.db"))
    assert copy.index == 4 and copy.db.revision == 4
    for r in range(1, 5):
        assert copy.db.range("", revision=r) == (*log.db.range("", revision=r)[:2], 4)
    assert copy.db.get("c") == (None, 4)
    # It carries the sessions too, and goes on exactly as the original did.
    assert copy("put", key="c", value=b"after the backup") == {"revision": 5}
    assert copy("put", key="b", value=b"2", session=S1, seq=1) == {"revision": 2}
    log("put", key="b", value=b"2", session=S1, seq=1)
    assert copy.db.digest() == log.db.digest()


# ---------------------------------------------------------------- hypothesis: determinism

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
_compact_op = st.fixed_dictionaries({"op": st.just("compact"), "revision": st.integers(0, 30)})
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
    st.fixed_dictionaries({"session": st.sampled_from([S1, S2, S3]), "seq": st.integers(0, 12)}),
)


@st.composite
def _commands(draw: st.DrawFn, compact: bool = True) -> list[bytes | None]:
    """Encoded commands (None: a NOOP entry), with leader clocks that mostly advance;
    ``compact`` ops among them unless told otherwise."""
    ops: list[st.SearchStrategy[dict[str, Any]]] = [_put_op, _delete_op, _txn]
    if compact:
        ops.append(_compact_op)
    out: list[bytes | None] = []
    time_ms = 0
    for _ in range(draw(st.integers(1, 40))):
        if draw(st.integers(0, 9)) == 0:
            out.append(None)
            continue
        time_ms = max(0, time_ms + draw(st.integers(-20, 60)))
        op = draw(st.one_of(ops))
        out.append(encode_command({**op, **draw(_session), "time_ms": time_ms}))
    return out


def _entries(commands: list[bytes | None], start: int) -> list[Entry]:
    return [
        Entry(i, 1, EntryKind.NOOP, b"") if data is None else Entry(i, 1, EntryKind.NORMAL, data)
        for i, data in enumerate(commands, start=start + 1)
    ]


def _feed(db: StateDB, commands: list[bytes | None], start: int) -> list[Result | None]:
    """One ``apply`` per entry."""
    return [r for e in _entries(commands, start) for r in db.apply([e]).results]


_HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_HYPOTHESIS
@given(first=_commands(), then=_commands())
def test_backup_gives_an_identical_database(
    tmp_path_factory: pytest.TempPathFactory, first: list[bytes | None], then: list[bytes | None]
) -> None:
    with scratch(tmp_path_factory) as new:
        a = new("a.db", **SMALL)
        _feed(a, first, 0)
        assert a.backup(new.dir / "b.db") == len(first)
        b = new("b.db", **SMALL)
        assert b.digest() == a.digest() and reads(b) == reads(a)
        assert _feed(a, then, len(first)) == _feed(b, then, len(first))
        assert b.digest() == a.digest() and reads(b) == reads(a)


@_HYPOTHESIS
@given(commands=_commands())
def test_same_entries_give_the_same_digest_in_any_batching(
    tmp_path_factory: pytest.TempPathFactory, commands: list[bytes | None]
) -> None:
    with scratch(tmp_path_factory) as new:
        a, b = new("a.db", **SMALL), new("b.db", **SMALL)
        entries = _entries(commands, 0)
        one_by_one = _feed(a, commands, 0)
        assert b.apply(entries).results == one_by_one
        assert a.digest() == b.digest() and reads(a) == reads(b)
        # And the default limits too.
        c, d = new("c.db"), new("d.db")
        assert _feed(c, commands, 0) == d.apply(entries).results
        assert c.digest() == d.digest()


@_HYPOTHESIS
@given(commands=_commands(compact=False))
def test_revision_and_versions_follow_the_events(
    tmp_path_factory: pytest.TempPathFactory, commands: list[bytes | None]
) -> None:
    """Replaying the event history rebuilds exactly the current key-values, and the
    events of each revision come one per key, sorted by key."""
    with scratch(tmp_path_factory) as new:
        db = new()
        _feed(db, commands, 0)
        model: dict[str, KV] = {}
        revisions: list[int] = []
        events = history(db, 1)
        for e in events:
            revisions.append(e["revision"])
            key = e["kv"]["key"]
            if e["type"] == "put":
                old = model.get(key)
                # One event per key per revision: a txn that puts a key twice counts both
                # versions; one that deletes it and puts it again re-creates it.
                if e["kv"]["create_revision"] == e["revision"]:
                    assert e["kv"]["version"] >= 1
                else:
                    assert old is not None
                    assert e["kv"]["create_revision"] == old["create_revision"]
                    assert e["kv"]["version"] >= old["version"] + 1
                model[key] = e["kv"]
            else:
                model.pop(key, None)  # a txn may put and delete a new key
        assert sorted(set(revisions)) == list(range(1, db.revision + 1))
        pairs = [(e["revision"], e["kv"]["key"]) for e in events]
        assert pairs == sorted(set(pairs))
        assert db.range("") == ([model[k] for k in sorted(model)], False, db.revision)


# ---------------------------------------------------------------- reads at past revisions


def _snapshot(db: StateDB) -> dict[str, KV]:
    return {x["key"]: x for x in db.range("")[0]}


def test_reads_at_past_revisions_return_the_state_as_of_then(log: Log) -> None:
    db = log.db
    states: dict[int, dict[str, KV]] = {}

    def step(op: str, **fields: Any) -> None:
        log(op, **fields)
        states[db.revision] = _snapshot(db)

    step("put", key="a", value=b"1")  # 1
    step("put", key="b", value=b"1")  # 2
    step("put", key="a", value=b"2")  # 3
    step("delete", key="a")  # 4
    step("put", key="a", value=b"3")  # 5: re-created
    step(
        "txn",  # 6
        success=[
            {"op": "put", "key": "c", "value": b"c"},
            {"op": "delete", "key": "b"},
            {"op": "put", "key": "a", "value": b"4"},
        ],
    )
    step("delete", prefix="")  # 7: a and c
    step("put", key="b", value=b"2")  # 8: re-created
    assert db.revision == 8
    assert db.get("a", revision=3) == (kv("a", b"2", 1, 3, 2), 8)
    assert db.get("a", revision=4) == (None, 8)  # deleted at that revision
    assert db.get("a", revision=5) == (kv("a", b"3", 5, 5, 1), 8)
    assert db.get("a", revision=6) == (kv("a", b"4", 5, 6, 2), 8)
    assert db.get("b", revision=1) == (None, 8)  # not created yet
    assert db.get("b", revision=6) == (None, 8)
    assert db.get("b", revision=8) == (kv("b", b"2", 8, 8, 1), 8)
    assert db.range("", revision=6) == (
        [kv("a", b"4", 5, 6, 2), kv("c", b"c", 6, 6, 1)],
        False,
        8,
    )
    assert db.range("", revision=7) == ([], False, 8)
    assert db.range("", revision=2, limit=1) == ([kv("a", b"1", 1, 1, 1)], True, 8)
    for r, state in states.items():
        assert db.range("", revision=r)[0] == [state[k] for k in sorted(state)], r
        for key in ("a", "b", "c", "d"):
            assert db.get(key, revision=r)[0] == state.get(key), (r, key)
    assert db.range("", revision=8) == db.range("")  # the history path and the live one


def test_reads_below_the_compaction_point_or_in_the_future_raise(new_db: Dbs) -> None:
    log = Log(new_db(history_revisions=3))
    for i in range(6):
        log("put", key=f"k{i % 2}", value=b"%d" % i)
    db = log.db
    assert db.compact_revision == 3
    for read in (
        lambda: db.get("k0", revision=2),
        lambda: db.range("", revision=1),
        lambda: db.range("k", revision=2, after="k0", limit=1),
    ):
        with pytest.raises(Compacted) as info:
            read()
        assert info.value.compact_revision == 3
    assert db.get("k0", revision=3) == (kv("k0", b"2", 1, 3, 2), 6)
    for read in (lambda: db.get("k0", revision=7), lambda: db.range("", revision=2**63 - 1)):
        with pytest.raises(FutureRevision, match=r"revision \d+ is in the future"):
            read()
    assert issubclass(FutureRevision, ValueError)


def _count(path: Path, where: str = "1") -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM events WHERE {where}").fetchone()[0])


def _meta(path: Path, name: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0])


@pytest.mark.parametrize("step", [None, 1], ids=["whole-steps", "tiny-steps"])
def test_reads_at_the_compaction_revision_after_physical_compaction(
    new_db: Dbs, monkeypatch: pytest.MonkeyPatch, step: int | None
) -> None:
    """History below the compaction point is really deleted, yet every read at or after
    the point answers as before, also while physical compaction lags behind (tiny steps)."""
    if step is not None:
        monkeypatch.setattr(apply_module, "COMPACT_STEP", step)
    rng = random.Random(5)
    db = new_db(history_revisions=20)
    log = Log(db)
    states: dict[int, dict[str, KV]] = {0: {}}
    written = 0
    for i in range(150):
        key = f"k{rng.randrange(5)}"
        if i == 60:  # one jump of the compaction point, far ahead of the physical one
            assert log("compact", revision=db.revision - 1)["revision"] == db.revision
        elif rng.random() < 0.25:
            log("delete", prefix=key if rng.random() < 0.5 else "k")
        else:
            log("put", key=key, value=b"%d" % i)
        written += sum(len(evs) for evs in log.applied[-1].events)
        states[db.revision] = _snapshot(db)
        if step is not None and i == 61:
            assert _meta(db.path, "compacted_to") < db.compact_revision - 10  # it lags
        for r in range(max(1, db.compact_revision), db.revision + 1):  # 0 reads "now"
            assert db.range("", revision=r)[0] == [states[r][k] for k in sorted(states[r])], r
    compact = db.compact_revision
    assert compact == db.revision - 20 and compact > 60
    assert _count(db.path) < written  # rows really were deleted
    if step is None:
        # Below the point, only the newest put of each key then alive survives.
        assert _meta(db.path, "compacted_to") == compact
        assert _count(db.path, f"rev <= {compact}") == len(states[compact])
        assert _count(db.path, f"rev <= {compact} AND value IS NULL") == 0
    for key in ("k0", "k1", "k2", "k3", "k4"):
        assert db.get(key, revision=compact)[0] == states[compact].get(key)
    with pytest.raises(Compacted):
        db.get("k0", revision=compact - 1)


# ---------------------------------------------------------------- the compact op


def test_compact_op(log: Log) -> None:
    db = log.db
    for i in range(5):
        log("put", key="k", value=b"%d" % i)
    assert log("compact", revision=3) == {"revision": 5}
    assert db.compact_revision == 3 and db.revision == 5 and log.applied[-1].events == []
    future = log("compact", revision=6)
    assert future["error"]["code"] == "invalid_request"
    assert "revision 6 is in the future" in future["error"]["message"]
    assert log("compact", revision=2) == {
        "error": {
            "code": "compacted",
            "message": "revisions before 3 are compacted",
            "compact_revision": 3,
        }
    }
    assert log("compact", revision=3) == {"revision": 5}  # at the point: nothing to do
    assert db.compact_revision == 3 and db.revision == 5
    # Watches at or below the point are refused, reads at the point still work.
    for start in (0, 1, 3):
        with pytest.raises(Compacted) as info:
            db.events(start)
        assert info.value.compact_revision == 3
    assert [e["revision"] for e in history(db, 4)] == [4, 5]
    assert db.get("k", revision=3)[0] == kv("k", b"2", 1, 3, 3)
    # Up to the current revision: only new events can be watched.
    assert log("compact", revision=5, session=S1, seq=1) == {"revision": 5}
    with pytest.raises(Compacted):
        db.events(5)
    assert db.events(6) == ([], 5)
    assert db.get("k", revision=5)[0] == kv("k", b"4", 1, 5, 5)
    assert log("compact", revision=5, session=S1, seq=1) == {"revision": 5}  # a retry


def test_automatic_compaction_never_moves_the_point_back(new_db: Dbs) -> None:
    log = Log(new_db(history_revisions=3))
    for i in range(4):
        log("put", key="k", value=b"%d" % i)
    assert log.db.compact_revision == 1
    log("compact", revision=4)
    log("put", key="k", value=b"")
    assert log.db.compact_revision == 4  # not 5 - 3
    for _ in range(3):
        log("put", key="k", value=b"")
    assert log.db.compact_revision == 5


def test_the_compaction_point_survives_reopen(new_db: Dbs) -> None:
    db = new_db()
    log = Log(db)
    for i in range(4):
        log("put", key="k", value=b"%d" % i)
    log("compact", revision=3)
    db.close()
    db = new_db()
    assert db.compact_revision == 3
    with pytest.raises(Compacted):
        db.get("k", revision=2)
    with pytest.raises(Compacted):
        db.events(3)


# ---------------------------------------------------------------- paging with after


def _walk(db: StateDB, prefix: str, limit: int, revision: int = 0) -> tuple[list[KV], int]:
    """Every key-value under ``prefix``, page by page; and the number of pages."""
    out: list[KV] = []
    after: str | None = None
    for pages in range(1, db.key_count() + db.revision + 2):  # more would be a loop
        kvs, more, _ = db.range(prefix, limit=limit, after=after, revision=revision)
        assert len(kvs) <= limit
        assert after is None or all(x["key"] > after for x in kvs)
        out += kvs
        if not more:
            return out, pages
        assert len(kvs) == limit
        after = kvs[-1]["key"]
    raise AssertionError(f"paging {prefix!r} by {limit} does not end")


def test_paging_with_after_visits_every_key_once_in_order(log: Log) -> None:
    inside = [f"p/{i:02d}" for i in range(11)] + ["p/", "p/é", "p/\U0010ffff"]
    outside = ["p", "o", "q", "p0", "p.", "P/x"]
    keys = inside + outside
    random.Random(3).shuffle(keys)
    log.batch([log.command("put", key=k, value=k.encode()) for k in keys])
    db = log.db
    expected = sorted(inside)
    for limit in range(1, len(inside) + 2):
        kvs, pages = _walk(db, "p/", limit)
        assert [x["key"] for x in kvs] == expected, limit
        assert pages == math.ceil(len(inside) / limit), limit
    assert db.range("p/", after="p/\U0010ffff") == ([], False, db.revision)
    assert db.range("p/", after="o") == db.range("p/")  # before the prefix: no effect
    kvs, more, _ = db.range("p/", limit=2, after="p/05")
    assert [(x["key"], x["value"]) for x in kvs] == [("p/06", b"p/06"), ("p/07", b"p/07")]
    assert more is True


def test_paging_with_after_at_a_past_revision(log: Log) -> None:
    keys = [f"k/{i}" for i in range(9)]
    log.batch([log.command("put", key=k, value=b"old") for k in keys])
    db = log.db
    then = db.revision
    before = db.range("k/")[0]
    log("delete", key="k/3")
    log("put", key="k/5", value=b"new")
    log("put", key="k/35", value=b"new")
    log("delete", prefix="k/8")
    log("put", key="k/0", value=b"new")
    for limit in (1, 2, 4, 9):
        assert _walk(db, "k/", limit, revision=then)[0] == before, limit
        now = _walk(db, "k/", limit)[0]
        assert now == db.range("k/")[0], limit
    assert [x["key"] for x in db.range("k/", after="k/2", limit=3, revision=then)[0]] == [
        "k/3",
        "k/4",
        "k/5",
    ]
    assert [x["key"] for x in db.range("k/", after="k/2", limit=3)[0]] == ["k/35", "k/4", "k/5"]


# ---------------------------------------------------------------- events()


def test_events_pages_end_at_whole_revisions_of_about_max_bytes(log: Log) -> None:
    """A page of history holds about max_bytes of values, never a revision cut in two,
    and at least one revision however large: a watch catching up over large values
    reads them a few MiB at a time, not a thousand revisions at once."""
    db = log.db
    log("put", key="a", value=b"x" * 100)  # 1
    log("txn", success=[{"op": "put", "key": k, "value": b"y" * 100} for k in "bcd"])  # 2
    log("put", key="e", value=b"z" * 1000)  # 3
    log("put", key="f", value=b"w")  # 4
    everything = history(db, 1)
    got: list[Event] = []
    start, lasts = 1, []
    while start <= db.revision:
        events, last = db.events(start, max_bytes=150)
        assert events and all(start <= e["revision"] <= last for e in events)
        got += events
        lasts.append(last)
        start = last + 1
    assert got == everything
    assert lasts == [2, 3, 4]  # 100 + the txn's 300 (kept whole); 1000 alone; then the rest


def test_events_pages_filters_and_last_revision_covered(log: Log) -> None:
    db = log.db
    log("put", key="a", value=b"1")  # 1
    log("put", key="b/1", value=b"1")  # 2
    log(  # 3
        "txn",
        success=[
            {"op": "put", "key": "c", "value": b"c"},
            {"op": "put", "key": "b/2", "value": b"2"},
            {"op": "delete", "key": "b/1"},
            {"op": "put", "key": "a", "value": b"2"},
            {"op": "put", "key": "a", "value": b"3"},
        ],
    )
    log("delete", prefix="b/")  # 4
    log("put", key="a", value=b"4")  # 5
    everything = history(db, 1)
    # The txn: one event per key, its last state, sorted by key.
    assert [e for e in everything if e["revision"] == 3] == [
        {"type": "put", "kv": kv("a", b"3", 1, 3, 3), "revision": 3},
        tombstone("b/1", 3),
        {"type": "put", "kv": kv("b/2", b"2", 3, 3, 1), "revision": 3},
        {"type": "put", "kv": kv("c", b"c", 3, 3, 1), "revision": 3},
    ]
    # Pages of at most max_revisions revisions, each read on from the last covered.
    for size in (1, 2, 3, 5, 6):
        got: list[Event] = []
        start, pages = 1, 0
        while start <= db.revision:
            events, last = db.events(start, max_revisions=size)
            assert last == min(start + size - 1, db.revision)
            assert all(start <= e["revision"] <= last for e in events)
            got += events
            start, pages = last + 1, pages + 1
        assert got == everything and pages == math.ceil(5 / size), size
    # Filters: the revisions covered do not depend on what matched.
    assert db.events(1, key="a", max_revisions=2) == (
        [{"type": "put", "kv": kv("a", b"1", 1, 1, 1), "revision": 1}],
        2,
    )
    assert [e["revision"] for e in db.events(1, key="a")[0]] == [1, 3, 5]
    assert db.events(4, key="a", max_revisions=1) == ([], 4)
    assert brief(db.events(1, prefix="b/")[0]) == [
        ("put", "b/1", 2),
        ("delete", "b/1", 3),
        ("put", "b/2", 3),
        ("delete", "b/2", 4),
    ]
    assert db.events(1, prefix="b/", max_revisions=2) == (
        [{"type": "put", "kv": kv("b/1", b"1", 2, 2, 1), "revision": 2}],
        2,
    )
    assert db.events(1, prefix="zz") == ([], 5)
    assert db.events(1, prefix="") == (everything, 5)
    assert db.events(2, end=3) == ([e for e in everything if e["revision"] in (2, 3)], 3)
    assert db.events(3, end=2) == ([], 2)
    assert db.events(6) == ([], 5) and db.events(9, key="a") == ([], 8)


# ---------------------------------------------------------------- determinism, random streams

_RANDOM_KEYS = ["a", "a/1", "a/2", "b", "é", "\U0010ffff"]
_RANDOM_PREFIXES = ["", "a", "a/", "b", "z"]


def _random_command(rng: random.Random, index: int) -> dict[str, Any]:
    def op(in_txn: bool) -> dict[str, Any]:
        roll = rng.random()
        key = rng.choice(_RANDOM_KEYS)
        if roll < 0.45:
            return {"op": "put", "key": key, "value": rng.randbytes(rng.randrange(3))}
        if roll < 0.6:
            return {"op": "delete", "key": key}
        if roll < 0.7:
            return {"op": "delete", "prefix": rng.choice(_RANDOM_PREFIXES)}
        if in_txn and roll < 0.85:
            return {"op": "get", "key": key}
        if in_txn:
            return {
                "op": "range",
                "prefix": rng.choice(_RANDOM_PREFIXES),
                "limit": rng.randrange(3),
            }
        return {"op": "compact", "revision": rng.randrange(index + 2)}

    if rng.random() < 0.2:
        compares = [
            cmp(rng.choice(_RANDOM_KEYS), "version", rng.choice("<>"), rng.randrange(4))
            for _ in range(rng.randrange(3))
        ]
        return {
            "op": "txn",
            "compare": compares,
            "success": [op(True) for _ in range(rng.randrange(4))],
            "failure": [op(True) for _ in range(rng.randrange(3))],
        }
    return op(False)


def random_entries(rng: random.Random, n: int) -> list[Entry]:
    """A stream of entries: mostly commands (some in sessions, some retries), with NOOP
    and CONFIG entries and junk among them; leader clocks that mostly advance."""
    entries = []
    time_ms = 0
    for index in range(1, n + 1):
        roll = rng.random()
        if roll < 0.05:
            entries.append(Entry(index, 1, EntryKind.NOOP, b""))
        elif roll < 0.08:
            entries.append(Entry(index, 1, EntryKind.CONFIG, rng.randbytes(6)))
        elif roll < 0.1:
            entries.append(Entry(index, 1, EntryKind.NORMAL, rng.randbytes(rng.randrange(8))))
        else:
            time_ms = max(0, time_ms + rng.randrange(-20, 60))
            cmd = _random_command(rng, index)
            if rng.random() < 0.4:
                cmd |= {"session": rng.choice([S1, S2, S3]), "seq": rng.randrange(12)}
            cmd["time_ms"] = time_ms
            entries.append(Entry(index, 1, EntryKind.NORMAL, encode_command(cmd)))
    return entries


def _feed_in_batches(
    db: StateDB, entries: Sequence[Entry], rng: random.Random, max_batch: int
) -> tuple[list[Result | None], dict[int, str]]:
    """Apply ``entries`` cut into batches of 1..max_batch; the results, and the digest
    after each batch by applied index."""
    results: list[Result | None] = []
    digests: dict[int, str] = {}
    i = 0
    while i < len(entries):
        n = rng.randint(1, max_batch)
        results += db.apply(entries[i : i + n]).results
        i += n
        digests[db.applied] = db.digest()
    return results, digests


@pytest.mark.parametrize("seed", [101, 202, 303])
@pytest.mark.parametrize("limits", [SMALL, {}], ids=["small-limits", "default-limits"])
def test_random_streams_agree_whatever_the_batching(
    new_db: Dbs, seed: int, limits: dict[str, int]
) -> None:
    entries = random_entries(random.Random(seed), 300)
    kinds = {e.kind for e in entries}
    assert {EntryKind.NOOP, EntryKind.CONFIG} <= kinds, f"seed {seed}"
    runs = [
        _feed_in_batches(new_db(f"{name}.db", **limits), entries, random.Random(seed + n), n)
        for name, n in (("single", 1), ("small", 4), ("large", 25))
    ]
    single_results, single = runs[0]
    assert len(single) == len(entries)
    for results, digests in runs[1:]:
        assert results == single_results, f"seed {seed}: results differ"
        assert len(digests) > 5, f"seed {seed}"
        for index, digest in digests.items():
            assert digest == single[index], f"seed {seed}: digests differ after entry {index}"
    dbs = new_db.opened
    for other in dbs[1:]:
        assert reads(other) == reads(dbs[0]), f"seed {seed}"
    whole = new_db("whole.db", **limits)
    assert whole.apply(entries).results == single_results, f"seed {seed}"
    assert whole.digest() == single[len(entries)], f"seed {seed}"


def test_a_failing_command_is_an_internal_error_for_that_entry_only(
    new_db: Dbs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug that raises while applying one command (here: ``_put`` of the key "bad")
    rolls back that command alone; the rest of the batch applies, and every replica
    answers alike whatever its batching."""

    def buggy(db: StateDB) -> StateDB:
        real, real_buffered = db._applier._put, db._applier._put_buffered

        def _put(key: str, value: bytes, rev: int, lease: int | None = None) -> None:  # in a txn
            if key == "bad":
                raise RuntimeError(f"bug at revision {rev}")
            real(key, value, rev, lease)

        def _put_buffered(key: str, value: bytes, rows: list[EventRow]) -> dict[str, int]:
            if key == "bad":
                raise RuntimeError(f"bug at revision {db._applier.revision + 1}")
            return real_buffered(key, value, rows)

        monkeypatch.setattr(db._applier, "_put", _put)
        monkeypatch.setattr(db._applier, "_put_buffered", _put_buffered)
        return db

    log = Log(new_db("source.db"))
    commands = [
        log.command("put", key="a", value=b"1"),
        log.command(  # writes c, then fails: c must not stay
            "txn",
            success=[
                {"op": "put", "key": "c", "value": b""},
                {"op": "put", "key": "bad", "value": b""},
            ],
        ),
        log.command("put", key="bad", value=b"", session=S1, seq=1, time_ms=5_000),
        log.command("put", key="d", value=b"", session=S1, seq=2),
        log.command("delete", key="a"),
    ]
    entries = [Entry(i, 1, EntryKind.NORMAL, data) for i, data in enumerate(commands, 1)]
    whole = buggy(new_db("whole.db"))
    applied = whole.apply(entries)
    assert applied.results == [
        {"revision": 1},
        {
            "error": {
                "code": "internal",
                "message": "applying entry 2 failed: RuntimeError('bug at revision 2')",
            }
        },
        {
            "error": {
                "code": "internal",
                "message": "applying entry 3 failed: RuntimeError('bug at revision 2')",
            }
        },
        {"revision": 2},
        {"deleted": 1, "revision": 3},
    ]
    assert [brief(evs) for evs in applied.events] == [
        [("put", "a", 1)],
        [("put", "d", 2)],
        [("delete", "a", 3)],
    ]
    assert whole.applied == 5 and whole.revision == 3
    assert [x["key"] for x in whole.range("")[0]] == ["d"]
    one_by_one = buggy(new_db("single.db"))
    assert [r for e in entries for r in one_by_one.apply([e]).results] == applied.results
    pairs = buggy(new_db("pairs.db"))
    assert pairs.apply(entries[:2]).results + pairs.apply(entries[2:]).results == applied.results
    assert whole.digest() == one_by_one.digest() == pairs.digest()
    # The failed command was not recorded in its session: once fixed, a retry applies.
    monkeypatch.undo()
    retry = Entry(6, 1, EntryKind.NORMAL, commands[2])
    for db in (whole, one_by_one, pairs):
        assert db.apply([retry]).results == [{"revision": 4}]
    assert whole.digest() == one_by_one.digest() == pairs.digest()


def test_a_failure_after_the_write_leaves_no_trace(
    log: Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command that fails once its write is done (here: recording its session result)
    leaves no revision or session behind: the next write takes the next revision and
    the history has no gap. (Log time is the entry's, so it moves on all the same.)"""
    db = log.db
    real = db._sessions.record

    def record(session: bytes, *args: Any) -> None:
        if session == S2:
            raise RuntimeError("bug")
        real(session, *args)

    monkeypatch.setattr(db._sessions, "record", record)
    log("put", key="a", value=b"1", session=S1, seq=1)
    applied = log.batch(
        [
            log.command("put", key="a", value=b"2", session=S2, seq=1, time_ms=9_000),
            log.command("put", key="b", value=b"1", time_ms=2_000),
        ]
    )
    assert applied.results[0] is not None and applied.results[0]["error"]["code"] == "internal"
    assert applied.results[1] == {"revision": 2}
    assert db.revision == 2 and db.log_time_ms == 9_000 and db.session_count == 1
    assert db.get("a")[0] == kv("a", b"1", 1, 1, 1)
    assert brief(history(db, 1)) == [("put", "a", 1), ("put", "b", 2)]
    assert log("put", key="c", value=b"", session=S1, seq=2) == {"revision": 3}


# ---------------------------------------------------------------- sessions, more


def test_a_session_expires_by_log_time_then_an_old_seq_applies_again(new_db: Dbs) -> None:
    limits = {"session_ttl_ms": 1_000}
    log = Log(new_db(**limits), time_ms=0)
    assert log("put", key="k", value=b"1", session=S1, seq=7, time_ms=100) == {"revision": 1}
    # Log time moves with the commands; S1 is still known 999 ms of log time later.
    assert log("put", key="k", value=b"2", session=S1, seq=7, time_ms=1_099) == {"revision": 1}
    assert log.db.get("k")[0] == kv("k", b"1", 1, 1, 1)
    # A new seq uses the session: it lives until log time 1_099 + 1_000.
    assert log("put", key="j", value=b"", session=S1, seq=8) == {"revision": 2}
    log.db.close()
    # Expiry follows the time in the commands, whatever the wall clock at reopen.
    log = Log(new_db(**limits), time_ms=1_099)
    assert log.db.session_count == 1 and log.db.log_time_ms == 1_099
    log("put", key="x", value=b"", time_ms=2_098)
    assert log.db.session_count == 1
    log("put", key="x", value=b"", time_ms=50)  # a slow leader's clock changes nothing
    log("put", key="x", value=b"", time_ms=2_099)
    assert log.db.session_count == 0 and log.db.log_time_ms == 2_099
    # Expired: the old seq is a new write now.
    assert log("put", key="k", value=b"2", session=S1, seq=7) == {"revision": 6}
    assert log.db.get("k")[0] == kv("k", b"2", 1, 6, 2)
    assert log.db.session_count == 1


def test_the_least_recently_used_session_is_evicted_across_reopen(new_db: Dbs) -> None:
    limits = {"max_sessions": 3}
    log = Log(new_db(**limits))
    first = {s: log("put", key="k", value=s, session=s, seq=1) for s in (S1, S2, S3)}
    log("put", key="k", value=b"", session=S1, seq=2)  # S1 used again: S2 is the LRU
    log.db.close()
    log = Log(new_db(**limits))
    assert log.db.session_count == 3
    s4 = b"\x04" * 16
    log("put", key="k", value=b"4", session=s4, seq=1)  # evicts S2
    assert log.db.session_count == 3
    assert log("put", key="k", value=b"", session=S1, seq=1) == first[S1]
    assert log("put", key="k", value=b"", session=S3, seq=1) == first[S3]
    revision = log.db.revision
    # S2 was forgotten: its seq 1 applies again, and evicts S3, now the LRU.
    assert log("put", key="k", value=b"", session=S2, seq=1) == {"revision": revision + 1}
    assert log("put", key="k", value=b"", session=S3, seq=1) == {"revision": revision + 2}
    assert log.db.session_count == 3


def test_results_older_than_the_window_are_refused_across_reopen(new_db: Dbs) -> None:
    limits = {"session_window": 4}
    log = Log(new_db(**limits))
    results = {
        seq: log("put", key="k", value=b"%d" % seq, session=S1, seq=seq) for seq in range(1, 10)
    }
    log.db.close()
    log = Log(new_db(**limits))
    for seq in range(1, 6):  # 9 - 4 and older
        assert log("put", key="k", value=b"", session=S1, seq=seq) == TOO_OLD, seq
    for seq in range(6, 10):
        assert log("put", key="k", value=b"", session=S1, seq=seq) == results[seq], seq
    assert log.db.revision == 9
    # The stored results are bounded by the window.
    with contextlib.closing(sqlite3.connect(log.db.path)) as conn:
        kept = conn.execute("SELECT COUNT(*) FROM session_results").fetchone()[0]
    assert kept <= 2 * 4


# ---------------------------------------------------------------- prefixes


def test_prefix_end_edge_cases() -> None:
    assert prefix_end("") is None  # every key qualifies
    assert prefix_end("a") == "b"
    assert prefix_end("a/") == "a0"
    assert prefix_end("\x00") == "\x01"
    assert prefix_end("é") == "ê"
    assert prefix_end("\U0010ffff") is None  # nothing follows the last character
    assert prefix_end("\U0010ffff\U0010ffff") is None
    assert prefix_end("a\U0010ffff") == "b"
    assert prefix_end("ab\U0010ffff\U0010ffff") == "ac"
    assert prefix_end("\ud7ff") == "\ue000"  # the surrogates are skipped
    assert prefix_end("x\ud7ff") == "x\ue000"
    assert prefix_end("\uffff") == "\U00010000"


_ALPHABET = ["a", "b", "\x00", "é", "\ud7ff", "\ue000", "\uffff", "\U0010ffff"]
_short_keys = st.text(alphabet=st.sampled_from(_ALPHABET), min_size=1, max_size=4)
_short_prefixes = st.text(alphabet=st.sampled_from(_ALPHABET), max_size=3)


@settings(max_examples=300, deadline=None)
@given(prefix=_short_prefixes, key=_short_keys)
def test_prefix_end_bounds_exactly_the_keys_under_the_prefix(prefix: str, key: str) -> None:
    """In code points (Python) and in UTF-8 bytes (SQLite) alike."""
    end = prefix_end(prefix)
    assert key.startswith(prefix) == (prefix <= key and (end is None or key < end))
    raw, lo = key.encode(), prefix.encode()
    assert key.startswith(prefix) == (lo <= raw and (end is None or raw < end.encode()))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keys=st.lists(_short_keys, max_size=25),
    prefixes=st.lists(_short_prefixes, min_size=1, max_size=4),
    limit=st.integers(1, 4),
)
def test_range_over_a_prefix_never_leaves_it(
    tmp_path_factory: pytest.TempPathFactory, keys: list[str], prefixes: list[str], limit: int
) -> None:
    with scratch(tmp_path_factory) as new:
        log = Log(new())
        db = log.db
        model: dict[str, bytes] = {}
        commands = []
        for i, key in enumerate(keys):
            model[key] = b"%d" % i
            commands.append(log.command("put", key=key, value=model[key]))
        log.batch(commands)
        then, before = db.revision, dict(model)
        # Delete under the first prefix (unless it is "": keep something to read).
        doomed = [k for k in model if k.startswith(prefixes[0])] if prefixes[0] else []
        if prefixes[0]:
            assert log("delete", prefix=prefixes[0])["deleted"] == len(doomed)
        for k in doomed:
            del model[k]
        for prefix in prefixes:
            for state, revision in ((model, 0), (before, then)):
                want = sorted(k for k in state if k.startswith(prefix))
                kvs, more, _ = db.range(prefix, revision=revision)
                assert [x["key"] for x in kvs] == want and not more
                assert [x["value"] for x in kvs] == [state[k] for k in want]
                paged, _ = _walk(db, prefix, limit, revision=revision)
                assert paged == kvs
            # Watches on the prefix too: exactly the events of keys under it.
            assert db.events(1, prefix=prefix)[0] == [
                e for e in history(db, 1) if e["kv"]["key"].startswith(prefix)
            ]


# ---------------------------------------------------------------- batch entries
#
# The writes of one client message are ONE log entry, ``{"batch": [cmd, ...], "time_ms"}``
# (``liferaft.kv.commands.encode_batch``); its result is a list, one result per command,
# and each command is answered as if it were alone (docs/client-protocol.md, "Messages").


def _writes(log: Log, *cmds: Any) -> list[Result]:
    """Apply ``cmds`` (commands without ``time_ms``) as ONE batch entry; their results."""
    (result,) = log.batch([encode_batch(list(cmds), time_ms=log.time_ms)]).results
    assert isinstance(result, list) and len(result) == len(cmds), result
    return result


def _bad(result: Result) -> bool:
    return (
        result.get("error", {}).get("code") == "invalid_request"
        and result["error"]["message"].startswith("bad command: ")
        and set(result) == {"error"}
    )


def test_a_bad_command_in_a_batch_is_answered_alone_and_the_good_ones_apply(
    log: Log, new_db: Dbs
) -> None:
    db = log.db
    log("put", key="a", value=b"0")  # revision 1
    good: dict[int, dict[str, Any]] = {
        0: {"op": "put", "key": "x", "value": b"1"},
        5: {"op": "put", "key": "x", "value": b"2"},
        9: {"op": "delete", "key": "a"},
        11: {"op": "txn", "success": [{"op": "put", "key": "t", "value": b"t"}]},
        15: {"op": "put", "key": "x", "value": b"3", "session": S1, "seq": 1},
    }
    bad: dict[int, object] = {
        1: {"op": "put", "key": "y", "value": "text, not bytes"},
        2: {"op": "put", "key": 7, "value": b""},
        3: {"op": "put", "key": "z", "value": b"", "colour": "red"},  # unknown field
        4: {"op": "get", "key": "x"},  # not a write
        6: {"op": "put", "key": "", "value": b""},  # empty key
        7: {"op": "put", "key": "w", "value": b"", "id": 5},  # a request id in the log
        8: {"op": "put", "key": "v", "value": b"", "time_ms": 5},  # time_ms is the entry's
        10: {"op": "delete", "key": "x", "prefix": ""},  # key and prefix
        12: {"op": "txn", "success": [{"op": "put", "key": "", "value": b""}]},
        13: "not a map",
        14: {"op": "put", "key": "s", "value": b"", "session": b"short", "seq": 1},
        16: {"op": "compact", "revision": -1},
        17: {"op": "put", "key": "k" * 4097, "value": b""},  # too large
        18: {"op": "put", "key": "q", "value": b"", "session": S2},  # no seq
    }
    cmds = [good[i] if i in good else bad[i] for i in range(len(good) + len(bad))]
    results = _writes(log, *cmds)
    for i in bad:
        assert _bad(results[i]), (i, results[i])
    assert [results[i] for i in sorted(good)] == [
        {"revision": 2},
        {"revision": 3},
        {"deleted": 1, "revision": 4},
        {"succeeded": True, "results": [{"revision": 5}], "revision": 5},
        {"revision": 6},
    ]
    assert db.revision == 6 and db.applied == 2
    assert [x["key"] for x in db.range("")[0]] == ["t", "x"]
    assert db.get("x")[0] == kv("x", b"3", 2, 6, 3)
    assert [brief(evs) for evs in log.applied[-1].events] == [
        [("put", "x", 2)],
        [("put", "x", 3)],
        [("delete", "a", 4)],
        [("put", "t", 5)],
        [("put", "x", 6)],
    ]
    # Exactly the keys and history of a database that saw the good commands alone in the
    # batch (the digest would differ in the session's ``used``: its place in the batch).
    ref = Log(new_db("ref.db"))
    ref("put", key="a", value=b"0")
    assert _writes(ref, *(good[i] for i in sorted(good))) == [results[i] for i in sorted(good)]
    assert history(ref.db, 1) == history(db, 1) and ref.db.range("") == db.range("")


@pytest.mark.parametrize(
    "entry",
    [
        {"batch": {"op": "put", "key": "a", "value": b"1"}, "time_ms": 5},  # not a list
        {"batch": None, "time_ms": 5},
        {"batch": [], "time_ms": 5},  # empty
        {"batch": [{"op": "put", "key": "a", "value": b"1"}], "time_ms": 5, "extra": 1},
        {"batch": [{"op": "put", "key": "a", "value": b"1"}]},  # no time_ms
        {"batch": [{"op": "put", "key": "a", "value": b"1"}], "time_ms": -1},
        {"batch": [{"op": "put", "key": "a", "value": b"1"}], "time_ms": True},
        {"batch": [{"op": "put", "key": "a", "value": b"1"}], "time_ms": 2**63},
        [{"batch": [{"op": "put", "key": "a", "value": b"1"}], "time_ms": 5}],  # not a map
    ],
    ids=[
        "batch-not-a-list",
        "batch-null",
        "batch-empty",
        "extra-field",
        "no-time-ms",
        "negative-time-ms",
        "bool-time-ms",
        "time-ms-too-large",
        "entry-not-a-map",
    ],
)
def test_a_malformed_batch_is_one_error_and_applies_nothing(
    log: Log, new_db: Dbs, entry: object
) -> None:
    db = log.db
    log("put", key="b", value=b"0", session=S1, seq=1, time_ms=1_000)
    before = reads(db)
    result = log.entry(data=cbor2.dumps(entry))
    assert isinstance(result, dict) and _bad(result), result  # one error, not a list
    assert log.applied[-1].rows == [] and log.applied[-1].events == []
    assert db.get("a") == (None, 1)
    assert reads(db) == (2, *before[1:])  # only the applied index moved
    # Exactly the state of a database that saw a NOOP instead.
    ref = Log(new_db("ref.db"))
    ref("put", key="b", value=b"0", session=S1, seq=1, time_ms=1_000)
    ref.entry(EntryKind.NOOP)
    assert db.digest() == ref.db.digest()


def test_a_session_retry_inside_one_batch_gets_the_first_result_and_applies_once(
    log: Log,
) -> None:
    db = log.db
    txn: dict[str, Any] = {
        "op": "txn",
        "compare": [cmp("a", "version", "==", 1)],
        "success": [{"op": "put", "key": "t", "value": b"once"}, {"op": "get", "key": "a"}],
        "failure": [{"op": "put", "key": "f", "value": b""}],
    }
    results = _writes(
        log,
        {"op": "put", "key": "a", "value": b"first", "session": S1, "seq": 1},  # 1
        {"op": "put", "key": "b", "value": b""},  # 2
        {"op": "put", "key": "a", "value": b"retry", "session": S1, "seq": 1},
        {**txn, "session": S1, "seq": 2},  # 3: sees a at version 1
        {"op": "put", "key": "a", "value": b"moved"},  # 4: a at version 2 now
        {**txn, "session": S1, "seq": 2},  # a retry: the first result, not the failure
        {"op": "delete", "prefix": "", "session": S1, "seq": 3},  # 5
        {"op": "delete", "prefix": "", "session": S1, "seq": 3},
    )
    first_txn = {
        "succeeded": True,
        "results": [{"revision": 3}, {"kv": kv("a", b"first", 1, 1, 1), "revision": 3}],
        "revision": 3,
    }
    assert results == [
        {"revision": 1},
        {"revision": 2},
        {"revision": 1},
        first_txn,
        {"revision": 4},
        first_txn,
        {"deleted": 3, "revision": 5},
        {"deleted": 3, "revision": 5},
    ]
    assert db.revision == 5 and db.key_count() == 0
    assert db.get("a", revision=4)[0] == kv("a", b"moved", 1, 4, 2)  # "retry" never written
    assert db.get("f", revision=4)[0] is None  # the retried txn did not run again
    assert brief(history(db, 1)) == [
        ("put", "a", 1),
        ("put", "b", 2),
        ("put", "t", 3),
        ("put", "a", 4),
        ("delete", "a", 5),
        ("delete", "b", 5),
        ("delete", "t", 5),
    ]
    # Later retries, in another entry, get the same first results.
    again = _writes(
        log,
        {"op": "put", "key": "a", "value": b"late", "session": S1, "seq": 1},
        {**txn, "session": S1, "seq": 2},
    )
    assert again == [{"revision": 1}, first_txn] and db.revision == 5


def test_two_sessions_in_one_batch_are_both_remembered_across_reopen(new_db: Dbs) -> None:
    """Each session of a batch keeps its results: a retry after a restart (or on a
    replica that installed this database as a snapshot) must not apply again."""
    log = Log(new_db())
    assert _writes(
        log,
        {"op": "put", "key": "a", "value": b"1", "session": S1, "seq": 1},
        {"op": "put", "key": "b", "value": b"1", "session": S2, "seq": 1},
    ) == [{"revision": 1}, {"revision": 2}]
    assert log.db.session_count == 2
    log.db.close()
    log = Log(new_db())
    assert log.db.session_count == 2
    assert _writes(
        log,
        {"op": "put", "key": "a", "value": b"1", "session": S1, "seq": 1},
        {"op": "put", "key": "b", "value": b"1", "session": S2, "seq": 1},
    ) == [{"revision": 1}, {"revision": 2}]
    assert log.db.revision == 2


def test_the_same_key_put_twice_in_one_batch_counts_two_versions(log: Log) -> None:
    db = log.db
    log("put", key="old", value=b"0")  # 1
    results = _writes(
        log,
        {"op": "put", "key": "new", "value": b"1"},  # 2
        {"op": "put", "key": "old", "value": b"1"},  # 3
        {"op": "put", "key": "new", "value": b"2"},  # 4
        {"op": "put", "key": "old", "value": b"2"},  # 5
    )
    assert results == [{"revision": r} for r in (2, 3, 4, 5)]
    assert db.get("new")[0] == kv("new", b"2", 2, 4, 2)
    assert db.get("old")[0] == kv("old", b"2", 1, 5, 3)
    assert db.get("new", revision=2)[0] == kv("new", b"1", 2, 2, 1)
    assert db.get("old", revision=4)[0] == kv("old", b"1", 1, 3, 2)
    put = "put"
    expected: list[list[Event]] = [
        [{"type": put, "kv": kv("new", b"1", 2, 2, 1), "revision": 2}],
        [{"type": put, "kv": kv("old", b"1", 1, 3, 2), "revision": 3}],
        [{"type": put, "kv": kv("new", b"2", 2, 4, 2), "revision": 4}],
        [{"type": put, "kv": kv("old", b"2", 1, 5, 3), "revision": 5}],
    ]
    assert log.applied[-1].events == expected
    assert log.applied[-1].rows == [
        ("new", 2, 2, 1, b"1"),
        ("old", 3, 1, 2, b"1"),
        ("new", 4, 2, 2, b"2"),
        ("old", 5, 1, 3, b"2"),
    ]
    assert history(db, 2) == [e for evs in expected for e in evs]


def test_a_txn_in_a_batch_sees_the_puts_before_it_and_the_puts_after_see_it(
    log: Log, new_db: Dbs
) -> None:
    db = log.db
    cmds: list[dict[str, Any]] = [
        {"op": "put", "key": "a", "value": b"1"},  # 1
        {"op": "put", "key": "a", "value": b"2"},  # 2
        {
            "op": "txn",  # 3: holds only if it sees both puts
            "compare": [cmp("a", "value", "==", b"2"), cmp("a", "version", "==", 2)],
            "success": [
                {"op": "get", "key": "a"},
                {"op": "put", "key": "b", "value": b"from txn"},
                {"op": "put", "key": "a", "value": b"3"},
                {"op": "delete", "key": "c"},
            ],
            "failure": [{"op": "put", "key": "failed", "value": b""}],
        },
        {"op": "put", "key": "b", "value": b"after"},  # 4: b exists, created by the txn
        {"op": "put", "key": "a", "value": b"4"},  # 5: a at version 4
        {"op": "put", "key": "c", "value": b"c"},  # 6
        {"op": "delete", "key": "c"},  # 7
        {"op": "put", "key": "c", "value": b"again"},  # 8: re-created, version 1
        {
            "op": "txn",  # 9: sees the re-created c and b's second put
            "compare": [cmp("c", "create_revision", "==", 8), cmp("b", "version", "==", 2)],
            "success": [{"op": "range", "prefix": ""}],
            "failure": [],
        },
    ]
    results = _writes(log, *cmds)
    assert results[2] == {
        "succeeded": True,
        "results": [
            {"kv": kv("a", b"2", 1, 2, 2), "revision": 3},
            {"revision": 3},
            {"revision": 3},
            {"deleted": 0, "revision": 3},
        ],
        "revision": 3,
    }
    assert [results[i] for i in (0, 1, 3, 4, 5, 7)] == [{"revision": r} for r in (1, 2, 4, 5, 6, 8)]
    assert results[6] == {"deleted": 1, "revision": 7}
    live = [kv("a", b"4", 1, 5, 4), kv("b", b"after", 3, 4, 2), kv("c", b"again", 8, 8, 1)]
    assert results[8] == {
        "succeeded": True,
        "results": [{"kvs": live, "more": False, "revision": 8}],
        "revision": 8,
    }
    assert db.range("") == (live, False, 8) and db.get("failed")[0] is None
    assert brief(history(db, 1)) == [
        ("put", "a", 1),
        ("put", "a", 2),
        ("put", "a", 3),
        ("put", "b", 3),
        ("put", "b", 4),
        ("put", "a", 5),
        ("put", "c", 6),
        ("delete", "c", 7),
        ("put", "c", 8),
    ]
    # The same as one entry per command (NOOPs after the batch: logs of the same length).
    ref = Log(new_db("ref.db"))
    assert [ref(**c) for c in cmds] == results
    log.batch([(EntryKind.NOOP, b"")] * (len(cmds) - 1))
    assert ref.db.digest() == db.digest()


@st.composite
def _batches(draw: st.DrawFn, sessions: bool) -> list[tuple[int, list[dict[str, Any]]]]:
    """Write commands (without ``time_ms``) cut into batches of 1..6, each with its leader
    clock (mostly advancing); in sessions, some of them, if ``sessions``."""
    ops = st.one_of(_put_op, _delete_op, _txn, _compact_op)
    out = []
    time_ms = 0
    for _ in range(draw(st.integers(1, 12))):
        time_ms = max(0, time_ms + draw(st.integers(-20, 60)))
        cmds = [
            {**draw(ops), **(draw(_session) if sessions else {})}
            for _ in range(draw(st.integers(1, 6)))
        ]
        out.append((time_ms, cmds))
    return out


def _as_batches_and_one_by_one(
    new: Dbs, batches: list[tuple[int, list[dict[str, Any]]]], limits: dict[str, int], name: str
) -> tuple[StateDB, list[Result], StateDB, list[Result]]:
    """Apply ``batches`` to two new databases: as batch entries (each followed by NOOPs,
    so that both logs have the same length) in one ``apply``, and as one entry per
    command, one ``apply`` each. Returns each database with its results, flattened."""
    batched, single = new(f"{name}-batched.db", **limits), new(f"{name}-single.db", **limits)
    entries: list[Entry] = []
    for time_ms, cmds in batches:
        entries.append(
            Entry(len(entries) + 1, 1, EntryKind.NORMAL, encode_batch(cmds, time_ms=time_ms))
        )
        for _ in cmds[1:]:
            entries.append(Entry(len(entries) + 1, 1, EntryKind.NOOP, b""))
    flat: list[Result] = []
    for r in batched.apply(entries).results:
        if r is not None:
            assert isinstance(r, list), r
            flat += r
    one_by_one: list[Result] = []
    index = 0
    for time_ms, cmds in batches:
        for cmd in cmds:
            index += 1
            data = encode_command({**cmd, "time_ms": time_ms})
            (r,) = single.apply([Entry(index, 1, EntryKind.NORMAL, data)]).results
            assert isinstance(r, dict), r
            one_by_one.append(r)
    assert batched.applied == single.applied == index
    return batched, flat, single, one_by_one


@_HYPOTHESIS
@given(batches=_batches(sessions=False))
def test_batch_entries_give_the_same_results_and_digest_as_one_entry_per_command(
    tmp_path_factory: pytest.TempPathFactory, batches: list[tuple[int, list[dict[str, Any]]]]
) -> None:
    with scratch(tmp_path_factory) as new:
        for name, limits in (("small", SMALL), ("default", {})):
            batched, flat, single, one_by_one = _as_batches_and_one_by_one(
                new, batches, limits, name
            )
            assert flat == one_by_one, name
            assert batched.digest() == single.digest(), name
            assert reads(batched) == reads(single), name


@_HYPOTHESIS
@given(batches=_batches(sessions=True))
def test_batch_entries_in_sessions_answer_as_one_entry_per_command(
    tmp_path_factory: pytest.TempPathFactory, batches: list[tuple[int, list[dict[str, Any]]]]
) -> None:
    """With sessions too, every command gets the result it gets alone, and the keys,
    history and counters agree. (Not the digest: a session's ``used`` is the log index
    of its last command, which a batch shares among its commands.)"""
    with scratch(tmp_path_factory) as new:
        for name, limits in (("small", SMALL), ("default", {})):
            batched, flat, single, one_by_one = _as_batches_and_one_by_one(
                new, batches, limits, name
            )
            assert flat == one_by_one, name
            assert reads(batched) == reads(single), name


def test_a_bug_in_one_command_of_a_batch_fails_that_command_alone(
    new_db: Dbs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command that hits a bug is rolled back alone; the others of its batch apply,
    and their answers and state are those of a database that never saw it."""
    db = new_db("a.db")
    real = db._applier._put_buffered

    bug = RuntimeError("bug")

    def _put_buffered(key: str, value: bytes, rows: list[EventRow]) -> dict[str, int]:
        if key == "bad":
            raise bug
        return real(key, value, rows)

    monkeypatch.setattr(db._applier, "_put_buffered", _put_buffered)
    cmds = [{"op": "put", "key": k, "value": b"v"} for k in ("a", "bad", "c")]
    applied = db.apply([Entry(1, 1, EntryKind.NORMAL, encode_batch(cmds, time_ms=1))])
    assert applied.results == [
        [
            {"revision": 1},
            {
                "error": {
                    "code": "internal",
                    "message": "applying entry 1 failed: RuntimeError('bug')",
                }
            },
            {"revision": 2},
        ]
    ]
    ref = new_db("ref.db")
    good = [c for c in cmds if c["key"] != "bad"]
    ref.apply([Entry(1, 1, EntryKind.NORMAL, encode_batch(good, time_ms=1))])
    assert db.digest() == ref.digest()


def test_physical_compaction_keeps_up_with_batches_of_many_writes(new_db: Dbs) -> None:
    """Each run compacts at least as many revisions as it wrote, so the history table
    stays near ``history_revisions`` rows however many writes an entry carries."""
    db = new_db("a.db", history_revisions=100)
    index = 0
    for _ in range(10):
        entries = []
        for _ in range(8):
            index += 1
            cmds = [{"op": "put", "key": f"k{n}", "value": b""} for n in range(1024)]
            entries.append(Entry(index, 1, EntryKind.NORMAL, encode_batch(cmds, time_ms=1)))
        db.apply(entries)
    assert db.revision == 81920 and db.compact_revision == 81820
    with db.reader() as conn:
        rows = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    assert rows <= 1024 + 100 + 4096  # newest rows of each key, recent history, one step


def test_restart_wal_starts_the_wal_over_under_continuous_writes(new_db: Dbs) -> None:
    """A PASSIVE checkpoint never catches a writer that keeps writing, so the WAL would
    grow without bound; restart_wal, between two applies, starts it over: the writes
    after it fill the WAL from its first frame again."""
    db = new_db("a.db")
    index = 0

    def write(n: int) -> None:
        nonlocal index
        index += 1
        cmds = [{"op": "put", "key": f"k{index}/{i}", "value": b"v" * 100} for i in range(n)]
        db.apply([Entry(index, 1, EntryKind.NORMAL, encode_batch(cmds, time_ms=1))])

    def wal_frames() -> int:
        conn = sqlite3.connect(db.path)
        try:
            return int(conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])
        finally:
            conn.close()

    write(2000)
    # A reader that started on the WAL keeps it from being started over by the next
    # write (as readers and writers that never pause do), checkpointed or not: it grows.
    with db.reader() as conn:
        conn.execute("SELECT COUNT(*) FROM kv").fetchall()
        first = wal_frames()
        write(2000)
        grown = wal_frames()
    assert grown > first
    assert db.restart_wal() == 0
    write(1)
    assert 0 < wal_frames() < first


def test_restart_wal_does_not_wait_for_a_reader_and_leaves_the_busy_timeout_as_it_was(
    new_db: Dbs,
) -> None:
    """A reader on the WAL (a backup, a long range) makes restart_wal report "not now"
    instead of holding the writer's turn until the reader ends; the next call restarts."""
    db = new_db("a.db")
    cmds = [{"op": "put", "key": f"k{i}", "value": b"v" * 100} for i in range(500)]
    db.apply([Entry(1, 1, EntryKind.NORMAL, encode_batch(cmds, time_ms=1))])
    with db.reader() as conn:
        conn.execute("SELECT COUNT(*) FROM kv").fetchone()
        assert db.restart_wal() > 0  # busy: frames left where they are
    assert db.restart_wal() == 0
    assert db._w.execute("PRAGMA busy_timeout").fetchone()[0] == 5000


# ---------------------------------------------------------------- damage on disk


@pytest.mark.parametrize("cut_pages", [1, 3, 50])
def test_a_truncated_state_database_is_refused_at_open(tmp_path: Path, cut_pages: int) -> None:
    """A state.db cut short (a bad copy, a full disk during a checkpoint) is refused when
    it is opened, never read as if the missing pages held nothing."""
    path = tmp_path / "state.db"
    db = StateDB.open(path)
    log = Log(db)
    for i in range(300):
        log("put", key=f"k{i}", value=b"x" * 2000)
    db.checkpoint()
    db.restart_wal()
    db.close()
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 4096 * cut_pages)
    with pytest.raises(StateCorrupt, match="malformed"):
        StateDB.open(path).close()


def test_a_torn_wal_tail_of_the_state_database_reopens_to_an_earlier_applied_index(
    tmp_path: Path,
) -> None:
    """state.db commits without fsync (the raft log is the durable record): a power cut
    may leave its WAL torn. SQLite ignores the WAL from the first incomplete frame, so
    the database reopens whole at an earlier applied index, never half-applied, and the
    node applies the rest again from its log (compacted only up to what state.db has
    fsynced: docs/storage.md)."""
    path = tmp_path / "state.db"
    db = StateDB.open(path)
    log = Log(db)
    for i in range(20):
        log("put", key=f"k{i}", value=b"x" * 3000)
    db.sync()
    digests = {db.applied: db.digest()}
    for i in range(20, 40):
        log("put", key=f"k{i}", value=b"y" * 3000)
        digests[db.applied] = db.digest()
    final = db.applied
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("state.db", "state.db-wal"):  # what a crash leaves: no wal-index
        shutil.copyfile(tmp_path / name, copy / name)
    db.close()
    torn = copy / "state.db-wal"
    with torn.open("r+b") as f:
        f.truncate(torn.stat().st_size - 5000)  # the last frames, part of one of them
    reopened = StateDB.open(copy / "state.db")
    try:
        assert 20 <= reopened.applied < final
        assert reopened.digest() == digests[reopened.applied]  # a whole, earlier state
    finally:
        reopened.close()
