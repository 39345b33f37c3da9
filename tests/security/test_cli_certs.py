"""``liferaft certs`` and ``liferaft token`` as an operator runs them (docs/security.md)."""

from __future__ import annotations

import time
from pathlib import Path

from click.testing import CliRunner
from cryptography import x509

from liferaft.cli import cli
from liferaft.security.certs import key_is_private, node_ids
from liferaft.security.tokens import Role, TokenVerifier


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def make(directory: Path, *extra: str) -> tuple[int, str]:
    return run("certs", "--dir", str(directory), *extra)


def test_certs_writes_and_lists_every_file(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    code, out = make(d, "--nodes", "n1,n2,n3", "--san", "10.9.8.7", "--san", "kv.example")
    assert code == 0, out
    lines = out.splitlines()
    assert len(lines) == 10 and all(line.startswith("wrote ") for line in lines)
    assert {Path(line.removeprefix("wrote ")).name for line in lines} == {
        p.name for p in d.iterdir()
    }
    assert node_ids((d / "n2.pem").read_bytes()) == {"n2", "localhost", "kv.example"}
    assert key_is_private(d / "n2-key.pem") and key_is_private(d / "jwt-private.pem")


def test_certs_again_writes_nothing_and_says_so(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    make(d, "--nodes", "n1,n2")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    code, out = make(d, "--nodes", "n1,n2")
    assert code == 0
    assert "all files already exist" in out
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_certs_adds_nodes_signed_by_the_existing_ca(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    make(d, "--nodes", "n1 n2")  # spaces too, as the Makefile's NODES="n1 n2" gives them
    code, out = make(d, "--nodes", "n1,n2,n3")
    assert code == 0
    assert [Path(line.split()[-1]).name for line in out.splitlines()] == ["n3-key.pem", "n3.pem"]
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    x509.load_pem_x509_certificate((d / "n3.pem").read_bytes()).verify_directly_issued_by(ca)


def test_certs_force_replaces(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    make(d, "--nodes", "n1")
    old = (d / "ca-key.pem").read_bytes()
    code, out = make(d, "--nodes", "n1", "--force")
    assert code == 0 and len(out.splitlines()) == 6
    assert (d / "ca-key.pem").read_bytes() != old


def test_certs_bad_input_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    code, out = make(d, "--nodes", "n1,Bad_Id")
    assert code == 2 and "'Bad_Id'" in out
    code, out = make(d, "--nodes", ",")
    assert code == 2 and "at least one node id" in out
    code, out = make(d, "--nodes", "n1", "--san", "not a name")
    assert code == 2 and "'not a name'" in out
    assert not d.exists()
    code, out = run("certs", "--dir", str(d))
    assert code == 2 and "--nodes" in out


def test_certs_missing_ca_key_exits_2(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    make(d, "--nodes", "n1")
    (d / "ca-key.pem").unlink()
    code, out = make(d, "--nodes", "n1,n2")
    assert code == 2 and "ca-key.pem is missing" in out


def test_token_prints_one_jwt_the_nodes_accept(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    make(d, "--nodes", "n1")
    code, out = run(
        "token",
        "--key", str(d / "jwt-private.pem"),
        "--sub", "alice",
        "--roles", "read,write",
        "--ttl", "120",
        "--prefix", "app/",
        "--prefix", "tmp/",
        "--kid", "k1",
    )  # fmt: skip
    assert code == 0, out
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].count(".") == 2
    verifier = TokenVerifier.from_files([d / "jwt-public.pem"])
    claims = verifier.verify(lines[0], now=time.time())
    assert claims.sub == "alice"
    assert claims.roles == {Role.READ, Role.WRITE}
    assert claims.prefixes == ("app/", "tmp/")
    assert 0 < claims.exp - time.time() <= 120


def test_token_bad_input_exits_2(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    make(d, "--nodes", "n1")
    key = str(d / "jwt-private.pem")
    code, out = run("token", "--key", key, "--sub", "a", "--roles", "read,root")
    assert code == 2 and "unknown role 'root'" in out
    code, out = run("token", "--key", key, "--sub", "a", "--roles", "read", "--ttl", "0")
    assert code == 2
    code, out = run("token", "--key", str(d / "jwt-public.pem"), "--sub", "a", "--roles", "read")
    assert code == 2 and "jwt-public.pem" in out and "private key" in out
    code, out = run("token", "--key", str(d / "missing.pem"), "--sub", "a", "--roles", "read")
    assert code == 2
