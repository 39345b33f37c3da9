"""Watches that survive reconnects (docs/client-protocol.md, "Watches").

A :class:`Watch` subscribes through the client's retrying request path; the response's
``watch_id`` is routed to a :class:`~liferaft.client.connection.WatchStream` by the
connection's reader before it reads on, so events that follow the response in the same
message are never lost. When the connection breaks, or the consumer falls so far behind
that its buffer overflows, the stream ends and the watch subscribes again from the
revision after the last event it delivered.
"""

from __future__ import annotations

from collections import deque
from types import TracebackType
from typing import Any

import trio

from liferaft.client.connection import Connection, WatchStream
from liferaft.client.core import WatchState
from liferaft.client.errors import InternalError, LiferaftError
from liferaft.client.models import WatchEvent
from liferaft.client.retry import Retrier


class Watch:
    """An async iterator of :class:`WatchEvent` for one key or prefix; made by
    :meth:`Client.watch`. ``async with`` it to unwatch on exit (or call ``aclose``)."""

    def __init__(self, retrier: Retrier, selector: dict[str, Any], start_revision: int) -> None:
        self._retrier = retrier
        self._state = WatchState(selector, start_revision)  # where to resume (core)
        self._stream: WatchStream | None = None
        self._buffer: deque[WatchEvent] = deque()
        self._closed = False

    @property
    def next_revision(self) -> int:
        """The revision a resubscription would start from (0 until one is known)."""
        return self._state.next_revision

    def peek(self) -> WatchEvent | None:
        """The next event if it has arrived already, without taking it. The events of
        one revision arrive together, so this tells whether more of the revision just
        delivered are still to come (to act on a revision as a whole)."""
        return self._buffer[0] if self._buffer else None

    async def __aenter__(self) -> Watch:
        if self._stream is None:
            await self._subscribe()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        while True:
            if self._buffer:
                return self._buffer.popleft()
            if self._closed:
                raise StopAsyncIteration
            if self._stream is None:
                await self._subscribe()
            assert self._stream is not None
            try:
                msg = await self._stream.receive_channel.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                # The connection broke or we fell behind: resubscribe where we left off.
                self._stream = None
                continue
            self._take(msg)

    def _take(self, msg: dict[str, Any]) -> None:
        try:
            self._buffer.extend(self._state.events(msg))
        except LiferaftError:
            if self._state.closed:
                self.close()
            raise

    async def _subscribe(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the watch is closed")

        state = self._state

        def on_ok(conn: Connection, resp: dict[str, Any]) -> None:
            # Runs in the connection's reader, before the next message is read: events
            # that follow the response in the same message already find the stream.
            watch_id = resp.get("watch_id")
            if type(watch_id) is int:
                self._stream = conn.subscribe(watch_id)

        resp = await self._retrier.request(state.subscribe_request(), on_ok=on_ok)
        if self._stream is None:
            raise InternalError("watch response without a watch_id")
        state.subscribed(resp)

    def close(self) -> None:
        """Stop watching (sends ``unwatch``); iteration ends after buffered events."""
        self._closed = True
        if self._stream is not None:
            self._stream.conn.unsubscribe(self._stream)
            self._stream = None

    async def aclose(self) -> None:
        """Stop watching; the async spelling of :meth:`close`."""
        self.close()
        await trio.lowlevel.checkpoint()
