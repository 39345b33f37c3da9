"""``liferaft check``: the nemesis any user can run (docs/reliability.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


def _faults(value: str) -> list[str]:
    from liferaft.testing.nemesis import FAULTS  # the node runtime: imported on use

    faults = [f.strip() for f in value.split(",") if f.strip()]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        choose = ", ".join(FAULTS)
        raise click.BadParameter(f"unknown {', '.join(unknown)}; choose from {choose}")
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
    default="kill,pause,partition,transfer",
    show_default=True,
    help="Comma-separated: kill (SIGKILL and restart), pause (SIGSTOP and "
    "SIGCONT), partition (isolate a node, or cut its links one way), transfer "
    "(leadership to another node), member (remove a node, which must stop by "
    "itself, then add it back on fresh data; not in the default). Empty: none.",
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
    "--endpoints",
    help="Check a cluster you run instead (comma-separated URLs): then only the "
    "transfer fault, or none (--faults ''); needs --token (read, write and admin).",
)
@click.option("--token", "token_arg", help="With --endpoints: the JWT (or @FILE).")
@click.option(
    "--cacert",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --endpoints: the cluster's CA certificate.",
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
    endpoints: str | None,
    token_arg: str | None,
    cacert: Path | None,
    output: str,
) -> None:
    """Start a local 3-node cluster of real processes, run concurrent clients against
    it while killing, pausing and partitioning nodes (TCP proxies on every peer link),
    then check the history: linearizable per key, no acknowledged write lost, none
    applied twice. Exit 0 when clean, 1 when an anomaly was found.

    With --endpoints it checks a cluster you run (under keys check/<seed>-<random>/,
    which it leaves behind), with no fault it cannot make through the client API."""
    import trio

    from liferaft.testing.nemesis import API_FAULTS, Check

    chosen = _faults(faults)
    if endpoints is None and (token_arg or cacert):
        raise click.UsageError("--token and --cacert go with --endpoints")
    if endpoints is not None:
        if not token_arg:
            raise click.UsageError("--endpoints needs --token")
        if set(chosen) - set(API_FAULTS):
            raise click.UsageError(
                f"on a cluster it does not own, --faults may hold only {', '.join(API_FAULTS)}"
            )
        if token_arg.startswith("@"):
            token_arg = Path(token_arg[1:]).read_text().strip()
    text = output == "text"
    log = (lambda line: click.echo(line)) if text else None
    if text:
        click.echo(
            f"liferaft check: seed {seed}, {seconds:g} s, faults: "
            f"{', '.join(chosen) or 'none'}, {clients} clients on {keys} keys"
        )
    run = Check(seed, seconds, chosen, clients=clients, keys=keys, log=log)
    if endpoints is None:
        report = trio.run(run.run, workdir)
    else:
        urls = [e.strip() for e in endpoints.split(",") if e.strip()]
        assert token_arg is not None
        report = trio.run(run.run_against, urls, token_arg, cacert)
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
