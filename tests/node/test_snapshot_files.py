"""Snapshots as files: a follower behind the leader's log gets a copy of the state
database streamed in chunks, swaps it in, and ends up with the same state; an install
a crash interrupted is finished at the next start."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import pytest
import trio
import trio.testing

from liferaft.client import open_client
from liferaft.kv.commands import encode_command
from liferaft.kv.state import StateDB
from liferaft.node.node import Node
from liferaft.node.state import StateBehind, install_path, open_state
from liferaft.testing.localcluster import LocalCluster, wait_until

HANG = 90  # a guard against hangs, not a performance claim


def _put(i: int, key: str, value: bytes) -> object:
    class E:
        index, kind = i, 0
        data = encode_command({"op": "put", "key": key, "value": value, "time_ms": 1})

    return E()


def timed(node: Node, stage: str) -> float:
    """How many snapshot ``stage``s the node has timed, from its metrics registry."""
    (count,) = (
        s.value
        for family in node.metrics.registry.collect()
        for s in family.samples
        if s.name == "liferaft_snapshot_duration_seconds_count" and s.labels == {"stage": stage}
    )
    return count


async def test_a_follower_behind_the_log_catches_up_from_a_streamed_state_file(
    tmp_path: Path, certs: Path
) -> None:
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"], snapshot_entries=50)
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            lead = await c.wait_leader()
            victim = next(i for i in c.ids if i != lead)
            c.crash(victim)
            async with open_client(
                [c.endpoints()[c.ids.index(lead)]], token=c.token(), cacert=certs / "ca.pem"
            ) as client:
                for i in range(400):  # several compactions: the log no longer has 1..
                    await client.put(f"k{i:03d}", b"v%d" % i)
                leader = c.nodes[lead]
                await wait_until(lambda: leader.snapshot_index > 100)
                node = await c.start_node(victim)
                # More writes while the follower catches up.
                for i in range(400, 450):
                    await client.put(f"k{i:03d}", b"v%d" % i)
                await wait_until(lambda: node.applied >= leader.applied)
                assert leader.sender is not None and leader.sender.sent >= 1
                # Each completed stage was timed (liferaft_snapshot_duration_seconds).
                assert timed(leader, "make") >= leader.sender.sent
                assert timed(leader, "send") >= leader.sender.sent
                assert timed(node, "receive") >= 1 and timed(node, "install") >= 1
                assert node.kv.db.digest() == leader.kv.db.digest()
                kvs, more, _ = node.kv.db.range("k")
                assert len(kvs) == 450 and not more
                # Only the installed state file is left: sent copies and parts are gone.
                left = sorted(p.name for p in (node.kv.data_dir / "snapshots").iterdir())
                assert left == []
                sent = sorted(p.name for p in (leader.kv.data_dir / "snapshots").iterdir())
                assert sent == []
        nursery.cancel_scope.cancel()


def test_a_start_finishes_an_install_that_a_crash_interrupted(tmp_path: Path) -> None:
    data = tmp_path / "n1"
    (data / "snapshots").mkdir(parents=True)
    old = StateDB.open(data / "state.db")
    old.apply([_put(1, "a", b"old")])  # type: ignore[list-item]
    old.close()
    new = StateDB.open(tmp_path / "leader.db")
    new.apply([_put(i, f"k{i}", b"new") for i in range(1, 11)])  # type: ignore[misc]
    new.backup(install_path(data, 7))
    new.close()
    # raft.db says the log starts after a snapshot at 8, from transfer 7: promote it.
    db = open_state(data, snapshot_index=8, transfer=7, history_revisions=100)
    assert db.applied == 10 and db.get("a")[0] is None and db.get("k3")[0] is not None
    db.close()
    assert not install_path(data, 7).exists()


def test_a_state_behind_the_log_without_its_file_refuses_to_start(tmp_path: Path) -> None:
    data = tmp_path / "n1"
    data.mkdir()
    StateDB.open(data / "state.db").close()
    with pytest.raises(StateBehind, match="no snapshot file"):
        open_state(data, snapshot_index=5, transfer=3, history_revisions=100)


def test_a_start_drops_an_install_file_the_log_does_not_need(tmp_path: Path) -> None:
    data = tmp_path / "n1"
    (data / "snapshots").mkdir(parents=True)
    db = StateDB.open(data / "state.db")
    db.apply([_put(i, "a", b"%d" % i) for i in range(1, 6)])  # type: ignore[misc]
    db.backup(install_path(data, 9))
    db.close()
    (data / "snapshots" / "incoming-4.part").write_bytes(b"half")
    db = open_state(data, snapshot_index=3, transfer=None, history_revisions=100)
    assert db.applied == 5
    db.close()
    assert list((data / "snapshots").iterdir()) == []


async def test_an_inline_read_waits_for_an_install_and_then_reads_the_new_state(
    tmp_path: Path,
) -> None:
    """A get runs on the event loop (``read_now``), but never beside an install, which
    closes the database under it: during one it is refused (the caller takes ``read``,
    which waits), and after it sees the installed state."""
    from liferaft.node.state import StateService

    data = tmp_path / "n1"
    data.mkdir()
    state = await StateService.open(data, snapshot_index=0, transfer=None, history_revisions=10)
    try:
        await state.apply([_put(1, "a", b"old")])  # type: ignore[list-item]
        assert state.read_now(lambda db: db.get("a"))[0]["value"] == b"old"  # type: ignore[index]
        other = StateDB.open(tmp_path / "leader.db")
        other.apply([_put(i, "a", b"new") for i in range(1, 4)])  # type: ignore[misc]
        other.backup(install_path(data, 5))
        other.close()
        seen: list[bytes] = []
        hold = threading.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(state._writer.run, hold.wait)  # the writer thread: busy
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(state.install, 5)
            await trio.testing.wait_all_tasks_blocked()  # the install waits for its turn
            with pytest.raises(trio.WouldBlock):
                state.read_now(lambda db: db.get("a"))

            async def read() -> None:
                kv, _ = await state.read(lambda db: db.get("a"))
                seen.append(kv["value"])  # type: ignore[index]

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert seen == []  # held off until the install is done
            hold.set()
        assert seen == [b"new"]
        assert state.read_now(lambda db: db.get("a"))[0]["value"] == b"new"  # type: ignore[index]
    finally:
        await state.close()


async def test_a_stalled_transfer_does_not_hold_the_log_in_memory_past_its_bound(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a snapshot transfer runs, compaction is held at the copy's index so the
    follower can continue from it. A follower that takes the file slowly (a slow link)
    must not make the leader keep every entry since in memory: past HOLD_MAX_BYTES of
    applied data the transfer is abandoned and the log compacted; the follower gets a
    newer copy on the next try and catches up."""
    from liferaft.node import applier
    from liferaft.transport.files import PeerMessage, SnapshotChunk

    monkeypatch.setattr(applier, "COMPACT_BYTES", 64 * 1024)
    monkeypatch.setattr(applier, "HOLD_MAX_BYTES", 256 * 1024, raising=False)
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"], snapshot_entries=50)
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            lead = await c.wait_leader()
            victim = next(i for i in c.ids if i != lead)
            leader, node = c.nodes[lead], c.nodes[victim]
            c.faults.isolate(victim, c.ids)
            async with open_client(
                [c.endpoints()[c.ids.index(lead)]], token=c.token(), cacert=certs / "ca.pem"
            ) as client:
                for i in range(200):
                    await client.put(f"k{i:03d}", b"v%d" % i)
                await wait_until(lambda: leader.snapshot_index > 100)
                transport = leader.transport
                assert transport is not None
                send = transport.send
                slow = True

                async def later(m: PeerMessage) -> None:
                    await trio.sleep(3)  # a slow link: under the sender's stall limit
                    send([m])

                def slow_chunks(msgs: Iterable[PeerMessage]) -> None:
                    now = []
                    for m in msgs:
                        if slow and isinstance(m, SnapshotChunk):
                            nursery.start_soon(later, m)
                        else:
                            now.append(m)
                    send(now)

                transport.send = slow_chunks  # type: ignore[method-assign]  # chunks skip _send_filter
                c.faults.heal()
                sender = leader.sender
                assert sender is not None
                await wait_until(lambda: (sender.hold() or 0) > 0)  # the copy is made
                held_from = sender.hold()
                assert held_from is not None
                value = b"x" * 4096
                for i in range(200):  # 800 KiB applied while the transfer crawls
                    await client.put(f"big{i:03d}", value)
                # the log was compacted past what the transfer held
                assert leader.snapshot_index > held_from
                raft = leader.raft
                assert raft is not None
                assert raft.log.last_index - raft.log.first_index < 200
                slow = False
                await wait_until(lambda: node.applied >= leader.applied)
                assert node.kv.db.digest() == leader.kv.db.digest()
        nursery.cancel_scope.cancel()
