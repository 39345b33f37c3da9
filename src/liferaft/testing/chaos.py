"""Random runs: a cluster under faults, then healed and required to make progress.

One seed fixes everything (network, crashes, client load, membership changes, leader
transfers, compactions), so a failure replays exactly with the same seed. The chaos
phase checks safety; the heal phase then checks liveness: once every node is up and the
network is perfect, a leader must appear and a proposal to it must be applied by every
voter within a bounded number of ticks.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from liferaft.core import (
    ConfChange,
    ConfChangeType,
    Entry,
    NotLeader,
    ProposalRefused,
    RaftConfig,
    Role,
)
from liferaft.testing.checker import SimulationFailure
from liferaft.testing.network import Faults
from liferaft.testing.sim import Cluster


class LivenessViolation(SimulationFailure):
    """A healed cluster failed to elect a leader or commit within the bound."""


@dataclass(frozen=True, slots=True)
class ChaosOptions:
    voters: int = 3
    spares: int = 1  # nodes outside the initial membership, for membership changes
    ticks: int = 2000
    faults: Faults = field(default_factory=Faults.lossy)
    crash_in_ready: float = 0.0002
    slow_disk: float = 0.0  # per Ready, the chance its write takes 1-3 ticks
    election_ticks: int = 10
    heartbeat_ticks: int = 2
    crash: float = 0.003  # per tick, a random node crashes (restarted a while later)
    network: float = 0.01  # per tick, a partition is made or healed
    max_msg_bytes: int = 128  # small messages: replication is paged and pipelined


# The random-run profiles the test suite runs (tests/core/test_chaos.py) and
# `liferaft sim --profile` replays.
PROFILES: dict[str, ChaosOptions] = {
    "three_nodes": ChaosOptions(voters=3, ticks=2000),
    "five_nodes": ChaosOptions(voters=5, ticks=2000),
    # Frequent crashes and partitions with one entry per message: many terms and
    # divergent logs, where Figure 8's commitment hazard lives.
    "churn_three": ChaosOptions(voters=3, ticks=1000, crash=0.02, network=0.03, max_msg_bytes=17),
    "churn_five": ChaosOptions(voters=5, ticks=1000, crash=0.02, network=0.03, max_msg_bytes=17),
    # Slow disks: time passes (and leaders heartbeat) while Readies are being written.
    "slow_disk": ChaosOptions(voters=3, ticks=1000, crash=0.01, network=0.02, slow_disk=0.2),
}


@dataclass(frozen=True, slots=True)
class ChaosReport:
    seed: int
    elections: int
    committed: int
    reads_checked: int
    crashes: int
    snapshots: int
    installs: int
    conf_changes: int
    transfers: int
    messages: int
    ticks_to_leader: int
    ticks_to_commit: int

    def summary(self) -> str:
        return (
            f"seed {self.seed}: {self.elections} terms with a leader, {self.committed} "
            f"entries committed, {self.reads_checked} reads checked, {self.crashes} crashes, "
            f"{self.snapshots} compactions, {self.installs} snapshots sent, "
            f"{self.conf_changes} membership changes, "
            f"{self.transfers} transfers, {self.messages} messages; after healing a leader "
            f"in {self.ticks_to_leader} ticks and a commit in {self.ticks_to_commit} more"
        )


def run_chaos(
    seed: int, opts: ChaosOptions | None = None, on_event: Callable[[str], None] | None = None
) -> ChaosReport:
    """Run one random cluster. On failure raises SafetyViolation, LivenessViolation, or
    SimulationFailure for any other exception (a core that raised is a bug too), each
    with the seed and the last trace lines in the message. ``on_event`` receives each
    notable event (elections, crashes, partitions, ...) as a line of text."""
    o = opts or ChaosOptions()
    run = _Run(seed, o)
    run.cluster.on_note = on_event
    try:
        return run.go()
    except Exception as exc:
        trace = "\n".join(run.cluster.trace)
        kind = type(exc) if isinstance(exc, SimulationFailure) else SimulationFailure
        what = str(exc) if kind is type(exc) else f"{type(exc).__name__}: {exc}"
        raise kind(f"seed {seed}: {what}\nlast events:\n{trace}") from exc


class _Run:
    def __init__(self, seed: int, o: ChaosOptions) -> None:
        self.o = o
        self.rng = random.Random(seed)
        self.seed = seed
        ids = [f"n{i}" for i in range(1, o.voters + o.spares + 1)]
        self.ids = ids
        config = RaftConfig(
            id="_",
            election_ticks=o.election_ticks,
            heartbeat_ticks=o.heartbeat_ticks,
            max_inflight_msgs=4,  # small windows and messages: pipelining and paging happen
            max_inflight_bytes=4096,
            max_msg_bytes=o.max_msg_bytes,
            snapshot_chunk_bytes=16,  # snapshots go in several chunks
        )
        self.cluster = Cluster(
            ids,
            seed=self.rng.getrandbits(64),
            voters=ids[: o.voters],
            faults=o.faults,
            config=config,
            crash_in_ready=o.crash_in_ready,
            slow_disk=o.slow_disk,
        )
        self.restart_at: dict[str, int] = {}
        self.counter = 0
        self.snapshots = self.conf_changes = self.transfers = 0

    def go(self) -> ChaosReport:
        c = self.cluster
        for _ in range(self.o.ticks):
            self.act()
            for nid in c.nodes:
                if not c.nodes[nid].up and nid not in self.restart_at:  # crashed in a Ready
                    self.restart_at[nid] = c.now + self.rng.randint(1, 4 * self.o.election_ticks)
            for nid, at in list(self.restart_at.items()):
                if at <= c.now:
                    del self.restart_at[nid]
                    c.restart(nid)
            c.tick()
        to_leader, to_commit = self.heal()
        ch = c.checker
        return ChaosReport(
            seed=self.seed,
            elections=len(ch.leaders),
            committed=len(ch.committed),
            reads_checked=ch.reads_checked,
            crashes=c.crashes,
            snapshots=self.snapshots,
            installs=c.installs,
            conf_changes=self.conf_changes,
            transfers=self.transfers,
            messages=c.network.sent,
            ticks_to_leader=to_leader,
            ticks_to_commit=to_commit,
        )

    def act(self) -> None:
        c, rng = self.cluster, self.rng
        leader = c.leader()
        # Clients talk to whoever claims to lead, stale leaders included: that is how
        # divergent log suffixes (and Figure 8's hazard) come about.
        leaders = sorted(n for n in c.up() if c.raft(n).role is Role.LEADER)
        r = rng.random()
        if leaders and r < 0.3:
            self.counter += 1
            # refused during a transfer: a client would retry
            with contextlib.suppress(NotLeader, ProposalRefused):
                c.propose(rng.choice(leaders), b"c%d" % self.counter)
        leader = c.leader()  # the proposal may have crashed it (crash_in_ready)
        r = rng.random()
        up = c.up()
        o = self.o
        if r < 0.03 and up:
            self.counter += 1
            c.read(rng.choice(up), b"r%d" % self.counter)
            return
        r -= 0.03
        if r < o.network:
            self.network_event()
            return
        r -= o.network
        if r < o.crash:
            if len(up) > 1:  # half the time the leader: elections are where bugs hide
                victim = leader if leader is not None and rng.random() < 0.5 else rng.choice(up)
                c.crash(victim)  # restarted a while later, by go()
            return
        r -= o.crash
        if r < 0.01 and up:
            nid = rng.choice(up)
            raft = c.raft(nid)
            if c.applied(nid) - raft.log.snapshot_index >= 5:
                c.compact(nid)
                self.snapshots += 1
        elif 0.01 <= r < 0.014 and leader is not None:
            self.conf_change(leader)
        elif 0.014 <= r < 0.017 and leader is not None:
            raft = c.raft(leader)
            others = sorted(raft.membership.voters - {leader})
            if others:
                target = rng.choice(others)
                raft.transfer_leadership(target)
                c.note(f"{leader} transfers leadership to {target}")
                c.drain(leader)
                self.transfers += 1

    def network_event(self) -> None:
        c, rng, ids = self.cluster, self.rng, self.ids
        kind = rng.randrange(6)
        if kind == 0:
            leader = c.leader()
            c.network.isolate(leader if leader and rng.random() < 0.5 else rng.choice(ids), ids)
            c.note("network: isolate")
        elif kind == 1:
            shuffled = ids[:]
            rng.shuffle(shuffled)
            cut = rng.randint(1, len(ids) - 1)
            c.network.partition(shuffled[:cut], shuffled[cut:])
            c.note(f"network: partition {sorted(shuffled[:cut])} | {sorted(shuffled[cut:])}")
        elif kind == 2:
            a, b = rng.sample(ids, 2)
            c.network.block(a, b)
            c.note(f"network: block {a} -> {b}")
        else:  # half of the events heal, so partitions come and go
            c.network.heal()
            c.note("network: heal")

    def conf_change(self, leader: str) -> None:
        c, rng = self.cluster, self.rng
        m = c.raft(leader).membership
        outsiders = [n for n in self.ids if n not in m.members]
        options: list[ConfChange] = []
        for n in outsiders:
            options.append(ConfChange(ConfChangeType.ADD_LEARNER, n))
            options.append(ConfChange(ConfChangeType.ADD_VOTER, n))
        options += [ConfChange(ConfChangeType.PROMOTE, n) for n in sorted(m.learners)]
        if len(m.voters) > 1:
            options += [ConfChange(ConfChangeType.REMOVE, n) for n in sorted(m.members)]
        if not options:
            return
        change = rng.choice(options)
        try:
            c.raft(leader).propose_conf_change(change)
        except ProposalRefused:
            return
        c.drain(leader)
        self.conf_changes += 1
        c.note(f"{leader} proposes {change.type.value} {change.node_id}")

    def heal(self) -> tuple[int, int]:
        """Heal everything; then a client's write must succeed within the bound.

        Like a real client, the write is retried on the new leader if the one it went
        to loses its leadership (it may have been cut off just before the heal, and
        check-quorum then deposes it, or its own removal commits and it steps down in
        the same term); each retry is a fresh entry with its own payload.
        The write succeeds when every voter has applied *that* entry (its term and
        payload) at the index the leader gave it, not merely some entry at that index.
        """
        c = self.cluster
        c.network.heal()
        c.network.faults = Faults.none()
        c.crash_in_ready = 0.0
        for nid in self.ids:
            c.restart(nid)
        bound = 30 * self.o.election_ticks
        try:
            to_leader = c.run_until(lambda: self._stable_leader() is not None, bound)
        except TimeoutError:
            raise LivenessViolation(f"no leader within {bound} ticks of healing") from None
        start = c.now
        # (voter, index) -> (term, payload) of each entry applied from now on. No
        # compaction happens any more, so every voter applies the write's entry itself
        # (no snapshot can cover it) and the hook sees it.
        applied: dict[tuple[str, int], tuple[int, bytes]] = {}

        def watch(nid: str, e: Entry) -> None:
            applied[nid, e.index] = (e.term, e.data)

        c.on_apply = watch
        try:
            attempt = 0
            last: tuple[int, int, bytes, frozenset[str]] | None = None
            while c.now - start < bound:
                leader = self._stable_leader()
                index = None
                if leader is not None:
                    attempt += 1
                    payload = b"final" if attempt == 1 else b"final-%d" % attempt
                    # refused during a leadership transfer, which finishes or times out
                    with contextlib.suppress(ProposalRefused, NotLeader):
                        index = c.propose(leader, payload)
                if leader is None or index is None:
                    c.tick()
                    continue
                term = c.raft(leader).term
                voters = c.raft(leader).membership.voters
                last = (index, term, payload, voters)

                def done(
                    i: int = index,
                    w: tuple[int, bytes] = (term, payload),
                    vs: frozenset[str] = voters,
                ) -> bool:
                    return all(applied.get((v, i)) == w for v in vs)

                def lost(leader: str = leader, term: int = term) -> bool:
                    # A leader that stepped down (a new term, or its own removal
                    # committed, in the same term) may never replicate the write.
                    r = c.nodes[leader].raft
                    return r is None or r.term != term or r.role is not Role.LEADER

                while not (done() or lost()) and c.now - start < bound:
                    c.tick()
                if done():
                    return to_leader, c.now - start
        finally:
            c.on_apply = None
        what = "no write was accepted"
        if last is not None:
            index, term, payload, voters = last
            got = ", ".join(f"{v} {applied.get((v, index), 'nothing')}" for v in sorted(voters))
            what = (
                f"the last write, {payload!r} at index {index} term {term}, was applied as "
                f"(term, payload): {got}"
            )
        raise LivenessViolation(f"no write was applied by all voters within {bound} ticks; {what}")

    def _stable_leader(self) -> str | None:
        """A leader that every voter of its membership follows."""
        c = self.cluster
        leader = c.leader()
        if leader is None:
            return None
        raft = c.raft(leader)
        if all(c.raft(v).leader == leader for v in raft.membership.voters):
            return leader
        return None
