"""Streaming a backup of the state to a client (``liferaft snapshot save``).

``snapshot`` (admin) first confirms a read index with the quorum and waits to apply it,
so the copy holds every write acknowledged before the request; then it copies the state
database consistently beside the writer (``VACUUM INTO``, as for a snapshot sent to a
follower, docs/storage.md) into ``snapshots/backup-<n>.db`` and answers with its size,
checksum and description. The client then pulls the file with ``snapshot_chunk``
requests (``offset``; a few in flight), each answered with up to CHUNK_BYTES: the
client sets the pace, so nothing piles up in the connection's queue. The copy belongs
to its connection: a new ``snapshot`` on it, or the connection's end, deletes it (and
the node deletes leftovers at its next start).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from liferaft import __version__
from liferaft.api import handlers
from liferaft.api.errors import invalid, unavailable
from liferaft.backupfile import new_hasher
from liferaft.kv.queries import describe_copy
from liferaft.storage import offload

if TYPE_CHECKING:
    from liferaft.node.node import Node

CHUNK_BYTES = 512 * 1024  # per snapshot_chunk answer (well under a client's message limit)
MAX_BACKUPS = 2  # copies being made or streamed at once on one node (disk and I/O)
HASH_BLOCK = 1024 * 1024


class BackupCount:
    """The backups a node is making or streaming now (MAX_BACKUPS at most)."""

    def __init__(self) -> None:
        self.value = 0


class BackupStream:
    """The backup copy one connection is streaming, if any."""

    def __init__(self, node: Node, running: BackupCount) -> None:
        self._node = node
        self._running = running
        self._path: Path | None = None
        self._size = 0
        self._id = 0
        self._holding = False
        self._making = False

    async def begin(self) -> dict[str, Any]:
        if self._making:
            raise invalid("a snapshot is being made on this connection already")
        self.close()
        node = self._node
        if self._running.value >= MAX_BACKUPS:
            raise unavailable(f"{MAX_BACKUPS} backups are being made already")
        # A count, not a CapacityLimiter: the copy is released by whichever task ends
        # the connection, not the request's task that took it.
        self._running.value += 1
        self._holding = True
        self._making = True
        try:
            await handlers.confirm_read(node)
            self._id = random.getrandbits(63)
            path = node.kv.snapshot_dir / f"backup-{self._id:d}.db"
            self._path = path
            await node.kv.backup(path)
            about, digest = await offload.run_sync(lambda: (describe_copy(path), _digest(path)))
        except BaseException:
            self.close()
            raise
        finally:
            self._making = False
        self._size = path.stat().st_size
        return {
            "snapshot_id": self._id,
            "bytes": self._size,
            "chunk_bytes": CHUNK_BYTES,
            "digest": digest,
            **about,
            "node_id": node.id,
            "version": __version__,
            "members": handlers.status(node)["members"],
        }

    async def chunk(self, req: dict[str, Any]) -> dict[str, Any]:
        if self._path is None or req["snapshot_id"] != self._id:
            raise invalid("no such snapshot on this connection (send snapshot first)")
        offset = req["offset"]
        if offset > self._size:
            raise invalid(f"offset {offset} is beyond the snapshot's {self._size} bytes")
        path = self._path
        data = await offload.run_sync(lambda: _read_at(path, offset, CHUNK_BYTES))
        return {"offset": offset, "data": data}

    def close(self) -> None:
        """Delete the copy (the connection ended, or a new one starts)."""
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None
        if self._holding:
            self._holding = False
            self._running.value -= 1


def _read_at(path: Path, offset: int, count: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, count, offset)
    finally:
        os.close(fd)


def _digest(path: Path) -> str:
    hasher = new_hasher()
    with path.open("rb") as f:
        while block := f.read(HASH_BLOCK):
            hasher.update(block)
    return str(hasher.hexdigest())
