"""The client listener: TLS with the node's certificate, the JWT checked before the
WebSocket upgrade, then one ``Connection`` per client.

A missing, malformed, expired, not-yet-valid, wrongly signed or wrongly addressed token
gets HTTP 401 and no connection, an audit record and
``liferaft_auth_failures_total{reason}``. The TLS handshake and the upgrade must finish
within ``handshake_timeout_ms``; connections beyond ``max_connections`` are closed at
accept.

Connections still in their handshake are bounded on their own (MAX_HANDSHAKING): when
that many are waiting, or the node is at ``max_connections``, a new connection evicts the
oldest one still in its handshake instead of being refused. Sockets that connect and
say nothing (a slow-loris, a flood of idle connections) then cannot lock real clients
out: a client that does TLS and the upgrade promptly always gets its turn
(docs/security.md, "Connections that say nothing").
"""

from __future__ import annotations

import itertools
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from liferaft.api.backups import BackupCount
from liferaft.api.connection import Connection
from liferaft.api.watch import WatchHub
from liferaft.observability.logs import event, node_context
from liferaft.security.tokens import Claims, TokenError, TokenVerifier
from liferaft.websocket import HandshakeFailed, WebSocket, WebSocketError, read_request
from liferaft.websocket.tls import TLSStream

if TYPE_CHECKING:
    from liferaft.config import Settings
    from liferaft.node.node import Node

log = logging.getLogger("liferaft.api")
audit_log = logging.getLogger("liferaft.audit")
PATH = "/v1"
RECEIVE_BUFFER = 64 * 1024  # bytes read from TLS at a time: a 60 KiB array in one read
MAX_HANDSHAKING = 128  # connections in their TLS handshake or upgrade at once, at most


class ClientServer:
    def __init__(self, node: Node, settings: Settings) -> None:
        self.node = node
        self.metrics = node.metrics
        c = settings.client
        self.max_message_bytes = c.max_message_bytes
        self.max_connections = c.max_connections
        self.handshake_timeout = c.handshake_timeout_ms / 1000
        self.auth = a = settings.auth
        self.leeway_s = a.leeway_s
        self.verifier = self._verifier()
        self.watch_hub = WatchHub()
        # connections with answers of the applier's current run: ``send_answers``
        self.answered: dict[Connection, None] = {}
        node.after_apply.append(self.send_answers)
        self.backups = BackupCount()  # api/backups.py
        self.open_connections = 0  # TCP connections accepted and not yet closed
        self.clients = 0  # connections past the upgrade, serving requests
        # connections in their handshake, oldest first: (cancel scope, remote address)
        self._handshaking: dict[int, tuple[trio.CancelScope, str]] = {}
        self._arrivals = itertools.count()
        self.port: int | None = None
        self._requests: dict[tuple[str, str], Any] = {}
        self._durations: dict[str, Any] = {}
        # Read at each scrape: counting stays an integer increment per connection.
        self.metrics.client_connections.set_function(lambda: self.clients)
        self.metrics.client_handshakes.set_function(lambda: len(self._handshaking))
        self.metrics.client_watchers.set_function(lambda: len(self.watch_hub))

    def send_answers(self) -> None:
        """The node's ``after_apply`` hook: each connection answered in this applied run
        sends its answers now, in one message."""
        answered, self.answered = self.answered, {}
        for conn in answered:
            try:
                conn.send_now()
            except Exception as exc:  # a bug of ours: log it; that connection's sender
                # tries the same answers and ends the connection if it fails too, while
                # the other connections' answers and the applier go on
                event(log, "answer_failed", level=logging.ERROR, error=repr(exc)[:300])
                conn.wake_sender()

    def _verifier(self) -> TokenVerifier:
        a = self.auth
        return TokenVerifier.from_files(
            list(a.jwt_public_keys), issuer=a.issuer, audience=a.audience, leeway_s=a.leeway_s
        )

    def reload_token_keys(self) -> bool:
        """Read ``[auth] jwt_public_keys`` again (SIGHUP): every token checked from now on,
        at connect or in a ``refresh``, is checked against those keys. Files that cannot be
        read are refused with ``jwt_keys_reload_refused`` and the old keys stay."""
        try:
            verifier = self._verifier()
        except (ValueError, OSError) as exc:
            with node_context(self.node.id, self.node.last_error):  # from the signal handler
                event(log, "jwt_keys_reload_refused", level=logging.ERROR, error=str(exc)[:500])
            return False
        self.verifier = verifier
        event(
            log,
            "jwt_keys_reloaded",
            files=[str(p) for p in self.auth.jwt_public_keys],
            keys=len(verifier.keys),
            kids=sorted({k.kid for k in verifier.keys if k.kid is not None}),
        )
        return True

    @property
    def ssl_ctx(self) -> ssl.SSLContext:
        """The context of the next client handshake: the node's current certificate."""
        return self.node.tls.client_server

    def observe(self, op: str, code: str, seconds: float) -> None:
        """Count a request; the labelled children are cached (labels() costs a lookup
        with locking on every call, and this runs once per request)."""
        key = (op, code)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self.metrics.client_requests.labels(op, code)
        counter.inc()
        hist = self._durations.get(op)
        if hist is None:
            hist = self._durations[op] = self.metrics.client_request_duration.labels(op)
        hist.observe(seconds)

    async def run(
        self, host: str, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        event(log, "client_listening", address=f"{host}:{self.port}")
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started()

    async def _handle(self, tcp: trio.SocketStream) -> None:
        remote = _remote(tcp)
        full = self.open_connections >= self.max_connections
        if full or len(self._handshaking) >= MAX_HANDSHAKING:
            if not self._handshaking:  # all connections are clients: refuse this one
                event(log, "client_rejected", reason="max_connections", remote=remote)
                await trio.aclose_forcefully(tcp)
                return
            scope, evicted = self._handshaking.pop(next(iter(self._handshaking)))
            scope.cancel()  # the one that has said nothing for longest goes
            event(log, "client_rejected", reason="handshake_evicted", remote=evicted)
        self.open_connections += 1
        stream = TLSStream(tcp, self.ssl_ctx, server_side=True)
        try:
            await self.serve_stream(stream, remote, stream.do_handshake)
        finally:
            self.open_connections -= 1

    async def serve_stream(
        self,
        stream: trio.abc.Stream,
        remote: str,
        handshake: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """One client over ``stream`` (after ``handshake``, the TLS one): the WebSocket
        upgrade with its token, then the connection's requests until it ends; the
        stream is closed in the end. The whole-node simulator calls this directly with
        an in-memory stream."""
        arrival = next(self._arrivals)
        try:
            accepted = None
            with trio.move_on_after(self.handshake_timeout) as scope:
                self._handshaking[arrival] = (scope, remote)
                if handshake is not None:
                    await handshake()
                accepted = await self._upgrade(stream, remote)
            self._handshaking.pop(arrival, None)
            if accepted is not None:
                self.clients += 1
                try:
                    await Connection(self, accepted[0], accepted[1], remote).run()
                finally:
                    self.clients -= 1
        except* (trio.BrokenResourceError, WebSocketError, OSError):
            pass  # the client went away mid-handshake or mid-connection, or spoke no WebSocket
        except* Exception as group:  # the edge of one connection: log it, keep serving
            event(log, "client_connection_error", remote=remote, error=repr(group)[:300])
        finally:
            self._handshaking.pop(arrival, None)
            await trio.aclose_forcefully(stream)

    async def _upgrade(
        self, stream: trio.abc.Stream, remote: str
    ) -> tuple[WebSocket, Claims] | None:
        try:
            request = await read_request(
                stream, max_message_size=self.max_message_bytes, receive_buffer=RECEIVE_BUFFER
            )
        except HandshakeFailed as exc:  # answered with 400 already
            event(log, "client_rejected", reason="upgrade", remote=remote, error=str(exc)[:200])
            return None
        if request.path != PATH:
            await request.reject(404, body=b"not found: the client API is at /v1\n")
            return None
        header = (request.header(b"authorization") or b"").decode("latin-1")
        token = header[7:].strip() if header[:7].lower() == "bearer " else None
        try:
            claims = self.verifier.verify(token, now=time.time())
        except TokenError as exc:
            self.metrics.auth_failures.labels(exc.reason).inc()
            event(
                audit_log,
                "audit",
                subject=None,
                remote=remote,
                op="connect",
                key=None,
                result=f"unauthenticated:{exc.reason}",
            )
            await request.reject(
                401,
                extra_headers=[(b"www-authenticate", b'Bearer realm="liferaft"')],
                body=f"unauthenticated: {exc.reason}\n".encode(),
            )
            return None
        ws = await request.accept()
        return ws, claims


def _remote(tcp: trio.SocketStream) -> str:
    try:
        host, port, *_ = tcp.socket.getpeername()
    except (OSError, ValueError):
        return "?"
    return f"{host}:{port}"
