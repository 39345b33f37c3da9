"""The core loop: the only task that touches the Raft core, and the ticker that drives it.

It takes every input that is waiting (so a burst of proposals or messages becomes one
Ready), sends the messages that may leave at once, persists the Ready in one SQLite
transaction, sends the acknowledgements only once the write is durable, and hands
committed entries to the applier (core.md §1 gives the contract). A storage error
stops the node (fail-stop): it never goes on after a failed fsync.

Two things keep a busy disk from costing the cluster its leader: ticks are taken while
a write is outstanding (``_persist``), and a Ready that only moves the commit index is
not written at all (``_process``; docs/storage.md tells what is on disk when).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import trio

from liferaft.core import AppendEntries, HardState, InstallSnapshot, Raft, Ready, Role
from liferaft.node.addresses import learn_from_entries
from liferaft.node.applyqueue import ApplyQueue
from liferaft.node.inputs import Call, Input, Messages, Propose, Tick, Writes, propose_writes
from liferaft.node.peers import PeerLinks
from liferaft.node.promote import AutoPromoter
from liferaft.node.waiters import ReadFailed
from liferaft.observability.logs import event

if TYPE_CHECKING:
    from liferaft.node.node import Node

log = logging.getLogger("liferaft.node")

MAX_INPUTS_PER_ROUND = 4096  # inputs folded into one Ready at most
READ_ROUNDS_MAX = 4  # election timeouts a ReadIndex round may take before it is failed
# Entry data a node may hold committed but not yet applied before it refuses appends
# that bring more (``_backlogged``): what bounds a follower whose applier lags.
APPLY_BACKLOG_BYTES = 64 * 1024 * 1024


class _Save:
    """One Ready for the persister, and what came of it."""

    __slots__ = ("done", "error", "rd", "seconds")

    def __init__(self, rd: Ready) -> None:
        self.rd = rd
        self.done = False
        self.error: Exception | None = None
        self.seconds = 0.0


class CoreLoop:
    def __init__(
        self,
        node: Node,
        *,
        inputs: trio.MemoryReceiveChannel[Input],
        ticks: trio.MemorySendChannel[Input],  # the send side of ``inputs``, for ticks
        peers: PeerLinks,
        to_apply: ApplyQueue,
        promoter: AutoPromoter | None = None,
    ) -> None:
        self._node = node
        self._inputs = inputs
        self._ticks = ticks
        self._peers = peers
        self._to_apply = to_apply
        self._promoter = promoter  # [cluster] auto_promote (node/promote.py)
        self.ticks = 0  # ticks given to the core so far: the promoter's clock
        self._ticks_due = 0  # ticks counted by the ticker, not yet given to the core
        self._tick_queued = False  # a Tick input is on its way to the core loop
        self._tick_wakeup = trio.Event()
        self._last_soft: tuple[Role, str | None, int] | None = None
        self._gauged: tuple[int, ...] = (-1,) * 5  # the values _observe last gave the gauges
        self._refused_appends = 0  # appends refused since the apply backlog went over
        self.leader_moved = trio.Event()  # set (and replaced) at each change of leader
        self.durable_vote: tuple[int, str | None] = (0, None)  # (term, vote) on disk
        self._lazy_hs: HardState | None = None  # a commit index not yet written
        self._slow_persist = node.settings.raft.election_timeout_ms / 1000  # seconds
        # A ReadIndex round not answered in this long was lost (its request or answer,
        # or the leader): failed, the caller asks again (docs/architecture.md).
        self._read_max_age = READ_ROUNDS_MAX * node.settings.raft.election_timeout_ms / 1000
        self._saves, self._saves_recv = trio.open_memory_channel[_Save](1)

    async def ticker(self) -> None:
        """Count ticks due and wake whoever takes them: the core loop (through one
        ``Tick`` input at a time) or, during a disk write, ``_persist``."""
        interval = self._node.settings.raft.heartbeat_interval_ms / 1000
        deadline = trio.current_time()
        while True:
            deadline += interval
            await trio.sleep_until(deadline)
            deadline = max(deadline, trio.current_time() - interval)  # no catch-up storm
            self._ticks_due += 1
            self._tick_wakeup.set()
            if not self._tick_queued:
                # Never wait here: the inputs channel fills while the loop waits on a
                # slow disk, and a blocked ticker would stop the heartbeats ``_persist``
                # sends meanwhile. A full channel only means: try at the next tick (the
                # loop takes the ticks due every round anyway).
                try:
                    self._ticks.send_nowait(Tick())
                except trio.WouldBlock:
                    continue
                self._tick_queued = True

    def _take_ticks(self, raft: Raft) -> None:
        """Tick the core for every tick due and send the heartbeats that come of it
        (this may run while a Ready is outstanding: see ``Raft.tick``)."""
        ticks, self._ticks_due = self._ticks_due, 0
        self.ticks += ticks
        for _ in range(ticks):
            raft.tick()
        if ticks:
            self._peers.send(raft.take_messages())
            self._node.waiters.expire_reads(self._read_max_age)

    async def run(self, raft: Raft) -> None:
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
            writes: list[Writes] = []
            for item in items:
                if isinstance(item, Tick):
                    self._tick_queued = False
                elif isinstance(item, Writes):
                    writes.append(item)
                else:
                    self._handle(raft, item)
            if writes:
                propose_writes(raft, writes, self._node.waiters)
            ticks = self.ticks
            self._take_ticks(raft)
            if self._promoter is not None and self.ticks != ticks:
                self._promoter.on_ticks(raft, self.ticks)
            # Observe before the first await: health and metrics are read while the
            # Ready is being written, and must agree with the core (a sole voter that
            # just elected itself is ready, and its is_leader gauge must say so).
            self._observe(raft)
            while raft.has_ready():
                await self._process(raft, raft.ready())

    def _handle(self, raft: Raft, item: Input) -> None:
        """Carry out one input other than a tick or writes."""
        if isinstance(item, Propose):
            try:
                index = raft.propose(item.data)
            except Exception as exc:  # NotLeader, ProposalRefused: the caller's answer
                item.out.fail(exc)
            else:
                self._node.waiters.proposals[index] = (raft.term, item.out)
        elif isinstance(item, Messages):
            for m in item.msgs:
                if isinstance(m, InstallSnapshot):
                    self._peers.step_snapshot(raft, m)
                elif (
                    isinstance(m, AppendEntries)
                    and m.entries
                    and m.term == raft.term
                    and raft.role is Role.FOLLOWER
                    and self._backlogged()
                ):
                    continue  # as if lost on the way: the leader sends it again later
                else:
                    raft.step(m)
        elif isinstance(item, Call):
            try:
                item.out.set(item.fn(raft))
            except Exception as exc:  # reported to the caller, who asked for it
                item.out.fail(exc)

    async def _process(self, raft: Raft, rd: Ready) -> None:
        node = self._node
        assert node.storage is not None
        self._peers.send(rd.messages)
        committed = rd.committed_entries
        if committed and rd.snapshot is None and raft.role is Role.LEADER:
            # On the leader, committed entries it already holds on disk go to the
            # applier before this Ready's own write, so their answers do not wait for
            # the next batch's fsync (the leader commits only what its own disk holds,
            # so under load that is all of them).
            #
            # A follower answers no one when it applies, but the leader waits for its
            # answer to the entries of this Ready: it applies after writing them and
            # sending that answer. Applied beside the write, the entries took the CPU
            # and the GIL from the write's storage thread, on the path of every write
            # (docs/performance.md, "A follower applies after it answers"). And
            # entries it learns are committed in the same message that brings them
            # must be written first anyway: the state never runs ahead of the log on
            # disk.
            durable = rd.entries[0].index if rd.entries else committed[-1].index + 1
            early = committed[: max(0, durable - committed[0].index)]  # (consecutive)
            if early:
                self._to_apply.put_entries(early)
                committed = committed[len(early) :]
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
                node.storage_ok = False
                event(log, "storage_failed", level=logging.CRITICAL, term=raft.term)
                raise
            node.metrics.fsync_duration.observe(seconds)
            waited = trio.current_time() - started
            if waited > self._slow_persist:  # heartbeats waited this long too
                event(log, "slow_persist", level=logging.WARNING, seconds=round(waited, 4))
            if save.hard_state is not None:
                self.durable_vote = (save.hard_state.term, save.hard_state.vote)
        self._peers.send(rd.persisted_messages)
        learn_from_entries(node.addresses, rd.entries)
        if rd.membership is not None:
            self._peers.dial(rd.membership)
        if rd.snapshot is not None:
            self._to_apply.put_snapshot(rd.snapshot)
        self._to_apply.put_entries(committed)
        for rs in rd.read_states:
            node.waiters.answer_read(rs.ctx, rs.index)
        for ctx in rd.failed_reads:
            out = node.waiters.pop_read(ctx)
            if out is not None:
                out.fail(ReadFailed("leadership lost before the read was confirmed"))
        raft.advance(rd)
        self._observe(raft)

    async def _persist(self, raft: Raft, rd: Ready) -> float:
        """Save ``rd``; meanwhile keep taking ticks, so a leader's heartbeats do not wait
        for a slow fsync (on this project's machine a busy disk holds one for 150 ms,
        longer than the fast-failover election timeout). Other inputs wait: the core
        takes nothing else while a Ready is outstanding. The save itself runs in the
        ``persister`` task, which wakes this loop like a tick when it is done (cheaper
        than a nursery and a cancellation per Ready)."""
        save = _Save(rd)
        self._saves.send_nowait(save)  # the persister takes one at a time: never full
        while not save.done:
            await self._tick_wakeup.wait()
            self._tick_wakeup = trio.Event()
            self._take_ticks(raft)
        if save.error is not None:
            raise save.error
        return save.seconds

    async def persister(self) -> None:
        """Carry out the core loop's saves, one at a time (see ``_persist``)."""
        storage = self._node.storage
        assert storage is not None
        async for save in self._saves_recv:
            try:
                save.seconds = await storage.save(save.rd)
            except Exception as exc:  # re-raised by _persist, in the core loop
                save.error = exc
            save.done = True
            self._tick_wakeup.set()

    def _backlogged(self) -> bool:
        """Whether the committed entries waiting for the applier hold too much data to
        take an append that brings more: from over APPLY_BACKLOG_BYTES until back at
        half of it (refusing and taking again by turns at one level would make the
        leader resend what it has in flight at every turn).

        A leader's own backlog is bounded at the API, where writes wait for their
        answers; a follower's only by the leader's pace, which its quickest follower
        sets. A follower whose applier is slower (a slower disk) would hold ever more
        of the log in memory. Refusing an append of the current leader is as safe as
        losing it on the way: the leader's heartbeats still arrive, its probes find
        where this log ends, and it sends the entries again once the applier has caught
        up. Appends already accepted are not counted until they commit, so the backlog
        can reach the bound plus what the leader had in flight to this node."""
        backlog = self._to_apply.bytes
        if self._refused_appends:
            if backlog > APPLY_BACKLOG_BYTES // 2:
                self._refused_appends += 1
                return True
            event(log, "apply_caught_up", refused_appends=self._refused_appends)
            self._refused_appends = 0
            return False
        if backlog <= APPLY_BACKLOG_BYTES:
            return False
        event(log, "apply_backlog", level=logging.WARNING, backlog_bytes=backlog)
        self._refused_appends = 1
        return True

    def _only_commit(self, hs: HardState) -> bool:
        """Whether ``hs`` differs from what is on disk in its commit index alone (a new
        term or vote must be durable before anything is sent)."""
        return (hs.term, hs.vote) == self.durable_vote

    def _observe(self, raft: Raft) -> None:
        soft = (raft.role, raft.leader, raft.term)
        if soft != self._last_soft:
            prev = self._last_soft or (Role.FOLLOWER, None, 0)
            self._last_soft = soft
            if prev[1] != raft.leader:
                if raft.leader is not None:
                    self._node.metrics.leader_changes.inc()
                moved, self.leader_moved = self.leader_moved, trio.Event()
                moved.set()
                event(
                    log, "leader_changed", term=raft.term, leader=raft.leader, role=raft.role.value
                )
            elif prev[0] != raft.role:
                event(log, "role_changed", term=raft.term, role=raft.role.value)
        # Only the gauges that moved: this runs twice a Ready, a gauge's set takes a
        # lock, and between two calls mostly only the commit index moves.
        values = (
            1 if raft.leader else 0,
            1 if raft.role is Role.LEADER else 0,
            raft.term,
            raft.commit,
            len(self._node.waiters.proposals),
        )
        if values != self._gauged:
            m = self._node.metrics
            gauges = (m.has_leader, m.is_leader, m.term, m.commit_index, m.proposals_pending)
            for gauge, value, before in zip(gauges, values, self._gauged, strict=True):
                if value != before:
                    gauge.set(value)
            self._gauged = values
