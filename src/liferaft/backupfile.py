"""The backup file: what ``liferaft snapshot save`` writes and ``snapshot restore`` reads.

A backup is a consistent copy of a node's state database (docs/storage.md, "state.db")
followed by a small description and a trailer::

    [state database: db_bytes] [description: CBOR map, meta_bytes] [trailer: 56 bytes]
    trailer = "LRBACKUP", format (u32), meta_bytes (u32), db_bytes (u64),
              blake2b-256 of everything before the trailer

The description says what a restore and an operator need: the store's ``revision``, the
``applied`` log index the copy stands at, the number of ``keys``, the members of the
cluster it came from, the node it was taken from and when. The checksum covers the
database and the description, so a truncated, padded or damaged file is refused before
anything is written from it. The file is written to a temporary name, fsynced and renamed,
so a crash or a Ctrl-C never leaves a half file under the final name.

Shared by the client library (which writes it from the node's stream) and the offline
tools (which read it), so it depends on neither.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from liferaft.safecbor import CBORError, dumps, loads

MAGIC = b"LRBACKUP"
FORMAT = 1
TRAILER = struct.Struct(">8sIIQ32s")  # magic, format, meta bytes, db bytes, digest
MAX_META_BYTES = 1024 * 1024
READ_BYTES = 1024 * 1024


class BackupError(ValueError):
    """The file is not a whole, undamaged liferaft backup (the message says why)."""


def new_hasher() -> Any:
    """The checksum of backups (and of the database part a node streams)."""
    return hashlib.blake2b(digest_size=32)


@dataclass(frozen=True)
class BackupInfo:
    """What ``snapshot status`` reports; ``meta`` is the whole description."""

    path: Path
    revision: int
    applied: int
    keys: int
    db_bytes: int
    file_bytes: int
    digest: str
    meta: dict[str, Any]


class BackupWriter:
    """Writes a backup file incrementally: ``write`` the database's bytes in order, then
    ``finish`` with the description. Until ``finish`` returns, ``dest`` is untouched; on
    any failure call ``abort`` (the context manager does) to remove the temporary file."""

    def __init__(self, dest: Path) -> None:
        self.dest = Path(dest)
        self._tmp = self.dest.with_name(f".{self.dest.name}.{os.getpid()}.part")
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._file: BinaryIO | None = os.fdopen(fd, "wb")
        self._hasher = new_hasher()  # the whole file's
        self._db_hasher = new_hasher()  # the database part's, to compare with the node's
        self.db_bytes = 0

    def write(self, data: bytes) -> None:
        assert self._file is not None, "finished or aborted"
        self._file.write(data)
        self._hasher.update(data)
        self._db_hasher.update(data)
        self.db_bytes += len(data)

    def db_digest(self) -> str:
        return str(self._db_hasher.hexdigest())

    def finish(self, meta: dict[str, Any]) -> None:
        """Append the description and trailer, fsync, and rename over ``dest``."""
        assert self._file is not None, "finished or aborted"
        encoded = dumps(meta)
        if len(encoded) > MAX_META_BYTES:
            raise BackupError(f"description of {len(encoded)} bytes is too large")
        self._hasher.update(encoded)
        f = self._file
        f.write(encoded)
        f.write(TRAILER.pack(MAGIC, FORMAT, len(encoded), self.db_bytes, self._hasher.digest()))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._file = None
        os.replace(self._tmp, self.dest)
        _fsync_dir(self.dest.parent)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> BackupWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()  # after finish: nothing left to remove


def read_info(path: Path) -> BackupInfo:
    """Check ``path`` whole (size, trailer, checksum, description) and describe it;
    BackupError saying what is wrong otherwise. Reads the whole file once."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < TRAILER.size:
                raise BackupError(f"{path}: {size} bytes is too short for a liferaft backup")
            f.seek(size - TRAILER.size)
            magic, fmt, meta_bytes, db_bytes, digest = TRAILER.unpack(f.read(TRAILER.size))
            if magic != MAGIC:
                raise BackupError(f"{path}: not a liferaft backup (no trailer)")
            if fmt != FORMAT:
                raise BackupError(f"{path}: backup format {fmt}; this liferaft reads {FORMAT}")
            if meta_bytes > MAX_META_BYTES or db_bytes + meta_bytes + TRAILER.size != size:
                raise BackupError(
                    f"{path}: truncated or padded ({size} bytes; the trailer says "
                    f"{db_bytes} + {meta_bytes} + {TRAILER.size})"
                )
            hasher = new_hasher()
            f.seek(0)
            for block in _blocks(f, db_bytes):
                hasher.update(block)
            encoded = f.read(meta_bytes)
            hasher.update(encoded)
    except OSError as exc:
        raise BackupError(f"{path}: {exc.strerror or exc}") from None
    if hasher.digest() != digest:
        raise BackupError(f"{path}: checksum mismatch: the file is damaged")
    try:
        meta = loads(encoded, max_depth=8)
    except CBORError as exc:
        raise BackupError(f"{path}: description unreadable: {exc}") from None
    if type(meta) is not dict:
        raise BackupError(f"{path}: description is not a map")
    for name in ("revision", "applied", "keys"):
        if type(meta.get(name)) is not int or meta[name] < 0:
            raise BackupError(f"{path}: description without a valid {name!r}")
    return BackupInfo(
        path=path,
        revision=meta["revision"],
        applied=meta["applied"],
        keys=meta["keys"],
        db_bytes=db_bytes,
        file_bytes=size,
        digest=digest.hex(),
        meta=meta,
    )


def extract_db(info: BackupInfo, dest: Path) -> None:
    """Write the database part of a checked backup to ``dest`` (new, private, fsynced)."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out, info.path.open("rb") as f:
        for block in _blocks(f, info.db_bytes):
            out.write(block)
        out.flush()
        os.fsync(out.fileno())


def _blocks(f: BinaryIO, count: int) -> Iterator[bytes]:
    left = count
    while left:
        block = f.read(min(READ_BYTES, left))
        if not block:
            raise BackupError(f"{getattr(f, 'name', 'file')}: ends early")
        left -= len(block)
        yield block


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
