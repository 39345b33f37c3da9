"""Membership and single-server changes to it."""

from __future__ import annotations

import pytest

from liferaft.core import ConfChange, ConfChangeType, ConfEntry, Membership, ProposalRefused

ABC = Membership.of(["a", "b", "c"], ("l",))


def change(kind: ConfChangeType, node: str) -> ConfChange:
    return ConfChange(kind, node)


# ---------------------------------------------------------------- ConfChange.apply


def test_add_voter_adds_a_new_node_as_voter() -> None:
    new = change(ConfChangeType.ADD_VOTER, "d").apply(ABC)
    assert new == Membership.of(["a", "b", "c", "d"], ("l",))


def test_add_voter_of_a_learner_makes_it_a_voter() -> None:
    new = change(ConfChangeType.ADD_VOTER, "l").apply(ABC)
    assert new == Membership.of(["a", "b", "c", "l"])


def test_add_voter_of_an_existing_voter_is_refused() -> None:
    with pytest.raises(ProposalRefused):
        change(ConfChangeType.ADD_VOTER, "b").apply(ABC)


def test_add_learner_adds_a_new_node_as_learner() -> None:
    new = change(ConfChangeType.ADD_LEARNER, "m").apply(ABC)
    assert new == Membership.of(["a", "b", "c"], ("l", "m"))


@pytest.mark.parametrize("node", ["a", "l"])
def test_add_learner_of_a_member_is_refused(node: str) -> None:
    with pytest.raises(ProposalRefused):
        change(ConfChangeType.ADD_LEARNER, node).apply(ABC)


def test_promote_makes_a_learner_a_voter() -> None:
    new = change(ConfChangeType.PROMOTE, "l").apply(ABC)
    assert new == Membership.of(["a", "b", "c", "l"])


@pytest.mark.parametrize("node", ["a", "zz"])
def test_promote_of_a_non_learner_is_refused(node: str) -> None:
    with pytest.raises(ProposalRefused):
        change(ConfChangeType.PROMOTE, node).apply(ABC)


def test_remove_drops_a_voter() -> None:
    new = change(ConfChangeType.REMOVE, "b").apply(ABC)
    assert new == Membership.of(["a", "c"], ("l",))


def test_remove_drops_a_learner() -> None:
    new = change(ConfChangeType.REMOVE, "l").apply(ABC)
    assert new == Membership.of(["a", "b", "c"])


def test_remove_of_a_non_member_is_refused() -> None:
    with pytest.raises(ProposalRefused):
        change(ConfChangeType.REMOVE, "zz").apply(ABC)


def test_remove_of_the_last_voter_is_refused() -> None:
    with pytest.raises(ProposalRefused):
        change(ConfChangeType.REMOVE, "a").apply(Membership.of(["a"], ("l",)))


def test_apply_leaves_the_current_membership_unchanged() -> None:
    before = Membership.of(["a", "b", "c"], ("l",))
    change(ConfChangeType.REMOVE, "a").apply(before)
    change(ConfChangeType.PROMOTE, "l").apply(before)
    assert before == ABC


# ---------------------------------------------------------------- ConfEntry


@pytest.mark.parametrize(
    "entry",
    [
        ConfEntry(
            ConfChange(ConfChangeType.ADD_VOTER, "d", b"\x00wss://d:7000\xff"),
            Membership.of(["a", "b", "c", "d"], ("l",)),
        ),
        ConfEntry(ConfChange(ConfChangeType.ADD_LEARNER, "m"), Membership.of(["a"], ("m",))),
        ConfEntry(ConfChange(ConfChangeType.PROMOTE, "m"), Membership.of(["a", "m"])),
        ConfEntry(ConfChange(ConfChangeType.REMOVE, "b"), Membership.of(["a", "c"])),
    ],
)
def test_conf_entry_encode_decode_round_trips(entry: ConfEntry) -> None:
    data = entry.encode()
    assert isinstance(data, bytes)
    assert ConfEntry.decode(data) == entry


def test_conf_entry_encoding_does_not_depend_on_set_order() -> None:
    one = ConfEntry(ConfChange(ConfChangeType.REMOVE, "x"), Membership.of(["c", "a", "b"]))
    two = ConfEntry(ConfChange(ConfChangeType.REMOVE, "x"), Membership.of(["b", "c", "a"]))
    assert one.encode() == two.encode()


# ---------------------------------------------------------------- Membership


@pytest.mark.parametrize(
    ("voters", "quorum"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (7, 4)]
)
def test_quorum_is_a_strict_majority_of_voters(voters: int, quorum: int) -> None:
    ms = Membership.of([f"n{i}" for i in range(voters)])
    assert ms.quorum() == quorum


def test_quorum_does_not_count_learners() -> None:
    assert Membership.of(["a", "b", "c"], ("l1", "l2", "l3")).quorum() == 2


def test_members_are_voters_and_learners() -> None:
    assert ABC.members == frozenset({"a", "b", "c", "l"})


def test_a_node_that_is_both_voter_and_learner_is_refused() -> None:
    with pytest.raises(ValueError):
        Membership(frozenset({"a", "b"}), frozenset({"b"}))
    with pytest.raises(ValueError):
        Membership.of(["a"], ("a",))
