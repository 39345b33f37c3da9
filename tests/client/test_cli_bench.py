"""``liferaft bench`` (docs/performance.md): the shape of its output and its exit codes,
never its speed. Each run starts its own local 3-node cluster of real processes, for one
second."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from liferaft.testing.localcluster import free_ports


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFERAFT_")}
    return subprocess.run(
        [sys.executable, "-m", "liferaft", "bench", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
        check=False,
    )


def bench_json(*args: str) -> dict[str, Any]:
    proc = bench(*args, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress or chatter in json mode
    doc = json.loads(proc.stdout)
    assert isinstance(doc, dict)
    for key in ("ops_per_s", "seconds", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"):
        assert isinstance(doc[key], float), key
    assert isinstance(doc["ops"], int) and doc["ops"] > 0
    assert doc["ops"] == doc["puts"] + doc["gets"]
    assert doc["p50_ms"] <= doc["p90_ms"] <= doc["p99_ms"] <= doc["p999_ms"] <= doc["max_ms"]
    assert isinstance(doc["errors"], dict)
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in doc["errors"].items())
    assert isinstance(doc["elections"], int) and doc["elections"] >= 0
    assert set(doc["cpu_s"]) == {"n1", "n2", "n3"}
    assert all(isinstance(s, float | int) and s >= 0 for s in doc["cpu_s"].values())
    assert sum(b["count"] for b in doc["histogram"]) == doc["ops"]
    return doc


def test_closed_loop_json() -> None:
    doc = bench_json("--seconds", "1")
    assert doc["shape"]["mode"] == "closed"
    assert (doc["shape"]["connections"], doc["shape"]["writers"]) == (4, 64)
    assert "open_loop" not in doc


def test_serial_json_with_reads() -> None:
    doc = bench_json("--serial", "--seconds", "1", "--reads", "0.5", "--batch", "1")
    assert doc["shape"]["mode"] == "serial"
    assert (doc["shape"]["connections"], doc["shape"]["writers"]) == (1, 1)
    assert doc["gets"] > 0 and doc["puts"] > 0


def test_open_loop_json() -> None:
    doc = bench_json("--rate", "200", "--seconds", "1")
    assert doc["shape"]["mode"] == "open" and doc["shape"]["rate"] == 200
    ol = doc["open_loop"]
    assert ol["offered_per_s"] == 200 and ol["max_in_flight"] == 4 * 64
    assert isinstance(ol["late"], int) and isinstance(ol["unsent"], int)
    # Never more requests than the schedule offers: 200/s for one second.
    assert doc["ops"] + sum(doc["errors"].values()) + ol["unsent"] == 200


def test_array_json() -> None:
    """--array N: each operation a put_many of N keys; ops, puts and the histogram count
    puts (N per array), and the shape says so."""
    doc = bench_json("--seconds", "1", "--connections", "2", "--writers", "3", "--array", "16")
    sh = doc["shape"]
    assert (sh["mode"], sh["connections"], sh["writers"], sh["array"]) == ("closed", 2, 3, 16)
    assert isinstance(doc["arrays"], int) and doc["arrays"] > 0
    assert doc["puts"] == doc["ops"] == 16 * doc["arrays"] and doc["gets"] == 0
    # the open loop offers puts: 320/s for one second are 20 arrays of 16
    doc = bench_json("--rate", "320", "--seconds", "1", "--array", "16")
    assert doc["shape"]["array"] == 16 and doc["ops"] % 16 == 0
    ol = doc["open_loop"]
    assert doc["ops"] + sum(doc["errors"].values()) + ol["unsent"] == 320
    plain = bench_json("--seconds", "1", "--max-ops", "200")
    assert plain["shape"]["array"] is None and plain["arrays"] is None


def test_array_text_header() -> None:
    proc = bench("--seconds", "1", "--connections", "2", "--writers", "2", "--array", "8")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "2 connections x 2 writers, put_many arrays of 8 puts" in lines[0]
    ops = next(line for line in lines if line.startswith("ops:"))
    assert "ops/s" in ops and " arrays, " in ops
    assert any(line.startswith("latency:") for line in lines)


def test_text_has_percentiles_and_histogram() -> None:
    proc = bench("--seconds", "1", "--max-ops", "2000")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    latency = next(line for line in lines if line.startswith("latency:"))
    assert all(p in latency for p in ("p50 ", "p90 ", "p99 ", "p999 ", " ms"))
    start = lines.index("histogram:")
    bars = [line for line in lines[start + 1 :] if line.startswith("  ")]
    assert bars and all("#" in line and " ms " in line and "%" in line for line in bars)
    assert any(line.startswith("ops:") and "ops/s" in line for line in lines)
    assert any(line.startswith("errors:") for line in lines)
    assert any(line.startswith("elections:") for line in lines)
    assert any(line.startswith("cpu:") and "n1" in line for line in lines)


def test_fast_failover_timing_is_set_up_and_reported() -> None:
    proc = bench("--heartbeat-ms", "20", "--election-ms", "100", "--seconds", "1")
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0]
    assert "heartbeat 20 ms, election timeout 100 ms" in header, header


def test_usage_errors_exit_2() -> None:
    assert bench("--reads", "2").returncode == 2
    assert bench("--serial", "--rate", "10").returncode == 2
    assert bench("--endpoints", "wss://127.0.0.1:8001").returncode == 2  # no token
    assert bench("--token", "t").returncode == 2  # a token without --endpoints
    assert bench("--array", "8", "--reads", "0.5").returncode == 2
    assert bench("--array", "0").returncode == 2
    assert bench("--heartbeat-ms", "50", "--election-ms", "50").returncode == 2
    endpoint = ("--endpoints", "wss://127.0.0.1:8001", "--token", "t")
    assert bench(*endpoint, "--election-ms", "100").returncode == 2  # local cluster only


def test_unreachable_cluster_exits_4() -> None:
    (port,) = free_ports(1)
    proc = bench("--endpoints", f"wss://127.0.0.1:{port}", "--token", "t", "--timeout", "1")
    assert proc.returncode == 4, proc.stderr
    assert "no leader" in proc.stderr
