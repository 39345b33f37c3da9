"""``Client.put_many`` against a real cluster: the puts of one call travel in one message
and become one log entry; when their answers are lost with the leader, the retries at
the new leader (same session, same seqs) apply nothing twice; a put the token does not
allow is refused on its own, after the others are applied."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import trio
from test_client_cluster import HANG, CuttableProxy, session_puts

from liferaft.client import PermissionDenied, open_client
from liferaft.core import EntryKind
from liferaft.kv.commands import decode_entry
from liferaft.node.node import Node
from liferaft.testing.localcluster import LocalCluster, wait_until

N = 20


class Proxy(CuttableProxy):
    """A CuttableProxy that outlives its node: a connection made after the node is gone
    is closed at once (the client sees a lost connection and moves on)."""

    async def _relay(self, client: trio.SocketStream) -> None:
        with contextlib.suppress(OSError):
            await super()._relay(client)


def entries_with(node: Node, keys: list[str]) -> int:
    """How many log entries of ``node`` hold a write to one of ``keys``."""
    assert node.raft is not None
    log = node.raft.log
    return sum(
        1
        for e in log.slice(log.first_index, log.last_index + 1)
        if e.kind is EntryKind.NORMAL
        and any(cmd.get("key") in keys for cmd in decode_entry(e.data)[1])
    )


async def test_put_many_is_applied_exactly_once_across_a_leader_failover(
    tmp_path: Path, certs: Path
) -> None:
    """The leader applies a put_many of N puts and its answers are held back; the leader
    crashes and the connection is cut. The client retries the N puts with their session
    and seqs until the new leader answers: each key is written once, and the call
    returns the revisions of the first application."""
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"])
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            lead = await c.wait_leader()
            proxy = Proxy(c.ports[lead][1])
            await nursery.start(proxy.run)
            others = [f"wss://127.0.0.1:{c.ports[i][1]}" for i in c.ids if i != lead]
            async with open_client(
                [f"wss://127.0.0.1:{proxy.port}", *others],  # the leader through the proxy
                token=c.token(),
                cacert=certs / "ca.pem",
                timeout=HANG,
                attempt_timeout=HANG / 2,  # the retry must come from the cut, not a timeout
            ) as client:
                await client.put("warm-up", b"x")
                assert proxy.connections == 1
                before = c.nodes[lead].kv.db.revision
                proxy.hold_answers()
                keys = [f"many/{i:02}" for i in range(N)]
                revisions: list[int] = []

                async def put_many() -> None:
                    revisions.extend(await client.put_many([(k, k.encode()) for k in keys]))

                async with trio.open_nursery() as calls:
                    calls.start_soon(put_many)
                    # Every node applied the N puts (one log entry); no answer came back.
                    await wait_until(
                        lambda: all(n.kv.db.get(keys[-1])[0] is not None for n in c.nodes.values())
                    )
                    assert not revisions
                    assert entries_with(c.nodes[lead], keys) == 1  # one message, one entry
                    c.crash(lead)
                    proxy.cut()
                new = c.leader()
                assert new is not None and new != lead

            node = c.nodes[new]
            assert revisions == list(range(before + 1, before + N + 1))  # the first results
            for key, rev in zip(keys, revisions, strict=True):
                kv, _ = node.kv.db.get(key)
                assert kv is not None and kv["version"] == 1 and kv["mod_revision"] == rev
            assert node.kv.db.revision == before + N  # nothing applied twice
            # ... though each put did reach the log twice (or more), under one seq.
            puts = session_puts(node, client.session)
            for key in keys:
                mine = [p for p in puts if p["key"] == key]
                assert len(mine) >= 2 and len({p["seq"] for p in mine}) == 1
        nursery.cancel_scope.cancel()


async def test_put_many_outside_the_token_prefixes(tmp_path: Path, certs: Path) -> None:
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"])
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            lead = await c.wait_leader()
            async with open_client(
                c.endpoints(), token=c.token(prefixes=["app/"]), cacert=certs / "ca.pem"
            ) as client:
                items = [("app/1", b"1"), ("etc/x", b"2"), ("app/2", b"3"), ("etc/y", b"4")]
                with pytest.raises(PermissionDenied) as info:
                    await client.put_many(items)
                assert "etc/x" in info.value.message  # the first refused, in item order
                assert "2 of 4 puts failed" in "".join(info.value.__notes__)
                # The allowed puts were applied (in order), the refused ones not.
                kvs, _ = await client.range("app/")
                assert [(kv.key, kv.value) for kv in kvs] == [("app/1", b"1"), ("app/2", b"3")]
                assert kvs[0].mod_revision < kvs[1].mod_revision
                assert await client.put_many([("app/3", b"5")]) == [kvs[1].mod_revision + 1]
            db = c.nodes[lead].kv.db
            assert db.get("etc/x")[0] is None and db.get("etc/y")[0] is None
        nursery.cancel_scope.cancel()
