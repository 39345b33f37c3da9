"""The peer listener: mutual TLS, identity from the certificate, then a WebSocket on /raft
whose every message is one encoded batch.

trio-websocket's own server has no connection cap, no idle timeout and a 60-second default
handshake timeout, and it cannot look at the TLS session before the upgrade; so we accept
TCP ourselves, do the TLS handshake under our handshake timeout, map the certificate's
DNS SAN to a member id, and only then hand the stream to ``wrap_server_stream``. A
connection that misbehaves is closed on its own; nothing it sends can disturb another
link or the node.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Collection

import trio
import trio_websocket

from liferaft.security.tls import dns_names, peer_node_id
from liferaft.transport.codec import CodecError, decode
from liferaft.transport.files import PeerMessage
from liferaft.transport.link import PATH, RECEIVE_BUFFER
from liferaft.transport.stats import LogFn, TransportStats

CLOSE_TIMEOUT = 1.0  # how long a WebSocket close handshake may take before we hang up
WS_QUEUE = 2  # batches trio-websocket may read ahead of us on one connection

# WebSocket close codes (RFC 6455 §7.4.1).
GOING_AWAY = 1001
UNSUPPORTED_DATA = 1003
INVALID_PAYLOAD = 1007
MESSAGE_TOO_BIG = 1009


class PeerServer:
    """Accepts peers' connections and delivers ``(peer_id, messages)`` to ``deliver``."""

    def __init__(
        self,
        *,
        server_ctx: ssl.SSLContext,
        members: Callable[[], Collection[str]],
        deliver: trio.MemorySendChannel[tuple[str, list[PeerMessage]]],
        stats: TransportStats,
        log: LogFn,
        max_message_bytes: int,
        handshake_timeout: float,
        max_connections: int,
        idle_timeout: float,
    ) -> None:
        self._server_ctx = server_ctx
        self._members = members
        self._deliver = deliver
        self._stats = stats
        self._log = log
        self._max_message_bytes = max_message_bytes
        self._handshake_timeout = handshake_timeout
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self.open_connections = 0
        # peer id -> the cancel scope of its current incoming connection
        self._current: dict[str, trio.CancelScope] = {}

    def drop(self, peer_id: str) -> None:
        """Close the incoming connection from ``peer_id``, if any (it was removed)."""
        scope = self._current.pop(peer_id, None)
        if scope is not None:
            self._stats.closes["removed"] += 1
            scope.cancel()

    async def handle(self, tcp: trio.SocketStream) -> None:
        """The per-connection task ``trio.serve_listeners`` starts; it never raises."""
        remote = _remote(tcp)
        if self.open_connections >= self._max_connections:
            self._reject("max_connections", remote)
            await trio.aclose_forcefully(tcp)
            return
        self.open_connections += 1
        try:
            await self._serve(tcp, remote)
        except* Exception as group:  # the edge of one connection: log it, keep serving
            self._log("peer_connection_error", {"remote": remote, "error": repr(group)[:300]})
        finally:
            self.open_connections -= 1
            await trio.aclose_forcefully(tcp)

    async def _serve(self, tcp: trio.SocketStream, remote: str) -> None:
        stream = trio.SSLStream(tcp, self._server_ctx, server_side=True)
        async with trio.open_nursery() as nursery:  # holds trio-websocket's reader task
            try:
                accepted = None
                with trio.move_on_after(self._handshake_timeout) as handshake:
                    accepted = await self._handshake(nursery, stream, remote)
                if handshake.cancelled_caught:
                    self._reject("handshake_timeout", remote)
                if accepted is not None:
                    peer_id, ws = accepted
                    await self._receive(peer_id, ws, nursery.cancel_scope)
            finally:
                # Close first, cancel second (see PeerLink._session).
                await trio.aclose_forcefully(stream)
                nursery.cancel_scope.cancel()

    async def _handshake(
        self, nursery: trio.Nursery, stream: trio.SSLStream[trio.SocketStream], remote: str
    ) -> tuple[str, trio_websocket.WebSocketConnection] | None:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:  # not TLS, no certificate, another CA, ...
            self._reject("tls", remote, error=str(exc.__cause__ or exc)[:200])
            return None
        peer_id = peer_node_id(stream, self._members())
        if peer_id is None:
            self._reject("not_member", remote, names=dns_names(stream)[:8])
            return None
        request = await trio_websocket.wrap_server_stream(
            nursery,
            stream,
            message_queue_size=WS_QUEUE,
            max_message_size=self._max_message_bytes,
            receive_buffer_size=RECEIVE_BUFFER,
        )
        if request.path != PATH:
            self._reject("path", remote, peer=peer_id, path=request.path[:100])
            await request.reject(404)
            return None
        ws = await request.accept()
        return peer_id, ws

    async def _receive(
        self, peer_id: str, ws: trio_websocket.WebSocketConnection, scope: trio.CancelScope
    ) -> None:
        old = self._current.get(peer_id)
        if old is not None:  # one incoming link per peer: the newest wins
            self._stats.closes["replaced"] += 1
            old.cancel()
        self._current[peer_id] = scope
        self._stats.accepts += 1
        self._log("peer_connected", {"peer": peer_id, "direction": "in"})
        try:
            while True:
                with trio.move_on_after(self._idle_timeout) as idle:
                    data = await ws.get_message()
                if idle.cancelled_caught:
                    self._stats.closes["idle"] += 1
                    self._log("peer_idle", {"peer": peer_id, "seconds": self._idle_timeout})
                    await _close(ws, GOING_AWAY, "idle")
                    return
                if not isinstance(data, bytes):
                    self._malformed(peer_id, "text message")
                    await _close(ws, UNSUPPORTED_DATA, "binary messages only")
                    return
                self._stats.received_bytes[peer_id] += len(data)
                self._stats.received_batches[peer_id] += 1
                try:
                    msgs = decode(data, max_bytes=self._max_message_bytes)
                except CodecError as exc:
                    self._malformed(peer_id, str(exc)[:200])
                    await _close(ws, INVALID_PAYLOAD, "malformed batch")
                    return
                if msgs:  # an empty batch is a keepalive
                    await self._deliver.send((peer_id, msgs))
        except trio_websocket.ConnectionClosed as exc:
            code = exc.reason.code if exc.reason is not None else None
            if code == MESSAGE_TOO_BIG:
                self._malformed(peer_id, "message too big")
            self._log("peer_disconnected", {"peer": peer_id, "direction": "in", "code": code})
        finally:
            if self._current.get(peer_id) is scope:
                del self._current[peer_id]

    def _malformed(self, peer_id: str, error: str) -> None:
        self._stats.rejects["malformed"] += 1
        self._log("peer_message_malformed", {"peer": peer_id, "error": error})

    def _reject(self, reason: str, remote: str, **fields: object) -> None:
        self._stats.rejects[reason] += 1
        self._log("peer_rejected", {"reason": reason, "remote": remote, **fields})


async def _close(ws: trio_websocket.WebSocketConnection, code: int, reason: str) -> None:
    with trio.move_on_after(CLOSE_TIMEOUT):
        await ws.aclose(code, reason)


def _remote(tcp: trio.SocketStream) -> str:
    try:
        host, port, *_ = tcp.socket.getpeername()
    except (OSError, ValueError):
        return "?"
    return f"{host}:{port}"
