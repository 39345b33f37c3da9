"""Flow control: the in-flight window and the leader's per-follower Progress."""

from __future__ import annotations

import pytest

from liferaft.core.progress import Inflights, Progress, ProgressState


def progress(state: ProgressState, *, match: int, next_index: int, max_count: int = 4) -> Progress:
    pr = Progress(next_index, Inflights(max_count, 1 << 20))
    pr.state = state
    pr.match = match
    return pr


# ---------------------------------------------------------------- Inflights


def test_inflights_are_full_at_the_message_count() -> None:
    inf = Inflights(max_count=3, max_bytes=1000)
    for i in range(1, 3):
        inf.add(i, 10)
        assert not inf.full()
    inf.add(3, 10)
    assert inf.full()
    assert len(inf) == 3


def test_inflights_are_full_at_the_byte_budget() -> None:
    inf = Inflights(max_count=100, max_bytes=100)
    inf.add(1, 60)
    assert not inf.full()
    inf.add(2, 40)  # exactly the budget
    assert inf.full()
    assert (len(inf), inf.bytes) == (2, 100)


def test_inflights_one_message_larger_than_the_budget_fills_the_window() -> None:
    inf = Inflights(max_count=100, max_bytes=100)
    inf.add(1, 500)
    assert inf.full()


def test_inflights_free_to_releases_every_message_up_to_the_index() -> None:
    inf = Inflights(max_count=10, max_bytes=1000)
    for last, size in [(3, 10), (5, 20), (9, 30), (12, 40)]:
        inf.add(last, size)
    inf.free_to(8)  # frees the appends ending at 3 and 5, not the one ending at 9
    assert (len(inf), inf.bytes) == (2, 70)
    inf.free_to(9)
    assert (len(inf), inf.bytes) == (1, 40)
    inf.free_to(2)  # stale acknowledgement: nothing to free
    assert (len(inf), inf.bytes) == (1, 40)
    inf.free_to(100)
    assert (len(inf), inf.bytes) == (0, 0)


def test_inflights_free_to_makes_a_full_window_not_full() -> None:
    inf = Inflights(max_count=2, max_bytes=1000)
    inf.add(1, 10)
    inf.add(2, 10)
    assert inf.full()
    inf.free_to(1)
    assert not inf.full()


def test_inflights_free_first_releases_the_oldest_message_only() -> None:
    inf = Inflights(max_count=2, max_bytes=1000)
    inf.add(4, 10)
    inf.add(8, 25)
    inf.free_first()
    assert (len(inf), inf.bytes) == (1, 25)
    assert not inf.full()
    inf.free_first()
    inf.free_first()  # on an empty window: harmless
    assert (len(inf), inf.bytes) == (0, 0)


def test_inflights_reset_empties_the_window() -> None:
    inf = Inflights(max_count=2, max_bytes=1000)
    inf.add(1, 10)
    inf.add(2, 10)
    inf.reset()
    assert (len(inf), inf.bytes, inf.full()) == (0, 0, False)


# ---------------------------------------------------------------- maybe_update


@pytest.mark.parametrize("state", [ProgressState.PROBE, ProgressState.REPLICATE])
def test_maybe_update_moves_match_and_next_forward(state: ProgressState) -> None:
    pr = progress(state, match=3, next_index=4)
    pr.probe_sent = True
    assert pr.maybe_update(7)
    assert (pr.match, pr.next) == (7, 8)
    assert not pr.probe_sent


@pytest.mark.parametrize("state", [ProgressState.PROBE, ProgressState.REPLICATE])
def test_maybe_update_ignores_a_stale_acknowledgement(state: ProgressState) -> None:
    pr = progress(state, match=7, next_index=12)
    pr.probe_sent = True
    assert not pr.maybe_update(5)
    assert not pr.maybe_update(7)
    assert (pr.match, pr.next) == (7, 12)  # next is never moved back by an ack
    assert pr.probe_sent


# ---------------------------------------------------------------- maybe_decrease_to


def test_probe_rejection_of_the_last_probe_moves_next_to_the_hint() -> None:
    pr = progress(ProgressState.PROBE, match=0, next_index=10)
    pr.probe_sent = True
    assert pr.maybe_decrease_to(9, match_hint=5)
    assert pr.next == 6
    assert not pr.probe_sent  # the next probe may go out


def test_probe_rejection_hint_above_the_rejected_index_decreases_by_one() -> None:
    pr = progress(ProgressState.PROBE, match=0, next_index=10)
    assert pr.maybe_decrease_to(9, match_hint=50)
    assert pr.next == 9


def test_probe_rejection_never_moves_next_to_or_below_match() -> None:
    pr = progress(ProgressState.PROBE, match=4, next_index=10)
    assert pr.maybe_decrease_to(9, match_hint=1)
    assert pr.next == 5


def test_probe_ignores_a_stale_rejection() -> None:
    pr = progress(ProgressState.PROBE, match=0, next_index=6)
    pr.probe_sent = True
    # A rejection of an earlier probe (prev_index 9) arrives after next moved to 6.
    assert not pr.maybe_decrease_to(9, match_hint=2)
    assert pr.next == 6
    assert pr.probe_sent


def test_replicate_rejection_above_match_falls_back_to_match_plus_one() -> None:
    pr = progress(ProgressState.REPLICATE, match=5, next_index=20)
    assert pr.maybe_decrease_to(12, match_hint=0)
    assert pr.next == 6


def test_replicate_ignores_a_rejection_at_or_below_match() -> None:
    pr = progress(ProgressState.REPLICATE, match=5, next_index=20)
    assert not pr.maybe_decrease_to(5, match_hint=0)
    assert not pr.maybe_decrease_to(3, match_hint=0)
    assert pr.next == 20


# ---------------------------------------------------------------- paused


def test_probe_is_paused_only_while_a_probe_is_outstanding() -> None:
    pr = progress(ProgressState.PROBE, match=0, next_index=1)
    assert not pr.paused()
    pr.probe_sent = True
    assert pr.paused()


def test_replicate_is_paused_only_while_the_window_is_full() -> None:
    pr = progress(ProgressState.REPLICATE, match=0, next_index=1, max_count=2)
    pr.probe_sent = True  # irrelevant in REPLICATE
    assert not pr.paused()
    pr.inflights.add(1, 10)
    assert not pr.paused()
    pr.inflights.add(2, 10)
    assert pr.paused()
    pr.inflights.free_to(1)
    assert not pr.paused()


def test_snapshot_is_always_paused() -> None:
    pr = progress(ProgressState.PROBE, match=0, next_index=1)
    pr.become_snapshot(50)
    assert pr.state is ProgressState.SNAPSHOT
    assert pr.paused()
    pr.snapshot_offset = 100
    assert pr.paused()


# ---------------------------------------------------------------- state changes


def test_become_probe_after_snapshot_resumes_after_the_snapshot() -> None:
    pr = progress(ProgressState.REPLICATE, match=3, next_index=9)
    pr.become_snapshot(40)
    pr.become_probe()
    assert pr.state is ProgressState.PROBE
    assert pr.next == 41
    assert not pr.paused()


def test_become_probe_after_snapshot_uses_match_when_it_is_further() -> None:
    pr = progress(ProgressState.PROBE, match=3, next_index=4)
    pr.become_snapshot(40)
    pr.maybe_update(45)
    pr.become_probe()
    assert pr.next == 46


def test_become_probe_from_replicate_restarts_after_match_and_empties_the_window() -> None:
    pr = progress(ProgressState.REPLICATE, match=3, next_index=9)
    pr.inflights.add(6, 10)
    pr.inflights.add(8, 10)
    pr.become_probe()
    assert (pr.state, pr.next, len(pr.inflights), pr.probe_sent) == (
        ProgressState.PROBE,
        4,
        0,
        False,
    )


def test_become_replicate_streams_from_match_plus_one() -> None:
    pr = progress(ProgressState.PROBE, match=7, next_index=3)
    pr.probe_sent = True
    pr.become_replicate()
    assert (pr.state, pr.next, pr.probe_sent) == (ProgressState.REPLICATE, 8, False)


def test_become_snapshot_records_the_snapshot_and_empties_the_window() -> None:
    pr = progress(ProgressState.REPLICATE, match=3, next_index=9)
    pr.inflights.add(8, 10)
    pr.snapshot_offset = 77
    pr.snapshot_stalled = True
    pr.become_snapshot(30)
    assert (pr.snapshot_index, pr.snapshot_offset, pr.snapshot_stalled) == (30, 0, False)
    assert len(pr.inflights) == 0
