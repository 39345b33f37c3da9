"""One outgoing peer link: a bounded queue, and a sender task that dials the peer and ships
everything queued as one WebSocket message per wake-up.

Queueing is synchronous and never blocks the core loop: when a peer is slow or down its
queue keeps the newest messages and drops the oldest (Raft retransmits what matters). The
sender dials TCP, then TLS checking that the server's certificate names this peer, then
the WebSocket upgrade, all under one handshake timeout; on any failure it waits a
jittered exponential backoff and dials again, and the queue waits meanwhile.

The node's snapshot-file messages (``files.py``) share the queue and are dropped like any
other: a lost SnapshotChunk or SnapshotAck is not retried here; the file's sender times
out waiting for an ack and restarts the transfer. With PeerTransport's defaults (queues of
4096 messages and 64 MiB, WebSocket messages of up to 64 MiB, batches taken up to half
that) a queue holds dozens of full 1 MiB chunks and a batch holding chunks is sent whole
or split, never refused. Only a ``max_message_bytes`` below one chunk's encoding (1 MiB
plus well under 1 KiB) would make the link drop full chunks as too large
(``peer_message_too_large``).
"""

from __future__ import annotations

import random
import ssl
from collections import deque
from collections.abc import Callable

import trio

from liferaft.core.messages import (
    AppendEntries,
    InstallSnapshot,
    ReadIndexRequest,
    ReadIndexResponse,
)
from liferaft.transport.cluster import ClusterIdentity
from liferaft.transport.codec import encode
from liferaft.transport.files import PeerMessage, SnapshotChunk
from liferaft.transport.stats import LogFn, TransportStats
from liferaft.websocket import ConnectionClosed, ConnectionRejected, WebSocket, connect
from liferaft.websocket.tls import TLSStream

PATH = "/raft"
# A member's answer to a node that a committed configuration change removed: HTTP 410
# at the upgrade, with the index of that change in this header (docs/transport.md).
REMOVED_HEADER = b"liferaft-removed-at"
BACKOFF_MIN = 0.05  # seconds; doubles per failed attempt up to BACKOFF_MAX, full jitter
BACKOFF_MAX = 2.0
RECEIVE_BUFFER = 64 * 1024  # bytes read from TLS at a time
_FIXED_SIZE = 48  # estimated wire bytes of a message apart from its payloads


def estimate_size(m: PeerMessage) -> int:
    """A cheap upper-bound-ish estimate of ``m``'s encoded size, for queue accounting."""
    if type(m) is AppendEntries:
        return _FIXED_SIZE + sum(len(e.data) + 24 for e in m.entries)
    if type(m) is InstallSnapshot:
        return _FIXED_SIZE + 64 + len(m.data) + 16 * len(m.meta.membership.members)
    if type(m) is SnapshotChunk:  # transfer, offset, size, the data's head, the checksum
        return _FIXED_SIZE + 64 + len(m.data)
    if type(m) is ReadIndexRequest or type(m) is ReadIndexResponse:
        return _FIXED_SIZE + len(m.ctx)
    return _FIXED_SIZE


def backoff_cap(failures: int) -> float:
    """The longest wait before the next dial after ``failures`` failures in a row."""
    return min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** min(failures, 16))


class PeerLink:
    """The outgoing half of the connection to one peer."""

    def __init__(
        self,
        peer_id: str,
        address: tuple[str, int],
        *,
        client_ctx: ssl.SSLContext,
        stats: TransportStats,
        log: LogFn,
        rng: random.Random,
        max_message_bytes: int,
        handshake_timeout: float,
        keepalive: float,
        queue_max_messages: int,
        queue_max_bytes: int,
        cluster: ClusterIdentity,
        told_removed: Callable[[str, int], None] | None = None,
    ) -> None:
        self.peer_id = peer_id
        self._told_removed = told_removed  # the peer answered 410: (peer, index)
        self._cluster = cluster
        self.address = address
        self._client_ctx = client_ctx
        self._stats = stats
        self._log = log
        self._rng = rng
        self._max_message_bytes = max_message_bytes
        self._handshake_timeout = handshake_timeout
        self._keepalive = keepalive
        self._queue_max_messages = queue_max_messages
        self._queue_max_bytes = queue_max_bytes
        self._queue: deque[tuple[PeerMessage, int]] = deque()
        self._queued_bytes = 0
        self._wake = trio.Event()
        self._stopped = False
        self._run_scope: trio.CancelScope | None = None
        # the current connection, or the backoff before the next one: redial() cancels it
        self._attempt_scope: trio.CancelScope | None = None
        self._backoff_scope: trio.CancelScope | None = None  # the backoff alone
        self.connected = False
        self._ws: WebSocket | None = None  # while connected: for ``send_now``
        self._sent_at = 0.0  # when ``send_now`` last sent (the keepalive counts from it)

    def set_tls(self, client_ctx: ssl.SSLContext) -> None:
        """The next dial uses ``client_ctx``; the connection that is up keeps its own."""
        self._client_ctx = client_ctx

    # ---------------------------------------------------------------- the queue

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def put(self, m: PeerMessage) -> None:
        """Queue ``m``, dropping the oldest messages if the queue is over a bound."""
        size = estimate_size(m)
        self._queue.append((m, size))
        self._queued_bytes += size
        if (
            len(self._queue) > self._queue_max_messages
            or self._queued_bytes > self._queue_max_bytes
        ):
            self._trim()
        self._wake.set()

    def send_now(self) -> None:
        """Ship what is queued from the caller's task, if the link is up and no write is
        under way; else the sender task does, as before. It spares each batch a task
        switch before it leaves (on a lone write's path, three: the leader's append,
        the follower's answer, the new commit index). Never raises: a failed write is
        the sender task's to find and redial."""
        ws = self._ws
        if ws is None or not self._queue or not ws.can_send_now:
            return
        batch = self._take()
        payloads = self._payloads(batch)
        if payloads:
            try:
                sent = ws.send_now(payloads)
            except ConnectionClosed:
                self._stats.dropped[self.peer_id] += len(batch)
                self._wake.set()  # the sender finds the link closed and redials
                return
            assert sent  # can_send_now held, and nothing ran since
            self._sent_at = trio.current_time()
            self._count_sent(payloads)
        if ws.pending:  # the socket took part of it: the sender task sends the rest
            self._wake.set()

    def _count_sent(self, payloads: list[bytes]) -> None:
        self._stats.sent_bytes[self.peer_id] += sum(map(len, payloads))
        self._stats.sent_batches[self.peer_id] += len(payloads)

    def _trim(self) -> None:
        q = self._queue
        dropped = 0
        while q and (
            len(q) > self._queue_max_messages or self._queued_bytes > self._queue_max_bytes
        ):
            _, size = q.popleft()
            self._queued_bytes -= size
            dropped += 1
        self._stats.dropped[self.peer_id] += dropped

    def discard(self) -> None:
        """Drop everything queued (the peer was removed)."""
        self._stats.dropped[self.peer_id] += len(self._queue)
        self._queue.clear()
        self._queued_bytes = 0

    def _take(self) -> list[PeerMessage]:
        """Everything queued, or as much as fits a WebSocket message by estimate."""
        q = self._queue
        budget = self._max_message_bytes // 2
        if self._queued_bytes <= budget:
            batch = [m for m, _ in q]
            q.clear()
            self._queued_bytes = 0
            return batch
        batch = []
        total = 0
        while q and (not batch or total + q[0][1] <= budget):
            m, size = q.popleft()
            batch.append(m)
            total += size
            self._queued_bytes -= size
        return batch

    def _payloads(self, batch: list[PeerMessage]) -> list[bytes]:
        """``batch`` encoded, split in halves until each part fits a WebSocket message."""
        payload = encode(batch)
        if len(payload) <= self._max_message_bytes:
            return [payload]
        if len(batch) == 1:
            self._stats.dropped[self.peer_id] += 1
            self._log(
                "peer_message_too_large",
                {"peer": self.peer_id, "type": type(batch[0]).__name__, "bytes": len(payload)},
            )
            return []
        half = len(batch) // 2
        return self._payloads(batch[:half]) + self._payloads(batch[half:])

    # ---------------------------------------------------------------- the sender

    def redial(self) -> None:
        """Drop the current connection, or cut the backoff short, and dial ``address``."""
        self._ws = None  # nothing more goes out on the connection being dropped
        if self._attempt_scope is not None:
            self._attempt_scope.cancel()

    def dial_now(self) -> None:
        """Cut a backoff short: the peer just dialled us, so it is up again (a restarted
        node would otherwise wait out a backoff grown while it was down, up to
        BACKOFF_MAX, before it hears from us)."""
        if self._backoff_scope is not None:
            self._backoff_scope.cancel()

    def stop(self) -> None:
        """Stop the sender for good (the peer was removed) and drop its queue."""
        self._stopped = True
        self._ws = None
        if self._run_scope is not None:
            self._run_scope.cancel()
        self.discard()

    async def run(self) -> None:
        """Keep a connection to the peer and ship the queue over it, until cancelled or
        stopped."""
        if self._stopped:
            return
        failures = 0
        with trio.CancelScope() as self._run_scope:
            while True:
                error: BaseException | None = None
                with trio.CancelScope() as self._attempt_scope:
                    try:
                        await self._session()
                    except* Exception as group:  # this task's edge: log, back off, retry
                        error = group
                was_connected, self.connected = self.connected, False
                if was_connected:
                    failures = 0
                    self._stats.disconnects[self.peer_id] += 1
                    self._log(
                        "peer_disconnected",
                        {"peer": self.peer_id, "direction": "out", "error": _describe(error)},
                    )
                if error is None:  # redial() asked for a new connection
                    continue
                index = removed_index(error)
                if index is not None and self._told_removed is not None:
                    self._told_removed(self.peer_id, index)
                if not was_connected:
                    self._stats.connect_failures[self.peer_id] += 1
                if not was_connected and failures % 32 == 0:  # first failure, every 32nd
                    self._log(
                        "peer_connect_failed",
                        {
                            "peer": self.peer_id,
                            "address": f"{self.address[0]}:{self.address[1]}",
                            "error": _describe(error),
                            "attempt": failures + 1,
                        },
                    )
                delay = self._rng.uniform(0, backoff_cap(failures))
                failures += 1
                with trio.move_on_after(delay) as self._attempt_scope:
                    self._backoff_scope = self._attempt_scope
                    await trio.sleep_forever()
                self._attempt_scope = self._backoff_scope = None

    async def _session(self) -> None:
        host, port = self.address
        stream: TLSStream | None = None
        async with trio.open_nursery() as nursery:  # holds the task that watches for a close
            try:
                with trio.fail_after(self._handshake_timeout):
                    tcp = await trio.open_tcp_stream(host, port)
                    stream = TLSStream(
                        tcp, self._client_ctx, server_side=False, server_hostname=self.peer_id
                    )
                    await stream.do_handshake()
                    ws = await connect(
                        stream,
                        f"{host}:{port}",
                        PATH,
                        max_message_size=1024,  # the server never sends us messages
                        receive_buffer=RECEIVE_BUFFER,
                        extra_headers=self._cluster.headers(),
                    )
                self.connected = True
                self._stats.connects += 1
                self._log("peer_connected", {"peer": self.peer_id, "direction": "out"})
                nursery.start_soon(_until_closed, ws)
                await self._pump(ws)
            finally:
                # Close first, cancel second: awaiting after cancelling our own nursery would
                # raise Cancelled here, which the nursery then swallows along with the error.
                if stream is not None:
                    await trio.aclose_forcefully(stream)
                nursery.cancel_scope.cancel()

    async def _pump(self, ws: WebSocket) -> None:
        self._ws = ws
        try:
            await self._pump_on(ws)
        finally:
            self._ws = None

    async def _pump_on(self, ws: WebSocket) -> None:
        while True:
            if not self._queue and not ws.pending:
                # Wait for the doorbell; after ``keepalive`` of silence send an empty batch,
                # which keeps the peer's idle timeout from closing a quiet link.
                with trio.move_on_after(self._keepalive) as quiet:
                    while not self._queue and not ws.pending and ws.closed is None:
                        await self._wake.wait()
                        self._wake = trio.Event()
                if quiet.cancelled_caught and self._sent_at > trio.current_time() - self._keepalive:
                    continue  # ``send_now`` kept the link busy: no keepalive needed
            if ws.closed is not None:  # the server closed; keep the queue for the next link
                raise ws.closed
            if ws.pending and not self._queue:
                await ws.flush()  # the rest of what ``send_now`` sent
                continue
            batch = self._take()  # (empty after a quiet ``keepalive``: a keepalive)
            try:
                payloads = self._payloads(batch)
                if payloads:
                    await ws.send_messages(payloads)  # one write
                self._count_sent(payloads)
            except BaseException:
                # In flight when the link failed: lost (or, rarely, delivered and counted).
                self._stats.dropped[self.peer_id] += len(batch)
                raise


async def _until_closed(ws: WebSocket) -> None:
    """Raise ConnectionClosed as soon as the server closes the link, so that an idle
    sender redials at once instead of finding out on its next send."""
    while True:
        await ws.get_messages()  # the server sends no messages; discard any that come


def removed_index(error: BaseException) -> int | None:
    """The removal index of a 410 answer to our upgrade found in ``error``, if any."""
    if isinstance(error, BaseExceptionGroup):
        for e in error.exceptions:
            found = removed_index(e)
            if found is not None:
                return found
        return None
    if not isinstance(error, ConnectionRejected) or error.status_code != 410:
        return None
    for name, value in error.headers:
        if name.lower() == REMOVED_HEADER:
            try:
                index = int(value.decode("ascii"))
            except ValueError:
                return None
            return index if index > 0 else None
    return None


def _describe(error: BaseException | None) -> str:
    if error is None:
        return ""
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in error.exceptions)
    text = str(error) or str(error.__cause__ or "")  # trio puts the ssl error in __cause__
    return f"{type(error).__name__}: {text}"[:300] if text else type(error).__name__
