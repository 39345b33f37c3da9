"""The event history behind watches: the events of the last ``HISTORY_REVISIONS``
revisions, so that a watch may start at a past revision (SPEC.md §4 ``start_revision``).

An event is ``{"type": "put" | "delete", "kv": kv, "revision": r}``; a put's kv is the
key-value as written, a delete's kv is ``{"key", "value": None, "create_revision": 0,
"mod_revision": r, "version": 0}`` (etcd's: the key and the revision of the delete).
Every revision that exists has at least one event (the store bumps its revision only for
writes that change something), so the history holds the consecutive revisions
``compact_revision + 1 .. revision`` and a start revision maps straight to a position.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from typing import Any

HISTORY_REVISIONS = 10_000

Event = dict[str, Any]


class Compacted(Exception):
    """The events wanted are older than the history; ``compact_revision`` is the newest
    revision whose events are gone (a watch may start at ``compact_revision + 1``)."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(compact_revision)  # args[0] is the revision
        self.compact_revision = compact_revision

    def __str__(self) -> str:
        return f"revision {self.compact_revision} and older are compacted"


def matches(event: Event, key: str | None = None, prefix: str | None = None) -> bool:
    """Whether ``event`` concerns ``key`` (exactly) or a key starting with ``prefix``;
    with neither, every event matches."""
    k: str = event["kv"]["key"]
    if key is not None:
        return k == key
    if prefix is not None:
        return k.startswith(prefix)
    return True


class History:
    def __init__(self, max_revisions: int = HISTORY_REVISIONS) -> None:
        if max_revisions < 1:
            raise ValueError("the history keeps at least one revision")
        self.max_revisions = max_revisions
        self.compact_revision = 0
        # One item per revision, oldest first: revision compact_revision + 1 + i.
        self._revisions: deque[list[Event]] = deque()

    def append(self, revision: int, events: list[Event]) -> None:
        """Record the events of ``revision``, the one after the newest recorded."""
        if revision != self.compact_revision + len(self._revisions) + 1:
            raise ValueError(f"revision {revision} does not follow the history")
        self._revisions.append(events)
        while len(self._revisions) > self.max_revisions:
            self._revisions.popleft()
            self.compact_revision += 1

    def since(
        self, start_revision: int, key: str | None = None, prefix: str | None = None
    ) -> list[Event]:
        """The events at ``start_revision`` and after that match ``key`` or ``prefix``;
        raises Compacted when ``start_revision`` is no longer in the history. A start
        revision of 0 means "from now": no history."""
        if start_revision <= 0:
            return []
        if start_revision <= self.compact_revision:
            raise Compacted(self.compact_revision)
        skip = start_revision - self.compact_revision - 1
        revisions: Iterable[list[Event]] = itertools.islice(self._revisions, skip, None)
        return [e for events in revisions for e in events if matches(e, key, prefix)]

    # ------------------------------------------------------------ snapshot

    def dump(self) -> list[Any]:
        """``[compact_revision, [[event, ...] per revision, oldest first]]``."""
        return [self.compact_revision, list(self._revisions)]

    def load(self, raw: object) -> None:
        """Replace the history with a ``dump``; ValueError if ``raw`` is not one."""
        if type(raw) is not list or len(raw) != 2:
            raise ValueError("history must be [compact_revision, revisions]")
        compact, revisions = raw
        if type(compact) is not int or compact < 0 or type(revisions) is not list:
            raise ValueError("bad history")
        for events in revisions:
            if type(events) is not list or not all(
                type(e) is dict and type(e.get("kv")) is dict for e in events
            ):
                raise ValueError("bad history events")
        self.compact_revision = compact
        self._revisions = deque(revisions[-self.max_revisions :])
        self.compact_revision += len(revisions) - len(self._revisions)
