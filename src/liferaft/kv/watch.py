"""Watch events and the error for history that is gone.

An event is ``{"type": "put" | "delete", "kv": kv, "revision": r}``; a put's kv is the
key-value as written, a delete's kv is ``{"key", "value": None, "create_revision": 0,
"mod_revision": r, "version": 0}`` (etcd's: the key and the revision of the delete).
Every revision that exists has at least one event (the store bumps its revision only for
writes that change something); the events of one revision are ordered by key, one per
key. The history itself lives in ``state.db`` (``liferaft.kv.state``).
"""

from __future__ import annotations

from typing import Any

Event = dict[str, Any]


class Compacted(Exception):
    """The revision wanted is older than the history; ``compact_revision`` is the
    compaction point: reads at it or later still work, watches start after it."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(compact_revision)  # args[0] is the revision
        self.compact_revision = compact_revision

    def __str__(self) -> str:
        return f"revisions before {self.compact_revision} are compacted"


def matches(event: Event, key: str | None = None, prefix: str | None = None) -> bool:
    """Whether ``event`` concerns ``key`` (exactly) or a key starting with ``prefix``;
    with neither, every event matches."""
    k: str = event["kv"]["key"]
    if key is not None:
        return k == key
    if prefix is not None:
        return k.startswith(prefix)
    return True
