"""A tiny HTTP/1.1 server on Trio for /metrics, /healthz (/livez) and /readyz.

One request per connection: the server reads the request head (at most
``MAX_REQUEST_BYTES``), answers, half-closes and hangs up (``Connection: close``).
Request bodies are never read. Every connection is bounded in time
(``request_timeout`` for the whole exchange) and in number (``max_connections``;
extra connections are closed at once), so an idle or hostile client can neither hold
the server nor grow its memory. Bad bytes from outside are answered with a 4xx and
never crash the server; an exception inside a route becomes a 500.

Routes (GET and HEAD; other methods on these paths get 405, other paths 404):

- ``/metrics``: the node's registry in the Prometheus text format 0.0.4;
- ``/healthz`` and ``/livez``: 200 ``ok`` while ``health()`` is true, else 503;
- ``/readyz``: 200 ``ready`` or 503 with the reason ``ready()`` gives.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import trio

from liferaft.observability.logs import event
from liferaft.observability.metrics import CONTENT_TYPE, NodeMetrics

log = logging.getLogger("liferaft.observability.http")

#: The largest request head (request line and headers) the server reads.
MAX_REQUEST_BYTES: Final = 8192
#: After answering, how long the server drains what the client still sends before
#: closing (closing with unread bytes would reset the connection and may lose the answer).
LINGER_SECONDS: Final = 0.5
_LINGER_BYTES: Final = 64 * 1024

_TEXT: Final = "text/plain; charset=utf-8"
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_ALLOWED: Final = ("GET", "HEAD")
# RFC 9110: method = token; the target is anything visible; version HTTP/d.d.
_REQUEST_LINE: Final = re.compile(
    r"(?P<method>[!#$%&'*+\-.^_`|~0-9A-Za-z]+) (?P<target>[\x21-\x7e]+) "
    r"HTTP/(?P<major>[0-9])\.(?P<minor>[0-9])"
)
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class HTTPError(Exception):
    """The client's request cannot be served: answered with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    path: str  # the target without query, "/" based
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = _TEXT
    headers: tuple[tuple[str, str], ...] = ()


def find_head_end(buf: bytes | bytearray) -> int:
    """The index just past the blank line ending the request head, or -1 if not yet
    received. Bare LF line endings are tolerated (RFC 9112 §2.2)."""
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := buf.find(sep)) >= 0]
    return min(ends) if ends else -1


def parse_request(head: bytes) -> Request:
    """Parse a request head (request line and header fields, blank line included or
    not). Raises HTTPError(400) on anything malformed, HTTPError(505) on HTTP/2+."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise HTTPError(400, "request head is not ASCII") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise HTTPError(400, "empty request")
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        raise HTTPError(400, "malformed request line")
    if m["major"] != "1":
        raise HTTPError(505, "only HTTP/1.x is supported")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or _HEADER_NAME.fullmatch(name) is None:
            raise HTTPError(400, "malformed header field")
        headers.append((name.lower(), value.strip(" \t")))
    target = m["target"]
    if target.startswith("/"):
        path = target.partition("?")[0]
    elif target.startswith(("http://", "https://")):  # absolute-form (RFC 9112 §3.2.2)
        path = urlsplit(target).path or "/"
    elif target == "*":
        path = "*"
    else:
        raise HTTPError(400, "malformed request target")
    return Request(m["method"], target, path, tuple(headers))


def render(response: Response, *, head_only: bool = False) -> bytes:
    """The bytes of ``response``: status line, headers, and the body unless HEAD."""
    reason = _REASONS.get(response.status, "Unknown")
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        "Cache-Control: no-store",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head if head_only else head + response.body


class HealthServer:
    """Serves one node's /metrics, /healthz, /livez and /readyz over plain HTTP.

    ``health()`` says whether the node runs and its storage accepts writes; ``ready()``
    returns ``(True, "")`` when the node can serve linearizable reads, or
    ``(False, reason)``. Both are called on the Trio thread for each request and must
    not block.
    """

    def __init__(
        self,
        metrics: NodeMetrics,
        health: Callable[[], bool],
        ready: Callable[[], tuple[bool, str]],
        *,
        max_connections: int = 64,
        request_timeout: float = 5.0,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        self.metrics = metrics
        self.health = health
        self.ready = ready
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.port = 0  # the bound port, once run() has started
        self.listeners: list[trio.SocketListener] = []
        self.active_connections = 0
        self.refused_connections = 0
        self._routes: dict[str, Callable[[], Response]] = {
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            "/livez": self._healthz,
            "/readyz": self._readyz,
        }

    async def run(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host:port`` (port 0 picks a free one, see ``self.port``) and
        serve until cancelled. ``nursery.start(server.run, ...)`` returns the port.

        A host name resolving to several addresses gets one listener each; with port 0
        they may get different ports, and ``self.port`` is the first one's."""
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        self.listeners = listeners
        self.port = int(listeners[0].socket.getsockname()[1])
        event(log, "metrics_server_listening", host=host, port=self.port)
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    # ---------------------------------------------------------------- connections

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One connection. serve_listeners closes ``stream`` when this returns."""
        if self.active_connections >= self.max_connections:
            self.refused_connections += 1
            return
        self.active_connections += 1
        try:
            with trio.move_on_after(self.request_timeout):
                await self._exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception as exc:  # never let one connection take the server down
            event(log, "http_connection_failed", level=logging.WARNING, error=repr(exc))
        finally:
            self.active_connections -= 1

    async def _exchange(self, stream: trio.SocketStream) -> None:
        head_only = False
        try:
            head = await self._read_head(stream)
            if head is None:
                return  # closed before sending anything
            request = parse_request(head)
            head_only = request.method == "HEAD"
            response = self._respond(request)
        except HTTPError as exc:
            response = Response(exc.status, exc.message.encode("ascii"))
        await stream.send_all(render(response, head_only=head_only))
        await self._linger(stream)

    async def _read_head(self, stream: trio.SocketStream) -> bytes | None:
        buf = bytearray()
        while (end := find_head_end(buf)) < 0:
            if len(buf) > MAX_REQUEST_BYTES:
                raise HTTPError(431, "request head too large")
            chunk = await stream.receive_some(MAX_REQUEST_BYTES + 1 - len(buf))
            if not chunk:
                if not buf:
                    return None
                raise HTTPError(400, "incomplete request")
            buf += chunk
        if end > MAX_REQUEST_BYTES:
            raise HTTPError(431, "request head too large")
        return bytes(buf[:end])

    async def _linger(self, stream: trio.SocketStream) -> None:
        """Half-close and drain briefly, so the client reads the answer before we hang up."""
        await stream.send_eof()
        drained = 0
        with trio.move_on_after(LINGER_SECONDS):
            while drained < _LINGER_BYTES:
                chunk = await stream.receive_some(16384)
                if not chunk:
                    break
                drained += len(chunk)

    # ---------------------------------------------------------------- routes

    def _respond(self, request: Request) -> Response:
        route = self._routes.get(request.path)
        if route is None:
            return Response(404, b"not found")
        if request.method not in _ALLOWED:
            return Response(405, b"method not allowed", headers=(("Allow", ", ".join(_ALLOWED)),))
        try:
            return route()
        except Exception as exc:
            event(
                log,
                "http_handler_failed",
                level=logging.ERROR,
                path=request.path,
                error=repr(exc),
            )
            return Response(500, b"internal error")

    def _metrics(self) -> Response:
        return Response(200, self.metrics.exposition(), CONTENT_TYPE)

    def _healthz(self) -> Response:
        if self.health():
            return Response(200, b"ok")
        return Response(503, b"unhealthy: node stopped or storage not accepting writes")

    def _readyz(self) -> Response:
        ok, reason = self.ready()
        if ok:
            return Response(200, b"ready")
        body = (reason or "not ready").encode("utf-8", "replace")
        return Response(503, body)
