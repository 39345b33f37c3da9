"""The replicated key-value state machine (DESIGN.md §2): keys, revisions, txn, watch
history and exactly-once client sessions. Pure and deterministic: stdlib and cbor2 only,
no Trio, no I/O, no clock, no global random. See ``store.KVStore``.
"""

from liferaft.kv.commands import (
    CommandError,
    RequestError,
    command_from_request,
    decode_command,
    encode_command,
    validate_request,
)
from liferaft.kv.sessions import MAX_SESSIONS, SESSION_TTL_MS, SESSION_WINDOW
from liferaft.kv.store import KVStore, SnapshotError
from liferaft.kv.watch import HISTORY_REVISIONS, Compacted

__all__ = [
    "HISTORY_REVISIONS",
    "MAX_SESSIONS",
    "SESSION_TTL_MS",
    "SESSION_WINDOW",
    "CommandError",
    "Compacted",
    "KVStore",
    "RequestError",
    "SnapshotError",
    "command_from_request",
    "decode_command",
    "encode_command",
    "validate_request",
]
