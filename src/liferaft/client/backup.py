"""``snapshot_save``: pull a backup of the state from one node into a file
(docs/client-protocol.md, "Backups"; the file format is ``liferaft.backupfile``).

``BackupPull`` holds the steps that do not depend on the event loop (the requests, the
checks of each answer, the file); each client flavour's ``snapshot_save`` drives it
over its own connection, with its own timeouts."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from liferaft.backupfile import BackupWriter
from liferaft.client.errors import InternalError, error_from_wire

WINDOW = 4  # chunk requests in flight
BEGIN_TIMEOUT = 3600.0  # copying a large store takes a while; the node answers when done
CHUNK_TIMEOUT = 60.0
BEGIN: dict[str, Any] = {"op": "snapshot"}

Progress = Callable[[int, int], object]  # (bytes received, bytes in all)


class BackupPull:
    """One backup being pulled: give it the answer to ``BEGIN`` (``begin``), send the
    chunk requests ``requests`` yields (at most WINDOW unanswered) and give it each
    answer in order (``chunk``) until ``done``; then ``finish``. ``close`` on any way
    out: a pull not finished leaves no file."""

    def __init__(self, dest: Path, progress: Progress | None) -> None:
        self._dest = Path(dest)
        self._progress = progress
        self._out: BackupWriter | None = None
        self._begun: dict[str, Any] = {}
        self._sid = self._size = self._chunk = 0
        self._offset = 0  # of the next chunk to ask for
        self._unanswered: list[int] = []  # offsets asked for, oldest first

    def begin(self, resp: dict[str, Any]) -> None:
        begun = _ok(resp)
        self._sid = _uint(begun, "snapshot_id")
        self._size = _uint(begun, "bytes")
        self._chunk = _uint(begun, "chunk_bytes")
        if self._chunk == 0:
            raise InternalError("snapshot answer with chunk_bytes 0")
        self._begun = begun
        self._out = BackupWriter(self._dest)

    @property
    def done(self) -> bool:
        return self._writer().db_bytes >= self._size

    def requests(self) -> Iterator[dict[str, Any]]:
        """The chunk requests to send now (their offsets join the unanswered)."""
        while len(self._unanswered) < WINDOW and self._offset < self._size:
            self._unanswered.append(self._offset)
            yield {"op": "snapshot_chunk", "snapshot_id": self._sid, "offset": self._offset}
            self._offset += self._chunk

    def chunk(self, resp: dict[str, Any]) -> None:
        """The answer to the oldest chunk request."""
        at = self._unanswered.pop(0)
        data = _ok(resp).get("data")
        if not isinstance(data, bytes) or len(data) != min(self._chunk, self._size - at):
            raise InternalError(f"snapshot chunk at {at}: wrong length")
        out = self._writer()
        out.write(data)
        if self._progress is not None:
            self._progress(out.db_bytes, self._size)

    def finish(self) -> dict[str, Any]:
        """Check the whole and put the file in place; returns the backup's description."""
        out = self._writer()
        if out.db_digest() != self._begun.get("digest"):
            raise InternalError("the backup's checksum does not match the node's copy")
        meta = {k: v for k, v in self._begun.items() if k not in ("id", "ok", "snapshot_id")}
        meta["created"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        out.finish(meta)
        self._out = None
        return meta

    def close(self) -> None:
        """Remove the temporary file of a pull that did not finish."""
        if self._out is not None:
            out, self._out = self._out, None
            out.abort()

    def _writer(self) -> BackupWriter:
        if self._out is None:
            raise RuntimeError("the pull has not begun, or is over")
        return self._out


def _ok(resp: dict[str, Any]) -> dict[str, Any]:
    if resp.get("ok") is not True:
        raise error_from_wire(resp.get("error"))
    return resp


def _uint(resp: dict[str, Any], name: str) -> int:
    value = resp.get(name)
    if type(value) is not int or value < 0:
        raise InternalError(f"snapshot answer without {name}")
    return value
