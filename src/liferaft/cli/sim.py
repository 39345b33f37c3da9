"""``liferaft sim``: run the deterministic cluster simulator from the command line."""

from __future__ import annotations

import sys

import click

from liferaft.testing.chaos import ChaosOptions, LivenessViolation, run_chaos
from liferaft.testing.checker import SafetyViolation


@click.command()
@click.option("--nodes", default=3, show_default=True, help="Voters at the start.")
@click.option("--spares", default=1, show_default=True, help="Extra nodes that may join.")
@click.option("--ticks", default=2000, show_default=True, help="Ticks of chaos before healing.")
@click.option("--seed", default=1, show_default=True, help="Fixes the whole run.")
@click.option("--runs", default=1, show_default=True, help="Run seeds seed..seed+runs-1.")
@click.option("-q", "--quiet", is_flag=True, help="Only the summary line of each run.")
def sim(nodes: int, spares: int, ticks: int, seed: int, runs: int, quiet: bool) -> None:
    """Simulate a cluster under crashes, partitions, message loss, membership changes,
    leader transfers and snapshots, checking Raft's safety properties after every step
    and liveness after healing. The same seed replays the same run exactly."""
    if nodes < 1 or ticks < 0 or runs < 1:
        raise click.UsageError("--nodes and --runs must be at least 1, --ticks not negative")
    opts = ChaosOptions(voters=nodes, spares=spares, ticks=ticks)
    for s in range(seed, seed + runs):
        try:
            report = run_chaos(s, opts, None if quiet else click.echo)
        except (SafetyViolation, LivenessViolation) as exc:
            click.echo(f"FAILED {exc}", err=True)
            click.echo(
                f"replay with: liferaft sim --nodes {nodes} --spares {spares} "
                f"--ticks {ticks} --seed {s}",
                err=True,
            )
            sys.exit(1)
        click.echo(report.summary())
