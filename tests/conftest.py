"""Shared fixtures (a cluster PKI) and the simulator options: ``--seed N`` replays one
seed, ``--sim-runs N`` changes how many seeds each random test runs; the per-test timeout
of the slow tests."""

from __future__ import annotations

import os
from collections.abc import Callable
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


# pytest-timeout's limit for a test marked slow, in place of pyproject's `timeout` (300 s).
# The longest, test_soak[7] (2,000 seeds of 7 voters), takes ~21 minutes on an idle core
# (~0.64 s a seed); this leaves room for a shared machine.
SLOW_TEST_TIMEOUT = 3600.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give slow tests SLOW_TEST_TIMEOUT, unless ``--timeout`` or PYTEST_TIMEOUT was given
    (a timeout marker would override those) or the test has its own timeout marker."""
    if config.getoption("timeout", None) is not None or os.environ.get("PYTEST_TIMEOUT"):
        return
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT))


@pytest.fixture
def sim_seeds(pytestconfig: pytest.Config) -> Callable[[int], range]:
    """``sim_seeds(default)``: the seeds a random simulator test runs: ``--seed N`` alone,
    or ``--sim-runs`` (else ``default``) seeds from ``--sim-base``."""

    def seeds(default: int) -> range:
        seed = pytestconfig.getoption("--seed")
        if seed is not None:
            return range(seed, seed + 1)
        runs = pytestconfig.getoption("--sim-runs") or default
        base = pytestconfig.getoption("--sim-base")
        return range(base, base + runs)

    return seeds


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
