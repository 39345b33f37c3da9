"""The read queries of ``state.db`` (schema in ``liferaft.kv.schema``), shared by the
writer (txn reads see the transaction's own writes) and the reader threads, and the maps
they return: a key-value ``{"key", "value", "create_revision", "mod_revision",
"version"}`` and an event (``liferaft.kv.watch``)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from liferaft.kv.commands import MAX_UINT
from liferaft.kv.schema import APPLICATION_ID, StateCorrupt
from liferaft.kv.watch import Event

KV = dict[str, Any]  # {"key", "value", "create_revision", "mod_revision", "version"}


def prefix_end(prefix: str) -> str | None:
    """The least string after every string that starts with ``prefix`` (None: there is
    none, every string from ``prefix`` on qualifies). SQLite compares TEXT as UTF-8
    bytes, which orders like code points, so ``prefix <= key < prefix_end(prefix)``."""
    chars = list(prefix)
    while chars:
        c = ord(chars.pop()) + 1
        if 0xD800 <= c <= 0xDFFF:
            c = 0xE000  # surrogates are not characters of any valid key
        if c <= 0x10FFFF:
            return "".join(chars) + chr(c)
    return None


def kv_map(key: str, value: bytes | None, create: int, mod: int, version: int) -> KV:
    return {
        "key": key,
        "value": value,
        "create_revision": create,
        "mod_revision": mod,
        "version": version,
    }


def event_map(key: str, rev: int, create: int, version: int, value: bytes | None) -> Event:
    if value is None:
        return {"type": "delete", "kv": kv_map(key, None, 0, rev, 0), "revision": rev}
    return {"type": "put", "kv": kv_map(key, value, create, rev, version), "revision": rev}


def key_bounds(prefix: str, after: str | None, column: str = "key") -> tuple[str, list[str]]:
    """The WHERE clause (and its parameters) for keys under ``prefix`` after ``after``."""
    clauses, params = [f"{column} >= ?"], [prefix]
    end = prefix_end(prefix)
    if end is not None:
        clauses.append(f"{column} < ?")
        params.append(end)
    if after is not None:
        clauses.append(f"{column} > ?")
        params.append(after)
    return " AND ".join(clauses), params


def get_at(conn: sqlite3.Connection, key: str, at: int) -> KV | None:
    row = conn.execute(
        "SELECT create_rev, rev, version, value FROM events WHERE key = ? AND rev <= ? "
        "ORDER BY rev DESC LIMIT 1",
        (key, at),
    ).fetchone()
    if row is None or row[3] is None:
        return None
    return kv_map(key, row[3], row[0], row[1], row[2])


def range_at(
    conn: sqlite3.Connection, prefix: str, limit: int, after: str | None, at: int
) -> tuple[list[KV], bool]:
    """Key-values under ``prefix`` after ``after``; ``at`` 0 reads the current state."""
    out: list[KV] = []
    if at == 0:
        where, params = key_bounds(prefix, after, "kv.key")
        sql = (
            "SELECT kv.key, e.value, kv.create_rev, kv.mod_rev, kv.version FROM kv "
            f"JOIN events e ON e.key = kv.key AND e.rev = kv.mod_rev WHERE {where} "
            "ORDER BY kv.key"
        )
        if limit:  # one more row, to tell ``more``; SQLite's LIMIT stops at MAX_UINT
            sql += f" LIMIT {min(limit + 1, MAX_UINT):d}"
        for key, value, create, mod, version in conn.execute(sql, params):
            if limit and len(out) == limit:
                return out, True
            out.append(kv_map(key, value, create, mod, version))
        return out, False
    where, params = key_bounds(prefix, after)
    rows = conn.execute(
        "SELECT key, MAX(rev), create_rev, version, value FROM events "
        f"WHERE {where} AND rev <= ? GROUP BY key ORDER BY key",
        (*params, at),
    )
    for key, mod, create, version, value in rows:
        if value is None:
            continue
        if limit and len(out) == limit:
            return out, True
        out.append(kv_map(key, value, create, mod, version))
    return out, False


def read_applied(path: Path) -> int:
    """The applied index recorded in the state database file at ``path``; StateCorrupt
    if it is not one."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
            if app_id != APPLICATION_ID:
                raise StateCorrupt(f"{path} is not a liferaft state database")
            row = conn.execute("SELECT value FROM meta WHERE name = 'applied'").fetchone()
    except sqlite3.Error as exc:
        raise StateCorrupt(f"{path}: {exc}") from exc
    if row is None:
        raise StateCorrupt(f"{path} records no applied index")
    return int(row[0])


def describe_copy(path: Path) -> dict[str, int]:
    """A state database file's ``applied`` index, ``revision``, ``compact_revision`` and
    number of live ``keys`` (for a backup's description); StateCorrupt if it is not one.
    Counting the keys walks the ``kv`` table once."""
    applied = read_applied(path)
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
            (keys,) = conn.execute("SELECT COUNT(*) FROM kv").fetchone()
    except sqlite3.Error as exc:
        raise StateCorrupt(f"{path}: {exc}") from exc
    return {
        "applied": applied,
        "revision": int(meta.get("revision", 0)),
        "compact_revision": int(meta.get("compact_revision", 0)),
        "keys": int(keys),
    }
