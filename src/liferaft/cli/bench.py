"""``liferaft bench``: the load generator (docs/performance.md, "liferaft bench").

Why a command and not only the scripts in ``bench/``: a figure in docs/performance.md
should be one command line away for anyone with the package installed, against a
throw-away local cluster or a running one, and should say how it was measured. So the
shape of the load is explicit (serial, closed loop, or open loop at an offered rate), the
latency of an open-loop request counts from when it was *due*, not when it was sent (a
slow cluster shows in the tail instead of quietly lowering the load), errors are counted
by code instead of stopping the run, and the report says how many elections happened and
how much CPU each node used. Every loop is bounded in time and in count.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import trio

from liferaft.cli.client_cmds import (
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    exit_code_for,
    failure,
    settings,
)
from liferaft.cli.node import GC_THRESHOLDS
from liferaft.client import Client, LiferaftError, Status
from liferaft.client.wire import MAX_BATCH

IDS = ["n1", "n2", "n3"]
KEYSPACE = 100_000  # puts cycle over bench/000000 .. bench/099999
PRELOAD = 100  # keys written before the timed part when --reads > 0
LEADER_WAIT_S = 30.0  # for a local cluster: process start-up and the first election
STOP_WAIT_S = 10.0  # SIGTERM, then SIGKILL after this long
EDGES_MS = [10 ** (i / 5) for i in range(-10, 21)]  # 0.01 ms .. 10 s, 5 buckets a decade


@dataclass(frozen=True)
class Shape:
    mode: str  # serial | closed | open
    connections: int
    writers: int
    batch: int
    rate: float | None
    seconds: float
    max_ops: int
    value_size: int
    reads: float
    cluster: str  # "a local 3-node cluster" or the endpoints
    array: int | None = None  # each operation: put_many of this many keys (None: one put)
    read_from: str = "leader"  # where gets go: "leader" or "followers" (Client reads=)


@dataclass
class Load:
    """What the load loops share: the bounds, the keys written, the measurements."""

    shape: Shape
    deadline: float
    value: bytes
    rng: random.Random = field(default_factory=random.Random)
    issued: int = 0  # requests claimed (with --array: puts, N per operation)
    next_key: int = 0
    puts: int = 0
    arrays: int = 0  # put_many calls that succeeded
    gets: int = 0
    late: int = 0  # open loop: issued behind schedule because the in-flight cap was full
    ops: int = 0  # open loop: operations issued
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    written: list[str] = field(default_factory=list)

    def take(self) -> int:
        """Claim one more operation, if time and count allow: how many requests it holds
        (1, or with --array up to N: the last one may be shorter), 0 for none."""
        if self.issued >= self.shape.max_ops or trio.current_time() >= self.deadline:
            return 0
        n = self.size(self.issued)
        self.issued += n
        return n

    def size(self, issued: int) -> int:
        """The requests in the next operation, after ``issued`` requests."""
        return min(self.shape.array or 1, self.shape.max_ops - issued)

    async def op(self, client: Client, due: float, size: int = 1) -> None:
        """One get (of a key written before) or put, or with --array a put_many of
        ``size`` keys; latency counted from ``due`` (for each put of an array: the
        array's). A failed array counts each of its puts as an error of its code."""
        if self.shape.array is not None:
            await self.array_op(client, due, size)
            return
        key = None
        if not (self.written and self.rng.random() < self.shape.reads):
            key = f"bench/{self.next_key % KEYSPACE:06d}"
            self.next_key += 1
        try:
            if key is None:
                await client.get(self.rng.choice(self.written))
            else:
                await client.put(key, self.value)
        except LiferaftError as exc:
            self.errors[exc.code] += 1
            return
        self.latencies.append(trio.current_time() - due)
        if key is None:
            self.gets += 1
        else:
            self.puts += 1
            if len(self.written) < KEYSPACE:
                self.written.append(key)

    async def array_op(self, client: Client, due: float, size: int) -> None:
        first = self.next_key
        self.next_key += size
        keys = [f"bench/{k % KEYSPACE:06d}" for k in range(first, first + size)]
        try:
            await client.put_many([(key, self.value) for key in keys])
        except LiferaftError as exc:
            self.errors[exc.code] += size
            return
        self.latencies.extend([trio.current_time() - due] * size)
        self.puts += size
        self.arrays += 1


async def closed_loop(clients: list[Client], load: Load) -> None:
    async def worker(client: Client) -> None:
        while size := load.take():
            await load.op(client, trio.current_time(), size)

    async with trio.open_nursery() as nursery:
        for client in clients:
            for _ in range(load.shape.writers):
                nursery.start_soon(worker, client)


PACE_S = 0.001  # the open loop's timer: it wakes at most this often


async def open_loop(clients: list[Client], load: Load, rate: float) -> None:
    """Issue request k at start + k/rate whatever the completions, spread round-robin
    over the connections, at most connections x writers operations in flight (with
    --array, an operation of N requests is due when its first one is)."""
    slots = trio.Semaphore(len(clients) * load.shape.writers)

    async def one(client: Client, due: float, size: int) -> None:
        try:
            await load.op(client, due, size)
        finally:
            slots.release()

    start = trio.current_time()
    behind = False  # the cap held a request back and the schedule has not caught up yet
    async with trio.open_nursery() as nursery:
        with trio.move_on_at(load.deadline):
            while True:
                due = start + load.issued / rate
                if due >= load.deadline or load.issued >= load.shape.max_ops:
                    break
                now = trio.current_time()
                if due > now:
                    behind = False
                    # Wake at most once per PACE_S and issue all that fell due meanwhile
                    # (their latency still counts from their due time): a sleep per
                    # request would cost this process more than the requests.
                    await trio.sleep_until(max(due, now + PACE_S))
                try:
                    slots.acquire_nowait()
                except trio.WouldBlock:
                    behind = True
                    await slots.acquire()
                size = load.size(load.issued)
                load.late += behind * size
                load.issued += size
                load.ops += 1
                nursery.start_soon(one, clients[load.ops % len(clients)], due, size)


async def progress(load: Load, start: float) -> None:
    """Once a second on stderr: operations so far and the rate over the last second."""
    last = 0
    try:
        while True:
            await trio.sleep(1)
            done = len(load.latencies)
            errors = sum(load.errors.values())
            click.echo(
                f"\r\x1b[K{trio.current_time() - start:5.1f} s  {done:,} ops  "
                f"{done - last:,}/s now  {errors:,} errors",
                err=True,
                nl=False,
            )
            last = done
    finally:
        click.echo("\r\x1b[K", err=True, nl=False)


# ---------------------------------------------------------------- the cluster


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process from /proc (Linux), None where there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def local_cluster(
    base: Path, *, heartbeat_ms: int = 50, election_ms: int = 300
) -> Iterator[tuple[list[str], str, Path, dict[str, int]]]:
    """Three ``liferaft node`` processes with fresh certificates under ``base``: yields
    the endpoints, a token, the CA file and the node pids; stops the nodes on exit."""
    from liferaft.testing.processes import process_cluster  # the node runtime: only here

    pc = process_cluster(base, IDS, heartbeat_ms=heartbeat_ms, election_ms=election_ms)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for i in IDS:
            with (base / f"{i}.log").open("wb") as log:
                procs[i] = subprocess.Popen(pc.command(i), stdout=log, stderr=log)
        token = pc.token(["read", "write"], ttl_s=24 * 3600)
        yield pc.endpoints, token, pc.certs / "ca.pem", {i: p.pid for i, p in procs.items()}
    finally:
        stop_processes(procs.values(), STOP_WAIT_S)


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], wait_s: float) -> None:
    """SIGTERM every process still running, then SIGKILL what has not ended within
    ``wait_s`` seconds of that."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    stop_by = time.monotonic() + wait_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, stop_by - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


async def leader_status(
    endpoints: list[str], token: str, cacert: Path | None, wait: float
) -> Status:
    """The status of a node that knows the leader; Unavailable-style failure after ``wait``."""
    last: LiferaftError | None = None
    with trio.move_on_after(wait):
        while True:
            try:
                async with await Client.connect(
                    endpoints, token=token, cacert=cacert, timeout=min(wait, 5.0)
                ) as c:
                    st = await c.status()
                    if st.leader_id:
                        return st
            except LiferaftError as exc:
                if exit_code_for(exc) != EXIT_UNAVAILABLE:
                    raise  # a bad token or CA does not get better by waiting
                last = exc
            await trio.sleep(0.2)
    why = f" ({last})" if last is not None else ""
    raise failure(f"no leader within {wait:g} s{why}", EXIT_UNAVAILABLE)


# ---------------------------------------------------------------- the run


async def run(
    shape: Shape,
    endpoints: list[str],
    token: str,
    cacert: Path | None,
    call_timeout: float,
    pids: dict[str, int],
    show_progress: bool,
) -> dict[str, Any]:
    st = await leader_status(endpoints, token, cacert, LEADER_WAIT_S if pids else call_timeout)
    if pids:  # start at the leader so that writes need no redirect
        lead = endpoints[IDS.index(str(st.leader_id))]
        endpoints = [lead, *(e for e in endpoints if e != lead)]
    clients: list[Client] = []
    try:
        for _ in range(shape.connections):
            clients.append(
                await Client.connect(
                    endpoints,
                    token=token,
                    cacert=cacert,
                    timeout=call_timeout,
                    max_batch=shape.batch,
                    reads=shape.read_from,
                )
            )
        load = Load(shape, math.inf, os.urandom(shape.value_size))
        if shape.reads > 0:  # reads need keys that exist; a refused write stops here
            load.next_key = 1
            await clients[0].put("bench/000000", load.value)
            async with trio.open_nursery() as nursery:
                for _ in range(min(PRELOAD, shape.max_ops) - 1):
                    nursery.start_soon(load.op, clients[0], 0.0)
            written = ["bench/000000", *load.written]
            load = Load(shape, math.inf, load.value, written=written)
        term_before = (await clients[0].status()).term
        cpu_before = {i: cpu_seconds(pid) for i, pid in pids.items()}
        own_cpu = time.process_time()
        start = trio.current_time()
        load.deadline = start + shape.seconds
        with trio.move_on_at(load.deadline + call_timeout + 1):  # stragglers get one timeout
            async with trio.open_nursery() as nursery:
                if show_progress:
                    nursery.start_soon(progress, load, start)
                if shape.rate is not None:
                    await open_loop(clients, load, shape.rate)
                else:
                    await closed_loop(clients, load)
                nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - start
        own_cpu = time.process_time() - own_cpu
        cpu: dict[str, float] = {}
        for i, pid in pids.items():
            now, before = cpu_seconds(pid), cpu_before[i]
            if now is not None and before is not None:
                cpu[i] = round(now - before, 2)
        try:
            term_after: int | None = (await clients[0].status()).term
        except LiferaftError:
            term_after = None
    finally:
        for client in clients:
            await client.aclose()
    return report(shape, load, elapsed, term_before, term_after, cpu if pids else None, own_cpu)


def percentile(ordered: list[float], p: float) -> float | None:
    """Nearest rank, in milliseconds."""
    if not ordered:
        return None
    return round(ordered[max(0, math.ceil(p * len(ordered)) - 1)] * 1000, 3)


def latency_summary(latencies: list[float]) -> tuple[dict[str, float | None], list[Any]]:
    """The percentiles (``p50_ms`` .. ``max_ms``) and histogram rows of latencies given
    in seconds: the report's figures (bench/etcd.py reports etcd the same way)."""
    lat = sorted(latencies)
    counts = [0] * (len(EDGES_MS) + 1)
    for x in lat:
        counts[bisect.bisect_left(EDGES_MS, x * 1000)] += 1
    percentiles = {
        "p50_ms": percentile(lat, 0.5),
        "p90_ms": percentile(lat, 0.9),
        "p99_ms": percentile(lat, 0.99),
        "p999_ms": percentile(lat, 0.999),
        "max_ms": percentile(lat, 1.0),
    }
    rows = [
        {
            "from_ms": round(EDGES_MS[i - 1], 3) if i else 0.0,
            "to_ms": round(EDGES_MS[i], 3) if i < len(EDGES_MS) else None,
            "count": n,
        }
        for i, n in enumerate(counts)
        if n
    ]
    return percentiles, rows


def open_loop_summary(
    rate: float, seconds: float, max_ops: int, max_in_flight: int, late: int, issued: int
) -> dict[str, Any]:
    due = min(max_ops, math.ceil(seconds * rate))
    return {
        "offered_per_s": rate,
        "max_in_flight": max_in_flight,
        "late": late,
        "unsent": max(0, due - issued),
    }


def report(
    shape: Shape,
    load: Load,
    elapsed: float,
    term_before: int,
    term_after: int | None,
    cpu: dict[str, float] | None,
    own_cpu: float,
) -> dict[str, Any]:
    percentiles, rows = latency_summary(load.latencies)
    doc: dict[str, Any] = {
        "ops": len(load.latencies),
        "seconds": round(elapsed, 3),
        "ops_per_s": round(len(load.latencies) / elapsed, 1) if elapsed > 0 else 0.0,
        "puts": load.puts,
        "gets": load.gets,
        "arrays": load.arrays if shape.array is not None else None,
        **percentiles,
        "errors": dict(sorted(load.errors.items())),
        "elections": None if term_after is None else term_after - term_before,
        "term_before": term_before,
        "term_after": term_after,
        "shape": vars(shape),
        "cpu_s": cpu,
        "bench_cpu_s": round(own_cpu, 2),
        "histogram": rows,
    }
    if shape.rate is not None:
        doc["open_loop"] = open_loop_summary(
            shape.rate,
            shape.seconds,
            shape.max_ops,
            shape.connections * shape.writers,
            load.late,
            load.issued,
        )
    return doc


# ---------------------------------------------------------------- text output


def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 10 or x == 0 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def histogram(doc: dict[str, Any], width: int = 40) -> list[str]:
    rows = doc["histogram"]
    top = max((r["count"] for r in rows), default=0)
    lines = []
    for r in rows:
        hi = "inf" if r["to_ms"] is None else _ms(r["to_ms"])
        label = f"{_ms(r['from_ms']):>6} - {hi:>6} ms"
        bar = "#" * max(1, round(width * r["count"] / top))
        pct = 100 * r["count"] / doc["ops"]
        lines.append(f"  {label}  {bar:<{width}}  {r['count']:>9,}  {pct:5.1f} %")
    return lines


def result_lines(doc: dict[str, Any]) -> list[str]:
    """The report's lines from latency to elections (bench/etcd.py prints them too)."""
    lines = []
    if doc["ops"]:
        lines.append(
            "latency:    "
            + "  ".join(f"{p} {doc[p + '_ms']:.1f} ms" for p in ("p50", "p90", "p99", "p999"))
            + f"  max {doc['max_ms']:.1f} ms"
        )
        lines += ["histogram:", *histogram(doc)]
    errors = ", ".join(f"{code} {n:,}" for code, n in doc["errors"].items()) or "none"
    lines.append(f"errors:     {errors}")
    if "open_loop" in doc:
        ol = doc["open_loop"]
        lines.append(
            f"open loop:  offered {ol['offered_per_s']:,g}/s; {ol['late']:,} sent late for want of "
            f"a free slot (cap {ol['max_in_flight']:,} in flight), {ol['unsent']:,} never sent"
        )
    elections = "unknown" if doc["elections"] is None else f"{doc['elections']}"
    lines.append(f"elections:  {elections} (term {doc['term_before']} -> {doc['term_after']})")
    return lines


def print_text(doc: dict[str, Any]) -> None:
    sh = doc["shape"]
    if sh["mode"] == "serial":
        how = "serial (one client, one request at a time)"
    elif sh["mode"] == "open":
        how = f"open loop at {sh['rate']:,g}/s over {sh['connections']} connections"
    else:
        how = f"closed loop, {sh['connections']} connections x {sh['writers']} writers"
    if sh["array"] is not None:
        how += f", put_many arrays of {sh['array']} puts"
    click.echo(
        f"liferaft bench: {how}, batch {sh['batch']}, {sh['value_size']}-byte values, "
        f"{sh['reads'] * 100:g} % reads"
        + (" (from followers)" if sh.get("read_from") == "followers" else "")
        + f", {sh['seconds']:g} s on {sh['cluster']}"
    )
    arrays = f" in {doc['arrays']:,} arrays" if doc["arrays"] is not None else ""
    click.echo(
        f"ops:        {doc['ops']:,} committed in {doc['seconds']:.1f} s = "
        f"{doc['ops_per_s']:,.0f} ops/s ({doc['puts']:,} puts{arrays}, {doc['gets']:,} gets)"
    )
    for line in result_lines(doc):
        click.echo(line)
    if doc["cpu_s"] is not None:
        nodes = ", ".join(f"{i} {s:.2f} s" for i, s in doc["cpu_s"].items())
        click.echo(f"cpu:        {nodes}; bench {doc['bench_cpu_s']:.2f} s")


# ---------------------------------------------------------------- the command


@click.command()
@click.option("--serial", is_flag=True, help="One client, one request at a time.")
@click.option(
    "--connections",
    type=click.IntRange(1, 256),
    default=4,
    show_default=True,
    help="Client connections.",
)
@click.option(
    "--writers",
    type=click.IntRange(1, 4096),
    default=64,
    show_default=True,
    help="Concurrent requests (with --array: arrays) per connection (open loop: the "
    "in-flight cap per connection).",
)
@click.option(
    "--batch",
    type=click.IntRange(1, MAX_BATCH),
    default=MAX_BATCH,
    show_default=True,
    help="Most requests per WebSocket message (1: one request per message).",
)
@click.option(
    "--array",
    type=click.IntRange(1, MAX_BATCH),
    metavar="N",
    help="Each operation is one put_many of N keys (N requests sent together, which the "
    "server writes as one log entry) instead of one put; ops/s and the histogram still "
    "count puts, each with its array's latency; a failed array counts all its puts as "
    "errors. Not with --reads.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    help="Open loop: issue this many requests per second whatever the completions; "
    "latency counts from when each was due.",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True, max=86400),
    default=10.0,
    show_default=True,
    help="How long to run.",
)
@click.option(
    "--max-ops",
    type=click.IntRange(min=1),
    default=10_000_000,
    show_default=True,
    help="Stop after this many requests.",
)
@click.option(
    "--value-size",
    type=click.IntRange(0, 512 * 1024),
    default=100,
    show_default=True,
    help="Bytes per value.",
)
@click.option(
    "--reads",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Fraction of requests that are linearizable gets of keys written before.",
)
@click.option(
    "--read-from",
    type=click.Choice(["leader", "followers"]),
    default="leader",
    show_default=True,
    help="Where the gets go: the leader, or a follower (still linearizable: it confirms "
    "its read index with the leader).",
)
@click.option(
    "--endpoints",
    envvar="LIFERAFT_ENDPOINTS",
    help="Load this cluster (comma-separated URLs) instead of starting a local one "
    "[env LIFERAFT_ENDPOINTS]; needs --token and usually --cacert.",
)
@click.option(
    "--cacert",
    envvar="LIFERAFT_CACERT",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --endpoints: CA certificate of the nodes [env LIFERAFT_CACERT].",
)
@click.option(
    "--token", envvar="LIFERAFT_TOKEN", help="With --endpoints: JWT [env LIFERAFT_TOKEN]."
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --endpoints: file holding the JWT.",
)
@click.option(
    "-o",
    "--output",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Output format (json: one object).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds one request may take, retries included (then it counts as an error).",
)
@click.option(
    "--heartbeat-ms",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Local cluster: [raft] heartbeat_interval_ms of the nodes.",
)
@click.option(
    "--election-ms",
    type=click.IntRange(min=2),
    default=300,
    show_default=True,
    help="Local cluster: [raft] election_timeout_ms (e.g. 100 with --heartbeat-ms 20: "
    "the fast-failover setting).",
)
def bench(
    serial: bool,
    connections: int,
    writers: int,
    batch: int,
    array: int | None,
    rate: float | None,
    seconds: float,
    max_ops: int,
    value_size: int,
    reads: float,
    read_from: str,
    endpoints: str | None,
    cacert: Path | None,
    token: str | None,
    token_file: Path | None,
    output: str,
    timeout: float,
    heartbeat_ms: int,
    election_ms: int,
) -> None:
    """Load a cluster and report committed ops/s, latency percentiles and a histogram,
    errors by code, elections during the run and (for a local cluster) CPU per node.

    Without --endpoints it starts three `liferaft node` processes with fresh
    certificates in a temporary directory (TLS and fsync on) and stops them
    afterwards. Puts go to keys bench/000000..bench/099999. The load: --serial is one
    request at a time; by default each of --connections runs --writers requests in a
    loop (closed loop); --rate R issues R requests a second whatever the completions
    (open loop, at most connections x writers in flight; latency counts from when a
    request was due, and the report says how many went out late). Requests start for
    --seconds (or until --max-ops), then those in flight finish. With --array N each
    writer's operation is a put_many of N consecutive keys instead of one put (in the
    open loop, an array is due when its first put is): the way a client gets the most
    writes out of a cluster, as the server writes each message's writes as one log
    entry. A client keeps at most 128 writes in flight (its session window), so more
    writers x N than that per connection wait their turn.

    \b
      liferaft bench --seconds 10                       # 4 x 64 writers, batched
      liferaft bench --serial --seconds 5               # one request at a time
      liferaft bench --batch 1                          # one request per message
      liferaft bench --connections 8 --writers 4 --array 64   # put_many of 64 keys
      liferaft bench --rate 2000 --seconds 10 -o json   # open loop at 2000/s
      liferaft bench --heartbeat-ms 20 --election-ms 100 --seconds 60   # fast failover
      liferaft bench --reads 0.9 --endpoints wss://127.0.0.1:8001 --cacert certs/ca.pem

    Exit codes: 0 done (errors during the run are counted, not fatal), 2 usage error,
    3 token refused, 4 cluster unavailable at the start.
    """
    if serial and rate is not None:
        raise click.UsageError("--serial is a closed loop; it does not take --rate")
    if array is not None and reads > 0:
        raise click.UsageError("--array writes arrays of puts; it does not take --reads")
    if endpoints is None:
        ctx = click.get_current_context()
        given = [
            f"--{name.replace('_', '-')}"
            for name in ("cacert", "token", "token_file")
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        ]
        if given:
            raise click.UsageError(f"{', '.join(given)} go with --endpoints")
    if endpoints is not None:
        ctx = click.get_current_context()
        local_only = [
            f"--{name.replace('_', '-')}"
            for name in ("heartbeat_ms", "election_ms")
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        ]
        if local_only:
            raise click.UsageError(
                f"{', '.join(local_only)} set up a local cluster, not --endpoints"
            )
    if election_ms <= heartbeat_ms:
        raise click.UsageError("--election-ms must be larger than --heartbeat-ms")
    if serial:
        connections = writers = 1
    mode = "serial" if serial else "open" if rate is not None else "closed"
    json_out = output == "json"
    pids: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        if endpoints is not None:
            s = settings(endpoints, cacert, token, token_file, output, timeout)
            urls, jwt, ca = s.endpoints, s.token, s.cacert
            where = ",".join(urls)
        else:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="liferaft-bench-")))
            if not json_out:
                click.echo(f"starting a local 3-node cluster in {base}", err=True)
            urls, jwt, ca, pids = stack.enter_context(
                local_cluster(base, heartbeat_ms=heartbeat_ms, election_ms=election_ms)
            )
            where = (
                f"a local 3-node cluster (heartbeat {heartbeat_ms} ms, "
                f"election timeout {election_ms} ms)"
            )
        shape = Shape(
            mode,
            connections,
            writers,
            batch,
            rate,
            seconds,
            max_ops,
            value_size,
            reads,
            where,
            array,
            read_from,
        )
        show = not json_out and sys.stderr.isatty()
        # The load generator allocates per request as a node does: Python's default
        # young collection every 700 allocations cost it ~12 % of its CPU in the open
        # loop at 5,000/s, CPU the cluster on the same cores then lacks.
        gc.set_threshold(*GC_THRESHOLDS)
        try:
            doc = trio.run(run, shape, urls, jwt, ca, timeout, pids, show)
        except LiferaftError as exc:
            raise failure(str(exc), exit_code_for(exc)) from None
        except (ValueError, OSError) as exc:
            raise failure(f"configuration error: {exc}", EXIT_USAGE) from None
        except BaseExceptionGroup as group:  # Ctrl-C lands in some task of a nursery
            if group.split(KeyboardInterrupt)[1] is not None:
                raise
            raise KeyboardInterrupt from None  # click: "Aborted!", after the nodes stop
    if json_out:
        click.echo(json.dumps(doc))
    else:
        print_text(doc)
