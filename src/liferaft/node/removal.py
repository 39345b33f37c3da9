"""A removed node stops itself (docs/operations.md, "Removing a node").

Once a member is removed, the leader stops sending it anything (a configuration takes
effect when appended), so the removed node seldom learns of its removal from its own
log. Its peers know: each node remembers the ids that a *committed* (applied)
configuration change took out, and at which index, and answers such a node's dial
with HTTP 410 and that index (docs/transport.md, "Refusals"). The removed node believes
it only if its own newest configuration still holds it and is older than the removal:
an id removed and later added again (a fresh node joining under the old name) is not
stopped by a peer that has not applied the re-addition yet, because that node's newest
configuration is newer, or does not hold it yet (it is still joining).

What a node remembers is what it applied since it started (and nothing across a
snapshot install, which replaces the history): enough, since the node that made the
change applies it, and claims are only ever made from committed changes.
"""

from __future__ import annotations

from collections.abc import Collection

import trio


class NodeRemoved(Exception):
    """This node was removed from the cluster: it stops (``liferaft node`` exits 0)."""


class Removal:
    def __init__(self, node_id: str, applied_members: Collection[str]) -> None:
        self._id = node_id
        self._members = frozenset(applied_members)  # as of the applied index
        self._removed: dict[str, int] = {}  # id -> index of the applied change
        self.why: str | None = None  # set once this node knows it was removed
        self._known = trio.Event()

    def removed_at(self, peer_id: str) -> int | None:
        """The index of the applied change that removed ``peer_id``, if this node saw one
        (and no later one that added it back)."""
        return self._removed.get(peer_id)

    def applied_config(self, index: int, members: Collection[str], *, in_newest: bool) -> None:
        """A configuration change committed at ``index`` was applied; ``in_newest``:
        whether this node is a member of its newest (appended) configuration."""
        new = frozenset(members)
        for gone in self._members - new:
            self._removed[gone] = index
        for back in new:
            self._removed.pop(back, None)
        if self._id in self._members and self._id not in new and not in_newest:
            self._stop(f"its removal from the cluster was applied at index {index}")
        self._members = new

    def reset(self, members: Collection[str]) -> None:
        """A snapshot replaced the state: the history of changes before it is unknown."""
        self._members = frozenset(members)
        self._removed.clear()

    def told(self, by: str, index: int, *, member_now: bool, config_index: int) -> bool:
        """Peer ``by`` says this node was removed at ``index``; ``member_now`` and
        ``config_index``: whether this node's newest configuration holds it, and the
        index that configuration comes from. True if the claim was believed."""
        if self.why is not None:
            return True
        if not member_now or config_index >= index:
            return False
        self._stop(f"{by} says this node was removed from the cluster at index {index}")
        return True

    def _stop(self, why: str) -> None:
        if self.why is None:
            self.why = why
            self._known.set()

    async def watch(self) -> None:
        """Raise NodeRemoved once this node knows it was removed (a task of the node's)."""
        await self._known.wait()
        raise NodeRemoved(self.why)
