"""The lock and election recipe without I/O, shared by the Trio
(liferaft.client.coordination) and asyncio (liferaft.client.aio_coordination) flavours
of :class:`Lock` and :class:`Election` (docs/coordination.md).

What is decided here, from data the flavours read and pass in: each contender's key
(``<prefix><name>/<lease id in hex>``), the txn that creates it only if absent (with the
contenders read at the same revision), what that txn's result says (created, or ours
already, and our key's ``create_revision``, the fencing token), which contender holds
(the lowest ``create_revision``) and which one a waiter watches (its predecessor, the
latest created before it), the guarded txn that changes a leader's value, and, in
:class:`LeaderView`, which leader an observer shows after each revision of a watch, so
that it never shows two at once. Like liferaft.client.core it imports no event loop and
has no clock (``lint-imports`` checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from liferaft.client.errors import InvalidRequest, LeaseLost, LiferaftError, NotFound
from liferaft.client.models import (
    KeyValue,
    TxnResult,
    WatchEvent,
    check_key,
    compare,
    op_get,
    op_put,
    op_range,
)

LOCK_PREFIX = "_liferaft/lock/"
ELECTION_PREFIX = "_liferaft/elect/"
DEFAULT_TTL = 10  # seconds: how long a dead holder keeps others waiting


class LockLost(LeaseLost):
    """The lease behind a held lock is lost: another holder may have the lock now."""


class NotElected(LiferaftError):
    """An election call that needs leadership (proclaim) made without it, or after it
    was lost (the key is gone or another contender's)."""

    code = "not_elected"


def children(kvs: list[KeyValue], pfx: str) -> list[KeyValue]:
    """The keys right under ``pfx``: "a/" must not count the contenders of "a/b"."""
    return [kv for kv in kvs if kv.key.startswith(pfx) and "/" not in kv.key[len(pfx) :]]


def first_created(kvs: list[KeyValue], pfx: str) -> KeyValue | None:
    """The contender that holds the lock or leads: the lowest create_revision."""
    return min(children(kvs, pfx), key=lambda kv: kv.create_revision, default=None)


def contender_prefix(prefix: str, name: object) -> str:
    """The prefix of every contender's key for the lock or election ``name``, checked."""
    if not isinstance(name, str) or not name:
        raise InvalidRequest("a name is a non-empty str")
    pfx = prefix + name + "/"
    check_key(pfx + "f" * 16)  # the longest key a contender can have
    return pfx


def contender_key(pfx: str, lease_id: int) -> str:
    """A contender's key: its lease's id in hex under the prefix."""
    return f"{pfx}{lease_id:x}"


Ops = list[dict[str, Any]]


def create_txn(pfx: str, key: str, value: bytes, lease_id: int) -> tuple[Ops, Ops, Ops]:
    """The txn (compare, success, failure) that creates ``key`` with the lease if it is
    absent, and reads every contender at the same revision; if the key exists already
    (the same lease contending again) it reads the key instead, to keep its place."""
    return (
        [compare(key, "create_revision", "==", 0)],
        [op_put(key, value, lease=lease_id), op_range(pfx)],
        [op_get(key), op_range(pfx)],
    )


@dataclass(frozen=True, slots=True)
class Created:
    """What :func:`create_txn` did: whether it created the key, the key's
    ``create_revision`` (the fencing token), and the contenders with the revision they
    were read at."""

    created: bool
    create_revision: int
    kvs: list[KeyValue]
    revision: int


def created(key: str, r: TxnResult) -> Created:
    """Read the result of :func:`create_txn`."""
    if r.succeeded:
        create_revision = r.revision
    else:  # already ours (the same lease contending again): keep its place
        kv = r.results[0].get("kv")
        if not isinstance(kv, KeyValue):
            raise NotFound(f"{key} vanished while being created")
        create_revision = kv.create_revision
    return Created(r.succeeded, create_revision, list(r.results[1].get("kvs", [])), r.revision)


def predecessor(
    kvs: list[KeyValue], pfx: str, key: str | None, create_revision: int, lease: int | None
) -> KeyValue | None:
    """The contender to wait for: the latest created before ours, or None when ours is
    the first (the lock is ours). Raises LeaseLost when our key is not among ``kvs``
    (its lease expired or was revoked)."""
    mine = children(kvs, pfx)
    if not any(kv.key == key for kv in mine):
        raise LeaseLost(f"{key} is gone: its lease expired or was revoked", lease=lease)
    earlier = [kv for kv in mine if kv.create_revision < create_revision]
    return max(earlier, key=lambda kv: kv.create_revision, default=None)


def proclaim_txn(key: str, value: bytes, lease_id: int, create_revision: int) -> tuple[Ops, Ops]:
    """The txn (compare, success) that sets our key's value only while the key is still
    the one we created; a failed compare means we are no longer contending."""
    return (
        [compare(key, "create_revision", "==", create_revision)],
        [op_put(key, value, lease=lease_id)],
    )


def not_ours(key: str) -> NotElected:
    return NotElected(f"{key} is no longer ours (its lease expired?)")


class LeaderView:
    """The contenders of one election as an observer knows them, and the leader it
    shows. Fed the contenders read at a revision (:meth:`reset`), then each event of a
    watch on the prefix from the next revision on (:meth:`event`), it judges a revision
    only once all of its events are in, and returns a leader only when it differs from
    the last one shown: so the leaders shown are ones that led at some revision, in the
    cluster's order, never two at once."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.keys: dict[str, KeyValue] = {}
        self.revision = 0  # the last revision seen; a watch resumes after it
        self.shown: KeyValue | None = None

    def reset(self, kvs: list[KeyValue], revision: int) -> None:
        """Start over from the contenders read at ``revision`` (at the start, or once
        the watch's history was compacted)."""
        self.keys = {kv.key: kv for kv in children(kvs, self.prefix)}
        self.revision = revision

    def leader(self) -> KeyValue | None:
        """The leader now, if it is not the one shown last (None otherwise, and while
        nobody leads)."""
        now = first_created(list(self.keys.values()), self.prefix)
        if now is not None and now != self.shown:
            self.shown = now
            return now
        return None

    def event(self, ev: WatchEvent, following: WatchEvent | None) -> KeyValue | None:
        """Take ``ev``; ``following`` is the next event if it has arrived already (the
        events of one revision arrive together). The new leader to show, or None (the
        revision is not complete yet, or the leader did not change)."""
        self.revision = max(self.revision, ev.kv.mod_revision)
        if ev.type == "delete":
            self.keys.pop(ev.kv.key, None)
        elif "/" not in ev.kv.key[len(self.prefix) :]:
            self.keys[ev.kv.key] = ev.kv
        if following is not None and following.kv.mod_revision == self.revision:
            return None  # judge a revision once all its events are in
        return self.leader()
