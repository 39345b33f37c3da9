"""Errors split by fault (as h11 does): the caller's misuse vs. a refused request."""

from __future__ import annotations


class RaftError(Exception):
    """Base class of the core's errors."""


class NotLeader(RaftError):
    """A proposal or admin request went to a node that is not the leader."""

    def __init__(self, leader: str | None) -> None:
        super().__init__(f"not the leader (leader: {leader or 'unknown'})")
        self.leader = leader


class ProposalRefused(RaftError):
    """The leader will not take this proposal now (transfer, pending change, ...)."""


class UsageError(RaftError):
    """The shell broke the core's contract (for instance stepping during a Ready)."""
