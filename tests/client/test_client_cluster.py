"""The client library against a real cluster, where the fake server cannot stand in: a
write whose answer is lost is retried with its session and seq and applied once by the
real state machine."""

from __future__ import annotations

from pathlib import Path

import trio

from liferaft.client import open_client
from liferaft.core import EntryKind
from liferaft.kv.commands import decode_entry
from liferaft.node.node import Node
from liferaft.testing.localcluster import LocalCluster, wait_until

HANG = 60  # a guard against hangs, not a performance claim


class _Relay:
    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.hold = False  # keep back what the node sends
        self.held = 0  # bytes kept back (and lost with the relay)


class CuttableProxy:
    """A TCP relay in front of one node's client port. The bytes are TLS records it cannot
    read and need not: ``hold_answers`` keeps back everything the node sends on the open
    connections from then on, ``cut`` closes them (the held bytes are lost). Connections
    made later are relayed in full."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.connections = 0
        self.relays: list[_Relay] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    def hold_answers(self) -> None:
        for relay in self.relays:
            relay.hold = True

    def cut(self) -> None:
        for relay in self.relays:
            relay.scope.cancel()
        self.relays = []

    async def _relay(self, client: trio.SocketStream) -> None:
        self.connections += 1
        relay = _Relay()
        self.relays.append(relay)
        with relay.scope:
            node = await trio.open_tcp_stream("127.0.0.1", self.target)
            async with node, trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, client, node, relay, False)
                nursery.start_soon(self._pipe, node, client, relay, True)
        # serve_listeners closes ``client`` when this returns

    @staticmethod
    async def _pipe(
        src: trio.SocketStream, dst: trio.SocketStream, relay: _Relay, from_node: bool
    ) -> None:
        try:
            async for data in src:
                if from_node and relay.hold:
                    relay.held += len(data)
                else:
                    await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        relay.scope.cancel()  # one side is gone: close both


def session_puts(node: Node, session: bytes) -> list[dict[str, object]]:
    """The put commands of ``session`` in ``node``'s log, in log order."""
    assert node.raft is not None
    log = node.raft.log
    out = []
    for e in log.slice(log.first_index, log.last_index + 1):
        if e.kind is EntryKind.NORMAL:
            for cmd in decode_entry(e.data)[1]:
                if cmd.get("session") == session:
                    out.append(dict(cmd))
    return out


async def test_a_write_whose_answer_is_lost_is_retried_and_applied_exactly_once(
    tmp_path: Path, certs: Path
) -> None:
    """The leader applies a put, its answer never reaches the client (the connection is
    cut while the answer is held back), the client retries on a new connection with the
    same session and seq: the cluster logs the put twice and applies it once."""
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"])
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            lead = await c.wait_leader()
            leader = c.nodes[lead]
            proxy = CuttableProxy(c.ports[lead][1])
            await nursery.start(proxy.run)
            async with open_client(
                [f"wss://127.0.0.1:{proxy.port}"],  # only the leader, only through the proxy
                token=c.token(),
                cacert=certs / "ca.pem",
                timeout=HANG,
                attempt_timeout=HANG / 2,  # the retry must come from the cut, not a timeout
            ) as client:
                await client.put("warm-up", b"x")
                before = leader.kv.db.revision
                proxy.hold_answers()
                revision: list[int] = []

                async def put_once() -> None:
                    revision.append(await client.put("once", b"v"))

                first = proxy.relays[0]
                async with trio.open_nursery() as calls:
                    calls.start_soon(put_once)
                    # The leader applied the put and answered; the proxy holds the answer.
                    await wait_until(
                        lambda: leader.kv.db.get("once")[0] is not None and first.held > 0
                    )
                    assert not revision
                    proxy.cut()  # the answer is lost with the connection
                assert proxy.connections == 2  # the retry came on a new connection

            kv, current = leader.kv.db.get("once")
            assert kv is not None and kv["version"] == 1
            assert current == before + 1  # one application: one revision
            assert revision == [kv["mod_revision"]] == [kv["create_revision"]]  # the first result
            # It really reached the cluster twice: two log entries with one session and seq.
            puts = [p for p in session_puts(leader, client.session) if p["key"] == "once"]
            assert len(puts) == 2 and len({p["seq"] for p in puts}) == 1
        nursery.cancel_scope.cancel()


async def test_reads_from_followers_go_to_a_follower_and_see_every_acknowledged_write(
    tmp_path: Path, certs: Path
) -> None:
    """reads="followers": gets and ranges travel over a second connection, to a node that
    is not the leader, and still see each write acknowledged before them (the follower
    confirms its read index with the leader). Given only the leader's endpoint, reads
    go to the leader."""
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"])
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            lead = await c.wait_leader()
            leader_url = c.endpoints()[c.ids.index(lead)]
            async with open_client(
                c.endpoints(), token=c.token(), cacert=certs / "ca.pem", reads="followers"
            ) as client:
                for i in range(20):
                    await client.put(f"f/{i}", f"v{i}")
                    kv = await client.get(f"f/{i}")
                    assert kv is not None and kv.value == f"v{i}".encode()
                kvs, more = await client.range("f/", limit=50)
                assert len(kvs) == 20 and not more
                assert client.endpoint == leader_url  # writes: the leader
                read_pool = client._read_pool
                assert read_pool is not None and read_pool.conn is not None
                assert read_pool.conn.endpoint.url != leader_url  # reads: a follower
            async with open_client(
                [leader_url], token=c.token(), cacert=certs / "ca.pem", reads="followers"
            ) as client:
                await client.put("only", "leader")
                kv = await client.get("only")
                assert kv is not None and kv.value == b"leader"
        nursery.cancel_scope.cancel()
