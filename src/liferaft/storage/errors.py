"""Storage errors. Every one of them is fatal to the node (fail-stop: docs/architecture.md,
docs/storage.md)."""

from __future__ import annotations


class StorageError(Exception):
    """The database could not be read or written (I/O error, disk full, locked, closed).

    The message carries SQLite's own message. After a failed write the ``Storage`` refuses
    every later call: whether a failed fsync left anything on disk is unknowable, so the
    node must stop and restart from what a fresh open finds.
    """


class StorageCorrupt(StorageError):
    """The database is damaged or is not ours; found at open, it is refused, never repaired.

    The message says exactly what is wrong, e.g. ``log not contiguous: entry 17 follows 15``.
    """
