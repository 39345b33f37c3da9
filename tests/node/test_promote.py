"""The auto-promotion rule (node/promote.py): a learner is promoted once it has stayed
caught up for an election timeout, counted in ticks, and only by a leader."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from liferaft.config import Settings, load
from liferaft.core import (
    AppendResponse,
    Membership,
    PeerStatus,
    ProgressState,
    Raft,
    RaftConfig,
    Restored,
    Role,
    Status,
)
from liferaft.node.promote import AutoPromoter, CatchUp
from liferaft.testing.localcluster import free_ports, write_config

BOUND, HOLD = 100, 5


def status(
    learners: dict[str, int], *, last: int = 1000, role: Role = Role.LEADER, term: int = 2
) -> Status:
    """A leader's status with voters n1..n3 (n2, n3 level with it) and ``learners``
    (id -> match index)."""
    matches = {"n2": last, "n3": last, **learners}
    return Status(
        id="n1",
        role=role,
        term=term,
        leader="n1" if role is Role.LEADER else None,
        commit=last,
        applied=last,
        last_index=last,
        snapshot_index=0,
        membership=Membership.of(["n1", "n2", "n3"], tuple(learners)),
        peers={p: PeerStatus(m, m + 1, ProgressState.REPLICATE, True) for p, m in matches.items()},
    )


def test_a_learner_caught_up_for_less_than_the_hold_is_not_promoted() -> None:
    rule = CatchUp(bound=BOUND, hold=HOLD)
    for now in range(HOLD):
        assert rule.due(now, status({"n4": 950})) is None


def test_a_learner_caught_up_for_the_whole_hold_is_promoted() -> None:
    rule = CatchUp(bound=BOUND, hold=HOLD)
    assert [rule.due(now, status({"n4": 1000 - BOUND})) for now in range(HOLD + 1)] == [
        *([None] * HOLD),
        "n4",
    ]


def test_falling_behind_starts_the_clock_again() -> None:
    rule = CatchUp(bound=BOUND, hold=HOLD)
    for now in range(HOLD - 1):
        assert rule.due(now, status({"n4": 990})) is None
    assert rule.due(HOLD - 1, status({"n4": 1000 - BOUND - 1})) is None  # one too far
    for now in range(HOLD, 2 * HOLD):
        assert rule.due(now, status({"n4": 990})) is None
    assert rule.due(2 * HOLD, status({"n4": 990})) == "n4"


def test_a_learner_that_never_answered_is_not_caught_up_even_in_a_short_log() -> None:
    rule = CatchUp(bound=BOUND, hold=HOLD)
    for now in range(3 * HOLD):  # match 0 is within the bound of last index 50, but unknown
        assert rule.due(now, status({"n4": 0}, last=50)) is None


def test_only_a_leader_promotes_and_a_new_term_starts_every_clock_again() -> None:
    rule = CatchUp(bound=BOUND, hold=HOLD)
    for now in range(HOLD):
        assert rule.due(now, status({"n4": 1000})) is None
    assert rule.due(HOLD, status({"n4": 1000}, role=Role.FOLLOWER)) is None
    for now in range(HOLD + 1, 2 * HOLD + 1):  # leader again: from scratch
        assert rule.due(now, status({"n4": 1000}, term=4)) is None
    assert rule.due(2 * HOLD + 1, status({"n4": 1000}, term=4)) == "n4"
    # a leader of a newer term, never seen as a follower in between, starts again too
    assert rule.due(2 * HOLD + 2, status({"n4": 1000}, term=5)) is None


def test_two_learners_are_promoted_one_at_a_time_in_id_order() -> None:
    rule = CatchUp(bound=BOUND, hold=HOLD)
    for now in range(HOLD):
        rule.due(now, status({"n4": 1000, "n5": 1000}))
    assert rule.due(HOLD, status({"n4": 1000, "n5": 1000})) == "n4"
    # n4 is a voter now (its change appended); n5 has waited long enough already
    st = status({"n5": 1000})
    st = replace(st, membership=Membership.of(["n1", "n2", "n3", "n4"], ("n5",)))
    assert rule.due(HOLD + 1, st) == "n5"


def _settings(tmp_path: Path, certs: Path, *, auto_promote: bool) -> Settings:
    ports = free_ports(3)
    path = write_config(
        tmp_path / "n1.toml",
        "n1",
        {"n1": (ports[0], ports[1], ports[2])},
        certs,
        tmp_path / "data",
        snapshot_entries=1000,
        auto_promote=auto_promote,
    )
    return load(path)


def test_auto_promote_off_means_no_promoter(tmp_path: Path, certs: Path) -> None:
    assert AutoPromoter.of(_settings(tmp_path, certs, auto_promote=False), 10) is None
    promoter = AutoPromoter.of(_settings(tmp_path, certs, auto_promote=True), 10)
    assert promoter is not None
    assert (promoter.rule.bound, promoter.rule.hold) == (100, 10)  # snapshot_entries / 10


def test_the_promoter_proposes_the_promotion_to_a_leader_core() -> None:
    """On a real core: a sole voter with a learner that answered proposes PROMOTE once the
    hold passed, and never a second change while the first is uncommitted."""
    raft = Raft(
        RaftConfig(id="n1", election_ticks=10, heartbeat_ticks=1),
        random.Random(1),
        Restored(initial_membership=Membership.of(["n1"], ("n2",))),
    )
    raft.campaign()
    while raft.has_ready():
        raft.advance(raft.ready())
    assert raft.role is Role.LEADER
    last = raft.log.last_index
    raft.step(AppendResponse(term=raft.term, src="n2", dst="n1", success=True, index=last))
    while raft.has_ready():
        raft.advance(raft.ready())
    assert raft.status().peers["n2"].match == last
    promoter = AutoPromoter(CatchUp(bound=0, hold=3))
    for now in range(3):
        promoter.on_ticks(raft, now)
        assert raft.membership.learners == {"n2"}
    promoter.on_ticks(raft, 3)
    assert raft.membership == Membership.of(["n1", "n2"])  # appended: in force at once
