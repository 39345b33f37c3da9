"""Named places where a test may have the process killed (SIGKILL, as ``kill -9``).

Crash tests must hit the instants that matter (half-way through applying a batch, while
a snapshot file is copied, between storing a snapshot's metadata and swapping its file
in), which random kills reach too rarely. A process started with
``LIFERAFT_CRASHPOINT=<name>:<n>`` kills itself the ``n``-th time it passes ``<name>``.
Unset (always, in production) a crash point costs one comparison. The names are listed
in ``POINTS`` and docs/storage.md.
"""

from __future__ import annotations

import os
import signal

POINTS = frozenset(
    {
        "apply_before_commit",  # kv: a batch written, its transaction not committed
        "apply_after_commit",  # kv: committed, the node not yet told
        "snapshot_copy",  # leader: the state copy for a follower made, not yet sent
        "snapshot_chunk",  # follower: a chunk of a snapshot file written
        "snapshot_before_swap",  # follower: raft.db moved to the snapshot, state.db not yet
    }
)


def _armed() -> tuple[str, int] | None:
    spec = os.environ.get("LIFERAFT_CRASHPOINT", "")
    if not spec:
        return None
    name, _, count = spec.partition(":")
    if name not in POINTS or not count.isdigit() or int(count) < 1:
        raise ValueError(
            f"LIFERAFT_CRASHPOINT={spec!r}: want <point>:<n> with a point of {sorted(POINTS)}"
        )
    return name, int(count)


_ARMED = _armed()
_seen = 0


def crashpoint(name: str) -> None:
    """Kill this process here if a test armed ``name`` and this is the chosen pass."""
    global _seen
    if _ARMED is None or _ARMED[0] != name:
        return
    _seen += 1
    if _seen >= _ARMED[1]:
        os.kill(os.getpid(), signal.SIGKILL)
