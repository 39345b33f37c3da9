"""Where a write's CPU goes: leader and follower CPU µs per committed write, by layer.

Starts a local 3-node cluster (TLS and fsync on), loads it with ``liferaft bench
--endpoints`` (the shape options are passed through), and after a warm-up samples the
leader and one follower with py-spy (which sees every thread, SQLite's worker threads
included) while reading each process's CPU time from /proc and the leader's count of
answered puts from its /metrics. Prints, per process, CPU µs per committed write split
by layer (the share of py-spy samples whose innermost recognised frame is in it).

    .venv/bin/pip install py-spy    # once
    .venv/bin/python bench/profile.py --connections 8 --writers 256 --batch 64

Idle samples (epoll waits, worker threads waiting for work) are left out of the shares;
the µs figures come from /proc, so the profiler's own overhead (a few %) is in them.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import liferaft.storage.worker
from liferaft.testing.processes import process_cluster

IDS = ["n1", "n2", "n3"]
TICK = os.sysconf("SC_CLK_TCK")

# (layer, pattern of a frame's file). Frames are examined from the innermost out; the
# first that matches names the layer.
LAYERS = [
    ("apply: state machine + SQLite", re.compile(r"liferaft/kv/|liferaft/node/state\.py")),
    ("raft log: SQLite + fsync", re.compile(r"liferaft/storage/")),
    ("raft core", re.compile(r"liferaft/core/")),
    ("logs, audit, metrics", re.compile(r"logging/|liferaft/observability/|prometheus_client")),
    ("peer transport: CBOR, links", re.compile(r"liferaft/transport/")),
    ("client API: decode, checks, answers", re.compile(r"liferaft/api/|liferaft/safecbor")),
    ("node loop: core loop, applier, waiters", re.compile(r"liferaft/node/")),
    ("TLS + WebSocket", re.compile(r"ssl\.py|trio/_ssl|liferaft/websocket|h11")),
]


def _worker_wait_line() -> int:
    """The line of storage/worker.py where a storage thread waits for its next call
    (looked up, not written down: a line number written here went stale once, and the
    waits were counted as the Raft log's work)."""
    source = Path(liferaft.storage.worker.__file__).read_text().splitlines()
    return next(i for i, line in enumerate(source, 1) if "self._calls.get()" in line)


# Waiting, not working: the event loop in epoll, Trio's idle worker threads, and the
# node's storage threads waiting for their next call (storage/worker.py, ``_serve``).
IDLE = re.compile(
    r"get_events \(|_thread_cache\.py:211|Condition\.wait|Event\.wait \(threading"
    rf"|_serve \(liferaft/storage/worker\.py:{_worker_wait_line()}\)"
)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def puts_answered(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    total = 0.0
    for line in text.decode().splitlines():
        if (
            line.startswith("liferaft_client_requests_total{")
            and 'op="put"' in line
            and 'code="ok"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def is_leader(metrics_port: int) -> bool:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    return any(
        line.startswith("liferaft_server_is_leader") and line.endswith(" 1.0")
        for line in text.decode().splitlines()
    )


def layers(
    raw: Path, leaves: collections.Counter[str] | None = None
) -> tuple[collections.Counter[str], int]:
    shares: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or IDLE.search(stack.rsplit(";", 1)[-1]):
            continue
        n = int(count)
        busy += n
        if leaves is not None:
            leaves[stack.rsplit(";", 1)[-1]] += n
        for frame in reversed(stack.split(";")):
            layer = next((name for name, pat in LAYERS if pat.search(frame)), None)
            if layer is not None:
                break
        else:
            layer = "Trio scheduling, sockets, other"
        shares[layer] += n
    return shares, busy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warmup", type=float, default=4.0, help="seconds of load before sampling")
    ap.add_argument("--sample", type=float, default=8.0, help="seconds of sampling")
    ap.add_argument("--heartbeat-ms", type=int, default=50)
    ap.add_argument("--election-ms", type=int, default=300)
    ap.add_argument("--detail", type=int, default=0, help="also list the N busiest frames")
    args, shape = ap.parse_known_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    base = Path(tempfile.mkdtemp(prefix="liferaft-profile-"))
    pc = process_cluster(base, IDS, heartbeat_ms=args.heartbeat_ms, election_ms=args.election_ms)
    procs = {
        i: subprocess.Popen(pc.command(i), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i in IDS
    }
    load = None
    try:
        token = pc.token(["write"], ttl_s=3600)
        seconds = args.warmup + args.sample + 5
        load = subprocess.Popen(
            pc.bench_command(token, "--seconds", str(seconds), *shape),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        time.sleep(args.warmup)
        metrics = {i: pc.members[i][2] for i in IDS}
        leader = next(i for i in IDS if is_leader(metrics[i]))
        follower = next(i for i in IDS if i != leader)
        watched = {"leader": leader, "follower": follower}
        raws = {role: base / f"{role}.txt" for role in watched}
        before = {role: cpu_seconds(procs[i].pid) for role, i in watched.items()}
        puts0 = puts_answered(metrics[leader])
        spies = [
            subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "-p",
                    str(procs[i].pid),
                    "-d",
                    str(int(args.sample)),
                    "-r",
                    "200",
                    "-f",
                    "raw",
                    "-o",
                    str(raws[role]),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for role, i in watched.items()
        ]
        for spy in spies:
            spy.wait(timeout=args.sample + 30)
        writes = puts_answered(metrics[leader]) - puts0
        used = {role: cpu_seconds(procs[i].pid) - before[role] for role, i in watched.items()}
        print(f"load: liferaft bench {' '.join(shape)}; leader {leader}")
        print(f"{writes:,.0f} puts answered in the {args.sample:g} s sampled\n")
        for role, i in watched.items():
            per_write = used[role] / writes * 1e6 if writes else float("nan")
            print(f"{role} ({i}): {used[role]:.2f} CPU s = {per_write:.1f} µs per write")
            leaves: collections.Counter[str] = collections.Counter()
            shares, busy = layers(raws[role], leaves)
            for layer, n in shares.most_common():
                print(f"  {layer:<42} {n / busy * 100:5.1f} %  {n / busy * per_write:6.1f} µs")
            for frame, n in leaves.most_common(args.detail):
                print(f"    {n / busy * 100:5.1f} %  {frame[:110]}")
            print()
    finally:
        if load is not None:
            load.send_signal(signal.SIGINT)
            out, _ = load.communicate(timeout=60)
            text = out.decode(errors="replace").strip()
            if text != "Aborted!":  # click's word for the SIGINT that stopped it here
                print(text)
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
