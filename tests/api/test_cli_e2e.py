"""The ``liferaft`` client commands end to end against a real cluster (README.md)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio
from test_protocol import cluster

from liferaft.testing.localcluster import LocalCluster, free_ports


async def cli(
    c: LocalCluster,
    *args: str,
    token: str | None = None,
    stdin: bytes = b"",
    endpoints: str | None = None,
) -> tuple[int, str, str]:
    env = dict(os.environ)
    env["LIFERAFT_ENDPOINTS"] = endpoints or ",".join(c.endpoints())
    env["LIFERAFT_CACERT"] = str(c.certs / "ca.pem")
    env["LIFERAFT_TOKEN"] = token or c.token()
    proc = await trio.run_process(
        [sys.executable, "-m", "liferaft", *args],
        stdin=stdin,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env,
    )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


async def test_put_get_delete_and_txn_with_json_output(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c:
        code, out, err = await cli(c, "put", "greeting", "hello")
        assert code == 0, err
        code, out, _ = await cli(c, "get", "greeting", "-o", "json")
        assert code == 0
        doc = json.loads(out)
        text = json.dumps(doc)
        assert "hello" in text and "greeting" in text
        txn = {
            "compare": [{"key": "lock", "target": "version", "result": "==", "value": 0}],
            "success": [{"op": "put", "key": "lock", "value": "me"}],
            "failure": [],
        }
        code, out, err = await cli(c, "txn", "-o", "json", stdin=json.dumps(txn).encode())
        assert code == 0, err
        assert json.loads(out)["succeeded"] is True
        code, out, err = await cli(c, "del", "greeting", "-o", "json")
        assert code == 0, err
        code, out, _ = await cli(c, "get", "greeting", "-o", "json")
        assert code == 0 and "hello" not in out


async def test_status_and_member_list_show_every_node(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c:
        code, out, err = await cli(c, "status")
        assert code == 0, err
        assert all(i in out for i in c.ids) and "leader" in out
        code, out, err = await cli(c, "member", "list", "-o", "json")
        assert code == 0, err
        assert {m["id"] for m in json.loads(out)["members"]} == set(c.ids)


async def test_exit_codes(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c:
        code, _, _ = await cli(c, "put", "k", "v", token=c.token("read"))
        assert code == 3  # permission denied
        code, _, _ = await cli(c, "get", "k", token="not-a-token")
        assert code == 3  # unauthenticated
        (dead,) = free_ports(1)
        code, _, _ = await cli(c, "get", "k", "--timeout", "2", endpoints=f"wss://127.0.0.1:{dead}")
        assert code == 4  # nobody answers
        code, _, _ = await cli(c, "put", "only-a-key")
        assert code == 2  # usage


async def test_get_at_a_revision_pages_with_after_and_compact(tmp_path: Path, certs: Path) -> None:
    async with cluster(tmp_path, certs) as c:
        for value in ("one", "two"):
            code, _, err = await cli(c, "put", "k", value)
            assert code == 0, err
        code, out, err = await cli(c, "get", "k", "--rev", "1", "-o", "json")
        assert code == 0, err
        assert "one" in out and "two" not in out
        for key in ("p/a", "p/b", "p/c"):
            assert (await cli(c, "put", key, "x"))[0] == 0
        code, out, err = await cli(c, "get", "p/", "--prefix", "--after", "p/a", "-o", "json")
        assert code == 0, err
        assert [kv["key"] for kv in json.loads(out)["kvs"]] == ["p/b", "p/c"]
        code, out, err = await cli(c, "compact", "2")
        assert code == 0, err
        code, _, err = await cli(c, "get", "k", "--rev", "1")
        assert code == 1 and "compacted" in err
        code, _, _ = await cli(c, "compact", "3", token=c.token("read,write"))
        assert code == 3  # compaction needs the admin role


async def test_endpoint_health_passes_only_when_every_endpoint_reads(
    tmp_path: Path, certs: Path
) -> None:
    async with cluster(tmp_path, certs) as c:
        code, out, err = await cli(c, "endpoint", "health", "-o", "json")
        assert code == 0, err
        rows = json.loads(out)["endpoints"]
        assert [r["health"] for r in rows] == [True, True, True]
        # a node cut off from the others cannot confirm a read: that endpoint fails
        lonely = c.ids[0] if c.leader() != c.ids[0] else c.ids[1]
        c.faults.isolate(lonely, c.ids)
        code, out, _ = await cli(c, "endpoint", "health", "--timeout", "2")
        assert code == 1
        line = next(line for line in out.splitlines() if c.endpoints()[c.ids.index(lonely)] in line)
        assert "false" in line
        assert sum(" true " in f" {line} " for line in out.splitlines()) == 2
