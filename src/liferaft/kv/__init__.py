"""The replicated key-value state machine (docs/storage.md): etcd's MVCC on disk in
SQLite, txn, watch history and exactly-once client sessions. Deterministic: no Trio, no
clock, no global random; its only I/O is its own database file. See ``state.StateDB``.
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
from liferaft.kv.state import HISTORY_REVISIONS, Applied, StateCorrupt, StateDB
from liferaft.kv.watch import Compacted

__all__ = [
    "HISTORY_REVISIONS",
    "MAX_SESSIONS",
    "SESSION_TTL_MS",
    "SESSION_WINDOW",
    "Applied",
    "CommandError",
    "Compacted",
    "RequestError",
    "StateCorrupt",
    "StateDB",
    "command_from_request",
    "decode_command",
    "encode_command",
    "validate_request",
]
