"""Durable Raft state in SQLite: hard state, log entries and the latest snapshot.

``sqlite.Storage`` is the synchronous store (one file, ``raft.db``, in WAL mode with
``synchronous=FULL``: a commit is an fsync); ``writer.StorageWriter`` runs it on a worker
thread for the Trio node, one call at a time, never abandoning a write half-way.
``schema`` creates and migrates the tables; ``Storage.check`` refuses a damaged database at
open with a message that says what is wrong, and never repairs anything.

What it must do is exactly what ``liferaft.testing.sim.Disk`` does in memory.
"""
