"""liferaft.client: talk to a liferaft cluster from Python.

The async client (Trio) pipelines every request over one TLS WebSocket, packs requests
made at the same moment into one message, finds the leader by itself, and retries writes
with a session and seq so that each one applies at most once (docs/client-protocol.md)::

    import trio
    from liferaft.client import open_client, compare, op_put, op_get

    async def main():
        async with open_client(
            ["wss://127.0.0.1:8001", "wss://127.0.0.1:8002", "wss://127.0.0.1:8003"],
            token=open("client.jwt").read().strip(),   # liferaft token --key ... --sub me
            cacert="certs/ca.pem",
        ) as client:
            rev = await client.put("app/config", b'{"mode": "fast"}')
            revs = await client.put_many([("app/a", b"1"), ("app/b", b"2")])  # one message
            kv = await client.get("app/config")            # KeyValue or None
            kvs, more = await client.range("app/", limit=100)
            n = await client.delete(prefix="tmp/")
            r = await client.txn(                          # create if absent
                compare=[compare("app/lock", "version", "==", 0)],
                success=[op_put("app/lock", "me")],
                failure=[op_get("app/lock")],
            )
            async with client.watch(prefix="app/", start_revision=rev) as events:
                async for ev in events:
                    print(ev.type, ev.kv.key, ev.kv.value)
                    break
            print((await client.status()).leader_id)

    trio.run(main)

On asyncio, :mod:`liferaft.client.aio` has the same client (``AsyncioClient``,
``open_client``, ``Lock``, ``Election``), on the same sans-I/O protocol core
(liferaft.client.core), the same operations (liferaft.client.api) and the same lock and
election recipe (liferaft.client.recipe); it needs ``pip install 'liferaft[asyncio]'``.

For scripts without an event loop, :class:`SyncClient` has the same methods and blocks::

    from liferaft.client import SyncClient

    with SyncClient("wss://127.0.0.1:8001", token=jwt, cacert="certs/ca.pem") as c:
        c.put("k", "v")
        print(c.get("k").text)

Coordination (docs/coordination.md): leases (``lease_grant``, ``keep_alive``, ``put(...,
lease=...)``), :class:`Lock` with fencing tokens and :class:`Election`::

    async with Lock(client, "jobs/nightly", ttl=10) as lock:
        await write_somewhere(fencing_token=lock.token)

Errors are typed (:class:`LiferaftError` and one subclass per error code of the protocol):
``Unauthenticated`` for a refused token, ``PermissionDenied``, ``Unavailable`` when no
quorum or no endpoint answered within the call's ``timeout``, ``Compacted``, and so on.
"""

from __future__ import annotations

from liferaft.client.api import Member, Status
from liferaft.client.client import DEFAULT_ENDPOINT, Client, open_client
from liferaft.client.coordination import (
    ELECTION_PREFIX,
    LOCK_PREFIX,
    Election,
    LeaderWatch,
    Lock,
    LockLost,
    NotElected,
)
from liferaft.client.errors import (
    Compacted,
    ConnectionFailed,
    InternalError,
    InvalidRequest,
    LeaseLost,
    LiferaftError,
    MemberError,
    NoSpace,
    NotFound,
    NotLeader,
    PermissionDenied,
    TLSError,
    TooLarge,
    Unauthenticated,
    Unavailable,
    error_from_wire,
)
from liferaft.client.leases import KeepAlive
from liferaft.client.models import (
    KeyValue,
    Lease,
    LeaseTTL,
    TxnResult,
    WatchEvent,
    compare,
    op_delete,
    op_get,
    op_put,
    op_range,
)
from liferaft.client.sync import (
    SyncClient,
    SyncElection,
    SyncKeepAlive,
    SyncLock,
    SyncWatch,
)
from liferaft.client.watch import Watch

__all__ = [
    "DEFAULT_ENDPOINT",
    "ELECTION_PREFIX",
    "LOCK_PREFIX",
    "Client",
    "Compacted",
    "ConnectionFailed",
    "Election",
    "InternalError",
    "InvalidRequest",
    "KeepAlive",
    "KeyValue",
    "LeaderWatch",
    "Lease",
    "LeaseLost",
    "LeaseTTL",
    "LiferaftError",
    "Lock",
    "LockLost",
    "Member",
    "MemberError",
    "NoSpace",
    "NotElected",
    "NotFound",
    "NotLeader",
    "PermissionDenied",
    "Status",
    "SyncClient",
    "SyncElection",
    "SyncKeepAlive",
    "SyncLock",
    "SyncWatch",
    "TLSError",
    "TooLarge",
    "TxnResult",
    "Unauthenticated",
    "Unavailable",
    "Watch",
    "WatchEvent",
    "compare",
    "error_from_wire",
    "op_delete",
    "op_get",
    "op_put",
    "op_range",
    "open_client",
]
