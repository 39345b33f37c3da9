"""Grow a cluster of real ``liferaft node`` processes from 3 to 5 under write load, with
``[cluster] auto_promote``, and shrink it back to 3 (docs/operations.md, "Scaling a
running cluster"): no acknowledged write lost, no election but the one that removing the
leader costs, the same state on every remaining node."""

from __future__ import annotations

import json
import signal
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from liferaft.client import Client, open_client
from liferaft.testing.processes import add_joiner, process_cluster

HANG = 90  # a guard against hangs, not a performance claim
TIMING = {"heartbeat_ms": 50, "election_ms": 500, "snapshot_entries": 200}
WRITERS, PER_WRITER = 8, 5000  # the load's bound in count; it stops once the test is done


def events(log: Path, name: str) -> list[dict[str, Any]]:
    return [
        e
        for line in log.read_text().splitlines()
        if line.startswith("{") and (e := json.loads(line))["msg"] == name
    ]


async def test_grow_3_to_5_under_load_with_auto_promotion_and_shrink_back_to_3(
    tmp_path: Path, certs: Path
) -> None:
    pc = process_cluster(tmp_path, ["n1", "n2", "n3"], certs=certs, auto_promote=True, **TIMING)
    procs: dict[str, trio.Process] = {}
    logs = {i: tmp_path / f"{i}.log" for i in ("n1", "n2", "n3", "n4", "n5")}
    token = pc.token(["read", "write", "admin"], sub="scaler")
    cacert = certs / "ca.pem"

    async def start(i: str) -> None:
        with logs[i].open("ab") as err:
            procs[i] = await trio.lowlevel.open_process(pc.command(i), stderr=err)

    async def stop(i: str) -> None:
        procs[i].send_signal(signal.SIGTERM)
        assert await procs[i].wait() == 0

    with trio.fail_after(HANG):
        try:
            for i in pc.ids:
                await start(i)
            async with AsyncExitStack() as stack:
                c = await stack.enter_async_context(
                    open_client(pc.endpoints, token=token, cacert=cacert, timeout=30)
                )
                await c.put("first", "x")  # a leader is elected: no election from here on
                start_term = (await c.status())["term"]
                acked: list[str] = []
                stop_load = trio.Event()

                async def writer(w: int) -> None:
                    for n in range(PER_WRITER):
                        if stop_load.is_set():
                            return
                        key = f"k/{w}/{n:04}"
                        await c.put(key, key)
                        acked.append(key)

                async def until(cond: Any) -> None:
                    while not await cond():  # noqa: ASYNC110 - other processes' state
                        await trio.sleep(0.05)

                async with trio.open_nursery() as load:
                    for w in range(WRITERS):
                        load.start_soon(writer, w)

                    # Grow: wait until the log was compacted, so the joiners need the
                    # snapshot, then add n4 and n5 as learners; the leader promotes them.
                    async def compacted() -> bool:
                        return all(events(logs[i], "log_compacted") for i in pc.ids)

                    await until(compacted)
                    for new in ("n4", "n5"):
                        peer, client = add_joiner(pc, tmp_path, new, auto_promote=True, **TIMING)
                        members = await c.member_add(new, peer, client, learner=True)
                        assert {m["id"]: m["voter"] for m in members}[new] is False
                        await start(new)

                    async def five_voters() -> bool:
                        members = await c.member_list()
                        return len(members) == 5 and all(m["voter"] for m in members)

                    await until(five_voters)
                    promoted = [
                        e["member"] for i in pc.ids for e in events(logs[i], "learner_promoted")
                    ]
                    assert sorted(promoted) == ["n4", "n5"]
                    assert events(logs["n4"], "snapshot_installed")  # snapshot, then log

                    # Shrink: a follower, then the leader (it hands over first).
                    await c.member_remove("n5")
                    await stop("n5")
                    voters = ["n1", "n2", "n3", "n4"]
                    per_node: dict[str, Client] = {}
                    for i in voters:
                        per_node[i] = await stack.enter_async_context(
                            open_client(
                                pc.endpoints[pc.ids.index(i)],
                                token=token,
                                cacert=cacert,
                                timeout=30,
                            )
                        )
                    old = str((await c.status())["leader_id"])
                    rest = [i for i in voters if i != old]
                    terms = {i: (await per_node[i].status())["term"] for i in rest}
                    assert set(terms.values()) == {start_term}  # growing cost no election
                    members = await c.member_remove(old)
                    assert sorted(m["id"] for m in members) == rest
                    after = {i: (await per_node[i].status())["term"] for i in rest}
                    assert after == {i: t + 1 for i, t in terms.items()}, (terms, after)
                    new_leader = str((await per_node[rest[0]].status())["leader_id"])
                    assert new_leader in rest
                    shrunk = len(acked)

                    async def writes_go_on() -> bool:  # the three take the load
                        return len(acked) >= shrunk + 100

                    await until(writes_go_on)
                    stop_load.set()

                # Every acknowledged write is on each remaining node, all alike (the
                # removed leader must not have moved anyone's term before it stopped).
                kvs, more = await c.range("k/")
                assert not more and sorted(kv.key for kv in kvs) == sorted(acked)
                rev = (await c.status())["revision"]

                async def level() -> bool:
                    revs = [(await per_node[i].status())["revision"] for i in rest]
                    return revs == [rev] * len(rest)

                await until(level)
                states = []
                for i in rest:
                    got, more = await per_node[i].range("", serializable=True)
                    assert not more
                    states.append([(kv.key, kv.value, kv.mod_revision) for kv in got])
                    status = await per_node[i].status()
                    assert status["term"] == after[i] and status["leader_id"] == new_leader
                assert states[0] == states[1] == states[2]
            # Told by a member that applied its removal, it stopped by itself, exit 0.
            assert await procs[old].wait() == 0
            assert events(logs[old], "node_removed")
        finally:
            for p in procs.values():
                if p.returncode is None:
                    p.kill()
                    await p.wait()
