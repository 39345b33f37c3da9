"""How long writes stop when the leader dies (SIGKILL), with fast-failover timing.

Starts three `liferaft node` processes (heartbeat ``--heartbeat-ms``, election timeout
``--election-ms``; default 20/100, the fast-failover setting), keeps ``--writers``
writers busy through the client library, kills the leader with SIGKILL ``--kills`` times
(restarting it each time), and reports for each kill how long until the first write
*invoked after the kill* completed. A gap includes the election and the client noticing
(``--attempt-timeout``).

    .venv/bin/python bench/failover.py --kills 5
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import trio

from liferaft.client import Client
from liferaft.security.tokens import mint
from liferaft.testing.processes import process_cluster

IDS = ["n1", "n2", "n3"]


async def run(args: argparse.Namespace) -> list[float]:
    base = Path(tempfile.mkdtemp(prefix="liferaft-failover-"))
    pc = process_cluster(base, IDS, heartbeat_ms=args.heartbeat_ms, election_ms=args.election_ms)
    certs = pc.certs
    procs: dict[str, trio.Process] = {}

    async def start(i: str) -> None:
        procs[i] = await trio.lowlevel.open_process(pc.command(i), stderr=subprocess.DEVNULL)

    for i in IDS:
        await start(i)
    token = mint(
        (certs / "jwt-private.pem").read_bytes(), sub="b", roles=["write"], now=time.time()
    )
    endpoints = pc.endpoints
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
            killed_at = [float("inf")]
            resumed = [float("inf")]  # when the first write invoked after the kill completed
            stop = trio.Event()

            async def writer(w: int) -> None:
                n = 0
                while not stop.is_set():
                    started = trio.current_time()
                    await client.put(f"f/{w}/{n % 100}", b"x")
                    if started > killed_at[0]:
                        resumed[0] = min(resumed[0], trio.current_time())
                    n += 1

            async with trio.open_nursery() as nursery:
                for w in range(args.writers):
                    nursery.start_soon(writer, w)
                await trio.sleep(1)
                for _ in range(args.kills):
                    leader = str((await client.status())["leader_id"])
                    resumed[0] = float("inf")
                    killed_at[0] = trio.current_time()
                    procs[leader].kill()
                    await procs[leader].wait()
                    while resumed[0] == float("inf"):  # noqa: ASYNC110 - polling a timestamp
                        await trio.sleep(0.001)
                    gaps.append(resumed[0] - killed_at[0])
                    killed_at[0] = float("inf")
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
        + f" ms after each of {len(ms)} leader kills "
        + f"(median {ms[len(ms) // 2]:.0f} ms, worst {ms[-1]:.0f} ms)"
    )


if __name__ == "__main__":
    main()
