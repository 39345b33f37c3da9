"""The write-load table of docs/performance.md, one `liferaft bench` run per row.

Each row starts a fresh local 3-node cluster (TLS and fsync on) and prints the command
it ran, so any row can be run alone. The rows:

    arrays     8 connections x 4 writers, each a put_many of 64 keys
    batched    8 connections x 256 writers, the client packs up to 64 per message
    unbatched  8 connections x 64 writers, one request per message
    narrow     8 connections x 8 writers, one request per message
    serial     one client, one put at a time
    open       a fixed offered load of 5,000 puts/s (open loop), batched
    fast       arrays with heartbeat 20 ms / election timeout 100 ms, 60 s: elections

    .venv/bin/python bench/table.py                 # every row, about 3 minutes
    .venv/bin/python bench/table.py serial open     # some rows
"""

from __future__ import annotations

import json
import subprocess
import sys

SECONDS = "15"
ROWS: dict[str, list[str]] = {
    "arrays": ["--connections", "8", "--writers", "4", "--array", "64"],
    "batched": ["--connections", "8", "--writers", "256", "--batch", "64"],
    "unbatched": ["--connections", "8", "--writers", "64", "--batch", "1"],
    "narrow": ["--connections", "8", "--writers", "8", "--batch", "1"],
    "serial": ["--serial"],
    "open": ["--rate", "5000", "--connections", "8", "--writers", "256", "--batch", "64"],
    "fast": [
        *["--connections", "8", "--writers", "4", "--array", "64"],
        *["--heartbeat-ms", "20", "--election-ms", "100", "--seconds", "60"],
    ],
}


def run(name: str) -> dict[str, object]:
    args = ROWS[name]
    if "--seconds" not in args:
        args = [*args, "--seconds", SECONDS]
    cmd = [sys.executable, "-m", "liferaft", "bench", *args, "-o", "json"]
    print(f"{name}: liferaft bench {' '.join(args)}", flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


def main() -> None:
    names = sys.argv[1:] or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
    results = {name: run(name) for name in names}
    print()
    print("| row | puts/s | p50 | p99 | p999 | errors | elections | CPU s (nodes; bench) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, d in results.items():
        cpu = d["cpu_s"]
        assert isinstance(cpu, dict)
        nodes = " / ".join(f"{cpu[i]:.1f}" for i in sorted(cpu))
        errors = sum(d["errors"].values()) if isinstance(d["errors"], dict) else d["errors"]
        print(
            f"| {name} | {d['ops_per_s']:,.0f} | {d['p50_ms']:.1f} ms | {d['p99_ms']:.1f} ms "
            f"| {d['p999_ms']:.1f} ms | {errors} | {d['elections']} | {nodes}; "
            f"{d.get('bench_cpu_s', 0):.1f} |"
        )


if __name__ == "__main__":
    main()
