"""A removed node stops itself (docs/operations.md, "Scaling a running cluster").

Once a member is removed, the leader stops sending it anything (a configuration takes
effect when appended), so the removed node seldom learns of its removal from its own
log. Its peers know: each node remembers the ids that a *committed* (applied)
configuration change took out, and at which index, and answers such a node's dial with
HTTP 410 and that index (docs/transport.md, "A removed node is told so").

Being told is not enough to stop, because a member can be behind: a node removed and
added back under the same id (a fresh one, or the old one on its old data) may hear a
410 from a member that has applied the removal but not yet the re-addition. So the
node stops only when all of these hold:

- its own newest configuration still holds it and is older than the removal (a node
  that holds a newer one, or none with itself, is joining or was added back);
- a majority of the *other* voters of that configuration said so within
  ``CLAIM_SECONDS``: an addition that is committed was appended by a quorum of the new
  configuration, which leaves too few members behind it to make up that majority;
- no leader has been heard from for an election timeout: a leader that replicates to
  it holds it in its configuration.

What a node remembers of removals is what it applied since it started (nothing across
a snapshot install, which replaces the history): enough, since every member applies the
change, and claims are only ever made from committed changes.
"""

from __future__ import annotations

from collections.abc import Collection

import trio

CLAIM_SECONDS = 10.0  # a peer's 410 counts this long (links redial every 2 s at most)


class NodeRemoved(Exception):
    """This node was removed from the cluster: it stops (``liferaft node`` exits 0)."""


class Removal:
    def __init__(self, node_id: str, applied_members: Collection[str]) -> None:
        self._id = node_id
        self._members = frozenset(applied_members)  # as of the applied index
        self._removed: dict[str, int] = {}  # id -> index of the applied change
        self._claims: dict[str, float] = {}  # peer -> when it last said we were removed
        self.why: str | None = None  # set once this node knows it was removed
        self._known = trio.Event()

    # ------------------------------------------------------------ what it tells others

    def removed_at(self, peer_id: str) -> int | None:
        """The index of the applied change that removed ``peer_id``, if this node saw one
        (and no later one that added it back)."""
        return self._removed.get(peer_id)

    def applied_config(self, index: int, members: Collection[str]) -> None:
        """A configuration change committed at ``index`` was applied."""
        new = frozenset(members)
        for gone in self._members - new:
            self._removed[gone] = index
        for back in new:
            self._removed.pop(back, None)
        self._members = new

    def reset(self, members: Collection[str]) -> None:
        """A snapshot replaced the state: the history of changes before it is unknown."""
        self._members = frozenset(members)
        self._removed.clear()

    # ------------------------------------------------------------ what it is told

    def told(
        self,
        by: str,
        index: int,
        *,
        now: float,
        voters: Collection[str],
        member_now: bool,
        config_index: int,
        leader_heard: bool,
    ) -> bool:
        """Peer ``by`` says this node was removed at ``index``. ``voters``, ``member_now``
        and ``config_index``: this node's newest configuration's voters, whether it holds
        this node, and the index it comes from; ``leader_heard``: whether it heard from
        a leader within an election timeout. True once the node believes it was removed
        (it then stops)."""
        if self.why is not None:
            return True
        if not member_now or config_index >= index:
            self._claims.pop(by, None)
            return False
        self._claims[by] = now
        others = set(voters) - {self._id}
        fresh = {p for p, at in self._claims.items() if now - at <= CLAIM_SECONDS and p in others}
        if leader_heard or len(fresh) < len(others) // 2 + 1:
            return False
        self.why = (
            f"{', '.join(sorted(fresh))} said this node was removed from the cluster "
            f"at index {index}"
        )
        self._known.set()
        return True

    async def watch(self) -> None:
        """Raise NodeRemoved once this node knows it was removed (a task of the node's)."""
        await self._known.wait()
        raise NodeRemoved(self.why)
