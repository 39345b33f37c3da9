"""Does the cost grow with the data? Write N distinct keys into a 3-node cluster.

Starts three real ``liferaft node`` processes (the default settings of docs/operations.md:
heartbeat 50 ms, election 300 ms, snapshot_entries 10000, history_revisions 100000; TLS
and fsync on) and writes ``--keys`` distinct keys with ``--value-size``-byte values
through the client library. It reports, per window of ``--window`` keys: the write rate,
p99 and the largest latency of any write, and the leader's RSS; then the elections during
the run.

Along the way (docs/performance.md, "Data that grows"):

- after the first window, the writers pause and one follower is restarted: how long
  until it is ready (``/readyz``) with that many keys; the same again at the end, with
  all the keys: start-up must not grow with the data;
- from 40 % to 55 % of the keys a second follower is stopped while writes go on, then
  restarted: it catches up under load, from the leader's log or, if the leader has
  compacted past it, from a state file (the time until it has applied what the leader
  had applied when it came back, and whether its log shows ``snapshot_installed``).

Bounded in count (``--keys``) and time (``--max-seconds``).

    .venv/bin/python bench/keys.py --keys 1000000
    .venv/bin/python bench/keys.py --keys 100000 --window 20000     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from liferaft.client import Client, LiferaftError
from liferaft.security.tokens import mint
from liferaft.testing.processes import ProcessCluster, process_cluster

IDS = ["n1", "n2", "n3"]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))] if s else float("nan")


@dataclass
class Window:
    start: float
    end: float = 0.0
    paused: float = 0.0
    latencies: list[float] = field(default_factory=list)
    leader_rss: float = 0.0


class Cluster:
    def __init__(self, base: Path, pc: ProcessCluster) -> None:
        self.base = base
        self.pc = pc
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, node_id: str) -> None:
        log = (self.base / f"{node_id}.log").open("ab")
        self.procs[node_id] = subprocess.Popen(self.pc.command(node_id), stderr=log, stdout=log)

    def stop(self, node_id: str) -> None:
        p = self.procs.pop(node_id)
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def stop_all(self) -> None:
        for i in list(self.procs):
            self.stop(i)

    def endpoint(self, node_id: str) -> str:
        return self.pc.endpoints[IDS.index(node_id)]

    def log_has(self, node_id: str, text: str) -> bool:
        return text in (self.base / f"{node_id}.log").read_text(errors="replace")


async def http_status(port: int, path: str) -> int:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return 0
    async with stream:
        request = f"GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
        await stream.send_all(request.encode())
        data = b""
        while chunk := await stream.receive_some(4096):
            data += chunk
    parts = data.split()
    return int(parts[1]) if len(parts) > 1 else 0


async def status(c: Cluster, node_id: str, token: str) -> dict[str, object]:
    async with await Client.connect(
        [c.endpoint(node_id)], token=token, cacert=c.pc.certs / "ca.pem", timeout=30
    ) as client:
        return dict(await client.status())


async def restart_ready(c: Cluster, node_id: str) -> float:
    """Restart ``node_id`` and time until its /readyz answers 200."""
    c.stop(node_id)
    t0 = time.perf_counter()
    c.start(node_id)
    port = c.pc.members[node_id][2]
    with trio.fail_after(300):
        while await http_status(port, "/readyz") != 200:  # noqa: ASYNC110 - polling HTTP
            await trio.sleep(0.01)
    return time.perf_counter() - t0


async def run(c: Cluster, args: argparse.Namespace) -> dict[str, object]:
    certs = c.pc.certs
    token = mint(
        (certs / "jwt-private.pem").read_bytes(),
        sub="bench",
        roles=["read", "write", "admin"],
        ttl_s=24 * 3600,
        now=time.time(),
    )
    with trio.fail_after(60):
        while True:
            try:
                st = await status(c, "n1", token)
                if st.get("leader_id"):
                    break
            except LiferaftError:
                pass
            await trio.sleep(0.2)
    leader = str(st["leader_id"])
    term0 = int(str(st["term"]))
    f1, f2 = [i for i in IDS if i != leader]
    value = os.urandom(args.value_size)
    total = args.keys
    windows = [Window(time.perf_counter())]
    done = [0]
    next_key = [0]
    gate = [trio.Event()]
    gate[0].set()
    result: dict[str, object] = {"leader": leader}
    deadline = trio.current_time() + args.max_seconds
    max_rss = [0.0]

    async def writer(client: Client) -> None:
        while next_key[0] < total and trio.current_time() < deadline:
            await gate[0].wait()
            k = next_key[0]
            next_key[0] += 1
            t0 = time.perf_counter()
            await client.put(f"key/{k:08d}", value)
            lat = time.perf_counter() - t0
            done[0] += 1
            w = windows[-1]
            w.latencies.append(lat)
            if done[0] % args.window == 0:
                w.end = time.perf_counter()
                w.leader_rss = rss_mb(c.procs[leader].pid)
                windows.append(Window(w.end))
                await on_window(done[0])

    async def on_window(n: int) -> None:
        print(
            f"  {n:>9,} keys  {rate(windows[-2]):8,.0f}/s  p99 "
            f"{percentile(windows[-2].latencies, 0.99) * 1000:6.1f} ms  max "
            f"{max(windows[-2].latencies) * 1000:6.1f} ms  "
            f"leader RSS {windows[-2].leader_rss:.0f} MB",
            flush=True,
        )
        if n == args.window:  # start-up with few keys, writers paused
            await paused(lambda: restart_ready(c, f1), "ready_after_restart_small")
        if n == int(total * 0.40) // args.window * args.window:
            c.stop(f2)
            print(f"  stopped {f2} at {n:,} keys", flush=True)
        if n == int(total * 0.55) // args.window * args.window and f2 not in c.procs:
            nursery.start_soon(catch_up, n)

    async def paused(fn: object, name: str) -> None:
        gate[0] = trio.Event()
        t0 = time.perf_counter()
        with trio.fail_after(600):
            while done[0] < next_key[0]:  # noqa: ASYNC110 - let writes in flight finish
                await trio.sleep(0.01)
            seconds = await fn()  # type: ignore[operator]
        windows[-1].paused += time.perf_counter() - t0
        windows[-1].start = time.perf_counter()
        result[name] = round(seconds, 3)
        print(f"  {name}: {seconds:.2f} s at {done[0]:,} keys", flush=True)
        gate[0].set()

    async def catch_up(n: int) -> None:
        lead_applied = int(str((await status(c, leader, token))["applied_index"]))
        t0 = time.perf_counter()
        c.start(f2)
        with trio.fail_after(600):
            while True:
                try:
                    st = await status(c, f2, token)
                    if int(str(st["applied_index"])) >= lead_applied:
                        break
                except LiferaftError:
                    pass
                await trio.sleep(0.1)
        seconds = time.perf_counter() - t0
        installed = c.log_has(f2, '"snapshot_installed"')
        result["follower_catch_up_s"] = round(seconds, 2)
        result["follower_got_snapshot_file"] = installed
        print(
            f"  {f2} restarted at {n:,} keys: caught up in {seconds:.1f} s under load; "
            f"snapshot file installed: {installed}",
            flush=True,
        )

    async def sample_rss() -> None:
        while True:
            p = c.procs.get(leader)
            if p is not None:
                max_rss[0] = max(max_rss[0], rss_mb(p.pid))
            await trio.sleep(1)

    def rate(w: Window) -> float:
        return len(w.latencies) / max(1e-9, w.end - w.start)

    cacert = certs / "ca.pem"
    lead_first = [c.endpoint(leader)] + [c.endpoint(i) for i in IDS if i != leader]
    clients = [
        await Client.connect(lead_first, token=token, cacert=cacert, timeout=30)
        for _ in range(args.connections)
    ]
    print(
        f"writing {total:,} distinct keys of {args.value_size} bytes, "
        f"{args.connections} x {args.writers} writers; leader {leader}",
        flush=True,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_rss)
        async with trio.open_nursery() as writers:
            for client in clients:
                for _ in range(args.writers):
                    writers.start_soon(writer, client)
        if f2 not in c.procs:
            c.start(f2)
        await paused(lambda: restart_ready(c, f1), "ready_after_restart_all")
        nursery.cancel_scope.cancel()
    for client in clients:
        await client.aclose()
    full = [w for w in windows if w.end]
    st = await status(c, leader, token)
    result.update(
        keys=done[0],
        windows=[
            {
                "keys": len(w.latencies),
                "per_s": round(rate(w)),
                "p99_ms": round(percentile(w.latencies, 0.99) * 1000, 1),
                "max_ms": round(max(w.latencies) * 1000, 1),
                "leader_rss_mb": round(w.leader_rss),
            }
            for w in full
        ],
        first_window_per_s=round(rate(full[0])) if full else None,
        last_window_per_s=round(rate(full[-1])) if full else None,
        max_latency_ms=round(max(max(w.latencies) for w in full) * 1000, 1) if full else None,
        leader_max_rss_mb=round(max_rss[0]),
        elections=int(str(st["term"])) - term0,
        leader_still=st.get("leader_id"),
        db_size_bytes=st.get("db_size"),
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--window", type=int, default=100_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--writers", type=int, default=64, help="concurrent writers per connection")
    ap.add_argument("--max-seconds", type=float, default=3600.0)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ap.add_argument("--keep", type=Path, help="run in this directory and keep it")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="liferaft-keys-") as tmp:
        base = args.keep or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        c = Cluster(base, process_cluster(base, IDS))
        for i in IDS:
            c.start(i)
        try:
            result = trio.run(run, c, args)
        finally:
            c.stop_all()
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            if k != "windows":
                print(f"{k}: {v}")


if __name__ == "__main__":
    main()
