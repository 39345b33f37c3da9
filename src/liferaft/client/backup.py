"""``Client.snapshot_save``: pull a backup of the state from one node into a file
(docs/client-protocol.md, "Backups"; the file format is ``liferaft.backupfile``)."""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from liferaft.backupfile import BackupWriter
from liferaft.client.connection import ConnectionLost
from liferaft.client.errors import ConnectionFailed, InternalError, error_from_wire

if TYPE_CHECKING:
    from liferaft.client.connection import Connection

WINDOW = 4  # chunk requests in flight
BEGIN_TIMEOUT = 3600.0  # copying a large store takes a while; the node answers when done
CHUNK_TIMEOUT = 60.0

Progress = Callable[[int, int], object]  # (bytes received, bytes in all)


async def save(conn: Connection, dest: Path, *, progress: Progress | None = None) -> dict[str, Any]:
    """Stream the node's backup over ``conn`` into ``dest`` (atomically: a failure leaves
    no file there); returns the backup's description (``revision``, ``applied``,
    ``keys``, ``members``, ...)."""
    try:
        begun = await _call(conn, {"op": "snapshot"}, BEGIN_TIMEOUT)
        sid, size, chunk = (
            _uint(begun, "snapshot_id"),
            _uint(begun, "bytes"),
            _uint(begun, "chunk_bytes"),
        )
        if chunk == 0:
            raise InternalError("snapshot answer with chunk_bytes 0")
        with BackupWriter(Path(dest)) as out:
            pending: deque[tuple[int, Any]] = deque()
            offset = 0
            while out.db_bytes < size:
                while len(pending) < WINDOW and offset < size:
                    req = {"op": "snapshot_chunk", "snapshot_id": sid, "offset": offset}
                    pending.append((offset, conn.submit(req)))
                    offset += chunk
                at, waiter = pending.popleft()
                with trio.fail_after(CHUNK_TIMEOUT):
                    resp = await conn.wait(waiter)
                data = _ok(resp).get("data")
                if not isinstance(data, bytes) or len(data) != min(chunk, size - at):
                    raise InternalError(f"snapshot chunk at {at}: wrong length")
                out.write(data)
                if progress is not None:
                    progress(out.db_bytes, size)
            if out.db_digest() != begun.get("digest"):
                raise InternalError("the backup's checksum does not match the node's copy")
            meta = {k: v for k, v in begun.items() if k not in ("id", "ok", "snapshot_id")}
            meta["created"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            out.finish(meta)
    except ConnectionLost as exc:
        raise ConnectionFailed(f"connection lost during the backup: {exc.reason}") from None
    except trio.TooSlowError:
        raise ConnectionFailed("the node stopped answering during the backup") from None
    return meta


async def _call(conn: Connection, request: dict[str, Any], seconds: float) -> dict[str, Any]:
    with trio.fail_after(seconds):
        return _ok(await conn.wait(conn.submit(request)))


def _ok(resp: dict[str, Any]) -> dict[str, Any]:
    if resp.get("ok") is not True:
        raise error_from_wire(resp.get("error"))
    return resp


def _uint(resp: dict[str, Any], name: str) -> int:
    value = resp.get(name)
    if type(value) is not int or value < 0:
        raise InternalError(f"snapshot answer without {name}")
    return value
