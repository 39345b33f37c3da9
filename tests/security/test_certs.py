"""Certificate generation (docs/security.md): a chain that TLS accepts on both ends, node
identity in the DNS SAN, private keys private, and nothing ever overwritten without
force."""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from liferaft.security import certs
from liferaft.security.certs import CertsError, generate, key_is_private, node_ids

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
NODES = ["n1", "n2", "n3"]


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def d(tmp_path: Path) -> Path:
    return tmp_path / "certs"


def test_writes_every_file_of_the_spec_and_returns_them(d: Path) -> None:
    written = generate(d, NODES, now=NOW)
    names = {"ca.pem", "ca-key.pem", "jwt-private.pem", "jwt-public.pem"}
    names |= {f"{n}.pem" for n in NODES} | {f"{n}-key.pem" for n in NODES}
    assert {p.name for p in written} == names
    assert {p.name for p in d.iterdir()} == names  # and no temporary files left over
    assert all(p.parent == d for p in written)


def test_node_certificates_chain_to_the_ca(d: Path) -> None:
    generate(d, NODES, now=NOW)
    ca = load(d / "ca.pem")
    ca.verify_directly_issued_by(ca)  # self-signed
    for n in NODES:
        load(d / f"{n}.pem").verify_directly_issued_by(ca)


def test_ca_is_a_p256_ca_that_signs_only_leaf_certificates(d: Path) -> None:
    generate(d, NODES, now=NOW)
    ca = load(d / "ca.pem")
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign
    assert ca.not_valid_after_utc - ca.not_valid_before_utc == certs.CA_VALIDITY


def test_node_certificate_names_and_usages(d: Path) -> None:
    generate(d, NODES, sans=["10.1.2.3", "Node1.Example.com", "::1"], now=NOW)
    cert = load(d / "n1.pem")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "n1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["n1", "localhost", "node1.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=825)
    assert cert.not_valid_before_utc <= NOW < cert.not_valid_after_utc


def test_node_ids_reads_the_dns_sans_from_pem_and_der(d: Path) -> None:
    generate(d, ["n2"], sans=["10.0.0.2", "db.internal"], now=NOW)
    pem = (d / "n2.pem").read_bytes()
    assert node_ids(pem) == {"n2", "localhost", "db.internal"}
    assert node_ids(ssl.PEM_cert_to_DER_cert(pem.decode())) == {"n2", "localhost", "db.internal"}
    assert node_ids((d / "ca.pem").read_bytes()) == set()


def test_serials_are_random_and_distinct(d: Path) -> None:
    generate(d, NODES, now=NOW)
    serials = {load(d / f"{n}.pem").serial_number for n in [*NODES, "ca"]}
    assert len(serials) == 4


def test_private_keys_are_0600_and_public_files_are_not_secret(d: Path) -> None:
    generate(d, NODES, now=NOW)
    for name in ["ca-key.pem", "jwt-private.pem", *(f"{n}-key.pem" for n in NODES)]:
        assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600, name
        assert key_is_private(d / name)
    assert not key_is_private(d / "ca.pem")


def test_jwt_key_pair_is_ed25519_pkcs8_and_spki(d: Path) -> None:
    generate(d, NODES, now=NOW)
    private_pem = (d / "jwt-private.pem").read_bytes()
    public_pem = (d / "jwt-public.pem").read_bytes()
    assert private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    private = serialization.load_pem_private_key(private_pem, password=None)
    public = serialization.load_pem_public_key(public_pem)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    assert isinstance(public, ed25519.Ed25519PublicKey)
    assert private.public_key() == public


def test_mutual_tls_handshake_between_two_nodes(d: Path) -> None:
    """Each node certificate serves as both a server and a client certificate."""
    generate(d, ["n1", "n2"], now=datetime.now(UTC))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(d / "n1.pem", d / "n1-key.pem")
    server_ctx.load_verify_locations(d / "ca.pem")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_cert_chain(d / "n2.pem", d / "n2-key.pem")
    client_ctx.load_verify_locations(d / "ca.pem")

    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="n1")
    done = {"server": False, "client": False}
    for _ in range(10):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values())
    peer = server.getpeercert(binary_form=True)
    assert peer is not None and "n2" in node_ids(peer)


def test_existing_files_are_never_overwritten(d: Path) -> None:
    generate(d, NODES, now=NOW)
    before = snapshot(d)
    assert generate(d, NODES, now=NOW + timedelta(days=1)) == []
    assert snapshot(d) == before


def test_force_regenerates_everything(d: Path) -> None:
    generate(d, NODES, now=NOW)
    before = snapshot(d)
    (d / "n1-key.pem").chmod(0o644)  # a loosened key must not pass its mode on
    written = generate(d, NODES, force=True, now=NOW)
    assert len(written) == len(before)
    after = snapshot(d)
    assert after.keys() == before.keys()
    assert all(after[name] != before[name] for name in before)
    assert key_is_private(d / "n1-key.pem")
    load(d / "n1.pem").verify_directly_issued_by(load(d / "ca.pem"))


def test_adding_a_node_reuses_the_existing_ca(d: Path) -> None:
    generate(d, ["n1", "n2"], now=NOW)
    old_ca = load(d / "ca.pem")
    before = snapshot(d)
    written = generate(d, ["n1", "n2", "n3", "n4"], now=NOW + timedelta(days=30))
    assert sorted(p.name for p in written) == ["n3-key.pem", "n3.pem", "n4-key.pem", "n4.pem"]
    after = snapshot(d)
    assert all(after[name] == data for name, data in before.items())
    load(d / "n4.pem").verify_directly_issued_by(old_ca)


def test_node_certificates_never_outlive_the_ca(d: Path) -> None:
    generate(d, ["n1"], now=NOW)
    late = NOW + certs.CA_VALIDITY - timedelta(days=10)
    generate(d, ["n2"], now=late)
    assert load(d / "n2.pem").not_valid_after_utc == load(d / "ca.pem").not_valid_after_utc


@pytest.mark.parametrize(
    "bad", ["", "N1", "n_1", "-n1", "n1-", "a" * 64, "n1.example", "ca", "localhost", "n1-key"]
)
def test_bad_node_id_is_rejected_by_name_before_anything_is_written(d: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="node id") as info:
        generate(d, ["n1", bad], now=NOW)
    if bad:
        assert repr(bad) in str(info.value)
    assert not d.exists()


def test_longest_node_id_is_accepted(d: Path) -> None:
    generate(d, ["a" * 63], now=NOW)
    assert node_ids((d / f"{'a' * 63}.pem").read_bytes()) >= {"a" * 63}


@pytest.mark.parametrize("bad", ["", "bad name", "-x.example", "1.2.3.999", "n2"])
def test_bad_san_is_rejected(d: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="--san"):
        generate(d, ["n1", "n2"], sans=[bad], now=NOW)
    assert not d.exists()


def test_missing_ca_key_is_a_clear_error_when_a_node_needs_signing(d: Path) -> None:
    generate(d, ["n1"], now=NOW)
    (d / "ca-key.pem").unlink()
    assert generate(d, ["n1"], now=NOW) == []  # nothing to sign: nothing to complain about
    before = snapshot(d)
    with pytest.raises(CertsError, match=r"ca-key\.pem is missing"):
        generate(d, ["n1", "n2"], now=NOW)
    assert snapshot(d) == before


def test_node_certificate_without_its_key_is_a_clear_error(d: Path) -> None:
    generate(d, ["n1"], now=NOW)
    (d / "n1-key.pem").unlink()
    with pytest.raises(CertsError, match=r"n1-key\.pem is missing"):
        generate(d, ["n1"], now=NOW)


def test_node_certificates_without_a_ca_are_a_clear_error(d: Path) -> None:
    generate(d, ["n1"], now=NOW)
    (d / "ca.pem").unlink()
    (d / "ca-key.pem").unlink()
    with pytest.raises(CertsError, match="no CA"):
        generate(d, ["n1"], now=NOW)


def test_interrupted_run_is_completed_without_replacing_keys(d: Path) -> None:
    """A key written without its certificate (a crash between the two) gets certified."""
    generate(d, ["n1"], now=NOW)
    (d / "ca.pem").unlink()
    (d / "n1.pem").unlink()
    (d / "jwt-public.pem").unlink()
    keys = {n: (d / n).read_bytes() for n in ["ca-key.pem", "n1-key.pem", "jwt-private.pem"]}
    written = generate(d, ["n1"], now=NOW)
    assert sorted(p.name for p in written) == ["ca.pem", "jwt-public.pem", "n1.pem"]
    assert all((d / n).read_bytes() == data for n, data in keys.items())
    load(d / "n1.pem").verify_directly_issued_by(load(d / "ca.pem"))


def test_a_directory_with_only_the_jwt_public_key_keeps_it(d: Path) -> None:
    generate(d, ["n1"], now=NOW)
    (d / "jwt-private.pem").unlink()
    public = (d / "jwt-public.pem").read_bytes()
    assert generate(d, ["n1"], now=NOW) == []
    assert (d / "jwt-public.pem").read_bytes() == public


def test_mismatched_ca_key_is_refused(d: Path, tmp_path: Path) -> None:
    generate(d, ["n1"], now=NOW)
    other = tmp_path / "other"
    generate(other, ["n1"], now=NOW)
    (d / "ca-key.pem").unlink()
    (d / "ca-key.pem").write_bytes((other / "ca-key.pem").read_bytes())
    with pytest.raises(CertsError, match="not the key of"):
        generate(d, ["n1", "n2"], now=NOW)
    assert not (d / "n2.pem").exists()
