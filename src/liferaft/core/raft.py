"""The Raft state machine: a pure, deterministic object driven by the shell.

Inputs are ``tick``, ``step``, ``propose``, ``propose_conf_change``, ``read_index``,
``transfer_leadership`` and ``compact``; the output is a ``Ready`` the shell handles
and hands back to ``advance``. Between ``ready()`` and ``advance()`` no other input is
accepted, which keeps the bookkeeping of what is durable exact. There is no clock, no
I/O and no global randomness here: the same inputs and the same seeded ``random.Random``
give the same outputs, which is what lets the simulator replay a failing seed.

Structure follows etcd-io/raft (pre-vote, check-quorum with leader lease, progress
tracking with probe/replicate/snapshot states, fast log back-off) with the Raft
thesis's single-server membership changes, effective when appended.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from liferaft.core.config import RaftConfig
from liferaft.core.errors import NotLeader, ProposalRefused, UsageError
from liferaft.core.log import RaftLog
from liferaft.core.membership import EMPTY, ConfChange, ConfEntry, Membership
from liferaft.core.messages import (
    AnyMessage,
    AppendEntries,
    AppendResponse,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    ReadIndexRequest,
    ReadIndexResponse,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SnapshotResponse,
    SoftState,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from liferaft.core.progress import ProgressState
from liferaft.core.readindex import ReadQueue
from liferaft.core.replication import Replicator

# Messages that depend on nothing the same Ready persists: they may leave at once.
_IMMEDIATE = (AppendEntries, Heartbeat, InstallSnapshot, TimeoutNow, ReadIndexRequest)
_FROM_LEADER = (AppendEntries, Heartbeat, InstallSnapshot)


@dataclass(frozen=True, slots=True)
class Restored:
    """What the shell read back from storage at start."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: tuple[Entry, ...] = ()
    initial_membership: Membership = EMPTY  # used when neither snapshot nor log has one


@dataclass(frozen=True, slots=True)
class PeerStatus:
    match: int
    next: int
    state: ProgressState
    recent_active: bool


@dataclass(frozen=True, slots=True)
class Status:
    id: str
    role: Role
    term: int
    leader: str | None
    commit: int
    applied: int
    last_index: int
    snapshot_index: int
    membership: Membership
    peers: dict[str, PeerStatus]


class Raft:
    def __init__(self, config: RaftConfig, rng: random.Random, restored: Restored) -> None:
        self.id = config.id
        self._cfg = config
        self._rng = rng
        hs = restored.hard_state
        self.term = hs.term
        self.vote = hs.vote
        snap = restored.snapshot
        self.log = RaftLog(
            snap.meta.index if snap else 0,
            snap.meta.term if snap else 0,
            restored.entries,
            hs.commit,
        )
        self._snapshot = snap
        self._unstable_snapshot: Snapshot | None = None
        self._base_membership = snap.meta.membership if snap else restored.initial_membership
        self._conf_entries: list[tuple[int, Membership]] = [
            (e.index, ConfEntry.decode(e.data).membership)
            for e in restored.entries
            if e.kind is EntryKind.CONFIG
        ]
        self.membership = self._membership_at(self.log.last_index)
        self.role = Role.FOLLOWER
        self.leader: str | None = None
        self._repl: Replicator | None = None  # only while leader
        self._votes: dict[str, bool] = {}
        # Split votes: the highest term at which we granted a pre-vote to a voter with a
        # higher id, and the ticks left before we campaign, having won a pre-vote at that
        # same term (see ``_tally``).
        self._yielded_term = 0
        self._defer: int | None = None
        # A follower's lease (no vote while it hears from a leader) is a tick shorter
        # than the election timeout: nodes tick out of phase, and a peer that drew the
        # shortest timeout after the leader died may ask when we have counted one tick
        # fewer since its last heartbeat; ignored, the election would wait for our own
        # timeout. Never under heartbeat_ticks + 1, or with few ticks per timeout the
        # lease would end between two heartbeats.
        self._lease_ticks = max(config.election_ticks - 1, config.heartbeat_ticks + 1)
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = self._random_timeout()
        self._transferee: str | None = None
        self._reads = ReadQueue()
        self._incoming: tuple[SnapshotMeta, bytearray] | None = None
        # outputs gathered for the next Ready
        self._msgs: list[AnyMessage] = []
        self._persisted_msgs: list[AnyMessage] = []
        self._read_states: list[ReadState] = []
        self._failed_reads: list[bytes] = []
        self._persisted_hs = hs
        self._reported_membership = self.membership
        self._outstanding: Ready | None = None

    # ---------------------------------------------------------------- observation

    @property
    def commit(self) -> int:
        return self.log.committed

    @property
    def applied(self) -> int:
        return self.log.applied

    @property
    def leader_heard(self) -> bool:
        """Whether this node heard from its leader within an election timeout (a leader:
        True). Unlike ``leader``, it lapses on a learner too, which never campaigns."""
        if self.role is Role.LEADER:
            return True
        return self.leader is not None and self._election_elapsed < self._cfg.election_ticks

    @property
    def membership_index(self) -> int:
        """The index of the entry the current (newest appended) membership comes from:
        the snapshot's index when it came with the snapshot, 0 for the initial one."""
        if self._conf_entries:
            return self._conf_entries[-1][0]
        return self.log.snapshot_index

    def membership_at(self, index: int) -> Membership:
        """The membership in force at ``index`` (at or after the snapshot's index)."""
        return self._membership_at(index)

    @property
    def transferee(self) -> str | None:
        return self._transferee

    @property
    def conf_change_ready(self) -> bool:
        """Whether a leader would take a membership change now: an entry of its term is
        committed and no change is uncommitted (§5; both pass by themselves)."""
        return self._committed_in_term() and not self._conf_pending()

    def soft_state(self) -> SoftState:
        return SoftState(self.role, self.leader, self.term)

    def status(self) -> Status:
        return Status(
            id=self.id,
            role=self.role,
            term=self.term,
            leader=self.leader,
            commit=self.log.committed,
            applied=self.log.applied,
            last_index=self.log.last_index,
            snapshot_index=self.log.snapshot_index,
            membership=self.membership,
            peers={
                p: PeerStatus(pr.match, pr.next, pr.state, pr.recent_active)
                for p, pr in (self._repl.prs if self._repl else {}).items()
            },
        )

    # ---------------------------------------------------------------- inputs

    def tick(self) -> None:
        """One unit of logical time. Allowed while a Ready is outstanding (the shell's
        disk write may be slow): time then still passes and a leader still sends its
        heartbeats (``take_messages``), but no role changes until ``advance``: the
        timeouts that fell due fire at the first tick after it."""
        if self.role is Role.LEADER:
            self._tick_leader()
        else:
            self._election_elapsed += 1
            if self._defer is not None and self._outstanding is None:
                self._defer -= 1
                if self._defer <= 0:
                    self._defer = None
                    self._campaign(pre_vote=False)
                    return
            if (
                self._outstanding is None
                and self._promotable()
                and self._election_elapsed >= self._randomized_timeout
            ):
                self._election_elapsed = 0
                self._campaign(pre_vote=self._cfg.pre_vote)

    def take_messages(self) -> tuple[AnyMessage, ...]:
        """The messages that may leave at once (those a Ready lists in ``messages``)
        gathered since the last ``ready()``: how a shell sends the heartbeats of ticks
        taken while a Ready is outstanding. (While the current term and vote are not
        durable, e.g. a sole voter that just elected itself, ``_send`` keeps even these
        messages for after the write.)"""
        msgs, self._msgs = tuple(self._msgs), []
        return msgs

    def campaign(self) -> None:
        """Start an election now (as if the election timeout had passed)."""
        self._check_idle()
        if self.role is not Role.LEADER:
            self._campaign(pre_vote=self._cfg.pre_vote)

    def propose(self, data: bytes) -> int:
        """Append a client command; returns its index. Raises NotLeader/ProposalRefused."""
        self._check_accepting()
        e = Entry(self.log.last_index + 1, self.term, EntryKind.NORMAL, data)
        self._append_own(e)
        return e.index

    def propose_conf_change(self, change: ConfChange) -> int:
        self._check_accepting()
        if not self._committed_in_term():
            raise ProposalRefused("the leader has not yet committed an entry of its term")
        if self._conf_pending():
            raise ProposalRefused("a membership change is already in progress")
        new = change.apply(self.membership)
        data = ConfEntry(change, new).encode()
        e = Entry(self.log.last_index + 1, self.term, EntryKind.CONFIG, data)
        self._append_own(e)
        return e.index

    def read_index(self, ctx: bytes) -> None:
        """Ask for a linearizable read; the answer is a ReadState (or a failed read)
        carrying ``ctx`` in a later Ready."""
        self._check_idle()
        if self.role is Role.LEADER:
            self._leader_read(ctx, None)
        elif self.role is Role.FOLLOWER and self.leader is not None:
            self._send(ReadIndexRequest(term=self.term, src=self.id, dst=self.leader, ctx=ctx))
        else:
            self._failed_reads.append(ctx)

    def transfer_leadership(self, target: str) -> None:
        self._check_idle()
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader)
        if target == self.id or target == self._transferee:
            return
        if target not in self.membership.voters:
            raise ProposalRefused(f"{target} is not a voter")
        self._transferee = target
        self._election_elapsed = 0  # the transfer is abandoned after an election timeout
        repl = self._repl_or_fail()
        if repl.match(target) == self.log.last_index:
            self._send(TimeoutNow(term=self.term, src=self.id, dst=target))
        else:
            repl.want_append(target)

    def compact(self, index: int, data: bytes) -> Snapshot:
        """The shell snapshotted its applied state at ``index``: drop the log up to it.

        Returns the snapshot (with its metadata) for the shell to persist; the core keeps
        it to send to followers that fall behind the log's new start.
        """
        self._check_idle()
        term = self.log.term(index)
        if term is None or index > self.log.applied:
            raise UsageError(f"cannot snapshot at {index} (applied {self.log.applied})")
        snap = Snapshot(SnapshotMeta(index, term, self._membership_at(index)), data)
        self.log.compact(index)
        self._base_membership = snap.meta.membership
        self._conf_entries = [(i, m) for i, m in self._conf_entries if i > index]
        self._snapshot = snap
        return snap

    def step(self, m: AnyMessage) -> None:
        self._check_idle()
        if m.dst != self.id:
            return
        if m.term > self.term:
            if isinstance(m, VoteRequest):
                in_lease = (
                    self._cfg.check_quorum
                    and self.leader is not None
                    and (self.role is Role.LEADER or self._election_elapsed < self._lease_ticks)
                )
                if in_lease and not m.transfer:
                    return  # we hear from a live leader: ignore a disruptive candidate
            if isinstance(m, VoteRequest) and m.pre_vote:
                pass  # a pre-vote changes nobody's term
            elif isinstance(m, VoteResponse) and m.pre_vote and m.granted:
                pass  # a granted pre-vote carries the term we would campaign at
            else:
                self._become_follower(m.term, m.src if isinstance(m, _FROM_LEADER) else None)
        elif m.term < self.term:
            if isinstance(m, _FROM_LEADER) and (self._cfg.check_quorum or self._cfg.pre_vote):
                # A stale leader (or one that cannot see our higher term because we
                # ignore its votes) learns it from this and steps down.
                self._send(
                    AppendResponse(term=self.term, src=self.id, dst=m.src, success=False, index=0)
                )
            elif isinstance(m, VoteRequest) and m.pre_vote:
                self._send(
                    VoteResponse(
                        term=self.term, src=self.id, dst=m.src, granted=False, pre_vote=True
                    )
                )
            return

        if isinstance(m, VoteRequest):
            self._handle_vote_request(m)
        elif self.role is Role.LEADER:
            self._step_leader(m)
        elif self.role is Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    # ---------------------------------------------------------------- Ready

    def has_ready(self) -> bool:
        return bool(
            (self._repl is not None and bool(self._repl.want))
            or self._reads.need_round
            or self._msgs
            or self._persisted_msgs
            or self._read_states
            or self._failed_reads
            or self._unstable_snapshot is not None
            or self.log.unstable_from <= self.log.last_index
            or self.log.applied < self.log.committed
            or self._hard_state() != self._persisted_hs
            or self.membership != self._reported_membership
        )

    def ready(self) -> Ready:
        self._check_idle()
        if self._repl is not None:
            if self._reads.need_round:
                self._repl.broadcast_heartbeat(self._reads.next_round())
                self._release_reads()
            self._repl.flush()
        hs = self._hard_state()
        log = self.log
        rd = Ready(
            soft_state=self.soft_state(),
            hard_state=hs if hs != self._persisted_hs else None,
            snapshot=self._unstable_snapshot,
            entries=tuple(log.unstable_entries()),
            messages=tuple(self._msgs),
            persisted_messages=tuple(self._persisted_msgs),
            committed_entries=tuple(log.slice(log.applied + 1, log.committed + 1))
            if log.applied < log.committed
            else (),
            read_states=tuple(self._read_states),
            failed_reads=tuple(self._failed_reads),
            membership=self.membership if self.membership != self._reported_membership else None,
        )
        self._msgs, self._persisted_msgs = [], []
        self._read_states, self._failed_reads = [], []
        self._reported_membership = self.membership
        self._outstanding = rd
        return rd

    def advance(self, rd: Ready) -> None:
        if rd is not self._outstanding:
            raise UsageError("advance() must get the Ready that ready() returned")
        self._outstanding = None
        if rd.hard_state is not None:
            self._persisted_hs = rd.hard_state
        if rd.snapshot is not None and rd.snapshot is self._unstable_snapshot:
            self._unstable_snapshot = None
        if rd.entries:
            self.log.stable_to(rd.entries[-1].index)
        if rd.committed_entries:
            self.log.applied = rd.committed_entries[-1].index
        if self.role is Role.LEADER and self._maybe_commit():
            self._on_leader_commit()

    # ---------------------------------------------------------------- roles

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
        self.leader = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = self._random_timeout()
        self._transferee = None
        self._votes = {}
        self._defer = None
        self._repl = None
        for ctx, requester in self._reads.drain():
            self._fail_read(ctx, requester)

    def _become_follower(self, term: int, leader: str | None) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader = leader

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.leader = self.id
        self._repl = Replicator(
            self.id, self.term, self.log, self._cfg, self._send, lambda: self._snapshot
        )
        self._repl.set_members(self.membership.members)
        self._append_own(Entry(self.log.last_index + 1, self.term, EntryKind.NOOP))

    def _campaign(self, *, pre_vote: bool, transfer: bool = False) -> None:
        if not self._promotable():
            return
        if pre_vote:
            self._reset(self.term)
            self.role = Role.PRE_CANDIDATE
            term = self.term + 1
        else:
            self._reset(self.term + 1)
            self.role = Role.CANDIDATE
            self.vote = self.id
            term = self.term
        self._votes = {self.id: True}
        if self._tally():
            return
        for peer in sorted(self.membership.voters - {self.id}):
            self._send(
                VoteRequest(
                    term=term,
                    src=self.id,
                    dst=peer,
                    last_index=self.log.last_index,
                    last_term=self.log.last_term,
                    pre_vote=pre_vote,
                    transfer=transfer,
                )
            )

    def _tally(self) -> bool:
        """Count votes; win or lose the election if decided. True if decided."""
        voters = self.membership.voters
        granted = sum(1 for v, ok in self._votes.items() if ok and v in voters)
        rejected = sum(1 for v, ok in self._votes.items() if not ok and v in voters)
        quorum = self.membership.quorum()
        if granted >= quorum:
            if self.role is Role.PRE_CANDIDATE:
                if self._defer is not None:
                    return True  # already won, waiting (below)
                if self._yielded_term == self.term + 1:
                    # We also granted this term's pre-vote to a higher id: it is likely
                    # a candidate by now, and campaigning too would split the vote (two
                    # candidates, each with its own vote: a 3-node cluster that lost a
                    # node then waits a whole election timeout more). Give its vote
                    # request a heartbeat interval to come; campaign only if it does not.
                    self._yielded_term = 0
                    self._defer = self._cfg.heartbeat_ticks + 1
                    return True
                self._campaign(pre_vote=False)
            else:
                self._become_leader()
            return True
        if len(voters) - rejected < quorum:
            self._become_follower(self.term, None)
            return True
        return False

    def _promotable(self) -> bool:
        """May this node campaign? A voter may; so may a node whose removal is still
        uncommitted (Raft thesis §4.2.2): it may be the only one holding that entry, and
        without it the change could never commit. Its own vote does not count then."""
        if self.id in self.membership.voters:
            return True
        if self._conf_pending():
            return self.id in self._membership_at(self._conf_entries[-1][0] - 1).voters
        return False

    def _random_timeout(self) -> int:
        t = self._cfg.election_ticks
        return t + self._rng.randrange(t)

    # ---------------------------------------------------------------- voting

    def _handle_vote_request(self, m: VoteRequest) -> None:
        can_vote = (
            self.vote == m.src
            or (self.vote is None and self.leader is None)
            or (m.pre_vote and m.term > self.term)
        )
        if can_vote and self.log.is_up_to_date(m.last_index, m.last_term):
            self._send(
                VoteResponse(term=m.term, src=self.id, dst=m.src, granted=True, pre_vote=m.pre_vote)
            )
            if not m.pre_vote:
                self._election_elapsed = 0
                self.vote = m.src
            elif m.src > self.id and m.src in self.membership.voters:
                self._yielded_term = max(self._yielded_term, m.term)
        else:
            self._send(
                VoteResponse(
                    term=self.term, src=self.id, dst=m.src, granted=False, pre_vote=m.pre_vote
                )
            )

    def _step_candidate(self, m: AnyMessage) -> None:
        if isinstance(m, _FROM_LEADER):
            self._become_follower(m.term, m.src)
            self._step_follower(m)
        elif isinstance(m, VoteResponse):
            if m.pre_vote == (self.role is Role.PRE_CANDIDATE) and m.src not in self._votes:
                self._votes[m.src] = m.granted
                self._tally()
        elif isinstance(m, ReadIndexRequest):
            self._fail_read(m.ctx, m.src)
        elif isinstance(m, ReadIndexResponse):
            self._deliver_read(m)

    # ---------------------------------------------------------------- follower

    def _step_follower(self, m: AnyMessage) -> None:
        if isinstance(m, _FROM_LEADER):
            self._election_elapsed = 0
            self._yielded_term = 0  # a pre-vote granted before is moot: the leader lives
            self.leader = m.src
            if isinstance(m, AppendEntries):
                self._handle_append(m)
            elif isinstance(m, Heartbeat):
                self.log.commit_to(min(m.commit, self.log.last_index))
                self._send(
                    HeartbeatResponse(
                        term=self.term, src=self.id, dst=m.src, read_round=m.read_round
                    )
                )
            else:
                self._handle_snapshot_chunk(m)
        elif isinstance(m, TimeoutNow):
            self._campaign(pre_vote=False, transfer=True)
        elif isinstance(m, ReadIndexRequest):
            self._fail_read(m.ctx, m.src)
        elif isinstance(m, ReadIndexResponse):
            self._deliver_read(m)

    def _handle_append(self, m: AppendEntries) -> None:
        log = self.log
        if m.prev_index < log.committed:
            self._ack(m.src, log.committed)
            return
        if not log.match_term(m.prev_index, m.prev_term):
            hint_index, hint_term = log.find_conflict_by_term(
                min(m.prev_index, log.last_index), m.prev_term
            )
            self._send(
                AppendResponse(
                    term=self.term,
                    src=self.id,
                    dst=m.src,
                    success=False,
                    index=m.prev_index,
                    hint_index=hint_index,
                    hint_term=hint_term,
                )
            )
            return
        last_new = m.prev_index + len(m.entries)
        conflict = log.find_conflict(m.entries)
        if conflict:
            self._append_log(m.entries[conflict - m.prev_index - 1 :])
        log.commit_to(min(m.commit, last_new))
        self._ack(m.src, last_new)

    def _ack(self, leader: str, index: int) -> None:
        self._send(
            AppendResponse(term=self.term, src=self.id, dst=leader, success=True, index=index)
        )

    def _handle_snapshot_chunk(self, m: InstallSnapshot) -> None:
        meta = m.meta
        if meta.index <= self.log.committed:
            self._incoming = None
            self._snapshot_reply(m.src, self.log.committed, 0, done=True)
            return
        if m.offset == 0:
            self._incoming = (meta, bytearray())
        inc = self._incoming
        if inc is None or inc[0] != meta or len(inc[1]) != m.offset:
            want = len(inc[1]) if inc is not None and inc[0] == meta else 0
            self._snapshot_reply(m.src, meta.index, want, done=False)
            return
        inc[1].extend(m.data)
        if not m.done:
            self._snapshot_reply(m.src, meta.index, len(inc[1]), done=False)
            return
        self._incoming = None
        if self.log.match_term(meta.index, meta.term):
            # We hold the entries the snapshot covers: just learn they are committed.
            self.log.commit_to(meta.index)
        else:
            self._restore(Snapshot(meta, bytes(inc[1])))
        self._snapshot_reply(m.src, meta.index, 0, done=True)

    def _snapshot_reply(self, leader: str, index: int, next_offset: int, *, done: bool) -> None:
        self._send(
            SnapshotResponse(
                term=self.term,
                src=self.id,
                dst=leader,
                index=index,
                next_offset=next_offset,
                done=done,
            )
        )

    def _restore(self, snap: Snapshot) -> None:
        self.log.restore(snap.meta.index, snap.meta.term)
        self._snapshot = snap
        self._unstable_snapshot = snap
        self._base_membership = snap.meta.membership
        self._conf_entries = []
        self._set_membership()

    # ---------------------------------------------------------------- leader

    def _repl_or_fail(self) -> Replicator:
        if self._repl is None:
            raise UsageError(f"{self.id} has no replicator outside leadership")
        return self._repl

    def _tick_leader(self) -> None:
        repl = self._repl_or_fail()
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self._cfg.election_ticks and self._outstanding is None:
            self._election_elapsed = 0
            ms = self.membership
            if self._cfg.check_quorum and not repl.quorum_active(ms.voters, ms.quorum()):
                self._become_follower(self.term, None)
                return
            self._transferee = None  # a transfer that did not finish in time is dropped
        if self._heartbeat_elapsed >= self._cfg.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            repl.broadcast_heartbeat(self._reads.next_round())
            self._release_reads()  # our own round counts: a sole voter confirms itself

    def _step_leader(self, m: AnyMessage) -> None:
        repl = self._repl_or_fail()
        if isinstance(m, ReadIndexRequest):
            self._leader_read(m.ctx, m.src)
        elif isinstance(m, AppendResponse):
            if repl.on_append_response(m):
                if self._maybe_commit():
                    self._on_leader_commit()
                if m.src == self._transferee and repl.match(m.src) == self.log.last_index:
                    self._send(TimeoutNow(term=self.term, src=self.id, dst=m.src))
        elif isinstance(m, HeartbeatResponse):
            if repl.on_heartbeat_response(m):
                self._release_reads()
        elif isinstance(m, SnapshotResponse):
            repl.on_snapshot_response(m)

    def _maybe_commit(self) -> bool:
        ms = self.membership
        if not ms.voters or self._repl is None:
            return False
        index = self._repl.quorum_index(ms.voters, ms.quorum())
        # Figure 8: only an entry of the current term is committed by counting replicas.
        if index > self.log.committed and self.log.term(index) == self.term:
            self.log.commit_to(index)
            return True
        return False

    def _on_leader_commit(self) -> None:
        # Followers are not sent the new commit index by itself: it rides on the next
        # append or heartbeat (core.md, "Commit rule"). A message of its own cost every
        # node a send, a receive, a Ready and an answer per lone write, a quarter of the
        # cluster's CPU on that path. A follower that asked for a read is taught it at
        # once (``_answer_read``).
        if self._reads.waiting_for_commit and self._committed_in_term():
            waiting, self._reads.waiting_for_commit = self._reads.waiting_for_commit, []
            for ctx, requester in waiting:
                self._leader_read(ctx, requester)
        if self.id not in self.membership.members and not self._conf_pending():
            self._become_follower(self.term, None)  # our removal is committed

    # ---------------------------------------------------------------- reads

    def _committed_in_term(self) -> bool:
        return self.log.term(self.log.committed) == self.term

    def _leader_read(self, ctx: bytes, requester: str | None) -> None:
        if not self._committed_in_term():
            self._reads.waiting_for_commit.append((ctx, requester))
        elif self.membership.voters == {self.id}:
            self._answer_read(ctx, self.log.committed, requester)
        else:
            self._reads.add(ctx, self.log.committed, requester)

    def _release_reads(self) -> None:
        ms = self.membership
        if not ms.voters or self._repl is None:
            return
        confirmed = self._repl.quorum_round(ms.voters, ms.quorum(), self._reads.round)
        for r in self._reads.release(confirmed):
            self._answer_read(r.ctx, r.index, r.requester)

    def _answer_read(self, ctx: bytes, index: int, requester: str | None) -> None:
        if requester is None:
            self._read_states.append(ReadState(ctx, index))
        else:
            self._send(
                ReadIndexResponse(
                    term=self.term, src=self.id, dst=requester, ctx=ctx, index=index, ok=True
                )
            )
            if self._repl is not None:
                # It serves the read once it has applied ``index``: it must learn that
                # ``index`` is committed now, not at the next heartbeat.
                self._repl.teach_commit(requester, index)

    def _fail_read(self, ctx: bytes, requester: str | None) -> None:
        if requester is None:
            self._failed_reads.append(ctx)
        else:
            self._send(
                ReadIndexResponse(
                    term=self.term, src=self.id, dst=requester, ctx=ctx, index=0, ok=False
                )
            )

    def _deliver_read(self, m: ReadIndexResponse) -> None:
        if m.ok:
            self._read_states.append(ReadState(m.ctx, m.index))
        else:
            self._failed_reads.append(m.ctx)

    # ---------------------------------------------------------------- log and membership

    def _append_own(self, e: Entry) -> None:
        self._append_log([e])
        if self._repl is not None:
            self._repl.want_all()

    def _append_log(self, entries: tuple[Entry, ...] | list[Entry]) -> None:
        at = entries[0].index
        self.log.append(entries)
        confs = [(i, m) for i, m in self._conf_entries if i < at]
        confs.extend(
            (e.index, ConfEntry.decode(e.data).membership)
            for e in entries
            if e.kind is EntryKind.CONFIG
        )
        if confs != self._conf_entries or any(e.kind is EntryKind.CONFIG for e in entries):
            self._conf_entries = confs
            self._set_membership()

    def _membership_at(self, index: int) -> Membership:
        for i, m in reversed(self._conf_entries):
            if i <= index:
                return m
        return self._base_membership

    def _set_membership(self) -> None:
        new = self._membership_at(self.log.last_index)
        if new == self.membership:
            return
        self.membership = new
        if self.role is not Role.LEADER:
            return
        self._repl_or_fail().set_members(new.members)
        if self._transferee is not None and self._transferee not in new.voters:
            self._transferee = None
        if self._maybe_commit():
            self._on_leader_commit()
        self._release_reads()

    # ---------------------------------------------------------------- plumbing

    def _conf_pending(self) -> bool:
        """Is the newest membership change not yet committed?"""
        return bool(self._conf_entries) and self._conf_entries[-1][0] > self.log.committed

    def _hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def _send(self, m: AnyMessage) -> None:
        if (isinstance(m, _IMMEDIATE) or (isinstance(m, VoteRequest) and m.pre_vote)) and (
            self.term,
            self.vote,
        ) == (self._persisted_hs.term, self._persisted_hs.vote):
            self._msgs.append(m)
        else:
            self._persisted_msgs.append(m)

    def _check_idle(self) -> None:
        if self._outstanding is not None:
            raise UsageError("the previous Ready has not been advanced")

    def _check_accepting(self) -> None:
        self._check_idle()
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader)
        if self._transferee is not None:
            raise ProposalRefused("leadership transfer in progress")
