"""Cluster identity on peer links (docs/transport.md, "Cluster identity").

Every cluster has an id, kept in ``raft.db``: derived from the members for a cluster
bootstrapped from its config, new for a cluster made by ``snapshot restore`` or
``recover``. A node sends its id in a header when it dials a peer, and refuses a peer
that sends another one (HTTP 403): so the nodes of a restored cluster and those of the
cluster the backup came from never exchange a Raft message, even at the same addresses.
A node that joins an existing cluster starts without an id and takes the one of the
first member that dials it (the cluster that added it); a peer that sends no id (an
older liferaft, or a joining node that has none yet) is let in.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable

HEADER = b"liferaft-cluster"
_VALID = re.compile(rb"[0-9a-f]{1,64}")


def derive(*parts: str) -> str:
    """A cluster id from what the nodes that start the cluster all know."""
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=8).hexdigest()


def bootstrap_id(voters: Iterable[str]) -> str:
    """The id of a cluster bootstrapped from ``[cluster] members``: every member derives
    the same one without talking to the others."""
    return derive("bootstrap", *sorted(voters))


class ClusterIdentity:
    def __init__(self, value: str | None, on_adopt: Callable[[str], object] | None = None) -> None:
        if value is not None and not _VALID.fullmatch(value.encode()):
            raise ValueError(f"bad cluster id {value!r}")
        self.value = value
        self._on_adopt = on_adopt

    def headers(self) -> list[tuple[bytes, bytes]]:
        """What a dialer sends in its upgrade request."""
        return [] if self.value is None else [(HEADER, self.value.encode())]

    def accepts(self, theirs: bytes | None) -> bool:
        """Whether a peer that sent ``theirs`` (None: no header) belongs to this cluster;
        a node without an id takes the first one it is shown."""
        if theirs is None:
            return True
        if not _VALID.fullmatch(theirs):
            return False
        if self.value is None:
            self.value = theirs.decode()
            if self._on_adopt is not None:
                self._on_adopt(self.value)
            return True
        return theirs.decode() == self.value
