"""One liferaft node: a nursery of Trio tasks around the pure Raft core.

    ticker ──┐
    peers ───┼─> inputs ─> core loop ─> storage (one worker thread, fsync)
    callers ─┘               │  │
                             │  └─> transport (one sender per peer, batched)
                             └────> applier ─> state machine ─> waiting callers

``Node`` holds what the tasks share (the core, the databases, the transport, the
waiting callers, the address book) and is what callers use: proposals, reads and
membership changes all reach the core as inputs of the core loop. The tasks themselves
live beside it: the core loop and ticker (``loop``), the applier with compaction and
checkpoints (``applier``), the peer links (``peers``), snapshot files (``transfer``).
docs/storage.md tells what is on disk when.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import trio

from liferaft.config import Settings
from liferaft.core import (
    AnyMessage,
    ConfChange,
    Membership,
    NotLeader,
    ProposalRefused,
    Raft,
    RaftConfig,
    Role,
    SnapshotMeta,
    Status,
)
from liferaft.kv.state import EventRow
from liferaft.node import addresses, space, transfer
from liferaft.node.applier import (
    CHECKPOINT_BYTES,
    CHECKPOINT_ENTRIES,
    COMPACT_BYTES,
    MAX_APPLY_BATCH,
    MAX_APPLY_BYTES,
    Applier,
)
from liferaft.node.inputs import MAX_MERGED_BYTES, MAX_MERGED_COMMANDS, Call, Input, Propose, Writes
from liferaft.node.lessor import Lessor
from liferaft.node.loop import MAX_INPUTS_PER_ROUND, CoreLoop
from liferaft.node.peers import PeerLinks, log_transport_event
from liferaft.node.promote import AutoPromoter
from liferaft.node.removal import NodeRemoved, Removal
from liferaft.node.space import SpaceAlarm
from liferaft.node.state import StateService
from liferaft.node.transfer import SnapshotReceiver, SnapshotSender
from liferaft.node.waiters import NodeStopped, Outcome, Settable, Waiters
from liferaft.observability.gcwatch import GcWatch
from liferaft.observability.http import HealthServer
from liferaft.observability.logs import LastError, event, node_context
from liferaft.observability.metrics import NodeMetrics
from liferaft.security.tls import NodeTls, TlsMaterialError, load_node_tls
from liferaft.storage import offload
from liferaft.storage.writer import StorageWriter
from liferaft.transport.base import Transport
from liferaft.transport.cluster import ClusterIdentity, bootstrap_id
from liferaft.transport.peer import PeerTransport

__all__ = [
    "CHECKPOINT_BYTES",
    "CHECKPOINT_ENTRIES",
    "COMPACT_BYTES",
    "MAX_APPLY_BATCH",
    "MAX_APPLY_BYTES",
    "MAX_INPUTS_PER_ROUND",
    "MAX_MERGED_BYTES",
    "MAX_MERGED_COMMANDS",
    "MAX_PENDING_PROPOSALS",
    "Node",
    "raft_config",
]

log = logging.getLogger("liferaft.node")
T = TypeVar("T")

MAX_PENDING_PROPOSALS = 1024  # proposals waiting here to be applied, at most


class _Held:
    """A submitted proposal's waiter that holds one of the node's proposal places until
    the proposal is answered or its caller gives up, whichever comes first."""

    __slots__ = ("_failed", "_out", "_places")

    def __init__(self, out: Settable, places: trio.Semaphore, failed: Any) -> None:
        self._out = out
        self._places: trio.Semaphore | None = places
        self._failed = failed  # the proposals_failed counter

    def give_up(self) -> None:
        if self._places is not None:
            self._places.release()
            self._places = None

    def set(self, value: object) -> None:
        self.give_up()
        self._out.set(value)

    def fail(self, error: BaseException) -> None:
        self.give_up()
        self._failed.inc()
        self._out.fail(error)


def raft_config(settings: Settings) -> RaftConfig:
    """Ticks are heartbeat intervals; the election timeout is a whole number of them."""
    r = settings.raft
    return RaftConfig(
        id=settings.node.id,
        heartbeat_ticks=1,
        election_ticks=max(2, r.election_timeout_ms // r.heartbeat_interval_ms),
    )


class Node:
    # A new member's CONFIG entry context (the API's member_add proposes it).
    encode_addresses = staticmethod(addresses.encode)

    def __init__(
        self,
        settings: Settings,
        *,
        rng: random.Random | None = None,
        send_filter: Callable[[list[AnyMessage]], list[AnyMessage]] | None = None,
        transport: Callable[[Node], Transport] | None = None,
        serve_health: bool = True,
    ) -> None:
        """``transport`` makes the peer links in place of ``PeerTransport`` and
        ``serve_health=False`` leaves out the metrics and health HTTP server: both for
        the whole-node simulator (``liferaft.testing.nodesim``)."""
        self.settings = settings
        self.id = settings.node.id
        self.state: StateService | None = None
        # member id -> (peer address, client address), from the config and CONFIG entries
        self.addresses: addresses.Addresses = {
            m.id: (str(m.peer), str(m.client)) for m in settings.cluster.members
        }
        # the same, from applied CONFIG entries only: what snapshots carry (addresses.py)
        self.applied_addresses: addresses.Addresses = dict(self.addresses)
        self.db_size = 0
        self.on_restore: Callable[[], None] | None = None  # the state machine was replaced
        self.on_events: list[Callable[[list[EventRow]], object]] = []  # per applied run
        # Called in the applier's task after each applied run's results went out to the
        # waiters, while ``applying`` is True: the API sends the answers of the run here,
        # one message per connection, without a switch to each connection's sender.
        self.after_apply: list[Callable[[], object]] = []
        self.applying = False
        self._rng = rng or random.Random()
        self._send_filter = send_filter  # tests' fault layer sits here
        self._make_transport = transport
        self._serve_health = serve_health
        self.metrics = NodeMetrics(self.id)
        self.waiters = Waiters()
        self.stopped = trio.Event()  # set once every database of the node is closed
        self._inputs_send, inputs = trio.open_memory_channel[Input](1024)
        self.raft: Raft | None = None
        self.storage: StorageWriter | None = None
        self.transport: Transport | None = None
        self.applied = 0
        self.storage_ok = True
        self.snapshot_meta: SnapshotMeta | None = None  # where the stored log starts
        self._proposing = trio.Semaphore(MAX_PENDING_PROPOSALS)
        self._read_round: Outcome[int] | None = None  # a ReadIndex round not yet begun
        self.sender: SnapshotSender | None = None
        self.receiver: SnapshotReceiver | None = None
        self._gc_watch: GcWatch | None = None
        self.last_error = LastError()  # its last error event (status shows it)
        self.cluster = ClusterIdentity(None)  # read from raft.db at start (transport/cluster.py)
        self._tls: NodeTls | None = None  # made on first use: the simulator never needs it
        self.space = SpaceAlarm()  # raised: the disk is nearly full (node/space.py)
        self._linked: set[str] = set()  # the peers liferaft_network_peer_connected shows
        self._peers = PeerLinks(self, self._inputs_send)
        self._applier = Applier(self)
        self.lessor = Lessor(self)  # the leader's lease clock (node/lessor.py)
        self.removal = Removal(self.id, ())  # whether this node was removed (removal.py)
        self._loop = CoreLoop(
            self,
            inputs=inputs,
            ticks=self._inputs_send,
            peers=self._peers,
            to_apply=self._applier.queue,
            promoter=AutoPromoter.of(settings, raft_config(settings).election_ticks),
        )

    # ---------------------------------------------------------------- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with node_context(self.id, self.last_error):  # every task below logs as this node
            await self._run(task_status)

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        s = self.settings
        members = {m.id: m for m in s.cluster.members}
        initial = None if s.cluster.join else Membership.of(sorted(members))
        self.storage = await StorageWriter.open(s.node.data_dir, initial=initial)
        try:
            restored = await self.storage.load()
            cluster_id = await self.storage.cluster_id()
            bootstrapped = restored.initial_membership.voters  # as recorded at first start
            if cluster_id is None and bootstrapped:  # (data dirs from before ids get it too)
                cluster_id = bootstrap_id(bootstrapped)
                await self.storage.set_cluster_id(cluster_id)
            self.cluster = ClusterIdentity(cluster_id, on_adopt=self._adopt_cluster)
            snap = restored.snapshot
            about = transfer.parse(snap.data) if snap is not None else {}
            self.state = await StateService.open(
                s.node.data_dir,
                snapshot_index=snap.meta.index if snap is not None else 0,
                transfer=about.get("transfer"),
                history_revisions=s.kv.history_revisions,
            )
            self.raft = Raft(raft_config(s), self._rng, restored)
            self._loop.durable_vote = (restored.hard_state.term, restored.hard_state.vote)
            if snap is not None:
                addresses.learn_from_snapshot(self.addresses, about, replace=False)
                addresses.learn_from_snapshot(self.applied_addresses, about, replace=True)
                self.snapshot_meta = snap.meta
            self.applied = self.state.db.applied
            self.removal.reset(self.raft.membership_at(self.applied).members)
            addresses.learn_from_entries(self.addresses, restored.entries)
            addresses.learn_from_entries(
                self.applied_addresses, (e for e in restored.entries if e.index <= self.applied)
            )
            make = self._make_transport
            self.transport = self._peer_transport() if make is None else make(self)
            self.metrics.peer_stats = self.transport.stats  # read at each scrape
            self.sender = SnapshotSender(
                self.id,
                self.transport,
                self.state,
                self._peers.finish_transfer,
                random.Random(self._rng.getrandbits(64)),
                durations=self.metrics.snapshot_duration,
            )
            self.receiver = SnapshotReceiver(
                self.id, self.transport, self.state, durations=self.metrics.snapshot_duration
            )
            health = HealthServer(self.metrics, self.healthy, self.ready)
            # A collection longer than a heartbeat interval delays a heartbeat: say so.
            gc_watch = GcWatch(self.metrics.gc_pause, warn_s=s.raft.heartbeat_interval_ms / 1000)
            gc_watch.install()
            self._gc_watch = gc_watch
            async with trio.open_nursery() as nursery:
                self._peers.nursery = nursery
                await nursery.start(self.transport.run, (s.peer.listen.host, s.peer.listen.port))
                if self._serve_health:
                    await nursery.start(health.run, s.metrics.listen.host, s.metrics.listen.port)
                if make is not None:  # a test's transport: its inbound channel
                    nursery.start_soon(self._peers.forward_inbound)
                nursery.start_soon(self.receiver.run)
                nursery.start_soon(self._applier.run)
                nursery.start_soon(self._applier.compactor)
                nursery.start_soon(self._applier.checkpointer)
                nursery.start_soon(self._loop.persister)
                nursery.start_soon(self._loop.run, self.raft)
                nursery.start_soon(self._loop.ticker)
                nursery.start_soon(self._sync_metrics)
                nursery.start_soon(self._watch_space)
                nursery.start_soon(self.lessor.run)
                nursery.start_soon(self._stop_when_removed)
                event(log, "node_started", term=self.raft.term, peer=str(s.peer.listen))
                task_status.started()
        finally:
            if self._gc_watch is not None:
                self._gc_watch.remove()
            self.waiters.fail_all(NodeStopped("the node stopped"))
            with trio.CancelScope(shield=True):
                try:
                    if self.state is not None:
                        await self.state.close()
                finally:
                    await self.storage.close()
                    self.stopped.set()

    def _adopt_cluster(self, cluster_id: str) -> None:
        """A joining node was dialed by a member: it belongs to that member's cluster."""
        event(log, "cluster_joined", cluster=cluster_id)
        storage, nursery = self.storage, self._peers.nursery
        if storage is not None and nursery is not None:
            nursery.start_soon(storage.set_cluster_id, cluster_id)

    # ---------------------------------------------------------------- TLS material

    @property
    def tls(self) -> NodeTls:
        """The TLS contexts every new handshake uses (peer listener, dialler, client
        listener); ``reload_tls`` replaces them."""
        if self._tls is None:
            t = self.settings.tls
            self._use_tls(load_node_tls(t.ca, t.cert, t.key, self.id, now=None))
            assert self._tls is not None
        return self._tls

    def reload_tls(self) -> bool:
        """Read the CA, certificate and key files again (SIGHUP) and use them for new
        handshakes; connections already up carry on. Files that do not fit together are
        refused with ``tls_reload_refused`` and the node keeps what it has."""
        t = self.settings.tls
        try:
            tls = load_node_tls(t.ca, t.cert, t.key, self.id, now=datetime.now(UTC))
        except TlsMaterialError as exc:
            with node_context(self.id, self.last_error):  # called from the signal handler
                event(log, "tls_reload_refused", level=logging.ERROR, error=str(exc))
            return False
        self._use_tls(tls)
        event(
            log,
            "tls_reloaded",
            cert=str(t.cert),
            serial=tls.serial_hex,
            not_after=tls.not_after.isoformat(),
        )
        return True

    def _use_tls(self, tls: NodeTls) -> None:
        self._tls = tls
        self.metrics.tls_cert_expiry.set(tls.not_after.timestamp())
        if isinstance(self.transport, PeerTransport):
            self.transport.set_tls(tls.peer_server, tls.peer_client)

    def _peer_transport(self) -> PeerTransport:
        s = self.settings
        return PeerTransport(
            self.id,
            server_ctx=self.tls.peer_server,
            client_ctx=self.tls.peer_client,
            peers={m.id: (m.peer.host, m.peer.port) for m in s.cluster.members if m.id != self.id},
            handshake_timeout=s.client.handshake_timeout_ms / 1000,
            rng=random.Random(self._rng.getrandbits(64)),
            log=log_transport_event,
            cluster=self.cluster,
            deliver=self._peers.deliver,
            removed_at=self.removal.removed_at,
            told_removed=self._told_removed,
        )

    def _told_removed(self, by: str, index: int) -> None:
        """Peer ``by`` answered our dial: a committed change at ``index`` removed us."""
        raft = self.raft
        if raft is not None:
            self.removal.told(
                by,
                index,
                now=trio.current_time(),
                voters=raft.membership.voters,
                member_now=self.id in raft.membership.members,
                config_index=raft.membership_index,
                leader_heard=raft.leader_heard,
            )

    async def _stop_when_removed(self) -> None:
        """End the node once it knows it was removed (``liferaft node`` exits 0)."""
        try:
            await self.removal.watch()
        except NodeRemoved as exc:
            event(log, "node_removed", level=logging.WARNING, reason=str(exc))
            raise

    async def _sync_metrics(self) -> None:
        """Copy the transport's and storage's counters into Prometheus once a second
        (they are plain integers on the hot path)."""
        sent: Counter[str] = Counter()
        received: Counter[str] = Counter()
        while True:
            if self.transport is not None:
                st = self.transport.stats
                for total, seen, metric in (
                    (st.sent_bytes, sent, self.metrics.peer_sent_bytes),
                    (st.received_bytes, received, self.metrics.peer_received_bytes),
                ):
                    for peer, n in total.items():
                        if n > seen[peer]:
                            metric.labels(peer).inc(n - seen[peer])
                            seen[peer] = n
                self._sync_links()
            if self.storage is not None:
                size = await self.storage.size_bytes()
                if self.state is not None:
                    size += await offload.run_sync(self._state_bytes)
                self.db_size = size
                self.metrics.db_size_bytes.set(self.db_size)
            await trio.sleep(1)

    async def _watch_space(self) -> None:
        """Raise or clear the nospace alarm as the data dir's filesystem fills or frees."""
        while True:
            self._read_space()
            await trio.sleep(space.CHECK_SECONDS)

    def _read_space(self) -> None:
        # statvfs of a local filesystem: microseconds, on the event loop (it must not
        # wait for a thread when a burst of writes asks for a reading)
        usage = shutil.disk_usage(self.settings.node.data_dir)
        self.metrics.disk_free_bytes.set(usage.free)
        change = self.space.update(usage.free, usage.total, trio.current_time())
        if change is not None:
            self.metrics.alarm.labels("nospace").set(1 if self.space.raised else 0)
            event(
                log,
                f"space_alarm_{change}",
                level=logging.WARNING if self.space.raised else logging.INFO,
                free_bytes=usage.free,
                reserve_bytes=space.reserve_bytes(usage.total),
            )

    def refuses_growth(self, size: int) -> bool:
        """Whether writes that grow the store, arriving in ``size`` bytes of client
        messages, are refused here: this node leads and its disk is nearly full (a
        follower's alarm only shows in its metrics and logs: docs/operations.md, "A full
        disk")."""
        raft = self.raft
        if raft is None or raft.role is not Role.LEADER:
            return False
        if self.space.wrote(size, trio.current_time()):
            self._read_space()
        return self.space.raised

    def _sync_links(self) -> None:
        """liferaft_network_peer_connected for each other member (removed ones go)."""
        if self.raft is None or self.transport is None:
            return
        members = self.raft.status().membership.members - {self.id}
        gauge = self.metrics.peer_connected
        for peer in self._linked - members:
            gauge.remove(peer)
        for peer in members:
            gauge.labels(peer).set(1 if self.transport.connected(peer) else 0)
        self._linked = set(members)

    def _state_bytes(self) -> int:
        total = 0
        if self.state is not None:
            path = self.state.db.path
            for p in (path, path.with_name(path.name + "-wal")):
                with contextlib.suppress(FileNotFoundError):
                    total += p.stat().st_size
        return total

    # ---------------------------------------------------------------- state

    @property
    def snapshot_index(self) -> int:
        meta = self.snapshot_meta
        return 0 if meta is None else meta.index

    @property
    def kv(self) -> StateService:
        """The key-value state; raises NotLeader (unavailable) before the node started."""
        if self.state is None:
            raise NotLeader(None)
        return self.state

    def client_endpoint(self, node_id: str) -> str | None:
        return addresses.client_url(self.addresses, node_id)

    # ---------------------------------------------------------------- callers

    async def call(self, fn: Callable[[Raft], T]) -> T:
        """Run ``fn`` on the core inside the core loop; its exception is re-raised here."""
        out: Outcome[T] = Outcome()
        await self._inputs_send.send(Call(fn, out))
        return await out.wait()

    async def propose(self, data: bytes) -> object:
        """Replicate ``data``; returns the state machine's result once it is applied
        here. Raises NotLeader on a follower, ProposalDropped if a new leader
        overwrote the entry."""
        out: Outcome[object] = Outcome()
        return await self._proposed(Propose(data, out), out)

    async def propose_writes(self, cmds: list[dict[str, Any]], size: int) -> object:
        """Replicate write commands (checked requests without ``id``; ``size`` about
        their encoded bytes); returns their results once applied here, a list in order
        (or one result with ``error`` if the entry failed as a whole). Batches that
        reach the core loop together share one entry. Raises like ``propose``."""
        out: Outcome[object] = Outcome()
        return await self._proposed(Writes(cmds, size, out), out)

    def submit_writes(
        self, cmds: list[dict[str, Any]], size: int, out: Settable
    ) -> Callable[[], None] | None:
        """``propose_writes`` without waiting and without a task: ``out`` is given the
        results (``set``, the same value ``propose_writes`` returns) or the failure
        (``fail``: NotLeader, ProposalDropped, ...), later, from the core loop or the
        applier; it must not block or raise. Returns a function that gives up the
        proposal's place among the MAX_PENDING_PROPOSALS (for a caller that stops
        waiting; harmless once ``out`` was called), or None if submitting would have to
        wait: then nothing was submitted, and the caller uses ``propose_writes``."""
        try:
            self._proposing.acquire_nowait()
        except trio.WouldBlock:
            return None
        held = _Held(out, self._proposing, self.metrics.proposals_failed)
        try:
            self._inputs_send.send_nowait(Writes(cmds, size, held))
        except trio.WouldBlock:
            held.give_up()
            return None
        return held.give_up

    async def _proposed(self, item: Propose | Writes, out: Outcome[object]) -> object:
        """Hand ``item`` to the core loop and wait for ``out``. At most
        MAX_PENDING_PROPOSALS wait at once (the others wait for a turn): the bound on
        what the core and applier hold for callers."""
        async with self._proposing:
            await self._inputs_send.send(item)
            try:
                return await out.wait()
            except BaseException:
                self.metrics.proposals_failed.inc()
                raise

    async def wait_for_leader(self, seconds: float) -> str | None:
        """The leader's id once one is known that a client can be sent to, waiting at
        most ``seconds`` from now (then: the leader known by then, or None). Lets a
        request that meets an election answer with the new leader instead of
        ``unavailable`` or the old leader, either of which would send the client round
        the endpoints with growing back-off. A leader is one to send clients to when
        ``reaches`` says so, or when it is heard from during the wait (its link from us
        is down but it lives: a one-way fault, not a dead leader)."""
        deadline = trio.current_time() + seconds
        poll = self.settings.raft.heartbeat_interval_ms / 1000  # for a link coming up
        heard: dict[str, int] = {}  # leader -> batches received from it when first seen
        while True:
            leader = self.raft.leader if self.raft is not None else None
            if leader is not None:
                seen = heard.setdefault(leader, self._batches_from(leader))
                if self.reaches(leader) or self._batches_from(leader) > seen:
                    return leader
            now = trio.current_time()
            if now >= deadline:
                return leader
            with trio.move_on_at(min(deadline, now + poll)):
                await self._loop.leader_moved.wait()

    def _batches_from(self, peer: str) -> int:
        return self.transport.stats.received_batches[peer] if self.transport is not None else 0

    def reaches(self, node_id: str) -> bool:
        """Whether ``node_id`` is this node or a peer whose link is up. A leader whose
        link went down is most likely gone (a killed process drops its connections at
        once, well before its followers' election timeout): a write is better held
        for the election than sent there (docs/architecture.md, "The life of a write")."""
        return node_id == self.id or self.transport is None or self.transport.connected(node_id)

    async def read_index(self) -> int:
        """A linearizable read barrier: returns once the local state machine reflects
        every write committed before the call.

        Reads share rounds: a read that arrives while a round is still queued for the
        core loop joins it (the round starts after it arrived, so it confirms it too);
        one quorum round trip then serves every read of a burst, across connections."""
        out = self._read_round
        if out is None:
            ctx, out = self.waiters.new_read()
            self._read_round = round_out = out

            def go(raft: Raft) -> None:
                if self._read_round is round_out:
                    self._read_round = None  # later reads start the next round
                try:
                    raft.read_index(ctx)
                except Exception as exc:  # NotLeader: every read of the round fails
                    self.waiters.pop_read(ctx)
                    round_out.fail(exc)

            with trio.CancelScope(shield=True):  # the round's other reads depend on it
                await self._inputs_send.send(Call(go, Outcome()))
        index = await out.wait()
        if self.applied < index:
            done: Outcome[None] = Outcome()
            self.waiters.applied.append((index, done))
            await done.wait()
        return index

    async def change_membership(self, change: ConfChange) -> None:
        """Propose a membership change and wait until it is applied here. A leader that
        has not yet committed an entry of its term, or whose previous change is still
        uncommitted, proposes it once that passes (the caller bounds the wait): right
        after a transfer, or beside an automatic promotion, a change is not refused."""
        out: Outcome[object] = Outcome()

        def go(raft: Raft) -> bool:
            if raft.role is Role.LEADER and not raft.conf_change_ready:
                return False
            index = raft.propose_conf_change(change)
            self.waiters.proposals[index] = (raft.term, out)
            return True

        while not await self.call(go):  # noqa: ASYNC110 - the core has no event for it
            await trio.sleep(self.settings.raft.heartbeat_interval_ms / 1000)
        await out.wait()

    async def transfer_leadership(self, to: str | None) -> str:
        """Hand leadership to ``to`` (or the most up-to-date voter, preferring those that
        answered within the last election timeout); returns the new leader once this node
        sees it. ProposalRefused if the core gave the transfer up (the target did not
        take over within an election timeout) and this node still leads."""

        def go(raft: Raft) -> str:
            target = to
            if target is None:
                st = raft.status()
                voters = [p for p in st.peers if p in st.membership.voters]
                if not voters:
                    raise ProposalRefused("no other voter to hand leadership to")
                target = max(
                    voters, key=lambda p: (st.peers[p].recent_active, st.peers[p].match, p)
                )
            raft.transfer_leadership(target)
            return target

        target = await self.call(go)
        while self.raft is None or self.raft.leader != target:
            raft = self.raft
            if raft is not None and raft.role is Role.LEADER and raft.transferee != target:
                raise ProposalRefused(f"{target} did not take over within an election timeout")
            await trio.sleep(self.settings.raft.heartbeat_interval_ms / 1000)
        return target

    def status(self) -> Status:
        return self._core().status()

    # ---------------------------------------------------------------- health

    def healthy(self) -> bool:
        return self.raft is not None and self.storage_ok

    def ready(self) -> tuple[bool, str]:
        raft = self.raft
        if raft is None:
            return False, "starting"
        if raft.leader is None:
            return False, "no leader known"
        if self.applied < raft.commit:
            return False, f"applied {self.applied} behind commit {raft.commit}"
        return True, "ready"

    def _core(self) -> Raft:
        if self.raft is None:
            raise NotLeader(None)
        return self.raft
