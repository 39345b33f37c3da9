"""``liferaft sim``: run the deterministic cluster simulator from the command line."""

from __future__ import annotations

import dataclasses
import logging
import sys

import click

from liferaft.testing.chaos import PROFILES, run_chaos
from liferaft.testing.checker import SimulationFailure


def _whole_node(nodes: int | None, seed: int, runs: int, quiet: bool) -> None:
    from liferaft.testing.nodesim import SimConfig, simulate

    cfg = SimConfig() if nodes is None else SimConfig(nodes=nodes)
    if cfg.nodes < 1 or runs < 1:
        raise click.UsageError("--nodes and --runs must be at least 1")
    logging.disable(logging.CRITICAL)  # the nodes' own events would drown the report
    failed = 0
    for s in range(seed, seed + runs):
        result = simulate(s, cfg)
        report = result.report()
        click.echo(report if not quiet or not result.ok else report.splitlines()[0])
        if not result.ok:
            failed += 1
            extra = f" --nodes {nodes}" if nodes is not None else ""
            click.echo(f"replay: liferaft sim --whole-node{extra} --seed {s}", err=True)
    if failed:
        sys.exit(1)


@click.command()
@click.option(
    "--profile",
    type=click.Choice(sorted(PROFILES)),
    default="three_nodes",
    show_default=True,
    help="The random-run profile (the test suite runs each of them).",
)
@click.option("--nodes", type=int, help="Override the profile's number of voters.")
@click.option("--ticks", type=int, help="Override the profile's ticks of chaos.")
@click.option("--seed", default=1, show_default=True, help="Fixes the whole run.")
@click.option("--runs", default=1, show_default=True, help="Run seeds seed..seed+runs-1.")
@click.option("-q", "--quiet", is_flag=True, help="Only the summary line of each run.")
@click.option(
    "--whole-node",
    is_flag=True,
    help="Run real nodes, their client API and real clients under the whole-node "
    "simulator instead of the Raft core alone (--profile and --ticks do not apply).",
)
def sim(
    profile: str,
    nodes: int | None,
    ticks: int | None,
    seed: int,
    runs: int,
    quiet: bool,
    whole_node: bool,
) -> None:
    """Simulate a cluster under crashes, partitions, message loss, membership changes,
    leader transfers and snapshots, checking Raft's safety properties after every step
    and liveness after healing. The same profile and seed replay the same run exactly.

    With --whole-node: real nodes with their state databases, client API and watches,
    and real clients, under a mock clock and an in-memory network; after each run the
    client history is checked for linearizability, acknowledged writes for being stored
    exactly once, replicas for equality, watches for completeness, waiters for leaks."""
    if whole_node:
        _whole_node(nodes, seed, runs, quiet)
        return
    opts = PROFILES[profile]
    if nodes is not None:
        opts = dataclasses.replace(opts, voters=nodes)
    if ticks is not None:
        opts = dataclasses.replace(opts, ticks=ticks)
    if opts.voters < 1 or opts.ticks < 0 or runs < 1:
        raise click.UsageError("--nodes and --runs must be at least 1, --ticks not negative")
    for s in range(seed, seed + runs):
        try:
            report = run_chaos(s, opts, None if quiet else click.echo)
        except SimulationFailure as exc:
            click.echo(f"FAILED {exc}", err=True)
            extra = "".join(
                f" --{k} {v}" for k, v in (("nodes", nodes), ("ticks", ticks)) if v is not None
            )
            click.echo(f"replay: liferaft sim --profile {profile}{extra} --seed {s}", err=True)
            sys.exit(1)
        click.echo(report.summary())
