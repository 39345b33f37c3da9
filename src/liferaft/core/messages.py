"""The values the Raft core takes and hands back: entries, hard state, snapshots, messages.

Every value is a frozen, slotted dataclass so that a message cannot change after it was
handed to the shell, and so that the simulator can keep references without copying.
The wire encoding lives in the transport; here we only say what the fields mean and
which combinations are well formed (``validate``), so that bad bytes from a peer are
refused at the edge instead of corrupting the core.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from liferaft.core.membership import Membership

NodeId = str


class EntryKind(enum.IntEnum):
    """What an entry carries; the core interprets only CONFIG and NOOP."""

    NORMAL = 0  # opaque client command, applied by the state machine
    NOOP = 1  # appended by each new leader to commit an entry of its own term
    CONFIG = 2  # a membership change; data is an encoded ConfChange (see membership.py)


@dataclass(frozen=True, slots=True)
class Entry:
    index: int
    term: int
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""

    def size(self) -> int:
        """Bytes this entry counts for in flow control (payload plus a fixed overhead)."""
        return len(self.data) + 16


@dataclass(frozen=True, slots=True)
class HardState:
    """What must survive a crash: the term, the vote in it, and (as a hint) the commit."""

    term: int = 0
    vote: NodeId | None = None
    commit: int = 0


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """The position a snapshot stands for and the membership in force there."""

    index: int
    term: int
    membership: Membership


@dataclass(frozen=True, slots=True)
class Snapshot:
    meta: SnapshotMeta
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Fields common to every Raft message."""

    term: int
    src: NodeId
    dst: NodeId


@dataclass(frozen=True, slots=True, kw_only=True)
class VoteRequest(Message):
    """RequestVote; ``pre_vote`` asks "would you vote for me at ``term``?" without
    anyone changing term, ``transfer`` marks a campaign started by TimeoutNow, which
    voters honour even while they still hear from a leader."""

    last_index: int
    last_term: int
    pre_vote: bool = False
    transfer: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class VoteResponse(Message):
    granted: bool
    pre_vote: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendEntries(Message):
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendResponse(Message):
    """``index`` is the follower's last matching index on success, or the rejected
    ``prev_index`` on failure; then ``hint_index``/``hint_term`` point at the follower's
    last entry whose term is not above the rejected one (fast back-off, one term per
    round trip instead of one entry)."""

    success: bool
    index: int
    hint_index: int = 0
    hint_term: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Message):
    """Keeps followers from campaigning; ``read_round`` confirms leadership for reads."""

    commit: int
    read_round: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatResponse(Message):
    read_round: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallSnapshot(Message):
    """One chunk of the leader's snapshot, starting at byte ``offset`` of its data."""

    meta: SnapshotMeta
    offset: int
    data: bytes
    done: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotResponse(Message):
    """``next_offset`` is the byte the follower wants next; ``done`` that it installed
    (or already had) the snapshot at ``index``."""

    index: int
    next_offset: int
    done: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutNow(Message):
    """Leadership transfer: the receiver campaigns at once."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadIndexRequest(Message):
    """A follower asks the leader for a read index on behalf of its client."""

    ctx: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadIndexResponse(Message):
    ctx: bytes
    index: int
    ok: bool


AnyMessage = (
    VoteRequest
    | VoteResponse
    | AppendEntries
    | AppendResponse
    | Heartbeat
    | HeartbeatResponse
    | InstallSnapshot
    | SnapshotResponse
    | TimeoutNow
    | ReadIndexRequest
    | ReadIndexResponse
)

MESSAGE_TYPES: tuple[type[Message], ...] = (
    VoteRequest,
    VoteResponse,
    AppendEntries,
    AppendResponse,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    SnapshotResponse,
    TimeoutNow,
    ReadIndexRequest,
    ReadIndexResponse,
)


class MalformedMessage(ValueError):
    """A message from outside breaks an invariant the core relies on."""


def validate(msg: Message) -> None:
    """Check the invariants the core assumes of a peer's message; raise MalformedMessage.

    Types are the codec's job; this checks relations between fields.
    """
    if msg.term < 0:
        raise MalformedMessage("negative term")
    if not msg.src or not msg.dst:
        raise MalformedMessage("empty node id")
    for name in ("last_index", "last_term", "prev_index", "prev_term", "index", "commit"):
        value = getattr(msg, name, 0)
        if value < 0:
            raise MalformedMessage(f"negative {name}")
    if isinstance(msg, AppendEntries):
        expected = msg.prev_index + 1
        prev_term = msg.prev_term
        for e in msg.entries:
            if e.index != expected:
                raise MalformedMessage("entries are not contiguous after prev_index")
            if e.term < prev_term or e.term > msg.term:
                raise MalformedMessage("entry terms out of order")
            expected += 1
            prev_term = e.term
    elif isinstance(msg, InstallSnapshot):
        if msg.offset < 0 or msg.meta.index < 0 or msg.meta.term < 0:
            raise MalformedMessage("negative snapshot position")
    elif isinstance(msg, SnapshotResponse) and msg.next_offset < 0:
        raise MalformedMessage("negative snapshot offset")


@dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read may be served once the state machine has applied ``index``."""

    ctx: bytes
    index: int


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state the shell wants to observe (for metrics, routing and health)."""

    role: Role
    leader: NodeId | None
    term: int


@dataclass(frozen=True, slots=True)
class Ready:
    """What the shell must do, in this order:

    1. persist ``snapshot`` (replacing the log), then ``entries`` (deleting any stored
       entry at or after ``entries[0].index`` first), then ``hard_state``; one durable
       transaction is fine. ``messages`` may be sent meanwhile: they depend on nothing
       in this Ready (they are a leader's own appends, which it counts only once they
       are durable locally).
    2. once durable, send ``persisted_messages`` (votes and acknowledgements).
    3. restore the state machine from ``snapshot`` if there is one, then apply
       ``committed_entries`` in order; answer ``read_states`` once applied reaches
       their index; fail ``failed_reads``.
    4. call ``advance(ready)``.
    """

    soft_state: SoftState
    hard_state: HardState | None = None
    snapshot: Snapshot | None = None
    entries: tuple[Entry, ...] = ()
    messages: tuple[AnyMessage, ...] = ()
    persisted_messages: tuple[AnyMessage, ...] = ()
    committed_entries: tuple[Entry, ...] = ()
    read_states: tuple[ReadState, ...] = ()
    failed_reads: tuple[bytes, ...] = ()
    membership: Membership | None = field(default=None)  # set when it changed

    def must_persist(self) -> bool:
        return self.hard_state is not None or self.snapshot is not None or bool(self.entries)
