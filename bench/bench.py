"""Write throughput and latency of a local 3-node cluster, TLS and fsync on.

Starts three real ``liferaft node`` processes (the default settings of docs/operations.md:
heartbeat 50 ms, election 300 ms) in a temporary directory with fresh certificates, drives
them through the client library (``--connections`` clients, each with ``--writers`` concurrent
writers doing ``put``), and prints committed writes/s with p50/p99 latency. Every run is
bounded in time and in count. ``--unbatched`` sends one request per WebSocket message;
``--profile`` runs the nodes under cProfile and prints where the leader spends its time.

    .venv/bin/python bench/bench.py --connections 4 --writers 64 --seconds 10
    .venv/bin/python bench/bench.py --connections 4 --writers 64 --seconds 10 --unbatched
"""

from __future__ import annotations

import argparse
import os
import pstats
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import trio

from liferaft.client import Client, LiferaftError
from liferaft.security.tokens import mint
from liferaft.testing.processes import process_cluster

IDS = ["n1", "n2", "n3"]


def start_cluster(
    base: Path, args: argparse.Namespace
) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    pc = process_cluster(base, IDS, heartbeat_ms=args.heartbeat_ms, election_ms=args.election_ms)
    procs = []
    for i in IDS:
        profile = ["-m", "cProfile", "-o", str(base / f"{i}.prof")] if args.profile else []
        log = (base / f"{i}.log").open("wb")
        procs.append(subprocess.Popen(pc.command(i, *profile), stderr=log, stdout=log))
    return procs, pc.endpoints


async def wait_for_leader(endpoints: list[str], token: str, cacert: Path) -> str:
    with trio.fail_after(30):
        while True:
            try:
                async with await Client.connect(endpoints, token=token, cacert=cacert) as c:
                    st = await c.status()
                    if st.get("leader_id"):
                        return str(st["leader_id"])
            except LiferaftError:
                pass
            await trio.sleep(0.2)


async def term_of(endpoints: list[str], token: str, cacert: Path) -> int:
    """The cluster's current term: each election during the run raises it."""
    async with await Client.connect(endpoints, token=token, cacert=cacert, timeout=30) as c:
        return int((await c.status())["term"])


async def drive(
    endpoints: list[str], token: str, cacert: Path, args: argparse.Namespace
) -> tuple[int, list[float], float]:
    latencies: list[float] = []
    value = os.urandom(args.value_size)
    deadline = trio.current_time() + args.seconds
    budget = [args.max_ops]

    async def writer(client: Client, w: int) -> None:
        n = 0
        while trio.current_time() < deadline and budget[0] > 0:
            budget[0] -= 1
            t0 = time.perf_counter()
            await client.put(f"bench/{w}/{n % 1000}", value)
            latencies.append(time.perf_counter() - t0)
            n += 1

    max_batch = 1 if args.unbatched else 1024
    clients = [
        await Client.connect(endpoints, token=token, cacert=cacert, max_batch=max_batch, timeout=30)
        for _ in range(args.connections)
    ]
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for ci, client in enumerate(clients):
            for w in range(args.writers):
                nursery.start_soon(writer, client, ci * args.writers + w)
    elapsed = time.perf_counter() - started
    for client in clients:
        await client.aclose()
    return len(latencies), latencies, elapsed


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))] if s else float("nan")


AREAS = (
    ("liferaft/api/", "liferaft.api (requests, auth, responses)"),
    ("liferaft/kv/", "liferaft.kv (apply, sessions, history)"),
    ("liferaft/core/", "liferaft.core (Raft)"),
    ("liferaft/node/", "liferaft.node (core loop, applier)"),
    ("liferaft/storage/", "liferaft.storage"),
    ("liferaft/transport/", "liferaft.transport (peer codec, links)"),
    ("liferaft/observability/", "liferaft.observability (logs, metrics)"),
    ("trio_websocket", "trio-websocket"),
    ("wsproto", "wsproto"),
    ("/trio/", "trio (scheduling, I/O)"),
    ("ssl", "ssl"),
    ("cbor2", "cbor2"),
    ("prometheus_client", "prometheus_client"),
    ("logging", "logging"),
    ("sqlite", "sqlite3"),
    ("select.epoll", "waiting in epoll (idle)"),
)


def by_area(stats: pstats.Stats) -> None:
    """Own time per area, to see which layer the CPU goes to."""
    totals: dict[str, float] = {}
    raw = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, func), (_cc, _nc, tottime, _ct, _callers) in raw.items():
        where = f"{filename}:{func}"
        area = next((name for key, name in AREAS if key in where), "other (stdlib, builtins)")
        totals[area] = totals.get(area, 0.0) + tottime
    total = sum(totals.values())
    for area, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {t:7.2f} s  {100 * t / total:5.1f} %  {area}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--writers", type=int, default=64, help="concurrent writers per connection")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-ops", type=int, default=2_000_000, help="stop after this many writes")
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--unbatched", action="store_true", help="one request per message")
    ap.add_argument("--profile", action="store_true", help="cProfile the nodes")
    ap.add_argument("--heartbeat-ms", type=int, default=50, help="a node's default: 50")
    ap.add_argument("--election-ms", type=int, default=300, help="a node's default: 300")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="liferaft-bench-") as tmp:
        base = Path(tmp)
        procs, endpoints = start_cluster(base, args)
        try:
            token = mint(
                (base / "certs" / "jwt-private.pem").read_bytes(),
                sub="bench",
                roles=["write"],
                ttl_s=3600,
                now=time.time(),
            )
            cacert = base / "certs" / "ca.pem"
            leader = trio.run(wait_for_leader, endpoints, token, cacert)
            term_before = trio.run(term_of, endpoints, token, cacert)
            # Start at the leader so writes need no redirect.
            lead_first = [endpoints[IDS.index(leader)]] + [
                e for e in endpoints if e != endpoints[IDS.index(leader)]
            ]
            n, lat, elapsed = trio.run(drive, lead_first, token, cacert, args)
            elections = trio.run(term_of, endpoints, token, cacert) - term_before
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        mode = "one request per message" if args.unbatched else "batched"
        print(
            f"{args.connections} connections x {args.writers} writers, {mode}, "
            f"{args.value_size}-byte values, TLS + fsync on"
        )
        print(
            f"committed writes: {n} in {elapsed:.1f} s = {n / elapsed:,.0f}/s; "
            f"latency p50 {percentile(lat, 0.5) * 1000:.1f} ms, "
            f"p99 {percentile(lat, 0.99) * 1000:.1f} ms; "
            f"elections during the run: {elections} "
            f"(heartbeat {args.heartbeat_ms} ms, election timeout {args.election_ms} ms)"
        )
        if args.profile:
            prof = base / f"{leader}.prof"
            if prof.exists():
                print(f"\nwhere the leader ({leader}) spends its time:")
                by_area(pstats.Stats(str(prof)))
                pstats.Stats(str(prof)).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
