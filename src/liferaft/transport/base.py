"""``Transport``: what a node needs from its peer links, so that the whole-node simulator
can put an in-memory network (``liferaft.testing.nodesim``) where ``PeerTransport``'s
mutual-TLS WebSockets are in a real node."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

import trio

from liferaft.transport.files import PeerMessage
from liferaft.transport.stats import TransportStats


class Transport(Protocol):
    stats: TransportStats
    # (peer id, messages of one batch from it); closed when ``run`` returns
    inbound: trio.MemoryReceiveChannel[tuple[str, list[PeerMessage]]]

    def send(self, msgs: Iterable[PeerMessage]) -> None:
        """Queue each message for its ``dst``; never blocks; may drop (bounded queues)."""

    def set_peers(self, peers: Mapping[str, tuple[str, int]]) -> None:
        """Make ``peers`` (id -> address) the set of peers."""

    def connected(self, peer_id: str) -> bool:
        """Whether the link to ``peer_id`` is up."""

    async def run(
        self,
        listen: tuple[str, int],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the links until cancelled."""
