"""The tables of ``state.db``, the replicated key-value state (docs/storage.md).

etcd's MVCC model in SQLite:

- ``events(key, rev, create_rev, version, value)``: every revision of every key, one row
  per key per revision; ``value`` NULL is a delete (a tombstone, ``create_rev`` and
  ``version`` 0). Clustered by ``(key, rev)`` (WITHOUT ROWID), so "the newest row of
  this key at or before revision R" is one index seek; ``events_by_rev`` serves watches.
  Below the compaction point only the newest put of each key survives (what a read at
  the compaction revision needs); everything else there is deleted.
- ``kv(key, mod_rev, create_rev, version)``: the live keys and where their current
  value is in ``events``; small rows, so a range over the current state scans little.
- ``sessions(id, last_ms, max_seq, used)`` and ``session_results(id, seq, result)``: the
  exactly-once table (``liferaft.kv.sessions``); ``used`` orders sessions by last use.
- ``meta(name, value)``: integers, among them ``applied`` (the last log index applied),
  written in the same transaction as the data it covers (etcd's consistent index).
- ``leases(id, ttl_ms, remaining_ms, granted_ms)`` and ``lease_keys(key, lease)``
  (schema 2): the leases and the keys each one holds. ``remaining_ms`` is the TTL left
  at the last checkpoint the leader wrote into the log (the full TTL until then), what a
  new leader counts down from (node/lessor.py).

The schema version is ``PRAGMA user_version`` and the file is marked as ours with
``PRAGMA application_id`` (as in ``raft.db``). Plain SQL, not sqlite-utils: these tables
are WITHOUT ROWID, which sqlite-utils cannot declare.
"""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 2
APPLICATION_ID = 0x4C52534D  # "LRSM": liferaft state machine

META_NAMES = ("applied", "revision", "compact_revision", "compacted_to", "log_time_ms")

_V1 = """
CREATE TABLE events (
    key TEXT NOT NULL,
    rev INTEGER NOT NULL,
    create_rev INTEGER NOT NULL,
    version INTEGER NOT NULL,
    value BLOB,
    PRIMARY KEY (key, rev)
) WITHOUT ROWID, STRICT;
CREATE INDEX events_by_rev ON events (rev);
CREATE TABLE kv (
    key TEXT PRIMARY KEY,
    mod_rev INTEGER NOT NULL,
    create_rev INTEGER NOT NULL,
    version INTEGER NOT NULL
) WITHOUT ROWID, STRICT;
CREATE TABLE sessions (
    id BLOB PRIMARY KEY,
    last_ms INTEGER NOT NULL,
    max_seq INTEGER NOT NULL,
    used INTEGER NOT NULL
) WITHOUT ROWID, STRICT;
CREATE UNIQUE INDEX sessions_by_use ON sessions (used);
CREATE TABLE session_results (
    id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    result BLOB NOT NULL,
    PRIMARY KEY (id, seq)
) WITHOUT ROWID, STRICT;
CREATE TABLE meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID, STRICT;
"""


_V2 = """
CREATE TABLE leases (
    id INTEGER PRIMARY KEY,
    ttl_ms INTEGER NOT NULL,
    remaining_ms INTEGER NOT NULL,
    granted_ms INTEGER NOT NULL
) STRICT;
CREATE TABLE lease_keys (
    key TEXT PRIMARY KEY,
    lease INTEGER NOT NULL
) WITHOUT ROWID, STRICT;
CREATE INDEX lease_keys_by_lease ON lease_keys (lease, key);
"""

# MIGRATIONS[v] takes a database at version v to v + 1 (inside ensure's transaction).
MIGRATIONS = (_V1, _V2)
assert len(MIGRATIONS) == SCHEMA_VERSION


class StateCorrupt(Exception):
    """``state.db`` is damaged or is not a liferaft state database."""


def ensure(conn: sqlite3.Connection) -> None:
    """Create the schema in an empty file, migrate an older one (one transaction);
    refuse a foreign or newer one. ``conn`` is in autocommit mode with no transaction
    open."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    if app_id not in (0, APPLICATION_ID) or (app_id == 0 and (found or tables)):
        raise StateCorrupt(
            f"not a liferaft state database (application_id {app_id:#x}, "
            f"user_version {found}, tables {tables[:5]})"
        )
    if found > SCHEMA_VERSION:
        raise StateCorrupt(f"state schema {found} is newer than this liferaft ({SCHEMA_VERSION})")
    if found == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for version in range(found, SCHEMA_VERSION):
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
            if version == 0:
                conn.executemany(
                    "INSERT INTO meta (name, value) VALUES (?, 0)", [(n,) for n in META_NAMES]
                )
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
