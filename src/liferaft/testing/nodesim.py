"""The whole-node simulator: real nodes and real clients under Trio's ``MockClock``.

What runs is the product's own code: each ``Node`` with its core loop, applier,
compactor, checkpointer, waiters, snapshot transfers and state database (SQLite in a
temp dir, its calls made inline: ``liferaft.storage.offload``), each node's client API
(``ClientServer``: requests, write batches, watches), and ``liferaft.client.Client``
with its sessions, retries and watch resumption. Only the wires are simulated: peer
messages cross a ``SimNetwork`` that loses, delays (so reorders) and partitions them, and
clients reach a node's API over in-memory byte streams. A nemesis crashes and restarts
nodes (a crash cancels every task of the node at once; what it committed to SQLite
stays, as after ``kill -9``), isolates nodes, makes the network lossy and moves
leadership, all while clients put and get.

One seed decides everything: the workload, the faults, the network's choices, each
node's randomness and Trio's own scheduling order (its deterministic mode, the one
Hypothesis uses), and the mock clock makes time a function of the run, not of the
machine. So a failing seed replays exactly, in this process or another (a test checks
it, under two different ``PYTHONHASHSEED``s): ``liferaft sim --whole-node --seed N`` or
``pytest tests/sim --seed N``.

After the run the checker asks: is the client history linearizable (per key,
``testing.linearizability``); is every acknowledged put in the store exactly once, and
every stored value one that a client put; do all replicas hold the same state; did every
watch deliver every event, in order, with no gap or repeat; is no proposal, read or
apply waiter left behind; and did memory stay within its bounds (the in-memory log).
docs/reliability.md describes the runs and what they found.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio.testing

from liferaft.api.server import ClientServer
from liferaft.api.service import serve
from liferaft.client import Client, LiferaftError
from liferaft.client.wire import Endpoint
from liferaft.config import load
from liferaft.core import Ready, Role
from liferaft.node.loop import READ_ROUNDS_MAX
from liferaft.node.node import Node
from liferaft.node.removal import NodeRemoved
from liferaft.security.certs import generate
from liferaft.security.tokens import mint
from liferaft.storage.errors import StorageError
from liferaft.storage.offload import inline_io
from liferaft.storage.sqlite import Storage
from liferaft.testing.linearizability import Op, check
from liferaft.testing.localcluster import write_config
from liferaft.transport.files import PeerMessage
from liferaft.transport.stats import TransportStats

PREFIX = "k/"
LEASE_PREFIX = "lease/"
LEASE_CHECKPOINT_S = 1.0  # the leased keys (outside PREFIX: the watch checks stay as they were)
ACTIONS = [  # what the nemesis does, each as likely
    *("crash", "crash_leader", "isolate", "lossy", "heal", "transfer", "disk"),
    *("add", "promote", "remove"),
]
PASS_WRITES_MAX = 500  # writes to pass the proposals a deposed leader left, at most


@dataclass(frozen=True)
class SimConfig:
    nodes: int = 3
    spares: int = 1  # ids the nemesis may add as members (and remove again)
    clients: int = 4
    ops_per_client: int = 40
    think_s: float = 0.25  # a client's pause between two operations, at most
    keys: int = 3
    faults: bool = True
    loss: float = 0.01  # chance that a peer message is lost (more during a lossy spell)
    delay_ms: tuple[float, float] = (0.5, 8.0)  # one-way delay of a peer message
    heartbeat_ms: int = 50
    election_ms: int = 300
    snapshot_entries: int = 24  # small: snapshots, compaction and installs happen often
    client_timeout_s: float = 4.0
    settle_s: float = 60.0  # after the workload: time to heal and converge (virtual)
    leases: int = 2  # leases a client holds one after another, each kept alive a while
    lease_ttl_s: int = 2


@dataclass
class SimResult:
    seed: int
    history: list[Op] = field(default_factory=list)
    timeline: list[tuple[float, str]] = field(default_factory=list)  # (virtual s, fault)
    problems: list[str] = field(default_factory=list)
    acked_puts: int = 0
    events_seen: int = 0
    elections: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        lines = [
            f"seed {self.seed}: {len(self.history)} ops, {self.acked_puts} acknowledged puts,"
            f" {self.events_seen} watch events, {len(self.timeline)} faults, "
            f"{self.elections} leader changes",
        ]
        lines += [f"  {t:8.3f}s {what}" for t, what in self.timeline]
        lines += [f"PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)


# ---------------------------------------------------------------- the network


class SimNetwork:
    """Peer messages in flight, each delivered after a seeded delay unless lost or cut."""

    def __init__(self, rng: random.Random, loss: float, delay_ms: tuple[float, float]) -> None:
        self._rng = rng
        self.base_loss = self.loss = loss
        self._delay = (delay_ms[0] / 1000, delay_ms[1] / 1000)
        self.transports: dict[str, SimTransport] = {}
        self.blocked: set[tuple[str, str]] = set()
        self._queue: list[tuple[float, int, str, PeerMessage]] = []
        self._seq = itertools.count()
        self._wake = trio.Event()
        self.delivered = 0
        self.dropped = 0

    def isolate(self, node: str, others: Iterable[str]) -> None:
        for o in others:
            if o != node:
                self.blocked |= {(node, o), (o, node)}

    def heal(self) -> None:
        self.blocked.clear()
        self.loss = self.base_loss

    def rejoin(self, node: str) -> None:
        self.blocked = {(a, b) for a, b in self.blocked if node not in (a, b)}

    def reachable(self, src: str, dst: str) -> bool:
        return dst in self.transports and (src, dst) not in self.blocked

    def send(self, src: str, msgs: Iterable[PeerMessage]) -> None:
        now = trio.current_time()
        for m in msgs:
            if (src, m.dst) in self.blocked or self._rng.random() < self.loss:
                self.dropped += 1
                continue
            due = now + self._rng.uniform(*self._delay)
            heapq.heappush(self._queue, (due, next(self._seq), src, m))
        self._wake.set()

    async def run(self) -> None:
        while True:
            if not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            due = self._queue[0][0]
            if due > trio.current_time():
                self._wake = trio.Event()
                with trio.move_on_at(due):
                    await self._wake.wait()
                continue
            _, _, src, m = heapq.heappop(self._queue)
            t = self.transports.get(m.dst)
            if t is None or (src, m.dst) in self.blocked:
                self.dropped += 1
                continue
            try:
                t.deliver.send_nowait((src, [m]))
                self.delivered += 1
            except (trio.WouldBlock, trio.ClosedResourceError):
                self.dropped += 1  # a full inbound queue drops, as a real link's does


class SimTransport:
    """``Transport`` over a ``SimNetwork``: a node's peer links in the simulator."""

    def __init__(self, node_id: str, network: SimNetwork) -> None:
        self.node_id = node_id
        self.stats = TransportStats()
        self._network = network
        self.deliver, self.inbound = trio.open_memory_channel[tuple[str, list[PeerMessage]]](256)
        self.peers: dict[str, tuple[str, int]] = {}

    def send(self, msgs: Iterable[PeerMessage]) -> None:
        self._network.send(self.node_id, msgs)

    def set_peers(self, peers: Mapping[str, tuple[str, int]]) -> None:
        self.peers = dict(peers)

    def connected(self, peer_id: str) -> bool:
        return self._network.reachable(self.node_id, peer_id)

    async def run(
        self,
        listen: tuple[str, int],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._network.transports[self.node_id] = self
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            if self._network.transports.get(self.node_id) is self:
                del self._network.transports[self.node_id]
            self.deliver.close()


# ---------------------------------------------------------------- the cluster


@contextlib.contextmanager
def deterministic_scheduling(seed: int) -> Iterator[None]:
    """Trio's scheduler in the mode Hypothesis uses: runnable tasks in an order drawn
    from a seeded generator instead of a random one. Process-wide while it lasts."""
    from trio._core import _run  # the documented hook is private; pinned by a test

    saved_flag, saved_state = _run._ALLOW_DETERMINISTIC_SCHEDULING, _run._r.getstate()
    _run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    _run._r.seed(seed)
    try:
        yield
    finally:
        _run._ALLOW_DETERMINISTIC_SCHEDULING = saved_flag  # type: ignore[misc]
        _run._r.setstate(saved_state)


_CERTS: dict[str, Path] = {}


def sim_certs(ids: list[str]) -> Path:
    """One CA and node certificates for the run (made once per process: key generation
    is the slowest part of a short run)."""
    key = ",".join(ids)
    if key not in _CERTS:
        d = Path(tempfile.mkdtemp(prefix="liferaft-sim-certs-"))
        generate(d, ids)
        _CERTS[key] = d
    return _CERTS[key]


class SimCluster:
    def __init__(self, base: Path, cfg: SimConfig, rng: random.Random) -> None:
        self.base = base
        self.cfg = cfg
        self.rng = rng
        self.ids = [f"n{i}" for i in range(1, cfg.nodes + 1)]  # the first members
        self.all_ids = [f"n{i}" for i in range(1, cfg.nodes + cfg.spares + 1)]
        self.certs = sim_certs(self.all_ids)
        self.network = SimNetwork(random.Random(rng.getrandbits(64)), cfg.loss, cfg.delay_ms)
        # fake ports: addresses only name the nodes, nothing listens
        self.ports = {
            i: (20000 + 3 * n, 20001 + 3 * n, 20002 + 3 * n) for n, i in enumerate(self.all_ids)
        }
        self.members = set(self.ids)  # as far as the harness knows (settle asks the leader)
        self.learners: set[str] = set()
        self._joined: set[str] = set()  # added to a running cluster: their config joins
        self._data: dict[str, Path] = {}  # node id -> its current data dir
        self._incarnations = itertools.count(1)
        self.by_client_port = {c: i for i, (_, c, _) in self.ports.items()}
        self.nodes: dict[str, Node] = {}
        self.apis: dict[str, ClientServer] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._nurseries: dict[str, trio.Nursery] = {}
        self._nursery: trio.Nursery | None = None
        self.stopped: dict[str, trio.Event] = {}
        self.down: list[str] = []  # crashed or failed, not restarted yet, oldest first
        self._armed: list[Storage] = []  # storages with a disk failure to come
        self.on_fault: Callable[[str], None] = lambda what: None

    def _settings_path(self, node_id: str) -> Path:
        cfg = self.cfg
        (self.base / "config").mkdir(parents=True, exist_ok=True)
        return write_config(
            self.base / "config" / f"{node_id}.toml",
            node_id,
            {m: self.ports[m] for m in sorted(self.members | {node_id})},
            self.certs,
            self._data[node_id],
            heartbeat_ms=cfg.heartbeat_ms,
            election_ms=cfg.election_ms,
            snapshot_entries=cfg.snapshot_entries,
            history_revisions=1_000_000,  # the checker reads every event at the end
            join=node_id in self._joined,
        )

    def addresses(self, node_id: str) -> tuple[str, str]:
        peer, client, _ = self.ports[node_id]
        return f"127.0.0.1:{peer}", f"127.0.0.1:{client}"

    async def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self.network.run)
        for i in self.ids:
            await self.start_node(i)

    async def start_node(self, node_id: str, *, fresh: bool = False) -> None:
        """Start ``node_id`` on its data dir, or with ``fresh`` on a new, empty one as a
        node joining the running cluster (after a member_add)."""
        assert self._nursery is not None
        old = self.stopped.get(node_id)
        if old is not None:
            await old.wait()  # the crashed incarnation has let go of its files
        if fresh:
            self._joined.add(node_id)
        if fresh or node_id not in self._data:
            self._data[node_id] = self.base / "data" / f"{node_id}-{next(self._incarnations)}"
        settings = load(self._settings_path(node_id))
        net = self.network
        node = Node(
            settings,
            rng=random.Random(self.rng.getrandbits(64)),
            transport=lambda n: SimTransport(n.id, net),
            serve_health=False,
        )
        # Checkpoint the TTL left of every lease each second (the leases live 2 s): the
        # renewals after a checkpoint, and new leaders counting from it, are exercised.
        node.lessor.checkpoint_seconds = LEASE_CHECKPOINT_S
        scope = trio.CancelScope()
        self._scopes[node_id] = scope
        self.stopped[node_id] = node.stopped
        self.nodes[node_id] = node

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    async with trio.open_nursery() as nursery:
                        self._nurseries[node_id] = nursery
                        self.apis[node_id] = await nursery.start(partial_serve(node))
                        task_status.started()
            except* StorageError:  # fail-stop, as the real process exits 1
                if self.nodes.get(node_id) is node:
                    self.on_fault(f"{node_id} stopped on its storage error")
                    self._forget(node_id)
            except* NodeRemoved:  # it stopped itself, as the real process exits 0
                if self.nodes.get(node_id) is node:
                    self.on_fault(f"{node_id} stopped: removed")
                    self._forget(node_id, down=False)

        await self._nursery.start(run)

    def crash(self, node_id: str) -> None:
        self._scopes[node_id].cancel()
        self._forget(node_id)

    def stop(self, node_id: str) -> None:
        """Stop a node for good (it was removed from the cluster)."""
        if node_id in self._scopes:
            self._scopes[node_id].cancel()
        self._forget(node_id, down=False)
        if node_id in self.down:
            self.down.remove(node_id)

    def _forget(self, node_id: str, *, down: bool = True) -> None:
        self.nodes.pop(node_id, None)
        self.apis.pop(node_id, None)
        self._nurseries.pop(node_id, None)
        if down:
            self.down.append(node_id)

    def fail_disk(self, node_id: str, *, after_commit: bool) -> bool:
        """Make the node's next raft.db write fail (once), before it reaches the disk or
        after it did (a failed fsync: the data may be there or not); the node must stop
        without acknowledging it."""
        node = self.nodes.get(node_id)
        if node is None or node.storage is None:
            return False
        storage = node.storage.storage
        if "save" in vars(storage):
            return False  # armed already
        real = storage.save

        def failing(rd: Ready) -> None:
            vars(storage).pop("save", None)  # once: the next incarnation opens its own
            if after_commit:
                real(rd)
            raise StorageError("injected by the simulator: the disk failed")

        storage.save = failing  # type: ignore[method-assign]
        self._armed.append(storage)
        return True

    def disarm(self) -> None:
        """Take back disk failures not yet triggered."""
        for storage in self._armed:
            if "save" in vars(storage):
                del storage.save
        self._armed.clear()

    def leader(self) -> str | None:
        best: tuple[int, str] | None = None
        for i, n in self.nodes.items():
            r = n.raft
            if r is not None and r.role is Role.LEADER and (best is None or r.term > best[0]):
                best = (r.term, i)
        return None if best is None else best[1]

    def endpoints(self) -> list[str]:
        return [f"wss://127.0.0.1:{self.ports[i][1]}/v1" for i in self.all_ids]

    def token(self) -> str:
        return mint(
            (self.certs / "jwt-private.pem").read_bytes(),
            sub="sim",
            roles=["read", "write", "admin"],
            ttl_s=24 * 3600,
            now=time.time(),  # tokens are checked against the real clock
        )

    async def client(
        self, call_timeout: float, rng: random.Random, reads: str = "leader"
    ) -> Client:
        """A connected client of the cluster, over the simulator's streams;
        ``call_timeout`` bounds each of its calls."""
        return await Client.connect(
            self.endpoints(),
            token=self.token(),
            timeout=call_timeout,
            rng=rng,
            dial=self.dial,
            reads=reads,
        )

    async def dial(self, ep: Endpoint) -> trio.abc.Stream:
        """A client's connection: an in-memory stream to the node's API, served in the
        node's nursery (so it dies with the node); refused if the node is down."""
        await trio.sleep(self.rng.uniform(*self.cfg.delay_ms) / 1000)
        node_id = self.by_client_port.get(ep.port)
        api = self.apis.get(node_id) if node_id is not None else None
        nursery = self._nurseries.get(node_id) if node_id is not None else None
        if api is None or nursery is None:
            raise OSError(errno.ECONNREFUSED, f"{node_id} is down")
        client_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(api.serve_stream, server_end, f"sim:{node_id}")
        return client_end


def partial_serve(node: Node) -> Callable[..., Any]:
    async def go(task_status: trio.TaskStatus[ClientServer] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(node, listen=False, task_status=task_status)

    return go


# ---------------------------------------------------------------- the run


class Simulation:
    def __init__(self, seed: int, cfg: SimConfig, base: Path) -> None:
        self.seed = seed
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.cluster = SimCluster(base, cfg, random.Random(self.rng.getrandbits(64)))
        self.result = SimResult(seed)
        self.watched: list[tuple[int, str, str, bytes]] = []  # (rev, key, type, value)
        # leased key -> the send time of the last keepalive (or grant) acknowledged for
        # its lease: the key must live at least a TTL after it
        self.leased: dict[str, float] = {}
        self.lease_events: list[tuple[float, str, str]] = []  # (seen at, key, type)
        self._workload_done = trio.Event()
        self._nemesis_done = trio.Event()

    def _fault(self, what: str) -> None:
        self.result.timeline.append((trio.current_time(), what))

    async def run(self) -> SimResult:
        c = self.cluster
        async with trio.open_nursery() as nursery:
            await c.start(nursery)
            nursery.start_soon(self._count_elections)
            watcher_started = trio.Event()
            nursery.start_soon(self._watcher, watcher_started)
            await watcher_started.wait()
            lease_watch_started = trio.Event()
            nursery.start_soon(self._lease_watcher, lease_watch_started)
            await lease_watch_started.wait()
            if self.cfg.faults:
                nursery.start_soon(self._nemesis)
            else:
                self._nemesis_done.set()
            async with trio.open_nursery() as clients:
                for cid in range(self.cfg.clients):
                    clients.start_soon(self._client, cid)
                if self.cfg.leases:
                    clients.start_soon(self._leaser)
            self._workload_done.set()
            await self._settle()
            await self._pass_pending_proposals()
            await self._check_watch_complete()
            self._check_state()
            await self._check_leases()
            # A read whose round was lost is failed after READ_ROUNDS_MAX election
            # timeouts (its caller gave up long before): after that, nothing may wait.
            await trio.sleep((READ_ROUNDS_MAX + 1) * self.cfg.election_ms / 1000)
            self._check_waiters()
            nursery.cancel_scope.cancel()
        self._check_history()
        return self.result

    async def _client(self, cid: int) -> None:
        rng = random.Random(self.rng.getrandbits(64))
        c = self.cluster
        client = await c.client(
            self.cfg.client_timeout_s,
            random.Random(rng.getrandbits(64)),
            reads="followers" if cid % 2 else "leader",  # follower reads: ReadIndex hops
        )
        async with client:
            for n in range(self.cfg.ops_per_client):
                key = f"{PREFIX}{rng.randrange(self.cfg.keys)}"
                start = trio.current_time()
                if rng.random() < 0.5:
                    value = b"c%d-%d" % (cid, n)
                    end: float | None
                    try:
                        await client.put(key, value)
                        end = trio.current_time()
                        self.result.acked_puts += 1
                    except LiferaftError as exc:
                        self._client_error("put", exc)
                        end = None  # unknown: it may have happened or not
                    self.result.history.append(Op(cid, "put", key, value, start, end))
                else:
                    try:
                        kv = await client.get(key)
                    except LiferaftError as exc:
                        self._client_error("get", exc)
                        continue
                    got = kv.value if kv is not None else None
                    self.result.history.append(Op(cid, "get", key, got, start, trio.current_time()))
                await trio.sleep(rng.uniform(0, self.cfg.think_s))

    async def _leaser(self) -> None:
        """Leases through the faults: grant one, put a key with it, keep it alive for a
        while (each keepalive to whichever node leads), then let it go."""
        rng = random.Random(self.rng.getrandbits(64))
        client = await self.cluster.client(
            self.cfg.client_timeout_s, random.Random(rng.getrandbits(64))
        )
        ttl = self.cfg.lease_ttl_s
        async with client:
            for n in range(self.cfg.leases):
                key = f"{LEASE_PREFIX}{n}"
                sent = trio.current_time()
                try:
                    lease = (await client.lease_grant(ttl)).id
                    await client.put(key, b"held", lease=lease)
                except LiferaftError as exc:
                    self._client_error("lease", exc)
                    continue
                self.leased[key] = sent
                until = trio.current_time() + rng.uniform(0, 3 * ttl)
                while trio.current_time() < until:
                    # irregular renewals, some late: a checkpoint may then record little
                    # TTL left, which the next renewal must write back
                    await trio.sleep(rng.uniform(ttl / 4, 0.8 * ttl))
                    sent = trio.current_time()
                    try:
                        await client.lease_keepalive_once(lease)
                    except LiferaftError as exc:
                        self._client_error("lease_keepalive", exc)
                        if exc.code == "not_found":  # gone: was it kept alive in time?
                            break
                        continue
                    self.leased[key] = sent

    async def _lease_watcher(self, started: trio.Event) -> None:
        client = await self.cluster.client(30.0, random.Random(self.rng.getrandbits(64)))
        async with client, client.watch(prefix=LEASE_PREFIX, start_revision=1) as events:
            started.set()
            async for ev in events:
                self.lease_events.append((trio.current_time(), ev.kv.key, ev.type))

    async def _check_leases(self) -> None:
        """No leased key went before a TTL after its last acknowledged keepalive, and
        every lease expired in the end (the faults are over: within a TTL and a few
        election timeouts)."""
        ttl = self.cfg.lease_ttl_s
        await trio.sleep(ttl + 4 * self.cfg.election_ms / 1000 + 1)
        for at, key, kind in self.lease_events:
            last = self.leased.get(key)
            if kind == "delete" and last is not None and at < last + ttl:
                self.result.problems.append(
                    f"lease: {key} deleted at {at:.3f}s, before its TTL after the keepalive "
                    f"acknowledged at {last:.3f}s"
                )
        node = self.cluster.nodes[min(self.cluster.nodes)]
        left = [kv["key"] for kv in node.kv.db.range(LEASE_PREFIX)[0]]
        if left or node.kv.db.leases():
            self.result.problems.append(
                f"lease: {left or 'no keys'} and leases {node.kv.db.leases()} still there "
                "after every keepalive stopped"
            )

    async def _watcher(self, started: trio.Event) -> None:
        """One watch over every key from revision 1, through every fault: the client
        resumes it after each reconnect."""
        c = self.cluster
        client = await c.client(30.0, random.Random(self.rng.getrandbits(64)))
        async with client, client.watch(prefix=PREFIX, start_revision=1) as events:
            started.set()
            async for ev in events:
                self.watched.append((ev.kv.mod_revision, ev.kv.key, ev.type, bytes(ev.kv.value)))

    async def _count_elections(self) -> None:
        last: tuple[int, str] | None = None
        while True:
            lead = self.cluster.leader()
            if lead is not None:
                term = self.cluster.nodes[lead].raft.term  # type: ignore[union-attr]
                if last is not None and (term, lead) != last:
                    self.result.elections += 1
                last = (term, lead)
            await trio.sleep(0.01)

    async def _nemesis(self) -> None:
        c = self.cluster
        c.on_fault = self._fault
        admin = await c.client(3.0, random.Random(self.rng.getrandbits(64)))
        async with admin, trio.open_nursery() as later:
            await self._faults(admin, later)
        self._nemesis_done.set()

    async def _rejoin_after(self, node_id: str, seconds: float) -> None:
        await trio.sleep(seconds)
        self._fault(f"{node_id} rejoins")
        self.cluster.network.rejoin(node_id)

    async def _faults(self, admin: Client, later: trio.Nursery) -> None:
        rng = random.Random(self.rng.getrandbits(64))
        c, net = self.cluster, self.cluster.network
        down = c.down
        while True:
            with trio.move_on_after(rng.uniform(0.2, 1.5)):
                await self._workload_done.wait()
            if self._workload_done.is_set():
                break
            action = rng.choice(ACTIONS)
            members = sorted(c.members)
            if down and rng.random() < 0.6:
                node_id = down.pop(0)
                self._fault(f"restart {node_id}")
                await c.start_node(node_id)
            elif action in ("crash", "crash_leader") and not down:
                victim = c.leader() if action == "crash_leader" else rng.choice(members)
                if victim is not None:
                    self._fault(f"crash {victim}")
                    c.crash(victim)
            elif action == "isolate":
                victim = c.leader() if rng.random() < 0.5 else rng.choice(members)
                if victim is not None:
                    self._fault(f"isolate {victim}")
                    net.isolate(victim, c.all_ids)
                    if rng.random() < 0.7:  # a blip: back before its clients give up
                        later.start_soon(self._rejoin_after, victim, rng.uniform(0.1, 1.0))
            elif action == "disk" and not down:
                victim = c.leader() if rng.random() < 0.5 else rng.choice(members)
                after = rng.random() < 0.5
                if victim is not None and c.fail_disk(victim, after_commit=after):
                    when = "after" if after else "before"
                    self._fault(f"disk of {victim} fails {when} its next commit")
            elif action == "lossy":
                net.loss = rng.choice([0.1, 0.3])
                self._fault(f"loss {net.loss:.0%}")
            elif action == "heal":
                self._fault("heal")
                net.heal()
            elif action == "transfer":
                lead = c.leader()
                if lead is not None and lead in c.nodes:
                    self._fault(f"transfer from {lead}")
                    with trio.move_on_after(1.0):
                        with contextlib.suppress(Exception):
                            await c.nodes[lead].transfer_leadership(None)
            elif action in ("add", "promote", "remove"):
                await self._change_membership(admin, action, rng)
        while down:
            node_id = down.pop(0)
            self._fault(f"restart {node_id}")
            await c.start_node(node_id)

    async def _change_membership(self, admin: Client, action: str, rng: random.Random) -> None:
        """Through the client API, as an operator would. A change whose answer is lost
        may or may not have happened: the settle step asks the leader."""
        c = self.cluster
        try:
            if action == "add":
                idle = [i for i in c.all_ids if i not in c.members and i not in c.nodes]
                spare = idle[0] if idle else None
                if spare is None:
                    return
                self._fault(f"add learner {spare}")
                await admin.member_add(spare, *c.addresses(spare), learner=True)
                c.members.add(spare)
                c.learners.add(spare)
                await c.start_node(spare, fresh=True)
            elif action == "promote" and c.learners:
                learner = sorted(c.learners)[0]
                self._fault(f"promote {learner}")
                await admin.member_promote(learner)
                c.learners.discard(learner)
            elif action == "remove" and len(c.members - c.learners) > 3:
                victim = rng.choice(sorted(c.members))
                self._fault(f"remove {victim}")
                await admin.member_remove(victim)
                c.members.discard(victim)
                c.learners.discard(victim)
                c.stop(victim)
        except LiferaftError as exc:
            self._fault(f"{action}: {exc.code}")
            self._client_error(action, exc)

    def _client_error(self, op: str, exc: LiferaftError) -> None:
        """Faults explain unavailable, timeouts and the like; ``internal`` is a node's
        own exception answered to the client: always a bug."""
        if exc.code == "internal":
            self.result.problems.append(f"{op} answered internal: {exc}")

    async def _settle(self, note: bool = True) -> None:
        """Heal everything and wait until every node has applied the same, final log."""
        c = self.cluster
        await self._nemesis_done.wait()
        c.network.heal()
        if note:
            self._fault("settle")
        c.disarm()
        for node_id in sorted(c.members):
            if node_id not in c.nodes:
                await c.start_node(node_id)
        c.down.clear()
        # The membership is the leader's, whatever answers the nemesis got.
        with trio.move_on_after(self.cfg.settle_s):
            while c.leader() is None:  # noqa: ASYNC110 - a condition across nodes
                await trio.sleep(0.05)
        lead = c.leader()
        if lead is not None:
            truth = c.nodes[lead].raft.status().membership  # type: ignore[union-attr]
            for node_id in list(c.nodes):
                if node_id not in truth.members:
                    c.stop(node_id)
            for node_id in sorted(truth.members):
                if node_id not in c.nodes:
                    await c.start_node(node_id, fresh=node_id not in c.members)
            c.members = set(truth.members)
            c.learners = set(truth.learners)

        def converged() -> bool:
            lead = c.leader()
            if lead is None:
                return False
            commit = c.nodes[lead].raft.commit  # type: ignore[union-attr]
            return all(
                n.raft is not None and n.raft.commit == commit and n.applied == commit
                for n in c.nodes.values()
            )

        with trio.move_on_after(self.cfg.settle_s) as scope:
            while not converged():  # noqa: ASYNC110 - a condition across nodes
                await trio.sleep(0.05)
        if scope.cancelled_caught:
            self.result.problems.append(
                "no convergence within the settle time: "
                + ", ".join(
                    f"{i} commit {n.raft.commit if n.raft else None} applied {n.applied}"
                    for i, n in c.nodes.items()
                )
            )

    async def _pass_pending_proposals(self) -> None:
        """A deposed leader's proposals wait until an entry lands at their index (theirs,
        or another that replaces it: only apply decides). With the cluster idle, that is
        never: write outside the watched prefix until the log has passed them all, so
        that every waiter must have been answered."""
        c = self.cluster

        def highest() -> int:
            return max((max(n.waiters.proposals, default=0) for n in c.nodes.values()), default=0)

        if not highest():
            return
        client = await c.client(30.0, random.Random(0))
        async with client:
            for n in range(PASS_WRITES_MAX):
                lead = c.leader()
                target = highest()
                if lead is None or not target:
                    break
                if c.nodes[lead].applied >= target:
                    break
                await client.put(f"settle/{n}", b"x")
        await self._settle(note=False)

    def _final_events(self) -> list[tuple[int, str, str, bytes]]:
        """Every event of the final state, from the first node (all are equal if the
        state check passes)."""
        node = self.cluster.nodes[min(self.cluster.nodes)]
        db = node.kv.db
        out: list[tuple[int, str, str, bytes]] = []
        start = 1
        while True:
            events, last = db.events(start, prefix=PREFIX)
            out += [
                (
                    e["kv"]["mod_revision"],
                    e["kv"]["key"],
                    e["type"],
                    bytes(e["kv"].get("value", b"")),
                )
                for e in events
            ]
            if last >= db.revision:
                return out
            start = last + 1

    async def _check_watch_complete(self) -> None:
        final = self._final_events()
        self.result.events_seen = len(self.watched)
        with trio.move_on_after(30):
            while len(self.watched) < len(final):  # noqa: ASYNC110
                await trio.sleep(0.05)
        if self.watched != final[: len(self.watched)] or len(self.watched) != len(final):
            first_bad = next(
                (i for i, (a, b) in enumerate(zip(self.watched, final, strict=False)) if a != b),
                min(len(self.watched), len(final)),
            )
            self.result.problems.append(
                f"watch: {len(self.watched)} events delivered, {len(final)} in the store; "
                f"first difference at #{first_bad}: delivered "
                f"{self.watched[first_bad] if first_bad < len(self.watched) else None}, "
                f"stored {final[first_bad] if first_bad < len(final) else None}"
            )
        self.result.events_seen = len(self.watched)
        # every stored put is exactly one client put; every acknowledged put is stored once
        stored = Counter((k, v) for _, k, t, v in final if t == "put")
        for (k, v), n in stored.items():
            if n > 1:
                self.result.problems.append(f"put {k}={v!r} applied {n} times")
        puts = {(o.key, o.value): o for o in self.result.history if o.kind == "put"}
        for k, v in stored:
            if (k, v) not in puts:
                self.result.problems.append(f"stored {k}={v!r} that no client put")
        for (key, value), o in puts.items():
            if o.complete is not None and (key, value) not in stored:
                self.result.problems.append(f"acknowledged put {key}={value!r} is missing")

    def _check_state(self) -> None:
        digests = {i: n.kv.db.digest() for i, n in self.cluster.nodes.items()}
        if len(set(digests.values())) != 1:
            self.result.problems.append(f"replicas differ: {digests}")
        for i, n in self.cluster.nodes.items():
            raft = n.raft
            held = 0 if raft is None else raft.log.last_index - raft.log.first_index + 1
            if held > 2 * self.cfg.snapshot_entries + 64:
                self.result.problems.append(
                    f"{i} holds {held} log entries in memory "
                    f"(snapshot_entries {self.cfg.snapshot_entries})"
                )

    def _check_waiters(self) -> None:
        for i, n in self.cluster.nodes.items():
            w = n.waiters
            if w.proposals or w.reads or w.applied:
                self.result.problems.append(
                    f"{i} has waiters left: {len(w.proposals)} proposals, {len(w.reads)} "
                    f"reads, {len(w.applied)} apply waits"
                )

    def _check_history(self) -> None:
        verdict = check(self.result.history)
        if not verdict:
            ops = [o for o in self.result.history if o.key == verdict.key]
            self.result.problems.append(
                f"not linearizable on key {verdict.key!r}: "
                + "; ".join(
                    f"c{o.client} {o.kind} {o.value!r} [{o.invoke:.3f}, "
                    f"{'?' if o.complete is None else f'{o.complete:.3f}'}]"
                    for o in sorted(ops, key=lambda o: o.invoke)
                )
            )


def simulate(seed: int, cfg: SimConfig | None = None) -> SimResult:
    """One seeded run of the whole-node simulator, in a fresh Trio run of its own."""
    cfg = cfg or SimConfig()
    with (
        tempfile.TemporaryDirectory(prefix=f"liferaft-sim-{seed}-") as d,
        deterministic_scheduling(seed),
        inline_io(),
    ):
        clock = trio.testing.MockClock(autojump_threshold=0)
        sim = Simulation(seed, cfg, Path(d))
        return trio.run(sim.run, clock=clock)
