"""Backups and disaster recovery end to end (docs/operations.md, "Backup and restore",
"Losing quorum"): a backup saved from a cluster under write load restores into a new
3-node cluster holding exactly the store as of the backup's revision; the restored
cluster is a new cluster that the old one's nodes cannot talk to; a damaged file is
refused; a lone survivor becomes a new one-member cluster and members are added back."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner

from liferaft.backupfile import TRAILER, BackupError, read_info
from liferaft.cli import cli
from liferaft.client import Client, PermissionDenied, open_client
from liferaft.core import Role
from liferaft.kv.queries import read_applied
from liferaft.node import restore as restore_module
from liferaft.node.restore import RestoreError, recover, restore, tls_probe
from liferaft.testing.localcluster import LocalCluster, wait_until

HANG = 90  # a guard against hangs, not a performance claim
IDS = ["n1", "n2", "n3"]


def _client(c: LocalCluster, certs: Path) -> Any:
    return open_client(c.endpoints(), token=c.token(), cacert=certs / "ca.pem")


def _rows(page: tuple[list[Any], bool]) -> list[tuple[str, bytes, int, int, int]]:
    kvs, more = page
    assert not more
    return [(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version) for kv in kvs]


async def _crash(c: LocalCluster, node_id: str) -> None:
    """Crash a node and wait until its databases are closed (the data dir is free)."""
    node = c.nodes[node_id]
    c.crash(node_id)
    await node.stopped.wait()


async def _write_load(client: Client, acked: dict[str, int], stop: trio.Event) -> None:
    """Puts (and some overwrites and deletes) until ``stop``; bounded in count."""
    for i in range(5000):
        if stop.is_set():
            return
        key = f"k{i % 700:04d}"
        if i % 11 == 10:
            acked[key] = await client.delete(key)
        else:
            acked[key] = await client.put(key, b"v%d" % i)


async def test_a_backup_saved_under_load_restores_into_a_new_cluster_with_every_key(
    tmp_path: Path, certs: Path
) -> None:
    old = LocalCluster(tmp_path / "old", certs, list(IDS))
    backup = tmp_path / "backup.lrb"
    acked: dict[str, int] = {}
    async with trio.open_nursery() as nursery:
        await old.start(nursery)
        with trio.fail_after(HANG):
            await old.wait_leader()
            async with _client(old, certs) as client:
                for i in range(300):
                    await client.put(f"k{i:04d}", b"first")
                before = await client.put("marker", b"before the save")
                stop = trio.Event()
                async with trio.open_nursery() as load:
                    load.start_soon(_write_load, client, acked, stop)
                    await wait_until(lambda: len(acked) >= 50)
                    meta = await client.snapshot_save(backup)  # while the load runs
                    await wait_until(lambda: len(acked) >= 150)
                    stop.set()
                # Every write acknowledged before the save is in it.
                assert meta["revision"] >= before
                assert meta["revision"] < max(acked.values())  # writes went on
                expected = _rows(await client.range("", revision=meta["revision"]))
                assert len(expected) == meta["keys"] > 200  # (the load deletes some)

            info = read_info(backup)
            assert (info.revision, info.keys) == (meta["revision"], meta["keys"])

            new = LocalCluster(tmp_path / "new", certs, list(IDS))
            for i in IDS:
                await trio.to_thread.run_sync(restore, backup, new.settings(i))
            await new.start(nursery)
            await new.wait_leader()
            async with _client(new, certs) as client:
                assert _rows(await client.range("")) == expected
                status = await client.status()
                assert status["revision"] == meta["revision"]
                # It takes writes, at the revisions after the backup's.
                assert await client.put("after", b"restore") == meta["revision"] + 1

            # A new cluster: the old cluster's nodes are refused even when they dial it.
            new_ids = {new.nodes[i].cluster.value for i in IDS}
            old_ids = {old.nodes[i].cluster.value for i in IDS}
            assert len(new_ids) == len(old_ids) == 1 and new_ids != old_ids
            target = new.nodes["n2"].transport
            assert target is not None
            stray = old.nodes["n1"].transport
            assert stray is not None
            stray.set_peers({"n2": ("127.0.0.1", new.ports["n2"][0])})
            await wait_until(lambda: target.rejects["cluster"] >= 1)
        nursery.cancel_scope.cancel()


def test_a_damaged_or_truncated_backup_is_refused_and_nothing_is_written(
    tmp_path: Path, certs: Path
) -> None:
    backup = tmp_path / "backup.lrb"

    async def save() -> None:
        c = LocalCluster(tmp_path / "c", certs, list(IDS))
        async with trio.open_nursery() as nursery:
            await c.start(nursery)
            with trio.fail_after(HANG):
                await c.wait_leader()
                async with _client(c, certs) as client:
                    for i in range(20):
                        await client.put(f"k{i}", b"v" * 100)
                    await client.snapshot_save(backup)
            nursery.cancel_scope.cancel()

    trio.run(save)
    good = backup.read_bytes()
    runner = CliRunner()
    ok = runner.invoke(cli, ["snapshot", "status", str(backup), "-o", "json"])
    assert ok.exit_code == 0 and '"ok": true' in ok.output

    settings = LocalCluster(tmp_path / "r", certs, list(IDS)).settings("n1")
    cases = {
        "flipped": good[:2000] + bytes([good[2000] ^ 1]) + good[2001:],
        "truncated": good[:-100],
        "padded": good + b"\0",
        "no trailer": good[: -TRAILER.size],
    }
    for name, data in cases.items():
        backup.write_bytes(data)
        with pytest.raises(BackupError):
            read_info(backup)
        with pytest.raises(BackupError):
            restore(backup, settings)
        assert not (settings.node.data_dir / "state.db").exists(), name
        out = runner.invoke(cli, ["snapshot", "status", str(backup)])
        assert out.exit_code == 1, (name, out.output)
    # The message says what is wrong.
    backup.write_bytes(cases["flipped"])
    out = runner.invoke(cli, ["snapshot", "status", str(backup)])
    assert "checksum mismatch" in out.output


def test_restore_fills_only_an_empty_data_dir(tmp_path: Path, certs: Path) -> None:
    settings = LocalCluster(tmp_path / "r", certs, list(IDS)).settings("n1")
    settings.node.data_dir.mkdir(parents=True)
    (settings.node.data_dir / "raft.db").write_bytes(b"someone's data")
    backup = tmp_path / "b.lrb"
    backup.write_bytes(b"x" * 100)
    with pytest.raises(BackupError):
        restore(backup, settings)  # the file is checked first
    assert (settings.node.data_dir / "raft.db").read_bytes() == b"someone's data"


async def test_a_lone_survivor_recovers_as_a_new_cluster_and_members_are_added_back(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = LocalCluster(tmp_path, certs, list(IDS))
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            await c.wait_leader()
            async with _client(c, certs) as client:
                revs = [await client.put(f"k{i:03d}", b"v%d" % i) for i in range(200)]
                expected = _rows(await client.range(""))
            # n1 stopped, n2 and n3 still up: the cluster is not lost, recover refuses.
            await _crash(c, "n1")
            s1 = c.settings("n1")
            with pytest.raises(RestoreError, match="quorum"):  # (the loop must run: a thread)
                await trio.to_thread.run_sync(lambda: recover(s1, probe=tls_probe(s1)))
            # Now n2 and n3 are gone for good.
            await _crash(c, "n2")
            await _crash(c, "n3")
            # A recover that fails part way leaves the survivor's data exactly as it was.
            state = tmp_path / "data" / "n1" / "state.db"
            applied_before = read_applied(state)
            real_fsync_dir = restore_module.fsync_dir

            def failing_fsync_dir(path: Path) -> None:
                if path.name.endswith(".recovering"):
                    raise OSError(28, "No space left on device")
                real_fsync_dir(path)

            with monkeypatch.context() as m:
                m.setattr(restore_module, "fsync_dir", failing_fsync_dir)
                with pytest.raises(OSError, match="No space"):
                    await trio.to_thread.run_sync(lambda: recover(s1, probe=tls_probe(s1)))
            assert read_applied(state) == applied_before
            done = await trio.to_thread.run_sync(lambda: recover(s1, probe=tls_probe(s1)))
            assert done.applied >= len(revs) and done.revision == revs[-1]
            assert done.moved_to is not None and (done.moved_to / "raft.db").exists()

            n1 = await c.start_node("n1")
            assert n1.raft is not None
            raft = n1.raft
            await wait_until(lambda: raft.role is Role.LEADER)
            async with open_client(
                [c.endpoints()[0]], token=c.token(), cacert=certs / "ca.pem"
            ) as client:
                assert _rows(await client.range("")) == expected
                assert await client.put("after", b"recovery") == revs[-1] + 1
                # Add n2 back: an empty data dir, join = true, learner, then voter.
                shutil.rmtree(tmp_path / "data" / "n2")
                c.joiners.add("n2")
                n2 = await c.start_node("n2")
                peer, port = f"127.0.0.1:{c.ports['n2'][0]}", c.ports["n2"][1]
                await client.member_add("n2", peer, f"127.0.0.1:{port}", learner=True)
                await wait_until(lambda: n2.applied >= n1.applied)
                await client.member_promote("n2")
                await client.put("two", b"voters")
                await wait_until(lambda: n2.applied >= n1.applied)
            assert n2.kv.db.digest() == n1.kv.db.digest()
            assert n2.cluster.value == n1.cluster.value == done.cluster_id
        nursery.cancel_scope.cancel()


async def test_backups_one_after_another_and_only_for_tokens_of_every_key(
    tmp_path: Path, certs: Path
) -> None:
    c = LocalCluster(tmp_path, certs, ["n1"])
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            await c.wait_leader()
            async with _client(c, certs) as client:
                await client.put("app/x", b"1")
                await client.put("other/y", b"2")
                for i in range(4):  # more than the two a node makes at once, in turn
                    meta = await client.snapshot_save(tmp_path / f"b{i}.lrb")
                    assert meta["keys"] == 2
            snapshots = tmp_path / "data" / "n1" / "snapshots"
            await wait_until(lambda: not any(snapshots.iterdir()))  # went with the connection
            token = c.token("read,write,admin", prefixes=["app/"])
            async with open_client(c.endpoints(), token=token, cacert=certs / "ca.pem") as client:
                with pytest.raises(PermissionDenied):
                    await client.snapshot_save(tmp_path / "denied.lrb")
            assert not (tmp_path / "denied.lrb").exists()
        nursery.cancel_scope.cancel()
