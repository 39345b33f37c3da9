"""``liferaft check`` (testing.nemesis): its checks find what they claim to, its proxies
cut and heal links, and a short run against real processes is clean and reports in the
documented JSON shape (docs/reliability.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from liferaft.testing.linearizability import Op
from liferaft.testing.nemesis import NemesisCluster, Report, TcpProxy, analyze
from liferaft.testing.processes import process_cluster


def report() -> Report:
    return Report(seed=1, seconds=1.0, faults_enabled=[])


def test_a_clean_history_has_no_anomaly() -> None:
    history = [
        Op(0, "put", "k", b"a", 0.0, 1.0),
        Op(1, "get", "k", b"a", 2.0, 3.0),
        Op(1, "put", "k", b"b", 4.0, None),  # unknown outcome, not stored: fine
    ]
    r = report()
    analyze(history, [("k", b"a")], r)
    assert r.ok and not r.lost and not r.duplicates


def test_a_lost_acknowledged_put_is_an_anomaly() -> None:
    r = report()
    analyze([Op(0, "put", "k", b"a", 0.0, 1.0)], [], r)
    assert not r.ok and r.lost == ["k=b'a'"]


def test_a_put_applied_twice_is_an_anomaly() -> None:
    r = report()
    analyze([Op(0, "put", "k", b"a", 0.0, 1.0)], [("k", b"a"), ("k", b"a")], r)
    assert not r.ok and r.duplicates == ["k=b'a'"]


def test_a_value_no_client_put_is_an_anomaly() -> None:
    r = report()
    analyze([], [("k", b"ghost")], r)
    assert not r.ok and "no client put" in r.anomalies[0]


def test_a_stale_read_is_not_linearizable_and_its_key_history_is_shown() -> None:
    history = [
        Op(0, "put", "k", b"a", 0.0, 1.0),
        Op(0, "put", "k", b"b", 2.0, 3.0),
        Op(1, "get", "k", b"a", 4.0, 5.0),  # after b was acknowledged
        Op(2, "put", "other", b"x", 0.0, 1.0),
    ]
    r = report()
    analyze(history, [("k", b"a"), ("k", b"b"), ("other", b"x")], r)
    assert not r.ok and "not linearizable" in r.anomalies[0]
    assert [(o["op"], o["value"]) for o in r.offending] == [
        ("put", "a"),
        ("put", "b"),
        ("get", "a"),
    ]


async def test_a_proxy_forwards_until_cut_and_again_after_heal() -> None:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            async for data in stream:
                await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, echo, 0)
        target = listeners[0].socket.getsockname()[1]
        proxy = TcpProxy(target)
        await nursery.start(proxy.run)
        with trio.fail_after(10):
            conn = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            await conn.send_all(b"ping")
            assert await conn.receive_some(10) == b"ping"
            proxy.cut()  # the live connection breaks...
            with pytest.raises(trio.BrokenResourceError):
                while True:
                    await conn.send_all(b"x")
                    if not await conn.receive_some(10):
                        raise trio.BrokenResourceError
            refused = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            assert await refused.receive_some(10) == b""  # ...and new ones are refused
            proxy.heal()
            again = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            await again.send_all(b"pong")
            assert await again.receive_some(10) == b"pong"
        nursery.cancel_scope.cancel()


async def test_a_node_process_that_ended_by_itself_is_reported_with_its_log(
    tmp_path: Path,
) -> None:
    """The nemesis stops nodes only by kill, removal and at the end: any other exit (a
    crash) is an anomaly, with what the node logged last."""
    cluster = NemesisCluster(tmp_path, heartbeat_ms=50, election_ms=300)
    (tmp_path / "n1.log").write_text('{"msg": "node_started"}\nTraceback: boom\n')
    cluster.procs["n1"] = await trio.lowlevel.open_process(["sh", "-c", "exit 3"])
    cluster.procs["n2"] = await trio.lowlevel.open_process(["sleep", "30"])
    try:
        await cluster.procs["n1"].wait()
        cluster.check_running("n1")
        cluster.check_running("n2")  # still running: nothing to say
    finally:
        cluster.procs["n2"].kill()
        await cluster.procs["n2"].wait()
    assert len(cluster.exits) == 1
    assert cluster.exits[0].startswith("n1 exited 3 by itself") and "boom" in cluster.exits[0]


def test_a_short_check_against_real_processes_is_clean_and_reports_json() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "liferaft", "check", "--seconds", "6", "--seed", "1", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert {"ok", "operations", "faults", "anomalies", "lost"} <= doc.keys()
    assert doc["ok"] is True and doc["anomalies"] == [] and doc["lost"] == []
    assert doc["operations"] > 100 and doc["acked_writes"] > 50
    kinds = {f["fault"] for f in doc["faults"]}
    assert kinds & {"kill", "pause", "partition"}  # faults were injected


def test_a_check_that_removes_and_adds_back_nodes_is_clean() -> None:
    """The member fault: each removed process stops by itself (exit 0; else the check
    reports an anomaly) and comes back on fresh data under its id; no write is lost."""
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "liferaft", "check", "--faults", "member"),
            *("--seconds", "8", "--seed", "3", "-o", "json"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True and doc["anomalies"] == [] and doc["lost"] == []
    kinds = [f["fault"] for f in doc["faults"]]
    assert kinds.count("stopped") >= 1 and kinds.count("add learner") == kinds.count("stopped")
    assert doc["acked_writes"] > 50


def test_an_unknown_fault_is_a_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "liferaft", "check", "--faults", "kill,flood"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "flood" in proc.stderr


def test_a_check_of_a_cluster_the_user_runs_moves_only_leadership(
    tmp_path: Path, certs: Path
) -> None:
    """--endpoints: the check writes under keys of its own, transfers leadership (the
    one fault it can make through the API) and reads back what it wrote."""
    pc = process_cluster(tmp_path, ["n1", "n2", "n3"], certs=certs)
    procs = [
        subprocess.Popen(pc.command(i), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i in pc.ids
    ]
    try:
        token = pc.token(["read", "write", "admin"])
        base = [sys.executable, "-m", "liferaft", "check", "--endpoints", ",".join(pc.endpoints)]
        base += ["--token", token, "--cacert", str(certs / "ca.pem")]
        refused = subprocess.run(
            [*base, "--faults", "kill"], capture_output=True, text=True, timeout=60
        )
        assert refused.returncode == 2 and "transfer" in refused.stderr
        proc = subprocess.run(
            [*base, "--faults", "transfer", "--seconds", "4", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        doc = json.loads(proc.stdout)
        assert doc["ok"] and doc["operations"] > 50
        assert {f["fault"] for f in doc["faults"]} <= {"transfer", "transferred", "transfer failed"}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
