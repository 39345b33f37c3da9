"""The nospace alarm's rule (node/space.py): raised below the reserve, cleared only at
twice the reserve, and read again early when writes come in fast."""

from __future__ import annotations

from liferaft.node.space import (
    MIN_BUDGET,
    RESERVE_MAX,
    WRITING_SECONDS,
    SpaceAlarm,
    reserve_bytes,
)

MiB = 1024 * 1024


def test_the_reserve_is_five_percent_at_most_64_mib() -> None:
    assert reserve_bytes(100 * MiB) == 5 * MiB
    assert reserve_bytes(100_000 * MiB) == RESERVE_MAX == 64 * MiB


def test_raised_below_the_reserve_and_cleared_only_at_twice_it() -> None:
    alarm, total = SpaceAlarm(), 100 * MiB  # reserve 5 MiB
    assert alarm.update(6 * MiB, total, 0.0) is None and not alarm.raised
    assert alarm.update(4 * MiB, total, 0.0) == "raised" and alarm.raised
    assert alarm.update(4 * MiB, total, 0.0) is None
    assert alarm.update(9 * MiB, total, 0.0) is None and alarm.raised  # no flapping
    assert alarm.update(10 * MiB, total, 0.0) == "cleared" and not alarm.raised


def test_writes_ask_for_a_reading_after_their_budget_or_a_short_while() -> None:
    alarm, total = SpaceAlarm(), 100 * MiB
    alarm.update(5 * MiB + 128 * MiB, total, 10.0)  # 128 MiB above the reserve: budget 2 MiB
    assert not alarm.wrote(MiB, 10.0)
    assert alarm.wrote(MiB + 1, 10.0)  # past 1/64 of the room: read now
    alarm.update(5 * MiB + 100, total, 10.0)  # nearly at the reserve: the smallest budget
    assert not alarm.wrote(MIN_BUDGET - 1, 10.0)
    assert alarm.wrote(2, 10.0)
    alarm.update(100 * MiB, total, 20.0)
    assert not alarm.wrote(1, 20.0)
    assert alarm.wrote(1, 20.0 + WRITING_SECONDS)  # writing: a reading every so often
