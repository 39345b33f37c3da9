"""Client tokens (docs/security.md): what is minted verifies, and every way a token
can be wrong is refused with its own reason, the classic JWT attacks included."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from liferaft.security.tokens import (
    Claims,
    Role,
    TokenError,
    TokenVerifier,
    VerifyingKey,
    load_public_keys,
    mint,
)

NOW = 1_900_000_000.0
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "alice",
        "roles": ["read"],
        "iss": "liferaft",
        "aud": "liferaft",
        "iat": int(NOW),
        "exp": int(NOW) + 60,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture(scope="module")
def key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def verifier(key: ed25519.Ed25519PrivateKey) -> TokenVerifier:
    return TokenVerifier([VerifyingKey(key.public_key())], leeway_s=5)


def sign(key: PrivateKey, payload: dict[str, Any], **headers: Any) -> str:
    return jwt.encode(payload, key, algorithm="EdDSA", headers=headers or None)


def reason(verifier: TokenVerifier, token: str | None, now: float = NOW) -> str:
    with pytest.raises(TokenError) as info:
        verifier.verify(token, now=now)
    assert not token or token not in str(info.value)  # never echo the token
    return info.value.reason


# ---------------------------------------------------------------- round trips


def test_minted_token_verifies_to_its_claims(
    key: ed25519.Ed25519PrivateKey, verifier: TokenVerifier
) -> None:
    token = mint(private_pem(key), sub="alice", roles=["read", "write"], ttl_s=600, now=NOW)
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
    got = verifier.verify(token, now=NOW + 1)
    assert got == Claims(
        sub="alice", roles=frozenset({Role.READ, Role.WRITE}), prefixes=None, exp=NOW + 600
    )


def test_minted_claims_are_the_specs(key: ed25519.Ed25519PrivateKey) -> None:
    token = mint(private_pem(key), sub="bob", roles=["admin"], kid="k1", now=NOW + 0.7)
    assert jwt.get_unverified_header(token)["kid"] == "k1"
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload == {
        "sub": "bob",
        "roles": ["admin"],
        "iss": "liferaft",
        "aud": "liferaft",
        "iat": int(NOW),
        "exp": int(NOW) + 3600,
    }


@pytest.mark.parametrize(
    ("make", "alg"),
    [
        (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
    ],
)
def test_es256_and_rs256_keys_sign_with_their_own_algorithm(make: Any, alg: str) -> None:
    private = make()
    token = mint(private_pem(private), sub="s", roles=["read"], now=NOW)
    assert jwt.get_unverified_header(token)["alg"] == alg
    verifier = TokenVerifier([VerifyingKey(private.public_key())])
    assert verifier.verify(token, now=NOW).sub == "s"


def test_prefixes_are_carried(key: ed25519.Ed25519PrivateKey, verifier: TokenVerifier) -> None:
    token = mint(private_pem(key), sub="a", roles=["write"], prefixes=["app/", "tmp/"], now=NOW)
    got = verifier.verify(token, now=NOW)
    assert got.prefixes == ("app/", "tmp/")
    assert got.covers("app/x") and got.covers("tmp/") and not got.covers("etc/passwd")
    everything = mint(private_pem(key), sub="a", roles=["read"], now=NOW)
    unrestricted = verifier.verify(everything, now=NOW)
    assert unrestricted.prefixes is None and unrestricted.covers("anything")


def test_roles_include_the_lesser_ones() -> None:
    def c(*roles: Role) -> Claims:
        return Claims(sub="s", roles=frozenset(roles), prefixes=None, exp=NOW)

    assert c(Role.READ).allows(Role.READ) and not c(Role.READ).allows(Role.WRITE)
    assert c(Role.WRITE).allows(Role.READ) and not c(Role.WRITE).allows(Role.ADMIN)
    assert all(c(Role.ADMIN).allows(r) for r in Role)


# ---------------------------------------------------------------- time


def test_expired(key: ed25519.Ed25519PrivateKey, verifier: TokenVerifier) -> None:
    token = sign(key, claims(exp=int(NOW) - 60))
    assert reason(verifier, token) == "expired"


def test_leeway_is_honoured_at_both_ends(
    key: ed25519.Ed25519PrivateKey, verifier: TokenVerifier
) -> None:
    exp = int(NOW) + 60
    token = sign(key, claims(exp=exp))
    verifier.verify(token, now=exp + 4.9)
    assert reason(verifier, token, now=exp + 5) == "expired"
    early = sign(key, claims(nbf=int(NOW) + 10))
    verifier.verify(early, now=NOW + 5)
    assert reason(verifier, early, now=NOW + 4.9) == "not_yet_valid"


def test_not_before_in_the_future(key: ed25519.Ed25519PrivateKey, verifier: TokenVerifier) -> None:
    assert reason(verifier, sign(key, claims(nbf=int(NOW) + 30))) == "not_yet_valid"


def test_issued_in_the_future(key: ed25519.Ed25519PrivateKey, verifier: TokenVerifier) -> None:
    assert reason(verifier, sign(key, claims(iat=int(NOW) + 30))) == "not_yet_valid"


# ---------------------------------------------------------------- addressing


def test_wrong_issuer(key: ed25519.Ed25519PrivateKey, verifier: TokenVerifier) -> None:
    assert reason(verifier, sign(key, claims(iss="someone-else"))) == "bad_issuer"
    assert reason(verifier, sign(key, claims(iss=None))) == "bad_issuer"


def test_wrong_audience(key: ed25519.Ed25519PrivateKey, verifier: TokenVerifier) -> None:
    assert reason(verifier, sign(key, claims(aud="other"))) == "bad_audience"
    assert reason(verifier, sign(key, claims(aud=None))) == "bad_audience"
    verifier.verify(sign(key, claims(aud=["other", "liferaft"])), now=NOW)


def test_issuer_and_audience_are_configurable(key: ed25519.Ed25519PrivateKey) -> None:
    v = TokenVerifier([VerifyingKey(key.public_key())], issuer="idp", audience="kv")
    token = mint(private_pem(key), sub="a", roles=["read"], issuer="idp", audience="kv", now=NOW)
    assert v.verify(token, now=NOW).sub == "a"
    assert reason(v, mint(private_pem(key), sub="a", roles=["read"], now=NOW)) == "bad_issuer"


# ---------------------------------------------------------------- keys and algorithms


def test_kid_picks_the_key_and_an_unknown_kid_is_refused() -> None:
    k1, k2 = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    v = TokenVerifier([VerifyingKey(k1.public_key(), "k1"), VerifyingKey(k2.public_key(), "k2")])
    assert v.verify(sign(k2, claims(), kid="k2"), now=NOW).sub == "alice"
    assert v.verify(sign(k2, claims()), now=NOW).sub == "alice"  # no kid: try each key
    assert reason(v, sign(k2, claims(), kid="k1")) == "bad_signature"
    assert reason(v, sign(k2, claims(), kid="k3")) == "unknown_kid"


def test_unnamed_pem_key_accepts_any_kid(
    key: ed25519.Ed25519PrivateKey, verifier: TokenVerifier
) -> None:
    token = mint(private_pem(key), sub="a", roles=["read"], kid="2024-01", now=NOW)
    assert verifier.verify(token, now=NOW).sub == "a"


def test_wrong_key(verifier: TokenVerifier) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    assert reason(verifier, sign(other, claims())) == "bad_signature"


def test_tampered_payload(key: ed25519.Ed25519PrivateKey, verifier: TokenVerifier) -> None:
    header, _, signature = sign(key, claims()).split(".")
    forged = b64(json.dumps(claims(roles=["admin"])).encode())
    assert reason(verifier, f"{header}.{forged}.{signature}") == "bad_signature"


def test_alg_none_is_refused(verifier: TokenVerifier) -> None:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims(roles=["admin"])).encode())
    assert reason(verifier, f"{header}.{payload}.") == "bad_algorithm"


def test_hs256_keyed_with_the_public_key_is_refused(
    key: ed25519.Ed25519PrivateKey, verifier: TokenVerifier
) -> None:
    """The classic confusion: an HMAC 'signed' with the public key the server holds."""
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims(roles=["admin"])).encode())
    signing_input = f"{header}.{payload}".encode()
    mac = hmac.new(public_pem(key), signing_input, hashlib.sha256).digest()
    assert reason(verifier, f"{header}.{payload}.{b64(mac)}") == "bad_algorithm"


def test_algorithm_must_fit_the_configured_key(verifier: TokenVerifier) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(claims(), ec_key, algorithm="ES256")
    assert reason(verifier, token) == "bad_algorithm"
    p384 = ec.generate_private_key(ec.SECP384R1())
    assert reason(verifier, jwt.encode(claims(), p384, algorithm="ES384")) == "bad_algorithm"


# ---------------------------------------------------------------- shape


@pytest.mark.parametrize("token", [None, ""])
def test_missing(verifier: TokenVerifier, token: str | None) -> None:
    assert reason(verifier, token) == "missing"


@pytest.mark.parametrize(
    "token",
    ["garbage", "a.b.c", "a.b", "....", "é.é.é", "x" * 10_000, b64(b"[1]") + ".e30.sig"],
)
def test_malformed(verifier: TokenVerifier, token: str) -> None:
    assert reason(verifier, token) == "malformed"


@pytest.mark.parametrize(
    "payload",
    [
        b'{"sub": "a", "exp": NaN}',
        b'{"sub": "a", "sub": "b", "exp": 1}',
        b"[1, 2]",
        b"not json",
    ],
)
def test_signed_but_malformed_payload(
    key: ed25519.Ed25519PrivateKey, verifier: TokenVerifier, payload: bytes
) -> None:
    token = jwt.PyJWS().encode(payload, key, algorithm="EdDSA")
    assert reason(verifier, token) == "malformed"


@pytest.mark.parametrize(
    "overrides",
    [
        {"roles": None},
        {"roles": []},
        {"roles": ["read", "superuser"]},
        {"roles": "read"},
        {"sub": None},
        {"sub": ""},
        {"exp": None},
        {"exp": "tomorrow"},
        {"exp": True},
        {"exp": 10**400},
        {"nbf": "now"},
        {"prefixes": "app/"},
        {"prefixes": [1]},
        {"prefixes": None, "roles": ["read"]},
    ],
)
def test_bad_claims(
    key: ed25519.Ed25519PrivateKey, verifier: TokenVerifier, overrides: dict[str, Any]
) -> None:
    payload = claims(**overrides)
    if overrides == {"prefixes": None, "roles": ["read"]}:
        payload["prefixes"] = None  # null is not "absent"
    assert reason(verifier, sign(key, payload)) == "bad_claims"


# ---------------------------------------------------------------- minting


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"roles": ["read", "root"]}, "unknown role 'root'"),
        ({"roles": []}, "at least one role"),
        ({"ttl_s": 0}, "ttl"),
        ({"sub": ""}, "sub"),
    ],
)
def test_mint_refuses_bad_input(
    key: ed25519.Ed25519PrivateKey, kwargs: dict[str, Any], match: str
) -> None:
    args: dict[str, Any] = {"sub": "a", "roles": ["read"], **kwargs}
    with pytest.raises(ValueError, match=match):
        mint(private_pem(key), now=NOW, **args)


def test_mint_refuses_a_public_key_and_small_rsa(key: ed25519.Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError, match="private key"):
        mint(public_pem(key), sub="a", roles=["read"], now=NOW)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="2048"):
        mint(private_pem(small), sub="a", roles=["read"], now=NOW)


# ---------------------------------------------------------------- key files


def test_pem_file_is_accepted(key: ed25519.Ed25519PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "jwt-public.pem"
    path.write_bytes(public_pem(key))
    v = TokenVerifier.from_files([path], leeway_s=1)
    assert v.verify(mint(private_pem(key), sub="a", roles=["read"], now=NOW), now=NOW).sub == "a"


def test_jwks_file_is_accepted(tmp_path: Path) -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    p256 = ec.generate_private_key(ec.SECP256R1())
    jwks = {
        "keys": [
            {**json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(ed.public_key())), "kid": "ed"},
            {
                **json.loads(jwt.algorithms.ECAlgorithm.to_jwk(p256.public_key())),
                "kid": "ec",
                "alg": "ES256",
                "use": "sig",
            },
            {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"},  # skipped: not for signing
        ]
    }
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    keys = load_public_keys(path)
    assert [(k.kid, k.algorithm) for k in keys] == [("ed", "EdDSA"), ("ec", "ES256")]
    v = TokenVerifier.from_files([path])
    signers: list[tuple[PrivateKey, str]] = [(ed, "ed"), (p256, "ec")]
    for private, kid in signers:
        token = mint(private_pem(private), sub=kid, roles=["read"], kid=kid, now=NOW)
        assert v.verify(token, now=NOW).sub == kid
    assert reason(v, mint(private_pem(ed), sub="x", roles=["read"], kid="nope", now=NOW)) == (
        "unknown_kid"
    )


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "HMAC"),
        (b'{"keys": []}', "no signing keys"),
        (b'{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AA", "d": "AA"}]}', "private"),
        (b'{"keys": [{"kty": "OKP", "crv": "Ed448", "x": "AA"}]}', "not a usable"),
        (b"{not json", "not valid JSON"),
        (b"hello", "not a PEM public key"),
    ],
)
def test_bad_key_files_are_refused_naming_the_file(
    tmp_path: Path, content: bytes, match: str
) -> None:
    path = tmp_path / "keys"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        load_public_keys(path)
    assert str(path) in str(info.value)


def test_private_pem_is_refused_as_a_verification_key(
    key: ed25519.Ed25519PrivateKey, tmp_path: Path
) -> None:
    path = tmp_path / "jwt-private.pem"
    path.write_bytes(private_pem(key))
    with pytest.raises(ValueError, match="private key"):
        load_public_keys(path)


def test_jwk_alg_must_fit_its_key(tmp_path: Path) -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    jwk = {**json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(ed.public_key())), "alg": "ES256"}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    with pytest.raises(ValueError, match="does not fit"):
        load_public_keys(path)


def test_verifier_needs_a_key() -> None:
    with pytest.raises(ValueError, match="at least one"):
        TokenVerifier([])
