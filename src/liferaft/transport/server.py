"""The peer listener: mutual TLS, identity from the certificate, then a WebSocket on /raft
whose every message is one encoded batch.

We accept TCP ourselves, do the TLS handshake under our handshake timeout (with a cap on
connections and an idle timeout), map the certificate's DNS SAN to a member id, and only
then read the WebSocket upgrade. A connection that misbehaves is closed on its own;
nothing it sends can disturb another link or the node.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Collection

import trio

from liferaft.security.tls import dns_names, peer_node_id
from liferaft.transport.cluster import HEADER, ClusterIdentity
from liferaft.transport.codec import CodecError, decode
from liferaft.transport.files import PeerMessage
from liferaft.transport.link import PATH, RECEIVE_BUFFER, REMOVED_HEADER
from liferaft.transport.stats import LogFn, TransportStats
from liferaft.websocket import (
    GOING_AWAY,
    INVALID_PAYLOAD,
    MESSAGE_TOO_BIG,
    UNSUPPORTED_DATA,
    ConnectionClosed,
    HandshakeFailed,
    WebSocket,
    read_request,
)
from liferaft.websocket.tls import TLSStream

CLOSE_TIMEOUT = 1.0  # how long a WebSocket close handshake may take before we hang up


# Takes one read's messages from a peer: the node's (PeerLinks.deliver) or a channel's send.
Deliver = Callable[[str, list[PeerMessage]], Awaitable[None]]


class DeliverFailed(Exception):
    """``deliver`` raised: a fault of the node, not of the connection. It is not logged
    and swallowed at the connection's edge like a peer's misbehaviour, but ends the
    transport (and with it the node), as a crash of a forwarding task would."""


class PeerServer:
    """Accepts peers' connections and delivers ``(peer_id, messages)`` to ``deliver``
    (awaited in the connection's task: its wait is the backpressure on that peer)."""

    def __init__(
        self,
        *,
        server_ctx: ssl.SSLContext,
        members: Callable[[], Collection[str]],
        deliver: Deliver,
        came_up: Callable[[str], None],
        stats: TransportStats,
        log: LogFn,
        max_message_bytes: int,
        handshake_timeout: float,
        max_connections: int,
        idle_timeout: float,
        cluster: ClusterIdentity,
        removed_at: Callable[[str], int | None] | None = None,
    ) -> None:
        self._server_ctx = server_ctx
        # the index of the committed change that removed a node id, if the node saw one
        self._removed_at = removed_at
        self._cluster = cluster
        self._members = members
        self._deliver = deliver
        self._came_up = came_up  # told of each peer whose connection is accepted
        self._stats = stats
        self._log = log
        self._max_message_bytes = max_message_bytes
        self._handshake_timeout = handshake_timeout
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self.open_connections = 0
        # peer id -> the cancel scope of its current incoming connection
        self._current: dict[str, trio.CancelScope] = {}

    def set_tls(self, server_ctx: ssl.SSLContext) -> None:
        """Handshakes accepted from now on use ``server_ctx`` (PeerTransport.set_tls)."""
        self._server_ctx = server_ctx

    def drop(self, peer_id: str) -> None:
        """Close the incoming connection from ``peer_id``, if any (it was removed)."""
        scope = self._current.pop(peer_id, None)
        if scope is not None:
            self._stats.closes["removed"] += 1
            scope.cancel()

    async def handle(self, tcp: trio.SocketStream) -> None:
        """The per-connection task ``trio.serve_listeners`` starts; it raises only
        DeliverFailed."""
        remote = _remote(tcp)
        if self.open_connections >= self._max_connections:
            self._reject("max_connections", remote)
            await trio.aclose_forcefully(tcp)
            return
        self.open_connections += 1
        try:
            await self._serve(tcp, remote)
        except* DeliverFailed:
            raise  # the node's fault: it must stop, not go on deaf to this peer
        except* Exception as group:  # the edge of one connection: log it, keep serving
            self._log("peer_connection_error", {"remote": remote, "error": repr(group)[:300]})
        finally:
            self.open_connections -= 1
            await trio.aclose_forcefully(tcp)

    async def _serve(self, tcp: trio.SocketStream, remote: str) -> None:
        stream = TLSStream(tcp, self._server_ctx, server_side=True)
        try:
            accepted = None
            with trio.move_on_after(self._handshake_timeout) as handshake:
                accepted = await self._handshake(stream, remote)
            if handshake.cancelled_caught:
                self._reject("handshake_timeout", remote)
            if accepted is not None:
                peer_id, ws = accepted
                with trio.CancelScope() as scope:
                    await self._receive(peer_id, ws, scope)
        finally:
            await trio.aclose_forcefully(stream)

    async def _handshake(self, stream: TLSStream, remote: str) -> tuple[str, WebSocket] | None:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:  # not TLS, no certificate, another CA, ...
            self._reject("tls", remote, error=str(exc.__cause__ or exc)[:200])
            return None
        peer_id = peer_node_id(stream, self._members())
        if peer_id is None:
            await self._refuse_non_member(stream, remote)
            return None
        try:
            request = await read_request(
                stream, max_message_size=self._max_message_bytes, receive_buffer=RECEIVE_BUFFER
            )
        except (HandshakeFailed, ConnectionClosed) as exc:
            self._reject("upgrade", remote, peer=peer_id, error=str(exc)[:200])
            return None
        if request.path != PATH:
            self._reject("path", remote, peer=peer_id, path=request.path[:100])
            await request.reject(404)
            return None
        theirs = request.header(HEADER)
        if not self._cluster.accepts(theirs):
            self._reject(
                "cluster", remote, peer=peer_id, theirs=(theirs or b"")[:64].decode("latin-1")
            )
            await request.reject(403, body=b"another cluster")
            return None
        ws = await request.accept()
        return peer_id, ws

    async def _refuse_non_member(self, stream: TLSStream, remote: str) -> None:
        """Close on a certificate that names no member; but tell a node that a committed
        change removed that it was, with HTTP 410 and the change's index, so that it
        stops instead of knocking for ever (node/removal.py)."""
        names = dns_names(stream)
        found = None
        if self._removed_at is not None:
            found = next(((n, i) for n in names if (i := self._removed_at(n)) is not None), None)
        if found is None:
            self._reject("not_member", remote, names=names[:8])
            return
        name, index = found
        self._reject("removed", remote, peer=name, index=index)
        try:
            request = await read_request(
                stream, max_message_size=self._max_message_bytes, receive_buffer=RECEIVE_BUFFER
            )
        except (HandshakeFailed, ConnectionClosed):
            return
        await request.reject(
            410,
            extra_headers=[(REMOVED_HEADER, str(index).encode())],
            body=b"removed from the cluster\n",
        )

    async def _receive(self, peer_id: str, ws: WebSocket, scope: trio.CancelScope) -> None:
        old = self._current.get(peer_id)
        if old is not None:  # one incoming link per peer: the newest wins
            self._stats.closes["replaced"] += 1
            old.cancel()
        self._current[peer_id] = scope
        self._stats.accepts += 1
        self._log("peer_connected", {"peer": peer_id, "direction": "in"})
        self._came_up(peer_id)
        try:
            while True:
                with trio.move_on_after(self._idle_timeout) as idle:
                    batches = await ws.get_messages()
                if idle.cancelled_caught:
                    self._stats.closes["idle"] += 1
                    self._log("peer_idle", {"peer": peer_id, "seconds": self._idle_timeout})
                    await _close(ws, GOING_AWAY, "idle")
                    return
                msgs: list[PeerMessage] = []
                for data in batches:  # every batch that one read brought: one delivery
                    if not isinstance(data, bytes):
                        self._malformed(peer_id, "text message")
                        await _close(ws, UNSUPPORTED_DATA, "binary messages only")
                        return
                    self._stats.received_bytes[peer_id] += len(data)
                    self._stats.received_batches[peer_id] += 1
                    try:
                        msgs += decode(data, max_bytes=self._max_message_bytes)
                    except CodecError as exc:
                        self._malformed(peer_id, str(exc)[:200])
                        await _close(ws, INVALID_PAYLOAD, "malformed batch")
                        return
                if msgs:  # an empty batch is a keepalive
                    try:
                        await self._deliver(peer_id, msgs)
                    except Exception as exc:
                        raise DeliverFailed(f"delivering {peer_id}'s messages: {exc!r}") from exc
        except ConnectionClosed as exc:
            code = exc.code
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


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    with trio.move_on_after(CLOSE_TIMEOUT):
        await ws.aclose(code, reason)


def _remote(tcp: trio.SocketStream) -> str:
    try:
        host, port, *_ = tcp.socket.getpeername()
    except (OSError, ValueError):
        return "?"
    return f"{host}:{port}"
