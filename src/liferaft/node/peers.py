"""The node's side of the peer links: what leaves for the other members and what
arrives from them.

Raft messages leave in one batch per send; an ``InstallSnapshot`` from the core never
leaves as it is, because the state is a file: it starts a file transfer instead
(``liferaft.node.transfer``), which ends with the InstallSnapshot this module makes. On
the way in, file chunks and their acknowledgements go to the transfer code and Raft
messages to the core loop, an InstallSnapshot only once the file it names is here
whole (docs/architecture.md, "Snapshots are files").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import trio

from liferaft.core import (
    AnyMessage,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Membership,
    Raft,
    Role,
)
from liferaft.node import transfer
from liferaft.node.addresses import peer_hosts
from liferaft.node.inputs import Input, Messages
from liferaft.observability.logs import event
from liferaft.transport.files import PeerMessage, SnapshotAck, SnapshotChunk

if TYPE_CHECKING:
    from liferaft.node.node import Node

log = logging.getLogger("liferaft.node")


def log_transport_event(name: str, fields: dict[str, object]) -> None:
    event(log, name, **fields)  # type: ignore[arg-type]  # fields never hold 'level'


class PeerLinks:
    def __init__(self, node: Node, inputs: trio.MemorySendChannel[Input]) -> None:
        self._node = node
        self._inputs = inputs
        self.nursery: trio.Nursery | None = None  # where snapshot transfers run
        # peer -> (read_round, when) of the oldest heartbeat it has not answered: the
        # answer that echoes that round gives the peer round-trip time
        self._heartbeats: dict[str, tuple[int, float]] = {}
        self._rtt: dict[str, Any] = {}  # peer -> its histogram child (labels() is slow)

    def send(self, msgs: Iterable[AnyMessage]) -> None:
        node = self._node
        batch: list[AnyMessage] = []
        for m in msgs:
            if isinstance(m, InstallSnapshot):  # the state is a file: stream it
                if node.sender is not None and self.nursery is not None:
                    node.sender.wanted(m, self.nursery)
            else:
                if type(m) is Heartbeat:
                    self._heartbeat_sent(m)
                batch.append(m)
        if not batch or node.transport is None:
            return
        if node._send_filter is not None:  # set by the tests' fault layer
            batch = node._send_filter(batch)
        out: list[PeerMessage] = list(batch)
        node.transport.send(out)

    def dial(self, membership: Membership) -> None:
        """Keep a link to every other member whose address we know."""
        node = self._node
        if node.transport is None:
            return
        node.transport.set_peers(peer_hosts(node.addresses, membership.members - {node.id}))

    async def forward_inbound(self) -> None:
        """Deliver what a transport without ``deliver=`` puts on its ``inbound``."""
        node = self._node
        assert node.transport is not None
        async for peer, msgs in node.transport.inbound:
            await self.deliver(peer, msgs)

    async def deliver(self, peer: str, msgs: list[PeerMessage]) -> None:
        """Raft messages go to the core loop; snapshot file chunks and their acks to the
        transfer code; an InstallSnapshot only once its file is here whole. Runs in the
        task of the connection they came on."""
        node = self._node
        assert node.sender is not None and node.receiver is not None
        core: list[AnyMessage] = []
        for m in msgs:
            if m.src != peer:  # a peer speaks only for itself
                continue
            if isinstance(m, SnapshotChunk):
                node.receiver.on_chunk(m)
            elif isinstance(m, SnapshotAck):
                node.sender.on_ack(m)
            elif isinstance(m, InstallSnapshot):
                if self._snapshot_on_disk(m):
                    core.append(m)
            else:
                if type(m) is HeartbeatResponse:
                    self._round_trip(peer, m.read_round)
                core.append(m)
        if core:
            await self._inputs.send(Messages(peer, core))

    def _heartbeat_sent(self, m: Heartbeat) -> None:
        """Time the oldest unanswered heartbeat to each peer; one unanswered for an
        election timeout was lost (or its answer was): time the next one instead."""
        now = trio.current_time()
        pending = self._heartbeats.get(m.dst)
        lost_after = self._node.settings.raft.election_timeout_ms / 1000
        if pending is None or now - pending[1] > lost_after:
            self._heartbeats[m.dst] = (m.read_round, now)

    def _round_trip(self, peer: str, read_round: int) -> None:
        sent = self._heartbeats.get(peer)
        if sent is None or sent[0] != read_round:
            return
        del self._heartbeats[peer]
        hist = self._rtt.get(peer)
        if hist is None:
            hist = self._rtt[peer] = self._node.metrics.peer_round_trip_time.labels(peer)
        hist.observe(trio.current_time() - sent[1])

    def _snapshot_on_disk(self, m: InstallSnapshot) -> bool:
        receiver = self._node.receiver
        assert receiver is not None
        try:
            about = transfer.parse(m.data)
        except ValueError:
            return False
        transfer_id = about.get("transfer")
        return isinstance(transfer_id, int) and receiver.has(transfer_id)

    def step_snapshot(self, raft: Raft, m: InstallSnapshot) -> None:
        """Step a snapshot whose file is here; if the core does not restore from it (it
        holds those entries already), the file is not needed and goes at once."""
        before = raft.log.snapshot_index
        raft.step(m)
        if raft.log.snapshot_index == before or raft.log.snapshot_index != m.meta.index:
            transfer_id = transfer.parse(m.data).get("transfer")
            receiver = self._node.receiver
            if receiver is not None and isinstance(transfer_id, int):
                receiver.discard(transfer_id)

    def finish_transfer(
        self, msg: InstallSnapshot, transfer_id: int, applied: int
    ) -> InstallSnapshot | None:
        """The InstallSnapshot that ends a transfer: the core's current snapshot (never
        past the copy's applied index: compaction is held there), if this node is still
        the leader of the term that asked for it."""
        node = self._node
        raft, meta = node.raft, node.snapshot_meta
        if raft is None or raft.role is not Role.LEADER or raft.term != msg.term:
            return None
        if meta is None or meta.index > applied:
            return None
        return InstallSnapshot(
            term=msg.term,
            src=node.id,
            dst=msg.dst,
            meta=meta,
            offset=0,
            data=transfer.describe(transfer_id, applied, node.applied_addresses),
            done=True,
        )
