"""The long nemesis run: ``liferaft check`` many times, one seed each, and a summary
(runs, operations, faults injected by kind, anomalies) for docs/reliability.md.

    .venv/bin/python bench/chaos.py --runs 100 --seconds 60      # what `make chaos` runs
    .venv/bin/python bench/chaos.py --runs 5 --seconds 20 --first-seed 40

Each run's JSON line goes to --out (default chaos.jsonl) as it finishes, so a long run
can be followed and its results kept. Exit 1 if any run found an anomaly.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--faults", default="kill,pause,partition,transfer")  # member: opt in
    ap.add_argument("--out", type=Path, default=Path("chaos.jsonl"))
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    totals: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    failed: list[int] = []
    started = time.monotonic()
    with args.out.open("a") as out:
        for seed in range(args.first_seed, args.first_seed + args.runs):
            cmd = [
                sys.executable,
                *("-m", "liferaft", "check", "-o", "json", "--seed", str(seed)),
                *("--seconds", str(args.seconds), "--faults", args.faults),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 600)
            try:
                doc = json.loads(proc.stdout)
            except json.JSONDecodeError:
                doc = {"ok": False, "seed": seed, "anomalies": [f"no report: {proc.stderr[-300:]}"]}
            out.write(json.dumps(doc) + "\n")
            out.flush()
            totals["runs"] += 1
            totals["operations"] += doc.get("operations", 0)
            totals["acked_writes"] += doc.get("acked_writes", 0)
            totals["anomalies"] += len(doc.get("anomalies", []))
            for f in doc.get("faults", []):
                if f["fault"] in ("kill", "pause", "transfer", "remove"):
                    faults[f["fault"]] += 1
                elif f["fault"] == "partition":
                    faults[f"partition ({f['kind']})"] += 1
            if not doc.get("ok"):
                failed.append(seed)
            print(
                f"seed {seed}: {'ok' if doc.get('ok') else 'ANOMALY'}, "
                f"{doc.get('operations', 0)} ops, {len(doc.get('faults', []))} fault events",
                flush=True,
            )
    minutes = (time.monotonic() - started) / 60
    print(
        f"{totals['runs']} runs of {args.seconds:g} s in {minutes:.0f} min: "
        f"{totals['operations']:,} operations ({totals['acked_writes']:,} acknowledged puts), "
        f"faults: {', '.join(f'{k} {v}' for k, v in sorted(faults.items()))}; "
        f"anomalies: {totals['anomalies']}" + (f" (seeds {failed})" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
