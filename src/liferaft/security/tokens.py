"""Client tokens (docs/security.md, "Tokens"): minting for ``liferaft token``, verification
for the client listener.

Nothing in a token is trusted before its signature checks out against a configured key,
with the one algorithm that key's type dictates. The header's ``alg`` only selects among
those, so ``none``, HMAC keyed with a public key and cross-type confusions fail before any
cryptography runs. The time comes in as ``now`` (docs/architecture.md, "Concurrency
rules"): tests decide what time it is, and pyjwt's own clock checks are bypassed by
verifying the signature with ``PyJWS`` and the claims here.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from liferaft.security.pem import pem_blocks

PublicKey: TypeAlias = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey: TypeAlias = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

ALGORITHMS = ("EdDSA", "ES256", "RS256")
MIN_RSA_BITS = 2048
MAX_TOKEN_CHARS = 8192  # a bearer token is read from an HTTP header: bound the work
MAX_KEY_FILE_BYTES = 1 << 20

Reason: TypeAlias = Literal[
    "missing",
    "malformed",
    "expired",
    "not_yet_valid",
    "bad_issuer",
    "bad_audience",
    "unknown_kid",
    "bad_signature",
    "bad_algorithm",
    "bad_claims",
]


class Role(enum.Enum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


# What each role may do, as the set of roles it includes (docs/security.md).
_INCLUDES: dict[Role, frozenset[Role]] = {
    Role.READ: frozenset({Role.READ}),
    Role.WRITE: frozenset({Role.READ, Role.WRITE}),
    Role.ADMIN: frozenset(Role),
}


class TokenError(Exception):
    """A client's token was refused. ``reason`` is a fixed word, fit for a metric label
    and an audit record; the message never contains the token."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: Reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token grants."""

    sub: str
    roles: frozenset[Role]  # never empty
    prefixes: tuple[str, ...] | None  # None: every key; () would be no key at all
    exp: float

    def allows(self, role: Role) -> bool:
        """True when one of the token's roles includes ``role`` (admin > write > read)."""
        return any(role in _INCLUDES[r] for r in self.roles)

    def covers(self, key: str) -> bool:
        """True when the token may touch ``key``, or every key under a range prefix ``key``."""
        return self.prefixes is None or any(key.startswith(p) for p in self.prefixes)


def parse_roles(values: Sequence[str]) -> frozenset[Role]:
    """Roles from their names; ValueError naming the first unknown one, or if none given."""
    roles: set[Role] = set()
    for value in values:
        try:
            roles.add(Role(value))
        except ValueError:
            raise ValueError(
                f"unknown role {value!r}: expected {', '.join(r.value for r in Role)}"
            ) from None
    if not roles:
        raise ValueError("a token needs at least one role")
    return frozenset(roles)


def algorithm_for(key: PublicKey | PrivateKey) -> str:
    """The one JWS algorithm a key may be used with; ValueError for any other key."""
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP256R1):
            return "ES256"
        raise ValueError(f"EC keys must be on P-256 (ES256), not {key.curve.name}")
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA keys must have at least {MIN_RSA_BITS} bits")
        return "RS256"
    raise ValueError("unsupported key type: use Ed25519, EC P-256 or RSA")


def mint(
    private_key_pem: bytes,
    *,
    sub: str,
    roles: Sequence[str],
    ttl_s: int = 3600,
    prefixes: Sequence[str] | None = None,
    issuer: str = "liferaft",
    audience: str = "liferaft",
    kid: str | None = None,
    now: float,
) -> str:
    """Sign a token for ``sub``, valid from ``now`` for ``ttl_s`` seconds."""
    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, PrivateKey):
        raise ValueError("unsupported key type: use Ed25519, EC P-256 or RSA")
    algorithm = algorithm_for(key)
    if not sub:
        raise ValueError("sub must not be empty")
    parse_roles(roles)
    if ttl_s <= 0:
        raise ValueError("ttl must be positive")
    if kid == "":
        raise ValueError("kid must not be empty")
    iat = int(now)
    payload: dict[str, Any] = {
        "sub": sub,
        "roles": list(dict.fromkeys(roles)),
        "iss": issuer,
        "aud": audience,
        "iat": iat,
        "exp": iat + ttl_s,
    }
    if prefixes is not None:
        payload["prefixes"] = list(prefixes)
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


@dataclass(frozen=True, slots=True)
class VerifyingKey:
    """A configured public key; ``kid`` None means it has no name (a PEM file)."""

    key: PublicKey
    kid: str | None = None

    @property
    def algorithm(self) -> str:
        return algorithm_for(self.key)


def load_public_keys(path: Path) -> list[VerifyingKey]:
    """The keys in a file of PEM public keys (one or several) or a JWKS JSON file, told
    apart by content.

    ValueError names the file. Private key material is refused: nodes hold only public keys.
    """
    data = path.read_bytes()[: MAX_KEY_FILE_BYTES + 1]
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path}: larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        if data.lstrip().startswith(b"{"):
            return _load_jwks(data)
        return _load_pems(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _load_pems(data: bytes) -> list[VerifyingKey]:
    """Every PEM public key in the file: during a key rotation it holds the new key and
    the old one (docs/security.md, "Rotating the token key")."""
    if b"PRIVATE KEY" in data:
        raise ValueError("holds a private key; give the public key (jwt-public.pem)")
    blocks = pem_blocks(data)
    if not blocks:
        raise ValueError("not a PEM public key or a JWKS JSON file")
    keys: list[VerifyingKey] = []
    for n, (_, block) in enumerate(blocks, 1):
        try:
            keys.append(_load_pem(block))
        except ValueError as exc:
            raise ValueError(f"PEM block {n}: {exc}" if len(blocks) > 1 else str(exc)) from None
    return keys


def _load_pem(data: bytes) -> VerifyingKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not a PEM public key or a JWKS JSON file") from None
    if not isinstance(key, PublicKey):
        raise ValueError("unsupported key type: use Ed25519, EC P-256 or RSA")
    algorithm_for(key)
    return VerifyingKey(key)


def _load_jwks(data: bytes) -> list[VerifyingKey]:
    try:
        doc = json.loads(data)
    except ValueError:
        raise ValueError("not valid JSON") from None
    if isinstance(doc, dict) and "keys" in doc:
        entries = doc["keys"]
    elif isinstance(doc, dict) and "kty" in doc:
        entries = [doc]  # a single JWK
    else:
        raise ValueError('a JWKS must be an object with a "keys" list')
    if not isinstance(entries, list):
        raise ValueError('"keys" must be a list')
    keys: list[VerifyingKey] = []
    for i, jwk in enumerate(entries):
        if not isinstance(jwk, dict):
            raise ValueError(f"key {i} is not an object")
        if jwk.get("use", "sig") != "sig":
            continue  # an encryption key, not ours to use
        keys.append(_load_jwk(i, jwk))
    if not keys:
        raise ValueError("no signing keys")
    return keys


def _load_jwk(i: int, jwk: dict[str, Any]) -> VerifyingKey:
    kid = jwk.get("kid")
    where = f"key {i}" + (f" (kid {kid!r})" if isinstance(kid, str) else "")
    if kid is not None and (not isinstance(kid, str) or not kid):
        raise ValueError(f"{where}: kid must be a non-empty string")
    if jwk.get("kty") == "oct":
        raise ValueError(f"{where}: symmetric (HMAC) keys are refused")
    if "d" in jwk or "p" in jwk:
        raise ValueError(f"{where}: holds private key material; publish only the public key")
    try:
        # pyjwt only turns the JSON into a key (ignoring "alg", which would pick its parser);
        # the key's type decides the algorithm below, and a contradicting "alg" is refused.
        key = jwt.PyJWK({k: v for k, v in jwk.items() if k != "alg"}).key
    except (jwt.PyJWTError, KeyError, ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"{where}: not a usable public JWK") from None
    if not isinstance(key, PublicKey):
        raise ValueError(f"{where}: unsupported key type: use Ed25519, EC P-256 or RSA")
    try:
        algorithm = algorithm_for(key)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if jwk.get("alg", algorithm) != algorithm:
        raise ValueError(f"{where}: alg {jwk['alg']!r} does not fit the key (use {algorithm})")
    return VerifyingKey(key, kid)


class TokenVerifier:
    """Checks client tokens against the configured keys, issuer and audience."""

    def __init__(
        self,
        keys: Sequence[VerifyingKey],
        *,
        issuer: str = "liferaft",
        audience: str = "liferaft",
        leeway_s: float = 5.0,
    ) -> None:
        if not keys:
            raise ValueError("at least one public key is needed to verify tokens")
        if not (leeway_s >= 0 and math.isfinite(leeway_s)):
            raise ValueError("leeway_s must be a non-negative number")
        for k in keys:
            algorithm_for(k.key)  # refuse unusable keys now, not on the first request
        self._keys = tuple(keys)
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s
        # One PyJWS per algorithm, each allowing only that algorithm.
        self._jws = {alg: jwt.PyJWS(algorithms=[alg]) for alg in ALGORITHMS}

    @property
    def keys(self) -> tuple[VerifyingKey, ...]:
        """The keys tokens are checked against."""
        return self._keys

    @classmethod
    def from_files(
        cls,
        paths: Sequence[Path],
        *,
        issuer: str = "liferaft",
        audience: str = "liferaft",
        leeway_s: float = 5.0,
    ) -> TokenVerifier:
        """A verifier for ``[auth] jwt_public_keys``: PEM public keys and JWKS files."""
        keys = [k for path in paths for k in load_public_keys(path)]
        return cls(keys, issuer=issuer, audience=audience, leeway_s=leeway_s)

    def verify(self, token: str | None, *, now: float) -> Claims:
        """The claims of a valid token; TokenError saying why otherwise."""
        if not token:
            raise TokenError("missing")
        if len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise TokenError("malformed", "too long or not ASCII")
        header = self._header(token)
        algorithm = header.get("alg")
        if not isinstance(algorithm, str):
            raise TokenError("malformed", "no alg in header")
        if algorithm not in ALGORITHMS:
            raise TokenError("bad_algorithm", f"{algorithm!r} is not allowed")
        candidates = self._candidates(header.get("kid"))
        usable = [k for k in candidates if k.algorithm == algorithm]
        if not usable:
            raise TokenError("bad_algorithm", f"no configured key is for {algorithm}")
        payload = self._signed_payload(token, algorithm, usable)
        return self._claims(payload, now)

    def _header(self, token: str) -> dict[str, Any]:
        try:
            return jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("malformed", "unreadable header") from None

    def _candidates(self, kid: object) -> list[VerifyingKey]:
        """The keys a token's kid selects. Without a kid every key is tried; a kid that names
        no configured key may still be signed by an unnamed (PEM) key."""
        if kid is None:
            return list(self._keys)
        named = [k for k in self._keys if k.kid == kid]
        if named:
            return named
        unnamed = [k for k in self._keys if k.kid is None]
        if not unnamed:
            raise TokenError("unknown_kid", f"no key has kid {kid!r}")
        return unnamed

    def _signed_payload(self, token: str, algorithm: str, keys: Sequence[VerifyingKey]) -> bytes:
        jws = self._jws[algorithm]
        for k in keys:
            try:
                decoded = jws.decode_complete(token, key=k.key, algorithms=[algorithm])
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidAlgorithmError:
                raise TokenError("bad_algorithm") from None
            except jwt.PyJWTError:
                raise TokenError("malformed", "undecodable token") from None
            payload = decoded["payload"]
            assert isinstance(payload, bytes)
            return payload
        raise TokenError("bad_signature")

    def _claims(self, payload: bytes, now: float) -> Claims:
        try:
            c = json.loads(payload, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise TokenError("malformed", "payload is not JSON") from None
        if not isinstance(c, dict):
            raise TokenError("malformed", "payload is not a JSON object")
        exp = _number(c, "exp")
        if exp is None:
            raise TokenError("bad_claims", "exp is required")
        nbf, iat = _number(c, "nbf"), _number(c, "iat")
        if now >= exp + self.leeway_s:
            raise TokenError("expired")
        if nbf is not None and now + self.leeway_s < nbf:
            raise TokenError("not_yet_valid")
        if iat is not None and now + self.leeway_s < iat:
            raise TokenError("not_yet_valid", "issued in the future")
        if c.get("iss") != self.issuer:
            raise TokenError("bad_issuer")
        aud = c.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if self.audience not in audiences:
            raise TokenError("bad_audience")
        sub = c.get("sub")
        if not isinstance(sub, str) or not sub:
            raise TokenError("bad_claims", "sub must be a non-empty string")
        roles = c.get("roles")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise TokenError("bad_claims", "roles must be a list of strings")
        try:
            granted = parse_roles(roles)
        except ValueError as exc:
            raise TokenError("bad_claims", str(exc)) from None
        prefixes: tuple[str, ...] | None = None
        if "prefixes" in c:
            raw = c["prefixes"]
            if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
                raise TokenError("bad_claims", "prefixes must be a list of strings")
            prefixes = tuple(raw)
        return Claims(sub=sub, roles=granted, prefixes=prefixes, exp=exp)


def _number(claims: dict[str, Any], name: str) -> float | None:
    """A NumericDate claim, or None if absent; bad_claims if it is not a finite number."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)  # OverflowError for an int beyond any float
        except OverflowError:
            pass
        else:
            if math.isfinite(number):
                return number
    raise TokenError("bad_claims", f"{name} must be a finite number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two "exp" (or "roles") in one payload: parsers disagree on which wins, so refuse.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _no_constant(name: str) -> Any:
    # json accepts NaN and Infinity; an exp of NaN would never expire.
    raise ValueError(f"{name} is not JSON")
