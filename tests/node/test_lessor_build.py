"""A new leader's lease clock counts from every entry committed before it led
(node/lessor.py, ``_build``): a follower learns that its leader's last entries are
committed only with the next message, so when it is elected it may hold a renewal it
has not applied yet. The lessor is driven here against a stand-in node whose state
"applies" the renewal only once a read barrier has run, under Trio's MockClock."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio
import trio.testing

from liferaft.core import NotLeader, Role
from liferaft.node.lessor import Lessor

LEASE = 7
TTL_MS = 3000
STALE_LEFT_MS = 1000  # what an older checkpoint wrote; the renewal wrote TTL_MS back


class StandIn:
    """Just what the lessor asks of its node; ``read_index`` brings the state up to date
    (or fails, as on a node that lost its leadership meanwhile)."""

    def __init__(self, *, barrier_fails: bool = False) -> None:
        self.raft = SimpleNamespace(role=Role.LEADER, term=5, leader="n1")
        self.settings = SimpleNamespace(
            raft=SimpleNamespace(election_timeout_ms=300, heartbeat_interval_ms=50)
        )
        self.caught_up = False
        self.barriers = 0
        self.barrier_fails = barrier_fails
        self.kv = SimpleNamespace(read=self._read)

    async def read_index(self) -> int:
        self.barriers += 1
        await trio.sleep(0.01)  # the round trip and the first commit of the term
        if self.barrier_fails:
            raise NotLeader(None)
        self.caught_up = True
        return 10

    async def _read(self, fn: object) -> list[tuple[int, int, int]]:
        left = TTL_MS if self.caught_up else STALE_LEFT_MS
        return [(LEASE, TTL_MS, left)]


async def test_a_new_leader_counts_from_the_renewal_it_had_not_applied_when_elected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = StandIn()
    lessor = Lessor(node)  # type: ignore[arg-type]
    elected = trio.current_time()
    await lessor._build(5)
    assert node.barriers == 1
    seconds_left, granted = await lessor.time_to_live(LEASE)
    grace = 0.3
    # From the renewal's whole TTL (plus the election timeout), not the stale 1 s.
    assert lessor._deadline[LEASE] >= elected + TTL_MS / 1000 + grace
    assert (seconds_left, granted) == (4, 3)
    assert LEASE not in lessor._short


async def test_a_build_whose_barrier_fails_is_not_used_and_is_tried_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = StandIn(barrier_fails=True)
    lessor = Lessor(node)  # type: ignore[arg-type]
    await lessor._build(5)
    assert lessor._deadline == {}  # nothing counted from a state that may be stale
    with pytest.raises(trio.TooSlowError):  # keepalives wait for a build that holds
        await lessor.time_to_live(LEASE)
    node.barrier_fails = False
    await lessor._build(5)
    assert lessor._deadline[LEASE] >= trio.current_time() + TTL_MS / 1000
