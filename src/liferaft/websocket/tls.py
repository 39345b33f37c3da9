"""TLS over a Trio TCP socket, with the ``ssl`` module's socket in non-blocking mode.

Why not ``trio.SSLStream``: it drives an ``ssl.SSLObject`` through memory BIOs so that it
can run over any Trio stream, and pays for that generality on every call (a Python
retry loop, two locks and conflict detectors, a copy through each BIO, a transport
``receive_some`` or ``send_all`` with its own checkpoints). liferaft only ever runs TLS
over TCP, and on this project's machine that layer cost about 30 µs per message and
direction, about half of what a message costs (docs/transport.md, "The WebSocket").
Here OpenSSL reads and writes the socket itself; a call that would block waits for the
socket with ``trio.lowlevel.wait_readable``/``wait_writable``.

Trio's rules are kept: each call is a checkpoint (it yields once if it did not wait),
a receive cancelled while waiting loses nothing, and a send cancelled while waiting
leaves the stream broken (the peer may have seen half a record). Errors are
Trio's: ``BrokenResourceError`` (with the ``ssl`` or ``OSError`` as its cause) and
``ClosedResourceError`` after ``aclose``. An end of stream without TLS close_notify
reads as an ordinary end (``suppress_ragged_eofs``): the WebSocket close handshake
above is what says a conversation ended well.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Any

import trio

RECEIVE_MAX = 256 * 1024  # a receive_some without a size reads at most this


class TLSStream(trio.abc.Stream):
    """One TLS connection. Call ``do_handshake`` first (bound it with a timeout)."""

    def __init__(
        self,
        tcp: trio.SocketStream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        raw = socket.socket(fileno=tcp.socket.detach())
        raw.setblocking(False)
        self._sock = context.wrap_socket(
            raw,
            server_side=server_side,
            server_hostname=server_hostname,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=True,
        )
        self._closed = False
        self._broken: BaseException | None = None
        self._receiving = False
        self._sending = False

    # ---------------------------------------------------------------- TLS facts

    def getpeercert(self) -> Any:
        """The verified peer certificate (``ssl.SSLSocket.getpeercert``)."""
        return self._sock.getpeercert()

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    @property
    def version(self) -> str | None:
        return self._sock.version()

    # ---------------------------------------------------------------- the stream

    async def do_handshake(self) -> None:
        self._check()
        while True:
            try:
                self._sock.do_handshake()
            except ssl.SSLWantReadError:
                await self._wait(trio.lowlevel.wait_readable)
            except ssl.SSLWantWriteError:
                await self._wait(trio.lowlevel.wait_writable)
            except (ssl.SSLError, OSError) as exc:
                self._broken = exc
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            else:
                await trio.lowlevel.checkpoint()
                return

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check()
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            waited = False
            while True:
                try:
                    data = self._sock.recv(max_bytes or RECEIVE_MAX)
                except ssl.SSLWantReadError:
                    waited = True
                    await self._wait(trio.lowlevel.wait_readable)
                except ssl.SSLWantWriteError:  # a TLS 1.3 post-handshake message to send
                    waited = True
                    await self._wait(trio.lowlevel.wait_writable)
                except (ssl.SSLError, OSError) as exc:
                    self._broken = exc
                    raise trio.BrokenResourceError(str(exc)) from exc
                else:
                    break
            if not waited:
                await trio.lowlevel.checkpoint()
            return data
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            view = memoryview(data)
            total = len(view)
            sent = 0
            waited = False
            while sent < total:
                try:
                    sent += self._sock.send(view[sent:])
                except ssl.SSLWantWriteError:
                    waited = True
                    await self._wait_sending(trio.lowlevel.wait_writable)
                except ssl.SSLWantReadError:  # renegotiation-like input needed first
                    waited = True
                    await self._wait_sending(trio.lowlevel.wait_readable)
                except (ssl.SSLError, OSError) as exc:
                    self._broken = exc
                    raise trio.BrokenResourceError(str(exc)) from exc
            if not waited:
                await trio.lowlevel.checkpoint()
        finally:
            self._sending = False

    def send_now(self, data: bytes) -> int | None:
        """Write what the socket takes of ``data`` now, without waiting: the number of
        bytes written, the rest to follow through ``send_all`` before any other data
        (OpenSSL must be given the same bytes again); None, writing nothing, while a
        ``send_all`` is in progress. Raises like ``send_all``."""
        self._check()
        if self._sending:
            return None
        view = memoryview(data)
        total = len(view)
        sent = 0
        while sent < total:
            try:
                sent += self._sock.send(view[sent:])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            except (ssl.SSLError, OSError) as exc:
                self._broken = exc
                raise trio.BrokenResourceError(str(exc)) from exc
        return sent

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        await self._wait(trio.lowlevel.wait_writable)

    async def aclose(self) -> None:
        """Send close_notify if it goes out at once (never wait for the peer's), then
        close the socket; a task waiting on it gets ClosedResourceError."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        if self._broken is None:
            # close_notify unsent or unanswered: the socket closes anyway
            with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                self._sock.unwrap()
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()
        await trio.lowlevel.checkpoint()

    # ---------------------------------------------------------------- helpers

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream was closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(f"the TLS stream broke: {self._broken}")

    async def _wait(self, wait: Any) -> None:
        try:
            await wait(self._sock)
        except trio.ClosedResourceError:
            self._check()
            raise

    async def _wait_sending(self, wait: Any) -> None:
        """Wait in the middle of a send. OpenSSL must be given the same bytes again after
        it asked to wait (part of a record may be out already), so a send cancelled here
        breaks the stream: nothing may follow half a record."""
        try:
            await self._wait(wait)
        except trio.Cancelled:
            self._broken = trio.BrokenResourceError("a send was cancelled midway")
            raise
