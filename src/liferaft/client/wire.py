"""The client side of the protocol's framing (docs/client-protocol.md): endpoint URLs,
CBOR requests packed into one WebSocket message per batch, and responses decoded with
bounds.

Responses come from a server whose certificate we verified, but they are still decoded
as bytes from outside (docs/security.md): every CBOR tag refused, no indefinite lengths or
duplicate keys, a nesting bound, and a shape check (a map, or an array of maps).
"""

from __future__ import annotations

import struct
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from liferaft import safecbor

PATH = "/v1"
DEFAULT_PORT = 8001
MAX_BATCH = 1024  # an array holds 1..1024 requests (docs/client-protocol.md)
# message [ response { txn results [ result { kvs [ kv { ... }]}]}]: 6 deep; room to spare.
MAX_DEPTH = 16


class ProtocolError(ValueError):
    """Bytes from the server that are not a response message (docs/client-protocol.md)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed endpoint URL: ``wss://host:port/v1``."""

    host: str
    port: int
    path: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"wss://{host}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 443 else f"{host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """An endpoint from ``wss://host:port[/v1]`` or a bare ``host:port`` (what ``[client]
    listen`` and ``member add --client`` hold); the path defaults to ``/v1``.

    >>> parse_endpoint("127.0.0.1:8002").url
    'wss://127.0.0.1:8002/v1'
    >>> parse_endpoint("wss://localhost:8001").url
    'wss://localhost:8001/v1'
    """
    raw = text.strip()
    if not raw:
        raise ValueError("empty endpoint")
    if "://" not in raw:
        raw = "wss://" + raw
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme != "wss":
        raise ValueError(f"endpoint {text!r}: only wss:// is supported (TLS is required)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"endpoint {text!r}: bad port") from None
    if not parts.hostname:
        raise ValueError(f"endpoint {text!r}: no host")
    if parts.query or parts.fragment or parts.username:
        raise ValueError(f"endpoint {text!r}: no user, query or fragment allowed")
    return Endpoint(parts.hostname, port or DEFAULT_PORT, parts.path or PATH)


# ---------------------------------------------------------------- encoding


def encode_request(request: Mapping[str, Any]) -> bytes:
    """One request map as CBOR (the unit a batch is packed from)."""
    return cbor2.dumps(request)


def _array_header(n: int) -> bytes:
    # CBOR major type 4 (array) with a definite length.
    if n < 24:
        return bytes([0x80 | n])
    if n < 0x100:
        return bytes([0x98, n])
    if n < 0x10000:
        return b"\x99" + struct.pack(">H", n)
    return b"\x9a" + struct.pack(">I", n)


def pack(encoded: list[bytes]) -> bytes:
    """One WebSocket message: a single request as its map, several as a CBOR array of
    maps, built from the already encoded maps without encoding them again."""
    if len(encoded) == 1:
        return encoded[0]
    return _array_header(len(encoded)) + b"".join(encoded)


def packed_size(count: int, payload_bytes: int) -> int:
    """The size of ``pack`` of ``count`` requests whose encodings total ``payload_bytes``."""
    if count == 1:
        return payload_bytes
    return payload_bytes + (
        1 if count < 24 else 2 if count < 0x100 else 3 if count < 0x10000 else 5
    )


# ---------------------------------------------------------------- decoding


def decode_message(data: bytes) -> list[dict[str, Any]]:
    """The maps of one server message (a map, or an array of maps); ProtocolError else."""
    try:
        obj = safecbor.loads(data, max_depth=MAX_DEPTH)
    except safecbor.CBORError as exc:
        raise ProtocolError(str(exc)) from None
    items = obj if isinstance(obj, list) else [obj]
    if not items:
        raise ProtocolError("an empty array")
    for item in items:
        if not isinstance(item, dict):
            raise ProtocolError("a message holds a map or an array of maps with text keys")
        try:
            "".join(item)  # every key a str, checked at C speed (a response is small)
        except TypeError:
            raise ProtocolError(
                "a message holds a map or an array of maps with text keys"
            ) from None
    return items
