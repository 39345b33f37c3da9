"""The replicated state machine's interface, and a placeholder implementation.

``DigestStateMachine`` folds every applied entry into a running hash: two nodes with the
same digest at the same index applied the same history. The simulator checks state
machine safety with it, and the node runs it until the key-value store replaces it.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

from liferaft.core import Entry


class StateMachine(Protocol):
    index: int  # the last applied index

    def apply(self, entry: Entry) -> object:
        """Apply one committed entry; the result goes back to whoever proposed it."""
        ...

    def snapshot(self) -> bytes:
        """The state as of ``index``, for compaction and for followers far behind."""
        ...

    def restore(self, data: bytes) -> None: ...


class DigestStateMachine:
    def __init__(self) -> None:
        self.index = 0
        self.digest = b""

    def apply(self, entry: Entry) -> int:
        h = hashlib.blake2b(self.digest, digest_size=16)
        h.update(b"%d:%d:%d:" % (entry.index, entry.term, entry.kind))
        h.update(entry.data)
        self.digest = h.digest()
        self.index = entry.index
        return entry.index

    def snapshot(self) -> bytes:
        return b"%d:%s" % (self.index, self.digest.hex().encode())

    def restore(self, data: bytes) -> None:
        index, digest = data.split(b":")
        self.index = int(index)
        self.digest = bytes.fromhex(digest.decode())
