"""Certificates for the transport tests, made once per session: one cluster CA with
n1..n4 and an "intruder" (signed by the right CA but not a member), and a second CA."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest

from liferaft.security.certs import generate
from liferaft.security.tls import peer_client_context, peer_server_context

MEMBERS = ["n1", "n2", "n3", "n4"]


@dataclass(frozen=True)
class PKI:
    dir: Path  # the cluster CA and its certificates
    other: Path  # another CA, with a certificate for "n2"

    def server_ctx(self, node: str) -> ssl.SSLContext:
        return peer_server_context(self.ca, self.dir / f"{node}.pem", self.dir / f"{node}-key.pem")

    def client_ctx(self, node: str, *, certs: Path | None = None) -> ssl.SSLContext:
        d = certs if certs is not None else self.dir
        return peer_client_context(self.ca, d / f"{node}.pem", d / f"{node}-key.pem")

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("transport-certs")
    generate(d, MEMBERS)
    generate(d, [*MEMBERS, "intruder"])  # adds the intruder, signed by the same CA
    other = tmp_path_factory.mktemp("other-ca")
    generate(other, ["n2"])
    return PKI(d, other)
