"""Real nodes (with their client API) in one Trio process, on loopback, with real TLS and
real SQLite, and a fault layer between them: partitions, message loss and delay, abrupt crashes.

Trio's scheduler is not deterministic, so these runs are not replayable the way the
simulator's are; what they prove is that the shell around the core (storage, transport,
the task tree) keeps Raft's promises with real I/O. Tests wait on conditions
(``wait_until``), never on the clock.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

import trio

from liferaft.api.server import ClientServer
from liferaft.api.service import serve
from liferaft.config import Settings, load
from liferaft.core import AnyMessage, Role
from liferaft.node.node import Node
from liferaft.node.removal import NodeRemoved
from liferaft.security.tokens import mint


def free_ports(n: int) -> list[int]:
    """Ports the OS reports free right now on 127.0.0.1 (good enough on loopback)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_config(
    path: Path,
    node_id: str,
    members: dict[str, tuple[int, int, int]],
    certs: Path,
    data_dir: Path,
    *,
    heartbeat_ms: int = 20,
    election_ms: int = 100,
    snapshot_entries: int = 10000,
    history_revisions: int = 100000,
    join: bool = False,
    auto_promote: bool = False,
) -> Path:
    """A node config file (docs/operations.md, "Configuration"); ``members`` maps id ->
    ports."""
    peer, client, metrics = members[node_id]
    rows = ",\n".join(
        f'  {{ id = "{m}", peer = "127.0.0.1:{p}", client = "127.0.0.1:{c}" }}'
        for m, (p, c, _) in members.items()
        if not (join and m == node_id)
    )
    path.write_text(
        f"""[node]
id = "{node_id}"
data_dir = "{data_dir}"

[peer]
listen = "127.0.0.1:{peer}"

[client]
listen = "127.0.0.1:{client}"

[metrics]
listen = "127.0.0.1:{metrics}"

[cluster]
members = [
{rows}
]
join = {"true" if join else "false"}
auto_promote = {"true" if auto_promote else "false"}

[tls]
ca = "{certs / "ca.pem"}"
cert = "{certs / f"{node_id}.pem"}"
key = "{certs / f"{node_id}-key.pem"}"

[auth]
jwt_public_keys = ["{certs / "jwt-public.pem"}"]
issuer = "liferaft"
audience = "liferaft"

[raft]
heartbeat_interval_ms = {heartbeat_ms}
election_timeout_ms = {election_ms}
snapshot_entries = {snapshot_entries}

[kv]
history_revisions = {history_revisions}
"""
    )
    return path


class FaultLayer:
    """Sits in each node's send path: one-way blocks, random loss, random delay."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.blocked: set[tuple[str, str]] = set()
        self.drop = 0.0
        self.max_delay = 0.0  # seconds; each message waits uniformly in [0, max_delay]
        self.nursery: trio.Nursery | None = None

    def isolate(self, node: str, others: list[str]) -> None:
        for o in others:
            if o != node:
                self.blocked |= {(node, o), (o, node)}

    def heal(self) -> None:
        self.blocked.clear()
        self.drop = 0.0
        self.max_delay = 0.0

    def filter_for(self, node: Node) -> Callable[[list[AnyMessage]], list[AnyMessage]]:
        def filt(msgs: list[AnyMessage]) -> list[AnyMessage]:
            now: list[AnyMessage] = []
            for m in msgs:
                if (m.src, m.dst) in self.blocked or (self.drop and self.rng.random() < self.drop):
                    continue
                if self.max_delay and self.nursery is not None:
                    self.nursery.start_soon(
                        self._later, node, m, self.rng.random() * self.max_delay
                    )
                else:
                    now.append(m)
            return now

        return filt

    async def _later(self, node: Node, m: AnyMessage, delay: float) -> None:
        await trio.sleep(delay)
        if node.transport is not None and (m.src, m.dst) not in self.blocked:
            node.transport.send([m])


class LocalCluster:
    def __init__(
        self,
        base: Path,
        certs: Path,
        ids: list[str],
        *,
        seed: int = 0,
        heartbeat_ms: int = 20,
        election_ms: int = 100,
        snapshot_entries: int = 10000,
        kv_history: int = 10_000,
        auto_promote: bool = False,
    ) -> None:
        self.base = base
        self.certs = certs
        self.ids = ids
        self.rng = random.Random(seed)
        self.faults = FaultLayer(random.Random(self.rng.getrandbits(64)))
        ports = free_ports(3 * len(ids))
        self.ports = {
            i: (ports[3 * n], ports[3 * n + 1], ports[3 * n + 2]) for n, i in enumerate(ids)
        }
        self.timing = (heartbeat_ms, election_ms, snapshot_entries)
        self.kv_history = kv_history
        self.auto_promote = auto_promote
        self.joiners: set[str] = set()
        self.nodes: dict[str, Node] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        (base / "config").mkdir(parents=True, exist_ok=True)

    def settings(self, node_id: str) -> Settings:
        path = write_config(
            self.base / "config" / f"{node_id}.toml",
            node_id,
            self.ports,
            self.certs,
            self.base / "data" / node_id,
            heartbeat_ms=self.timing[0],
            election_ms=self.timing[1],
            snapshot_entries=self.timing[2],
            history_revisions=self.kv_history,
            join=node_id in self.joiners,
            auto_promote=self.auto_promote,
        )
        return load(path)

    def reserve(self, node_id: str) -> tuple[str, str]:
        """Ports for a node that will join later (``start_node`` starts it with
        ``join = true``); returns its peer and client addresses for ``member_add``."""
        peer, client, metrics = free_ports(3)
        self.ports[node_id] = (peer, client, metrics)
        self.ids.append(node_id)
        self.joiners.add(node_id)
        return f"127.0.0.1:{peer}", f"127.0.0.1:{client}"

    async def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.faults.nursery = nursery
        for i in self.ids:
            await self.start_node(i)

    async def start_node(self, node_id: str) -> Node:
        assert self._nursery is not None
        node = Node(
            self.settings(node_id),
            rng=random.Random(self.rng.getrandbits(64)),
        )
        node._send_filter = self.faults.filter_for(node)
        scope = trio.CancelScope()
        self._scopes[node_id] = scope
        self.nodes[node_id] = node

        async def run(
            task_status: trio.TaskStatus[ClientServer] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            try:
                with scope:
                    await serve(node, task_status=task_status)
            except* NodeRemoved:
                self.nodes.pop(node_id, None)  # it stopped itself, as the process exits 0

        await self._nursery.start(run)
        return node

    def endpoints(self) -> list[str]:
        """The client URLs of every node (running or not)."""
        return [f"wss://127.0.0.1:{self.ports[i][1]}/v1" for i in self.ids]

    def token(
        self,
        roles: str = "read,write,admin",
        *,
        sub: str = "tester",
        ttl_s: int = 3600,
        prefixes: list[str] | None = None,
    ) -> str:
        """A client token signed with the cluster's JWT key."""
        return mint(
            (self.certs / "jwt-private.pem").read_bytes(),
            sub=sub,
            roles=roles.split(","),
            ttl_s=ttl_s,
            prefixes=prefixes,
            now=time.time(),
        )

    def crash(self, node_id: str) -> None:
        """Cancel every task of the node at once: no goodbye to anyone."""
        self._scopes[node_id].cancel()
        del self.nodes[node_id]

    def leader(self) -> str | None:
        """The leader of the highest term, if a majority of the cluster follows it."""
        best: tuple[int, str] | None = None
        for i, n in self.nodes.items():
            r = n.raft
            if r is not None and r.role is Role.LEADER and (best is None or r.term > best[0]):
                best = (r.term, i)
        if best is None:
            return None
        followers = sum(
            1 for n in self.nodes.values() if n.raft is not None and n.raft.leader == best[1]
        )
        return best[1] if followers > len(self.ids) // 2 else None

    async def wait_leader(self) -> str:
        await wait_until(lambda: self.leader() is not None)
        lead = self.leader()
        assert lead is not None
        return lead


async def wait_until(cond: Callable[[], bool], poll: float = 0.01) -> None:
    """Wait for ``cond()``, a condition over several nodes' state that no single event
    signals, so it is polled. Callers bound it with ``trio.fail_after`` as a hang guard."""
    while not cond():  # noqa: ASYNC110 - polling a condition across nodes
        await trio.sleep(poll)
