"""Certificates and token keys over time (docs/security.md, "Rotating certificates and
keys"): checking a node's files before they replace what it uses, renewing node
certificates under the existing CA, and the overlap of two token keys."""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from liferaft.cli import cli
from liferaft.security.certs import (
    CertsError,
    drop_old_jwt_keys,
    generate,
    new_jwt_key,
    node_ids,
    renew,
)
from liferaft.security.tls import NodeTls, TlsMaterialError, load_node_tls
from liferaft.security.tokens import TokenError, TokenVerifier, mint


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def server_certificate(client: ssl.SSLContext, server: ssl.SSLContext, name: str) -> bytes:
    """A real TLS handshake between two contexts over memory buffers; the DER of the
    certificate the server presented, as the client verified it."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_side=False, server_hostname=name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):  # a handshake is a handful of flights
        for side, obj in (("c", c), ("s", s)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            der = c.getpeercert(binary_form=True)
            assert der is not None
            return der
    raise AssertionError("the handshake did not finish")


@pytest.fixture
def d(tmp_path: Path) -> Path:
    d = tmp_path / "certs"
    generate(d, ["n1", "n2"], sans=["10.1.2.3"])
    return d


def node_tls(d: Path, node: str = "n1", now: datetime | None = None) -> NodeTls:
    """Load with the reload checks, validity at ``now`` (default: the moment of the call,
    not of the module's import: the suite runs for minutes, certificates are made during
    it)."""
    at = now if now is not None else datetime.now(UTC)
    return load_node_tls(d / "ca.pem", d / f"{node}.pem", d / f"{node}-key.pem", node, now=at)


# ------------------------------------------------------------------ checking on reload


def test_a_renewed_certificate_is_what_new_handshakes_present(d: Path) -> None:
    before = node_tls(d)
    renew(d, ["n1"])
    after = node_tls(d)
    cert = load(d / "n1.pem")
    assert after.serial == cert.serial_number != before.serial
    assert after.not_after == cert.not_valid_after_utc
    # n2 (not renewed) dials n1's new listener and n1's new dialler reaches n2
    n2 = node_tls(d, "n2")
    der = server_certificate(n2.peer_client, after.peer_server, "n1")
    assert x509.load_der_x509_certificate(der).serial_number == cert.serial_number
    server_certificate(after.peer_client, n2.peer_server, "n2")
    # and the contexts made before keep presenting the old certificate
    der = server_certificate(n2.peer_client, before.peer_server, "n1")
    assert x509.load_der_x509_certificate(der).serial_number == before.serial


def test_a_key_that_is_not_the_certificates_is_refused(d: Path) -> None:
    shutil.copy(d / "n2-key.pem", d / "n1-key.pem")
    with pytest.raises(TlsMaterialError, match="is not the key of"):
        node_tls(d)


def test_a_certificate_for_another_node_is_refused(d: Path) -> None:
    with pytest.raises(TlsMaterialError, match=r"names .*n2.*not this node n1"):
        load_node_tls(d / "ca.pem", d / "n2.pem", d / "n2-key.pem", "n1", now=datetime.now(UTC))


def test_a_certificate_from_another_ca_is_refused(d: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    generate(other, ["n1"])
    with pytest.raises(TlsMaterialError, match="not signed by a CA in"):
        load_node_tls(
            d / "ca.pem", other / "n1.pem", other / "n1-key.pem", "n1", now=datetime.now(UTC)
        )


def test_a_ca_file_with_two_cas_accepts_certificates_of_either(d: Path, tmp_path: Path) -> None:
    """The overlap of a CA change: ca.pem holds the old and the new CA."""
    other = tmp_path / "other"
    generate(other, ["n1"])
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((d / "ca.pem").read_bytes() + (other / "ca.pem").read_bytes())
    for directory in (d, other):
        load_node_tls(
            bundle, directory / "n1.pem", directory / "n1-key.pem", "n1", now=datetime.now(UTC)
        )


def test_an_expired_or_not_yet_valid_certificate_is_refused(d: Path) -> None:
    cert = load(d / "n1.pem")
    with pytest.raises(TlsMaterialError, match="expired at"):
        node_tls(d, now=cert.not_valid_after_utc + timedelta(seconds=1))
    with pytest.raises(TlsMaterialError, match="not valid before"):
        node_tls(d, now=cert.not_valid_before_utc - timedelta(seconds=1))


def test_missing_unreadable_or_garbled_files_are_refused(d: Path) -> None:
    os.chmod(d / "n1-key.pem", 0o644)
    with pytest.raises(TlsMaterialError, match="readable by others"):
        node_tls(d)
    os.chmod(d / "n1-key.pem", 0o600)
    (d / "n1-key.pem").write_bytes(b"not a key")
    with pytest.raises(TlsMaterialError, match="not an unencrypted PEM private key"):
        node_tls(d)
    (d / "n1.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(TlsMaterialError, match="is not a PEM certificate"):
        node_tls(d)
    (d / "ca.pem").unlink()
    with pytest.raises(TlsMaterialError, match=r"cannot read .*ca\.pem"):
        node_tls(d)


def test_at_start_up_only_what_ssl_checks_is_checked(d: Path) -> None:
    """Without ``now`` (start-up: the config loader checked names and modes) an expired
    certificate still loads, as it always has; a mismatched key still fails in ssl."""
    cert = load(d / "n1.pem")
    assert node_tls(d, now=None).not_after == cert.not_valid_after_utc
    shutil.copy(d / "n2-key.pem", d / "n1-key.pem")
    with pytest.raises(TlsMaterialError):
        node_tls(d, now=None)


# ------------------------------------------------------------------ renewing


def test_renew_replaces_only_the_named_nodes_files_and_keeps_their_sans(d: Path) -> None:
    before = snapshot(d)
    old = load(d / "n1.pem")
    written = renew(d, ["n1"])
    assert [p.name for p in written] == ["n1-key.pem", "n1.pem"]
    after = snapshot(d)
    assert {n for n in after if after[n] != before[n]} == {"n1.pem", "n1-key.pem"}
    new = load(d / "n1.pem")
    new.verify_directly_issued_by(load(d / "ca.pem"))
    assert new.serial_number != old.serial_number
    assert new.public_key() != old.public_key()  # a new key, not the old one re-signed
    san = x509.SubjectAlternativeName
    assert (
        new.extensions.get_extension_for_class(san).value
        == old.extensions.get_extension_for_class(san).value
    )
    assert (d / "n1-key.pem").stat().st_mode & 0o777 == 0o600
    node_tls(d)  # and the node accepts the pair


def test_renew_with_san_replaces_the_extra_names(d: Path) -> None:
    renew(d, ["n1"], sans=["db1.internal"])
    assert node_ids((d / "n1.pem").read_bytes()) == {"n1", "localhost", "db1.internal"}


def test_renew_refuses_what_it_cannot_do_before_writing(d: Path) -> None:
    before = snapshot(d)
    with pytest.raises(CertsError, match="nothing to renew"):
        renew(d, ["n1", "n9"])
    with pytest.raises(ValueError, match="node id"):
        renew(d, ["n1", "n2"], sans=["n2"])
    (d / "ca-key.pem").rename(d.parent / "ca-key.pem")  # kept off this machine
    with pytest.raises(CertsError, match="needs the existing CA"):
        renew(d, ["n1"])
    (d.parent / "ca-key.pem").rename(d / "ca-key.pem")
    assert snapshot(d) == before


# ------------------------------------------------------------------ token keys


def test_token_key_rotation_overlaps_then_ends(d: Path) -> None:
    old_private = (d / "jwt-private.pem").read_bytes()
    old_token = mint(old_private, sub="a", roles=["read"], now=time.time())
    written = new_jwt_key(d)
    assert [p.name for p in written] == ["jwt-public.pem", "jwt-private.pem"]
    assert (d / "jwt-private.pem").stat().st_mode & 0o777 == 0o600
    new_token = mint((d / "jwt-private.pem").read_bytes(), sub="b", roles=["read"], now=time.time())
    both = TokenVerifier.from_files([d / "jwt-public.pem"])
    assert len(both.keys) == 2
    assert both.verify(old_token, now=time.time()).sub == "a"
    assert both.verify(new_token, now=time.time()).sub == "b"
    generate(d, ["n1", "n2"])  # the directory is still consistent for generate
    assert [p.name for p in drop_old_jwt_keys(d)] == ["jwt-public.pem"]
    assert drop_old_jwt_keys(d) == []
    only_new = TokenVerifier.from_files([d / "jwt-public.pem"])
    assert only_new.verify(new_token, now=time.time()).sub == "b"
    with pytest.raises(TokenError) as refused:
        only_new.verify(old_token, now=time.time())
    assert refused.value.reason == "bad_signature"


def test_a_key_file_with_a_bad_block_names_it(d: Path) -> None:
    path = d / "jwt-public.pem"
    path.write_bytes(
        path.read_bytes() + b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
    )
    with pytest.raises(ValueError, match="PEM block 2"):
        TokenVerifier.from_files([path])


# ------------------------------------------------------------------ the command


def certs(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["certs", *args])
    return result.exit_code, result.output


def test_the_certs_command_renews_and_rotates(d: Path) -> None:
    old = load(d / "n2.pem").serial_number
    code, out = certs("--dir", str(d), "--nodes", "n2", "--renew")
    assert code == 0, out
    assert [line.split()[-1] for line in out.splitlines()] == [
        str(d / "n2-key.pem"),
        str(d / "n2.pem"),
    ]
    assert load(d / "n2.pem").serial_number != old
    code, out = certs("--dir", str(d), "--new-jwt-key")
    assert code == 0 and "jwt-private.pem" in out, out
    code, out = certs("--dir", str(d), "--drop-old-jwt-keys")
    assert code == 0 and out.strip() == f"wrote {d / 'jwt-public.pem'}", out
    code, out = certs("--dir", str(d), "--drop-old-jwt-keys")
    assert code == 0 and "nothing written" in out


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("--renew",), 2, "--nodes needs"),
        (("--nodes", "n1", "--renew", "--force"), 2, "does not go with"),
        (("--new-jwt-key", "--drop-old-jwt-keys"), 2, "exclude each other"),
        (("--nodes", "n1", "--new-jwt-key"), 2, "goes with --renew"),
        (("--nodes", "n7", "--renew"), 2, "nothing to renew"),
    ],
)
def test_the_certs_command_refuses_contradictions(
    d: Path, args: tuple[str, ...], code: int, says: str
) -> None:
    before = snapshot(d)
    got, out = certs("--dir", str(d), *args)
    assert got == code and says in out, out
    assert snapshot(d) == before


# ------------------------------------------------------------------ a node's reload


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, object]]:
    return [
        dict(getattr(r, "liferaft_fields", {})) for r in caplog.records if r.getMessage() == name
    ]


def test_a_node_swaps_its_contexts_and_keys_on_reload_and_keeps_them_on_failure(
    d: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What SIGHUP runs (api/service.py, reload_credentials), on a node that is not
    started: the TLS contexts, the expiry metric and the token verifier are replaced
    together when the files are good, and left alone, with a refusal logged, when not."""
    from liferaft.api.server import ClientServer
    from liferaft.api.service import reload_credentials
    from liferaft.config import load as load_config
    from liferaft.node.node import Node
    from liferaft.testing.localcluster import write_config

    cfg = write_config(tmp_path / "n1.toml", "n1", {"n1": (1, 2, 3)}, d, tmp_path / "data")
    node = Node(load_config(cfg))
    api = ClientServer(node, node.settings)
    first, verifier = node.tls, api.verifier
    expiry = "liferaft_tls_cert_expiry_timestamp_seconds"
    assert node.metrics.registry.get_sample_value(expiry) == first.not_after.timestamp()

    renew(d, ["n1"])
    new_jwt_key(d)
    with caplog.at_level(logging.INFO):
        assert reload_credentials(api)
    second = node.tls
    assert second is not first and api.ssl_ctx is second.client_server
    assert second.serial == load(d / "n1.pem").serial_number
    assert node.metrics.registry.get_sample_value(expiry) == second.not_after.timestamp()
    assert len(api.verifier.keys) == 2 and api.verifier is not verifier
    rotated = api.verifier
    [ok] = events(caplog, "tls_reloaded")
    assert ok["serial"] == second.serial_hex and ok["not_after"] == second.not_after.isoformat()
    assert events(caplog, "jwt_keys_reloaded")[0]["keys"] == 2

    shutil.copy(d / "n2-key.pem", d / "n1-key.pem")  # a botched renewal
    (d / "jwt-public.pem").write_bytes(b"garbage")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert not reload_credentials(api)
    assert node.tls is second and api.verifier is rotated  # the old material stays
    assert "is not the key of" in str(events(caplog, "tls_reload_refused")[0]["error"])
    assert "jwt-public.pem" in str(events(caplog, "jwt_keys_reload_refused")[0]["error"])
    assert events(caplog, "tls_reloaded") == [] and events(caplog, "jwt_keys_reloaded") == []


def test_during_a_ca_change_old_and_new_certificates_meet(d: Path, tmp_path: Path) -> None:
    """Step 3 of "Changing the CA": both nodes trust both CAs; n1 already presents its
    new-CA certificate, n2 still its old one. Both directions of the link handshake."""
    new = tmp_path / "certs-new"
    generate(new, ["n1", "n2"])
    bundle = tmp_path / "ca-bundle.pem"
    bundle.write_bytes((d / "ca.pem").read_bytes() + (new / "ca.pem").read_bytes())
    n1 = load_node_tls(bundle, new / "n1.pem", new / "n1-key.pem", "n1", now=datetime.now(UTC))
    n2 = load_node_tls(bundle, d / "n2.pem", d / "n2-key.pem", "n2", now=datetime.now(UTC))
    assert x509.load_der_x509_certificate(
        server_certificate(n2.peer_client, n1.peer_server, "n1")
    ) == load(new / "n1.pem")
    server_certificate(n1.peer_client, n2.peer_server, "n2")
    # after step 4 (the new CA alone) the old certificate is refused
    n1_after = load_node_tls(
        new / "ca.pem", new / "n1.pem", new / "n1-key.pem", "n1", now=datetime.now(UTC)
    )
    with pytest.raises(ssl.SSLError):
        server_certificate(n1_after.peer_client, n2.peer_server, "n2")
