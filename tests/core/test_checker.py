"""The simulator's own checks can fail: each is fed a fabricated violation and must
report it. A check that cannot fail proves nothing about the runs it passes."""

from __future__ import annotations

import dataclasses
import re

import pytest

from liferaft.core import (
    Entry,
    HardState,
    Membership,
    Raft,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
    VoteRequest,
    VoteResponse,
)
from liferaft.testing.chaos import ChaosOptions, LivenessViolation, run_chaos
from liferaft.testing.checker import Checker, DiskRefused, SafetyViolation
from liferaft.testing.sim import Cluster, Disk

SOFT = SoftState(Role.FOLLOWER, None, 1)


def grant(src: str, dst: str, term: int) -> VoteResponse:
    return VoteResponse(term=term, src=src, dst=dst, granted=True)


def ents(first: int, last: int, term: int = 1) -> tuple[Entry, ...]:
    return tuple(Entry(i, term, data=b"%d" % i) for i in range(first, last + 1))


def ready(entries: tuple[Entry, ...] = (), snap: Snapshot | None = None) -> Ready:
    return Ready(soft_state=SOFT, hard_state=HardState(2, "n2", 1), snapshot=snap, entries=entries)


def snapshot(index: int, term: int = 1) -> Snapshot:
    return Snapshot(SnapshotMeta(index, term, Membership.of(["n1"])), b"state")


# ---------------------------------------------------------------- one vote per term


def test_two_votes_sent_in_one_term_are_a_double_vote() -> None:
    ch = Checker()
    ch.on_vote_sent("n1", grant("n1", "n2", 3), HardState(3, "n2", 0))
    ch.on_vote_sent("n1", grant("n1", "n2", 3), HardState(3, "n2", 0))  # a resend is fine
    with pytest.raises(SafetyViolation, match="double vote: n1 voted for n2 and for n3 in term 3"):
        ch.on_vote_sent("n1", grant("n1", "n3", 3), HardState(3, "n3", 0))


def test_two_votes_on_disk_in_one_term_are_a_double_vote_across_a_restart() -> None:
    ch = Checker()
    ch.on_hard_state("n1", HardState(3, "n2", 0))
    # n1 restarts from a disk that is then rewritten with another vote in the same term
    with pytest.raises(SafetyViolation, match="double vote: n1 voted for n2 and for n3 in term 3"):
        ch.on_hard_state("n1", HardState(3, "n3", 0))


def test_a_vote_sent_that_contradicts_the_disk_is_a_double_vote() -> None:
    ch = Checker()
    ch.on_hard_state("n1", HardState(4, "n1", 0))  # it campaigns: a vote for itself
    with pytest.raises(SafetyViolation, match="double vote: n1 voted for n1 and for n2 in term 4"):
        ch.on_vote_sent("n1", grant("n1", "n2", 4), HardState(4, "n2", 0))


def test_a_vote_sent_before_it_is_durable_is_refused() -> None:
    ch = Checker()
    with pytest.raises(SafetyViolation, match="vote not durable: n1 grants n2 its vote in term 3"):
        ch.on_vote_sent("n1", grant("n1", "n2", 3), HardState(2, None, 0))
    with pytest.raises(SafetyViolation, match="vote not durable"):
        Checker().on_vote_sent("n1", grant("n1", "n2", 3), HardState(3, None, 0))
    # the term moved on before the write: that vote can never be given again, so it is fine
    Checker().on_vote_sent("n1", grant("n1", "n2", 3), HardState(4, None, 0))


def test_a_vote_forgotten_on_disk_within_its_term_is_refused() -> None:
    ch = Checker()
    ch.on_hard_state("n1", HardState(3, "n2", 0))
    with pytest.raises(SafetyViolation, match="vote forgotten: n1 persisted no vote in term 3"):
        ch.on_hard_state("n1", HardState(3, None, 0))


def test_a_node_that_forgets_its_vote_over_a_restart_is_caught_voting_twice() -> None:
    """End to end: n2 votes for n1, crashes, and comes back from a disk that lost the
    vote (but not the term); a request from n3 in the same term then gets a second vote."""
    c = Cluster(["n1", "n2", "n3"], seed=1)
    c.raft("n1").campaign()
    c.drain("n1")
    c.stabilize()
    term = c.raft("n1").term
    assert c.raft("n1").role is Role.LEADER and c.nodes["n2"].disk.hard_state.vote == "n1"
    c.crash("n2")
    hs = c.nodes["n2"].disk.hard_state
    c.nodes["n2"].disk.hard_state = HardState(hs.term, None, hs.commit)  # amnesia
    c.restart("n2")
    last = c.raft("n2").log
    c.raft("n2").step(
        VoteRequest(
            term=term, src="n3", dst="n2", last_index=last.last_index, last_term=last.last_term
        )
    )
    with pytest.raises(
        SafetyViolation, match=f"double vote: n2 voted for n1 and for n3 in term {term}"
    ):
        c.drain("n2")


# ---------------------------------------------------------------- the disk never goes back


def test_a_term_going_backwards_on_disk_is_refused() -> None:
    ch = Checker()
    ch.on_hard_state("n1", HardState(5, None, 7))
    ch.on_hard_state("n1", HardState(5, "n2", 7))
    ch.on_hard_state("n1", HardState(6, None, 9))
    ch.on_hard_state("n2", HardState(1, None, 0))  # another node's disk is its own
    with pytest.raises(SafetyViolation, match="disk went back: n1 persisted term 4 after 6"):
        ch.on_hard_state("n1", HardState(4, None, 9))


def test_a_commit_going_backwards_on_disk_is_refused() -> None:
    ch = Checker()
    ch.on_hard_state("n1", HardState(5, None, 7))
    with pytest.raises(SafetyViolation, match="disk went back: n1 persisted commit 6 after 7"):
        ch.on_hard_state("n1", HardState(6, None, 6))


def test_the_disk_a_cluster_starts_from_is_the_floor() -> None:
    """A given disk is checked from the start: a restarted node that writes a lower term
    than the one it started with is caught even if it never wrote before."""
    ch = Checker()
    Cluster(["n1"], seed=1, checker=ch, disks={"n1": Disk(HardState(7, None, 0))})
    with pytest.raises(SafetyViolation, match="disk went back: n1 persisted term 3 after 7"):
        ch.on_hard_state("n1", HardState(3, None, 0))


# ---------------------------------------------------------------- the disk refuses a broken log


def test_the_disk_refuses_a_batch_that_leaves_a_gap() -> None:
    d = Disk(HardState(1, None, 0), ents(1, 5))
    with pytest.raises(DiskRefused, match=re.escape("entries start at 8: the stored log is 1..5")):
        d.write(ready(ents(8, 9)))
    with pytest.raises(DiskRefused, match="not contiguous: 4 follows 2"):
        d.write(ready((*ents(1, 2), *ents(4, 4))))
    assert d.entries == list(ents(1, 5)) and d.hard_state == HardState(1, None, 0)  # untouched
    d.write(ready(ents(6, 6)))  # right after the log: fine
    d.write(ready(ents(3, 4, term=2)))  # inside it: replaces the suffix
    assert [(e.index, e.term) for e in d.entries] == [(1, 1), (2, 1), (3, 2), (4, 2)]


def test_the_disk_refuses_a_truncation_below_its_snapshot() -> None:
    d = Disk(HardState(1, None, 10), ents(11, 15), snapshot(10))
    for first in (10, 5, 1):  # a list slice at a negative offset would cut the tail instead
        with pytest.raises(
            DiskRefused, match=f"entries start at {first}: the stored log is 11..15"
        ):
            d.write(ready(ents(first, first + 1)))
    assert d.entries == list(ents(11, 15))
    with pytest.raises(
        DiskRefused, match=re.escape("entries start at 22: the stored log is 21..20")
    ):
        d.write(ready(ents(22, 22), snap=snapshot(20)))  # a snapshot, then a gap after it
    d.write(ready(ents(21, 21), snap=snapshot(20)))
    assert (d.offset, d.entries) == (20, list(ents(21, 21)))


def test_the_disk_refuses_to_start_from_a_broken_log_and_ignores_an_older_snapshot() -> None:
    with pytest.raises(DiskRefused, match="entries start at 2"):
        Disk(HardState(1, None, 0), ents(2, 3))
    with pytest.raises(DiskRefused, match="not contiguous"):
        Disk(HardState(1, None, 0), (*ents(1, 1), *ents(3, 3)))
    d = Disk(HardState(1, None, 15), ents(11, 15), snapshot(10))
    d.save_snapshot(snapshot(8))  # superseded, as real storage does: no negative truncation
    assert (d.offset, d.entries) == (10, list(ents(11, 15)))


def test_the_disk_refuses_a_state_real_storage_would_not_load_back() -> None:
    d = Disk(HardState(2, None, 3), ents(1, 5))
    with pytest.raises(DiskRefused, match="hard state commit 6 beyond last index 5"):
        d.write(Ready(soft_state=SOFT, hard_state=HardState(2, None, 6)))
    with pytest.raises(DiskRefused, match="hard state commit 4 beyond last index 3"):
        d.write(Ready(soft_state=SOFT, hard_state=HardState(2, None, 4), entries=ents(3, 3)))
    with pytest.raises(DiskRefused, match="hard state term 2 behind last log term 3"):
        d.write(Ready(soft_state=SOFT, entries=ents(6, 6, term=3)))
    assert (d.hard_state, d.entries) == (HardState(2, None, 3), list(ents(1, 5)))


def test_a_core_asking_for_a_gap_fails_the_run_with_its_seed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fabricated core that skips an index in one write: the run fails, replayably."""
    real = Raft.ready

    def skipping(self: Raft) -> Ready:
        rd = real(self)
        if self.id == "n2" and rd.entries and rd.entries[0].index >= 5:
            shifted = tuple(Entry(e.index + 1, e.term, e.kind, e.data) for e in rd.entries)
            return dataclasses.replace(rd, entries=shifted)
        return rd

    monkeypatch.setattr(Raft, "ready", skipping)
    with pytest.raises(DiskRefused, match=r"^seed 3: disk refused: entries start at \d+"):
        run_chaos(3, ChaosOptions(ticks=300))


# ---------------------------------------------------------------- liveness is the exact write


def test_liveness_needs_the_final_write_itself_not_another_entry_at_its_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fabricated core that acknowledges the final write's index but commits another
    entry there: every voter applies *something* at that index, which the old check
    (applied >= index) accepted; the write itself is never applied."""
    real = Cluster.propose

    def swapping(self: Cluster, nid: str, data: bytes) -> int:
        return real(self, nid, b"imposter" if data.startswith(b"final") else data)

    monkeypatch.setattr(Cluster, "propose", swapping)
    with pytest.raises(LivenessViolation) as info:
        run_chaos(0, ChaosOptions(ticks=200))
    msg = str(info.value)
    assert msg.startswith("seed 0: no write was applied by all voters within 300 ticks")
    assert re.search(r"the last write, b'final(-\d+)?' at index \d+ term \d+", msg)
    assert "b'imposter'" in msg  # what the voters applied there instead


def test_liveness_passes_when_the_final_write_is_applied() -> None:
    report = run_chaos(0, ChaosOptions(ticks=200))
    assert report.ticks_to_commit > 0
