"""Hundreds of random clusters under faults; every step is checked for Raft's safety
properties, and each healed cluster must elect a leader and commit a write.

A failure names its profile and seed; replay it with
``liferaft sim --profile PROFILE --seed N`` (narrated) or
``pytest tests/core/test_chaos.py --seed N -k PROFILE``. ``--sim-runs`` changes the
number of seeds per profile, ``--sim-base`` the first one; ``-m slow`` runs a long soak.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable

import pytest

from liferaft.testing.chaos import PROFILES, ChaosOptions, run_chaos
from liferaft.testing.checker import SimulationFailure

# Seeds per profile in the default run: about a minute on two cores in all (fewer than
# before the operations and lease tests joined make test, to keep it under ten minutes;
# --sim-runs runs more).
DEFAULT_RUNS = {
    "three_nodes": 150,
    "five_nodes": 80,
    "churn_three": 150,
    "churn_five": 100,
    "slow_disk": 100,
}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_random_clusters_stay_safe_and_recover(
    profile: str, sim_seeds: Callable[[int], range]
) -> None:
    elections = committed = 0
    for seed in sim_seeds(DEFAULT_RUNS[profile]):
        try:
            report = run_chaos(seed, PROFILES[profile])
        except SimulationFailure as exc:
            pytest.fail(f"{exc}\nreplay: liferaft sim --profile {profile} --seed {seed}")
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
        report = run_chaos(seed, PROFILES["three_nodes"])
        for k in totals:
            totals[k] += getattr(report, k)
    assert all(v > 0 for v in totals.values()), totals


@pytest.mark.slow
@pytest.mark.parametrize("voters", [3, 5, 7])
def test_soak(voters: int, sim_seeds: Callable[[int], range]) -> None:
    opts = dataclasses.replace(PROFILES["five_nodes"], voters=voters, ticks=5000)
    for seed in sim_seeds(2000):
        run_chaos(seed, opts)


def test_a_run_replays_identically_whatever_the_hash_seed() -> None:
    """Set iteration order depends on PYTHONHASHSEED; the core and simulator must not."""
    code = (
        "from liferaft.testing.chaos import run_chaos, PROFILES\n"
        "print(run_chaos(11, PROFILES['five_nodes']))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": str(h), "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for h in (1, 2, 3)
    }
    assert len(outs) == 1
