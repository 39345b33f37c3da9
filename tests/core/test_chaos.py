"""Hundreds of random clusters under faults; every step is checked for Raft's safety
properties, and each healed cluster must elect a leader and commit.

A failure names its seed; ``pytest tests/core/test_chaos.py --seed N`` replays it
exactly (add ``-k five`` etc. to pick the profile), and ``liferaft sim --seed N``
narrates it. ``--sim-runs`` changes the number of seeds; ``-m slow`` runs a long soak.
"""

from __future__ import annotations

import pytest

from liferaft.testing.chaos import ChaosOptions, run_chaos

PROFILES = {
    # name: (options, default number of seeds)
    "three_nodes": (ChaosOptions(voters=3, ticks=2000), 250),
    "five_nodes": (ChaosOptions(voters=5, ticks=2000), 120),
    # Frequent crashes and partitions with one entry per message: many terms and
    # divergent logs, where Figure 8's commitment hazard lives.
    "churn_three": (
        ChaosOptions(voters=3, ticks=1000, crash=0.02, network=0.03, max_msg_bytes=17),
        250,
    ),
    "churn_five": (
        ChaosOptions(voters=5, ticks=1000, crash=0.02, network=0.03, max_msg_bytes=17),
        150,
    ),
}


def seeds(config: pytest.Config, default: int) -> range:
    seed = config.getoption("--seed")
    if seed is not None:
        return range(seed, seed + 1)
    runs = config.getoption("--sim-runs") or default
    base = config.getoption("--sim-base")
    return range(base, base + runs)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_random_clusters_stay_safe_and_recover(profile: str, pytestconfig: pytest.Config) -> None:
    opts, default = PROFILES[profile]
    elections = committed = 0
    for seed in seeds(pytestconfig, default):
        report = run_chaos(seed, opts)  # raises with the seed and a trace on failure
        elections += report.elections
        committed += report.committed
    # The runs must have exercised the protocol, not idled.
    assert elections > 0 and committed > 0


def test_a_seed_replays_exactly() -> None:
    opts = ChaosOptions(voters=5, ticks=600)
    first: list[str] = []
    second: list[str] = []
    assert run_chaos(7, opts, first.append) == run_chaos(7, opts, second.append)
    assert first == second and len(first) > 10


def test_random_runs_exercise_every_mechanism() -> None:
    """Membership changes, transfers, compactions, snapshot installs, reads and crashes
    all happen inside the random runs, not only in scripted tests."""
    totals = dict.fromkeys(
        ["conf_changes", "transfers", "snapshots", "installs", "reads_checked", "crashes"], 0
    )
    for seed in range(20):
        report = run_chaos(seed, ChaosOptions(voters=3, ticks=2000))
        for k in totals:
            totals[k] += getattr(report, k)
    assert all(v > 0 for v in totals.values()), totals


@pytest.mark.slow
@pytest.mark.parametrize("voters", [3, 5, 7])
def test_soak(voters: int, pytestconfig: pytest.Config) -> None:
    for seed in seeds(pytestconfig, 2000):
        run_chaos(seed, ChaosOptions(voters=voters, ticks=5000))
