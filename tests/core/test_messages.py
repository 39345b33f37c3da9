"""validate(): a peer's message is refused at the edge if it breaks the core's invariants."""

from __future__ import annotations

import dataclasses

import pytest

from liferaft.core import (
    AnyMessage,
    AppendEntries,
    AppendResponse,
    Entry,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    MalformedMessage,
    Membership,
    ReadIndexRequest,
    ReadIndexResponse,
    SnapshotMeta,
    SnapshotResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
    validate,
)

META = SnapshotMeta(index=10, term=2, membership=Membership.of(["a", "b", "c"]))


def append(prev_index: int = 4, prev_term: int = 2, *terms: int, term: int = 3) -> AppendEntries:
    entries = tuple(Entry(prev_index + 1 + n, t) for n, t in enumerate(terms))
    return AppendEntries(
        term=term,
        src="a",
        dst="b",
        prev_index=prev_index,
        prev_term=prev_term,
        entries=entries,
        commit=2,
    )


GOOD: list[AnyMessage] = [
    VoteRequest(term=3, src="a", dst="b", last_index=7, last_term=2),
    VoteRequest(term=4, src="a", dst="b", last_index=0, last_term=0, pre_vote=True),
    VoteResponse(term=3, src="b", dst="a", granted=True),
    append(),  # a heartbeat-like empty append
    append(4, 2, 2, 2, 3, 3),
    append(0, 0, 1, 1),
    AppendResponse(term=3, src="b", dst="a", success=True, index=7),
    AppendResponse(term=3, src="b", dst="a", success=False, index=7, hint_index=5, hint_term=2),
    Heartbeat(term=3, src="a", dst="b", commit=5, read_round=2),
    HeartbeatResponse(term=3, src="b", dst="a", read_round=2),
    InstallSnapshot(term=3, src="a", dst="b", meta=META, offset=0, data=b"xyz", done=True),
    SnapshotResponse(term=3, src="b", dst="a", index=10, next_offset=3, done=False),
    TimeoutNow(term=3, src="a", dst="b"),
    ReadIndexRequest(term=3, src="b", dst="a", ctx=b"r1"),
    ReadIndexResponse(term=3, src="a", dst="b", ctx=b"r1", index=5, ok=True),
]


@pytest.mark.parametrize("msg", GOOD, ids=lambda m: type(m).__name__)
def test_validate_accepts_a_well_formed_message(msg: AnyMessage) -> None:
    validate(msg)


def test_validate_accepts_term_zero() -> None:
    validate(VoteResponse(term=0, src="b", dst="a", granted=False))


# ---------------------------------------------------------------- AppendEntries


def test_validate_rejects_entries_with_a_gap() -> None:
    m = dataclasses.replace(append(), entries=(Entry(5, 3), Entry(7, 3)))
    with pytest.raises(MalformedMessage):
        validate(m)


def test_validate_rejects_entries_that_do_not_start_right_after_prev_index() -> None:
    m = dataclasses.replace(append(), entries=(Entry(6, 3), Entry(7, 3)))
    with pytest.raises(MalformedMessage):
        validate(m)


def test_validate_rejects_entries_repeating_an_index() -> None:
    m = dataclasses.replace(append(), entries=(Entry(5, 3), Entry(5, 3)))
    with pytest.raises(MalformedMessage):
        validate(m)


def test_validate_rejects_an_entry_whose_term_exceeds_the_message_term() -> None:
    with pytest.raises(MalformedMessage):
        validate(append(4, 2, 3, 4, term=3))


def test_validate_rejects_entry_terms_that_decrease() -> None:
    with pytest.raises(MalformedMessage):
        validate(append(4, 1, 3, 2))


def test_validate_rejects_an_entry_term_below_prev_term() -> None:
    with pytest.raises(MalformedMessage):
        validate(append(4, 3, 2, term=3))


# ---------------------------------------------------------------- negative fields


@pytest.mark.parametrize(
    "msg",
    [
        VoteRequest(term=-1, src="a", dst="b", last_index=0, last_term=0),
        VoteRequest(term=3, src="a", dst="b", last_index=-1, last_term=0),
        VoteRequest(term=3, src="a", dst="b", last_index=0, last_term=-1),
        dataclasses.replace(append(), prev_index=-1),
        dataclasses.replace(append(), prev_term=-1),
        dataclasses.replace(append(), commit=-1),
        AppendResponse(term=3, src="b", dst="a", success=True, index=-1),
        Heartbeat(term=3, src="a", dst="b", commit=-5),
        InstallSnapshot(term=3, src="a", dst="b", meta=META, offset=-1, data=b"", done=False),
        InstallSnapshot(
            term=3,
            src="a",
            dst="b",
            meta=dataclasses.replace(META, index=-1),
            offset=0,
            data=b"",
            done=False,
        ),
        InstallSnapshot(
            term=3,
            src="a",
            dst="b",
            meta=dataclasses.replace(META, term=-1),
            offset=0,
            data=b"",
            done=False,
        ),
        SnapshotResponse(term=3, src="b", dst="a", index=-1, next_offset=0, done=False),
        SnapshotResponse(term=3, src="b", dst="a", index=10, next_offset=-1, done=False),
        ReadIndexResponse(term=3, src="a", dst="b", ctx=b"", index=-1, ok=True),
    ],
    ids=lambda m: type(m).__name__,
)
def test_validate_rejects_a_negative_field(msg: AnyMessage) -> None:
    with pytest.raises(MalformedMessage):
        validate(msg)


# ---------------------------------------------------------------- node ids


@pytest.mark.parametrize("msg", GOOD, ids=lambda m: type(m).__name__)
def test_validate_rejects_an_empty_src(msg: AnyMessage) -> None:
    with pytest.raises(MalformedMessage):
        validate(dataclasses.replace(msg, src=""))


@pytest.mark.parametrize("msg", GOOD, ids=lambda m: type(m).__name__)
def test_validate_rejects_an_empty_dst(msg: AnyMessage) -> None:
    with pytest.raises(MalformedMessage):
        validate(dataclasses.replace(msg, dst=""))


def test_malformed_message_is_a_value_error() -> None:
    assert issubclass(MalformedMessage, ValueError)
