"""Tuning of one Raft core, in ticks and bytes (the shell maps ticks to milliseconds)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RaftConfig:
    id: str
    election_ticks: int = 10  # randomized in [election_ticks, 2 * election_ticks)
    heartbeat_ticks: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    max_inflight_msgs: int = 256  # appends in flight per follower
    max_inflight_bytes: int = 32 << 20
    max_msg_bytes: int = 1 << 20  # entries per AppendEntries
    snapshot_chunk_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("node id must not be empty")
        if self.heartbeat_ticks < 1 or self.election_ticks <= self.heartbeat_ticks:
            raise ValueError("need 1 <= heartbeat_ticks < election_ticks")
        if min(self.max_inflight_msgs, self.max_inflight_bytes, self.max_msg_bytes) < 1:
            raise ValueError("flow-control limits must be positive")
        if self.snapshot_chunk_bytes < 1:
            raise ValueError("snapshot_chunk_bytes must be positive")
