"""PeerTransport: the node's links to the other cluster members (docs/transport.md).

Each node listens for its peers on one mutual-TLS WebSocket endpoint (``server.py``) and
dials each peer once for the messages it sends them (``link.py``), so every connection
carries messages one way. ``send`` is synchronous and never blocks: the core loop hands
over a Ready's messages and carries on; each peer's sender then ships all that is queued
for that peer as one WebSocket message, which is what makes replication cheap (one
WebSocket message costs ~150 µs whatever it carries). What arrives is decoded, checked and
delivered on ``inbound`` as ``(peer_id, [message, ...])``, one item per batch; or, with
``deliver=``, handed to that coroutine function in the connection's own task, which
spares each batch a trip through a channel and another task on its way to the core
(the node does this: one task switch fewer per message a follower or leader waits for).

Besides the Raft core's messages (``AnyMessage``) the links carry the node's snapshot-file
messages (``files.py``: SnapshotChunk, SnapshotAck), in the same queues and batches and in
order with them; ``inbound`` delivers both kinds (``PeerMessage``), and it is the node's
job to hand only core messages to the core.

Usage::

    transport = PeerTransport("n1", server_ctx=..., client_ctx=..., peers={"n2": ("h", 7002)})
    await nursery.start(transport.run, ("127.0.0.1", 7001))
    transport.send(ready.messages)
    async for peer_id, msgs in transport.inbound: ...
"""

from __future__ import annotations

import random
import ssl
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from functools import partial

import trio

from liferaft.core.messages import MalformedMessage
from liferaft.transport.cluster import ClusterIdentity
from liferaft.transport.files import FILE_MESSAGE_TYPES, PeerMessage, validate_file_message
from liferaft.transport.link import PeerLink
from liferaft.transport.server import Deliver, PeerServer
from liferaft.transport.stats import LogFn, TransportStats, default_log

MiB = 1 << 20


class PeerTransport:
    """A Trio service: ``await nursery.start(transport.run, (host, port))``."""

    def __init__(
        self,
        node_id: str,
        *,
        server_ctx: ssl.SSLContext,
        client_ctx: ssl.SSLContext,
        peers: Mapping[str, tuple[str, int]],
        max_message_bytes: int = 64 * MiB,
        handshake_timeout: float = 5.0,
        max_connections: int = 64,
        idle_timeout: float = 30.0,
        queue_max_messages: int = 4096,
        queue_max_bytes: int = 64 * MiB,
        inbound_max_batches: int = 256,
        rng: random.Random | None = None,
        log: LogFn | None = None,
        cluster: ClusterIdentity | None = None,
        deliver: Deliver | None = None,
        removed_at: Callable[[str], int | None] | None = None,
        told_removed: Callable[[str, int], None] | None = None,
    ) -> None:
        if handshake_timeout <= 0 or idle_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if min(max_message_bytes, max_connections, queue_max_messages, queue_max_bytes) < 1:
            raise ValueError("limits must be positive")
        self.node_id = node_id
        self.stats = TransportStats()
        self.port: int | None = None  # the bound listening port, once run() has started
        self._client_ctx = client_ctx
        self.cluster = cluster if cluster is not None else ClusterIdentity(None)
        self._max_message_bytes = max_message_bytes
        self._handshake_timeout = handshake_timeout
        self._idle_timeout = idle_timeout
        self._queue_max_messages = queue_max_messages
        self._queue_max_bytes = queue_max_bytes
        self._rng = rng if rng is not None else random.Random()
        self._log = log if log is not None else default_log
        self._told_removed = told_removed  # a peer answered that we were removed
        self._links: dict[str, PeerLink] = {}
        self._nursery: trio.Nursery | None = None
        self._inbound_send, self.inbound = trio.open_memory_channel[tuple[str, list[PeerMessage]]](
            inbound_max_batches
        )
        self._server = PeerServer(
            server_ctx=server_ctx,
            members=self._links.keys,
            deliver=deliver if deliver is not None else self._into_inbound,
            came_up=self._came_up,
            stats=self.stats,
            log=self._log,
            max_message_bytes=max_message_bytes,
            handshake_timeout=handshake_timeout,
            max_connections=max_connections,
            idle_timeout=idle_timeout,
            cluster=self.cluster,
            removed_at=removed_at,
        )
        self.set_peers(peers)

    async def _into_inbound(self, peer_id: str, msgs: list[PeerMessage]) -> None:
        await self._inbound_send.send((peer_id, msgs))

    # ---------------------------------------------------------------- counters

    @property
    def sent_bytes(self) -> Counter[str]:
        return self.stats.sent_bytes

    @property
    def received_bytes(self) -> Counter[str]:
        return self.stats.received_bytes

    @property
    def dropped(self) -> Counter[str]:
        return self.stats.dropped

    @property
    def connects(self) -> int:
        return self.stats.connects

    @property
    def rejects(self) -> Counter[str]:
        return self.stats.rejects

    @property
    def peers(self) -> dict[str, tuple[str, int]]:
        return {pid: link.address for pid, link in self._links.items()}

    @property
    def inbound_connections(self) -> int:
        """Incoming connections open now, authenticated or still in their handshake."""
        return self._server.open_connections

    def queued(self, peer_id: str) -> int:
        """How many messages wait for ``peer_id``."""
        link = self._links.get(peer_id)
        return len(link) if link is not None else 0

    def _came_up(self, peer_id: str) -> None:
        """A peer dialled us: if our link to it is backing off, dial it now."""
        link = self._links.get(peer_id)
        if link is not None:
            link.dial_now()

    def connected(self, peer_id: str) -> bool:
        """Whether the outgoing link to ``peer_id`` is up."""
        link = self._links.get(peer_id)
        return link is not None and link.connected

    # ---------------------------------------------------------------- sending

    def send(self, msgs: Iterable[PeerMessage]) -> None:
        """Queue each message for its ``dst``; never blocks. Over a queue's bounds the
        oldest messages are dropped; messages for a node that is not a peer are dropped.

        A SnapshotChunk or SnapshotAck that ``validate_file_message`` refuses raises
        MalformedMessage (a ValueError) here, the messages before it staying queued: sent,
        it would make the receiver close the link, losing the whole batch with it."""
        links = self._links
        for m in msgs:
            if isinstance(m, FILE_MESSAGE_TYPES):
                try:
                    validate_file_message(m)
                except MalformedMessage as exc:
                    raise MalformedMessage(f"refusing to send {type(m).__name__}: {exc}") from None
            link = links.get(m.dst)
            if link is None:
                self.stats.dropped_unknown += 1
                continue
            link.put(m)
        for link in links.values():
            link.send_now()

    def set_peers(self, peers: Mapping[str, tuple[str, int]]) -> None:
        """Make ``peers`` (id -> address to dial) the set of peers, e.g. after a membership
        change: removed peers lose their queue and both their links, new ones are dialled,
        and a peer whose address changed is redialled (its queue is kept)."""
        wanted = {pid: (host, int(port)) for pid, (host, port) in peers.items()}
        wanted.pop(self.node_id, None)
        for pid in [p for p in self._links if p not in wanted]:
            gone = self._links.pop(pid)
            gone.stop()
            self._server.drop(pid)
            self._log("peer_removed", {"peer": pid})
        for pid, address in wanted.items():
            link = self._links.get(pid)
            if link is None:
                link = self._links[pid] = self._new_link(pid, address)
                if self._nursery is not None:
                    self._nursery.start_soon(link.run)
            elif link.address != address:
                link.address = address
                link.redial()

    def set_tls(self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
        """Use these contexts for every handshake from now on (a certificate reload):
        connections already up keep theirs, so no link drops for it."""
        self._client_ctx = client_ctx
        self._server.set_tls(server_ctx)
        for link in self._links.values():
            link.set_tls(client_ctx)

    def _new_link(self, peer_id: str, address: tuple[str, int]) -> PeerLink:
        return PeerLink(
            peer_id,
            address,
            client_ctx=self._client_ctx,
            stats=self.stats,
            log=self._log,
            rng=self._rng,
            max_message_bytes=self._max_message_bytes,
            handshake_timeout=self._handshake_timeout,
            keepalive=self._idle_timeout / 3,
            queue_max_messages=self._queue_max_messages,
            queue_max_bytes=self._queue_max_bytes,
            cluster=self.cluster,
            told_removed=self._told_removed,
        )

    # ---------------------------------------------------------------- running

    async def run(
        self,
        listen: tuple[str, int],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``listen`` (port 0 picks one: see ``port``) and keep a link to every
        peer until cancelled. ``inbound`` is closed when this returns."""
        if self._nursery is not None:
            raise RuntimeError("PeerTransport.run() is already running")
        host, port = listen
        try:
            listeners = await trio.open_tcp_listeners(port, host=host or None)
            self.port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(trio.serve_listeners, self._server.handle, listeners))
                self._nursery = nursery
                for link in self._links.values():
                    nursery.start_soon(link.run)
                self._log("peer_listening", {"address": f"{host}:{self.port}"})
                task_status.started()
        finally:
            self._nursery = None
            self._inbound_send.close()
