"""The leader's lease clock (docs/coordination.md, "Leases").

Leases live in the state database (``kv/apply.py``): granted, revoked and checkpointed
through the log, so every replica holds the same leases and deletes the same keys at the
same revision. *When* a lease expires is decided by the leader alone, on its own clock:
this object keeps a deadline per lease while the node leads, renews it on a keepalive,
and proposes a ``lease_revoke`` for every lease whose deadline passed. Apply never looks
at a clock.

Leader changes never expire a lease early: a node that becomes leader starts every
lease's countdown afresh from what the log says it had left (the full TTL, or the TTL
left at the last checkpoint), plus an election timeout, which covers a keepalive the old
leader took just before it fell. Long leases have their TTL left checkpointed through the
log now and then, so that a lease that is not kept alive does not get a whole new TTL at
every failover.

A keepalive is answered only after a read index confirmed this node still leads (the API
does that), so a deposed leader cannot renew what the new one will expire.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import trio

from liferaft.core import NotLeader, ProposalRefused, Role
from liferaft.kv.commands import MAX_CHECKPOINT_LEASES
from liferaft.node.waiters import NodeStopped, ProposalDropped, ReadFailed
from liferaft.observability.logs import event

if TYPE_CHECKING:
    from liferaft.node.node import Node

log = logging.getLogger("liferaft.node")

REVOKE_BATCH = 256  # expired leases revoked in one log entry at most
CHECKPOINT_SECONDS = 60.0  # how often the TTL left of long leases is written to the log
RETRY_SECONDS = 1.0  # a revoke that did not get through is proposed again after this


class LeaseNotFound(Exception):
    """No such lease (never granted, revoked, or expired)."""


class Lessor:
    def __init__(self, node: Node) -> None:
        self._node = node
        self._deadline: dict[int, float] = {}  # lease -> when it expires (Trio's clock)
        self._ttl: dict[int, int] = {}  # lease -> granted TTL (ms)
        self._revoking: dict[int, float] = {}  # lease -> when its revoke was proposed
        self._term: int | None = None  # the term whose leader we are (None: not leading)
        self._ready = trio.Event()  # the deadlines are built for this term
        self._last_checkpoint = 0.0
        self.checkpoint_seconds = CHECKPOINT_SECONDS  # (the simulator makes it short)
        # leases whose TTL left, as the log records it, is below their TTL: a renewal
        # writes the full TTL back first, or a new leader would count from the old value
        self._short: set[int] = set()
        self._building = False
        self._gone_while_building: set[int] = set()

    # ------------------------------------------------------------ what apply tells

    def applied(self, changes: list[tuple[int, int | None]]) -> None:
        """Leases granted ``(id, ttl_ms)`` or gone ``(id, None)`` in an applied run."""
        now = trio.current_time()
        for lease, ttl_ms in changes:
            if ttl_ms is None:
                self._deadline.pop(lease, None)
                self._ttl.pop(lease, None)
                self._revoking.pop(lease, None)
                self._short.discard(lease)
                if self._building:  # the build's read may predate it: do not bring it back
                    self._gone_while_building.add(lease)
            elif self._term is not None:
                self._ttl[lease] = ttl_ms
                self._deadline[lease] = now + ttl_ms / 1000

    def reset(self) -> None:
        """The state was replaced (a snapshot installed): build the deadlines again."""
        self._term = None
        self._deadline.clear()
        self._ttl.clear()
        self._revoking.clear()
        self._short.clear()
        if self._ready.is_set():  # (one not yet set keeps its waiters for the next build)
            self._ready = trio.Event()

    # ------------------------------------------------------------ the API's questions

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease`` for its whole TTL; the TTL in seconds. The caller confirmed
        the read index first. NotLeader if this node does not lead."""
        await self._leading()
        now = trio.current_time()
        if lease not in self._ttl or lease in self._revoking:  # (expired: being revoked)
            raise LeaseNotFound(lease)
        ttl_ms = self._ttl[lease]
        if lease in self._short:
            # The log says less than a TTL is left, which is what a new leader would
            # count from: write the whole TTL back before acknowledging (as etcd does).
            if (
                await self._propose([{"op": "lease_checkpoint", "leases": [[lease, ttl_ms]]}])
                is None
            ):
                raise trio.TooSlowError("the renewal could not be recorded; retry")
            self._short.discard(lease)
            if lease not in self._ttl:
                raise LeaseNotFound(lease)
        self._deadline[lease] = now + ttl_ms / 1000
        return math.ceil(ttl_ms / 1000)

    async def time_to_live(self, lease: int) -> tuple[int, int]:
        """``(seconds left, granted seconds)`` of ``lease``."""
        await self._leading()
        if lease not in self._ttl:
            raise LeaseNotFound(lease)
        left = max(0.0, self._deadline[lease] - trio.current_time())
        return math.ceil(left), math.ceil(self._ttl[lease] / 1000)

    async def _leading(self) -> None:
        node = self._node
        raft = node.raft
        if raft is None or raft.role is not Role.LEADER:
            raise NotLeader(raft.leader if raft is not None else None)
        with trio.fail_after(2 * node.settings.raft.election_timeout_ms / 1000):
            await self._ready.wait()

    # ------------------------------------------------------------ the clock

    async def run(self) -> None:
        """While leading: build the deadlines, revoke what expires, checkpoint."""
        node = self._node
        tick = min(0.1, node.settings.raft.heartbeat_interval_ms / 1000)
        while True:
            await trio.sleep(tick)
            raft = node.raft
            if raft is None or raft.role is not Role.LEADER:
                if self._term is not None:
                    self.reset()
                continue
            if self._term != raft.term:
                await self._build(raft.term)
            await self._expire()
            if trio.current_time() - self._last_checkpoint >= self.checkpoint_seconds:
                await self._checkpoint()

    async def _build(self, term: int) -> None:
        """Just elected: every lease counts down afresh from what it had left.

        What it had left is read only once this node has applied every entry committed
        before it led: a new leader learns that its predecessor's last entries are
        committed only with its own first commit, and one of them may be a renewal
        that wrote a lease's whole TTL back (``keepalive``). Counting from the TTL left
        before it would expire the lease early."""
        self.reset()
        node = self._node
        try:
            with trio.fail_after(2 * node.settings.raft.election_timeout_ms / 1000):
                await node.read_index()
        except (NotLeader, ReadFailed, NodeStopped, trio.TooSlowError):
            return  # (not built: the next tick tries again, if this node still leads)
        if node.raft is None or node.raft.term != term or node.raft.role is not Role.LEADER:
            return
        self._term = term
        self._building = True
        self._gone_while_building.clear()
        try:
            leases = await node.kv.read(lambda db: db.leases())
        finally:
            self._building = False
        now = trio.current_time()
        grace = node.settings.raft.election_timeout_ms / 1000
        for lease, ttl_ms, remaining_ms in leases:
            if lease in self._gone_while_building:
                continue
            self._ttl.setdefault(lease, ttl_ms)
            self._deadline.setdefault(lease, now + remaining_ms / 1000 + grace)
            if remaining_ms < ttl_ms:
                self._short.add(lease)
        self._last_checkpoint = now
        self._ready.set()

    async def _expire(self) -> None:
        now = trio.current_time()
        due = [
            lease
            for lease, deadline in self._deadline.items()
            if deadline <= now and now - self._revoking.get(lease, -math.inf) >= RETRY_SECONDS
        ]
        for start in range(0, len(due), REVOKE_BATCH):
            batch = due[start : start + REVOKE_BATCH]
            for lease in batch:
                self._revoking[lease] = now
            cmds = [{"op": "lease_revoke", "lease": lease} for lease in batch]
            results = await self._propose(cmds)
            if results is None:
                continue
            for lease, result in zip(batch, results, strict=False):
                error = result.get("error") if isinstance(result, dict) else None
                if isinstance(error, dict) and error.get("code") == "not_found":  # gone
                    self.applied([(lease, None)])
                # (any other error: tried again after RETRY_SECONDS)
            event(log, "leases_expired", leases=batch[:16], count=len(batch))

    async def _checkpoint(self) -> None:
        """Write the TTL left of the leases longer than the checkpoint interval."""
        now = trio.current_time()
        self._last_checkpoint = now
        pairs = [
            [lease, max(0, int((deadline - now) * 1000))]
            for lease, deadline in self._deadline.items()
            if self._ttl.get(lease, 0) > self.checkpoint_seconds * 1000
        ]
        for start in range(0, len(pairs), MAX_CHECKPOINT_LEASES):
            chunk = pairs[start : start + MAX_CHECKPOINT_LEASES]
            # Marked before the proposal: a renewal meanwhile writes the TTL back again.
            self._short.update(lease for lease, left in chunk if left < self._ttl[lease])
            await self._propose([{"op": "lease_checkpoint", "leases": chunk}])

    async def _propose(self, cmds: list[dict[str, object]]) -> list[object] | None:
        """Each command's result, or None if the proposal did not get through (it is
        tried again at a later tick, while this node still leads)."""
        try:
            with trio.fail_after(self._node.settings.raft.election_timeout_ms / 1000 * 4):
                results = await self._node.propose_writes(cmds, 64 * len(cmds))
        except (NotLeader, ProposalRefused, ProposalDropped, NodeStopped, trio.TooSlowError):
            return None
        return results if isinstance(results, list) else [results] * len(cmds)
