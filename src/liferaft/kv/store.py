"""The replicated key-value state machine: etcd's data model, applied from the log.

Pure and deterministic (DESIGN.md §2): the state after applying entries depends on the
entries alone; no clock (time is the ``time_ms`` the leader stamped on each command, see
``sessions``), no I/O, no global random. Two stores fed the same entries produce
byte-identical snapshots.

Revisions are etcd's: one store-wide counter, bumped once per applied write request that
changes something (a put always, a delete only if it deleted a key, a txn once for the
whole chosen branch if any of its writes changed something). Each key has
``create_revision``, ``mod_revision`` and ``version`` (1 at creation, +1 per put, gone
with the key, so a re-created key starts again at 1).

Results and events handed out are plain maps to treat as read-only, with one exception:
the top-level map ``apply`` returns is always a fresh dict, so the caller may add ``id``
and ``ok`` to it. (A session retry returns the first result again, which shares its
nested lists and maps with the copy the session keeps.)
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any, Protocol

import cbor2

from liferaft.kv.commands import (
    INVALID_REQUEST,
    CommandError,
    cbor_loads_strict,
    decode_command,
)
from liferaft.kv.sessions import (
    MAX_SESSIONS,
    SESSION_TTL_MS,
    SESSION_WINDOW,
    SeqTooOld,
    SessionTable,
)
from liferaft.kv.watch import HISTORY_REVISIONS, Compacted, Event, History

__all__ = ["KV", "Compacted", "EntryLike", "Event", "KVStore", "Result", "SnapshotError"]

KV = dict[str, Any]  # {"key", "value", "create_revision", "mod_revision", "version"}
Result = dict[str, Any]
Subscriber = Callable[[list[Event]], object]

NORMAL = 0  # liferaft.core.EntryKind.NORMAL: kv stays importable without the core
SNAPSHOT_FORMAT = 1
SNAPSHOT_MAX_DEPTH = 16


class EntryLike(Protocol):
    """What ``apply`` reads of a ``liferaft.core.Entry``."""

    @property
    def index(self) -> int: ...

    @property
    def kind(self) -> int: ...

    @property
    def data(self) -> bytes: ...


class SnapshotError(ValueError):
    """Bytes that are not a snapshot of this store's format."""


def error(code: str, message: str) -> Result:
    return {"error": {"code": code, "message": message}}


class _Record:
    __slots__ = ("create_revision", "mod_revision", "value", "version")

    def __init__(self, value: bytes, create_revision: int, mod_revision: int, version: int):
        self.value = value
        self.create_revision = create_revision
        self.mod_revision = mod_revision
        self.version = version

    def kv(self, key: str) -> KV:
        return {
            "key": key,
            "value": self.value,
            "create_revision": self.create_revision,
            "mod_revision": self.mod_revision,
            "version": self.version,
        }


class KVStore:
    """Implements ``liferaft.node.statemachine.StateMachine``."""

    def __init__(
        self,
        *,
        history_revisions: int = HISTORY_REVISIONS,
        session_window: int = SESSION_WINDOW,
        session_ttl_ms: int = SESSION_TTL_MS,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        # The limits are configuration, not state: every replica must use the same.
        self.index = 0  # the last applied log index
        self.revision = 0  # the store's revision: the number of changing writes so far
        self.log_time_ms = 0  # the largest time_ms of any applied command
        self._records: dict[str, _Record] = {}
        self._keys: list[str] = []  # the keys of _records, sorted
        self._sessions = SessionTable(
            window=session_window, ttl_ms=session_ttl_ms, max_sessions=max_sessions
        )
        self._history = History(history_revisions)
        self._subscribers: list[Subscriber] = []

    # ------------------------------------------------------------ reads

    @property
    def compact_revision(self) -> int:
        """The newest revision whose events are no longer kept (0: none forgotten)."""
        return self._history.compact_revision

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, key: str) -> KV | None:
        record = self._records.get(key)
        return None if record is None else record.kv(key)

    def range(self, prefix: str, limit: int = 0) -> tuple[list[KV], bool]:
        """The key-values whose key starts with ``prefix`` (all for ""), sorted by key,
        at most ``limit`` of them (0: no limit), and whether there are more."""
        keys, records = self._keys, self._records
        i = bisect.bisect_left(keys, prefix)
        out: list[KV] = []
        while i < len(keys) and keys[i].startswith(prefix):
            if limit and len(out) == limit:
                return out, True
            out.append(records[keys[i]].kv(keys[i]))
            i += 1
        return out, False

    def events_since(
        self, start_revision: int, key: str | None = None, prefix: str | None = None
    ) -> list[Event]:
        """The history's events at ``start_revision`` and later for ``key`` or keys under
        ``prefix`` (every key with neither); ``[]`` for 0 ("from now") or a revision not
        reached yet. Raises ``watch.Compacted`` for a revision no longer kept."""
        return self._history.since(start_revision, key, prefix)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(events)`` after every apply that produced events (all of one
        revision, in order); returns a function that unsubscribes. The callback runs
        inside ``apply`` after the state change is complete, so it must be quick and
        should not raise (an exception propagates out of ``apply``)."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    # ------------------------------------------------------------ apply

    def apply(self, entry: EntryLike) -> Result | None:
        """Apply one committed entry. NORMAL entries return the SPEC.md §4 result map
        (without ``id``/``ok``) or ``{"error": {"code", "message"}}``; NOOP and CONFIG
        entries return None and only advance ``index``. Never raises on entry data."""
        self.index = entry.index
        if entry.kind != NORMAL:
            return None
        events: list[Event] = []
        try:
            result = self._apply_command(entry.data, events)
        except Exception as exc:  # a bug, not bad data: every replica fails alike, so
            # they stay identical, and a committed entry must not crash them all forever.
            return error("internal", f"applying entry {entry.index} failed: {exc!r:.200}")
        if events:
            for callback in list(self._subscribers):
                callback(events)
        return result

    def _apply_command(self, data: bytes, events: list[Event]) -> Result:
        try:
            cmd = decode_command(data)
        except CommandError as exc:
            return error(INVALID_REQUEST, f"bad command: {exc}")
        time_ms: int = cmd["time_ms"]
        if time_ms > self.log_time_ms:
            self.log_time_ms = time_ms
        self._sessions.expire(self.log_time_ms)
        session: bytes | None = cmd.get("session")
        seq: int = cmd.get("seq", 0)
        if session is not None:
            try:
                first = self._sessions.lookup(session, seq)
            except SeqTooOld:
                return error(INVALID_REQUEST, "sequence number too old")
            if first is not None:
                return dict(first)
        result = self._execute(cmd, events)
        if session is not None:
            self._sessions.record(session, seq, result, self.log_time_ms)
        return dict(result)

    def _execute(self, cmd: dict[str, Any], events: list[Event]) -> Result:
        op = cmd["op"]
        rev = self.revision + 1  # the revision of this write, if it changes anything
        result: Result
        if op == "put":
            self._put(cmd["key"], cmd["value"], rev, events)
            result = {}
        elif op == "delete":
            result = {"deleted": self._delete(cmd, rev, events)}
        else:
            succeeded = all(self._compare(c) for c in cmd.get("compare", []))
            ops = cmd.get("success" if succeeded else "failure", [])
            results = [self._txn_op(sub, rev, events) for sub in ops]
            result = {"succeeded": succeeded, "results": results}
        if events:
            self.revision = rev
            self._history.append(rev, events)
        if op == "txn":
            for r in result["results"]:
                r["revision"] = self.revision
        result["revision"] = self.revision
        return result

    def _txn_op(self, sub: dict[str, Any], rev: int, events: list[Event]) -> Result:
        op = sub["op"]
        if op == "put":
            self._put(sub["key"], sub["value"], rev, events)
            return {}
        if op == "delete":
            return {"deleted": self._delete(sub, rev, events)}
        if op == "get":
            return {"kv": self.get(sub["key"])}
        kvs, more = self.range(sub["prefix"], sub.get("limit", 0))
        return {"kvs": kvs, "more": more}

    def _put(self, key: str, value: bytes, rev: int, events: list[Event]) -> None:
        record = self._records.get(key)
        if record is None:
            record = self._records[key] = _Record(value, rev, rev, 1)
            bisect.insort(self._keys, key)
        else:
            record.value = value
            record.mod_revision = rev
            record.version += 1
        events.append({"type": "put", "kv": record.kv(key), "revision": rev})

    def _delete(self, req: dict[str, Any], rev: int, events: list[Event]) -> int:
        keys = self._keys
        if "key" in req:
            key = req["key"]
            if key not in self._records:
                return 0
            lo = bisect.bisect_left(keys, key)
            hi = lo + 1
        else:
            prefix = req["prefix"]
            lo = hi = bisect.bisect_left(keys, prefix)
            while hi < len(keys) and keys[hi].startswith(prefix):
                hi += 1
        for key in keys[lo:hi]:
            del self._records[key]
            tombstone = {
                "key": key,
                "value": None,
                "create_revision": 0,
                "mod_revision": rev,
                "version": 0,
            }
            events.append({"type": "delete", "kv": tombstone, "revision": rev})
        del keys[lo:hi]
        return hi - lo

    def _compare(self, c: dict[str, Any]) -> bool:
        record = self._records.get(c["key"])
        target, op, want = c["target"], c["result"], c["value"]
        have: Any
        if target == "value":
            have = None if record is None else record.value
            if have is None or want is None:  # null is equal to null only, never ordered
                if op == "==":
                    return have is want
                return op == "!=" and have is not want
        else:
            have = 0 if record is None else getattr(record, target)
        if op == "==":
            return bool(have == want)
        if op == "!=":
            return bool(have != want)
        if op == "<":
            return bool(have < want)
        return bool(have > want)

    # ------------------------------------------------------------ snapshot

    def snapshot(self) -> bytes:
        """The whole state as canonical CBOR: key-values, revision, sessions, log time
        and event history (not the limits given to the constructor)."""
        state = {
            "format": SNAPSHOT_FORMAT,
            "index": self.index,
            "revision": self.revision,
            "log_time_ms": self.log_time_ms,
            "kvs": [
                [k, r.value, r.create_revision, r.mod_revision, r.version]
                for k in self._keys
                for r in (self._records[k],)
            ],
            "sessions": self._sessions.dump(),
            "history": self._history.dump(),
        }
        return cbor2.dumps(state, canonical=True)

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a ``snapshot``; SnapshotError (and no change) if
        ``data`` is not one. Subscribers are not told: watchers of a store restored from
        a snapshot may have missed events and should resume with ``events_since``."""
        try:
            state = cbor_loads_strict(data, max_depth=SNAPSHOT_MAX_DEPTH)
            if type(state) is not dict or state.get("format") != SNAPSHOT_FORMAT:
                raise ValueError(f"not a format {SNAPSHOT_FORMAT} snapshot")
            if cbor2.dumps(state, canonical=True) != data:
                raise ValueError("trailing bytes or not canonically encoded")
            index, revision, log_time = state["index"], state["revision"], state["log_time_ms"]
            if not all(type(v) is int and v >= 0 for v in (index, revision, log_time)):
                raise ValueError("bad index, revision or log time")
            records, keys = self._load_kvs(state["kvs"], revision)
            sessions = SessionTable(
                window=self._sessions.window,
                ttl_ms=self._sessions.ttl_ms,
                max_sessions=self._sessions.max_sessions,
            )
            sessions.load(state["sessions"])
            history = History(self._history.max_revisions)
            history.load(state["history"])
        except (ValueError, KeyError, TypeError) as exc:
            raise SnapshotError(f"bad snapshot: {exc}") from None
        self.index, self.revision, self.log_time_ms = index, revision, log_time
        self._records, self._keys = records, keys
        self._sessions, self._history = sessions, history

    @staticmethod
    def _load_kvs(raw: object, revision: int) -> tuple[dict[str, _Record], list[str]]:
        if type(raw) is not list:
            raise ValueError("kvs must be a list")
        records: dict[str, _Record] = {}
        keys: list[str] = []
        for item in raw:
            if type(item) is not list or len(item) != 5:
                raise ValueError("a kv is [key, value, create, mod, version]")
            key, value, create, mod, version = item
            if type(key) is not str or type(value) is not bytes:
                raise ValueError("bad key or value")
            if not all(type(v) is int and 0 < v <= revision for v in (create, mod)):
                raise ValueError(f"bad revisions for key {key!r:.60}")
            if type(version) is not int or version < 1:
                raise ValueError(f"bad version for key {key!r:.60}")
            if keys and key <= keys[-1]:
                raise ValueError("kvs must be sorted by key without duplicates")
            keys.append(key)
            records[key] = _Record(value, create, mod, version)
        return records, keys
