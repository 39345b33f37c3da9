"""A deterministic cluster of Raft cores over a simulated network and simulated disks.

The simulator plays the shell's part exactly as docs/core.md §1 prescribes (persist, send,
apply, advance) and can crash a node at the two interesting instants of a Ready: after
the leader's messages went out but before anything was persisted, and after persisting
but before the acknowledgements went out. A restarted node keeps only its ``Disk``,
which refuses (``DiskRefused``) the writes real storage refuses. Every step is followed
by the ``Checker``'s safety checks.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from liferaft.core import (
    AnyMessage,
    Entry,
    HardState,
    Membership,
    Raft,
    RaftConfig,
    Ready,
    Restored,
    Role,
    Snapshot,
    VoteResponse,
    validate,
)
from liferaft.node.statemachine import DigestStateMachine
from liferaft.testing.checker import Checker, DiskRefused
from liferaft.testing.network import Faults, Network


def check_batch(entries: Sequence[Entry], base: int, last: int) -> None:
    """Refuse what real storage refuses (``liferaft.storage.sqlite``'s ``_check_batch``):
    a batch must be contiguous and start inside, or right after, the stored log
    ``base+1..last`` that follows the snapshot at ``base``. Starting beyond ``last + 1``
    would leave a gap; starting at or below ``base`` would truncate below the snapshot
    (the "negative truncation" that a list slice would silently turn into cutting the
    tail)."""
    first = entries[0].index
    if not base < first <= last + 1:
        raise DiskRefused(
            f"disk refused: entries start at {first}: the stored log is {base + 1}..{last} "
            f"(after snapshot index {base})"
        )
    if len(entries) == 1:
        return
    for prev, e in itertools.pairwise(entries):
        if e.index != prev.index + 1:
            raise DiskRefused(
                f"disk refused: entries not contiguous: {e.index} follows {prev.index}"
            )


class Disk:
    """What a node has made durable; the only thing that survives its crash. It refuses
    (``DiskRefused``) the writes real storage refuses, before writing anything."""

    def __init__(
        self,
        hard_state: HardState | None = None,
        entries: Iterable[Entry] = (),
        snapshot: Snapshot | None = None,
    ) -> None:
        self.hard_state = hard_state or HardState()
        self.snapshot = snapshot
        self.entries: list[Entry] = list(entries)
        if self.entries:
            check_batch(self.entries, self.offset, self.offset)

    @property
    def offset(self) -> int:
        return self.snapshot.meta.index if self.snapshot else 0

    @property
    def last_index(self) -> int:
        return self.offset + len(self.entries)

    def term_at(self, index: int) -> int:
        if self.snapshot and index == self.snapshot.meta.index:
            return self.snapshot.meta.term
        pos = index - self.offset - 1
        if 0 <= pos < len(self.entries):
            return self.entries[pos].term
        return 0

    def write(self, rd: Ready) -> tuple[list[tuple[Entry, int]], list[Entry]]:
        """Persist a Ready atomically; returns each new entry with the term before it,
        and the entries it removed (a conflicting suffix, or the log a snapshot replaced).

        Refuses (``DiskRefused``, before writing anything) a batch that breaks the log
        (``check_batch``), and a result real storage would refuse to load at the next
        start: a hard state commit beyond the last log index, or a hard state term
        behind the last entry's."""
        if rd.entries:
            if rd.snapshot is not None:
                base = last = rd.snapshot.meta.index
            else:
                base, last = self.offset, self.last_index
            check_batch(rd.entries, base, last)
            last, last_term = rd.entries[-1].index, rd.entries[-1].term
        elif rd.snapshot is not None:
            last, last_term = rd.snapshot.meta.index, rd.snapshot.meta.term
        elif rd.hard_state is None:
            return [], []  # nothing to persist
        else:
            last = self.offset + len(self.entries)
            last_term = self.entries[-1].term if self.entries else self.term_at(last)
        hs = rd.hard_state if rd.hard_state is not None else self.hard_state
        if hs.commit > last:
            raise DiskRefused(
                f"disk refused: hard state commit {hs.commit} beyond last index {last}"
            )
        if hs.term < last_term:
            raise DiskRefused(
                f"disk refused: hard state term {hs.term} behind last log term {last_term}"
            )
        removed: list[Entry] = []
        if rd.snapshot is not None:
            self.snapshot = rd.snapshot
            removed, self.entries = self.entries, []
        written: list[tuple[Entry, int]] = []
        if rd.entries:
            keep = rd.entries[0].index - self.offset - 1
            removed += self.entries[keep:]
            del self.entries[keep:]
            for e in rd.entries:
                written.append((e, self.term_at(e.index - 1)))
                self.entries.append(e)
        if rd.hard_state is not None:
            self.hard_state = rd.hard_state
        return written, removed

    def save_snapshot(self, snap: Snapshot) -> None:
        """After a compaction: keep ``snap`` and drop the entries it covers. Like real
        storage, a snapshot older than the stored one is superseded and ignored."""
        drop = snap.meta.index - self.offset
        if drop < 0:
            return
        self.entries = self.entries[drop:]
        self.snapshot = snap

    def restored(self, initial: Membership) -> Restored:
        return Restored(self.hard_state, self.snapshot, tuple(self.entries), initial)


@dataclass
class SimNode:
    id: str
    disk: Disk
    initial: Membership
    raft: Raft | None = None
    sm: DigestStateMachine = field(default_factory=DigestStateMachine)
    led_term: int = 0  # the last term in which the checker saw it lead

    @property
    def up(self) -> bool:
        return self.raft is not None

    def core(self) -> Raft:
        if self.raft is None:
            raise RuntimeError(f"{self.id} is down")
        return self.raft


class Cluster:
    """N simulated nodes; ``tick()`` advances time by one tick for all of them."""

    def __init__(
        self,
        ids: list[str],
        *,
        seed: int,
        voters: list[str] | None = None,
        faults: Faults | None = None,
        config: RaftConfig | None = None,
        disks: dict[str, Disk] | None = None,
        checker: Checker | None = None,
        crash_in_ready: float = 0.0,
        slow_disk: float = 0.0,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.network = Network(random.Random(self.rng.getrandbits(64)), faults or Faults.none())
        self.base_config = config or RaftConfig(id="_")
        self.checker = checker or Checker()
        self.crash_in_ready = crash_in_ready
        # The chance that a Ready's disk write is slow: the node takes 1-3 ticks before
        # it is durable and sends what they produce at once, as the node shell does
        # (core.md, "Time passes during a slow write").
        self.slow_disk = slow_disk
        self.now = 0
        self.trace: deque[str] = deque(maxlen=200)  # printed when a check fails
        self.on_note: Callable[[str], None] | None = None
        # A hook that sees every committed entry a node applies (the liveness check's).
        self.on_apply: Callable[[str, Entry], None] | None = None
        self.crashes = 0
        self.installs = 0  # snapshots installed from a leader
        self.reads: dict[bytes, int | None] = {}  # ctx -> released index, None if failed
        membership = Membership.of(voters if voters is not None else ids)
        self.nodes: dict[str, SimNode] = {}
        for nid in ids:
            disk = (disks or {}).get(nid) or Disk()
            initial = membership if nid in membership.members else Membership(frozenset())
            self.nodes[nid] = SimNode(nid, disk, initial)
            self.checker.on_hard_state(nid, disk.hard_state)
            self.start(nid)

    # ---------------------------------------------------------------- lifecycle

    def start(self, nid: str) -> None:
        node = self.nodes[nid]
        cfg = replace(self.base_config, id=nid)
        node.raft = Raft(
            cfg, random.Random(self.rng.getrandbits(64)), node.disk.restored(node.initial)
        )
        node.sm = DigestStateMachine()
        if node.disk.snapshot is not None:
            node.sm.restore(node.disk.snapshot.data)
            self.checker.on_apply(nid, node.sm.index, node.sm.digest)
        node.led_term = 0
        self.note(f"{nid} starts at term {node.raft.term}")
        self.drain(nid)

    def crash(self, nid: str) -> None:
        self.nodes[nid].raft = None
        self.crashes += 1
        self.note(f"{nid} crashes")

    def restart(self, nid: str) -> None:
        if not self.nodes[nid].up:
            self.start(nid)

    # ---------------------------------------------------------------- observation

    def note(self, what: str) -> None:
        line = f"[{self.now}] {what}"
        self.trace.append(line)
        if self.on_note is not None:
            self.on_note(line)

    def up(self) -> list[str]:
        return [n for n, node in self.nodes.items() if node.up]

    def leader(self) -> str | None:
        """The live leader with the highest term, if any."""
        best: tuple[int, str] | None = None
        for nid, node in self.nodes.items():
            r = node.raft
            if r is not None and r.role is Role.LEADER and (best is None or r.term > best[0]):
                best = (r.term, nid)
        return best[1] if best else None

    def raft(self, nid: str) -> Raft:
        return self.nodes[nid].core()

    # ---------------------------------------------------------------- running

    def tick(self) -> None:
        self.now += 1
        order = self.up()
        self.rng.shuffle(order)
        for nid in order:
            self.raft(nid).tick()
            self._watch(nid)
            self.drain(nid)
        self.deliver()

    def deliver(self) -> int:
        """Deliver every message that is due; each node handles its batch, then drains."""
        by_dst: dict[str, list[AnyMessage]] = {}
        for m in self.network.due(self.now):
            by_dst.setdefault(m.dst, []).append(m)
        for nid, msgs in by_dst.items():
            node = self.nodes.get(nid)
            if node is None or node.raft is None:
                continue
            for m in msgs:
                validate(m)
                node.raft.step(m)
                self._watch(nid)
            self.drain(nid)
        return sum(len(v) for v in by_dst.values())

    def stabilize(self, max_rounds: int = 1000) -> None:
        """Deliver messages without ticking until the network is quiet."""
        for _ in range(max_rounds):
            if not self.network.pending():
                return
            if not self.deliver():
                self.now += 1  # only delayed messages are left: let time reach them
        raise RuntimeError("network did not become quiet")

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            self.tick()

    def run_until(self, cond: Callable[[], bool], max_ticks: int) -> int:
        """Tick until ``cond()``; returns ticks taken, or raises TimeoutError."""
        for n in range(max_ticks + 1):
            if cond():
                return n
            self.tick()
        raise TimeoutError(f"condition not met within {max_ticks} ticks (seed {self.seed})")

    def drain(self, nid: str) -> None:
        node = self.nodes[nid]
        while node.raft is not None and node.raft.has_ready():
            self._handle_ready(node, node.raft, node.raft.ready())

    def _watch(self, nid: str) -> None:
        node = self.nodes[nid]
        r = node.raft
        if r is not None and r.role is Role.LEADER and node.led_term != r.term:
            node.led_term = r.term
            self.note(f"{nid} leads term {r.term}")
            self.checker.on_leader(nid, r.term, r)

    def _crash_now(self) -> bool:
        return bool(self.crash_in_ready) and self.rng.random() < self.crash_in_ready

    def _handle_ready(self, node: SimNode, raft: Raft, rd: Ready) -> None:
        # Every granted real vote is checked as it leaves (inlined: this is the hot path).
        for m in rd.messages:
            if type(m) is VoteResponse and m.granted and not m.pre_vote:
                self.checker.on_vote_sent(node.id, m, node.disk.hard_state)
            self.network.send(self.now, m)
        if self._crash_now():
            self.crash(node.id)  # before anything of this Ready is durable
            return
        if self.slow_disk and self.rng.random() < self.slow_disk:
            for _ in range(self.rng.randint(1, 3)):
                raft.tick()
                for m in raft.take_messages():
                    self.network.send(self.now, m)
        written, removed = node.disk.write(rd)
        if rd.hard_state is not None:
            self.checker.on_hard_state(node.id, node.disk.hard_state)
        self.checker.on_remove(node.id, removed, rd.snapshot)
        for e, prev_term in written:
            self.checker.on_persist(node.id, e, prev_term)
        if self._crash_now():
            self.crash(node.id)  # durable, but no acknowledgement went out
            return
        for m in rd.persisted_messages:
            if type(m) is VoteResponse and m.granted and not m.pre_vote:
                self.checker.on_vote_sent(node.id, m, node.disk.hard_state)
            self.network.send(self.now, m)
        if rd.snapshot is not None:
            node.sm.restore(rd.snapshot.data)
            self.checker.on_apply(node.id, node.sm.index, node.sm.digest)
            self.installs += 1
            self.note(f"{node.id} installs snapshot at {rd.snapshot.meta.index}")
        for e in rd.committed_entries:
            self.checker.on_commit(node.id, e)
            node.sm.apply(e)
            self.checker.on_apply(node.id, e.index, node.sm.digest)
            if self.on_apply is not None:
                self.on_apply(node.id, e)
        for rs in rd.read_states:
            self.checker.on_read_released(node.id, rs.ctx, rs.index)
            self.reads[rs.ctx] = rs.index
        for ctx in rd.failed_reads:
            self.checker.on_read_failed(ctx)
            self.reads[ctx] = None
        if rd.membership is not None:
            ms = rd.membership
            self.note(
                f"{node.id} members: voters {sorted(ms.voters)} learners {sorted(ms.learners)}"
            )
        raft.advance(rd)

    # ---------------------------------------------------------------- client actions

    def propose(self, nid: str, data: bytes) -> int:
        index = self.raft(nid).propose(data)
        self.drain(nid)
        return index

    def read(self, nid: str, ctx: bytes) -> None:
        self.checker.on_read_asked(ctx)
        self.raft(nid).read_index(ctx)
        self.drain(nid)

    def compact(self, nid: str) -> int:
        """Snapshot the node's applied state and compact its log; returns the index."""
        node = self.nodes[nid]
        snap = node.core().compact(node.sm.index, node.sm.snapshot())
        node.disk.save_snapshot(snap)
        self.note(f"{nid} compacts to {snap.meta.index}")
        return snap.meta.index

    def applied(self, nid: str) -> int:
        return self.nodes[nid].sm.index
