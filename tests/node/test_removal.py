"""When a node believes it was removed (node/removal.py): a majority of the other voters
of its newest configuration, older than the removal and still holding it, must say so
while no leader talks to it; and what it tells others, from the changes it applied."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from liferaft.node.removal import CLAIM_SECONDS, NodeRemoved, Removal

VOTERS = {"n1", "n2", "n3"}


def tell(r: Removal, by: str, index: int = 42, **kw: object) -> bool:
    args: dict[str, object] = {
        "now": 100.0,
        "voters": VOTERS,
        "member_now": True,
        "config_index": 7,
        "leader_heard": False,
    }
    args.update(kw)
    return r.told(by, index, **args)  # type: ignore[arg-type]


def test_an_applied_removal_is_remembered_with_its_index_until_the_id_is_added_back() -> None:
    r = Removal("n1", {"n1", "n2", "n3"})
    r.applied_config(10, {"n1", "n2"})
    assert r.removed_at("n3") == 10 and r.removed_at("n2") is None
    r.applied_config(20, {"n1", "n2", "n3"})  # added again
    assert r.removed_at("n3") is None
    r.applied_config(30, {"n1", "n3"})
    assert r.removed_at("n2") == 30
    r.reset({"n1", "n3"})  # a snapshot: what came before it is unknown
    assert r.removed_at("n2") is None


def test_a_majority_of_the_other_voters_must_say_so() -> None:
    r = Removal("n3", VOTERS)
    assert not tell(r, "n1")  # one of two others: a member that is behind, maybe
    assert not tell(r, "n1")  # the same one again
    assert r.why is None
    assert tell(r, "n2")
    assert r.why is not None and "n1, n2" in r.why and "index 42" in r.why


def test_claims_older_than_the_window_do_not_count() -> None:
    r = Removal("n3", VOTERS)
    tell(r, "n1", now=100.0)
    assert not tell(r, "n2", now=100.0 + CLAIM_SECONDS + 1)
    assert tell(r, "n1", now=100.0 + CLAIM_SECONDS + 2)


def test_no_claim_counts_while_a_leader_talks_to_it_or_it_holds_a_newer_configuration() -> None:
    """A leader that replicates to it holds it; a newer configuration of its own, or one
    without it (it is joining), means it was added (back) after that removal."""
    r = Removal("n3", VOTERS)
    tell(r, "n1")
    assert not tell(r, "n2", leader_heard=True)
    assert not tell(r, "n2", member_now=False)
    assert not tell(r, "n2", config_index=42)
    assert not tell(r, "n2", config_index=57)
    assert r.why is None
    assert tell(r, "n2")  # none of those any more


def test_in_a_pair_the_other_voter_alone_is_the_majority() -> None:
    r = Removal("n2", {"n1", "n2"})
    assert tell(r, "n1", voters={"n1", "n2"})


async def test_watch_raises_node_removed_once_the_node_knows() -> None:
    r = Removal("n3", VOTERS)
    with pytest.RaisesGroup(pytest.RaisesExc(NodeRemoved, match="index 42")):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.watch)
            await trio.testing.wait_all_tasks_blocked()
            tell(r, "n1")
            tell(r, "n2")
