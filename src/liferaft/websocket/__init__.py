"""liferaft's own WebSocket (RFC 6455): the wire under both the peer transport and the
client API (docs/architecture.md, "The wire")."""

from liferaft.websocket.connection import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeFailed,
    UpgradeRequest,
    WebSocket,
    WebSocketError,
    connect,
    read_request,
)
from liferaft.websocket.frames import (
    GOING_AWAY,
    INTERNAL_ERROR,
    INVALID_PAYLOAD,
    MESSAGE_TOO_BIG,
    NORMAL,
    PROTOCOL_ERROR,
    UNSUPPORTED_DATA,
)

__all__ = [
    "GOING_AWAY",
    "INTERNAL_ERROR",
    "INVALID_PAYLOAD",
    "MESSAGE_TOO_BIG",
    "NORMAL",
    "PROTOCOL_ERROR",
    "UNSUPPORTED_DATA",
    "ConnectionClosed",
    "ConnectionRejected",
    "HandshakeFailed",
    "UpgradeRequest",
    "WebSocket",
    "WebSocketError",
    "connect",
    "read_request",
]
