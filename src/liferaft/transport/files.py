"""Peer messages outside the Raft core: streaming a file (a state-database snapshot) from
one node to another in chunks.

The node sends these over the same peer links as Raft messages, in the same batches, but
the core never sees them: ``PeerTransport.inbound`` delivers ``PeerMessage`` and the node
hands only core messages (``AnyMessage``) to ``Raft.step``.

A transfer is one file sent once: the sender picks a ``transfer`` id and sends
``SnapshotChunk``s in order of ``offset``, each at most ``MAX_CHUNK_BYTES``; the last has
``done`` set and carries the blake2b checksum (``digest_size=CHECKSUM_BYTES``) of the
whole file. The receiver answers with ``SnapshotAck``: ``next_offset`` is how many bytes
it holds in order, ``ok=False`` that it gave up on the transfer and the sender must stop.
``size`` is the same in every chunk of a transfer; only the receiver, which remembers the
transfer, can check that.

Like every peer message, a chunk can be lost: the outgoing queue drops its oldest
messages when it is over its bounds (``link.py``) and a batch in flight when a link fails
is lost. The sender notices from missing acks, times out and restarts the transfer.
Chunks also share each link's first-in, first-out queue with Raft messages, so every
chunk queued ahead of a heartbeat delays it by that chunk's transmission time: the sender
should keep few chunks outstanding (send more as acks come back).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from liferaft.core.messages import AnyMessage, MalformedMessage

MAX_CHUNK_BYTES = 1 << 20  # 1 MiB of file data per SnapshotChunk at most
CHECKSUM_BYTES = 32  # blake2b digest size of a whole file


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """Sender (leader) -> receiver (follower): ``data`` is the file's bytes from
    ``offset``; ``checksum`` is ``file_hasher()``'s digest of the whole file when ``done``
    and ``b""`` otherwise."""

    term: int
    src: str
    dst: str
    transfer: int  # id chosen by the sender for one transfer of one file
    offset: int  # byte offset of data in the file
    data: bytes  # at most MAX_CHUNK_BYTES
    done: bool  # the last chunk of the file
    size: int  # total file size in bytes (same in every chunk of a transfer)
    checksum: bytes  # blake2b (digest_size=32) of the whole file; b"" unless done


@dataclass(frozen=True, slots=True)
class SnapshotAck:
    """Receiver -> sender."""

    term: int
    src: str
    dst: str
    transfer: int
    next_offset: int  # bytes the receiver holds in order
    ok: bool  # False: the receiver gave up on this transfer (sender must stop)


FileMessage = SnapshotChunk | SnapshotAck
PeerMessage = AnyMessage | SnapshotChunk | SnapshotAck

FILE_MESSAGE_TYPES: tuple[type[SnapshotChunk], type[SnapshotAck]] = (SnapshotChunk, SnapshotAck)


def file_hasher() -> hashlib.blake2b:
    """The hash whose digest is a SnapshotChunk's ``checksum``: feed it the whole file."""
    return hashlib.blake2b(digest_size=CHECKSUM_BYTES)


def validate_file_message(m: FileMessage) -> None:
    """Check what one message can show of its own well-formedness; raise MalformedMessage
    (the core's, a ValueError). Types are the codec's job; this checks values and the
    relations between fields, as the core's ``validate`` does for Raft messages."""
    if not m.src or not m.dst:
        raise MalformedMessage("empty node id")
    if isinstance(m, SnapshotChunk):
        if min(m.term, m.transfer, m.offset, m.size) < 0:
            raise MalformedMessage("negative term, transfer, offset or size")
        if len(m.data) > MAX_CHUNK_BYTES:
            raise MalformedMessage(f"chunk of {len(m.data)} bytes exceeds {MAX_CHUNK_BYTES}")
        end = m.offset + len(m.data)
        if end > m.size:
            raise MalformedMessage("chunk ends beyond the file size")
        if m.done:
            if end != m.size:
                raise MalformedMessage("the last chunk does not end at the file size")
            if len(m.checksum) != CHECKSUM_BYTES:
                raise MalformedMessage(f"the last chunk needs a {CHECKSUM_BYTES}-byte checksum")
        elif m.checksum:
            raise MalformedMessage("only the last chunk carries a checksum")
    elif min(m.term, m.transfer, m.next_offset) < 0:
        raise MalformedMessage("negative term, transfer or next_offset")
