"""Leases in the state machine (docs/coordination.md): grant, keys put with a lease,
revoke deleting every key of the lease at one revision, a put without a lease or a
delete taking the key off its lease, checkpoints, the caps, and determinism."""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from liferaft.core import Entry, EntryKind
from liferaft.kv import apply as apply_module
from liferaft.kv.commands import encode_batch
from liferaft.kv.schema import SCHEMA_VERSION
from liferaft.kv.state import StateDB


class Log:
    """Appends batch entries to a StateDB, one entry per call."""

    def __init__(self, db: StateDB) -> None:
        self.db = db
        self.index = itertools.count(db.applied + 1)
        self.time_ms = 1_000_000

    def run(self, *cmds: dict[str, Any]) -> tuple[list[dict[str, Any]], Any]:
        entry = Entry(
            next(self.index), 1, EntryKind.NORMAL, encode_batch(list(cmds), time_ms=self.time_ms)
        )
        out = self.db.apply([entry])
        results = out.results[0]
        assert isinstance(results, list)
        return results, out

    def one(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return self.run(cmd)[0][0]


def open_db(tmp_path: Path, name: str = "state.db") -> tuple[StateDB, Log]:
    db = StateDB.open(tmp_path / name)
    return db, Log(db)


def test_a_revoke_deletes_every_key_of_the_lease_at_one_revision_with_delete_events(
    tmp_path: Path,
) -> None:
    db, log = open_db(tmp_path)
    granted = log.one({"op": "lease_grant", "ttl": 10})
    lease = granted["lease"]
    assert granted["ttl"] == 10 and lease > 0
    for k in ("a", "b", "c"):
        assert "error" not in log.one({"op": "put", "key": k, "value": b"1", "lease": lease})
    log.one({"op": "put", "key": "free", "value": b"x"})
    assert db.lease_keys(lease) == ["a", "b", "c"]
    before = db.revision
    results, out = log.run({"op": "lease_revoke", "lease": lease})
    assert results[0]["revision"] == before + 1
    assert [(r[0], r[1], r[4]) for r in out.rows] == [(k, before + 1, None) for k in "abc"]
    assert out.leases == [(lease, None)]
    assert db.get("a")[0] is None and db.get("free")[0] is not None
    assert db.lease(lease) is None and db.lease_keys(lease) == []
    again = log.one({"op": "lease_revoke", "lease": lease})
    assert again["error"]["code"] == "not_found"


def test_an_unknown_lease_is_not_found_and_a_txn_with_one_changes_nothing(
    tmp_path: Path,
) -> None:
    db, log = open_db(tmp_path)
    r = log.one({"op": "put", "key": "k", "value": b"v", "lease": 77})
    assert r["error"]["code"] == "not_found" and db.get("k")[0] is None
    lease = log.one({"op": "lease_grant", "ttl": 5, "lease": 42})["lease"]
    assert lease == 42
    txn = {
        "op": "txn",
        "compare": [],
        "success": [
            {"op": "put", "key": "x", "value": b"1", "lease": 42},
            {"op": "put", "key": "y", "value": b"1", "lease": 43},
        ],
        "failure": [],
    }
    rev = db.revision
    assert log.one(txn)["error"]["code"] == "not_found"
    assert db.get("x")[0] is None and db.revision == rev
    dup = log.one({"op": "lease_grant", "ttl": 5, "lease": 42})
    assert dup["error"]["code"] == "invalid_request"


def test_a_put_without_the_lease_or_a_delete_takes_the_key_off_its_lease(
    tmp_path: Path,
) -> None:
    db, log = open_db(tmp_path)
    lease = log.one({"op": "lease_grant", "ttl": 5})["lease"]
    for k in ("p", "q", "r"):
        log.one({"op": "put", "key": k, "value": b"1", "lease": lease})
    # a plain put in a batch (the buffered path), a delete, and a txn put
    log.run(
        {"op": "put", "key": "p", "value": b"2"},
        {"op": "delete", "key": "q"},
    )
    assert db.lease_keys(lease) == ["r"]
    log.one({"op": "put", "key": "q", "value": b"3", "lease": lease})
    _, out = log.run({"op": "lease_revoke", "lease": lease})
    assert sorted(r[0] for r in out.rows) == ["q", "r"]
    assert db.get("p")[0] is not None


def test_checkpoints_record_the_ttl_left_and_grants_get_ids_from_the_log(
    tmp_path: Path,
) -> None:
    db, log = open_db(tmp_path)
    results, out = log.run({"op": "lease_grant", "ttl": 60}, {"op": "lease_grant", "ttl": 30})
    a, b = results[0]["lease"], results[1]["lease"]
    assert a != b and out.leases == [(a, 60_000), (b, 30_000)]
    log.one({"op": "lease_checkpoint", "leases": [[a, 12_000], [b, 99_000], [999, 5]]})
    assert db.lease(a) == (60_000, 12_000)
    assert db.lease(b) == (30_000, 30_000)  # never above the granted TTL
    assert db.leases() == sorted([(a, 60_000, 12_000), (b, 30_000, 30_000)])


def test_the_caps_on_leases_and_keys_per_lease_give_clear_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(apply_module, "MAX_LEASES", 2)
    monkeypatch.setattr(apply_module, "MAX_KEYS_PER_LEASE", 2)
    db, log = open_db(tmp_path)
    lease = log.one({"op": "lease_grant", "ttl": 5})["lease"]
    log.one({"op": "lease_grant", "ttl": 5})
    third = log.one({"op": "lease_grant", "ttl": 5})
    assert third["error"]["code"] == "too_large" and "2 leases" in third["error"]["message"]
    log.one({"op": "put", "key": "a", "value": b"", "lease": lease})
    log.one({"op": "put", "key": "a", "value": b"again", "lease": lease})  # same key: fine
    log.one({"op": "put", "key": "b", "value": b"", "lease": lease})
    over = log.one({"op": "put", "key": "c", "value": b"", "lease": lease})
    assert over["error"]["code"] == "too_large" and db.get("c")[0] is None


def test_lease_commands_apply_alike_on_every_replica(tmp_path: Path) -> None:
    digests = []
    for name in ("one.db", "two.db"):
        db, log = open_db(tmp_path, name)
        lease = log.one({"op": "lease_grant", "ttl": 9})["lease"]
        log.run(
            {"op": "put", "key": "k1", "value": b"v", "lease": lease},
            {"op": "put", "key": "k2", "value": b"v"},
        )
        log.one({"op": "lease_checkpoint", "leases": [[lease, 4000]]})
        digests.append(db.digest())
        db.close()
    assert digests[0] == digests[1]


def test_a_version_1_state_database_is_migrated_to_hold_leases(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = StateDB.open(path)
    db.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE lease_keys")
    conn.execute("DROP TABLE leases")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    db = StateDB.open(path)
    log = Log(db)
    assert "lease" in log.one({"op": "lease_grant", "ttl": 3})
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    db.close()
