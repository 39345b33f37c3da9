"""Real nodes, their API and real clients under the whole-node simulator
(``liferaft.testing.nodesim``): hundreds of seeded runs with crashes, partitions, loss and
leadership transfers, each checked for linearizability, exactly-once writes, identical
replicas, complete watches, no waiter left behind and a bounded in-memory log.

A failure prints its seed and fault timeline; replay it with
``liferaft sim --whole-node --seed N`` or ``pytest tests/sim --seed N``. ``--sim-runs``
changes the number of seeds, ``--sim-base`` the first one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from liferaft.testing.nodesim import SimConfig, SimResult, simulate

DEFAULT_RUNS = 100  # about 2 minutes on this project's 2-core machine; --sim-runs for more


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """The nodes' JSON events would be most of the run's time and output."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def test_real_nodes_under_faults_keep_every_promise(sim_seeds: Callable[[int], range]) -> None:
    failures: list[str] = []
    totals = {"ops": 0, "acked": 0, "events": 0, "faults": 0, "elections": 0}
    for seed in sim_seeds(DEFAULT_RUNS):
        r = simulate(seed)
        if not r.ok:
            failures.append(r.report() + f"\nreplay: liferaft sim --whole-node --seed {seed}")
            if len(failures) >= 3:
                break
        totals["ops"] += len(r.history)
        totals["acked"] += r.acked_puts
        totals["events"] += r.events_seen
        totals["faults"] += len(r.timeline)
        totals["elections"] += r.elections
    assert not failures, "\n\n".join(failures)
    print(f"whole-node simulation: {totals}")
    # The runs must have exercised the system, not idled.
    runs = len(sim_seeds(DEFAULT_RUNS))
    assert totals["acked"] >= 20 * runs and totals["events"] >= totals["acked"]
    if runs >= 20:
        assert totals["elections"] > runs and totals["faults"] > 3 * runs


def _digest(r: SimResult) -> str:
    return hashlib.sha256(repr((r.history, r.timeline, r.elections)).encode()).hexdigest()


def test_a_seed_replays_exactly_in_this_process() -> None:
    first, second = simulate(4), simulate(4)
    assert first.timeline and first.elections > 0  # a run with faults in it
    assert _digest(first) == _digest(second)


def test_a_seed_replays_exactly_in_another_process_with_another_hash_seed() -> None:
    code = (
        "import hashlib, logging; from liferaft.testing.nodesim import simulate;"
        "logging.disable(logging.CRITICAL); r = simulate(4);"
        "print(hashlib.sha256(repr((r.history, r.timeline, r.elections)).encode()).hexdigest())"
    )
    out = [
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": h},
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout.strip()
        for h in ("1", "2")
    ]
    assert out[0] == out[1] == _digest(simulate(4))


def test_a_run_without_faults_loses_nothing_and_elects_once() -> None:
    r = simulate(1, SimConfig(faults=False))
    assert r.ok, r.report()
    assert not r.timeline[:-1]  # only the final "settle"
    assert r.elections == 0
    assert r.acked_puts == sum(1 for o in r.history if o.kind == "put")


# ---------------------------------------------------------------- planted bugs
#
# Each plants a bug a careless change to the node or API layer could make, and the
# simulator must catch it within a few seeds: proof that its checks can fail.


def _plant_no_term_check(mp: pytest.MonkeyPatch) -> None:
    """A proposal is answered with the result of whatever entry was applied at its index,
    even one a new leader put there instead of it (the term check forgotten)."""
    from liferaft.node.waiters import Waiters

    def on_applied(self: Waiters, index: int, term: int, result: object) -> None:
        w = self.proposals.pop(index, None)
        if w is not None:
            w[1].set(result)

    mp.setattr(Waiters, "on_applied", on_applied)


def _plant_read_without_apply_wait(mp: pytest.MonkeyPatch) -> None:
    """A linearizable read is served once its read index is confirmed, without waiting
    for the state machine to reach it."""
    from liferaft.node.node import Node

    async def read_index(self: Node) -> int:
        ctx, out = self.waiters.new_read()

        def go(raft: object) -> None:
            raft.read_index(ctx)  # type: ignore[attr-defined]

        await self.call(go)
        return await out.wait()

    mp.setattr(Node, "read_index", read_index)


def _plant_no_reset_after_install(mp: pytest.MonkeyPatch) -> None:
    """After a snapshot replaced the state, the watch hub does not tell its watchers,
    who never read the revisions the snapshot brought."""
    from liferaft.api.watch import WatchHub

    mp.setattr(WatchHub, "reset", lambda self: None)


def _plant_lease_countdown_not_restarted(mp: pytest.MonkeyPatch) -> None:
    """A new leader takes over the leases without restarting their countdown: it
    expires at once what the old leader had just renewed."""
    import trio

    from liferaft.node.lessor import Lessor

    build = Lessor._build

    async def careless_build(self: Lessor, term: int) -> None:
        await build(self, term)
        now = trio.current_time()
        for lease in self._deadline:
            self._deadline[lease] = now

    mp.setattr(Lessor, "_build", careless_build)


PLANTS = {
    "lease_countdown_not_restarted": _plant_lease_countdown_not_restarted,
    "no_term_check": _plant_no_term_check,
    "read_without_apply_wait": _plant_read_without_apply_wait,
    "no_reset_after_install": _plant_no_reset_after_install,
}
PLANT_SEEDS = 60  # each plant must be caught within this many seeds


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_the_simulator_catches_a_planted_bug(plant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    PLANTS[plant](monkeypatch)
    for seed in range(PLANT_SEEDS):
        r = simulate(seed)
        if not r.ok:
            print(f"{plant}: caught by seed {seed} (run {seed + 1}): {r.problems[0][:200]}")
            return
    pytest.fail(f"{plant}: not caught in {PLANT_SEEDS} seeds")


def test_the_cli_runs_and_reports_a_seed() -> None:
    from click.testing import CliRunner

    from liferaft.cli import cli

    out = CliRunner().invoke(cli, ["sim", "--whole-node", "--seed", "3", "--runs", "2", "-q"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert [line.split(":")[0] for line in lines] == ["seed 3", "seed 4"]
    assert all("acknowledged puts" in line for line in lines)
