"""The sans-I/O Raft core: no trio, sockets, files, clocks, threads or global random.

The shell feeds it ``tick``/``step``/``propose``/``read_index`` and carries out each
``Ready`` (persist, send, apply) before calling ``advance``. See docs/core.md.
"""

from liferaft.core.config import RaftConfig
from liferaft.core.errors import NotLeader, ProposalRefused, RaftError, UsageError
from liferaft.core.membership import ConfChange, ConfChangeType, ConfEntry, Membership
from liferaft.core.messages import (
    AnyMessage,
    AppendEntries,
    AppendResponse,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    MalformedMessage,
    ReadIndexRequest,
    ReadIndexResponse,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SnapshotResponse,
    SoftState,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
    validate,
)
from liferaft.core.progress import ProgressState
from liferaft.core.raft import PeerStatus, Raft, Restored, Status

__all__ = [
    "AnyMessage",
    "AppendEntries",
    "AppendResponse",
    "ConfChange",
    "ConfChangeType",
    "ConfEntry",
    "Entry",
    "EntryKind",
    "HardState",
    "Heartbeat",
    "HeartbeatResponse",
    "InstallSnapshot",
    "MalformedMessage",
    "Membership",
    "NotLeader",
    "PeerStatus",
    "ProgressState",
    "ProposalRefused",
    "Raft",
    "RaftConfig",
    "RaftError",
    "ReadIndexRequest",
    "ReadIndexResponse",
    "ReadState",
    "Ready",
    "Restored",
    "Role",
    "Snapshot",
    "SnapshotMeta",
    "SnapshotResponse",
    "SoftState",
    "Status",
    "TimeoutNow",
    "UsageError",
    "VoteRequest",
    "VoteResponse",
    "validate",
]
