"""The compactor's guard (``applier._compact``): compaction runs in the core loop against
the core's own snapshot index, because the applier's view of it lags the core's. A
compaction decided before a snapshot install but run after it must be skipped, not
crash the node (issue: ``Raft.compact(N)`` after an installed snapshot at M > N raised
UsageError)."""

from __future__ import annotations

import random

import pytest

from liferaft.core import (
    InstallSnapshot,
    Membership,
    Raft,
    RaftConfig,
    Restored,
    SnapshotMeta,
    UsageError,
)
from liferaft.node.applier import _compact

ABC = Membership.of(["a", "b", "c"])


def follower_that_installed_a_snapshot_at(index: int) -> Raft:
    r = Raft(RaftConfig(id="b"), random.Random(1), Restored(initial_membership=ABC))
    r.step(
        InstallSnapshot(
            term=2,
            src="a",
            dst="b",
            meta=SnapshotMeta(index=index, term=2, membership=ABC),
            offset=0,
            data=b"",
            done=True,
        )
    )
    rd = r.ready()
    r.advance(rd)
    assert r.status().snapshot_index == index
    return r


def test_a_compaction_overtaken_by_an_installed_snapshot_is_skipped() -> None:
    r = follower_that_installed_a_snapshot_at(20)
    with pytest.raises(UsageError):  # what the compactor used to call, unguarded
        r.compact(10, b"")
    assert _compact(r, index=10, data=b"") is None
    assert _compact(r, index=20, data=b"") is None  # the log starts there already
    assert r.status().snapshot_index == 20


def test_a_compaction_past_what_was_applied_is_skipped() -> None:
    r = follower_that_installed_a_snapshot_at(20)
    assert _compact(r, index=25, data=b"") is None
