"""``DigestStateMachine``: a state machine that folds every applied entry into a running
hash, so two nodes with the same digest at the same index applied the same history.

The simulator (``liferaft.testing.sim``) checks state machine safety with it; real nodes
run the key-value store (``liferaft.kv.StateDB``).
"""

from __future__ import annotations

import hashlib

from liferaft.core import Entry


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
