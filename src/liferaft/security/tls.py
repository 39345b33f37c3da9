"""TLS contexts for the peer links and the client API, and a peer's node id from its
certificate (docs/security.md, "Peers: mutual TLS and node identity").

Peers use mutual TLS with the cluster CA as the only trust anchor. A certificate signed by
that CA is not enough by itself: the accepting side maps the certificate's DNS SANs to a
current member id (``peer_node_id``), and the dialling side checks that the server's
certificate names the member it meant to reach, by passing the member id as
``server_hostname`` with hostname checking on.
"""

from __future__ import annotations

import ssl
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class PeerCertificateSource(Protocol):
    """What ``peer_node_id`` needs: an ``ssl.SSLObject`` or ``ssl.SSLSocket``, or a
    ``trio.SSLStream`` (which forwards ``getpeercert`` to its SSLObject)."""

    def getpeercert(self) -> Any: ...


def _base(purpose: int, ca: Path | None, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION
    if ca is not None:
        ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return ctx


def peer_server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """The peer listener's context: presents ``cert`` and requires a client certificate
    signed by ``ca`` (the node id in it is checked by ``peer_node_id``, not by ssl)."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, ca, cert, key)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """The dialling side's context: presents ``cert`` and verifies the server against
    ``ca`` only; dial with ``server_hostname=<peer id>`` so the peer's DNS SAN is checked."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, ca, cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    return ctx


def client_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The client API listener's context: presents ``cert``; clients authenticate with a
    JWT, not with a certificate, so none is asked for."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, None, cert, key)
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def dns_names(ssl_object: PeerCertificateSource) -> list[str]:
    """The DNS SANs of the verified peer certificate (empty if there is none)."""
    cert = ssl_object.getpeercert()
    if not isinstance(cert, dict):
        return []
    names = cert.get("subjectAltName", ())
    return [value for kind, value in names if kind == "DNS" and isinstance(value, str)]


def peer_node_id(ssl_object: PeerCertificateSource, members: Collection[str]) -> str | None:
    """The member id the peer's certificate names, or None.

    ``getpeercert()`` only reports a certificate that the handshake verified, so this
    must run after a handshake with CERT_REQUIRED. A certificate naming two members is
    refused as ambiguous: identity must be one node id.
    """
    found = {name for name in dns_names(ssl_object) if name in members}
    if len(found) != 1:
        return None
    return found.pop()
