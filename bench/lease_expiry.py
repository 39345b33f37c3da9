"""How long a leased key outlives its holder, and that it never goes early.

Starts three `liferaft node` processes (default timing: heartbeat 50 ms, election
timeout 300 ms), then ``--rounds`` times: grants a lease of ``--ttl`` seconds, puts a
key with it, starts a separate `liferaft lease keepalive` process as its holder,
SIGKILLs the leader node (and restarts it) while the holder renews, checks the key
every 50 ms through that, SIGKILLs the holder, and measures how long until the key is
gone. The promise (docs/coordination.md): never gone while renewals flow, and gone
within the TTL plus an election timeout after the last renewal (a renewal every TTL/3
means at most TTL + election timeout - 0 after the holder dies, more if a leader change
is under way).

    .venv/bin/python bench/lease_expiry.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from liferaft.client import open_client
from liferaft.testing.processes import process_cluster

IDS = ["n1", "n2", "n3"]


async def run(args: argparse.Namespace) -> tuple[list[float], int]:
    base = Path(tempfile.mkdtemp(prefix="liferaft-lease-"))
    pc = process_cluster(base, IDS, heartbeat_ms=args.heartbeat_ms, election_ms=args.election_ms)
    procs: dict[str, trio.Process] = {}

    async def start(i: str) -> None:
        procs[i] = await trio.lowlevel.open_process(pc.command(i), stderr=subprocess.DEVNULL)

    token = pc.token(["read", "write"], sub="bench")
    env = {
        **os.environ,
        "LIFERAFT_ENDPOINTS": ",".join(pc.endpoints),
        "LIFERAFT_TOKEN": token,
        "LIFERAFT_CACERT": str(pc.certs / "ca.pem"),
    }
    gone_after: list[float] = []
    early = 0
    for i in IDS:
        await start(i)
    try:
        async with open_client(
            pc.endpoints, token=token, cacert=pc.certs / "ca.pem", timeout=30
        ) as c:
            for r in range(args.rounds):
                key = f"held/{r}"
                lease = await c.lease_grant(args.ttl)
                await c.put(key, "x", lease=lease.id)
                holder = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "liferaft", "lease", "keepalive", f"{lease.id:x}"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                )
                leader = (await c.status())["leader_id"]
                procs[leader].kill()
                await procs[leader].wait()
                until = time.monotonic() + 2 * args.ttl
                restarted = False
                while time.monotonic() < until:
                    if await c.get(key) is None:
                        early += 1  # gone while the holder renews: a broken promise
                        break
                    if not restarted and time.monotonic() > until - args.ttl:
                        await start(leader)
                        restarted = True
                    await trio.sleep(0.05)
                if not restarted:
                    await start(leader)
                holder.kill()
                killed = time.monotonic()
                await holder.wait()
                while await c.get(key) is not None:  # noqa: ASYNC110 - polling the cluster
                    await trio.sleep(0.02)
                gone_after.append(time.monotonic() - killed)
                print(f"round {r}: gone {gone_after[-1]:.2f} s after the holder's SIGKILL")
    finally:
        for p in procs.values():
            if p.returncode is None:
                p.kill()
                await p.wait()
    return gone_after, early


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ttl", type=int, default=3)
    p.add_argument("--heartbeat-ms", type=int, default=50)
    p.add_argument("--election-ms", type=int, default=300)
    args = p.parse_args()
    gone, early = trio.run(run, args)
    bound = args.ttl + args.election_ms / 1000
    print(
        f"ttl {args.ttl} s, election timeout {args.election_ms} ms: key gone after the "
        f"holder's SIGKILL in median {statistics.median(gone):.2f} s, worst {max(gone):.2f} s "
        f"(bound TTL + election timeout = {bound:.2f} s); gone early while renewed: {early}"
    )


if __name__ == "__main__":
    main()
