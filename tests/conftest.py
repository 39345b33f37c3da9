"""Shared fixtures (a cluster PKI) and the simulator options: ``--seed N`` replays one
seed, ``--sim-runs N`` changes how many seeds each random test runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from liferaft.security.certs import generate


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("liferaft simulator")
    group.addoption("--seed", type=int, default=None, help="run only this simulator seed")
    group.addoption("--sim-runs", type=int, default=None, help="seeds per random simulator test")
    group.addoption(
        "--sim-base", type=int, default=0, help="first seed of the random simulator tests"
    )


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA and certificates for n1..n6 (and "intruder", signed by the same CA but
    never a member), shared by every node test."""
    d = tmp_path_factory.mktemp("certs")
    generate(d, [*(f"n{i}" for i in range(1, 7)), "intruder"])
    return d


@pytest.fixture(scope="session")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA with a certificate that claims to be n2."""
    d = tmp_path_factory.mktemp("other-ca")
    generate(d, ["n2"])
    return d
