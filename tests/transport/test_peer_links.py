"""Peer links over real mutual TLS on loopback: batching, identity checks, bad input,
dead peers and reconnects. Every wait is on a condition; ``fail_after`` only guards
against hangs."""

from __future__ import annotations

import random
import socket
import ssl
from collections.abc import Callable, Iterable

import pytest
import trio
import trio_websocket

from conftest import PKI
from liferaft.core.messages import AnyMessage, AppendEntries, Entry, Heartbeat, ReadIndexRequest
from liferaft.security.tls import client_server_context, peer_node_id
from liferaft.transport.codec import encode
from liferaft.transport.files import (
    MAX_CHUNK_BYTES,
    PeerMessage,
    SnapshotAck,
    SnapshotChunk,
    file_hasher,
)
from liferaft.transport.link import backoff_cap
from liferaft.transport.peer import PeerTransport
from liferaft.transport.server import DeliverFailed

HANG_GUARD = 20
LOCAL = "127.0.0.1"


def heartbeats(src: str, dst: str, rounds: Iterable[int]) -> list[AnyMessage]:
    return [Heartbeat(term=1, src=src, dst=dst, commit=0, read_round=r) for r in rounds]


def make(
    pki: PKI, node: str, peers: dict[str, tuple[str, int]] | None = None, **kw: object
) -> PeerTransport:
    return PeerTransport(
        node,
        server_ctx=pki.server_ctx(node),
        client_ctx=pki.client_ctx(node),
        peers=peers or {},
        **kw,  # type: ignore[arg-type]
    )


Events = list[tuple[str, dict[str, object]]]


def recorder(events: Events) -> Callable[[str, dict[str, object]], None]:
    """A transport's ``log`` hook that keeps every event it logs."""
    return lambda event, fields: events.append((event, fields))


async def start_cluster(
    nursery: trio.Nursery,
    pki: PKI,
    ids: list[str],
    logs: dict[str, Events] | None = None,
    **kw: object,
) -> dict[str, PeerTransport]:
    """Start one transport per id on port 0, then tell each the others' ports. With
    ``logs``, each transport's log events are appended to ``logs[id]``."""
    ts = {
        i: make(pki, i, **kw) if logs is None else make(pki, i, log=recorder(logs[i]), **kw)
        for i in ids
    }
    for t in ts.values():
        await nursery.start(t.run, (LOCAL, 0))
    for t in ts.values():
        t.set_peers({j: (LOCAL, ts[j].port or 0) for j in ids if j != t.node_id})
    return ts


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll a transport's counters or state: they change in its own tasks, with no event
    to wait on; the test's fail_after bounds the wait."""
    while not condition():  # noqa: ASYNC110
        await trio.sleep(0.01)


async def receive(t: PeerTransport, n: int) -> list[tuple[str, PeerMessage]]:
    """The next ``n`` messages delivered to ``t``, each with the peer it came from."""
    out: list[tuple[str, PeerMessage]] = []
    while len(out) < n:
        peer, msgs = await t.inbound.receive()
        out.extend((peer, m) for m in msgs)
    assert len(out) == n
    return out


def reserve_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        port: int = s.getsockname()[1]
        return port


async def tls_connect(port: int, ctx: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream(LOCAL, port)
    stream = trio.SSLStream(tcp, ctx, server_hostname="n1")
    await stream.do_handshake()
    return stream


async def assert_refused(port: int, ctx: ssl.SSLContext) -> None:
    try:
        stream = await tls_connect(port, ctx)
    except trio.BrokenResourceError:
        return  # refused during the handshake
    await assert_hung_up(stream)


async def assert_hung_up(stream: trio.abc.ReceiveStream) -> None:
    """The other side closes: EOF or a broken stream (TLS 1.3 reports a refused client
    certificate only after the client's handshake has finished)."""
    try:
        data = await stream.receive_some()
    except trio.BrokenResourceError:
        return
    assert data == b""


async def still_works(src: PeerTransport, dst: PeerTransport, tag: int) -> None:
    src.send(heartbeats(src.node_id, dst.node_id, [tag]))
    [(peer, m)] = await receive(dst, 1)
    assert peer == src.node_id
    assert isinstance(m, Heartbeat) and m.read_round == tag


# ---------------------------------------------------------------- exchanging batches


async def test_three_transports_exchange_batches_both_ways(pki: PKI) -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            ids = ["n1", "n2", "n3"]
            ts = await start_cluster(nursery, pki, ids)
            for a in ids:
                ts[a].send(
                    [
                        m
                        for b in ids
                        if b != a
                        for m in heartbeats(a, b, range(10 * int(a[1]), 10 * int(a[1]) + 10))
                    ]
                )
            for b in ids:
                got = await receive(ts[b], 20)
                for a in ids:
                    if a != b:
                        mine = [m for peer, m in got if peer == a]
                        assert mine == heartbeats(a, b, range(10 * int(a[1]), 10 * int(a[1]) + 10))
            # and back again on the same links
            for a in ids:
                for b in ids:
                    if a != b:
                        await still_works(ts[a], ts[b], 99)
            assert all(t.connects == 2 for t in ts.values())
            assert all(t.stats.accepts == 2 for t in ts.values())
            assert not any(t.rejects for t in ts.values())
            nursery.cancel_scope.cancel()


async def test_a_batch_of_500_messages_travels_as_one_websocket_message(pki: PKI) -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            ts = await start_cluster(nursery, pki, ["n1", "n2"])
            n1, n2 = ts["n1"], ts["n2"]
            batch = [
                AppendEntries(
                    term=1,
                    src="n1",
                    dst="n2",
                    prev_index=i,
                    prev_term=1,
                    entries=(Entry(i + 1, 1, data=b"x" * 100),),
                    commit=0,
                )
                for i in range(500)
            ]
            n1.send(batch)
            peer, msgs = await n2.inbound.receive()
            assert (peer, msgs) == ("n1", batch)
            assert n1.stats.sent_batches["n2"] == 1
            assert n2.stats.received_batches["n1"] == 1
            assert n2.received_bytes["n1"] == n1.sent_bytes["n2"] == len(encode(batch))
            nursery.cancel_scope.cancel()


async def test_a_1_mib_snapshot_chunk_travels_in_order_with_core_messages(pki: PKI) -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            ts = await start_cluster(nursery, pki, ["n1", "n2"])  # default limits
            n1, n2 = ts["n1"], ts["n2"]
            data = random.Random(1).randbytes(MAX_CHUNK_BYTES)
            checksum = file_hasher()
            checksum.update(data)
            chunk = SnapshotChunk(
                term=1,
                src="n1",
                dst="n2",
                transfer=1,
                offset=0,
                data=data,
                done=True,
                size=len(data),
                checksum=checksum.digest(),
            )
            append = AppendEntries(
                term=1, src="n1", dst="n2", prev_index=0, prev_term=0,
                entries=(Entry(1, 1, data=b"after the chunk"),), commit=0,
            )  # fmt: skip
            n1.send([chunk, append])
            peer, msgs = await n2.inbound.receive()  # one batch, both messages, in order
            assert peer == "n1"
            assert msgs == [chunk, append]
            assert n2.received_bytes["n1"] == len(encode([chunk, append]))

            ack = SnapshotAck(
                term=1, src="n2", dst="n1", transfer=1, next_offset=len(data), ok=True
            )
            n2.send([ack])
            assert await receive(n1, 1) == [("n2", ack)]
            assert not n1.dropped and not n2.dropped
            assert not n1.rejects and not n2.rejects
            nursery.cancel_scope.cancel()


async def test_the_default_queue_holds_several_full_chunks(pki: PKI) -> None:
    n1 = make(pki, "n1", peers={"n2": (LOCAL, 1)})  # never run: everything stays queued
    data = b"x" * MAX_CHUNK_BYTES
    n1.send(
        [
            SnapshotChunk(1, "n1", "n2", 1, i * len(data), data, False, 16 * len(data), b"")
            for i in range(16)
        ]
    )
    assert n1.queued("n2") == 16
    assert not n1.dropped


async def test_send_refuses_a_malformed_file_message_before_it_reaches_the_wire(pki: PKI) -> None:
    n1 = make(pki, "n1", peers={"n2": (LOCAL, 1)})
    too_big = SnapshotChunk(1, "n1", "n2", 1, 0, b"x" * (MAX_CHUNK_BYTES + 1), False, 1 << 30, b"")
    with pytest.raises(ValueError, match="refusing to send SnapshotChunk: chunk of"):
        n1.send([*heartbeats("n1", "n2", [1]), too_big, *heartbeats("n1", "n2", [2])])
    assert n1.queued("n2") == 1  # the message before it
    with pytest.raises(ValueError, match="only the last chunk carries a checksum"):
        n1.send([SnapshotChunk(1, "n1", "n2", 1, 0, b"", False, 0, b"\0" * 32)])
    with pytest.raises(ValueError, match="negative"):
        n1.send([SnapshotAck(1, "n2", "n1", 1, -1, True)])
    assert n1.queued("n2") == 1


async def test_quiet_links_send_keepalives_instead_of_going_idle(
    pki: PKI, mock_clock: trio.testing.MockClock
) -> None:
    # Time passes only by jumps of the mock clock: each jump is longer than the keepalive
    # interval (idle / 3) and shorter than the idle timeout, and the next one waits until
    # the keepalives it set off have arrived. Six jumps are three idle timeouts without a
    # message from the core, so links that stay up throughout are kept up by keepalives
    # alone. The clock also runs at real speed, for the hang guards and polls; an idle
    # timeout of an hour is never reached that way, so a slow machine changes nothing.
    mock_clock.rate = 1.0
    idle, jumps = 3600.0, 6
    ids = ["n1", "n2"]
    logs: dict[str, Events] = {i: [] for i in ids}
    async with trio.open_nursery() as nursery:
        with trio.fail_after(HANG_GUARD):
            ts = await start_cluster(nursery, pki, ids, logs=logs, idle_timeout=idle)
            n1, n2 = ts["n1"], ts["n2"]
            await wait_for(lambda: n1.connected("n2") and n2.connected("n1"))
            await wait_for(lambda: n1.stats.accepts == n2.stats.accepts == 1)

        def batches() -> tuple[int, int]:  # what each side received from the other
            return n2.stats.received_batches["n1"], n1.stats.received_batches["n2"]

        def trouble() -> bool:
            return any(t.stats.closes or t.connects > 1 for t in ts.values())

        for jump in range(jumps):

            def keepalive_each_way_or_trouble(had: tuple[int, int] = batches()) -> bool:
                return all(n > h for n, h in zip(batches(), had, strict=True)) or trouble()

            mock_clock.jump(idle / 2)
            with trio.fail_after(HANG_GUARD):
                await wait_for(keepalive_each_way_or_trouble)
            assert_one_quiet_link_each_way(ts, logs, f"after jump {jump + 1}")
        with trio.fail_after(HANG_GUARD):
            await still_works(n1, n2, 7)
            await still_works(n2, n1, 8)
        assert batches() == (jumps + 1, jumps + 1)  # a keepalive per jump, then one message
        assert_one_quiet_link_each_way(ts, logs, "at the end")
        nursery.cancel_scope.cancel()


def assert_one_quiet_link_each_way(
    ts: dict[str, PeerTransport], logs: dict[str, Events], when: str
) -> None:
    """Each transport made one connection and accepted one, and neither side closed one:
    no idle close, no replacement, no redial, nothing refused."""
    for i, t in ts.items():
        where = f"{i} {when}"
        assert t.stats.closes["idle"] == 0, where
        assert sum(t.stats.closes.values()) == 0, (where, t.stats.closes)
        assert (t.connects, t.stats.accepts) == (1, 1), where
        assert link_events(logs[i]) == [("peer_connected", "in"), ("peer_connected", "out")], (
            where,
            logs[i],
        )


def link_events(events: Events) -> list[tuple[str, object]]:
    """What a transport logged about its links (connects, disconnects, idle closes,
    failed dials, refusals), as sorted ``(event, direction)`` pairs."""
    return sorted((e, f.get("direction")) for e, f in events if e != "peer_listening")


# ---------------------------------------------------------------- who may connect


async def test_connections_without_a_member_certificate_are_refused(pki: PKI) -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            ts = await start_cluster(nursery, pki, ["n1", "n2"])
            n1, n2 = ts["n1"], ts["n2"]
            port = n1.port or 0
            await still_works(n2, n1, 1)

            # no client certificate at all
            await assert_refused(port, ssl.create_default_context(cafile=str(pki.ca)))
            await wait_for(lambda: n1.rejects["tls"] == 1)
            await still_works(n2, n1, 2)

            # a certificate for "n2" from another CA
            await assert_refused(port, pki.client_ctx("n2", certs=pki.other))
            await wait_for(lambda: n1.rejects["tls"] == 2)
            await still_works(n2, n1, 3)

            # the right CA, but a name that is not a member
            stream = await tls_connect(port, pki.client_ctx("intruder"))
            await assert_hung_up(stream)
            await wait_for(lambda: n1.rejects["not_member"] == 1)
            await still_works(n2, n1, 4)

            # a member on the wrong path
            stream = await tls_connect(port, pki.client_ctx("n2"))
            statuses = []
            try:
                async with trio.open_nursery() as inner:
                    await trio_websocket.wrap_client_stream(inner, stream, "n1", "/other")
            except* trio_websocket.ConnectionRejected as group:
                statuses = [getattr(e, "status_code", None) for e in group.exceptions]
            assert statuses == [404]
            await wait_for(lambda: n1.rejects["path"] == 1)
            await still_works(n2, n1, 5)
            assert n2.connects == 1  # the legitimate link was never disturbed
            nursery.cancel_scope.cancel()


async def test_a_stalled_handshake_is_dropped_after_the_handshake_timeout(pki: PKI) -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            n1 = make(pki, "n1", handshake_timeout=0.5)
            await nursery.start(n1.run, (LOCAL, 0))
            tcp = await trio.open_tcp_stream(LOCAL, n1.port or 0)  # TCP only, never TLS
            await assert_hung_up(tcp)
            assert n1.rejects["handshake_timeout"] == 1
            await wait_for(lambda: n1.inbound_connections == 0)
            nursery.cancel_scope.cancel()


async def test_connections_over_the_cap_are_refused_at_accept(pki: PKI) -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            n1 = make(pki, "n1", max_connections=2)
            await nursery.start(n1.run, (LOCAL, 0))
            held = [await trio.open_tcp_stream(LOCAL, n1.port or 0) for _ in range(2)]
            await wait_for(lambda: n1.inbound_connections == 2)
            extra = await trio.open_tcp_stream(LOCAL, n1.port or 0)
            await assert_hung_up(extra)
            assert n1.rejects["max_connections"] == 1
            for s in held:
                await s.aclose()
            await wait_for(lambda: n1.inbound_connections == 0)
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- bad input


async def _member_websocket(
    nursery: trio.Nursery, pki: PKI, port: int, node: str
) -> trio_websocket.WebSocketConnection:
    stream = await tls_connect(port, pki.client_ctx(node))
    return await trio_websocket.wrap_client_stream(nursery, stream, "n1", "/raft")


async def test_a_malformed_message_closes_only_its_own_link(pki: PKI) -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            ts = await start_cluster(nursery, pki, ["n1", "n2", "n3"])
            n1 = ts["n1"]
            # n4 is a member n1 knows (at an address where nobody listens)
            n1.set_peers({**n1.peers, "n4": (LOCAL, reserve_port())})
            await still_works(ts["n2"], n1, 1)
            await still_works(ts["n3"], n1, 1)

            for payload, code in [
                (b"\x82\x01\x81\x85\x05", 1007),  # truncated CBOR
                (encode(heartbeats("n4", "n1", [1]))[:-1] + b"\xf5", 1007),  # true for an int
                ("text", 1003),
            ]:
                async with trio.open_nursery() as inner:
                    ws = await _member_websocket(inner, pki, n1.port or 0, "n4")
                    await ws.send_message(payload)
                    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                        await ws.get_message()
                    assert closed.value.reason is not None
                    assert closed.value.reason.code == code
                    inner.cancel_scope.cancel()
                await still_works(ts["n2"], n1, 2)
                await still_works(ts["n3"], n1, 2)

            assert n1.rejects["malformed"] == 3
            assert ts["n2"].connects == ts["n3"].connects == 2  # no link was re-dialled
            nursery.cancel_scope.cancel()


async def test_idle_incoming_connections_are_closed(pki: PKI) -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            n1 = make(pki, "n1", peers={"n4": (LOCAL, reserve_port())}, idle_timeout=0.3)
            await nursery.start(n1.run, (LOCAL, 0))
            ws = await _member_websocket(nursery, pki, n1.port or 0, "n4")
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()  # we never send anything
            assert closed.value.reason is not None and closed.value.reason.code == 1001
            assert n1.stats.closes["idle"] == 1
            nursery.cancel_scope.cancel()


async def test_a_new_connection_from_a_peer_replaces_the_old_one(pki: PKI) -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            n1 = make(pki, "n1", peers={"n4": (LOCAL, reserve_port())})
            await nursery.start(n1.run, (LOCAL, 0))
            first = await _member_websocket(nursery, pki, n1.port or 0, "n4")
            await first.send_message(encode(heartbeats("n4", "n1", [1])))
            assert await receive(n1, 1) == [("n4", heartbeats("n4", "n1", [1])[0])]
            second = await _member_websocket(nursery, pki, n1.port or 0, "n4")
            await second.send_message(encode(heartbeats("n4", "n1", [2])))
            assert await receive(n1, 1) == [("n4", heartbeats("n4", "n1", [2])[0])]
            with pytest.raises(trio_websocket.ConnectionClosed):
                await first.get_message()
            assert n1.stats.closes["replaced"] == 1
            await wait_for(lambda: n1.inbound_connections == 1)
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- dead peers


async def test_a_dead_peer_blocks_nothing_and_gets_its_queue_when_it_comes_up(pki: PKI) -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            dead_port = reserve_port()
            n1 = make(pki, "n1", queue_max_messages=100)
            n3 = make(pki, "n3")
            await nursery.start(n1.run, (LOCAL, 0))
            await nursery.start(n3.run, (LOCAL, 0))
            n1.set_peers({"n2": (LOCAL, dead_port), "n3": (LOCAL, n3.port or 0)})
            n3.set_peers({"n1": (LOCAL, n1.port or 0)})

            n1.send(heartbeats("n1", "n2", range(250)) + heartbeats("n1", "n3", range(5)))
            assert n1.queued("n2") == 100  # bounded: the oldest were dropped
            assert n1.dropped["n2"] == 150
            n1.send(heartbeats("n1", "n9", [0]))  # not a peer
            assert n1.stats.dropped_unknown == 1
            got = await receive(n3, 5)  # the live peer is served meanwhile
            assert [m for _, m in got] == heartbeats("n1", "n3", range(5))
            await wait_for(lambda: n1.stats.dropped["n2"] == 150 and not n1.connected("n2"))

            # n2 comes up on the address n1 has been dialling
            n2 = make(pki, "n2", peers={"n1": (LOCAL, n1.port or 0)})
            await nursery.start(n2.run, (LOCAL, dead_port))
            got = await receive(n2, 100)
            assert [m for _, m in got] == heartbeats("n1", "n2", range(150, 250))
            assert n1.queued("n2") == 0
            assert n1.dropped["n2"] == 150
            nursery.cancel_scope.cancel()


async def test_removed_peers_lose_their_links_and_queue(pki: PKI) -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            ts = await start_cluster(nursery, pki, ["n1", "n2"])
            n1, n2 = ts["n1"], ts["n2"]
            await still_works(n2, n1, 1)
            await still_works(n1, n2, 1)
            n1.set_peers({})
            await wait_for(lambda: n1.inbound_connections == 0)
            n1.send(heartbeats("n1", "n2", [1]))
            assert n1.stats.dropped_unknown == 1
            # n2 still dials n1, but n1 no longer takes n2 for a member
            await wait_for(lambda: n1.rejects["not_member"] >= 1)
            nursery.cancel_scope.cancel()


async def test_a_peer_removed_by_a_committed_change_is_told_so_and_others_are_not(
    pki: PKI,
) -> None:
    """n1 no longer takes n2 and n3 for members; it knows n2 was removed at index 42 and
    nothing of n3. n2's dial gets HTTP 410 with the index, which its transport hands to
    the node; n3's is just hung up on (``not_member``), and n3 is told nothing."""
    told: dict[str, list[tuple[str, int]]] = {"n2": [], "n3": []}
    removed = {"n2": 42}
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            n1 = make(pki, "n1", removed_at=removed.get)
            await nursery.start(n1.run, (LOCAL, 0))
            others = {
                i: make(pki, i, told_removed=lambda by, index, i=i: told[i].append((by, index)))
                for i in ("n2", "n3")
            }
            for t in others.values():
                await nursery.start(t.run, (LOCAL, 0))
                t.set_peers({"n1": (LOCAL, n1.port or 0)})
            await wait_for(lambda: bool(told["n2"]) and n1.rejects["not_member"] >= 1)
            assert told["n2"][0] == ("n1", 42)
            assert told["n3"] == []
            assert n1.rejects["removed"] >= 1
            nursery.cancel_scope.cancel()


async def test_a_changed_address_is_dialled_at_once(pki: PKI) -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            ts = await start_cluster(nursery, pki, ["n1", "n2"])
            n1, n2 = ts["n1"], ts["n2"]
            n1.set_peers({"n2": (LOCAL, reserve_port())})  # n2 "moved" where nobody listens
            await wait_for(lambda: not n1.connected("n2"))
            n1.send(heartbeats("n1", "n2", [1, 2, 3]))
            assert n1.queued("n2") == 3
            n1.set_peers({"n2": (LOCAL, n2.port or 0)})  # and back
            got = await receive(n2, 3)
            assert [m for _, m in got] == heartbeats("n1", "n2", [1, 2, 3])
            nursery.cancel_scope.cancel()


class LongBackoff(random.Random):
    """Every backoff as long as the hang guard allows, and longer."""

    def __init__(self) -> None:
        super().__init__(7)
        self.backoffs = 0

    def uniform(self, a: float, b: float) -> float:
        self.backoffs += 1
        return 10 * HANG_GUARD


async def test_a_peer_that_dials_in_is_dialled_back_without_waiting_out_the_backoff(
    pki: PKI,
) -> None:
    # A restarted node must hear from its peers at once (a leader's election may hang
    # on it), not after a backoff that grew while it was down.
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            port = reserve_port()
            rng = LongBackoff()
            n1 = make(pki, "n1", peers={"n2": (LOCAL, port)}, rng=rng)
            await nursery.start(n1.run, (LOCAL, 0))
            await wait_for(lambda: rng.backoffs == 1)  # n2 is down: n1 backs off
            n1.send(heartbeats("n1", "n2", [1]))
            n2 = make(pki, "n2", peers={"n1": (LOCAL, n1.port or 0)})
            await nursery.start(n2.run, (LOCAL, port))
            got = await receive(n2, 1)
            assert [m for _, m in got] == heartbeats("n1", "n2", [1])
            assert rng.backoffs == 1  # the backoff was cut short, not waited out
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- limits


class RecordingRandom(random.Random):
    def __init__(self) -> None:
        super().__init__(7)
        self.spans: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.spans.append((a, b))
        return super().uniform(a, b)


def test_backoff_doubles_from_50ms_to_2s_without_overflow() -> None:
    caps = [backoff_cap(n) for n in range(8)]
    assert caps == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert backoff_cap(10**6) == 2.0


async def test_reconnects_back_off_with_full_jitter_from_the_injected_rng(pki: PKI) -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            rng = RecordingRandom()
            n1 = make(pki, "n1", peers={"n2": (LOCAL, reserve_port())}, rng=rng)
            await nursery.start(n1.run, (LOCAL, 0))
            await wait_for(lambda: len(rng.spans) >= 4)
            assert rng.spans[:4] == [(0, 0.05), (0, 0.1), (0, 0.2), (0, 0.4)]
            nursery.cancel_scope.cancel()


async def test_queues_are_bounded_in_bytes_too(pki: PKI) -> None:
    n1 = make(pki, "n1", peers={"n2": (LOCAL, 1)}, queue_max_bytes=10_000)
    n1.send(
        [
            AppendEntries(term=1, src="n1", dst="n2", prev_index=i, prev_term=1,
                          entries=(Entry(i + 1, 1, data=b"x" * 1000),), commit=0)
            for i in range(50)
        ]
    )  # fmt: skip
    assert 0 < n1.queued("n2") < 10
    assert n1.dropped["n2"] == 50 - n1.queued("n2")


async def test_batches_over_the_message_limit_are_split(pki: PKI) -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            ts = await start_cluster(nursery, pki, ["n1", "n2"], max_message_bytes=8192)
            n1, n2 = ts["n1"], ts["n2"]
            batch = [
                AppendEntries(term=1, src="n1", dst="n2", prev_index=i, prev_term=1,
                              entries=(Entry(i + 1, 1, data=bytes([i]) * 500),), commit=0)
                for i in range(100)
            ]  # fmt: skip
            big = ReadIndexRequest(term=1, src="n1", dst="n2", ctx=b"x" * 10_000)
            n1.send([*batch, big])  # ~54 KB in all; the last message alone is too big
            got = await receive(n2, 100)
            assert [m for _, m in got] == batch
            assert n2.stats.received_batches["n1"] > 6
            await wait_for(lambda: n1.dropped["n2"] == 1)  # the oversized one
            assert not n2.rejects
            nursery.cancel_scope.cancel()


async def test_a_message_over_the_size_limit_closes_the_link_with_1009(pki: PKI) -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            n1 = make(pki, "n1", peers={"n4": (LOCAL, reserve_port())}, max_message_bytes=1000)
            await nursery.start(n1.run, (LOCAL, 0))
            ws = await _member_websocket(nursery, pki, n1.port or 0, "n4")
            await ws.send_message(encode(heartbeats("n4", "n1", range(100))))
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason is not None and closed.value.reason.code == 1009
            await wait_for(lambda: n1.rejects["malformed"] == 1)
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- identity


class FakeSSLObject:
    def __init__(self, cert: dict[str, object] | None) -> None:
        self.cert = cert

    def getpeercert(self) -> dict[str, object] | None:
        return self.cert


def sans(*names: str) -> dict[str, object]:
    return {"subjectAltName": (*(("DNS", n) for n in names), ("IP Address", "127.0.0.1"))}


def test_peer_node_id_is_the_one_member_the_certificate_names() -> None:
    members = {"n1", "n2", "n3"}
    assert peer_node_id(FakeSSLObject(sans("n2", "localhost")), members) == "n2"
    assert peer_node_id(FakeSSLObject(sans("intruder", "localhost")), members) is None
    assert peer_node_id(FakeSSLObject(sans("n2", "n3")), members) is None  # ambiguous
    assert peer_node_id(FakeSSLObject({}), members) is None
    assert peer_node_id(FakeSSLObject(None), members) is None


def test_peer_contexts_require_certificates_both_ways(pki: PKI) -> None:
    server, client = pki.server_ctx("n1"), pki.client_ctx("n1")
    assert server.verify_mode == client.verify_mode == ssl.CERT_REQUIRED
    assert not server.check_hostname and client.check_hostname
    assert server.minimum_version == client.minimum_version == ssl.TLSVersion.TLSv1_2
    api = client_server_context(pki.dir / "n1.pem", pki.dir / "n1-key.pem")
    assert api.verify_mode == ssl.CERT_NONE


async def test_the_dialling_side_checks_it_reached_the_peer_it_meant(pki: PKI) -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            events: list[tuple[str, dict[str, object]]] = []
            rng = RecordingRandom()
            n1 = make(pki, "n1", log=lambda e, f: events.append((e, f)), rng=rng)
            n2 = make(pki, "n2")
            await nursery.start(n1.run, (LOCAL, 0))
            await nursery.start(n2.run, (LOCAL, 0))
            n2.set_peers({"n1": (LOCAL, n1.port or 0), "n3": (LOCAL, 1)})
            n1.set_peers({"n3": (LOCAL, n2.port or 0)})  # a wrong address: n2 answers there
            n1.send(heartbeats("n1", "n3", [1]))
            await wait_for(lambda: any(e == "peer_connect_failed" for e, _ in events))
            failure = next(f for e, f in events if e == "peer_connect_failed")
            assert "hostname mismatch" in str(failure["error"]).lower()
            await wait_for(lambda: len(rng.spans) >= 2)  # failed handshakes back off too
            assert rng.spans[:2] == [(0, 0.05), (0, 0.1)]
            assert n1.connects == 0 and n1.queued("n3") == 1
            nursery.cancel_scope.cancel()


async def test_an_idle_link_sends_from_the_callers_task_and_order_holds_when_full(
    pki: PKI,
) -> None:
    """``send`` on a connected, idle link writes before it returns (no task switch on
    the message's path); when the socket fills, the rest and everything queued behind
    it still arrive whole and in order."""
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            ts = await start_cluster(nursery, pki, ["n1", "n2"])
            n1, n2 = ts["n1"], ts["n2"]
            await wait_for(lambda: n1.connected("n2"))
            before = n1.stats.sent_batches["n2"]
            n1.send(heartbeats("n1", "n2", [1]))
            assert n1.stats.sent_batches["n2"] == before + 1  # written already
            assert await receive(n2, 1) == [("n1", heartbeats("n1", "n2", [1])[0])]
            sent: list[AnyMessage] = []
            for i in range(40):  # ~40 MiB without a checkpoint: the socket fills up
                big = AppendEntries(
                    term=1, src="n1", dst="n2", prev_index=i, prev_term=1,
                    entries=(Entry(i + 1, 1, data=bytes([i]) * (1 << 20)),), commit=0,
                )  # fmt: skip
                msgs = [big, *heartbeats("n1", "n2", [100 + i])]
                n1.send(msgs)
                sent.extend(msgs)
            got = await receive(n2, len(sent))
            assert [m for _, m in got] == sent
            assert not n1.dropped
            nursery.cancel_scope.cancel()


async def test_a_failing_deliver_ends_the_transport_instead_of_being_logged(pki: PKI) -> None:
    """``deliver`` is the node's code: if it raises, the transport (and the node with it)
    stops, as a crashed forwarding task did; it is not taken for a bad peer."""

    async def broken(peer: str, msgs: list[PeerMessage]) -> None:
        raise RuntimeError("a bug in the node")

    logs: Events = []
    with trio.fail_after(HANG_GUARD):
        n1 = make(pki, "n1")
        n2 = make(pki, "n2", deliver=broken, log=recorder(logs))
        with pytest.raises(BaseExceptionGroup) as caught:
            async with trio.open_nursery() as nursery:
                await nursery.start(n1.run, (LOCAL, 0))
                await nursery.start(n2.run, (LOCAL, 0))
                n1.set_peers({"n2": (LOCAL, n2.port or 0)})
                n2.set_peers({"n1": (LOCAL, n1.port or 0)})
                n1.send(heartbeats("n1", "n2", [1]))
                await trio.sleep_forever()
    assert caught.group_contains(DeliverFailed)
    assert not [e for e, _ in logs if e == "peer_connection_error"]
