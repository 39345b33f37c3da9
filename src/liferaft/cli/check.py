"""``liferaft check``: the nemesis any user can run (docs/reliability.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

FAULT_NAMES = ("kill", "pause", "partition")


def _faults(value: str) -> list[str]:
    faults = [f.strip() for f in value.split(",") if f.strip()]
    unknown = sorted(set(faults) - set(FAULT_NAMES))
    if unknown:
        raise click.BadParameter(
            f"unknown {', '.join(unknown)}; choose from {', '.join(FAULT_NAMES)}"
        )
    return faults


@click.command()
@click.option(
    "--seconds",
    type=click.FloatRange(1, 3600),
    default=30,
    show_default=True,
    help="How long the clients run (faults meanwhile).",
)
@click.option(
    "--faults",
    default="kill,pause,partition",
    show_default=True,
    help="Comma-separated: kill (SIGKILL and restart), pause (SIGSTOP and "
    "SIGCONT), partition (isolate a node, or cut its links one way). Empty: none.",
)
@click.option(
    "--seed",
    type=int,
    default=1,
    show_default=True,
    help="Fixes the workload and the fault schedule (not the interleaving).",
)
@click.option(
    "--clients",
    type=click.IntRange(1, 64),
    default=6,
    show_default=True,
    help="Concurrent clients.",
)
@click.option(
    "--keys",
    type=click.IntRange(1, 1000),
    default=5,
    show_default=True,
    help="Keys the clients share (few keys: more contention to check).",
)
@click.option(
    "--dir",
    "workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the cluster's files (configs, data, node logs) here.",
)
@click.option(
    "-o",
    "--output",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one object with ok, operations, faults, anomalies, lost and the rest.",
)
def check(
    seconds: float,
    faults: str,
    seed: int,
    clients: int,
    keys: int,
    workdir: Path | None,
    output: str,
) -> None:
    """Start a local 3-node cluster of real processes, run concurrent clients against
    it while killing, pausing and partitioning nodes (TCP proxies on every peer link),
    then check the history: linearizable per key, no acknowledged write lost, none
    applied twice. Exit 0 when clean, 1 when an anomaly was found."""
    import trio

    from liferaft.testing.nemesis import Check

    chosen = _faults(faults)
    text = output == "text"
    log = (lambda line: click.echo(line)) if text else None
    if text:
        click.echo(
            f"liferaft check: seed {seed}, {seconds:g} s, faults: "
            f"{', '.join(chosen) or 'none'}, {clients} clients on {keys} keys"
        )
    report = trio.run(
        Check(seed, seconds, chosen, clients=clients, keys=keys, log=log).run, workdir
    )
    doc = report.doc()
    if not text:
        click.echo(json.dumps(doc))
    else:
        click.echo(
            f"{doc['operations']} operations ({doc['acked_writes']} acknowledged puts), "
            f"{len(doc['faults'])} fault events, {doc['stored_events']} puts stored"
        )
        if doc["client_errors"]:
            errs = ", ".join(f"{k} {v}" for k, v in doc["client_errors"].items())
            click.echo(f"client errors (expected under faults): {errs}")
        for a in doc["anomalies"]:
            click.echo(f"ANOMALY: {a}")
        for o in doc["offending_history"]:
            click.echo(
                f"  c{o['client']} {o['op']} {o['value']!r} [{o['invoke']}, {o['complete']}]"
            )
        click.echo("ok: no anomaly" if doc["ok"] else f"FAILED; replay the schedule: --seed {seed}")
    sys.exit(0 if doc["ok"] else 1)
