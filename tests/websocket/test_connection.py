"""The WebSocket over a stream: the upgrade, messages both ways, pings, the close
handshake and refusals; against itself and against trio-websocket, an independent
implementation, on in-memory streams."""

from __future__ import annotations

import pytest
import trio
import trio.testing
import trio_websocket

from liferaft.websocket import (
    MESSAGE_TOO_BIG,
    PROTOCOL_ERROR,
    ConnectionClosed,
    ConnectionRejected,
    HandshakeFailed,
    WebSocket,
    connect,
    read_request,
)
from liferaft.websocket.frames import BINARY, encode

LIMIT = 1 << 17


async def open_pair(nursery: trio.Nursery) -> tuple[WebSocket, WebSocket]:
    """Our client and our server, upgraded over an in-memory stream pair."""
    c_stream, s_stream = trio.testing.memory_stream_pair()
    server: list[WebSocket] = []

    async def serve() -> None:
        request = await read_request(s_stream, max_message_size=LIMIT)
        assert request.path == "/v1"
        assert request.header(b"authorization") == b"Bearer t"
        server.append(await request.accept())

    nursery.start_soon(serve)
    client = await connect(
        c_stream,
        "n1",
        "/v1",
        extra_headers=[(b"authorization", b"Bearer t")],
        max_message_size=LIMIT,
    )
    while not server:
        await trio.testing.wait_all_tasks_blocked()
    return client, server[0]


async def test_messages_flow_both_ways_and_one_write_carries_several() -> None:
    async with trio.open_nursery() as nursery:
        client, server = await open_pair(nursery)
        await client.send_message(b"hello")
        assert await server.get_messages() == [b"hello"]
        await server.send_messages([b"a", b"b", b"c"])
        assert await client.get_messages() == [b"a", b"b", b"c"]


async def test_close_handshake_both_sides_see_the_code_and_reason() -> None:
    async with trio.open_nursery() as nursery:
        client, server = await open_pair(nursery)

        async def server_reads() -> None:
            with pytest.raises(ConnectionClosed) as info:
                await server.get_messages()
            assert (info.value.code, info.value.reason) == (4000, "bye")

        nursery.start_soon(server_reads)
        await client.aclose(4000, "bye")
        assert client.closed is not None and client.closed.code == 4000
        with pytest.raises(ConnectionClosed):
            await client.send_message(b"too late")


async def test_aclose_while_another_task_reads_ends_when_the_peer_answers() -> None:
    async with trio.open_nursery() as nursery:
        client, server = await open_pair(nursery)
        reader_saw: list[int] = []

        async def client_reads() -> None:
            with pytest.raises(ConnectionClosed) as info:
                await client.get_messages()
            reader_saw.append(info.value.code)

        async def server_reads() -> None:
            with pytest.raises(ConnectionClosed):
                await server.get_messages()  # echoes the Close

        nursery.start_soon(client_reads)
        nursery.start_soon(server_reads)
        await trio.testing.wait_all_tasks_blocked()
        await client.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert reader_saw == [1000]


async def test_a_ping_is_answered_by_whoever_reads() -> None:
    c_stream, s_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            ws = await (await read_request(s_stream, max_message_size=LIMIT)).accept()
            try:
                while True:
                    await ws.get_messages()
            except ConnectionClosed:
                pass

        nursery.start_soon(serve)
        ws = await trio_websocket.wrap_client_stream(nursery, c_stream, "n1", "/")
        with trio.fail_after(5):
            await ws.ping(b"are you there")  # returns once the matching pong came back
        await ws.aclose()


async def test_trio_websocket_client_talks_to_our_server() -> None:
    c_stream, s_stream = trio.testing.memory_stream_pair()
    got: list[bytes | str] = []
    closed: list[int] = []
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            ws = await (await read_request(s_stream, max_message_size=LIMIT)).accept()
            try:
                while True:
                    for m in await ws.get_messages():
                        got.append(m)
                        assert isinstance(m, bytes)
                        await ws.send_message(m.upper())
            except ConnectionClosed as exc:
                closed.append(exc.code)

        nursery.start_soon(serve)
        ws = await trio_websocket.wrap_client_stream(nursery, c_stream, "n1", "/raft")
        for word in (b"one", b"two" * 30000, b""):
            await ws.send_message(word)
            assert await ws.get_message() == word.upper()
        await ws.aclose(4001, "done")
        await trio.testing.wait_all_tasks_blocked()
    assert got == [b"one", b"two" * 30000, b""]
    assert closed == [4001]


async def test_our_client_talks_to_a_trio_websocket_server() -> None:
    c_stream, s_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            request = await trio_websocket.wrap_server_stream(nursery, s_stream)
            ws = await request.accept()
            try:
                while True:
                    msg = await ws.get_message()
                    await ws.send_message(msg)
            except trio_websocket.ConnectionClosed:
                pass

        nursery.start_soon(serve)
        client = await connect(c_stream, "n1", "/", max_message_size=LIMIT)
        await client.send_messages([b"x", b"y" * 1000])
        got: list[bytes | str] = []
        while len(got) < 2:
            got += await client.get_messages()
        assert got == [b"x", b"y" * 1000]
        with trio.fail_after(5):
            await client.aclose(1000, "")


async def test_a_refused_upgrade_gives_the_status_headers_and_body() -> None:
    c_stream, s_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            request = await read_request(s_stream, max_message_size=LIMIT)
            await request.reject(
                401, extra_headers=[(b"www-authenticate", b"Bearer")], body=b"token expired\n"
            )

        nursery.start_soon(serve)
        with pytest.raises(ConnectionRejected) as info:
            await connect(c_stream, "n1", "/v1", max_message_size=LIMIT)
    assert info.value.status_code == 401
    assert (b"www-authenticate", b"Bearer") in info.value.headers
    assert info.value.body == b"token expired\n"


@pytest.mark.parametrize(
    ("request_text", "status"),
    [
        (b"GET /v1 HTTP/1.1\r\nhost: n1\r\n\r\n", 400),  # plain HTTP, no upgrade
        (
            b"GET /v1 HTTP/1.1\r\nhost: n1\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 8\r\n\r\n",
            426,
        ),
        (
            b"GET /v1 HTTP/1.1\r\nhost: n1\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-key: short\r\nsec-websocket-version: 13\r\n\r\n",
            400,
        ),
    ],
    ids=["no-upgrade", "version-8", "bad-key"],
)
async def test_a_request_that_is_no_websocket_upgrade_is_answered_and_refused(
    request_text: bytes, status: int
) -> None:
    c_stream, s_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            with pytest.raises(HandshakeFailed):
                await read_request(s_stream, max_message_size=LIMIT)

        nursery.start_soon(serve)
        await c_stream.send_all(request_text)
        answer = await c_stream.receive_some(4096)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode())


async def test_malformed_http_is_refused() -> None:
    c_stream, s_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            with pytest.raises(HandshakeFailed):
                await read_request(s_stream, max_message_size=LIMIT)

        nursery.start_soon(serve)
        await c_stream.send_all(b"\x16\x03\x01 not http at all\r\n\r\n")


async def test_a_protocol_violation_closes_with_1002_on_both_sides() -> None:
    async with trio.open_nursery() as nursery:
        client, server = await open_pair(nursery)
        # an unmasked frame from a client breaks RFC 6455 §5.1
        await client._stream.send_all(encode(BINARY, b"bad", masked=False))

        async def client_reads() -> None:
            with pytest.raises(ConnectionClosed) as info:
                await client.get_messages()
            assert info.value.code == PROTOCOL_ERROR

        nursery.start_soon(client_reads)
        with pytest.raises(ConnectionClosed) as info:
            await server.get_messages()
        assert info.value.code == PROTOCOL_ERROR


async def test_a_message_over_the_limit_closes_with_1009() -> None:
    async with trio.open_nursery() as nursery:
        client, server = await open_pair(nursery)
        nursery.start_soon(client.send_message, b"x" * (LIMIT + 1))
        with pytest.raises(ConnectionClosed) as info:
            await server.get_messages()
        assert info.value.code == MESSAGE_TOO_BIG
        with pytest.raises(ConnectionClosed) as info:
            await client.get_messages()
        assert info.value.code == MESSAGE_TOO_BIG


async def test_a_stream_that_ends_without_a_close_frame_is_an_abnormal_close() -> None:
    async with trio.open_nursery() as nursery:
        client, server = await open_pair(nursery)
        await client._stream.aclose()
        with pytest.raises(ConnectionClosed) as info:
            await server.get_messages()
        assert info.value.code == 1006
        with pytest.raises(ConnectionClosed):
            await server.send_message(b"after the end")


async def test_two_tasks_may_not_read_at_once() -> None:
    async with trio.open_nursery() as nursery:
        client, server = await open_pair(nursery)
        nursery.start_soon(server.get_messages)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await server.get_messages()
        await client.send_message(b"for the first reader")
