"""A disk that fills up, for real: three nodes on one small tmpfs (mounted by the test,
which needs root; CI runs as root). The leader refuses puts with ``no_space`` before
SQLite runs out of room, keeps serving reads and deletes, loses no acknowledged write,
and takes puts again by itself once space is freed (docs/operations.md, "A full disk")."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio

from liferaft.client import NoSpace, open_client
from liferaft.node.space import reserve_bytes
from liferaft.testing.localcluster import LocalCluster

MiB = 1024 * 1024
HANG = 120  # a guard against hangs, not a performance claim

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)"
)


def fill(path: Path, size: int) -> None:
    chunk = b"\0" * MiB
    with path.open("wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)
        f.write(b"\0" * (size % MiB))
        f.flush()
        os.fsync(f.fileno())


async def test_a_full_disk_refuses_puts_keeps_reads_and_recovers_by_itself(
    tmp_path: Path, certs: Path
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(disk)]
    await trio.run_process(mount)
    try:
        c = LocalCluster(disk, certs, ["n1", "n2", "n3"], heartbeat_ms=50, election_ms=300)
        async with trio.open_nursery() as nursery:
            await c.start(nursery)
            with trio.fail_after(HANG):
                leader = await c.wait_leader()
                async with open_client(
                    c.endpoints(), token=c.token(), cacert=certs / "ca.pem", timeout=10
                ) as client:
                    await client.put("a", b"1")
                    usage = shutil.disk_usage(disk)
                    reserve = reserve_bytes(usage.total)
                    filler = disk / "filler"
                    # leave 4 MiB above the reserve: a few puts of 64 KiB on three nodes
                    await trio.to_thread.run_sync(fill, filler, usage.free - reserve - 4 * MiB)
                    value = b"v" * (64 * 1024)
                    acked: list[str] = []
                    refused: NoSpace | None = None
                    for i in range(400):
                        try:
                            await client.put(f"k/{i}", value)
                        except NoSpace as exc:
                            refused = exc
                            break
                        acked.append(f"k/{i}")
                    assert refused is not None, "the disk never filled"
                    assert c.nodes[leader].space.raised
                    # nothing broke: every node runs, reads and deletes are served
                    assert all(n.storage_ok for n in c.nodes.values())
                    assert (await client.get("a")).value == b"1"  # type: ignore[union-attr]
                    for key in acked:  # every acknowledged put is there
                        kv = await client.get(key)
                        assert kv is not None and kv.value == value
                    assert await client.delete(acked[0]) == 1
                    with pytest.raises(NoSpace):
                        await client.put("b", b"still full")
                    # space comes back: puts are taken again, without a restart
                    await trio.to_thread.run_sync(filler.unlink)
                    while True:
                        try:
                            await client.put("b", b"room again")
                            break
                        except NoSpace:
                            await trio.sleep(0.05)
                    assert not c.nodes[leader].space.raised
                    assert (await client.get("b")).value == b"room again"  # type: ignore[union-attr]
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.run_process(["umount", "-l", str(disk)], check=False)
