"""Locks and elections on a real in-process cluster (LocalCluster): mutual exclusion
among contenders with their own clients while the cluster's leader is killed and
restarted, and an election whose leader dies, replaced within its TTL plus an
election timeout."""

from __future__ import annotations

import itertools
import os
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from liferaft.client import (
    Client,
    Election,
    InvalidRequest,
    KeyValue,
    Lock,
    LockLost,
    open_client,
)
from liferaft.testing.localcluster import LocalCluster, wait_until

HANG = 120  # a guard against hangs, not a performance claim
ELECTION_S = 0.1  # LocalCluster's default election timeout


async def require_leases(client: Client) -> None:
    try:
        await client.lease_list()
    except InvalidRequest as exc:  # a server from before leases
        pytest.skip(f"the server has no leases: {exc}")


async def test_lock_mutual_exclusion_across_a_leader_crash(tmp_path: Path, certs: Path) -> None:
    """Four contenders, each with its own client (its own session, as separate
    processes would have), take the lock three times each while the cluster's leader
    is killed and later restarted. Critical sections never overlap and every holder's
    fencing token is higher than the one before; a fenced store (refusing a token lower
    than the highest it saw) never refuses anyone."""
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"])
    holder: list[int] = []
    tokens: list[int] = []
    lost: list[int] = []
    highest = 0
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            await c.wait_leader()
            clients = []
            for _ in range(4):
                clients.append(
                    await Client.connect(
                        c.endpoints(), token=c.token(), cacert=certs / "ca.pem", timeout=10
                    )
                )
            await require_leases(clients[0])
            crashed: list[str] = []

            async def contender(i: int, client: Client) -> None:
                nonlocal highest
                for _ in range(3):
                    try:
                        async with Lock(client, "mx", ttl=3) as lock:
                            assert not holder, f"{i} entered while {holder} held the lock"
                            holder.append(i)
                            assert lock.token > highest, "a fenced store would refuse this"
                            highest = lock.token
                            tokens.append(lock.token)
                            await client.put("mx/owner", f"{i}")
                            await trio.sleep(0.05)
                            holder.remove(i)
                    except LockLost:
                        holder.clear()
                        lost.append(i)

            async def crash_and_restart() -> None:
                while len(tokens) < 3:  # noqa: ASYNC110 - the contenders' progress
                    await trio.sleep(0.01)
                lead = c.leader()
                assert lead is not None
                c.crash(lead)
                crashed.append(lead)
                while len(tokens) < 8:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                await c.start_node(lead)

            async with trio.open_nursery() as work:
                work.start_soon(crash_and_restart)
                for i, client in enumerate(clients):
                    work.start_soon(contender, i, client)
            for client in clients:
                await client.aclose()
        nursery.cancel_scope.cancel()
    assert crashed and len(tokens) == 12 and not lost, (crashed, tokens, lost)
    assert all(a < b for a, b in itertools.pairwise(tokens)), tokens


async def test_keep_alive_carries_a_lease_across_a_leader_crash(
    tmp_path: Path, certs: Path
) -> None:
    """keep_alive renews through a crash of the cluster's leader (following the new
    one) and the key stays; once its client is gone without revoking, the key goes
    within the TTL plus an election timeout (with a margin for a shared machine), and
    not before two thirds of the TTL (renewals come every third)."""
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"])
    ttl = 2
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            await c.wait_leader()
            opts = {"token": c.token(), "cacert": certs / "ca.pem", "timeout": 10}
            holder = await Client.connect(c.endpoints(), **opts)
            await require_leases(holder)
            lease = await holder.lease_grant(ttl)
            await holder.put("svc/me", "up", lease=lease.id)
            ka = holder.keep_alive(lease)
            renewals: list[float] = []
            ka.on_renewed(lambda _lease, _ttl: renewals.append(trio.current_time()))
            async with open_client(c.endpoints(), **opts) as reader:
                async with ka:
                    while len(renewals) < 2:  # noqa: ASYNC110 - the keeper's progress
                        await trio.sleep(0.01)
                    lead = c.leader()
                    assert lead is not None
                    c.crash(lead)
                    crashed_at = len(renewals)
                    while len(renewals) < crashed_at + 4:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    assert await reader.get("svc/me") is not None
                assert not ka.lost.is_set()
                await c.start_node(lead)
                stopped = renewals[-1]
                await holder.aclose()
                with trio.fail_after(ttl + ELECTION_S + 2.0):
                    while await reader.get("svc/me") is not None:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                assert trio.current_time() - stopped >= ttl * 2 / 3
        nursery.cancel_scope.cancel()


async def test_crashed_election_leader_is_replaced_within_ttl(tmp_path: Path, certs: Path) -> None:
    """The leader of an election dies (its client vanishes without resigning): the
    waiting candidate is elected within the TTL plus an election timeout (with a
    margin for a shared machine: a bound, not a measurement), and an observer sees
    the two leaders in turn, never both."""
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"])
    ttl = 2
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            await c.wait_leader()
            opts = {"token": c.token(), "cacert": certs / "ca.pem", "timeout": 10}
            a_client = await Client.connect(c.endpoints(), **opts)
            await require_leases(a_client)
            async with (
                open_client(c.endpoints(), **opts) as b_client,
                open_client(c.endpoints(), **opts) as watcher,
                trio.open_nursery() as tasks,
            ):
                send, seen = trio.open_memory_channel[KeyValue](100)

                async def observe() -> None:
                    async with Election(watcher, "svc").observe() as leaders:
                        async for kv in leaders:
                            send.send_nowait(kv)

                tasks.start_soon(observe)
                a = Election(a_client, "svc", ttl=ttl)
                await a.campaign("a")
                assert (await seen.receive()).value == b"a"
                b = Election(b_client, "svc", ttl=ttl)
                b_won = trio.Event()

                async def campaign_b() -> None:
                    await b.campaign("b")
                    b_won.set()

                tasks.start_soon(campaign_b)
                while b.watching is None:  # noqa: ASYNC110 - b's own progress
                    await trio.sleep(0.01)
                died = trio.current_time()
                await a_client.aclose()  # no resign, no revoke: the lease must expire
                with trio.fail_after(ttl + ELECTION_S + 2.0):
                    await b_won.wait()
                assert trio.current_time() - died >= ttl * 2 / 3  # not before a's lease ran out
                assert (await seen.receive()).value == b"b"
                await b.resign()
                tasks.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def test_two_lock_commands_take_turns(tmp_path: Path, certs: Path) -> None:
    """Two ``liferaft lock NAME -- COMMAND`` processes against a real cluster: the
    second command starts only after the first one ended, with a higher token."""
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"])
    release = tmp_path / "release"
    script = (
        "import os, sys, time; "
        "open(sys.argv[1], 'w').write(os.environ['LIFERAFT_LOCK_TOKEN']); "
        f"[time.sleep(0.01) for _ in iter(lambda: os.path.exists({str(release)!r}), True)]"
    )
    env = {
        **os.environ,
        "LIFERAFT_ENDPOINTS": ",".join(c.endpoints()),
        "LIFERAFT_CACERT": str(certs / "ca.pem"),
        "LIFERAFT_TOKEN": c.token(),
    }

    def lock_cmd(marker: Path) -> list[str]:
        cmd = [sys.executable, "-m", "liferaft", "lock", "job", "--ttl", "5", "--"]
        return [*cmd, sys.executable, "-c", script, str(marker)]

    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            await c.wait_leader()
            async with open_client(c.endpoints(), token=c.token(), cacert=certs / "ca.pem") as r:
                await require_leases(r)
                first, second = tmp_path / "first", tmp_path / "second"
                async with trio.open_nursery() as procs:
                    a = await procs.start(partial(trio.run_process, lock_cmd(first), env=env))
                    await wait_until(first.exists)
                    b = await procs.start(partial(trio.run_process, lock_cmd(second), env=env))
                    while len((await r.range("_liferaft/lock/job/"))[0]) < 2:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                    assert not second.exists()  # waiting for the lock
                    release.touch()
                assert a.returncode == 0 and b.returncode == 0
                assert int(first.read_text()) < int(second.read_text())
                assert (await r.range("_liferaft/lock/"))[0] == []  # both released
        nursery.cancel_scope.cancel()
