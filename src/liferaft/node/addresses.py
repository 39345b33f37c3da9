"""The member address book: where to reach each member, as peer and as client server.

A node learns addresses from three places: its config (the members it starts with),
the CONFIG entries that add members (their context carries the addresses), and the
core's snapshot, which keeps the book once compaction has dropped those entries. The
book maps a member id to ``(peer address, client address)``, both ``host:port``.

A node keeps two books. The one it dials from learns from CONFIG entries as soon as
they are appended: a new member must be reachable before its entry commits, or it
could never catch up to commit it. The one that goes into snapshots learns only from
applied entries: a snapshot is the state as of applied entries, and an appended entry
may still be replaced (a member that never was must not outlive it in a snapshot).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from liferaft.core import ConfEntry, Entry, EntryKind
from liferaft.safecbor import dumps

Addresses = dict[str, tuple[str, str]]  # member id -> (peer address, client address)


def encode(peer: str, client: str) -> bytes:
    """The context of a member's CONFIG entry: where to reach it."""
    return json.dumps({"peer": peer, "client": client}).encode()


def learn_from_entries(addresses: Addresses, entries: Iterable[Entry]) -> None:
    for e in entries:
        if e.kind is EntryKind.CONFIG:
            change = ConfEntry.decode(e.data).change
            if change.context:
                ctx = json.loads(change.context)
                addresses[change.node_id] = (ctx["peer"], ctx["client"])


def learn_from_snapshot(addresses: Addresses, about: dict[str, Any], *, replace: bool) -> None:
    """Add the snapshot's book to ``addresses``; with ``replace`` its addresses win over
    those already known (the applied book: the snapshot is newer than what it held)."""
    members = about.get("members")
    if isinstance(members, dict):
        for k, v in members.items():
            if isinstance(k, str) and isinstance(v, list) and len(v) == 2:
                if replace:
                    addresses[k] = (str(v[0]), str(v[1]))
                else:
                    addresses.setdefault(k, (str(v[0]), str(v[1])))


def snapshot_data(addresses: Addresses) -> bytes:
    """The core's snapshot holds only the member address book, which must survive
    compaction of the CONFIG entries that carried it; the state is ``state.db``."""
    return dumps({"members": addresses})


def peer_hosts(addresses: Addresses, others: Iterable[str]) -> dict[str, tuple[str, int]]:
    """The peer ``(host, port)`` of each of ``others`` whose address is known."""
    peers = {}
    for mid in others:
        if mid in addresses:
            host, _, port = addresses[mid][0].rpartition(":")
            peers[mid] = (host.strip("[]"), int(port))
    return peers


def client_url(addresses: Addresses, node_id: str) -> str | None:
    addr = addresses.get(node_id)
    return f"wss://{addr[1]}/v1" if addr else None
