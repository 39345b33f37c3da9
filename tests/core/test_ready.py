"""The Ready/advance contract and flow control, driving ``Raft`` objects by hand.

Each test plays the shell itself: it calls ``ready()``, looks at what the core asks
for, and hands the Ready back to ``advance()``. Messages from peers are written out
in full, so each test shows exactly which input produced which output.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from typing import Any

import pytest

from liferaft.core import (
    AnyMessage,
    AppendEntries,
    AppendResponse,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    Membership,
    NotLeader,
    ProgressState,
    Raft,
    RaftConfig,
    Ready,
    Restored,
    Role,
    UsageError,
    VoteRequest,
    VoteResponse,
)

ABC = ["a", "b", "c"]


def make(node: str = "a", voters: list[str] = ABC, *, seed: int = 1, **cfg: Any) -> Raft:
    return Raft(
        RaftConfig(id=node, **cfg),
        random.Random(seed),
        Restored(initial_membership=Membership.of(voters)),
    )


def handle(r: Raft) -> Ready:
    """Play a shell that persists, sends and applies everything at once."""
    rd = r.ready()
    r.advance(rd)
    return rd


def appends_to(rd: Ready, peer: str) -> list[AppendEntries]:
    return [m for m in rd.messages if isinstance(m, AppendEntries) and m.dst == peer]


def ack(r: Raft, peer: str, index: int) -> None:
    r.step(AppendResponse(term=r.term, src=peer, dst=r.id, success=True, index=index))


def elect(r: Raft, granter: str = "b") -> Ready:
    """Make ``r`` leader with one other node's pre-vote and vote; returns the Ready
    carrying its first appends (the no-op of the new term)."""
    r.campaign()
    handle(r)
    r.step(VoteResponse(term=r.term + 1, src=granter, dst=r.id, granted=True, pre_vote=True))
    handle(r)
    r.step(VoteResponse(term=r.term, src=granter, dst=r.id, granted=True))
    assert r.role is Role.LEADER
    return handle(r)


def steady_leader(**cfg: Any) -> Raft:
    """Leader ``a`` of a, b, c at term 1; both followers acknowledged the no-op (index 1)
    and are in REPLICATE state; nothing is left in any Ready."""
    r = make(**cfg)
    elect(r)
    ack(r, "b", 1)
    ack(r, "c", 1)
    handle(r)  # the new commit index goes out
    assert r.commit == 1
    assert not r.has_ready()
    return r


# ---------------------------------------------------------------- persist before send


def test_a_followers_vote_is_sent_only_after_its_hard_state_is_persisted() -> None:
    r = make("b")
    r.step(VoteRequest(term=1, src="a", dst="b", last_index=0, last_term=0))
    rd = r.ready()
    grant = VoteResponse(term=1, src="b", dst="a", granted=True)
    assert rd.persisted_messages == (grant,)
    assert rd.messages == ()
    assert rd.hard_state == HardState(term=1, vote="a", commit=0)
    assert rd.must_persist()
    r.advance(rd)
    assert not r.has_ready()


def test_a_followers_pre_vote_changes_neither_term_nor_vote() -> None:
    r = make("b")
    r.step(VoteRequest(term=1, src="a", dst="b", last_index=0, last_term=0, pre_vote=True))
    rd = handle(r)
    assert rd.hard_state is None
    granted = [m for m in rd.messages + rd.persisted_messages if isinstance(m, VoteResponse)]
    assert granted == [VoteResponse(term=1, src="b", dst="a", granted=True, pre_vote=True)]
    assert (r.term, r.vote) == (0, None)


def test_pre_vote_requests_go_out_at_once_and_persist_nothing() -> None:
    r = make()
    r.campaign()
    rd = handle(r)
    assert r.role is Role.PRE_CANDIDATE
    assert rd.hard_state is None
    assert rd.persisted_messages == ()
    assert {(m.dst, m.term, m.pre_vote) for m in rd.messages if isinstance(m, VoteRequest)} == {
        ("b", 1, True),
        ("c", 1, True),
    }


def test_a_candidates_vote_requests_are_sent_only_after_its_term_bump_is_persisted() -> None:
    r = make()
    r.campaign()
    handle(r)
    r.step(VoteResponse(term=1, src="b", dst="a", granted=True, pre_vote=True))
    rd = r.ready()
    assert r.role is Role.CANDIDATE
    assert rd.hard_state == HardState(term=1, vote="a", commit=0)
    assert rd.messages == ()
    assert {(m.dst, m.term, m.pre_vote) for m in rd.persisted_messages} == {
        ("b", 1, False),
        ("c", 1, False),
    }
    assert all(isinstance(m, VoteRequest) for m in rd.persisted_messages)
    r.advance(rd)


def test_without_pre_vote_the_first_vote_requests_are_persisted_messages() -> None:
    r = make(pre_vote=False)
    r.campaign()
    rd = handle(r)
    assert rd.hard_state == HardState(term=1, vote="a", commit=0)
    assert rd.messages == ()
    assert sorted(m.dst for m in rd.persisted_messages) == ["b", "c"]


def test_a_followers_append_acknowledgement_is_sent_only_after_persisting() -> None:
    r = make("b")
    entries = (Entry(1, 1, EntryKind.NOOP), Entry(2, 1, data=b"x"))
    r.step(
        AppendEntries(
            term=1, src="a", dst="b", prev_index=0, prev_term=0, entries=entries, commit=0
        )
    )
    rd = r.ready()
    assert rd.entries == entries
    assert rd.messages == ()
    assert rd.persisted_messages == (
        AppendResponse(term=1, src="b", dst="a", success=True, index=2),
    )
    r.advance(rd)


def test_a_leaders_appends_may_go_out_before_its_own_entries_are_durable() -> None:
    r = steady_leader()
    index = r.propose(b"x")
    rd = r.ready()
    # The entry to persist and the appends carrying it are in the same Ready, and the
    # appends are in `messages`: the shell may send them while it fsyncs.
    assert [e.index for e in rd.entries] == [index]
    for peer in ("b", "c"):
        (m,) = appends_to(rd, peer)
        assert [e.index for e in m.entries] == [index]
    assert not any(isinstance(m, AppendEntries) for m in rd.persisted_messages)
    r.advance(rd)


def test_the_leader_counts_itself_toward_commit_only_once_its_entries_are_stable() -> None:
    r = make("a", ["a"])
    r.campaign()
    assert r.role is Role.LEADER
    rd = r.ready()
    assert [e.kind for e in rd.entries] == [EntryKind.NOOP]
    assert r.commit == 0  # the only voter holds the no-op, but not durably yet
    assert rd.committed_entries == ()
    r.advance(rd)
    assert r.commit == 1
    rd = handle(r)
    assert [e.kind for e in rd.committed_entries] == [EntryKind.NOOP]

    index = r.propose(b"x")
    rd = r.ready()
    assert [e.index for e in rd.entries] == [index]
    assert r.commit == index - 1
    assert rd.committed_entries == ()
    r.advance(rd)
    assert r.commit == index
    rd = handle(r)
    assert [e.data for e in rd.committed_entries] == [b"x"]


# ---------------------------------------------------------------- the Ready lock


def test_step_between_ready_and_advance_raises() -> None:
    r = steady_leader()
    r.propose(b"x")
    rd = r.ready()
    with pytest.raises(UsageError):
        ack(r, "b", 2)
    r.advance(rd)
    ack(r, "b", 2)


def test_a_leader_ticking_while_its_ready_is_outstanding_still_sends_heartbeats() -> None:
    """Time passes while the shell's disk write is slow: the leader's heartbeats leave
    through take_messages (so followers do not time out), and check-quorum waits for
    advance (a leader does not step down while its own write is in flight)."""
    r = steady_leader(election_ticks=3)
    r.propose(b"x")
    rd = r.ready()
    for _ in range(7):  # two check-quorum periods, no response arrives
        r.tick()
        beats = r.take_messages()
        assert sorted((type(m).__name__, m.dst) for m in beats) == [
            ("Heartbeat", "b"),
            ("Heartbeat", "c"),
        ]
        assert r.role is Role.LEADER
    r.advance(rd)
    for _ in range(6):  # check-quorum runs again; nobody answered since the last one
        r.tick()
    assert r.role is Role.FOLLOWER


def test_a_follower_ticking_while_its_ready_is_outstanding_campaigns_only_after_advance() -> None:
    r = make(election_ticks=3)
    r.step(Heartbeat(term=1, src="b", dst="a", commit=0, read_round=0))
    rd = r.ready()
    for _ in range(10):
        r.tick()
        assert r.role is Role.FOLLOWER and r.take_messages() == ()
    r.advance(rd)
    r.tick()  # the timeout fell due long ago: it campaigns now
    assert r.role is Role.PRE_CANDIDATE


def test_a_heartbeat_after_a_slow_write_keeps_the_follower_from_campaigning() -> None:
    """What the node shell does after a slow fsync: messages that waited meanwhile are
    stepped before the ticks that waited with them."""
    r = make(election_ticks=3)
    r.step(Heartbeat(term=1, src="b", dst="a", commit=0, read_round=0))
    rd = r.ready()
    for _ in range(10):
        r.tick()
    r.advance(rd)
    r.step(Heartbeat(term=1, src="b", dst="a", commit=0, read_round=0))
    r.tick()
    assert r.role is Role.FOLLOWER and r.leader == "b"


def test_propose_between_ready_and_advance_raises() -> None:
    r = steady_leader()
    rd = r.ready()
    with pytest.raises(UsageError):
        r.propose(b"x")
    r.advance(rd)
    r.propose(b"x")


def test_propose_on_a_follower_between_ready_and_advance_raises_usage_error() -> None:
    r = make("b")
    rd = r.ready()
    with pytest.raises(UsageError):
        r.propose(b"x")
    r.advance(rd)


def test_other_inputs_between_ready_and_advance_raise() -> None:
    r = steady_leader()
    rd = r.ready()
    with pytest.raises(UsageError):
        r.ready()
    with pytest.raises(UsageError):
        r.campaign()
    with pytest.raises(UsageError):
        r.read_index(b"r")
    with pytest.raises(UsageError):
        r.transfer_leadership("b")
    with pytest.raises(UsageError):
        r.compact(1, b"")
    r.advance(rd)


def test_advance_with_a_copy_of_the_ready_raises() -> None:
    r = steady_leader()
    r.propose(b"x")
    rd = r.ready()
    with pytest.raises(UsageError):
        r.advance(dataclasses.replace(rd))
    # The core still waits for the right Ready, and takes it.
    with pytest.raises(UsageError):
        ack(r, "b", 2)
    r.advance(rd)
    assert r.log.stable == 2


def test_advance_with_another_nodes_ready_raises() -> None:
    r, other = make("a"), make("b")
    rd, rd_other = r.ready(), other.ready()
    with pytest.raises(UsageError):
        r.advance(rd_other)
    r.advance(rd)
    other.advance(rd_other)


def test_advance_twice_or_without_ready_raises() -> None:
    r = make()
    rd = r.ready()
    r.advance(rd)
    with pytest.raises(UsageError):
        r.advance(rd)


# ---------------------------------------------------------------- batching and pipelining


def test_proposals_before_one_ready_are_persisted_and_sent_as_one_batch() -> None:
    r = steady_leader()
    indexes = [r.propose(b"cmd %d" % n) for n in range(100)]
    assert indexes == list(range(2, 102))
    rd = r.ready()
    assert [e.index for e in rd.entries] == indexes
    assert [e.data for e in rd.entries] == [b"cmd %d" % n for n in range(100)]
    for peer in ("b", "c"):
        (m,) = appends_to(rd, peer)
        assert (m.prev_index, m.prev_term) == (1, 1)
        assert m.entries == rd.entries
    r.advance(rd)


def test_replication_is_pipelined_up_to_the_inflight_window() -> None:
    r = make(max_msg_bytes=1, max_inflight_msgs=4)  # one entry per message, 4 in flight
    elect(r)
    ack(r, "b", 1)  # b: REPLICATE; c never answers and stays a paused PROBE
    handle(r)
    assert r.status().peers["b"].state is ProgressState.REPLICATE
    assert r.status().peers["c"].state is ProgressState.PROBE

    for n in range(10):
        r.propose(b"%d" % n)  # indexes 2..11
    rd = handle(r)
    assert [m.entries[0].index for m in appends_to(rd, "b")] == [2, 3, 4, 5]
    assert all(len(m.entries) == 1 for m in appends_to(rd, "b"))
    assert appends_to(rd, "c") == []  # a probe is already outstanding

    ack(r, "b", 3)  # frees the two oldest slots
    rd = handle(r)
    assert [m.entries[0].index for m in appends_to(rd, "b")] == [6, 7]

    ack(r, "b", 7)
    rd = handle(r)
    assert [m.entries[0].index for m in appends_to(rd, "b")] == [8, 9, 10, 11]
    assert r.commit == 7  # a and b hold 1..7


def test_the_window_stays_closed_without_acknowledgements() -> None:
    r = make(max_msg_bytes=1, max_inflight_msgs=4)
    elect(r)
    ack(r, "b", 1)
    handle(r)
    for n in range(10):
        r.propose(b"%d" % n)
    handle(r)
    for n in range(3):
        r.propose(b"more %d" % n)
    rd = handle(r)
    assert appends_to(rd, "b") == []


# ---------------------------------------------------------------- elections and commits


def test_a_single_node_cluster_elects_itself_and_commits_proposals() -> None:
    r = make("solo", ["solo"], seed=7)
    applied: list[Entry] = []
    for _ in range(2 * 10):  # the randomized election timeout is below 2 * election_ticks
        r.tick()
        while r.has_ready():
            applied.extend(handle(r).committed_entries)
        if r.role is Role.LEADER:
            break
    assert r.role is Role.LEADER
    assert (r.leader, r.term) == ("solo", 1)
    assert [e.kind for e in applied] == [EntryKind.NOOP]

    indexes = [r.propose(b"a"), r.propose(b"b")]
    while r.has_ready():
        applied.extend(handle(r).committed_entries)
    indexes.append(r.propose(b"c"))
    while r.has_ready():
        applied.extend(handle(r).committed_entries)
    assert indexes == [2, 3, 4]
    assert [e.data for e in applied[1:]] == [b"a", b"b", b"c"]
    assert r.commit == r.applied == 4


def test_a_proposal_on_a_follower_raises_not_leader_naming_the_leader() -> None:
    r = make("b")
    with pytest.raises(NotLeader) as unknown:
        r.propose(b"x")
    assert unknown.value.leader is None

    r.step(Heartbeat(term=1, src="a", dst="b", commit=0))
    handle(r)
    assert r.leader == "a"
    with pytest.raises(NotLeader) as known:
        r.propose(b"x")
    assert known.value.leader == "a"
    assert r.log.last_index == 0


def test_a_proposal_on_a_candidate_raises_not_leader() -> None:
    r = make()
    r.campaign()
    handle(r)
    with pytest.raises(NotLeader) as info:
        r.propose(b"x")
    assert info.value.leader is None


# ---------------------------------------------------------------- committed entries


def run_cluster(seed: int) -> dict[str, list[Entry]]:
    """Three cores and a lossy, reordering in-test network that now and then cuts one
    node off; returns what each node applied, after a healed stretch at the end."""
    rng = random.Random(seed)
    nodes = {n: make(n, seed=seed * 10 + k) for k, n in enumerate(ABC)}
    applied: dict[str, list[Entry]] = {n: [] for n in ABC}
    wire: deque[AnyMessage] = deque()
    counter = 0

    def drain(r: Raft) -> None:
        while r.has_ready():
            rd = r.ready()
            wire.extend(rd.messages)
            wire.extend(rd.persisted_messages)
            batch = list(rd.committed_entries)
            if batch:
                done = applied[r.id][-1].index if applied[r.id] else 0
                assert batch[0].index == done + 1, "gap or repeat"
            applied[r.id].extend(batch)
            r.advance(rd)

    isolated: str | None = None
    for step in range(4000):
        faulty = step < 3000  # then heal, so that everything gets committed everywhere
        if step % 500 == 0:
            isolated = rng.choice(ABC) if faulty else None
        elif step % 500 == 250:
            isolated = None
        action = rng.random()
        if action < 0.15:
            for r in nodes.values():
                r.tick()
                drain(r)
        elif action < 0.3:
            leaders = [r for r in nodes.values() if r.role is Role.LEADER]
            if leaders:
                leader = max(leaders, key=lambda r: r.term)
                for _ in range(rng.randrange(1, 4)):
                    counter += 1
                    leader.propose(b"%d" % counter)
                drain(leader)
        elif wire:
            if faulty and rng.random() < 0.3:
                wire.rotate(-rng.randrange(len(wire)))  # reorder
            m = wire.popleft()
            if isolated in (m.src, m.dst) or (faulty and rng.random() < 0.05):
                continue  # drop
            dst = nodes[m.dst]
            dst.step(m)
            drain(dst)
    return applied


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_committed_entries_come_in_order_and_never_repeat(seed: int) -> None:
    applied = run_cluster(seed)
    longest = max(applied.values(), key=len)
    assert len(longest) > 100  # the run did commit a fair amount ...
    assert len({e.term for e in longest}) > 2  # ... under several leaders
    for seq in applied.values():
        assert [e.index for e in seq] == list(range(1, len(seq) + 1))
        assert seq == longest[: len(seq)]  # and every node applies the same entries
    datas = [e.data for e in longest if e.kind is EntryKind.NORMAL]
    assert len(datas) == len(set(datas))


def test_committed_entries_of_one_follower_are_handed_out_once() -> None:
    r = make("b")
    entries = tuple(Entry(i, 1, data=b"%d" % i) for i in range(1, 6))
    r.step(
        AppendEntries(
            term=1, src="a", dst="b", prev_index=0, prev_term=0, entries=entries, commit=3
        )
    )
    rd = handle(r)
    assert [e.index for e in rd.committed_entries] == [1, 2, 3]
    # The leader repeats itself (a retransmission) and then moves the commit index.
    r.step(
        AppendEntries(
            term=1, src="a", dst="b", prev_index=0, prev_term=0, entries=entries, commit=3
        )
    )
    rd = handle(r)
    assert rd.committed_entries == ()
    r.step(Heartbeat(term=1, src="a", dst="b", commit=5))
    rd = handle(r)
    assert [e.index for e in rd.committed_entries] == [4, 5]
    assert r.applied == 5
    assert not r.has_ready()


def test_the_inflight_window_also_closes_at_its_byte_budget() -> None:
    # Each entry counts 16 bytes of overhead plus its payload: 20 bytes here.
    r = make(max_msg_bytes=1, max_inflight_bytes=50)
    elect(r)
    ack(r, "b", 1)
    handle(r)
    for n in range(10):
        r.propose(b"%04d" % n)
    rd = handle(r)
    # 20 + 20 < 50: a third may go; 60 >= 50: the window is then full.
    assert [m.entries[0].index for m in appends_to(rd, "b")] == [2, 3, 4]


def test_a_heartbeat_response_reopens_a_full_window_by_one_message() -> None:
    r = make(max_msg_bytes=1, max_inflight_msgs=4)
    elect(r)
    ack(r, "b", 1)
    handle(r)
    for n in range(10):
        r.propose(b"%d" % n)
    handle(r)  # 2..5 in flight; suppose all four were lost
    r.step(HeartbeatResponse(term=r.term, src="b", dst="a"))
    rd = handle(r)
    assert [m.entries[0].index for m in appends_to(rd, "b")] == [6]


def test_an_idle_leader_has_nothing_ready_once_a_full_window_was_handled() -> None:
    r = make(max_msg_bytes=1, max_inflight_msgs=4)
    elect(r)
    ack(r, "b", 1)
    handle(r)
    for n in range(10):
        r.propose(b"%d" % n)
    handle(r)
    r.propose(b"more")
    rd = handle(r)
    assert appends_to(rd, "b") == []
    assert not r.has_ready()


def sole_voter_just_elected() -> tuple[Raft, Ready]:
    """Voter ``a`` with learner ``l``, leader of a new term by its own vote, and the
    Ready that writes that term, outstanding."""
    r = Raft(
        RaftConfig(id="a", election_ticks=3),
        random.Random(1),
        Restored(initial_membership=Membership(frozenset({"a"}), frozenset({"l"}))),
    )
    while r.role is not Role.LEADER:
        r.tick()
    rd = r.ready()
    assert rd.hard_state is not None and rd.hard_state.term == r.term
    return r, rd


def test_take_messages_holds_back_a_term_that_is_not_durable_yet() -> None:
    """A sole voter elects itself in one tick; while the Ready carrying its new term is
    being written, its heartbeats (to a learner) must not carry that term."""
    r, rd = sole_voter_just_elected()
    for _ in range(5):
        r.tick()
        assert r.take_messages() == ()
    r.advance(rd)
    r.tick()
    assert any(isinstance(m, Heartbeat) and m.dst == "l" for m in r.take_messages())


def test_a_sole_voters_first_appends_leave_only_once_its_new_term_is_durable() -> None:
    """A sole voter elects itself with no vote round (no persist in between), so its
    appends of the new term must wait for the term on disk: a learner that took them
    from a leader which then crashed before its fsync would keep entries of a term the
    restarted leader reuses with different entries."""
    _, rd = sole_voter_just_elected()
    assert not any(isinstance(m, AppendEntries) for m in rd.messages)
    assert any(isinstance(m, AppendEntries) and m.dst == "l" for m in rd.persisted_messages)
