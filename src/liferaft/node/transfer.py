"""Streaming a state-database snapshot to a follower, outside the Raft core.

The core decides *that* a follower needs a snapshot: it emits ``InstallSnapshot`` (and
repeats it while the follower does not answer). The core's snapshot is small: its
``data`` is only the member address book; the state itself is the database file. So the
leader's shell swallows those messages and, once per follower at a time:

1. copies ``state.db`` consistently (``VACUUM INTO``, on a thread; the copy's applied
   index ``A`` is at or after the core's snapshot index, and compaction is held at ``A``
   while the transfer runs, so the leader's log still continues where the copy ends);
2. streams the copy from disk in ``SnapshotChunk``s, a few in flight, each acknowledged;
3. after the follower acknowledged the last chunk (its checksum held), sends the core's
   ``InstallSnapshot`` itself, naming the transfer in ``data``.

The follower's ``SnapshotReceiver`` writes chunks to ``incoming-<id>.part`` (on a thread),
checks size and checksum, fsyncs and renames it to ``install-<id>.db``. Its node steps an
``InstallSnapshot`` into the core only if it names a file received whole, so the core
restores only from a file that is on disk; the applier then swaps the file in
(``StateService.install``). A lost chunk, a broken link or a stalled follower ends the
transfer (the files are deleted); the core's next ``InstallSnapshot`` starts a new one
from the beginning. Nothing holds the whole snapshot in memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import trio
from prometheus_client import Histogram

from liferaft.core import InstallSnapshot
from liferaft.crashpoint import crashpoint
from liferaft.node.state import StateService, install_path
from liferaft.observability.logs import event
from liferaft.safecbor import CBORError, dumps, loads
from liferaft.storage import offload
from liferaft.storage.sqlite import fsync_dir
from liferaft.transport.base import Transport
from liferaft.transport.files import SnapshotAck, SnapshotChunk, file_hasher

log = logging.getLogger("liferaft.node")

CHUNK_BYTES = 512 * 1024
WINDOW = 4  # chunks in flight per transfer
STALL_SECONDS = 5.0  # no acknowledgement for this long: the transfer failed
LINK_CHECK_SECONDS = 0.25  # while waiting for an acknowledgement, look at the link this often
RETRY_SECONDS = 1.0  # at least this long between two transfers to one follower


def describe(transfer: int, applied: int, members: dict[str, tuple[str, str]]) -> bytes:
    """The ``data`` of an InstallSnapshot the shell sends: which file, how far it goes."""
    return dumps({"transfer": transfer, "applied": applied, "members": members})


def parse(data: bytes) -> dict[str, Any]:
    """The map a snapshot's ``data`` holds (``{}`` if none); ValueError if malformed."""
    if not data:
        return {}
    try:
        obj = loads(data, max_depth=4)
    except CBORError as exc:
        raise ValueError(f"snapshot data: {exc}") from None
    if type(obj) is not dict:
        raise ValueError("snapshot data is not a map")
    transfer = obj.get("transfer")
    if transfer is not None and (type(transfer) is not int or transfer < 0):
        raise ValueError("snapshot data: bad transfer id")
    return obj


@dataclass
class _Outgoing:
    transfer: int
    applied: int = -1  # the copy's applied index, once made
    acks: trio.MemorySendChannel[SnapshotAck] | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class SnapshotSender:
    """The leader's side: at most one transfer per follower."""

    def __init__(
        self,
        node_id: str,
        transport: Transport,
        state: StateService,
        finish: Callable[[InstallSnapshot, int, int], InstallSnapshot | None],
        rng: random.Random,
        *,
        durations: Histogram | None = None,
    ) -> None:
        """``finish(msg, transfer, applied)`` gives the InstallSnapshot to send at the
        end (None: this node is no longer the leader that asked). ``durations`` (by
        ``stage``) observes the seconds of each copy made and each transfer streamed."""
        self.id = node_id
        self._durations = durations
        self._transport = transport
        self._state = state
        self._finish = finish
        self._rng = rng
        self._running: dict[str, _Outgoing] = {}
        self._last_start: dict[str, float] = {}
        self.sent = 0  # transfers completed, for tests and metrics

    def abandon(self, reason: str) -> None:
        """Stop every running transfer (its files go): the log is compacted past them."""
        for peer, out in self._running.items():
            out.scope.cancel()
            event(log, "snapshot_send_abandoned", peer=peer, reason=reason)

    def hold(self) -> int | None:
        """The log may not be compacted past this index while transfers run."""
        held = [o.applied for o in self._running.values()]
        return min(held) if held else None

    def wanted(self, msg: InstallSnapshot, nursery: trio.Nursery) -> None:
        """The core wants ``msg.dst`` to get a snapshot: start a transfer unless one runs."""
        peer = msg.dst
        now = trio.current_time()
        if peer in self._running or now - self._last_start.get(peer, -1e9) < RETRY_SECONDS:
            return
        self._last_start[peer] = now
        out = _Outgoing(self._rng.getrandbits(62))
        out.applied = 0  # hold compaction from now on; raised once the copy is made
        self._running[peer] = out
        nursery.start_soon(self._run, msg, out)

    def on_ack(self, ack: SnapshotAck) -> None:
        out = self._running.get(ack.src)
        if out is not None and out.transfer == ack.transfer and out.acks is not None:
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                out.acks.send_nowait(ack)

    async def _run(self, msg: InstallSnapshot, out: _Outgoing) -> None:
        peer = msg.dst
        path = self._state.snapshot_dir / f"send-{peer}-{out.transfer:d}.db"
        try:
            with out.scope:
                started = trio.current_time()
                out.applied = await self._state.backup(path)
                copied = trio.current_time()
                _observe(self._durations, "make", copied - started)
                crashpoint("snapshot_copy")
                ok = await self._stream(msg, out, path)
                if ok:
                    _observe(self._durations, "send", trio.current_time() - copied)
                    final = self._finish(msg, out.transfer, out.applied)
                    if final is not None:
                        self._transport.send([final])
                        self.sent += 1
        finally:
            with trio.CancelScope(shield=True):
                await offload.run_sync(lambda: path.unlink(missing_ok=True))
            del self._running[peer]

    async def _stream(self, msg: InstallSnapshot, out: _Outgoing, path: Path) -> bool:
        send_acks, acks = trio.open_memory_channel[SnapshotAck](4 * WINDOW)
        out.acks = send_acks
        f: BinaryIO = await offload.run_sync(lambda: open(path, "rb"))  # noqa: SIM115
        size = os.fstat(f.fileno()).st_size
        hasher = file_hasher()
        event(log, "snapshot_send_started", peer=msg.dst, applied=out.applied, bytes=size)
        with f, send_acks, acks:
            offset = acked = 0
            while True:
                while offset < size and offset - acked < WINDOW * CHUNK_BYTES:
                    data = await offload.run_sync(partial(f.read, CHUNK_BYTES))
                    hasher.update(data)
                    done = offset + len(data) >= size
                    self._transport.send(
                        [
                            SnapshotChunk(
                                term=msg.term,
                                src=self.id,
                                dst=msg.dst,
                                transfer=out.transfer,
                                offset=offset,
                                data=data,
                                done=done,
                                size=size,
                                checksum=hasher.digest() if done else b"",
                            )
                        ]
                    )
                    offset += len(data)
                    if done:
                        break
                ack, why = await self._next_ack(acks, msg.dst)
                if ack is None or not ack.ok:
                    event(log, "snapshot_send_failed", peer=msg.dst, reason=why, offset=acked)
                    return False
                acked = max(acked, ack.next_offset)
                if acked >= size and offset >= size:
                    event(log, "snapshot_sent", peer=msg.dst, applied=out.applied, bytes=size)
                    return True

    async def _next_ack(
        self, acks: trio.MemoryReceiveChannel[SnapshotAck], peer: str
    ) -> tuple[SnapshotAck | None, str]:
        """The next acknowledgement, or None (and why) once the link to ``peer`` is down
        (chunks sent on it may be lost) or nothing came for STALL_SECONDS."""
        deadline = trio.current_time() + STALL_SECONDS
        while trio.current_time() < deadline:
            with trio.move_on_after(LINK_CHECK_SECONDS):
                ack = await acks.receive()
                return ack, "" if ack.ok else "refused"
            if not self._transport.connected(peer):
                return None, "link down"
        return None, "stalled"


@dataclass
class _Incoming:
    transfer: int
    leader: str
    term: int
    size: int
    path: Path
    file: BinaryIO
    received: int = 0
    hasher: Any = None
    started: float = 0.0  # trio.current_time() at the first chunk


class SnapshotReceiver:
    """The follower's side: one transfer at a time; a new one replaces an unfinished one."""

    def __init__(
        self,
        node_id: str,
        transport: Transport,
        state: StateService,
        *,
        durations: Histogram | None = None,
    ) -> None:
        """``durations`` (by ``stage``) observes the seconds of each file received whole,
        from its first chunk to the file renamed in place."""
        self.id = node_id
        self._transport = transport
        self._state = state
        self._durations = durations
        # Chunks to write, and ids of received files to delete (off the event loop).
        self._send, self._recv = trio.open_memory_channel[SnapshotChunk | int](4 * WINDOW)
        self._current: _Incoming | None = None
        self.complete: set[int] = set()  # transfers received whole, on disk

    def on_chunk(self, chunk: SnapshotChunk) -> None:
        try:
            self._send.send_nowait(chunk)
        except trio.WouldBlock:  # a sender that ignores the window: refuse
            self._ack(chunk, 0, ok=False)

    def _ack(self, chunk: SnapshotChunk, next_offset: int, *, ok: bool) -> None:
        self._transport.send(
            [
                SnapshotAck(
                    term=chunk.term,
                    src=self.id,
                    dst=chunk.src,
                    transfer=chunk.transfer,
                    next_offset=next_offset,
                    ok=ok,
                )
            ]
        )

    async def run(self) -> None:
        try:
            async for item in self._recv:
                if isinstance(item, int):
                    path = install_path(self._state.data_dir, item)
                    await offload.run_sync(partial(path.unlink, missing_ok=True))
                else:
                    await self._handle(item)
        finally:
            with trio.CancelScope(shield=True):
                await self._drop()

    def discard(self, transfer: int) -> None:
        """The node will not install ``transfer``'s file: delete it (a full state copy)."""
        if transfer in self.complete:
            self.complete.discard(transfer)
            with contextlib.suppress(trio.WouldBlock):  # else: deleted at the next start
                self._send.send_nowait(transfer)

    def has(self, transfer: int) -> bool:
        """Whether the file of ``transfer`` was received whole and is still here."""
        return transfer in self.complete and install_path(self._state.data_dir, transfer).exists()

    async def _drop(self) -> None:
        cur, self._current = self._current, None
        if cur is not None:

            def drop() -> None:
                with contextlib.suppress(OSError):
                    cur.file.close()
                cur.path.unlink(missing_ok=True)

            await offload.run_sync(drop)

    async def _handle(self, chunk: SnapshotChunk) -> None:
        cur = self._current
        if chunk.offset == 0 and (cur is None or cur.transfer != chunk.transfer):
            await self._drop()
            path = self._state.snapshot_dir / f"incoming-{chunk.transfer:d}.part"
            f: BinaryIO = await offload.run_sync(lambda: open(path, "wb"))  # noqa: SIM115
            cur = self._current = _Incoming(
                chunk.transfer,
                chunk.src,
                chunk.term,
                chunk.size,
                path,
                f,
                0,
                file_hasher(),
                trio.current_time(),
            )
            event(log, "snapshot_receive_started", leader=chunk.src, bytes=chunk.size)
        if (
            cur is None
            or cur.transfer != chunk.transfer
            or cur.leader != chunk.src
            or chunk.offset != cur.received
            or chunk.size != cur.size
        ):
            self._ack(chunk, 0 if cur is None else cur.received, ok=False)
            if cur is not None and cur.transfer == chunk.transfer:
                await self._drop()
            return
        f = cur.file
        try:
            await offload.run_sync(partial(f.write, chunk.data))
        except OSError as exc:  # disk full: give this transfer up, the node goes on
            event(log, "snapshot_receive_failed", leader=chunk.src, reason=repr(exc)[:200])
            await self._drop()
            self._ack(chunk, 0, ok=False)
            return
        crashpoint("snapshot_chunk")
        cur.hasher.update(chunk.data)
        cur.received += len(chunk.data)
        if not chunk.done:
            self._ack(chunk, cur.received, ok=True)
            return
        if cur.received != cur.size or cur.hasher.digest() != chunk.checksum:
            event(log, "snapshot_receive_failed", leader=chunk.src, reason="checksum or size")
            await self._drop()
            self._ack(chunk, 0, ok=False)
            return
        dest = install_path(self._state.data_dir, cur.transfer)

        def finish() -> None:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(cur.path, dest)
            fsync_dir(dest.parent)

        self._current = None
        try:
            with trio.CancelScope(shield=True):
                await offload.run_sync(finish)
        except OSError as exc:  # e.g. the file was cleaned away by an install meanwhile
            event(log, "snapshot_receive_failed", leader=chunk.src, reason=repr(exc)[:200])
            self._ack(chunk, 0, ok=False)
            return
        self.complete.add(cur.transfer)
        _observe(self._durations, "receive", trio.current_time() - cur.started)
        event(log, "snapshot_received", leader=chunk.src, bytes=cur.size)
        self._ack(chunk, cur.received, ok=True)


def _observe(durations: Histogram | None, stage: str, seconds: float) -> None:
    if durations is not None:
        durations.labels(stage).observe(seconds)
