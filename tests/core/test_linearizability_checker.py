"""The linearizability checker must accept what is linearizable and reject what is not,
or the end-to-end history checks prove nothing."""

from __future__ import annotations

from liferaft.testing.linearizability import Op, check


def put(c: int, v: bytes, start: float, end: float | None, key: str = "k") -> Op:
    return Op(c, "put", key, v, start, end)


def get(c: int, v: bytes | None, start: float, end: float | None, key: str = "k") -> Op:
    return Op(c, "get", key, v, start, end)


def test_a_sequential_history_is_linearizable() -> None:
    assert check([put(1, b"a", 0, 1), get(2, b"a", 2, 3), put(1, b"b", 4, 5), get(2, b"b", 6, 7)])


def test_a_stale_read_after_a_newer_write_completed_is_not() -> None:
    h = [put(1, b"v1", 0, 1), put(1, b"v2", 2, 3), get(2, b"v1", 4, 5)]
    verdict = check(h)
    assert not verdict and verdict.key == "k"


def test_a_read_concurrent_with_a_write_may_see_either_value() -> None:
    for seen in (None, b"v1"):
        assert check([put(1, b"v1", 0, 10), get(2, seen, 1, 2)])


def test_reads_cannot_go_back_in_time() -> None:
    # Both reads overlap the write, but once one read saw v1 a later one cannot miss it.
    assert not check([put(1, b"v1", 0, 10), get(2, b"v1", 1, 2), get(3, None, 3, 4)])


def test_a_write_of_unknown_outcome_may_or_may_not_have_happened() -> None:
    assert check([put(1, b"v1", 0, None), get(2, b"v1", 5, 6)])
    assert check([put(1, b"v1", 0, None), get(2, None, 5, 6)])
    assert not check([put(1, b"v1", 0, None), get(2, b"v1", 5, 6), get(2, None, 7, 8)])


def test_a_value_nobody_wrote_is_not_linearizable() -> None:
    assert not check([put(1, b"a", 0, 1), get(2, b"zzz", 2, 3)])


def test_keys_are_checked_independently() -> None:
    h = [put(1, b"a", 0, 1, key="x"), get(2, b"a", 2, 3, key="x"), get(3, None, 2, 3, key="y")]
    assert check(h)
    bad = [*h, put(1, b"b", 4, 5, key="y"), get(2, None, 6, 7, key="y")]
    verdict = check(bad)
    assert not verdict and verdict.key == "y"
