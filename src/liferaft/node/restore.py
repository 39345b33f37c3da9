"""Offline tools that make a data dir for a NEW cluster: ``snapshot restore`` (from a
backup file) and ``recover`` (from the one surviving member of a cluster that lost its
quorum). Both run while the node is stopped (they take the data dir's lock).

A new cluster gets a new **cluster id** (kept in ``raft.db``; docs/transport.md, "Cluster
identity"): peers send it when they dial, and a node refuses a peer of another cluster,
so restored nodes and the nodes of the old cluster can never vote for or replicate to
each other, even at the same addresses.

The new data dir's log starts with a snapshot at the state's applied index ``A`` (term
1 for a restore) naming the new membership; the state database is the backup (or the
survivor's state with its whole log applied). The first leader's log continues at A+1.
"""

from __future__ import annotations

import datetime
import os
import secrets
import shutil
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from liferaft.backupfile import BackupInfo, extract_db, read_info
from liferaft.config import Settings
from liferaft.core import ConfEntry, EntryKind, HardState, Membership, Snapshot, SnapshotMeta
from liferaft.kv.queries import read_applied
from liferaft.kv.state import DB_NAME, StateDB
from liferaft.node import addresses, transfer
from liferaft.node.state import open_state
from liferaft.security.tls import peer_client_context
from liferaft.storage.sqlite import Storage, fsync_dir
from liferaft.transport.cluster import derive

APPLY_RUN = 1024  # entries applied per transaction while recovering


class RestoreError(Exception):
    """The tool refuses: the message says why and what to do."""


@dataclass(frozen=True)
class Restored:
    data_dir: Path
    cluster_id: str
    applied: int
    revision: int
    members: tuple[str, ...]
    moved_to: Path | None = None  # recover: where the old data dir now is


def restore(backup: Path, settings: Settings) -> Restored:
    """Fill ``settings``' empty data dir from ``backup`` as a member of a new cluster made
    of its ``[cluster] members`` (every member restores the same file)."""
    info = read_info(backup)  # checks size and checksum before anything is written
    if settings.cluster.join:
        raise RestoreError(
            "this config has join = true: restore the members of [cluster] members, start "
            "them, then add other nodes with `liferaft member add` as usual"
        )
    if info.applied < 1:
        raise RestoreError(f"{backup}: the backup stands at log index 0 (an empty cluster)")
    data_dir = settings.node.data_dir
    if data_dir.exists() and any(data_dir.iterdir()):
        raise RestoreError(
            f"data dir {data_dir} is not empty: restore fills a new node's data dir only "
            "(move the old one away first)"
        )
    voters = frozenset(m.id for m in settings.cluster.members)
    cluster_id = derive("restore", info.digest, *sorted(voters))
    book = {m.id: (str(m.peer), str(m.client)) for m in settings.cluster.members}
    # Built whole beside the data dir, then renamed into place: a crash part way leaves
    # no half data dir that a node could start from (only a `.restoring` dir to delete).
    work = _fresh_dir(data_dir.with_name(data_dir.name + ".restoring"))
    _write_state(info, work)
    membership = Membership(voters)
    snap = Snapshot(SnapshotMeta(info.applied, 1, membership), addresses.snapshot_data(book))
    with Storage.open(work, initial=membership) as st:
        st.install_base(snap, HardState(1, None, info.applied), cluster_id=cluster_id)
    if data_dir.exists():
        data_dir.rmdir()  # empty (checked above); fails if someone wrote into it meanwhile
    os.rename(work, data_dir)
    fsync_dir(data_dir.parent)
    return Restored(data_dir, cluster_id, info.applied, info.revision, tuple(sorted(voters)))


def _fresh_dir(path: Path) -> Path:
    """An empty private directory at ``path`` (what an interrupted run left is only ever
    a copy, and is removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(mode=0o700, parents=True)
    return path


def _write_state(info: BackupInfo, data_dir: Path) -> None:
    tmp = data_dir / (DB_NAME + ".restoring")
    tmp.unlink(missing_ok=True)
    extract_db(info, tmp)
    try:
        applied = read_applied(tmp)
    except Exception as exc:
        tmp.unlink()
        raise RestoreError(f"{info.path}: the database in it is not usable: {exc}") from None
    if applied != info.applied:
        tmp.unlink()
        raise RestoreError(
            f"{info.path}: its database stands at {applied}, its description says {info.applied}"
        )
    os.replace(tmp, data_dir / DB_NAME)
    fsync_dir(data_dir)


Probe = Callable[[Mapping[str, tuple[str, int]]], set[str]]
PROBE_SECONDS = 2.0  # a peer that completes no TLS handshake within this is down


def tls_probe(settings: Settings) -> Probe:
    """A probe for ``recover``: the peers that complete a mutual-TLS handshake with this
    node's certificate (a node that is up, whatever its state)."""

    def probe(peers: Mapping[str, tuple[str, int]]) -> set[str]:
        ctx = peer_client_context(settings.tls.ca, settings.tls.cert, settings.tls.key)
        alive = set()
        for peer_id, (host, port) in peers.items():
            try:
                with (
                    socket.create_connection((host, port), timeout=PROBE_SECONDS) as sock,
                    ctx.wrap_socket(sock, server_hostname=peer_id),
                ):
                    alive.add(peer_id)
            except OSError:  # down, unreachable or not a node of ours: no vote from it
                continue
        return alive

    return probe


def recover(settings: Settings, *, probe: Probe) -> Restored:
    """Make this stopped node the one member of a new cluster, from its own data: its
    state with every entry of its log applied (committed or not: whatever a quorum may
    have acknowledged is kept). The old data dir is moved aside, never deleted.

    ``probe`` gets the other voters' peer addresses and returns those that answer; if
    this node and they still make a quorum the cluster is not lost, and this refuses.
    """
    me = settings.node.id
    data_dir = settings.node.data_dir
    if not (data_dir / "raft.db").exists():
        raise RestoreError(f"{data_dir} holds no raft.db: nothing to recover")
    # The data dir's lock, held until the state is copied: refuses while the node runs,
    # and no node can start on the files meanwhile.
    with Storage.open(data_dir) as st:
        stored = st.load()
        old_id = st.cluster_id()
        snap = stored.snapshot
        about = transfer.parse(snap.data) if snap is not None else {}
        membership = snap.meta.membership if snap is not None else stored.initial_membership
        book = {m.id: (str(m.peer), str(m.client)) for m in settings.cluster.members}
        addresses.learn_from_snapshot(book, about, replace=True)
        addresses.learn_from_entries(book, stored.entries)
        for e in stored.entries:
            if e.kind is EntryKind.CONFIG:
                membership = ConfEntry.decode(e.data).membership
        if me not in membership.voters:
            raise RestoreError(f"{me} is not a voter of its cluster ({sorted(membership.voters)})")
        others = membership.voters - {me}
        alive = probe(addresses.peer_hosts(book, others))
        if 1 + len(alive) >= membership.quorum():
            raise RestoreError(
                f"{', '.join(sorted(alive))} answer{'s' if len(alive) == 1 else ''}: with "
                f"{me} that is a quorum of {len(membership.voters)}, so the cluster is not lost. "
                "Start this node and remove dead members with `liferaft member remove` instead"
            )
        if me not in book:
            raise RestoreError(f"no address known for {me}")
        last = stored.entries[-1] if stored.entries else None
        term = last.term if last is not None else (snap.meta.term if snap is not None else 0)
        new_dir = _fresh_dir(data_dir.with_name(data_dir.name + ".recovering"))
        copy = new_dir / DB_NAME
        db = open_state(  # (finishes a snapshot install a crash interrupted, as a start would)
            data_dir,
            snapshot_index=snap.meta.index if snap is not None else 0,
            transfer=about.get("transfer"),
            history_revisions=settings.kv.history_revisions,
        )
        try:
            db.backup(copy)  # the survivor's own files are only read from here on
        finally:
            db.close()
    db = StateDB.open(copy, history_revisions=settings.kv.history_revisions)
    try:
        todo = [e for e in stored.entries if e.index > db.applied]
        for i in range(0, len(todo), APPLY_RUN):
            db.apply(todo[i : i + APPLY_RUN])
        applied, revision = db.applied, db.revision
        db.sync()
    finally:
        db.close()
    fsync_dir(new_dir)
    cluster_id = derive("recover", old_id or "", me, secrets.token_hex(8))
    mine = Membership.of([me])
    base = Snapshot(
        SnapshotMeta(applied, max(term, 1), mine), addresses.snapshot_data({me: book[me]})
    )
    hard = HardState(max(stored.hard_state.term, term, 1), None, applied)
    with Storage.open(new_dir, initial=mine) as st:
        st.install_base(base, hard, cluster_id=cluster_id)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    moved = data_dir.with_name(f"{data_dir.name}.lost-{stamp}")
    os.rename(data_dir, moved)
    os.rename(new_dir, data_dir)
    fsync_dir(data_dir.parent)
    return Restored(data_dir, cluster_id, applied, revision, (me,), moved_to=moved)
