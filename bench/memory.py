"""Does memory stay flat under a long write load? RSS of each node over N writes.

Starts a local 3-node cluster (TLS and fsync on, the default settings of
docs/operations.md: compaction every 10,000 entries or 32 MiB, history_revisions
100,000), writes ``--writes`` puts with ``liferaft bench --endpoints`` (put_many arrays
of 64 over 8 connections, keys cycling over 100,000), and samples every node's resident
memory (/proc/PID/status VmRSS) every ``--every`` seconds. Prints the samples and, after
the first ``--warmup`` writes' worth of time, each node's smallest and largest RSS and
how far the largest is from the mean.

    .venv/bin/python bench/memory.py --writes 1000000
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from liferaft.testing.processes import process_cluster

IDS = ["n1", "n2", "n3"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writes", type=int, default=1_000_000)
    ap.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of the run to skip")
    ap.add_argument("--max-seconds", type=float, default=1800.0)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="liferaft-memory-"))
    pc = process_cluster(base, IDS)
    procs = {
        i: subprocess.Popen(pc.command(i), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i in IDS
    }
    try:
        token = pc.token(["write"], ttl_s=7200)
        load = subprocess.Popen(
            pc.bench_command(
                token,
                "--connections",
                "8",
                "--writers",
                "4",
                "--array",
                "64",
                "--max-ops",
                str(args.writes),
                "--seconds",
                str(args.max_seconds),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        samples: list[tuple[float, dict[str, float]]] = []
        start = time.monotonic()
        while load.poll() is None:
            time.sleep(args.every)
            samples.append((time.monotonic() - start, {i: rss_mb(p.pid) for i, p in procs.items()}))
            row = "  ".join(f"{i} {mb:6.1f} MB" for i, mb in samples[-1][1].items())
            print(f"{samples[-1][0]:6.0f} s  {row}", flush=True)
        out = load.stdout.read() if load.stdout else ""
        print(out.strip())
        total = samples[-1][0] if samples else 0.0
        kept = [s for t, s in samples if t >= args.warmup * total]
        for i in IDS:
            values = [s[i] for s in kept]
            if not values:
                continue
            mean = sum(values) / len(values)
            spread = max(abs(v - mean) for v in values) / mean * 100
            print(
                f"{i}: RSS {min(values):.1f}-{max(values):.1f} MB after warm-up, "
                f"within ±{spread:.1f} % of its mean ({len(values)} samples)"
            )
        sizes = {
            f.relative_to(base / "data"): f.stat().st_size
            for f in sorted((base / "data").rglob("*"))
            if f.is_file() and f.stat().st_size > 1 << 20
        }
        print("files over 1 MB: " + ", ".join(f"{f} {n >> 20} MB" for f, n in sizes.items()))
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
