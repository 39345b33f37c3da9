"""Leases and locks with real processes (docs/coordination.md): a leased key outlives a
SIGKILLed leader while its holder (a Trio CLI process, or an asyncio program) keeps it
alive, and goes once the holder itself is SIGKILLed; three `liferaft lock` processes
take turns at one lock while the leader is SIGKILLed and restarted, their critical
sections never overlap and the fencing tokens grow with each holder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from liferaft.client import open_client
from liferaft.testing.processes import ProcessCluster, process_cluster

HANG = 90  # a guard against hangs, not a performance claim
TTL = 3


class Nodes:
    """The node processes of ``pc``, started, SIGKILLed and restarted at will."""

    def __init__(self, pc: ProcessCluster, logs: Path) -> None:
        self.pc = pc
        self.logs = logs
        self.procs: dict[str, trio.Process] = {}

    async def start(self, i: str) -> None:
        with (self.logs / f"{i}.log").open("ab") as err:
            self.procs[i] = await trio.lowlevel.open_process(self.pc.command(i), stderr=err)

    async def kill(self, i: str) -> None:
        self.procs[i].kill()
        await self.procs[i].wait()

    async def close(self) -> None:
        for p in self.procs.values():
            if p.returncode is None:
                p.kill()
                await p.wait()


def cli(pc: ProcessCluster, token: str) -> tuple[list[str], dict[str, str]]:
    env = {
        **os.environ,
        "LIFERAFT_ENDPOINTS": ",".join(pc.endpoints),
        "LIFERAFT_TOKEN": token,
        "LIFERAFT_CACERT": str(pc.certs / "ca.pem"),
    }
    return [sys.executable, "-m", "liferaft"], env


# A holder on asyncio: a separate process renewing the lease with AsyncioClient.
ASYNCIO_HOLDER = """
import asyncio, os, sys
from liferaft.client.aio import open_client

async def main():
    async with open_client(os.environ["LIFERAFT_ENDPOINTS"].split(","),
                           token=os.environ["LIFERAFT_TOKEN"],
                           cacert=os.environ["LIFERAFT_CACERT"], timeout=30) as c:
        async with c.keep_alive(int(sys.argv[1], 16)):
            await asyncio.Event().wait()  # until SIGKILLed

asyncio.run(main())
"""


def holder_command(flavour: str, base: list[str], lease: int) -> list[str]:
    if flavour == "trio":  # the CLI: liferaft lease keepalive
        return [*base, "lease", "keepalive", f"{lease:x}"]
    return [sys.executable, "-c", ASYNCIO_HOLDER, f"{lease:x}"]


@pytest.mark.parametrize("flavour", ["trio", "asyncio"])
async def test_a_leased_key_outlives_a_killed_leader_and_goes_with_its_killed_holder(
    tmp_path: Path, certs: Path, flavour: str
) -> None:
    pc = process_cluster(tmp_path, ["n1", "n2", "n3"], certs=certs)
    nodes = Nodes(pc, tmp_path)
    token = pc.token(["read", "write", "admin"], sub="holder")
    base, env = cli(pc, token)
    with trio.fail_after(HANG):
        try:
            for i in pc.ids:
                await nodes.start(i)
            async with open_client(
                pc.endpoints, token=token, cacert=certs / "ca.pem", timeout=30
            ) as c:
                lease = await c.lease_grant(TTL)
                await c.put("svc/me", "up", lease=lease.id)
                holder = await trio.lowlevel.open_process(
                    holder_command(flavour, base, lease.id), env=env, stdout=subprocess.DEVNULL
                )
                try:
                    leader = (await c.status())["leader_id"]
                    await nodes.kill(leader)
                    # While the holder keeps renewing, through the election and the
                    # old leader's restart, the key stays (checked over two TTLs).
                    deadline = trio.current_time() + 2 * TTL
                    restarted = False
                    while trio.current_time() < deadline:
                        got = await c.get("svc/me")
                        assert got is not None and got.value == b"up"
                        if not restarted and trio.current_time() > deadline - TTL:
                            await nodes.start(leader)
                            restarted = True
                        await trio.sleep(0.2)
                finally:
                    holder.kill()  # SIGKILL: no revoke, no goodbye
                    await holder.wait()
                while await c.get("svc/me") is not None:  # noqa: ASYNC110 - another process
                    await trio.sleep(0.1)
        finally:
            await nodes.close()


async def test_lock_processes_take_turns_while_the_leader_is_killed_and_restarted(
    tmp_path: Path, certs: Path
) -> None:
    pc = process_cluster(tmp_path, ["n1", "n2", "n3"], certs=certs)
    nodes = Nodes(pc, tmp_path)
    token = pc.token(["read", "write"], sub="worker")
    base, env = cli(pc, token)
    journal = tmp_path / "journal"
    # Each critical section writes a start and an end line around a pause; with
    # O_APPEND each line is one write, so the file's order is the order they happened.
    section = (
        f'echo "start $LIFERAFT_LOCK_TOKEN" >> {journal}; sleep 0.3; '
        f'echo "end $LIFERAFT_LOCK_TOKEN" >> {journal}'
    )
    rounds = 3
    with trio.fail_after(HANG):
        try:
            for i in pc.ids:
                await nodes.start(i)
            async with open_client(
                pc.endpoints, token=pc.token(["read", "write", "admin"]), cacert=certs / "ca.pem"
            ) as c:
                await c.put("ready", "1")
                codes: list[int] = []

                async def worker() -> None:
                    for _ in range(rounds):
                        argv = [*base, "lock", "job", "--ttl", str(TTL), "--", "sh", "-c", section]
                        done = await trio.run_process(argv, env=env, check=False)
                        codes.append(done.returncode)

                async with trio.open_nursery() as workers:
                    for _ in range(3):
                        workers.start_soon(worker)
                    while not journal.exists() or journal.read_text().count("end") < 2:  # noqa: ASYNC110 - other processes
                        await trio.sleep(0.05)
                    leader = (await c.status())["leader_id"]
                    await nodes.kill(leader)
                    await trio.sleep(1.0)  # an election, with the workers still going
                    await nodes.start(leader)
            assert codes == [0] * (3 * rounds), codes
            lines = journal.read_text().split()
            pairs = list(zip(lines[0::2], lines[1::2], strict=True))
            words = list(zip(pairs[0::2], pairs[1::2], strict=True))
            assert len(words) == 3 * rounds
            tokens = []
            for (start, token_a), (end, token_b) in words:
                assert (start, end) == ("start", "end"), words  # never two in at once
                assert token_a == token_b
                tokens.append(int(token_a))
            assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), tokens
        finally:
            await nodes.close()
