"""The leader's replication machinery for one term: what each follower has, and what to
send it next.

A ``Replicator`` lives exactly as long as one leadership: ``Raft`` makes a new one when
it becomes leader and drops it when it steps down, so no progress state can leak from
one term into the next. Appends are sent lazily: events only mark a follower as wanting
an append, and ``flush`` (called when the shell asks for a Ready) sends one message per
follower carrying everything new, so a burst of proposals costs one message per peer
rather than one per proposal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from liferaft.core.config import RaftConfig
from liferaft.core.log import RaftLog
from liferaft.core.messages import (
    AnyMessage,
    AppendEntries,
    AppendResponse,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Snapshot,
    SnapshotResponse,
)
from liferaft.core.progress import Inflights, Progress, ProgressState


class Replicator:
    def __init__(
        self,
        node_id: str,
        term: int,
        log: RaftLog,
        cfg: RaftConfig,
        send: Callable[[AnyMessage], None],
        snapshot: Callable[[], Snapshot | None],
    ) -> None:
        self.id = node_id
        self.term = term
        self.log = log
        self.cfg = cfg
        self.send = send
        self.snapshot = snapshot
        self.prs: dict[str, Progress] = {}
        self.want: dict[str, bool] = {}  # follower -> send even if there is nothing new

    # ---------------------------------------------------------------- followers

    def set_members(self, members: Iterable[str]) -> None:
        """Track exactly ``members`` (minus ourselves); new ones start probing at the end."""
        wanted = set(members) - {self.id}
        for peer in list(self.prs):
            if peer not in wanted:
                del self.prs[peer]
                self.want.pop(peer, None)
        for peer in sorted(wanted - self.prs.keys()):  # sorted: replayable
            cfg = self.cfg
            pr = Progress(
                self.log.last_index + 1, Inflights(cfg.max_inflight_msgs, cfg.max_inflight_bytes)
            )
            pr.recent_active = True  # give a new follower one election timeout to answer
            self.prs[peer] = pr
            self.want[peer] = False

    def match(self, peer: str) -> int:
        """How far ``peer``'s log is known to match ours; our own durable end for us."""
        if peer == self.id:
            return self.log.stable
        pr = self.prs.get(peer)
        return pr.match if pr is not None else 0

    def quorum_index(self, voters: frozenset[str], quorum: int) -> int:
        """The highest index that a quorum of ``voters`` holds."""
        return sorted((self.match(v) for v in voters), reverse=True)[quorum - 1]

    def quorum_round(self, voters: frozenset[str], quorum: int, own_round: int) -> int:
        """The newest read round a quorum of ``voters`` has answered."""
        rounds = sorted(
            (
                own_round if v == self.id else (self.prs[v].read_round if v in self.prs else 0)
                for v in voters
            ),
            reverse=True,
        )
        return rounds[quorum - 1]

    def quorum_active(self, voters: frozenset[str], quorum: int) -> bool:
        """Did a quorum talk to us since the last call? (check-quorum)"""
        active = sum(
            1 for v in voters if v == self.id or (v in self.prs and self.prs[v].recent_active)
        )
        for pr in self.prs.values():
            pr.recent_active = False
        return active >= quorum

    # ---------------------------------------------------------------- sending

    def want_append(self, peer: str, *, send_empty: bool = False) -> None:
        if peer in self.prs:
            self.want[peer] = self.want.get(peer, False) or send_empty

    def teach_commit(self, peer: str, index: int) -> None:
        """Make sure ``peer`` is sent a commit index of at least ``index`` (as far as its
        log reaches): an empty append if no message so far could have carried it."""
        pr = self.prs.get(peer)
        if pr is not None and pr.commit_sent < index:
            self.want_append(peer, send_empty=True)

    def want_all(self, *, send_empty: bool = False) -> None:
        for peer in self.prs:
            self.want_append(peer, send_empty=send_empty)

    def flush(self) -> None:
        want, self.want = self.want, {}
        for peer, send_empty in want.items():
            pr = self.prs.get(peer)
            if pr is not None:
                self._send_append(peer, pr, send_empty=send_empty)

    def broadcast_heartbeat(self, read_round: int) -> None:
        for peer, pr in self.prs.items():
            commit = min(pr.match, self.log.committed)
            pr.commit_sent = max(pr.commit_sent, commit)
            self.send(
                Heartbeat(
                    term=self.term,
                    src=self.id,
                    dst=peer,
                    commit=commit,
                    read_round=read_round,
                )
            )

    def _send_append(self, peer: str, pr: Progress, *, send_empty: bool) -> None:
        log = self.log
        while not pr.paused():
            prev = pr.next - 1
            prev_term = log.term(prev)
            if prev_term is None:
                if prev < log.snapshot_index:
                    self._send_snapshot_chunk(peer, pr)
                return
            entries = (
                log.slice(pr.next, log.last_index + 1, self.cfg.max_msg_bytes)
                if pr.next <= log.last_index
                else []
            )
            if not entries and not send_empty:
                return
            self.send(
                AppendEntries(
                    term=self.term,
                    src=self.id,
                    dst=peer,
                    prev_index=prev,
                    prev_term=prev_term,
                    entries=tuple(entries),
                    commit=log.committed,
                )
            )
            send_empty = False
            last_new = entries[-1].index if entries else prev
            pr.commit_sent = max(pr.commit_sent, min(log.committed, last_new))
            if pr.state is ProgressState.PROBE:
                pr.probe_sent = True
            elif entries:
                pr.next = entries[-1].index + 1
                pr.inflights.add(entries[-1].index, sum(e.size() for e in entries))
            if not entries:
                return

    def _send_snapshot_chunk(self, peer: str, pr: Progress) -> None:
        snap = self.snapshot()
        if snap is None:
            return
        if pr.state is not ProgressState.SNAPSHOT or pr.snapshot_index != snap.meta.index:
            pr.become_snapshot(snap.meta.index)
        off = pr.snapshot_offset
        chunk = snap.data[off : off + self.cfg.snapshot_chunk_bytes]
        self.send(
            InstallSnapshot(
                term=self.term,
                src=self.id,
                dst=peer,
                meta=snap.meta,
                offset=off,
                data=chunk,
                done=off + len(chunk) >= len(snap.data),
            )
        )

    # ---------------------------------------------------------------- answers

    def on_append_response(self, m: AppendResponse) -> bool:
        """True if the follower's match index moved (the commit index may move too)."""
        pr = self.prs.get(m.src)
        if pr is None:
            return False
        pr.recent_active = True
        if not m.success:
            probe = m.hint_index
            if m.hint_term > 0:
                probe, _ = self.log.find_conflict_by_term(m.hint_index, m.hint_term)
            if pr.maybe_decrease_to(m.index, probe):
                if pr.state is ProgressState.REPLICATE:
                    pr.become_probe()
                self.want_append(m.src)
            return False
        if m.index > self.log.last_index or not pr.maybe_update(m.index):
            return False
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT:
            pr.become_probe()
            pr.become_replicate()
        else:
            pr.inflights.free_to(m.index)
        self.want_append(m.src)
        return True

    def on_heartbeat_response(self, m: HeartbeatResponse) -> bool:
        """True if the follower confirmed a newer read round."""
        pr = self.prs.get(m.src)
        if pr is None:
            return False
        pr.recent_active = True
        pr.probe_sent = False
        if pr.state is ProgressState.REPLICATE and pr.inflights.full():
            pr.inflights.free_first()  # an append may be lost: let one more through
        if pr.state is ProgressState.SNAPSHOT:
            # Resend only if a whole heartbeat passed without an acknowledged chunk, so a
            # lost chunk is retried without starting a second stream.
            if pr.snapshot_stalled:
                self._send_snapshot_chunk(m.src, pr)
            pr.snapshot_stalled = True
        elif pr.match < self.log.last_index:
            self.want_append(m.src, send_empty=True)
        if m.read_round > pr.read_round:
            pr.read_round = m.read_round
            return True
        return False

    def on_snapshot_response(self, m: SnapshotResponse) -> None:
        pr = self.prs.get(m.src)
        if pr is None:
            return
        pr.recent_active = True
        if m.done:
            pr.maybe_update(min(m.index, self.log.last_index))
            if pr.state is ProgressState.SNAPSHOT:
                pr.become_probe()
            self.want_append(m.src, send_empty=True)
        elif (
            pr.state is ProgressState.SNAPSHOT
            and m.index == pr.snapshot_index
            and m.next_offset != pr.snapshot_offset  # equal: a duplicate answer
        ):
            pr.snapshot_offset = m.next_offset
            pr.snapshot_stalled = False
            self._send_snapshot_chunk(m.src, pr)
