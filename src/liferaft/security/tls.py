"""TLS contexts for the peer links and the client API, and a peer's node id from its
certificate (docs/security.md, "Peers: mutual TLS and node identity").

Peers use mutual TLS with the cluster CA as the only trust anchor. A certificate signed by
that CA is not enough by itself: the accepting side maps the certificate's DNS SANs to a
current member id (``peer_node_id``), and the dialling side checks that the server's
certificate names the member it meant to reach, by passing the member id as
``server_hostname`` with hostname checking on.

``load_node_tls`` makes all three of a node's contexts from one reading of its files, and
on a reload (SIGHUP) first checks that the files make sense together, so that a bad
renewal is refused and the node keeps what it had (docs/security.md, "Rotating
certificates and keys").
"""

from __future__ import annotations

import ssl
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from liferaft.security.certs import key_is_private, node_ids

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class PeerCertificateSource(Protocol):
    """What ``peer_node_id`` needs: an ``ssl.SSLObject`` or ``ssl.SSLSocket``, or a
    ``trio.SSLStream`` (which forwards ``getpeercert`` to its SSLObject)."""

    def getpeercert(self) -> Any: ...


# The CA as a path, or as the PEM text already read (and checked) by load_node_tls.
CaSource = Path | str


def _base(purpose: int, ca: CaSource | None, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION
    if isinstance(ca, Path):
        ctx.load_verify_locations(cafile=str(ca))
    elif ca is not None:
        ctx.load_verify_locations(cadata=ca)
    ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return ctx


def peer_server_context(ca: CaSource, cert: Path, key: Path) -> ssl.SSLContext:
    """The peer listener's context: presents ``cert`` and requires a client certificate
    signed by ``ca`` (the node id in it is checked by ``peer_node_id``, not by ssl)."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, ca, cert, key)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_client_context(ca: CaSource, cert: Path, key: Path) -> ssl.SSLContext:
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


class TlsMaterialError(ValueError):
    """The files cannot be this node's TLS material; the message names the file and why."""


@dataclass(frozen=True, slots=True)
class NodeTls:
    """One generation of a node's TLS material: the contexts for its three kinds of
    handshake, made from the same files, and what logs and metrics say about the
    certificate. A reload makes a new one and swaps the reference; a context in use is
    never changed, so connections made before the reload are not touched."""

    peer_server: ssl.SSLContext
    peer_client: ssl.SSLContext
    client_server: ssl.SSLContext
    serial: int
    not_after: datetime  # timezone-aware (UTC)

    @property
    def serial_hex(self) -> str:
        return f"{self.serial:x}"


def load_node_tls(
    ca: Path, cert: Path, key: Path, node_id: str, *, now: datetime | None
) -> NodeTls:
    """The node's contexts from its CA, certificate and key files.

    With ``now`` (a reload) the files are first checked together: the key is private and
    is the certificate's, the certificate names ``node_id``, is signed by a certificate in
    the CA file (which may hold several, for a CA change) and is valid at ``now``; the
    files must not change while they are read. Without it (start-up, where the config
    loader has already checked names and modes) only what building the contexts checks.
    TlsMaterialError says what is wrong; nothing is half-loaded.
    """
    ca_pem, cert_pem, key_pem = _read(ca), _read(cert), _read(key)
    leaf = _certificate(cert, cert_pem)
    if now is not None:
        try:
            _check(ca, ca_pem, cert, leaf, key, key_pem, node_id, now)
        except (TypeError, UnsupportedAlgorithm) as exc:  # an odd key type or extension
            raise TlsMaterialError(f"{cert}, {key}, {ca}: {exc}") from None
        except TlsMaterialError:
            raise
        except ValueError as exc:
            raise TlsMaterialError(f"{cert}, {key}, {ca}: {exc}") from None
    try:
        ca_text = ca_pem.decode("ascii")
        contexts = (
            peer_server_context(ca_text, cert, key),
            peer_client_context(ca_text, cert, key),
            client_server_context(cert, key),
        )
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise TlsMaterialError(f"{cert}, {key}, {ca}: {exc}") from None
    except OSError as exc:
        raise TlsMaterialError(f"cannot read {exc.filename}: {exc.strerror or exc}") from None
    if now is not None and (_read(cert) != cert_pem or _read(key) != key_pem):
        # ssl read the files by path after we checked them: a renewal was being written
        raise TlsMaterialError(f"{cert} or {key} changed while being read; reload again")
    return NodeTls(*contexts, serial=leaf.serial_number, not_after=leaf.not_valid_after_utc)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsMaterialError(f"cannot read {path}: {exc.strerror or exc}") from None


def _certificate(path: Path, pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise TlsMaterialError(f"{path} is not a PEM certificate") from None


def _check(
    ca: Path,
    ca_pem: bytes,
    cert: Path,
    leaf: x509.Certificate,
    key: Path,
    key_pem: bytes,
    node_id: str,
    now: datetime,
) -> None:
    if not key_is_private(key):
        raise TlsMaterialError(f"{key} is readable by others; chmod 600 it")
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise TlsMaterialError(f"{key} is not an unencrypted PEM private key") from None
    if _spki(private.public_key()) != _spki(leaf.public_key()):
        raise TlsMaterialError(f"{key} is not the key of {cert}")
    names = node_ids(leaf.public_bytes(serialization.Encoding.PEM))
    if node_id not in names:
        raise TlsMaterialError(
            f"{cert} names {', '.join(sorted(names)) or 'no DNS name'}, not this node {node_id}"
        )
    try:
        authorities = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise TlsMaterialError(f"{ca} holds no PEM certificate") from None
    if not any(_issued_by(leaf, authority) for authority in authorities):
        raise TlsMaterialError(f"{cert} is not signed by a CA in {ca}")
    if now < leaf.not_valid_before_utc:
        raise TlsMaterialError(f"{cert} is not valid before {leaf.not_valid_before_utc}")
    if now >= leaf.not_valid_after_utc:
        raise TlsMaterialError(f"{cert} expired at {leaf.not_valid_after_utc}")


def _issued_by(leaf: x509.Certificate, authority: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
