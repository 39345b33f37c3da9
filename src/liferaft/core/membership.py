"""Cluster membership and single-server changes to it.

A CONFIG entry carries the change *and* the whole membership that results, so a node
that joins late learns the full configuration from the newest CONFIG entry (or snapshot)
it receives, without having seen the initial one. A configuration takes effect as soon
as its entry is in a node's log (Raft thesis §4.1); one change at a time keeps any two
consecutive majorities overlapping.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from liferaft.core.errors import ProposalRefused


@dataclass(frozen=True, slots=True)
class Membership:
    """Voters elect and commit; learners only receive the log."""

    voters: frozenset[str]
    learners: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.voters & self.learners:
            raise ValueError("a node cannot be both voter and learner")

    @classmethod
    def of(cls, voters: list[str] | tuple[str, ...], learners: tuple[str, ...] = ()) -> Membership:
        return cls(frozenset(voters), frozenset(learners))

    @property
    def members(self) -> frozenset[str]:
        return self.voters | self.learners

    def quorum(self) -> int:
        return len(self.voters) // 2 + 1


EMPTY = Membership(frozenset())


class ConfChangeType(enum.Enum):
    ADD_VOTER = "add"
    ADD_LEARNER = "add-learner"
    PROMOTE = "promote"
    REMOVE = "remove"


@dataclass(frozen=True, slots=True)
class ConfChange:
    """One membership change; ``context`` is opaque to the core (the shell puts the new
    member's addresses there)."""

    type: ConfChangeType
    node_id: str
    context: bytes = b""

    def apply(self, current: Membership) -> Membership:
        """The membership after this change, or ProposalRefused if it makes no sense."""
        node = self.node_id
        voters, learners = set(current.voters), set(current.learners)
        if self.type is ConfChangeType.ADD_VOTER:
            if node in voters:
                raise ProposalRefused(f"{node} is already a voter")
            learners.discard(node)
            voters.add(node)
        elif self.type is ConfChangeType.ADD_LEARNER:
            if node in current.members:
                raise ProposalRefused(f"{node} is already a member")
            learners.add(node)
        elif self.type is ConfChangeType.PROMOTE:
            if node not in learners:
                raise ProposalRefused(f"{node} is not a learner")
            learners.discard(node)
            voters.add(node)
        else:
            if node not in current.members:
                raise ProposalRefused(f"{node} is not a member")
            voters.discard(node)
            learners.discard(node)
            if not voters:
                raise ProposalRefused("cannot remove the last voter")
        return Membership(frozenset(voters), frozenset(learners))


@dataclass(frozen=True, slots=True)
class ConfEntry:
    """The payload of a CONFIG entry."""

    change: ConfChange
    membership: Membership

    def encode(self) -> bytes:
        return json.dumps(
            {
                "type": self.change.type.value,
                "node": self.change.node_id,
                "context": self.change.context.hex(),
                "voters": sorted(self.membership.voters),
                "learners": sorted(self.membership.learners),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> ConfEntry:
        obj = json.loads(data)
        change = ConfChange(
            ConfChangeType(obj["type"]), str(obj["node"]), bytes.fromhex(obj["context"])
        )
        return cls(change, Membership.of(obj["voters"], tuple(obj["learners"])))
