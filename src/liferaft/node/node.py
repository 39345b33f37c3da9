"""One liferaft node: a nursery of Trio tasks around the pure Raft core.

    ticker ──┐
    peers ───┼─> inputs ─> core loop ─> storage (one worker thread, fsync)
    callers ─┘               │  │
                             │  └─> transport (one sender per peer, batched)
                             └────> applier ─> state machine ─> waiting callers

The core loop is the only task that touches the core. It takes every input that is
waiting (so a burst of proposals or messages becomes one Ready), persists the Ready in
one SQLite transaction while the leader's appends are already on their way, sends the
acknowledgements only once the write is durable, and hands committed entries to the
applier. A storage error stops the node (fail-stop): it never goes on after a failed
fsync.

The applier applies runs of committed entries to the key-value state (``state.db``) in
one transaction each, on a worker thread (``StateService``); the log is compacted only
up to what the state database holds durably. Snapshots are files streamed outside the
core (``transfer``). docs/storage.md tells what is on disk when.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

import trio

from liferaft.config import Settings
from liferaft.core import (
    AnyMessage,
    ConfChange,
    ConfEntry,
    Entry,
    EntryKind,
    HardState,
    InstallSnapshot,
    Membership,
    NotLeader,
    ProposalRefused,
    Raft,
    RaftConfig,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    Status,
)
from liferaft.crashpoint import crashpoint
from liferaft.kv.commands import encode_batch
from liferaft.kv.state import EventRow
from liferaft.node import transfer
from liferaft.node.applyqueue import ApplyQueue
from liferaft.node.state import StateService
from liferaft.node.transfer import SnapshotReceiver, SnapshotSender
from liferaft.node.waiters import Outcome, ReadFailed, Split, Waiters
from liferaft.observability.http import HealthServer
from liferaft.observability.logs import event, node_context
from liferaft.observability.metrics import NodeMetrics
from liferaft.safecbor import dumps
from liferaft.security.tls import peer_client_context, peer_server_context
from liferaft.storage.writer import StorageWriter
from liferaft.transport.files import PeerMessage, SnapshotAck, SnapshotChunk
from liferaft.transport.peer import PeerTransport

log = logging.getLogger("liferaft.node")
T = TypeVar("T")

MAX_INPUTS_PER_ROUND = 4096  # inputs folded into one Ready at most
MAX_APPLY_BATCH = 8192  # committed entries applied in one state transaction at most
MAX_APPLY_BYTES = 2 * 1024 * 1024  # ...and about this much entry data
# Compact the log after this much entry data too (besides ``snapshot_entries``): the log
# since the last compaction is held in memory, and an entry may hold a batch of writes.
COMPACT_BYTES = 32 * 1024 * 1024
MAX_PENDING_PROPOSALS = 1024  # proposals waiting here to be applied, at most
MAX_MERGED_COMMANDS = 1024  # write commands merged into one entry at most
MAX_MERGED_BYTES = 1024 * 1024  # ...and about this many bytes
CHECKPOINT_ENTRIES = 4096  # checkpoint state.db's WAL after this many applied entries
CHECKPOINT_BYTES = 8 * 1024 * 1024  # ...or this much applied entry data


@dataclass(frozen=True, slots=True)
class _Tick:
    pass


@dataclass(frozen=True, slots=True)
class _Messages:
    peer: str
    msgs: list[AnyMessage]


@dataclass(frozen=True, slots=True)
class _Call:
    """Run ``fn(raft)`` inside the core loop and report its result."""

    fn: Callable[[Raft], Any]
    out: Outcome[Any]


@dataclass(frozen=True, slots=True)
class _Propose:
    """A client command: appended in the core loop, answered when applied (one wake-up
    per write instead of a ``_Call`` round trip plus the wait for the result)."""

    data: bytes
    out: Outcome[object]


@dataclass(frozen=True, slots=True)
class _Writes:
    """Write commands (requests without ``id``) of one caller; the core loop merges the
    ``_Writes`` waiting together into one batch entry (``liferaft.kv.commands``)."""

    cmds: list[dict[str, Any]]
    size: int  # bytes, about (at most what the commands' message was)
    out: Outcome[object]


_Input = _Tick | _Messages | _Call | _Propose | _Writes


def _compact(raft: Raft, *, index: int, data: bytes) -> Snapshot | None:
    """Compact at ``index`` unless the log already starts there or later (a snapshot may
    have been installed meanwhile) or the core has not handed it out for applying."""
    if index <= raft.status().snapshot_index or index > raft.applied:
        return None
    return raft.compact(index, data)


def raft_config(settings: Settings) -> RaftConfig:
    """Ticks are heartbeat intervals; the election timeout is a whole number of them."""
    r = settings.raft
    return RaftConfig(
        id=settings.node.id,
        heartbeat_ticks=1,
        election_ticks=max(2, r.election_timeout_ms // r.heartbeat_interval_ms),
    )


class Node:
    def __init__(
        self,
        settings: Settings,
        *,
        rng: random.Random | None = None,
        send_filter: Callable[[list[AnyMessage]], list[AnyMessage]] | None = None,
    ) -> None:
        self.settings = settings
        self.id = settings.node.id
        self.state: StateService | None = None
        # member id -> (peer address, client address), from the config and CONFIG entries
        self.addresses: dict[str, tuple[str, str]] = {
            m.id: (str(m.peer), str(m.client)) for m in settings.cluster.members
        }
        self.db_size = 0
        self.on_restore: Callable[[], None] | None = None  # the state machine was replaced
        self.on_events: list[Callable[[list[EventRow]], object]] = []  # per applied run
        self._rng = rng or random.Random()
        self._send_filter = send_filter  # tests' fault layer sits here
        self.metrics = NodeMetrics(self.id)
        self.waiters = Waiters()
        self.stopped = trio.Event()  # set once every database of the node is closed
        self._inputs_send, self._inputs = trio.open_memory_channel[_Input](1024)
        self._ticks_due = 0  # ticks counted by the ticker, not yet given to the core
        self._tick_queued = False  # a _Tick input is on its way to the core loop
        self._tick_wakeup = trio.Event()
        self._to_apply = ApplyQueue(max_entries=MAX_APPLY_BATCH, max_bytes=MAX_APPLY_BYTES)
        self.raft: Raft | None = None
        self.storage: StorageWriter | None = None
        self.transport: PeerTransport | None = None
        self.applied = 0
        self.storage_ok = True
        self._last_soft: tuple[Role, str | None, int] | None = None
        self._snapshot_meta: SnapshotMeta | None = None  # where the stored log starts
        self._durable_vote: tuple[int, str | None] = (0, None)  # (term, vote) on disk
        self._log_bytes = 0  # entry data applied since the last compaction
        self._proposing = trio.Semaphore(MAX_PENDING_PROPOSALS)
        self._slow_persist = settings.raft.election_timeout_ms / 1000  # seconds
        self._read_round: Outcome[int] | None = None
        self._leader_known = (
            trio.Event()
        )  # set while this node knows a leader  # a ReadIndex round not yet begun
        self._lazy_hs: HardState | None = None  # a commit index not yet written
        self._compact_send, self._compact_recv = trio.open_memory_channel[None](1)
        self._checkpoint_send, self._checkpoint_recv = trio.open_memory_channel[None](1)
        self._checkpointed = 0  # the applied index when the last checkpoint was asked for
        self._unchecked_bytes = 0  # entry data applied since then
        self.sender: SnapshotSender | None = None
        self.receiver: SnapshotReceiver | None = None
        self._nursery: trio.Nursery | None = None

    # ---------------------------------------------------------------- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with node_context(self.id):  # every task below logs this node's id
            await self._run(task_status)

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        s = self.settings
        members = {m.id: m for m in s.cluster.members}
        initial = None if s.cluster.join else Membership.of(sorted(members))
        self.storage = await StorageWriter.open(s.node.data_dir, initial=initial)
        try:
            restored = await self.storage.load()
            snap = restored.snapshot
            about = transfer.parse(snap.data) if snap is not None else {}
            self.state = await StateService.open(
                s.node.data_dir,
                snapshot_index=snap.meta.index if snap is not None else 0,
                transfer=about.get("transfer"),
                history_revisions=s.kv.history_revisions,
            )
            self.raft = Raft(raft_config(s), self._rng, restored)
            self._durable_vote = (restored.hard_state.term, restored.hard_state.vote)
            if snap is not None:
                self._learn_snapshot_addresses(about)
                self._snapshot_meta = snap.meta
            self.applied = self.state.db.applied
            self._learn_addresses(restored.entries)
            tls = s.tls
            self.transport = PeerTransport(
                self.id,
                server_ctx=peer_server_context(tls.ca, tls.cert, tls.key),
                client_ctx=peer_client_context(tls.ca, tls.cert, tls.key),
                peers={
                    m.id: (m.peer.host, m.peer.port) for m in s.cluster.members if m.id != self.id
                },
                handshake_timeout=s.client.handshake_timeout_ms / 1000,
                rng=random.Random(self._rng.getrandbits(64)),
                log=self._transport_log,
            )
            self.sender = SnapshotSender(
                self.id,
                self.transport,
                self.state,
                self._finish_transfer,
                random.Random(self._rng.getrandbits(64)),
            )
            self.receiver = SnapshotReceiver(self.id, self.transport, self.state)
            health = HealthServer(self.metrics, self.healthy, self.ready)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.transport.run, (s.peer.listen.host, s.peer.listen.port))
                await nursery.start(health.run, s.metrics.listen.host, s.metrics.listen.port)
                nursery.start_soon(self._forward_inbound)
                nursery.start_soon(self.receiver.run)
                nursery.start_soon(self._applier)
                nursery.start_soon(self._compactor)
                nursery.start_soon(self._checkpointer)
                nursery.start_soon(self._core_loop)
                nursery.start_soon(self._ticker)
                nursery.start_soon(self._sync_metrics)
                event(log, "node_started", term=self.raft.term, peer=str(s.peer.listen))
                task_status.started()
        finally:
            self.waiters.fail_all(ReadFailed("node stopped"))
            with trio.CancelScope(shield=True):
                try:
                    if self.state is not None:
                        await self.state.close()
                finally:
                    await self.storage.close()
                    self.stopped.set()

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
            if self.storage is not None:
                size = await self.storage.size_bytes()
                if self.state is not None:
                    size += await trio.to_thread.run_sync(self._state_bytes)
                self.db_size = size
                self.metrics.db_size_bytes.set(self.db_size)
            await trio.sleep(1)

    # ---------------------------------------------------------------- members

    @property
    def _snapshot_index(self) -> int:
        meta = self._snapshot_meta
        return 0 if meta is None else meta.index

    def _state_bytes(self) -> int:
        total = 0
        if self.state is not None:
            path = self.state.db.path
            for p in (path, path.with_name(path.name + "-wal")):
                with contextlib.suppress(FileNotFoundError):
                    total += p.stat().st_size
        return total

    @property
    def kv(self) -> StateService:
        """The key-value state; raises NotLeader (unavailable) before the node started."""
        if self.state is None:
            raise NotLeader(None)
        return self.state

    @staticmethod
    def encode_addresses(peer: str, client: str) -> bytes:
        """The context of a member's CONFIG entry: where to reach it."""
        return json.dumps({"peer": peer, "client": client}).encode()

    def _learn_addresses(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            if e.kind is EntryKind.CONFIG:
                change = ConfEntry.decode(e.data).change
                if change.context:
                    ctx = json.loads(change.context)
                    self.addresses[change.node_id] = (ctx["peer"], ctx["client"])

    def _dial(self, membership: Membership) -> None:
        """Keep a link to every other member whose address we know."""
        if self.transport is None:
            return
        peers = {}
        for mid in membership.members - {self.id}:
            if mid in self.addresses:
                host, _, port = self.addresses[mid][0].rpartition(":")
                peers[mid] = (host.strip("[]"), int(port))
        self.transport.set_peers(peers)

    def client_endpoint(self, node_id: str) -> str | None:
        addr = self.addresses.get(node_id)
        return f"wss://{addr[1]}/v1" if addr else None

    def _snapshot_data(self) -> bytes:
        """The core's snapshot holds only the member address book, which must survive
        compaction of the CONFIG entries that carried it; the state is ``state.db``."""
        return dumps({"members": self.addresses})

    def _learn_snapshot_addresses(self, about: dict[str, Any]) -> None:
        members = about.get("members")
        if isinstance(members, dict):
            for k, v in members.items():
                if isinstance(k, str) and isinstance(v, list) and len(v) == 2:
                    self.addresses.setdefault(k, (str(v[0]), str(v[1])))

    async def change_membership(self, change: ConfChange) -> None:
        """Propose a membership change and wait until it is applied here."""
        out: Outcome[object] = Outcome()

        def go(raft: Raft) -> None:
            index = raft.propose_conf_change(change)
            self.waiters.proposals[index] = (raft.term, out)

        await self.call(go)
        await out.wait()

    async def transfer_leadership(self, to: str | None) -> str:
        """Hand leadership to ``to`` (or the most up-to-date voter); returns the new leader
        once this node sees it."""

        def go(raft: Raft) -> str:
            target = to
            if target is None:
                st = raft.status()
                voters = [p for p in st.peers if p in st.membership.voters]
                if not voters:
                    raise ProposalRefused("no other voter to hand leadership to")
                target = max(voters, key=lambda p: (st.peers[p].match, p))
            raft.transfer_leadership(target)
            return target

        target = await self.call(go)
        while self.raft is None or self.raft.leader != target:  # noqa: ASYNC110
            await trio.sleep(self.settings.raft.heartbeat_interval_ms / 1000)
        return target

    def _transport_log(self, name: str, fields: dict[str, object]) -> None:
        event(log, name, **fields)  # type: ignore[arg-type]  # fields never hold 'level'

    async def _ticker(self) -> None:
        """Count ticks due and wake whoever takes them: the core loop (through one
        ``_Tick`` input at a time) or, during a disk write, ``_persist``."""
        interval = self.settings.raft.heartbeat_interval_ms / 1000
        deadline = trio.current_time()
        while True:
            deadline += interval
            await trio.sleep_until(deadline)
            deadline = max(deadline, trio.current_time() - interval)  # no catch-up storm
            self._ticks_due += 1
            self._tick_wakeup.set()
            if not self._tick_queued:
                self._tick_queued = True
                await self._inputs_send.send(_Tick())

    def _take_ticks(self, raft: Raft) -> None:
        """Tick the core for every tick due and send the heartbeats that come of it
        (this may run while a Ready is outstanding: see ``Raft.tick``)."""
        ticks, self._ticks_due = self._ticks_due, 0
        for _ in range(ticks):
            raft.tick()
        if ticks:
            self._send(raft.take_messages())

    async def _forward_inbound(self) -> None:
        """Raft messages go to the core loop; snapshot file chunks and their acks to the
        transfer code; an InstallSnapshot only once its file is here whole."""
        assert self.transport is not None
        assert self.sender is not None and self.receiver is not None
        async for peer, msgs in self.transport.inbound:
            core: list[AnyMessage] = []
            for m in msgs:
                if m.src != peer:  # a peer speaks only for itself
                    continue
                if isinstance(m, SnapshotChunk):
                    self.receiver.on_chunk(m)
                elif isinstance(m, SnapshotAck):
                    self.sender.on_ack(m)
                elif isinstance(m, InstallSnapshot):
                    if self._snapshot_on_disk(m):
                        core.append(m)
                else:
                    core.append(m)
            if core:
                await self._inputs_send.send(_Messages(peer, core))

    def _snapshot_on_disk(self, m: InstallSnapshot) -> bool:
        assert self.receiver is not None
        try:
            about = transfer.parse(m.data)
        except ValueError:
            return False
        transfer_id = about.get("transfer")
        return isinstance(transfer_id, int) and self.receiver.has(transfer_id)

    def _step_snapshot(self, raft: Raft, m: InstallSnapshot) -> None:
        """Step a snapshot whose file is here; if the core does not restore from it (it
        holds those entries already), the file is not needed and goes at once."""
        before = raft.log.snapshot_index
        raft.step(m)
        if raft.log.snapshot_index == before or raft.log.snapshot_index != m.meta.index:
            transfer_id = transfer.parse(m.data).get("transfer")
            if self.receiver is not None and isinstance(transfer_id, int):
                self.receiver.discard(transfer_id)

    def _finish_transfer(
        self, msg: InstallSnapshot, transfer_id: int, applied: int
    ) -> InstallSnapshot | None:
        """The InstallSnapshot that ends a transfer: the core's current snapshot (never
        past the copy's applied index: compaction is held there), if this node is still
        the leader of the term that asked for it."""
        raft, meta = self.raft, self._snapshot_meta
        if raft is None or raft.role is not Role.LEADER or raft.term != msg.term:
            return None
        if meta is None or meta.index > applied:
            return None
        return InstallSnapshot(
            term=msg.term,
            src=self.id,
            dst=msg.dst,
            meta=meta,
            offset=0,
            data=transfer.describe(transfer_id, applied, self.addresses),
            done=True,
        )

    # ---------------------------------------------------------------- the core loop

    async def _core_loop(self) -> None:
        raft = self._core()
        while True:
            items = [await self._inputs.receive()]
            while len(items) < MAX_INPUTS_PER_ROUND:
                try:
                    items.append(self._inputs.receive_nowait())
                except trio.WouldBlock:
                    break
            # Ticks last: inputs that waited together arrived in the same interval, and
            # a message from the leader queued behind ticks (while this loop waited on
            # an fsync) proves the leader alive; timing out before reading it would
            # start an election against a healthy leader.
            writes: list[_Writes] = []
            for item in items:
                if isinstance(item, _Tick):
                    self._tick_queued = False
                elif isinstance(item, _Writes):
                    writes.append(item)
                else:
                    self._handle(item)
            if writes:
                self._propose_writes(raft, writes)
            self._take_ticks(raft)
            while raft.has_ready():
                await self._process(raft, raft.ready())
            self._observe(raft)  # a tick may change the role with nothing to persist

    def _propose_writes(self, raft: Raft, writes: list[_Writes]) -> None:
        """Append the write batches that arrived together as few entries as the bounds
        allow (commands and bytes per entry): one log entry, one fsync'd row, one
        AppendEntries item and one apply step for many callers' writes."""
        time_ms = int(time.time() * 1000)  # the leader's clock: the log's only time
        group: list[_Writes] = []
        count = size = 0
        for w in writes:
            if group and (
                count + len(w.cmds) > MAX_MERGED_COMMANDS or size + w.size > MAX_MERGED_BYTES
            ):
                self._append_writes(raft, group, time_ms)
                group, count, size = [], 0, 0
            group.append(w)
            count += len(w.cmds)
            size += w.size
        self._append_writes(raft, group, time_ms)

    def _append_writes(self, raft: Raft, group: list[_Writes], time_ms: int) -> None:
        split = Split()
        cmds: list[dict[str, Any]] = []
        for w in group:
            split.parts.append((w.out, len(cmds), len(w.cmds)))
            cmds.extend(w.cmds)
        try:
            index = raft.propose(encode_batch(cmds, time_ms=time_ms))
        except Exception as exc:  # NotLeader, ProposalRefused: the callers' answer
            split.fail(exc)
        else:
            self.waiters.proposals[index] = (raft.term, split)

    def _handle(self, item: _Input) -> None:
        """Carry out one input other than a tick."""
        raft = self._core()
        if isinstance(item, _Propose):
            try:
                index = raft.propose(item.data)
            except Exception as exc:  # NotLeader, ProposalRefused: the caller's answer
                item.out.fail(exc)
            else:
                self.waiters.proposals[index] = (raft.term, item.out)
        elif isinstance(item, _Messages):
            for m in item.msgs:
                if isinstance(m, InstallSnapshot):
                    self._step_snapshot(raft, m)
                else:
                    raft.step(m)
        elif isinstance(item, _Call):
            try:
                item.out.set(item.fn(raft))
            except Exception as exc:  # reported to the caller, who asked for it
                item.out.fail(exc)

    async def _process(self, raft: Raft, rd: Ready) -> None:
        assert self.storage is not None
        self._send(rd.messages)
        hs = rd.hard_state
        if hs is not None and not rd.entries and rd.snapshot is None and self._only_commit(hs):
            # Only the commit index moved: the committed entries are durable on a quorum
            # already, so they go to the applier now and the new commit index is written
            # with the next write (a restart learns it again from the leader).
            self._lazy_hs = hs
        elif rd.must_persist():
            save = rd
            if hs is None and self._lazy_hs is not None:
                save = replace(rd, hard_state=self._lazy_hs)
            self._lazy_hs = None
            started = trio.current_time()
            try:
                seconds = await self._persist(raft, save)
            except Exception:
                self.storage_ok = False
                event(log, "storage_failed", level=logging.CRITICAL, term=raft.term)
                raise
            self.metrics.fsync_duration.observe(seconds)
            waited = trio.current_time() - started
            if waited > self._slow_persist:  # heartbeats waited this long too
                event(log, "slow_persist", level=logging.WARNING, seconds=round(waited, 4))
            if save.hard_state is not None:
                self._durable_vote = (save.hard_state.term, save.hard_state.vote)
        self._send(rd.persisted_messages)
        self._learn_addresses(rd.entries)
        if rd.membership is not None:
            self._dial(rd.membership)
        if rd.snapshot is not None:
            self._to_apply.put_snapshot(rd.snapshot)
        self._to_apply.put_entries(rd.committed_entries)
        for rs in rd.read_states:
            out = self.waiters.reads.pop(rs.ctx, None)
            if out is not None:
                out.set(rs.index)
        for ctx in rd.failed_reads:
            out = self.waiters.reads.pop(ctx, None)
            if out is not None:
                out.fail(ReadFailed("leadership lost before the read was confirmed"))
        raft.advance(rd)
        self._observe(raft)

    async def _persist(self, raft: Raft, rd: Ready) -> float:
        """Save ``rd``; meanwhile keep taking ticks, so a leader's heartbeats do not wait
        for a slow fsync (on this project's machine a busy disk holds one for 150 ms,
        longer than the fast-failover election timeout). Other inputs wait: the core
        takes nothing else while a Ready is outstanding."""
        assert self.storage is not None
        storage = self.storage
        result: list[float] = []
        failed: list[Exception] = []
        async with trio.open_nursery() as nursery:

            async def save() -> None:
                try:
                    result.append(await storage.save(rd))
                except Exception as exc:  # re-raised below, as itself
                    failed.append(exc)
                nursery.cancel_scope.cancel()

            nursery.start_soon(save)
            while True:
                await self._tick_wakeup.wait()
                self._tick_wakeup = trio.Event()
                self._take_ticks(raft)
        if failed:
            raise failed[0]
        return result[0]

    def _only_commit(self, hs: HardState) -> bool:
        """Whether ``hs`` differs from what is on disk in its commit index alone (a new
        term or vote must be durable before anything is sent)."""
        return (hs.term, hs.vote) == self._durable_vote

    def _send(self, msgs: Iterable[AnyMessage]) -> None:
        batch: list[AnyMessage] = []
        for m in msgs:
            if isinstance(m, InstallSnapshot):  # the state is a file: stream it
                if self.sender is not None and self._nursery is not None:
                    self.sender.wanted(m, self._nursery)
            else:
                batch.append(m)
        if not batch or self.transport is None:
            return
        if self._send_filter is not None:
            batch = self._send_filter(batch)
        out: list[PeerMessage] = list(batch)
        self.transport.send(out)

    def _observe(self, raft: Raft) -> None:
        soft = (raft.role, raft.leader, raft.term)
        if soft != self._last_soft:
            prev = self._last_soft or (Role.FOLLOWER, None, 0)
            self._last_soft = soft
            if prev[1] != raft.leader:
                if raft.leader is not None:
                    self.metrics.leader_changes.inc()
                    self._leader_known.set()
                elif self._leader_known.is_set():
                    self._leader_known = trio.Event()
                event(
                    log, "leader_changed", term=raft.term, leader=raft.leader, role=raft.role.value
                )
            elif prev[0] != raft.role:
                event(log, "role_changed", term=raft.term, role=raft.role.value)
        m = self.metrics
        m.has_leader.set(1 if raft.leader else 0)
        m.is_leader.set(1 if raft.role is Role.LEADER else 0)
        m.term.set(raft.term)
        m.commit_index.set(raft.commit)
        m.proposals_pending.set(len(self.waiters.proposals))

    # ---------------------------------------------------------------- applying

    async def _applier(self) -> None:
        """Apply committed entries in runs (what is queued, bounded in entries and bytes,
        in one state transaction); install snapshot files in order between them."""
        while True:
            item = await self._to_apply.get()
            if isinstance(item, Snapshot):
                await self._install(item)
            else:
                await self._apply(item)

    async def _apply(self, entries: list[Entry]) -> None:
        state = self.kv
        size = sum(len(e.data) for e in entries)
        self._log_bytes += size
        self._unchecked_bytes += size
        applied = await state.apply(entries)  # type: ignore[arg-type]  # Entry is EntryLike
        committed = 0
        for e, result in zip(entries, applied.results, strict=True):
            if e.kind is EntryKind.NORMAL:
                committed += 1
            self.waiters.on_applied(e.index, e.term, result)
        if committed:
            self.metrics.proposals_committed.inc(committed)
        if applied.rows:  # one publication per applied run, revisions in order
            for callback in self.on_events:
                callback(applied.rows)
        self._applied_to(state.db.applied)

    def _applied_to(self, index: int) -> None:
        if (
            index - self._checkpointed >= CHECKPOINT_ENTRIES
            or self._unchecked_bytes >= CHECKPOINT_BYTES
        ):
            with contextlib.suppress(trio.WouldBlock):
                self._checkpoint_send.send_nowait(None)
                self._checkpointed = index
                self._unchecked_bytes = 0
        self.applied = index
        self.metrics.applied_index.set(index)
        self.waiters.on_applied_index(index)
        if (
            index - self._snapshot_index >= self.settings.raft.snapshot_entries
            or self._log_bytes >= COMPACT_BYTES
        ):
            with contextlib.suppress(trio.WouldBlock):
                self._compact_send.send_nowait(None)  # the compactor is idle: wake it

    async def _install(self, snap: Snapshot) -> None:
        """The core restored a snapshot (already in raft.db): swap its file in."""
        about = transfer.parse(snap.data)
        crashpoint("snapshot_before_swap")
        await self.kv.install(about["transfer"])
        self._learn_snapshot_addresses(about)
        self._snapshot_meta = snap.meta  # the core restores only past its own snapshot
        if self.on_restore is not None:
            self.on_restore()
        event(log, "snapshot_installed", index=snap.meta.index, applied=self.kv.db.applied)
        self._applied_to(self.kv.db.applied)

    async def _checkpointer(self) -> None:
        """Copy the WALs of state.db and raft.db into their databases on threads of
        their own, beside the applier and the core loop (a checkpoint inside a COMMIT
        would write and fsync the database on the path of every write); then restart
        state.db's WAL on the writer's turn, which copies only what came meanwhile."""
        assert self.storage is not None
        async for _ in self._checkpoint_recv:
            started = trio.current_time()
            await self.kv.read(lambda db: db.checkpoint())  # the bulk, beside the applier
            left = await self.kv.restart_wal()  # the rest, between two applies
            await self.storage.checkpoint()
            seconds = round(trio.current_time() - started, 3)
            event(log, "checkpointed", level=logging.DEBUG, frames_left=left, seconds=seconds)

    async def _compactor(self) -> None:
        """Drop the log up to what the state database holds durably (and no further than
        a running snapshot transfer's copy, so the follower can continue from it)."""
        assert self.storage is not None
        async for _ in self._compact_recv:
            durable = await self.kv.sync()
            held = self.sender.hold() if self.sender is not None else None
            index = durable if held is None else min(durable, held)
            if index <= self._snapshot_index:
                continue
            data = self._snapshot_data()
            snap = await self.call(partial(_compact, index=index, data=data))
            if snap is None:
                continue
            started = trio.current_time()
            await self.storage.save_snapshot(snap)
            self._log_bytes = 0  # about: entries applied since the sync stay uncounted
            if snap.meta.index > self._snapshot_index:  # no install overtook us meanwhile
                self._snapshot_meta = snap.meta
            event(
                log,
                "log_compacted",
                index=index,
                seconds=round(trio.current_time() - started, 4),
            )

    # ---------------------------------------------------------------- callers

    async def call(self, fn: Callable[[Raft], T]) -> T:
        """Run ``fn`` on the core inside the core loop; its exception is re-raised here."""
        out: Outcome[T] = Outcome()
        await self._inputs_send.send(_Call(fn, out))
        return await out.wait()

    async def propose(self, data: bytes) -> object:
        """Replicate ``data``; returns the state machine's result once it is applied
        here. Raises NotLeader on a follower, ProposalDropped if a new leader
        overwrote the entry. At most MAX_PENDING_PROPOSALS wait at once (the others
        wait for a turn): the bound on what the core and applier hold for callers."""
        out: Outcome[object] = Outcome()
        async with self._proposing:
            await self._inputs_send.send(_Propose(data, out))
            try:
                return await out.wait()
            except BaseException:
                self.metrics.proposals_failed.inc()
                raise

    async def propose_writes(self, cmds: list[dict[str, Any]], size: int) -> object:
        """Replicate write commands (checked requests without ``id``; ``size`` about
        their encoded bytes); returns their results once applied here, a list in order
        (or one result with ``error`` if the entry failed as a whole). Batches that
        reach the core loop together share one entry. Raises like ``propose``."""
        out: Outcome[object] = Outcome()
        async with self._proposing:
            await self._inputs_send.send(_Writes(cmds, size, out))
            try:
                return await out.wait()
            except BaseException:
                self.metrics.proposals_failed.inc()
                raise

    async def wait_for_leader(self, seconds: float) -> str | None:
        """The leader's id once one is known (at most ``seconds`` from now; None if
        none by then). Lets a request that meets an election answer with the new
        leader instead of ``unavailable``, which would send the client round the
        endpoints with growing back-off."""
        with trio.move_on_after(seconds):
            await self._leader_known.wait()
        return self.raft.leader if self.raft is not None else None

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
                    self.waiters.reads.pop(ctx, None)
                    round_out.fail(exc)

            with trio.CancelScope(shield=True):  # the round's other reads depend on it
                await self._inputs_send.send(_Call(go, Outcome()))
        index = await out.wait()
        if self.applied < index:
            done: Outcome[None] = Outcome()
            self.waiters.applied.append((index, done))
            await done.wait()
        return index

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
