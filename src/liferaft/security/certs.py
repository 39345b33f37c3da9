"""The cluster CA, one certificate per node, and the JWT key pair (docs/security.md).

Each node certificate serves both ends of mutual TLS, and its DNS SAN equal to the node id
is the node's identity. Generation only ever adds what is missing, so running it again with
more node ids extends a cluster without re-keying it; ``force`` is the one way to replace a
file. Private keys are created 0600 from the first byte: a chmod afterwards would leave a
window in which the key is readable by others.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from liferaft.security.pem import pem_blocks

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
JWT_PRIVATE = "jwt-private.pem"
JWT_PUBLIC = "jwt-public.pem"

CA_VALIDITY = timedelta(days=3650)
NODE_VALIDITY = timedelta(days=825)  # the most that browsers and Apple's TLS stack accept
BACKDATE = timedelta(minutes=5)  # so a peer whose clock is a little behind still accepts it

CA_COMMON_NAME = "liferaft CA"
LOCALHOST_IP = ipaddress.IPv4Address("127.0.0.1")

# A DNS label: what a node id must be, since it is written into certificates as a DNS SAN.
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# Ids whose files would collide with the CA's or the JWT pair's, or that every certificate
# already names (a node called "localhost" could be impersonated by any other node).
_RESERVED_IDS = frozenset({"ca", "jwt-private", "jwt-public", "localhost"})

# Keys we can sign with (a CA) or certify (a node). The CA we generate is ECDSA P-256;
# an existing Ed25519 ca-key.pem is used as is (docs/security.md, "Certificates").
SigningKey: TypeAlias = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
NodeKey: TypeAlias = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


class CertsError(ValueError):
    """The directory holds a partial or inconsistent set of files that generation must not
    paper over, such as a CA certificate without its key."""


def validate_node_id(node_id: str) -> str:
    """Return ``node_id`` if it can be a node's identity, else raise ValueError naming it."""
    if not node_id:
        raise ValueError("node id must not be empty")
    if len(node_id) > 63 or not _LABEL.fullmatch(node_id):
        raise ValueError(
            f"bad node id {node_id!r}: use 1-63 characters of a-z, 0-9 and '-', "
            "not starting or ending with '-'"
        )
    if node_id in _RESERVED_IDS or node_id.endswith("-key"):
        raise ValueError(
            f"bad node id {node_id!r}: reserved (its files would clash with the CA, the JWT "
            "keys or another node's key, or every certificate already names it)"
        )
    return node_id


def parse_san(value: str) -> x509.GeneralName:
    """An extra subjectAltName: an IP address if it parses as one, else a DNS name."""
    text = value.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = text.lower().rstrip(".")
    labels = name.split(".")
    wildcard = labels[0] == "*" and len(labels) > 2
    ok = (
        0 < len(name) <= 253
        and all(_LABEL.fullmatch(label) for label in labels[1 if wildcard else 0 :])
        and not labels[-1].isdigit()  # "1.2.3.999" is a broken IP, not a host name
    )
    if not ok:
        raise ValueError(f"bad --san {value!r}: not an IP address or a DNS name")
    return x509.DNSName(name)


def node_ids(cert_pem: bytes) -> set[str]:
    """The DNS SAN names of a certificate (PEM, or DER as ``ssl`` hands out a peer's).

    The node's identity is the one among them that is a cluster member's id; the others
    (``localhost``, extra ``--san`` names) are only for host name checks. ValueError if the
    bytes are not a certificate.
    """
    if b"-----BEGIN" in cert_pem:
        cert = x509.load_pem_x509_certificate(cert_pem)
    else:
        cert = x509.load_der_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set()
    return set(san.value.get_values_for_type(x509.DNSName))


def key_is_private(path: Path) -> bool:
    """True when neither group nor others have any permission on the file."""
    return os.stat(path).st_mode & 0o077 == 0


@dataclass(frozen=True, slots=True)
class _CA:
    cert: x509.Certificate
    key: SigningKey | None  # None: ca-key.pem is gone, so nothing may be signed


def generate(
    directory: Path,
    nodes: Sequence[str],
    *,
    sans: Sequence[str] = (),
    force: bool = False,
    now: datetime | None = None,
) -> list[Path]:
    """Write the CA, the node certificates and the JWT key pair; return the files written.

    Everything is validated before the first file is written. Without ``force`` existing
    files are kept and only missing ones are added (new node certificates are signed by the
    existing CA); with it, the CA, the given nodes' files and the JWT pair are all replaced
    (certificates of nodes not named are left alone, and no longer verify against the new CA).
    """
    ids = list(dict.fromkeys(validate_node_id(n) for n in nodes))
    extra = list(dict.fromkeys(parse_san(s) for s in sans))
    for name in extra:
        if isinstance(name, x509.DNSName) and name.value in ids:
            raise ValueError(
                f"bad --san {name.value!r}: it is a node id, so every certificate would "
                "carry that node's identity"
            )
    now = now if now is not None else datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")

    _check_consistent(directory, ids, force)
    jwt_public = None if force else _existing_jwt_public(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ca = _ensure_ca(directory, force, now, written)
    for node_id in ids:
        _ensure_node(directory, node_id, extra, ca, force, now, written)
    _ensure_jwt(directory, jwt_public, force, written)
    return written


def renew(
    directory: Path,
    nodes: Sequence[str],
    *,
    sans: Sequence[str] | None = None,
    now: datetime | None = None,
) -> list[Path]:
    """Give each of ``nodes`` a new key and certificate signed by the existing CA; return
    the files written. Nothing else changes: not the CA, not the JWT keys, not other
    nodes' files. The new certificate keeps the old one's extra SANs unless ``sans`` is
    given, which replaces them. Every check runs before the first write.

    Each node's key is written before its certificate: a node that reloads between the
    two sees a key that does not fit and keeps its old pair (docs/security.md).
    """
    ids = list(dict.fromkeys(validate_node_id(n) for n in nodes))
    if not ids:
        raise ValueError("name at least one node to renew")
    now = now if now is not None else datetime.now(UTC)
    ca = _signing_ca(directory)
    given = None if sans is None else list(dict.fromkeys(parse_san(v) for v in sans))
    plans: list[tuple[str, list[x509.GeneralName]]] = []
    for node_id in ids:
        cert_path = directory / f"{node_id}.pem"
        if not cert_path.exists():
            raise CertsError(
                f"{cert_path} does not exist, so there is nothing to renew: run without "
                "--renew to add the node"
            )
        extra = given if given is not None else _extra_sans(cert_path, node_id)
        for name in extra:
            if isinstance(name, x509.DNSName) and name.value in ids:
                raise ValueError(f"bad --san {name.value!r}: it is a node id")
        plans.append((node_id, extra))
    written: list[Path] = []
    for node_id, extra in plans:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _node_certificate(node_id, key, extra, ca.cert, ca.key, now)
        key_path = directory / f"{node_id}-key.pem"
        _write(key_path, _private_pem(key), private=True, replace=True, written=written)
        _write(
            directory / f"{node_id}.pem",
            _cert_pem(cert),
            private=False,
            replace=True,
            written=written,
        )
    return written


@dataclass(frozen=True, slots=True)
class _SigningCA:
    cert: x509.Certificate
    key: SigningKey


def _signing_ca(directory: Path) -> _SigningCA:
    """The CA key and the certificate of it in ``ca.pem`` (which may hold other CA
    certificates too, while nodes trust two CAs)."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not key_path.exists() or not cert_path.exists():
        raise CertsError(
            f"renewing needs the existing CA: {cert_path} and {key_path} (run where the CA "
            "key is kept)"
        )
    key = _load_signing_key(key_path)
    try:
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except ValueError:
        raise CertsError(f"{cert_path} holds no PEM certificate") from None
    for cert in certs:
        if _spki(cert.public_key()) == _spki(key.public_key()):
            return _SigningCA(cert, key)
    raise CertsError(f"{key_path} is not the key of any certificate in {cert_path}")


def _extra_sans(cert_path: Path, node_id: str) -> list[x509.GeneralName]:
    """The SANs of a node certificate beyond the ones every node certificate carries."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        raise CertsError(f"{cert_path} is not a PEM certificate") from None
    try:
        names = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []
    standard = {x509.DNSName(node_id), x509.DNSName("localhost"), x509.IPAddress(LOCALHOST_IP)}
    return [n for n in names if n not in standard]


def new_jwt_key(directory: Path) -> list[Path]:
    """Start a token key rotation: a new Ed25519 pair whose private half replaces
    ``jwt-private.pem`` and whose public half is put first in ``jwt-public.pem``, after
    which the old public keys stay, so tokens signed before keep verifying on nodes given
    the new file. ``drop_old_jwt_keys`` ends the overlap."""
    private_path, public_path = directory / JWT_PRIVATE, directory / JWT_PUBLIC
    if not private_path.exists():
        raise CertsError(f"{private_path} does not exist: run where the signing key is kept")
    _existing_jwt_public(directory)  # the pair on disk must be consistent first
    old = public_path.read_bytes() if public_path.exists() else b""
    key = ed25519.Ed25519PrivateKey.generate()
    written: list[Path] = []
    # public first: a node may trust a key nobody signs with yet, never the reverse
    bundle = _public_pem(key.public_key()) + b"".join(b for _, b in pem_blocks(old))
    _write(public_path, bundle, private=False, replace=True, written=written)
    _write(private_path, _private_pem(key), private=True, replace=True, written=written)
    return written


def drop_old_jwt_keys(directory: Path) -> list[Path]:
    """End a token key rotation: ``jwt-public.pem`` keeps only the public half of
    ``jwt-private.pem``. Returns the files written (none if that is all it holds)."""
    private_path, public_path = directory / JWT_PRIVATE, directory / JWT_PUBLIC
    public = _existing_jwt_public(directory)
    if public is None:
        raise CertsError(f"{private_path} does not exist: run where the signing key is kept")
    if public_path.read_bytes().strip() == public.strip():
        return []
    written: list[Path] = []
    _write(public_path, public, private=False, replace=True, written=written)
    return written


def _check_consistent(directory: Path, ids: Sequence[str], force: bool) -> None:
    """Refuse, before writing anything, the states that adding files cannot repair."""
    if force:
        return
    has_cert = (directory / CA_CERT).exists()
    has_key = (directory / CA_KEY).exists()
    need_signing = [i for i in ids if not (directory / f"{i}.pem").exists()]
    for node_id in ids:
        if (directory / f"{node_id}.pem").exists() and not (
            directory / f"{node_id}-key.pem"
        ).exists():
            raise CertsError(
                f"{directory / f'{node_id}.pem'} exists but {node_id}-key.pem is missing: "
                "restore the key, or regenerate with force"
            )
    if has_cert and not has_key and need_signing:
        raise CertsError(
            f"{directory / CA_CERT} exists but {CA_KEY} is missing, so no certificate for "
            f"{', '.join(need_signing)} can be signed: restore the CA key, or regenerate "
            "everything with force"
        )
    if not has_cert and not has_key:
        orphans = [i for i in ids if (directory / f"{i}.pem").exists()]
        if orphans:
            raise CertsError(
                f"there is no CA in {directory} but certificates for {', '.join(orphans)} "
                "exist: a new CA would not have signed them; restore the CA or use force"
            )


def _ensure_ca(directory: Path, force: bool, now: datetime, written: list[Path]) -> _CA:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not force and key_path.exists():
        key = _load_signing_key(key_path)
        if cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if _spki(cert.public_key()) != _spki(key.public_key()):
                raise CertsError(f"{key_path} is not the key of {cert_path}")
            return _CA(cert, key)
    elif not force and cert_path.exists():
        # _check_consistent made sure that no node certificate needs signing.
        return _CA(x509.load_pem_x509_certificate(cert_path.read_bytes()), None)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        _write(key_path, _private_pem(key), private=True, replace=force, written=written)
    # A missing ca.pem is issued again from the existing key: same key and same name, so
    # the node certificates it signed before still verify.
    cert = _ca_certificate(key, now)
    _write(cert_path, _cert_pem(cert), private=False, replace=force, written=written)
    return _CA(cert, key)


def _ensure_node(
    directory: Path,
    node_id: str,
    extra: Sequence[x509.GeneralName],
    ca: _CA,
    force: bool,
    now: datetime,
    written: list[Path],
) -> None:
    cert_path, key_path = directory / f"{node_id}.pem", directory / f"{node_id}-key.pem"
    if not force and cert_path.exists():
        return  # _check_consistent made sure the key is there too
    key: NodeKey
    if not force and key_path.exists():
        key = _load_node_key(key_path)  # left by an interrupted run: certify it
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        _write(key_path, _private_pem(key), private=True, replace=force, written=written)
    assert ca.key is not None, "_check_consistent lets no signing through without the CA key"
    cert = _node_certificate(node_id, key, extra, ca.cert, ca.key, now)
    _write(cert_path, _cert_pem(cert), private=False, replace=force, written=written)


def _existing_jwt_public(directory: Path) -> bytes | None:
    """The public PEM of an existing jwt-private.pem, checked against jwt-public.pem."""
    private_path, public_path = directory / JWT_PRIVATE, directory / JWT_PUBLIC
    if not private_path.exists():
        return None
    key = _load_pem_key(private_path)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise CertsError(f"{private_path} is not an Ed25519 private key")
    public = _public_pem(key.public_key())
    # jwt-public.pem may hold older keys too, during a rotation (new_jwt_key)
    if public_path.exists() and public.strip() not in {
        block.strip() for _, block in pem_blocks(public_path.read_bytes())
    }:
        raise CertsError(f"{public_path} does not hold the public half of {private_path}")
    return public


def _ensure_jwt(directory: Path, existing: bytes | None, force: bool, written: list[Path]) -> None:
    private_path, public_path = directory / JWT_PRIVATE, directory / JWT_PUBLIC
    if not force and existing is not None:
        if not public_path.exists():
            _write(public_path, existing, private=False, replace=False, written=written)
        return
    if not force and public_path.exists():
        return  # a node's copy of the directory: it holds only the public key, by design
    key = ed25519.Ed25519PrivateKey.generate()
    _write(private_path, _private_pem(key), private=True, replace=force, written=written)
    public = _public_pem(key.public_key())
    _write(public_path, public, private=False, replace=force, written=written)


def _ca_certificate(key: SigningKey, now: datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    start = now - BACKDATE
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    return builder.sign(key, _hash_for(key))


def _node_certificate(
    node_id: str,
    key: NodeKey,
    extra: Sequence[x509.GeneralName],
    ca_cert: x509.Certificate,
    ca_key: SigningKey,
    now: datetime,
) -> x509.Certificate:
    names: list[x509.GeneralName] = [
        x509.DNSName(node_id),
        x509.DNSName("localhost"),
        x509.IPAddress(LOCALHOST_IP),
    ]
    names += [n for n in extra if n not in names]
    start = now - BACKDATE
    # Never outlive the CA: a chain is only as valid as its shortest-lived link.
    end = min(start + NODE_VALIDITY, ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    return builder.sign(ca_key, _hash_for(ca_key))


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _hash_for(key: SigningKey) -> hashes.SHA256 | None:
    # Ed25519 hashes internally; cryptography wants None for it.
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _load_pem_key(path: Path) -> object:
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertsError(f"{path}: not an unencrypted PEM private key ({exc})") from None


def _load_signing_key(path: Path) -> SigningKey:
    key = _load_pem_key(path)
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise CertsError(f"{path}: a CA key must be ECDSA or Ed25519")
    return key


def _load_node_key(path: Path) -> NodeKey:
    key = _load_pem_key(path)
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    ):
        raise CertsError(f"{path}: a node key must be ECDSA, Ed25519 or RSA")
    return key


def _private_pem(key: NodeKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_pem(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _spki(key: object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write(path: Path, data: bytes, *, private: bool, replace: bool, written: list[Path]) -> None:
    """Create ``path`` with its final mode from the start (0600 for keys).

    Without ``replace`` the file is created exclusively, so a file that appeared since we
    looked is never overwritten. With it, a temporary file is renamed over the old one, so
    a replaced key does not inherit the old file's (possibly looser) mode.
    """
    mode = 0o600 if private else 0o644
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    target = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp") if replace else path
    try:
        fd = os.open(target, flags, mode)
    except FileExistsError:
        raise CertsError(f"{path} appeared while generating; not overwriting it") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(target, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise
    written.append(path)
