"""Scenarios from the Raft paper and thesis, scripted on the simulator.

Each test is named after the sentence it checks. The simulator's checker runs under all
of them, so besides the explicit assertions every step is also checked for election
safety, log matching, leader completeness, state machine safety, one vote per term and
a disk that never goes back (and refuses a broken log).
"""

from __future__ import annotations

import pytest

from liferaft.core import (
    AnyMessage,
    AppendEntries,
    AppendResponse,
    ConfChange,
    ConfChangeType,
    Entry,
    HardState,
    HeartbeatResponse,
    InstallSnapshot,
    ProposalRefused,
    RaftConfig,
    Role,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from liferaft.testing.sim import Cluster, Disk

ELECTION = 10


def make(
    n: int = 3, *, seed: int = 1, disks: dict[str, Disk] | None = None, **cfg: object
) -> Cluster:
    ids = [f"n{i}" for i in range(1, n + 1)]
    config = RaftConfig(id="_", election_ticks=ELECTION, heartbeat_ticks=1, **cfg)  # type: ignore[arg-type]
    return Cluster(ids, seed=seed, config=config, disks=disks)


def elect(c: Cluster, nid: str) -> None:
    """Make ``nid`` campaign now and deliver everything until the network is quiet."""
    c.raft(nid).campaign()
    c.drain(nid)
    c.stabilize()
    assert c.raft(nid).role is Role.LEADER


def log_of(*terms: int) -> list[Entry]:
    return [Entry(i, t, data=b"%d/%d" % (i, t)) for i, t in enumerate(terms, start=1)]


def pre_vote(c: Cluster, src: str, dst: str) -> VoteRequest:
    """``src``'s pre-vote request to ``dst`` for the term after its own, with its log."""
    r = c.raft(src)
    return VoteRequest(
        term=r.term + 1,
        src=src,
        dst=dst,
        last_index=r.log.last_index,
        last_term=r.log.last_term,
        pre_vote=True,
    )


def vote_answers(c: Cluster, nid: str) -> list[bool]:
    """Whether each vote response ``nid``'s next Ready sends is a grant."""
    rd = c.raft(nid).ready()
    sent = (*rd.messages, *rd.persisted_messages)
    return [m.granted for m in sent if isinstance(m, VoteResponse)]


def disk(*terms: int, term: int | None = None, commit: int = 0) -> Disk:
    return Disk(
        HardState(term if term is not None else max(terms, default=0), None, commit), log_of(*terms)
    )


def terms_on_disk(c: Cluster, nid: str) -> list[int]:
    return [e.term for e in c.nodes[nid].disk.entries]


# ---------------------------------------------------------------- §5.3 log replication

LEADER_LOG = (1, 1, 1, 4, 4, 5, 5, 6, 6, 6)
FIGURE_7 = {
    "a": (1, 1, 1, 4, 4, 5, 5, 6, 6),
    "b": (1, 1, 1, 4),
    "c": (1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6),
    "d": (1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7),
    "e": (1, 1, 1, 4, 4, 4, 4),
    "f": (1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3),
}


@pytest.mark.parametrize("case", sorted(FIGURE_7))
def test_figure_7_leader_forces_followers_logs_to_duplicate_its_own(case: str) -> None:
    """Figure 7: whatever the follower's log (missing entries, extra uncommitted
    entries, or both), the leader's term-8 log replaces it."""
    c = make(
        3,
        disks={
            "n1": disk(*LEADER_LOG, term=7),
            "n2": disk(*FIGURE_7[case]),
            "n3": disk(*LEADER_LOG, term=7),
        },
    )
    rejections = 0

    def count(m: AnyMessage) -> bool:
        nonlocal rejections
        if isinstance(m, AppendResponse) and m.src == "n2" and not m.success:
            rejections += 1
        return True

    c.network.tap = count
    elect(c, "n1")
    assert c.raft("n1").term == 8
    expected = [*LEADER_LOG, 8]  # plus the new leader's no-op
    assert terms_on_disk(c, "n2") == expected
    assert terms_on_disk(c, "n3") == expected
    # The new commit index reaches followers with the next heartbeat (core.md, "Commit
    # rule"), not in a message of its own.
    c.run_until(lambda: c.raft("n2").commit == len(expected), 1)
    # Fast back-off: one rejection per conflicting term at most, not one per entry.
    assert rejections <= len(set(FIGURE_7[case][3:])) + 1


def test_a_follower_rejects_appends_that_do_not_match_its_log() -> None:
    c = make(
        3, disks={"n1": disk(1, 1, 2, term=2), "n2": disk(1, 1, 2, term=2), "n3": disk(1, term=2)}
    )
    elect(c, "n1")
    append = AppendEntries(
        term=3, src="n1", dst="n3", prev_index=5, prev_term=3, entries=(), commit=0
    )
    c.raft("n3").step(append)
    rd = c.raft("n3").ready()
    (resp,) = [m for m in rd.persisted_messages if isinstance(m, AppendResponse)]
    c.raft("n3").advance(rd)
    assert not resp.success and resp.index == 5
    assert (resp.hint_index, resp.hint_term) == (4, 3)  # its last entry: the leader's no-op


# ---------------------------------------------------------------- §5.4.2 committing


def test_figure_8_an_old_term_entry_is_not_committed_by_counting_replicas() -> None:
    """Figure 8 (c)-(d): s1 (term 4) replicates its term-2 entry to a majority but not
    yet an entry of term 4; the entry must stay uncommitted, and indeed s5 can still be
    elected and overwrite it everywhere."""
    c = make(
        5,
        max_msg_bytes=1,  # one entry per append, so index 2 travels without the no-op
        disks={
            "n1": disk(1, 2, term=3, commit=1),
            "n2": disk(1, 2, term=3, commit=1),
            "n3": disk(1, term=3, commit=1),
            "n4": disk(1, term=3, commit=1),
            "n5": disk(1, 3, term=3, commit=1),
        },
    )

    # No entry of term 4 is ever accepted by a follower: drop exactly the appends that
    # would deliver one (those whose prev entry the follower holds).
    def tap(m: AnyMessage) -> bool:
        return not (
            isinstance(m, AppendEntries)
            and any(e.term == 4 for e in m.entries)
            and c.nodes[m.dst].disk.term_at(m.prev_index) == m.prev_term
        )

    c.network.tap = tap
    c.network.block("n1", "n5")  # as in the figure, s1 never reaches s5
    elect(c, "n1")
    c.run(3)  # heartbeats let the dropped probes retry
    assert c.raft("n1").term == 4
    for nid in ("n1", "n2", "n3", "n4"):
        assert terms_on_disk(c, nid)[:2] == [1, 2]  # on a majority...
    assert c.raft("n1").commit == 1  # ...and still not committed
    c.crash("n1")
    c.network.tap = None
    # n5 campaigns before the others' timers fire (TimeoutNow makes it skip the wait);
    # n2, n3 and n4 vote for it: their last term (2) is below n5's (3).
    c.raft("n5").step(TimeoutNow(term=4, src="n1", dst="n5"))
    c.drain("n5")
    c.stabilize()
    assert c.raft("n5").role is Role.LEADER
    c.run(3)
    for nid in ("n2", "n3", "n4"):
        assert terms_on_disk(c, nid)[:3] == [1, 3, 5]


def test_figure_8_once_a_current_term_entry_commits_the_older_ones_are_safe() -> None:
    """Figure 8 (e): if s1 replicates an entry of its own term to a majority, the term-2
    entry before it is committed and s5 can no longer win an election."""
    c = make(
        5,
        disks={
            "n1": disk(1, 2, term=3, commit=1),
            "n2": disk(1, 2, term=3, commit=1),
            "n3": disk(1, term=3, commit=1),
            "n4": disk(1, term=3, commit=1),
            "n5": disk(1, 3, term=3, commit=1),
        },
    )
    c.network.block("n1", "n5")
    elect(c, "n1")
    assert c.raft("n1").commit == 3
    c.crash("n1")
    c.raft("n5").step(TimeoutNow(term=4, src="n1", dst="n5"))
    c.drain("n5")
    c.stabilize()
    assert c.raft("n5").role is not Role.LEADER  # its log is behind a majority's
    c.run_until(lambda: c.leader() not in (None, "n5"), 20 * ELECTION)
    assert terms_on_disk(c, c.leader() or "")[:2] == [1, 2]


# ---------------------------------------------------------------- partitions


def test_a_stale_leader_cannot_commit_and_its_entries_are_discarded_after_healing() -> None:
    c = make(5)
    elect(c, "n1")
    c.propose("n1", b"before")
    c.stabilize()
    c.network.partition(["n1", "n2"], ["n3", "n4", "n5"])
    stale_index = c.propose("n1", b"lost")
    c.run_until(lambda: c.leader() in ("n3", "n4", "n5"), 20 * ELECTION)
    new = c.leader() or ""
    kept = c.propose(new, b"kept")
    c.run_until(lambda: c.raft(new).commit >= kept, 5 * ELECTION)
    assert c.raft("n1").commit < stale_index  # never committed on the minority side
    c.network.heal()
    c.run_until(lambda: all(c.applied(n) >= kept for n in c.nodes), 20 * ELECTION)
    assert c.raft("n1").role is Role.FOLLOWER
    for nid in c.nodes:
        datas = [e.data for e in c.nodes[nid].disk.entries]
        assert b"lost" not in datas and b"kept" in datas


def test_pre_vote_keeps_a_rejoining_partitioned_node_from_disrupting_the_cluster() -> None:
    c = make(3)
    elect(c, "n1")
    term = c.raft("n1").term
    c.network.isolate("n3", list(c.nodes))
    c.run(20 * ELECTION)
    assert c.raft("n3").term == term  # pre-votes failed; the term never moved
    c.network.heal()
    c.run(5 * ELECTION)
    assert c.leader() == "n1" and c.raft("n1").term == term


def test_without_pre_vote_a_rejoining_node_disrupts_the_leader() -> None:
    """The contrast that shows what pre-vote buys."""
    c = make(3, pre_vote=False, check_quorum=False)
    elect(c, "n1")
    term = c.raft("n1").term
    c.network.isolate("n3", list(c.nodes))
    c.run(20 * ELECTION)
    assert c.raft("n3").term > term + 5
    c.network.heal()
    c.run_until(lambda: c.raft("n1").term > term, 5 * ELECTION)


def test_check_quorum_leader_steps_down_when_it_cannot_hear_a_majority() -> None:
    c = make(3)
    elect(c, "n1")
    c.network.isolate("n1", list(c.nodes))
    c.run(2 * ELECTION)
    assert c.raft("n1").role is Role.FOLLOWER


def test_without_check_quorum_an_isolated_leader_stays_leader() -> None:
    c = make(3, check_quorum=False)
    elect(c, "n1")
    c.network.isolate("n1", list(c.nodes))
    c.run(10 * ELECTION)
    assert c.raft("n1").role is Role.LEADER


def test_leader_lease_ignores_a_candidate_while_the_leader_is_heard() -> None:
    c = make(3)
    elect(c, "n1")
    term = c.raft("n1").term
    disruptive = VoteRequest(term=term + 5, src="n3", dst="n2", last_index=100, last_term=term + 4)
    c.raft("n2").step(disruptive)
    assert c.raft("n2").term == term and c.raft("n2").vote == "n1"


@pytest.mark.parametrize(("ticks", "granted"), [(ELECTION - 2, False), (ELECTION - 1, True)])
def test_leader_lease_leaves_a_tick_of_slack_for_a_pre_vote_at_the_shortest_timeout(
    ticks: int, granted: bool
) -> None:
    """Nodes tick out of phase: when the leader dies, a follower that drew the shortest
    timeout (ELECTION ticks) may ask while the other has counted one tick fewer since the
    last heartbeat. That one is granted; the election does not wait for the other's own
    timeout. Two ticks fewer is a leader still heard: ignored."""
    c = make(3)
    elect(c, "n1")
    n2 = c.raft("n2")
    for _ in range(ticks):
        n2.tick()
    assert not n2.has_ready()
    n2.step(pre_vote(c, "n3", "n2"))
    assert vote_answers(c, "n2") == ([True] if granted else [])


def test_a_leader_stays_in_its_own_lease_all_through_its_check_quorum_round() -> None:
    """Its election timer runs up to ELECTION ticks too (check-quorum): at ELECTION - 1,
    past a follower's lease, a higher-term vote request is still ignored."""
    c = make(3)
    elect(c, "n1")
    n1 = c.raft("n1")
    term = n1.term
    for _ in range(ELECTION - 1):
        n1.tick()
    n1.step(VoteRequest(term=term + 1, src="n3", dst="n1", last_index=100, last_term=term + 1))
    assert n1.role is Role.LEADER and n1.term == term


def test_with_two_ticks_per_election_timeout_the_lease_keeps_its_full_length() -> None:
    """The tick of slack is not taken when it would leave less than a heartbeat and a
    tick: a follower one tick after a heartbeat still ignores a pre-vote."""
    config = RaftConfig(id="_", election_ticks=2, heartbeat_ticks=1)
    c = Cluster(["n1", "n2", "n3"], seed=1, config=config)
    elect(c, "n1")
    n2 = c.raft("n2")
    n2.tick()
    n2.step(pre_vote(c, "n3", "n2"))
    assert vote_answers(c, "n2") == []


def test_a_pre_vote_granted_while_the_leader_lived_does_not_defer_a_later_campaign() -> None:
    c = make(3)
    elect(c, "n1")
    n2, n3 = c.raft("n2"), c.raft("n3")
    for _ in range(ELECTION - 1):  # n2 out of its lease: it grants n3's pre-vote
        n2.tick()
    n2.step(pre_vote(c, "n3", "n2"))
    c.drain("n2")
    c.raft("n1").tick()  # then hears the leader again: the pre-vote is moot
    c.drain("n1")
    c.stabilize()
    c.crash("n1")
    for _ in range(ELECTION - 1):  # n3 out of its lease
        n3.tick()
    n2.campaign()
    c.drain("n2")
    c.stabilize()  # no ticks: only a campaign without deferral is decided here
    assert c.leader() == "n2"


def survivors_time_out_together(c: Cluster) -> int:
    """n1 leads, then dies; n2 and n3 start their pre-votes at the same moment (each
    asks before the other's request arrives). Returns the term n1 led."""
    elect(c, "n1")
    term = c.raft("n1").term
    c.crash("n1")
    c.raft("n2").campaign()
    c.raft("n3").campaign()
    c.drain("n2")
    c.drain("n3")
    return term


def test_two_followers_timing_out_together_do_not_split_the_vote() -> None:
    """Each grants the other's pre-vote; the lower id defers to the higher one, which
    wins at the first term tried. (Without this both became candidates, each voting
    for itself, and the next try waited a whole randomized election timeout.)"""
    c = make(3)
    term = survivors_time_out_together(c)
    c.stabilize()
    assert c.leader() == "n3" and c.raft("n3").term == term + 1
    assert c.raft("n2").vote == "n3"


def test_a_deferring_pre_candidate_campaigns_when_no_vote_request_comes() -> None:
    """The higher id's vote request is lost (it died, or the link did): the lower id
    campaigns after a heartbeat interval and a tick, instead of waiting for ever."""
    c = make(3)
    c.network.tap = lambda m: not (isinstance(m, VoteRequest) and not m.pre_vote and m.src == "n3")
    term = survivors_time_out_together(c)
    c.stabilize()
    n2 = c.raft("n2")
    assert n2.role is Role.PRE_CANDIDATE and n2.term == term  # won its pre-vote, waits
    n2.tick()
    c.drain("n2")
    assert n2.role is Role.PRE_CANDIDATE  # heartbeat_ticks + 1 = 2 ticks
    n2.tick()
    c.drain("n2")
    assert n2.role is Role.CANDIDATE and n2.term == term + 1


# ---------------------------------------------------------------- reads


def test_read_index_on_a_deposed_leader_is_never_answered_and_fails_on_step_down() -> None:
    c = make(3)
    elect(c, "n1")
    c.propose("n1", b"x")
    c.stabilize()
    c.network.isolate("n1", list(c.nodes))
    c.read("n1", b"stale-read")
    c.run_until(lambda: c.leader() in ("n2", "n3"), 20 * ELECTION)
    new = c.leader() or ""
    index = c.propose(new, b"newer")
    c.run_until(lambda: c.applied(new) >= index, 5 * ELECTION)
    c.run_until(lambda: c.raft("n1").role is Role.FOLLOWER, 5 * ELECTION)
    assert c.reads[b"stale-read"] is None  # failed, never answered with stale data


def test_read_index_waits_until_a_new_leader_commits_an_entry_of_its_term() -> None:
    c = make(3)
    elect(c, "n1")
    written = c.propose("n1", b"x")
    c.stabilize()
    c.run_until(lambda: c.raft("n2").commit == written, 1)  # (the next heartbeat tells it)
    c.raft("n1").transfer_leadership("n2")
    c.drain("n1")
    # Deliver only until n2 is leader, then ask before its no-op can commit.
    c.run_until(lambda: c.raft("n2").role is Role.LEADER, 5 * ELECTION)
    n2 = c.raft("n2")
    assert n2.log.term(written + 1) == n2.term and n2.commit == written  # no-op uncommitted
    # Hold back every acknowledgement of appends to n2, so its no-op cannot commit,
    # while heartbeats still flow: a quorum keeps confirming its leadership.
    confirmations: list[str] = []

    def hold_append_acks(m: AnyMessage) -> bool:
        if m.dst == "n2" and isinstance(m, HeartbeatResponse):
            confirmations.append(m.src)
        return not (m.dst == "n2" and isinstance(m, AppendResponse))

    c.network.tap = hold_append_acks
    c.read("n2", b"r")
    c.run(3 * ELECTION // 2)  # many heartbeat rounds, and a check-quorum check passed
    assert {"n1", "n3"} <= set(confirmations) and n2.role is Role.LEADER
    assert n2.commit == written and b"r" not in c.reads  # the read waits for the commit
    c.network.tap = None  # the no-op commits; then, and only then, the read is answered
    c.run_until(lambda: b"r" in c.reads, 5 * ELECTION)
    assert n2.commit > written
    index = c.reads[b"r"]
    assert index is not None and index >= written + 1  # covers the new term's no-op


def test_read_index_through_a_follower_is_served_by_the_leader() -> None:
    c = make(3)
    elect(c, "n1")
    written = c.propose("n1", b"x")
    c.stabilize()
    c.read("n3", b"via-follower")
    c.stabilize()
    c.run(2)
    index = c.reads[b"via-follower"]
    assert index is not None and index >= written


def test_a_follower_learns_a_new_commit_with_the_next_heartbeat_not_a_message_of_its_own() -> None:
    """A lone write costs each follower one append and one answer: the commit index it
    reaches rides on the next heartbeat (or append), not on an empty append at once."""
    c = make(3)
    elect(c, "n1")
    c.run(1)
    c.stabilize()  # (the heartbeat's answers: one behind the write would ask for an append)
    sent: list[AnyMessage] = []
    c.network.tap = lambda m: sent.append(m) or True
    written = c.propose("n1", b"x")
    c.stabilize()
    appends = [m for m in sent if isinstance(m, AppendEntries)]
    assert sorted(m.dst for m in appends) == ["n2", "n3"]
    assert all(m.entries for m in appends)  # no empty append to carry the commit
    assert c.raft("n1").commit == written
    assert c.raft("n2").commit < written and c.raft("n3").commit < written
    c.run(1)  # one heartbeat
    assert c.raft("n2").commit == written and c.raft("n3").commit == written
    assert c.applied("n2") == written


def test_a_follower_read_is_sent_the_commit_it_waits_for_without_a_heartbeat() -> None:
    """The leader confirms a follower's read at index *i* while no message so far told
    that follower *i* is committed (its acknowledgement arrived after the round's
    heartbeat left): the answer comes with an append that does, so the read is served
    at once rather than at the next heartbeat."""
    c = make(3)
    elect(c, "n1")
    c.run(1)
    c.stabilize()
    held: list[AnyMessage] = []

    def hold_n2_acks(m: AnyMessage) -> bool:
        if isinstance(m, AppendResponse) and m.src == "n2":
            held.append(m)
            return False
        return True

    c.network.tap = hold_n2_acks
    written = c.propose("n1", b"x")
    c.stabilize()  # n3's acknowledgement commits it; n2's is held
    assert c.raft("n1").commit == written and held
    c.network.tap = None
    c.read("n2", b"r")
    c.deliver()  # the leader takes the read; the round's heartbeat tells n2 less than i
    for m in held:
        c.network.send(c.now, m)  # n2's acknowledgement lands before its heartbeat answer
    c.stabilize()  # no tick: no periodic heartbeat
    assert c.reads[b"r"] == written
    assert c.raft("n2").commit == written and c.applied("n2") == written


def test_a_read_queued_before_the_leader_becomes_the_sole_voter_is_answered() -> None:
    """The read waits for a heartbeat round; after the change nobody answers heartbeats,
    so the leader's own round must be enough."""
    c = Cluster(["n1", "n2"], seed=5, config=RaftConfig(id="_", election_ticks=ELECTION))
    elect(c, "n1")
    c.stabilize()
    c.raft("n1").read_index(b"r")
    c.raft("n1").propose_conf_change(ConfChange(ConfChangeType.REMOVE, "n2"))
    c.drain("n1")
    c.run(5)
    assert c.reads.get(b"r") is not None


# ---------------------------------------------------------------- leadership transfer


def test_leadership_transfer_catches_the_target_up_then_hands_over() -> None:
    c = make(3)
    elect(c, "n1")
    term = c.raft("n1").term
    c.network.isolate("n3", list(c.nodes))
    last = 0
    for i in range(5):
        last = c.propose("n1", b"w%d" % i)
    c.stabilize()
    c.network.heal()
    c.raft("n1").transfer_leadership("n3")
    with pytest.raises(ProposalRefused):
        c.raft("n1").propose(b"during transfer")
    c.run_until(lambda: c.leader() == "n3", 5 * ELECTION)
    assert c.raft("n3").term == term + 1
    assert c.raft("n3").log.last_index > last


def test_leadership_transfer_to_a_non_voter_is_refused() -> None:
    c = make(3)
    elect(c, "n1")
    with pytest.raises(ProposalRefused):
        c.raft("n1").transfer_leadership("n9")


# ---------------------------------------------------------------- snapshots


def test_a_follower_behind_the_log_start_gets_the_snapshot_in_chunks_and_resumes() -> None:
    c = make(3, snapshot_chunk_bytes=8)
    elect(c, "n1")
    c.network.isolate("n3", list(c.nodes))
    for i in range(30):
        c.propose("n1", b"w%d" % i)
        c.stabilize()
    c.compact("n1")
    chunks: list[InstallSnapshot] = []
    dropped = False

    def tap(m: AnyMessage) -> bool:
        nonlocal dropped
        if isinstance(m, InstallSnapshot):
            chunks.append(m)
            if len(chunks) == 3 and not dropped:
                dropped = True
                return False  # lose one chunk in the middle
        return True

    c.network.tap = tap
    c.network.heal()
    c.run_until(lambda: c.applied("n3") >= c.applied("n1"), 20 * ELECTION)
    assert c.nodes["n3"].sm.digest == c.nodes["n1"].sm.digest
    assert len(chunks) > 3 and dropped
    assert [m.offset for m in chunks].count(0) == 1  # resumed, not restarted
    assert c.raft("n3").log.snapshot_index > 0


def test_a_node_restarted_after_compaction_rebuilds_the_same_state() -> None:
    c = make(3)
    elect(c, "n1")
    for i in range(10):
        c.propose("n1", b"w%d" % i)
    c.stabilize()
    c.run_until(lambda: c.applied("n2") == c.applied("n1"), 1)  # (the next heartbeat)
    c.compact("n2")
    digest = c.nodes["n2"].sm.digest
    c.crash("n2")
    c.restart("n2")
    c.run(3)
    assert c.nodes["n2"].sm.digest == digest


# ---------------------------------------------------------------- membership


def with_learner() -> Cluster:
    """Voters n1 (leading), n2, n3, and n4 added as a learner (it has the change)."""
    c = Cluster(
        ["n1", "n2", "n3", "n4"],
        voters=["n1", "n2", "n3"],
        seed=3,
        config=RaftConfig(id="_", election_ticks=ELECTION),
    )
    elect(c, "n1")
    c.raft("n1").propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "n4"))
    c.drain("n1")
    c.run(5)
    return c


def test_a_learner_receives_the_log_but_does_not_count_for_commit() -> None:
    c = with_learner()
    assert "n4" in c.raft("n4").membership.learners
    c.network.isolate("n1", ["n2", "n3"])
    index = c.propose("n1", b"needs a voter")
    c.run(5)
    assert c.raft("n4").log.last_index >= index  # replicated to the learner...
    assert c.raft("n1").commit < index  # ...which does not make a majority


def test_leader_heard_lapses_after_an_election_timeout_of_silence_on_a_learner_too() -> None:
    """A learner never campaigns, so it keeps naming its leader; ``leader_heard`` (what a
    removed node's shell waits on before it believes its removal) lapses anyway."""
    c = with_learner()
    n4 = c.raft("n4")
    assert "n4" in n4.membership.learners and n4.leader_heard
    assert c.raft("n1").leader_heard and c.raft("n2").leader_heard
    c.network.isolate("n4", ["n1", "n2", "n3"])
    c.run(ELECTION)
    assert n4.leader == "n1" and not n4.leader_heard


def test_promote_then_remove_the_leader_which_steps_down_after_commit() -> None:
    c = Cluster(
        ["n1", "n2", "n3", "n4"],
        voters=["n1", "n2", "n3"],
        seed=4,
        config=RaftConfig(id="_", election_ticks=ELECTION),
    )
    elect(c, "n1")
    for change in (
        ConfChange(ConfChangeType.ADD_LEARNER, "n4"),
        ConfChange(ConfChangeType.PROMOTE, "n4"),
        ConfChange(ConfChangeType.REMOVE, "n1"),
    ):
        index = c.raft(c.leader() or "").propose_conf_change(change)
        c.drain(c.leader() or "")
        c.run_until(lambda i=index: c.raft("n2").commit >= i, 5 * ELECTION)  # type: ignore[misc]
    assert c.raft("n1").role is Role.FOLLOWER
    c.run_until(lambda: c.leader() in ("n2", "n3", "n4"), 20 * ELECTION)
    assert c.raft(c.leader() or "").membership.voters == {"n2", "n3", "n4"}


def test_only_one_membership_change_at_a_time() -> None:
    c = make(3)
    elect(c, "n1")
    c.raft("n1").propose_conf_change(ConfChange(ConfChangeType.REMOVE, "n3"))
    with pytest.raises(ProposalRefused):
        c.raft("n1").propose_conf_change(ConfChange(ConfChangeType.REMOVE, "n2"))


def test_conf_change_ready_is_false_while_a_change_is_uncommitted() -> None:
    c = make(3)
    elect(c, "n1")  # its NOOP is committed
    assert c.raft("n1").conf_change_ready
    c.raft("n1").propose_conf_change(ConfChange(ConfChangeType.REMOVE, "n3"))
    assert not c.raft("n1").conf_change_ready
    c.drain("n1")
    c.stabilize()
    assert c.raft("n1").conf_change_ready


# ---------------------------------------------------------------- crashes


def test_a_restarted_node_keeps_its_term_vote_and_log() -> None:
    c = make(3)
    elect(c, "n1")
    for i in range(5):
        c.propose("n1", b"w%d" % i)
    c.stabilize()
    before = (c.raft("n2").term, c.raft("n2").vote, c.nodes["n2"].disk.entries[:])
    c.crash("n2")
    c.restart("n2")
    r = c.raft("n2")
    assert (r.term, r.vote, r.log.entries) == before
