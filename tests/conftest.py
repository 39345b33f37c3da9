"""Options for the simulator runs: ``--seed N`` replays one seed, ``--sim-runs N``
changes how many seeds each random test runs (default in tests/core/test_chaos.py)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("liferaft simulator")
    group.addoption("--seed", type=int, default=None, help="run only this simulator seed")
    group.addoption("--sim-runs", type=int, default=None, help="seeds per random simulator test")
    group.addoption(
        "--sim-base", type=int, default=0, help="first seed of the random simulator tests"
    )
