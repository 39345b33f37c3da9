"""The client commands (README.md) against the fake server: output in text and JSON,
exit codes 0-4, the LIFERAFT_* environment variables. Each command runs in a worker
thread (it starts its own Trio loop) while the fake server runs in the test's loop."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner, Result
from fakeserver import TOKEN, FakeCluster, make_certs, refusing_port

from liferaft.cli import cli

CLEAN_ENV: dict[str, str | None] = {
    "LIFERAFT_ENDPOINTS": None,
    "LIFERAFT_CACERT": None,
    "LIFERAFT_TOKEN": None,
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli-client-certs")
    make_certs(d)
    return d


@pytest.fixture
async def cluster(nursery: trio.Nursery, certs: Path) -> FakeCluster:
    return await FakeCluster(certs).start(nursery)


async def run(
    args: list[str], *, env: dict[str, str] | None = None, input: str | bytes | None = None
) -> Result:
    """``liferaft ARGS`` as the console script runs it (with auto_envvar_prefix)."""
    runner = CliRunner()

    def invoke() -> Result:
        return runner.invoke(
            cli, args, env={**CLEAN_ENV, **(env or {})}, input=input, auto_envvar_prefix="LIFERAFT"
        )

    return await trio.to_thread.run_sync(invoke)


def common(cluster: FakeCluster, certs: Path, *nodes: str) -> list[str]:
    urls = [cluster[n].url for n in nodes] if nodes else cluster.urls[:1]
    return ["--endpoints", ",".join(urls), "--cacert", str(certs / "ca.pem"), "--token", TOKEN]


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result.stdout


# ---------------------------------------------------------------- key-value commands


async def test_put_get_del_text(cluster: FakeCluster, certs: Path, tmp_path: Path) -> None:
    c = common(cluster, certs)
    assert ok(await run(["put", "greeting", "héllo", *c])) == "OK (revision 1)\n"
    blob = tmp_path / "blob"
    blob.write_bytes(b"\xff\x00\x01")
    assert ok(await run(["put", "bin", "--value-file", str(blob), *c])) == "OK (revision 2)\n"
    assert ok(await run(["put", "piped", "--value-file", "-", *c], input=b"\x00ok")).startswith(
        "OK"
    )
    assert cluster.store.data["bin"]["value"] == b"\xff\x00\x01"
    assert ok(await run(["get", "greeting", *c])) == "greeting\nhéllo\n"
    assert ok(await run(["get", "bin", *c])) == "bin\nbase64:/wAB\n"
    assert ok(await run(["get", "nothing", *c])) == ""
    out = ok(await run(["get", "", "--prefix", "--limit", "2", "--serializable", *c]))
    assert out == "bin\nbase64:/wAB\ngreeting\nhéllo\n"
    assert ok(await run(["del", "greeting", *c])) == "1\n"
    assert ok(await run(["del", "", "--prefix", *c])) == "2\n"
    assert cluster.store.data == {}


async def test_put_get_del_json(cluster: FakeCluster, certs: Path) -> None:
    c = [*common(cluster, certs), "-o", "json"]
    assert json.loads(ok(await run(["put", "a/1", "one", *c]))) == {"revision": 1}
    await run(["put", "a/2", "two", *c])
    doc = json.loads(ok(await run(["get", "a/", "--prefix", "--limit", "1", *c])))
    assert doc == {
        "kvs": [
            {
                "key": "a/1",
                "value": "one",
                "value_base64": base64.b64encode(b"one").decode(),
                "create_revision": 1,
                "mod_revision": 1,
                "version": 1,
            }
        ],
        "count": 1,
        "more": True,
    }
    cluster.store.data["a/1"]["value"] = b"\xff"
    doc = json.loads(ok(await run(["get", "a/1", *c])))
    assert doc["kvs"][0]["value"] is None and doc["kvs"][0]["value_base64"] == "/w=="
    assert json.loads(ok(await run(["del", "a/", "--prefix", *c]))) == {"deleted": 2}


async def test_txn(cluster: FakeCluster, certs: Path, tmp_path: Path) -> None:
    c = common(cluster, certs)
    doc = {
        "compare": [{"key": "lock", "target": "version", "result": "==", "value": 0}],
        "success": [
            {"op": "put", "key": "lock", "value": "me"},
            {"op": "put", "key": "raw", "value": {"base64": "AAE="}},
            {"op": "get", "key": "lock"},
        ],
        "failure": [{"op": "get", "key": "lock"}],
    }
    out = ok(await run(["txn", *c], input=json.dumps(doc)))
    assert out == "SUCCESS\n\nOK (revision 1)\n\nOK (revision 1)\n\nlock\nme\n"
    assert cluster.store.data["raw"]["value"] == b"\x00\x01"
    f = tmp_path / "txn.json"
    f.write_text(json.dumps(doc))
    result = json.loads(ok(await run(["txn", "--file", str(f), "-o", "json", *c])))
    assert result["succeeded"] is False and result["revision"] == 1
    assert result["results"][0]["kv"]["value"] == "me"
    # malformed transactions are usage errors
    bad = await run(["txn", *c], input="{not json")
    assert bad.exit_code == 2 and "not JSON" in bad.stderr
    bad = await run(["txn", *c], input=json.dumps({"compare": [], "oops": []}))
    assert bad.exit_code == 2
    bad = await run(["txn", *c], input=json.dumps({"success": [{"op": "fly", "key": "k"}]}))
    assert bad.exit_code == 2 and "invalid_request" in bad.stderr


# ---------------------------------------------------------------- cluster commands


async def test_status(cluster: FakeCluster, certs: Path) -> None:
    c = common(cluster, certs, "n1", "n2")
    out = ok(await run(["status", *c]))
    lines = out.splitlines()
    assert lines[0].split() == [
        "ENDPOINT",
        "ID",
        "ROLE",
        "TERM",
        "LEADER",
        "COMMIT",
        "APPLIED",
        "LAG",
        "REVISION",
        "DB",
        "SIZE",
        "VERSION",
        "ALARMS",
        "LAST",
        "ERROR",
    ]
    assert lines[1].split()[1:4] == ["n1", "leader", "3"]
    assert lines[1].split()[-3:] == ["0.1.0", "none", "none"]
    assert lines[2].split()[1:3] == ["n2", "follower"] and "123.5 kB" in lines[2]
    assert lines[2].split()[7] == "0" and lines[2].split()[-4] == "nospace"  # lag, alarms
    assert lines[2].endswith("tls_reload_refused (90s ago)") or lines[2].endswith("(91s ago)")
    doc = json.loads(ok(await run(["status", "-o", "json", *c])))
    assert [e["status"]["node_id"] for e in doc["endpoints"]] == ["n1", "n2"]


async def test_status_with_one_endpoint_down(cluster: FakeCluster, certs: Path) -> None:
    c = common(cluster, certs)
    async with refusing_port() as port:
        dead = f"wss://127.0.0.1:{port}"
        c[1] += "," + dead
        result = await run(["status", "--timeout", "0.5", *c])
    assert result.exit_code == 1
    assert "n1" in result.stdout and dead in result.stderr


async def test_members_and_transfer(cluster: FakeCluster, certs: Path) -> None:
    c = common(cluster, certs)
    out = ok(await run(["member", "list", *c]))
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["ID", "ROLE", "PEER", "CLIENT"]
    assert rows[1][:3] == ["n1", "voter", "(leader)"] and rows[2][:2] == ["n2", "voter"]
    doc = json.loads(ok(await run(["member", "list", "-o", "json", *c])))
    assert [m["id"] for m in doc["members"]] == ["n1", "n2"]
    args = ["member", "add", "n3", "--peer", "127.0.0.1:7003", "--client", "127.0.0.1:8003"]
    out = ok(await run([*args, "--learner", *c]))
    assert out.startswith("Member n3 added as a learner.") and "learner" in out.splitlines()[-1]
    doc = json.loads(ok(await run(["member", "promote", "n3", "-o", "json", *c])))
    assert doc["members"][-1] == {
        "id": "n3",
        "peer": "127.0.0.1:7003",
        "client": "127.0.0.1:8003",
        "voter": True,
    }
    assert ok(await run(["member", "remove", "n3", *c])).startswith("Member n3 removed.")
    failed = await run(["member", "remove", "n3", *c])
    assert failed.exit_code == 1 and "member_error" in failed.stderr
    assert ok(await run(["transfer-leader", "n2", *c])) == "Leader is now n2.\n"
    assert json.loads(ok(await run(["transfer-leader", "-o", "json", *c]))) == {"leader_id": "n1"}


async def test_watch_streams_until_ctrl_c(cluster: FakeCluster, certs: Path) -> None:
    args = [sys.executable, "-m", "liferaft", "watch", "w/", "--prefix", "-o", "json"]
    env_args = common(cluster, certs)
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(
            partial(trio.run_process, [*args, *env_args], stdout=subprocess.PIPE, check=False)
        )
        assert proc.stdout is not None
        with trio.fail_after(20):
            while not cluster.store.watchers:  # noqa: ASYNC110 - set by another process
                await trio.sleep(0.05)
            cluster.store.write({"op": "put", "key": "w/1", "value": b"v1"})
            cluster.store.write({"op": "delete", "key": "w/1"})
            data = b""
            while data.count(b"\n") < 2:
                data += await proc.stdout.receive_some()
            proc.send_signal(signal.SIGINT)
            await proc.wait()
    events = [json.loads(line) for line in data.splitlines()]
    assert [(e["type"], e["kv"]["key"]) for e in events] == [("put", "w/1"), ("delete", "w/1")]
    assert events[0]["kv"]["value"] == "v1"
    assert proc.returncode == 0


# ---------------------------------------------------------------- configuration, exit codes


async def test_environment_variables(cluster: FakeCluster, certs: Path, tmp_path: Path) -> None:
    env = {
        "LIFERAFT_ENDPOINTS": ",".join(cluster.urls),
        "LIFERAFT_CACERT": str(certs / "ca.pem"),
        "LIFERAFT_TOKEN": TOKEN,
    }
    assert ok(await run(["put", "k", "v"], env=env)) == "OK (revision 1)\n"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env["LIFERAFT_TOKEN"] = "stale-token"  # an explicit --token-file wins over the env
    assert ok(await run(["get", "k", "--token-file", str(token_file)], env=env)) == "k\nv\n"
    bad = await run(["get", "k"], env=env)  # the stale token from the env: 401
    assert bad.exit_code == 3


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["get", "k"], {}, "no token"),
        (["get", "k", "--token", "t", "--endpoints", "http://127.0.0.1:1"], {}, "wss://"),
        (["get", "k", "--token", "t", "--cacert", "/nonexistent/ca.pem"], {}, "no such file"),
        (["get", "k", "--token-file", "/nonexistent/token"], {}, "cannot read"),
        (["put", "k", "--token", "t"], {}, "VALUE or --value-file"),
        (["get", "k", "-o", "yaml", "--token", "t"], {}, "yaml"),
        (["get", "k"], {"LIFERAFT_ENDPOINTS": "ftp://x"}, "wss://"),
    ],
)
async def test_usage_errors_exit_2(args: list[str], env: dict[str, str], needle: str) -> None:
    result = await run(args, env=env)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr


async def test_auth_errors_exit_3(cluster: FakeCluster, certs: Path) -> None:
    c = common(cluster, certs)
    c[c.index("--token") + 1] = "wrong"
    result = await run(["get", "k", *c])
    assert result.exit_code == 3 and "401" in result.stderr
    cluster["n1"].inject("error", code="permission_denied")
    result = await run(["put", "k", "v", *common(cluster, certs)])
    assert result.exit_code == 3 and "permission_denied" in result.stderr


async def test_unavailable_exits_4(cluster: FakeCluster, certs: Path) -> None:
    async with refusing_port() as port:
        result = await run(
            ["get", "k", "--endpoints", f"127.0.0.1:{port}", "--token", TOKEN, "--timeout", "0.5"],
            env={"LIFERAFT_CACERT": str(certs / "ca.pem")},
        )
    assert result.exit_code == 4 and "connect" in result.stderr
    cluster["n1"].inject("unavailable", times=1000)
    result = await run(["put", "k", "v", "--timeout", "0.5", *common(cluster, certs)])
    assert result.exit_code == 4 and "unavailable" in result.stderr


async def test_wrong_ca_exits_2(
    cluster: FakeCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = tmp_path_factory.mktemp("cli-other-ca")
    make_certs(other, ("n1",))
    args: list[Any] = ["get", "k", "--endpoints", cluster["n1"].url, "--token", TOKEN]
    result = await run([*args, "--cacert", str(other / "ca.pem")])
    assert result.exit_code == 2 and "certificate" in result.stderr
