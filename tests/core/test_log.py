"""RaftLog: the in-memory log since the last snapshot and its persistence bookkeeping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from liferaft.core import Entry, UsageError
from liferaft.core.log import RaftLog


def ents(start: int, *terms: int) -> list[Entry]:
    """Entries at ``start``, ``start + 1``, ... with the given terms."""
    return [Entry(start + n, t, data=b"%d" % (start + n)) for n, t in enumerate(terms)]


def log_of(*terms: int, snapshot: tuple[int, int] = (0, 0), committed: int = 0) -> RaftLog:
    """A log restored from storage: snapshot at ``snapshot`` and then entries of ``terms``."""
    index, term = snapshot
    return RaftLog(index, term, ents(index + 1, *terms), committed)


def terms_of(log: RaftLog) -> list[int]:
    return [e.term for e in log.entries]


# ---------------------------------------------------------------- term()


def test_term_at_the_snapshot_index_is_the_snapshot_term() -> None:
    log = log_of(3, 3, snapshot=(5, 2))
    assert log.term(5) == 2


def test_term_below_the_snapshot_index_is_unknown() -> None:
    log = log_of(3, 3, snapshot=(5, 2))
    assert log.term(4) is None
    assert log.term(0) is None


def test_term_beyond_the_last_index_is_unknown() -> None:
    log = log_of(3, 3, snapshot=(5, 2))
    assert log.last_index == 7
    assert log.term(8) is None


def test_term_of_an_entry_in_the_log_is_its_term() -> None:
    log = log_of(3, 4, snapshot=(5, 2))
    assert (log.term(6), log.term(7)) == (3, 4)


def test_an_empty_log_has_term_zero_at_index_zero() -> None:
    log = RaftLog()
    assert (log.first_index, log.last_index, log.last_term) == (1, 0, 0)
    assert log.term(0) == 0
    assert log.term(1) is None


# ---------------------------------------------------------------- append()


def test_entries_restored_from_storage_are_stable() -> None:
    log = log_of(1, 1, 2)
    assert log.stable == 3
    assert log.unstable_from == 4
    assert log.unstable_entries() == []


def test_append_at_the_end_makes_the_new_entries_unstable() -> None:
    log = log_of(1, 1)
    log.append(ents(3, 2, 2))
    assert terms_of(log) == [1, 1, 2, 2]
    assert log.stable == 2
    assert log.unstable_from == 3
    assert log.unstable_entries() == ents(3, 2, 2)


def test_append_truncates_a_conflicting_suffix() -> None:
    log = log_of(1, 1, 2, 2, 2)
    log.append(ents(3, 3))
    assert terms_of(log) == [1, 1, 3]
    assert log.last_index == 3
    assert log.entry(3) == Entry(3, 3, data=b"3")


def test_append_truncation_moves_unstable_from_and_stable_back() -> None:
    log = log_of(1, 1, 2, 2, 2)  # all five stable
    assert (log.stable, log.unstable_from) == (5, 6)
    log.append(ents(3, 3, 3))
    assert (log.stable, log.unstable_from) == (2, 3)
    assert log.unstable_entries() == ents(3, 3, 3)


def test_append_truncation_does_not_move_unstable_from_forward() -> None:
    log = log_of(1)
    log.append(ents(2, 1, 1, 1))  # 2..4 unstable
    log.append(ents(4, 2))  # replaces 4 only
    assert log.unstable_from == 2
    assert log.stable == 1
    assert [e.index for e in log.unstable_entries()] == [2, 3, 4]


def test_stable_to_marks_entries_durable() -> None:
    log = log_of(1)
    log.append(ents(2, 1, 1, 1))
    log.stable_to(3)
    assert (log.stable, log.unstable_from) == (3, 4)
    assert log.unstable_entries() == ents(4, 1)


def test_append_refuses_to_truncate_a_committed_entry() -> None:
    log = log_of(1, 1, 2, 2, committed=3)
    with pytest.raises(UsageError):
        log.append(ents(3, 3))
    assert terms_of(log) == [1, 1, 2, 2]  # unchanged
    log.append(ents(4, 3))  # just after the commit index is fine
    assert terms_of(log) == [1, 1, 2, 3]


def test_append_refuses_a_gap_after_the_last_entry() -> None:
    log = log_of(1, 1)
    with pytest.raises(UsageError):
        log.append(ents(4, 1))
    assert log.last_index == 2


def test_append_of_nothing_changes_nothing() -> None:
    log = log_of(1, 1, committed=2)
    log.append([])
    assert (terms_of(log), log.stable, log.unstable_from) == ([1, 1], 2, 3)


# ---------------------------------------------------------------- find_conflict()


def test_find_conflict_is_zero_when_every_entry_matches() -> None:
    log = log_of(1, 1, 2, 2)
    assert log.find_conflict(ents(2, 1, 2, 2)) == 0
    assert log.find_conflict([]) == 0


def test_find_conflict_is_the_first_entry_whose_term_differs() -> None:
    log = log_of(1, 1, 2, 2)
    assert log.find_conflict(ents(2, 1, 3, 3)) == 3


def test_find_conflict_is_the_first_new_entry_when_none_differs() -> None:
    log = log_of(1, 1, 2, 2)
    assert log.find_conflict(ents(3, 2, 2, 2, 2)) == 5


# ---------------------------------------------------------------- find_conflict_by_term()

FIG_TERMS = (1, 1, 1, 4, 4, 5, 5, 6, 6, 6)


@pytest.mark.parametrize(
    ("index", "term", "expected"),
    [
        (10, 5, (7, 5)),  # skips the whole of term 6 in one step
        (10, 6, (10, 6)),
        (10, 4, (5, 4)),
        (10, 3, (3, 1)),
        (10, 1, (3, 1)),
        (10, 0, (0, 0)),
        (6, 4, (5, 4)),
        (15, 5, (7, 5)),  # beyond the end: starts from the last entry
        (0, 5, (0, 0)),
    ],
)
def test_find_conflict_by_term_is_the_last_index_at_or_below_whose_term_is_not_above(
    index: int, term: int, expected: tuple[int, int]
) -> None:
    log = log_of(*FIG_TERMS)
    assert log.find_conflict_by_term(index, term) == expected


def test_find_conflict_by_term_stops_at_the_snapshot_boundary() -> None:
    # Same terms as above, with indexes 1..3 (term 1) compacted into a snapshot.
    log = log_of(*FIG_TERMS[3:], snapshot=(3, 1))
    assert log.find_conflict_by_term(10, 5) == (7, 5)
    assert log.find_conflict_by_term(10, 3) == (3, 1)  # the snapshot's own position
    assert log.find_conflict_by_term(3, 1) == (3, 1)
    assert log.find_conflict_by_term(2, 1) == (2, 0)  # compacted: term unknown


# ---------------------------------------------------------------- is_up_to_date()


def test_is_up_to_date_a_later_last_term_wins_even_with_a_shorter_log() -> None:
    log = log_of(1, 1, 2, 2, 2)
    assert log.is_up_to_date(last_index=1, last_term=3)


def test_is_up_to_date_an_earlier_last_term_loses_even_with_a_longer_log() -> None:
    log = log_of(1, 1, 2, 2, 2)
    assert not log.is_up_to_date(last_index=100, last_term=1)


def test_is_up_to_date_with_the_same_last_term_the_longer_or_equal_log_wins() -> None:
    log = log_of(1, 1, 2, 2, 2)
    assert log.is_up_to_date(last_index=6, last_term=2)
    assert log.is_up_to_date(last_index=5, last_term=2)
    assert not log.is_up_to_date(last_index=4, last_term=2)


def test_is_up_to_date_compares_with_the_snapshot_when_the_log_is_empty() -> None:
    log = RaftLog(7, 3)
    assert log.is_up_to_date(last_index=7, last_term=3)
    assert not log.is_up_to_date(last_index=6, last_term=3)
    assert not log.is_up_to_date(last_index=9, last_term=2)


# ---------------------------------------------------------------- commit_to()


def test_commit_to_moves_the_commit_index_forward_only() -> None:
    log = log_of(1, 1, 1)
    assert log.commit_to(2)
    assert not log.commit_to(1)
    assert not log.commit_to(2)
    assert log.committed == 2


def test_commit_to_beyond_the_last_index_raises() -> None:
    log = log_of(1, 1, 1)
    with pytest.raises(UsageError):
        log.commit_to(4)
    assert log.committed == 0


# ---------------------------------------------------------------- compact() / restore()


def test_compact_drops_the_prefix_and_remembers_its_last_term() -> None:
    log = log_of(1, 1, 2, 2, 3, committed=4)
    log.applied = 4
    log.compact(3)
    assert (log.snapshot_index, log.snapshot_term) == (3, 2)
    assert log.first_index == 4
    assert terms_of(log) == [2, 3]
    assert log.term(3) == 2
    assert log.term(2) is None
    log.check()


def test_compact_at_or_below_the_snapshot_does_nothing() -> None:
    log = log_of(2, 2, snapshot=(3, 1), committed=5)
    log.applied = 5
    log.compact(3)
    log.compact(1)
    assert (log.snapshot_index, log.last_index) == (3, 5)


def test_compact_beyond_the_applied_index_raises() -> None:
    log = log_of(1, 1, 2, committed=3)
    log.applied = 2
    with pytest.raises(UsageError):
        log.compact(3)
    assert log.snapshot_index == 0


def test_compact_beyond_the_stable_index_raises() -> None:
    log = log_of(1)
    log.append(ents(2, 1, 1))  # 2..3 not yet durable
    log.commit_to(3)
    log.applied = 3
    with pytest.raises(UsageError):
        log.compact(2)


def test_restore_replaces_the_whole_log_with_the_snapshot_position() -> None:
    log = log_of(1, 1, 2, committed=1)
    log.append(ents(4, 2))
    log.restore(10, 4)
    assert log.entries == []
    assert (log.snapshot_index, log.snapshot_term) == (10, 4)
    assert (log.committed, log.applied, log.stable, log.unstable_from) == (10, 10, 10, 11)
    assert (log.last_index, log.last_term, log.term(10)) == (10, 4, 4)
    assert log.unstable_entries() == []
    log.check()


# ---------------------------------------------------------------- slice()


def test_slice_returns_the_half_open_range() -> None:
    log = log_of(1, 1, 2, 2, snapshot=(2, 1))  # entries 3..6
    assert [e.index for e in log.slice(4, 6)] == [4, 5]
    assert [e.index for e in log.slice(3, 7)] == [3, 4, 5, 6]
    assert log.slice(5, 5) == []


def test_slice_outside_the_log_raises() -> None:
    log = log_of(1, 1, 2, 2, snapshot=(2, 1))
    with pytest.raises(UsageError):
        log.slice(2, 4)  # compacted
    with pytest.raises(UsageError):
        log.slice(3, 8)  # beyond the end


def test_slice_with_max_bytes_stops_before_exceeding_it() -> None:
    log = RaftLog(0, 0, [Entry(i, 1, data=b"x" * 4) for i in range(1, 6)])  # 20 bytes each
    assert len(log.slice(1, 6, max_bytes=59)) == 2
    assert len(log.slice(1, 6, max_bytes=60)) == 3
    assert len(log.slice(1, 6, max_bytes=10_000)) == 5


def test_slice_with_max_bytes_returns_at_least_one_entry() -> None:
    log = RaftLog(0, 0, [Entry(1, 1, data=b"x" * 1000), Entry(2, 1)])
    assert log.slice(1, 3, max_bytes=1) == [log.entry(1)]


# ---------------------------------------------------------------- check()


def test_check_refuses_non_contiguous_entries() -> None:
    with pytest.raises(UsageError):
        RaftLog(0, 0, [Entry(1, 1), Entry(3, 1)])
    with pytest.raises(UsageError):
        RaftLog(5, 1, [Entry(5, 1)])


def test_check_refuses_a_commit_index_beyond_the_last_entry() -> None:
    with pytest.raises(UsageError):
        RaftLog(0, 0, ents(1, 1, 1), committed=3 + 1)


# ---------------------------------------------------------------- property


@settings(derandomize=True, max_examples=150, deadline=None, database=None)
@given(st.data())
def test_any_sequence_of_valid_appends_keeps_the_log_contiguous_and_consistent(
    data: st.DataObject,
) -> None:
    snap_index = data.draw(st.integers(0, 5), label="snapshot index")
    log = RaftLog(snap_index, 1 if snap_index else 0)
    model: dict[int, Entry] = {}  # what the log should hold, by index
    for _ in range(data.draw(st.integers(1, 25), label="steps")):
        action = data.draw(st.sampled_from(["append", "append", "commit", "stable"]))
        if action == "append":
            at = data.draw(st.integers(log.committed + 1, log.last_index + 1), label="at")
            prev_term = log.term(at - 1)
            assert prev_term is not None
            n = data.draw(st.integers(1, 4), label="count")
            bumps = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
            new: list[Entry] = []
            term = prev_term
            for k, bump in enumerate(bumps):
                term += bump
                new.append(Entry(at + k, term, data=bytes([k])))
            committed_before = log.slice(log.first_index, log.committed + 1)
            log.append(new)
            assert log.slice(log.first_index, log.committed + 1) == committed_before
            for i in [i for i in model if i >= at]:
                del model[i]
            model.update((e.index, e) for e in new)
            assert log.unstable_from <= at
        elif action == "commit":
            log.commit_to(data.draw(st.integers(log.committed, log.last_index), label="commit"))
        else:
            log.stable_to(data.draw(st.integers(log.stable, log.last_index), label="stable"))

        log.check()
        assert [e.index for e in log.entries] == list(range(log.first_index, log.last_index + 1))
        assert log.entries == [model[i] for i in sorted(model)]
        assert log.stable <= log.last_index
        assert log.unstable_from == log.stable + 1
        assert log.unstable_entries() == log.entries[log.stable - snap_index :]
        terms = [e.term for e in log.entries]
        assert terms == sorted(terms)
