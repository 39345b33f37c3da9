"""Fan-out of the state machine's events to the connections that watch.

The applier publishes each applied batch of events once; every subscription gets it on
its own bounded channel. A subscriber that falls that far behind is cut off (its watch
ends and the client sees the connection close) rather than buffering without bound.
After a snapshot install the hub sends ``RESET``: the state jumped, and each watch reads
the revisions it did not see from the new database.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio

from liferaft.kv.queries import event_map
from liferaft.kv.state import EventRow

QUEUE = 1024  # event batches a subscription may lag behind

# Published by ``reset``; compared by identity, never delivered as events.
RESET: list[dict[str, Any]] = []


class WatchHub:
    def __init__(self) -> None:
        self._subs: set[trio.MemorySendChannel[list[dict[str, Any]]]] = set()

    def __len__(self) -> int:
        """How many subscriptions (open watches) receive what is published."""
        return len(self._subs)

    def publish(self, rows: list[EventRow]) -> None:
        """Send the events of ``rows`` (as maps, made only when someone watches)."""
        if self._subs:
            self._send([event_map(*row) for row in rows])

    def _send(self, events: list[dict[str, Any]]) -> None:
        for send in list(self._subs):
            try:
                send.send_nowait(events)
            except trio.WouldBlock:
                self._subs.discard(send)
                send.close()  # the slow watcher's stream ends

    def reset(self) -> None:
        """The state machine was replaced by a snapshot: the events in between were never
        published. Every subscriber gets ``RESET`` and reads them from the new database
        (a subscriber too far behind to take it is cut off, as by ``publish``)."""
        self._send(RESET)

    def subscribe(self) -> Subscription:
        """Start receiving every batch published from now on."""
        send, recv = trio.open_memory_channel[list[dict[str, Any]]](QUEUE)
        self._subs.add(send)
        return Subscription(self, send, recv)

    def _drop(self, send: trio.MemorySendChannel[list[dict[str, Any]]]) -> None:
        self._subs.discard(send)
        send.close()

    @contextmanager
    def subscription(self) -> Iterator[trio.MemoryReceiveChannel[list[dict[str, Any]]]]:
        with self.subscribe() as sub:
            yield sub.events


class Subscription:
    """One subscriber's channel; a context manager that unsubscribes on exit."""

    def __init__(
        self,
        hub: WatchHub,
        send: trio.MemorySendChannel[list[dict[str, Any]]],
        events: trio.MemoryReceiveChannel[list[dict[str, Any]]],
    ) -> None:
        self._hub = hub
        self._send = send
        self.events = events

    def close(self) -> None:
        self._hub._drop(self._send)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
