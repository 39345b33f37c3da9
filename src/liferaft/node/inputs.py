"""What the core loop's input channel carries, and how the write batches of many callers
become few log entries.

Everything that needs the core goes through this channel, since the core loop is the
only task that may touch it. Write commands travel as ``Writes`` rather than as
finished entries so that the batches that reach the loop together can share one entry:
one log row, one fsync'd write, one AppendEntries item and one apply step for many
callers' writes (docs/architecture.md, "The life of a write").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from liferaft.core import AnyMessage, Raft
from liferaft.kv.commands import encode_batch
from liferaft.node.waiters import Outcome, Settable, Split, Waiters
from liferaft.storage import offload

MAX_MERGED_COMMANDS = 1024  # write commands merged into one entry at most
MAX_MERGED_BYTES = 1024 * 1024  # ...and about this many bytes


@dataclass(frozen=True, slots=True)
class Tick:
    pass


@dataclass(frozen=True, slots=True)
class Messages:
    peer: str
    msgs: list[AnyMessage]


@dataclass(frozen=True, slots=True)
class Call:
    """Run ``fn(raft)`` inside the core loop and report its result."""

    fn: Callable[[Raft], Any]
    out: Outcome[Any]


@dataclass(frozen=True, slots=True)
class Propose:
    """A client command: appended in the core loop, answered when applied (one wake-up
    per write instead of a ``Call`` round trip plus the wait for the result)."""

    data: bytes
    out: Outcome[object]


@dataclass(frozen=True, slots=True)
class Writes:
    """Write commands (requests without ``id``) of one caller; the core loop merges the
    ``Writes`` waiting together into one batch entry (``liferaft.kv.commands``)."""

    cmds: list[dict[str, Any]]
    size: int  # bytes, about (at most what the commands' message was)
    out: Settable


Input = Tick | Messages | Call | Propose | Writes


def propose_writes(raft: Raft, writes: list[Writes], waiters: Waiters) -> None:
    """Append the write batches that arrived together as few entries as the bounds
    allow (commands and bytes per entry)."""
    time_ms = offload.wall_ms()  # the leader's clock: the log's only time
    group: list[Writes] = []
    count = size = 0
    for w in writes:
        if group and (
            count + len(w.cmds) > MAX_MERGED_COMMANDS or size + w.size > MAX_MERGED_BYTES
        ):
            _append_writes(raft, group, time_ms, waiters)
            group, count, size = [], 0, 0
        group.append(w)
        count += len(w.cmds)
        size += w.size
    _append_writes(raft, group, time_ms, waiters)


def _append_writes(raft: Raft, group: list[Writes], time_ms: int, waiters: Waiters) -> None:
    split = Split()
    cmds: list[dict[str, Any]] = []
    for w in group:
        split.parts.append((w.out, len(cmds), len(w.cmds)))
        cmds.extend(w.cmds)
    try:
        index = raft.propose(encode_batch(cmds, time_ms=time_ms))
    except Exception as exc:  # NotLeader, ProposalRefused: the callers' answer
        split.fail(exc)
    else:
        waiters.proposals[index] = (raft.term, split)
