"""The ``liferaft node`` process as an operator runs it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from liferaft.client import open_client
from liferaft.security.tokens import mint
from liferaft.testing.localcluster import free_ports, write_config
from liferaft.testing.processes import process_cluster

HANG = 60  # a guard against hangs, not a performance claim


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@dataclass
class OneNode:
    proc: trio.Process
    client: int  # ports
    metrics: int
    stderr: bytes = b""  # once it has stopped

    def events(self) -> list[dict[str, Any]]:
        lines = self.stderr.decode().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


@asynccontextmanager
async def one_node(tmp_path: Path, certs: Path, extra_config: str = "") -> AsyncIterator[OneNode]:
    """A one-node ``liferaft node`` process, ready (``/readyz``) when the block starts;
    stopped with SIGTERM after it, which must exit 0. Its stderr is then in ``stderr``."""
    peer, client, metrics = free_ports(3)
    cfg = write_config(
        tmp_path / "n1.toml", "n1", {"n1": (peer, client, metrics)}, certs, tmp_path / "data"
    )
    cfg.write_text(cfg.read_text() + extra_config)
    with trio.fail_after(HANG):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "liferaft", "node", "--config", str(cfg)],
            stderr=subprocess.PIPE,
        )
        node = OneNode(proc, client, metrics)
        try:
            while True:  # a single node elects itself; poll until it says so
                try:
                    if (await http_get(metrics, "/readyz"))[0] == 200:
                        break
                except OSError:
                    pass  # not listening yet
                await trio.sleep(0.05)
            yield node
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.stderr is not None
        while chunk := await proc.stderr.receive_some(1 << 16):
            node.stderr += chunk


async def test_node_process_serves_healthz_and_exits_0_on_sigterm(
    tmp_path: Path, certs: Path
) -> None:
    async with one_node(tmp_path, certs) as node:
        assert (await http_get(node.metrics, "/healthz"))[0] == 200
        status, body = await http_get(node.metrics, "/metrics")
        assert status == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }
        assert samples[("liferaft_server_is_leader", ())] == 1
        assert samples[("liferaft_server_has_leader", ())] == 1
        assert samples[("liferaft_server_term", ())] >= 1
    assert any(e["msg"] == "leader_changed" and e["node"] == "n1" for e in node.events())


async def test_the_log_level_from_the_config_silences_lower_records(
    tmp_path: Path, certs: Path
) -> None:
    """``[log] level = "warning"``: the node runs and stops as usual, and none of its
    info records (node_started, leader_changed, stopping) reach stderr."""
    async with one_node(tmp_path, certs, '\n[log]\nlevel = "warning"\n') as node:
        pass
    assert [e for e in node.events() if e["level"] in ("debug", "info")] == []


def test_a_bad_config_exits_2_naming_the_key(tmp_path: Path, certs: Path) -> None:
    cfg = write_config(
        tmp_path / "n1.toml", "n1", {"n1": (7001, 8001, 9001)}, certs, tmp_path / "data"
    )
    cfg.write_text(cfg.read_text().replace('listen = "127.0.0.1:7001"', 'listen = "nowhere"'))
    proc = subprocess.run(
        [sys.executable, "-m", "liferaft", "node", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert proc.returncode == 2
    assert "peer.listen" in proc.stderr and str(cfg) in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing started


def test_a_damaged_database_exits_1_saying_what_is_wrong(tmp_path: Path, certs: Path) -> None:
    peer, client, metrics = free_ports(3)
    cfg = write_config(
        tmp_path / "n1.toml", "n1", {"n1": (peer, client, metrics)}, certs, tmp_path / "data"
    )
    (tmp_path / "data").mkdir(mode=0o700)
    (tmp_path / "data" / "raft.db").write_bytes(b"this is not a database" * 100)
    proc = subprocess.run(
        [sys.executable, "-m", "liferaft", "node", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert proc.returncode == 1
    assert "fatal_storage_error" in proc.stderr and "not a database" in proc.stderr


async def test_kill_9_of_the_leader_under_load_loses_no_acknowledged_write(
    tmp_path: Path, certs: Path
) -> None:
    """Three real processes; writers keep writing through the client library while the
    leader is killed with SIGKILL and started again on the same data directory."""
    pc = process_cluster(tmp_path, ["n1", "n2", "n3"], certs=certs)
    endpoints = pc.endpoints
    token = mint(
        (certs / "jwt-private.pem").read_bytes(), sub="t", roles=["write"], now=time.time()
    )
    procs: dict[str, trio.Process] = {}

    async def start(i: str) -> None:
        procs[i] = await trio.lowlevel.open_process(pc.command(i), stderr=subprocess.DEVNULL)

    with trio.fail_after(HANG):
        for i in pc.ids:
            await start(i)
        try:
            async with open_client(
                endpoints, token=token, cacert=certs / "ca.pem", timeout=30
            ) as c:
                acked: list[str] = []
                half = trio.Event()

                async def writer(w: int) -> None:
                    for n in range(40):
                        key = f"k/{w}/{n}"
                        await c.put(key, key)
                        acked.append(key)
                        if len(acked) == 200:
                            half.set()

                async def killer() -> None:
                    await half.wait()
                    leader = str((await c.status())["leader_id"])
                    procs[leader].kill()  # SIGKILL: no goodbye, mid-batch
                    await procs[leader].wait()
                    await start(leader)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(killer)
                    for w in range(10):
                        nursery.start_soon(writer, w)
                kvs, more = await c.range("k/")
                assert not more and sorted(kv.key for kv in kvs) == sorted(acked)
                assert len(acked) == 400 and all(kv.version == 1 for kv in kvs)
        finally:
            for p in procs.values():
                if p.returncode is None:
                    p.kill()
                    await p.wait()


async def test_a_paused_leader_is_replaced_and_steps_down_when_it_resumes(
    tmp_path: Path, certs: Path
) -> None:
    """SIGSTOP the leader: the others elect a new one and keep taking writes; after
    SIGCONT the old leader learns the new term and follows. No acknowledged write lost."""
    pc = process_cluster(tmp_path, ["n1", "n2", "n3"], certs=certs)
    members = pc.members
    procs: dict[str, trio.Process] = {}
    endpoints = pc.endpoints
    token = mint(
        (certs / "jwt-private.pem").read_bytes(), sub="t", roles=["write"], now=time.time()
    )
    with trio.fail_after(HANG):
        try:
            for i in pc.ids:
                procs[i] = await trio.lowlevel.open_process(
                    pc.command(i), stderr=subprocess.DEVNULL
                )
            async with open_client(
                endpoints, token=token, cacert=certs / "ca.pem", timeout=30
            ) as c:
                for n in range(20):
                    await c.put(f"before/{n}", "x")
                old = str((await c.status())["leader_id"])
                procs[old].send_signal(signal.SIGSTOP)
                for n in range(20):  # the client finds the new leader by itself
                    await c.put(f"during/{n}", "x")
                new = str((await c.status())["leader_id"])
                assert new != old
                procs[old].send_signal(signal.SIGCONT)
                metrics_port = members[old][2]
                # The resumed node hears the new term and follows the new leader.
                while True:
                    _, body = await http_get(metrics_port, "/metrics")
                    if b"liferaft_server_is_leader 0.0" in body:
                        break
                    await trio.sleep(0.05)
                kvs, _ = await c.range("")
                assert len(kvs) == 40
        finally:
            for p in procs.values():
                if p.returncode is None:
                    p.send_signal(signal.SIGCONT)
                    p.kill()
                    await p.wait()


async def test_audit_records_go_to_their_file_and_follow_it_after_sighup(
    tmp_path: Path, certs: Path
) -> None:
    """``[audit] file``: audit records are JSON lines in that file (not on stderr), even
    with the log at warning; after logrotate moves the file and sends SIGHUP, new
    records go to a new file at the path."""
    audit, rotated = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    token = mint(
        (certs / "jwt-private.pem").read_bytes(), sub="auditor", roles=["write"], now=time.time()
    )
    extra = '\n[log]\nlevel = "warning"\n\n[audit]\nfile = "audit.jsonl"\n'
    async with one_node(tmp_path, certs, extra) as node:
        url = f"wss://127.0.0.1:{node.client}/v1"
        async with open_client([url], token=token, cacert=certs / "ca.pem") as c:
            await c.put("before", b"1")
            await wait_for_lines(audit, "before")
            audit.rename(rotated)  # what logrotate does, then it signals the node
            node.proc.send_signal(signal.SIGHUP)
            while not audit.exists():  # noqa: ASYNC110 - the node makes it anew
                await trio.sleep(0.02)
            await c.put("after", b"2")
            await wait_for_lines(audit, "after")
    old = [json.loads(line) for line in rotated.read_text().splitlines()]
    new = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["msg"], r["subject"], r["op"], audited_keys(r)) for r in old] == [
        ("audit", "auditor", "put", ["before"])
    ]
    assert [(r["op"], audited_keys(r), r["result"]) for r in new] == [("put", ["after"], "ok")]
    assert audit.stat().st_mode & 0o077 == 0  # private: it names keys
    assert b'"audit"' not in node.stderr  # not on stderr


def audited_keys(record: dict[str, object]) -> list[object]:
    """A record names one key (``key``) or, for a batch of writes, several (``keys``)."""
    keys = record.get("keys")
    return list(keys) if isinstance(keys, list) else [record.get("key")]


def has_record(path: Path, key: str) -> bool:
    if not path.exists():
        return False
    return any(key in audited_keys(json.loads(line)) for line in path.read_text().splitlines())


async def wait_for_lines(path: Path, key: str) -> None:
    """Audit records are written when the answer leaves; poll for this one's."""
    while not has_record(path, key):  # noqa: ASYNC110 - a file, no event to wait on
        await trio.sleep(0.02)
