"""When a node believes it was removed (node/removal.py): from the committed changes it
applies, and from a peer's 410 only if its own newest configuration is older and still
holds it; and what it tells others."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from liferaft.node.removal import NodeRemoved, Removal


def test_an_applied_removal_is_remembered_with_its_index_until_the_id_is_added_back() -> None:
    r = Removal("n1", {"n1", "n2", "n3"})
    r.applied_config(10, {"n1", "n2"}, in_newest=True)
    assert r.removed_at("n3") == 10 and r.removed_at("n2") is None
    r.applied_config(20, {"n1", "n2", "n3"}, in_newest=True)  # added again
    assert r.removed_at("n3") is None
    r.applied_config(30, {"n1", "n3"}, in_newest=True)
    assert r.removed_at("n2") == 30
    r.reset({"n1", "n3"})  # a snapshot: what came before it is unknown
    assert r.removed_at("n2") is None
    assert r.why is None


def test_a_node_that_applies_its_own_removal_stops_unless_its_log_adds_it_back() -> None:
    back = Removal("n3", {"n1", "n2", "n3"})
    back.applied_config(10, {"n1", "n2"}, in_newest=True)  # a later entry holds it again
    assert back.why is None
    gone = Removal("n3", {"n1", "n2", "n3"})
    gone.applied_config(10, {"n1", "n2"}, in_newest=False)
    assert gone.why is not None and "index 10" in gone.why


def test_a_joining_node_replaying_old_changes_does_not_stop() -> None:
    """It was never in the configurations it applies before its own addition."""
    r = Removal("n4", ())
    r.applied_config(5, {"n1", "n2", "n3"}, in_newest=False)
    r.applied_config(9, {"n1", "n2"}, in_newest=False)
    assert r.why is None and r.removed_at("n3") == 9


def test_a_peers_claim_is_believed_only_against_an_older_configuration_holding_this_node() -> None:
    r = Removal("n3", {"n1", "n2", "n3"})
    # Its newest configuration does not hold it: a node still joining (or re-added
    # under the old name, fresh): the peer has not applied the addition yet.
    assert not r.told("n1", 42, member_now=False, config_index=0)
    # Its newest configuration is the removal's or newer: added back since.
    assert not r.told("n1", 42, member_now=True, config_index=42)
    assert not r.told("n1", 42, member_now=True, config_index=57)
    assert r.why is None
    assert r.told("n1", 42, member_now=True, config_index=7)
    assert r.why is not None and "n1" in r.why and "index 42" in r.why


async def test_watch_raises_node_removed_once_the_node_knows() -> None:
    r = Removal("n3", {"n1", "n2", "n3"})
    with pytest.RaisesGroup(pytest.RaisesExc(NodeRemoved, match="index 42")):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.watch)
            await trio.testing.wait_all_tasks_blocked()
            r.told("n1", 42, member_now=True, config_index=7)
