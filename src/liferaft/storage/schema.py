"""The tables of ``raft.db``, created and migrated with sqlite-utils.

Tables (all STRICT, so SQLite itself refuses a value of the wrong type):

- ``meta(key TEXT PRIMARY KEY, value TEXT)``: facts written once when the data dir is
  first initialised; today the bootstrap membership, ``initial_voters`` and
  ``initial_learners`` (JSON lists). A node initialised without one (``join = true``)
  has no such rows, and never gets them later. Also ``cluster_id`` (docs/transport.md,
  "Cluster identity"), written once it is known.
- ``hard_state(id, term, vote, "commit")``: a single row, ``id = 0``.
- ``entries(idx INTEGER PRIMARY KEY, term, kind, data BLOB)``: the log since the snapshot;
  ``idx`` is the rowid itself, so no separate index (and no WITHOUT ROWID) is needed.
- ``snapshot(id, idx, term, voters, learners, data BLOB)``: a single row, ``id = 0``; the
  membership as JSON lists.

The schema version lives in ``PRAGMA user_version``, not in ``meta``, and the file is
marked as ours with ``PRAGMA application_id``. Both are fields of the database header:
they can be read before we know anything about the tables (a newer liferaft may have
changed ``meta`` itself), they need no table to exist on a fresh or foreign file, and
they are written in the same transaction as the migration they describe, so a crash
leaves either the old schema and version or the new ones. A file with no version but
with tables, or with another application's id, is not a liferaft database and is
refused rather than "initialised" on top of someone else's data.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

import sqlite_utils

from liferaft.core import Membership
from liferaft.storage.errors import StorageCorrupt

SCHEMA_VERSION = 1
APPLICATION_ID = 0x4C524654  # "LRFT"

TABLES = ("meta", "hard_state", "entries", "snapshot")

Migration = Callable[[sqlite_utils.Database, Membership | None], None]


def _v1(db: sqlite_utils.Database, initial: Membership | None) -> None:
    """The first schema; records the bootstrap membership, if the node has one."""
    db.table("meta").create({"key": str, "value": str}, pk="key", not_null=["value"], strict=True)
    db.table("hard_state").create(
        {"id": int, "term": int, "vote": str, "commit": int},
        pk="id",
        not_null=["term", "commit"],
        strict=True,
    )
    db.table("entries").create(
        {"idx": int, "term": int, "kind": int, "data": bytes},
        pk="idx",
        not_null=["term", "kind", "data"],
        strict=True,
    )
    db.table("snapshot").create(
        {"id": int, "idx": int, "term": int, "voters": str, "learners": str, "data": bytes},
        pk="id",
        not_null=["idx", "term", "voters", "learners", "data"],
        strict=True,
    )
    if initial is not None:
        db.table("meta").insert_all(
            [
                {"key": "initial_voters", "value": members_json(initial.voters)},
                {"key": "initial_learners", "value": members_json(initial.learners)},
            ]
        )


# MIGRATIONS[v] takes a database at version v to version v + 1.
MIGRATIONS: tuple[Migration, ...] = (_v1,)
assert len(MIGRATIONS) == SCHEMA_VERSION


def members_json(ids: frozenset[str]) -> str:
    return json.dumps(sorted(ids), separators=(",", ":"))


def members_from_json(text: str, what: str) -> frozenset[str]:
    """Decode a stored JSON list of node ids; ``what`` names it in the error."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise StorageCorrupt(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StorageCorrupt(f"{what} is not a JSON list of node ids: {text!r}")
    return frozenset(value)


def version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def ensure(conn: sqlite3.Connection, initial: Membership | None) -> None:
    """Bring the database to SCHEMA_VERSION: create it on first init, migrate an older one.

    Refuses (StorageCorrupt) a newer schema and a file that is not a liferaft database.
    All migrations and the version bump are one transaction. ``conn`` must be in
    autocommit mode (``isolation_level=None``) with no transaction open.
    """
    found = version(conn)
    app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    if app_id not in (0, APPLICATION_ID) or (app_id == 0 and found != 0):
        raise StorageCorrupt(
            f"not a liferaft database (application_id {app_id:#x}, user_version {found})"
        )
    if found > SCHEMA_VERSION:
        raise StorageCorrupt(
            f"schema version {found} is newer than this liferaft ({SCHEMA_VERSION})"
        )
    if found == SCHEMA_VERSION:
        return
    db = sqlite_utils.Database(conn)
    if found == 0 and (names := db.table_names()):
        raise StorageCorrupt(f"not a liferaft database: no schema version but tables {names}")
    with db.atomic():
        for migrate in MIGRATIONS[found:]:
            migrate(db, initial)
        # PRAGMA takes no parameters; both values are our own integers.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")
