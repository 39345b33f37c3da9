"""The applier and the two tasks it wakes: log compaction and WAL checkpoints.

The applier applies committed entries in runs (what is queued, bounded in entries and
bytes) in one ``state.db`` transaction each, on the state's worker thread, and answers
the callers waiting on them; it installs snapshot files in order between runs. The
core loop never waits for it (``ApplyQueue``).

Compaction and checkpoints follow the applied index but run beside the applier, so
neither an fsync nor a WAL copy sits on the path of a write. The log is compacted only
up to what ``state.db`` holds durably (``StateDB.sync``), since the log is what replays
the state after a crash (docs/storage.md).
"""

from __future__ import annotations

import contextlib
import logging
import random
from functools import partial
from typing import TYPE_CHECKING

import trio

from liferaft.core import ConfEntry, Entry, EntryKind, Raft, Snapshot
from liferaft.crashpoint import crashpoint
from liferaft.node import transfer
from liferaft.node.addresses import learn_from_entries, learn_from_snapshot, snapshot_data
from liferaft.node.applyqueue import ApplyQueue
from liferaft.node.waiters import ProposalDropped
from liferaft.observability.logs import event
from liferaft.storage.errors import StorageError

if TYPE_CHECKING:
    from liferaft.node.node import Node

log = logging.getLogger("liferaft.node")

MAX_APPLY_BATCH = 8192  # committed entries applied in one state transaction at most
MAX_APPLY_BYTES = 2 * 1024 * 1024  # ...and about this much entry data
# Compact the log after this much entry data too (besides ``snapshot_entries``): the log
# since the last compaction is held in memory, and an entry may hold a batch of writes.
COMPACT_BYTES = 32 * 1024 * 1024
# A snapshot transfer holds compaction at its copy's index, so that the follower can go
# on from there; past this much applied data since, the transfer is abandoned instead
# and the log compacted (the follower gets a newer copy next time): a follower on a slow
# link never makes the leader keep an unbounded log in memory.
HOLD_MAX_BYTES = 2 * COMPACT_BYTES
# Checkpoint the WALs after about this many applied entries or this much entry data:
# often, so each checkpoint's burst of writes and fsyncs is short (the disk it holds up
# is the one every node's log fsyncs wait for), and at a per-node random point of that
# span (CHECKPOINT_JITTER), so the members of a cluster on one disk do not burst at once.
# 8 MiB bursts held every write of a 3-node cluster on this machine for ~0.4 s; of 1,024
# entries / 2 MiB, 128 / 256 KiB and 256 / 512 KiB, the last gave the shortest tail at
# 5,000 writes/s (p99 64-67 ms against 85-103 and 82-100) and the most array writes/s.
CHECKPOINT_ENTRIES = 256
CHECKPOINT_BYTES = 512 * 1024
CHECKPOINT_JITTER = 0.5  # each threshold is drawn from (1 - J .. 1 + J) x the above


def _compact(raft: Raft, *, index: int, data: bytes) -> Snapshot | None:
    """Compact at ``index`` unless the log already starts there or later (a snapshot may
    have been installed meanwhile) or the core has not handed it out for applying."""
    if index <= raft.status().snapshot_index or index > raft.applied:
        return None
    return raft.compact(index, data)


class Applier:
    def __init__(self, node: Node) -> None:
        self._node = node
        self.queue = ApplyQueue(max_entries=MAX_APPLY_BATCH, max_bytes=MAX_APPLY_BYTES)
        self._log_bytes = 0  # entry data applied since the last compaction
        self._compact_send, self._compact_recv = trio.open_memory_channel[None](1)
        self._checkpoint_send, self._checkpoint_recv = trio.open_memory_channel[None](1)
        self._checkpointed = 0  # the applied index when the last checkpoint was asked for
        self._unchecked_bytes = 0  # entry data applied since then
        self._rng = random.Random(node.id)  # seeded: a node's checkpoints are replayable
        self._next_checkpoint = self._draw_checkpoint()  # (entries, bytes) to the next one

    async def run(self) -> None:
        """Apply committed entries in runs (what is queued, bounded in entries and bytes,
        in one state transaction); install snapshot files in order between them."""
        while True:
            item = await self.queue.get()
            if isinstance(item, Snapshot):
                await self._install(item)
            else:
                await self._apply(item)

    async def _apply(self, entries: list[Entry]) -> None:
        node = self._node
        state = node.kv
        started = trio.current_time()
        size = sum(len(e.data) for e in entries)
        self._log_bytes += size
        self._unchecked_bytes += size
        applied = await state.apply(entries)  # type: ignore[arg-type]  # Entry is EntryLike
        committed = 0
        node.applying = True
        try:
            for e, result in zip(entries, applied.results, strict=True):
                if e.kind is EntryKind.NORMAL:
                    committed += 1
                elif e.kind is EntryKind.CONFIG:
                    learn_from_entries(node.applied_addresses, (e,))
                    self._config_applied(e)
                node.waiters.on_applied(e.index, e.term, result)
            for hook in node.after_apply:
                hook()
        finally:
            node.applying = False
        if committed:
            node.metrics.proposals_committed.inc(committed)
        if applied.rows:  # one publication per applied run, revisions in order
            for callback in node.on_events:
                callback(applied.rows)
        if applied.leases:
            node.lessor.applied(applied.leases)
        node.metrics.apply_duration.observe(trio.current_time() - started)
        self._applied_to(state.db.applied)

    def _config_applied(self, e: Entry) -> None:
        members = ConfEntry.decode(e.data).membership.members
        self._node.removal.applied_config(e.index, members)

    def _applied_to(self, index: int) -> None:
        node = self._node
        entries, size = self._next_checkpoint
        if index - self._checkpointed >= entries or self._unchecked_bytes >= size:
            with contextlib.suppress(trio.WouldBlock):
                self._checkpoint_send.send_nowait(None)
                self._checkpointed = index
                self._unchecked_bytes = 0
                self._next_checkpoint = self._draw_checkpoint()
        node.applied = index
        node.metrics.applied_index.set(index)
        node.waiters.on_applied_index(index)
        if (
            index - node.snapshot_index >= node.settings.raft.snapshot_entries
            or self._log_bytes >= COMPACT_BYTES
        ):
            with contextlib.suppress(trio.WouldBlock):
                self._compact_send.send_nowait(None)  # the compactor is idle: wake it

    def _draw_checkpoint(self) -> tuple[int, int]:
        scale = 1 + self._rng.uniform(-CHECKPOINT_JITTER, CHECKPOINT_JITTER)
        return round(CHECKPOINT_ENTRIES * scale), round(CHECKPOINT_BYTES * scale)

    async def _install(self, snap: Snapshot) -> None:
        """The core restored a snapshot (already in raft.db): swap its file in."""
        node = self._node
        about = transfer.parse(snap.data)
        crashpoint("snapshot_before_swap")
        started = trio.current_time()
        await node.kv.install(about["transfer"])
        node.metrics.snapshot_duration.labels("install").observe(trio.current_time() - started)
        learn_from_snapshot(node.addresses, about, replace=False)
        learn_from_snapshot(node.applied_addresses, about, replace=True)
        node.snapshot_meta = snap.meta  # the core restores only past its own snapshot
        # Proposals of ours at indexes the snapshot covers never apply here: if ours
        # was committed it is in the snapshot, if not it was replaced; either way this
        # node cannot tell which, and the caller hears so now, not at its timeout.
        node.waiters.fail_through(
            snap.meta.index,
            ProposalDropped(
                f"a snapshot up to {snap.meta.index} was installed over the entry: "
                "it may or may not have been applied"
            ),
        )
        node.lessor.reset()  # the leases are the snapshot's now
        node.removal.reset(snap.meta.membership.members)
        if node.on_restore is not None:
            node.on_restore()
        event(log, "snapshot_installed", index=snap.meta.index, applied=node.kv.db.applied)
        self._applied_to(node.kv.db.applied)

    async def checkpointer(self) -> None:
        """Copy the WALs of state.db and raft.db into their databases on threads of
        their own, beside the applier and the core loop (a checkpoint inside a COMMIT
        would write and fsync the database on the path of every write); then restart
        state.db's WAL on the writer's turn, which copies only what came meanwhile."""
        node = self._node
        assert node.storage is not None
        async for _ in self._checkpoint_recv:
            started = trio.current_time()
            await node.kv.read(lambda db: db.checkpoint())  # the bulk, beside the applier
            left = await node.kv.restart_wal()  # the rest, between two applies
            try:
                await node.storage.checkpoint()
            except StorageError as exc:  # the WAL grows; a failing disk fails the next save
                event(log, "checkpoint_failed", level=logging.WARNING, error=str(exc)[:300])
            seconds = round(trio.current_time() - started, 3)
            event(log, "checkpointed", level=logging.DEBUG, frames_left=left, seconds=seconds)

    async def compactor(self) -> None:
        """Drop the log up to what the state database holds durably (and no further than
        a running snapshot transfer's copy, so the follower can continue from it)."""
        node = self._node
        assert node.storage is not None
        async for _ in self._compact_recv:
            durable = await node.kv.sync()
            sender = node.sender
            held = sender.hold() if sender is not None else None
            if held is not None and held < durable and self._log_bytes >= HOLD_MAX_BYTES:
                assert sender is not None
                sender.abandon(f"the log grew by {self._log_bytes} bytes during the transfer")
                held = None
            index = durable if held is None else min(durable, held)
            if index <= node.snapshot_index:
                continue
            data = snapshot_data(node.applied_addresses)
            snap = await node.call(partial(_compact, index=index, data=data))
            if snap is None:
                continue
            started = trio.current_time()
            await node.storage.save_snapshot(snap)
            self._log_bytes = 0  # about: entries applied since the sync stay uncounted
            if snap.meta.index > node.snapshot_index:  # no install overtook us meanwhile
                node.snapshot_meta = snap.meta
            event(
                log,
                "log_compacted",
                index=index,
                seconds=round(trio.current_time() - started, 4),
            )
