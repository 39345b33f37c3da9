"""How long writes stop when the leader dies (SIGKILL), with fast-failover timing.

Starts three `liferaft node` processes (heartbeat ``--heartbeat-ms``, election timeout
``--election-ms``; default 20/100, the fast-failover setting), keeps ``--writers``
writers busy through the client library, kills the leader with SIGKILL ``--kills`` times
(restarting it each time), and reports for each kill how long no write completed. A
gap includes the election and the client noticing (``--attempt-timeout``).

    .venv/bin/python bench/failover.py --kills 5
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from liferaft.client import Client
from liferaft.security.certs import generate
from liferaft.security.tokens import mint
from liferaft.testing.localcluster import free_ports, write_config

IDS = ["n1", "n2", "n3"]


async def run(args: argparse.Namespace) -> list[float]:
    base = Path(tempfile.mkdtemp(prefix="liferaft-failover-"))
    certs = base / "certs"
    generate(certs, IDS)
    ports = free_ports(9)
    members = {i: (ports[3 * n], ports[3 * n + 1], ports[3 * n + 2]) for n, i in enumerate(IDS)}
    cfgs = {
        i: write_config(
            base / f"{i}.toml",
            i,
            members,
            certs,
            base / "data" / i,
            heartbeat_ms=args.heartbeat_ms,
            election_ms=args.election_ms,
        )
        for i in IDS
    }
    procs: dict[str, trio.Process] = {}

    async def start(i: str) -> None:
        procs[i] = await trio.lowlevel.open_process(
            [sys.executable, "-m", "liferaft", "node", "--config", str(cfgs[i])],
            stderr=subprocess.DEVNULL,
        )

    for i in IDS:
        await start(i)
    token = mint(
        (certs / "jwt-private.pem").read_bytes(), sub="b", roles=["write"], now=time.time()
    )
    endpoints = [f"wss://127.0.0.1:{members[i][1]}/v1" for i in IDS]
    gaps: list[float] = []
    try:
        client = await Client.connect(
            endpoints,
            token=token,
            cacert=certs / "ca.pem",
            timeout=30,
            attempt_timeout=args.attempt_timeout,
        )
        async with client:
            last_ok = [trio.current_time()]
            stop = trio.Event()

            async def writer(w: int) -> None:
                n = 0
                while not stop.is_set():
                    await client.put(f"f/{w}/{n % 100}", b"x")
                    last_ok[0] = trio.current_time()
                    n += 1

            async with trio.open_nursery() as nursery:
                for w in range(args.writers):
                    nursery.start_soon(writer, w)
                await trio.sleep(1)
                for _ in range(args.kills):
                    leader = str((await client.status())["leader_id"])
                    killed_at = trio.current_time()
                    procs[leader].kill()
                    await procs[leader].wait()
                    while last_ok[0] <= killed_at:  # noqa: ASYNC110 - polling a timestamp
                        await trio.sleep(0.001)
                    gaps.append(last_ok[0] - killed_at)
                    await start(leader)
                    await trio.sleep(1.5)  # let it catch up before the next kill
                stop.set()
    finally:
        for p in procs.values():
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
                await p.wait()
    return gaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--heartbeat-ms", type=int, default=20)
    ap.add_argument("--election-ms", type=int, default=100)
    ap.add_argument("--writers", type=int, default=16)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--attempt-timeout", type=float, default=0.2)
    args = ap.parse_args()
    gaps = trio.run(run, args)
    ms = sorted(g * 1000 for g in gaps)
    print(
        f"heartbeat {args.heartbeat_ms} ms, election timeout {args.election_ms} ms, "
        f"{args.writers} writers: writes stopped for "
        + ", ".join(f"{g:.0f}" for g in ms)
        + f" ms after each of {len(ms)} leader kills (median {ms[len(ms) // 2]:.0f} ms)"
    )


if __name__ == "__main__":
    main()
