"""The TLS stream over a real loopback socket: mutual TLS accepted and refused, data in
both directions (a send larger than the socket buffers waits and completes), the end
of a stream, cancellation, and close waking a waiting reader."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from liferaft.security.tls import peer_client_context, peer_node_id, peer_server_context
from liferaft.websocket import WebSocket
from liferaft.websocket.tls import TLSStream


def server_ctx(certs: Path) -> ssl.SSLContext:
    return peer_server_context(certs / "ca.pem", certs / "n1.pem", certs / "n1-key.pem")


def client_ctx(certs: Path, node: str = "n2") -> ssl.SSLContext:
    return peer_client_context(certs / "ca.pem", certs / f"{node}.pem", certs / f"{node}-key.pem")


@asynccontextmanager
async def tls_pair(
    server: ssl.SSLContext, client: ssl.SSLContext, hostname: str = "n1"
) -> AsyncIterator[tuple[TLSStream, TLSStream]]:
    """A connected (client, server) pair over 127.0.0.1, handshakes not yet done."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with listeners[0]:
        tcp_client = await trio.open_tcp_stream("127.0.0.1", port)
        tcp_server = await listeners[0].accept()
    c = TLSStream(tcp_client, client, server_side=False, server_hostname=hostname)
    s = TLSStream(tcp_server, server, server_side=True)
    try:
        yield c, s
    finally:
        await trio.aclose_forcefully(c)
        await trio.aclose_forcefully(s)


async def handshake(c: TLSStream, s: TLSStream) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.do_handshake)
        nursery.start_soon(s.do_handshake)


async def test_mutual_tls_carries_data_both_ways_and_names_the_peer(certs: Path) -> None:
    async with tls_pair(server_ctx(certs), client_ctx(certs)) as (c, s):
        with trio.fail_after(10):
            await handshake(c, s)
            assert peer_node_id(s, ["n1", "n2", "n3"]) == "n2"
            assert peer_node_id(c, ["n1", "n2", "n3"]) == "n1"
            assert c.version in ("TLSv1.2", "TLSv1.3")
            await c.send_all(b"ping")
            assert await s.receive_some(100) == b"ping"
            await s.send_all(b"pong")
            assert await c.receive_some(100) == b"pong"


async def test_a_send_larger_than_the_socket_buffers_completes(certs: Path) -> None:
    data = bytes(range(256)) * 40_000  # 10 MB: the send must wait for the reader
    got = bytearray()
    async with tls_pair(server_ctx(certs), client_ctx(certs)) as (c, s):
        with trio.fail_after(30):
            await handshake(c, s)

            async def read() -> None:
                while len(got) < len(data):
                    got.extend(await s.receive_some(65536))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await c.send_all(data)
    assert got == data


async def test_a_certificate_from_another_ca_is_refused(certs: Path, other_ca: Path) -> None:
    async with (
        tls_pair(server_ctx(certs), client_ctx(other_ca)) as (c, s),
        trio.open_nursery() as n,
    ):

        async def client_side() -> None:
            with pytest.raises(trio.BrokenResourceError):
                await c.do_handshake()  # the server hangs up on it

        n.start_soon(client_side)
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as info:
            await s.do_handshake()
        assert isinstance(info.value.__cause__, ssl.SSLError)
        with pytest.raises(trio.BrokenResourceError):
            await s.receive_some(10)  # a broken stream stays broken


async def test_a_server_whose_certificate_names_another_member_is_refused(certs: Path) -> None:
    pair = tls_pair(server_ctx(certs), client_ctx(certs), hostname="n3")
    async with pair as (c, s), trio.open_nursery() as nursery:

        async def server_side() -> None:
            with pytest.raises(trio.BrokenResourceError):
                await s.do_handshake()

        nursery.start_soon(server_side)
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as info:
            await c.do_handshake()
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


async def test_the_end_of_the_peers_stream_reads_as_empty(certs: Path) -> None:
    async with tls_pair(server_ctx(certs), client_ctx(certs)) as (c, s):
        with trio.fail_after(10):
            await handshake(c, s)
            await c.send_all(b"last words")
            await c.aclose()
            assert await s.receive_some(100) == b"last words"
            assert await s.receive_some(100) == b""


async def test_close_wakes_a_waiting_reader_and_later_calls_fail(certs: Path) -> None:
    async with tls_pair(server_ctx(certs), client_ctx(certs)) as (c, s):
        with trio.fail_after(10):
            await handshake(c, s)
            async with trio.open_nursery() as nursery:

                async def reader() -> None:
                    with pytest.raises(trio.ClosedResourceError):
                        await s.receive_some(100)

                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                await s.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await s.send_all(b"after close")


async def test_a_cancelled_receive_loses_nothing(certs: Path) -> None:
    async with tls_pair(server_ctx(certs), client_ctx(certs)) as (c, s):
        with trio.fail_after(10):
            await handshake(c, s)
            with trio.move_on_after(0.01) as scope:
                await s.receive_some(100)  # nothing comes
            assert scope.cancelled_caught
            await c.send_all(b"after the cancel")
            assert await s.receive_some(100) == b"after the cancel"


async def test_a_send_cancelled_while_waiting_breaks_the_stream(certs: Path) -> None:
    async with tls_pair(server_ctx(certs), client_ctx(certs)) as (c, s):
        with trio.fail_after(10):
            await handshake(c, s)
            with trio.move_on_after(0.2) as scope:
                await c.send_all(b"x" * 50_000_000)  # nobody reads: the send must wait
            assert scope.cancelled_caught
            with pytest.raises(trio.BrokenResourceError):
                await c.send_all(b"more")


async def test_two_tasks_may_not_receive_at_once(certs: Path) -> None:
    async with tls_pair(server_ctx(certs), client_ctx(certs)) as (c, s):
        with trio.fail_after(10):
            await handshake(c, s)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(s.receive_some, 100)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await s.receive_some(100)
                await c.send_all(b"for the first")


async def test_send_now_writes_at_once_and_what_the_socket_left_goes_first_next(
    certs: Path,
) -> None:
    """``WebSocket.send_now`` over TLS: sent from the caller's task; when the socket is
    full the rest waits in the WebSocket, a later send puts it first, and the reader
    gets every message whole and in order."""
    async with tls_pair(server_ctx(certs), client_ctx(certs)) as (c, s):
        with trio.fail_after(30):
            await handshake(c, s)
            out = WebSocket(c, client=True, max_message_size=1024, receive_buffer=65536)
            into = WebSocket(s, client=False, max_message_size=2 << 20, receive_buffer=65536)
            assert out.send_now([b"first", b"second"]) and not out.pending
            assert await into.get_messages() == [b"first", b"second"]
            sent = []
            for i in range(64):  # nobody reads: the socket buffers fill up
                msg = bytes([i]) * (1 << 20)
                assert out.send_now([msg])
                sent.append(msg)
                if out.pending:
                    break
            assert out.pending, "64 MiB unread and the socket took it all"
            assert not out.can_send_now and not out.send_now([b"not now"])
            got: list[bytes | str] = []

            async def read() -> None:
                while len(got) < len(sent) + 1:
                    got.extend(await into.get_messages())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await out.send_messages([b"after"])
            assert not out.pending
            assert got == [*sent, b"after"]


async def test_send_now_sends_nothing_while_another_send_waits(certs: Path) -> None:
    async with tls_pair(server_ctx(certs), client_ctx(certs)) as (c, s):
        with trio.fail_after(30):
            await handshake(c, s)
            out = WebSocket(c, client=True, max_message_size=1024, receive_buffer=65536)
            into = WebSocket(s, client=False, max_message_size=64 << 20, receive_buffer=65536)
            big = b"x" * (32 << 20)  # more than the socket buffers take: the send waits
            got: list[bytes | str] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(out.send_messages, [big])
                await trio.testing.wait_all_tasks_blocked()
                assert not out.can_send_now and not out.send_now([b"small"])
                while len(got) < 1:
                    got.extend(await into.get_messages())
            assert got == [big]
            assert out.send_now([b"small"])
            assert await into.get_messages() == [b"small"]
