"""The coordination commands (lease, lock, elect) against the fake server: output in text
and JSON, exit codes, a command run under a lock (its exit code, the lock's key and
token in its environment, terminated when the lock is lost), and the commands that run
until Ctrl-C, as processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner, Result
from fakeserver import FIRST_LEASE, TOKEN, FakeCluster, make_certs

from liferaft.cli import cli

CLEAN_ENV: dict[str, str | None] = {
    "LIFERAFT_ENDPOINTS": None,
    "LIFERAFT_CACERT": None,
    "LIFERAFT_TOKEN": None,
}
HANG = 30  # seconds: a guard against hangs, not a performance claim


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli-coord-certs")
    make_certs(d)
    return d


@pytest.fixture
async def cluster(nursery: trio.Nursery, certs: Path) -> FakeCluster:
    return await FakeCluster(certs).start(nursery)


async def run(args: list[str]) -> Result:
    """``liferaft ARGS`` in a worker thread (it runs its own Trio loop)."""
    runner = CliRunner()

    def invoke() -> Result:
        return runner.invoke(cli, args, env=CLEAN_ENV, auto_envvar_prefix="LIFERAFT")

    return await trio.to_thread.run_sync(invoke)


def common(cluster: FakeCluster, certs: Path) -> list[str]:
    return ["--endpoints", cluster["n1"].url, "--cacert", str(certs / "ca.pem"), "--token", TOKEN]


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result.stdout


@asynccontextmanager
async def process(args: list[str]) -> AsyncIterator[trio.Process]:
    """``python -m liferaft ARGS`` as a process with its stdout piped; killed on exit."""
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-m", "liferaft", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
            )
        )
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.kill()


async def read_lines(proc: trio.Process, n: int, buffer: list[bytes]) -> list[str]:
    """Read stdout until it holds ``n`` lines in all (``buffer`` keeps what was read)."""
    assert proc.stdout is not None
    while b"".join(buffer).count(b"\n") < n:
        chunk = await proc.stdout.receive_some()
        if not chunk:
            break
        buffer.append(chunk)
    return b"".join(buffer).decode().splitlines()


async def read_all(stream: trio.abc.ReceiveStream | None) -> str:
    assert stream is not None
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    return data.decode()


# ---------------------------------------------------------------- lease


async def test_lease_commands(cluster: FakeCluster, certs: Path) -> None:
    c = common(cluster, certs)
    st = cluster.store
    assert (
        ok(await run(["lease", "grant", "60", *c]))
        == f"lease {FIRST_LEASE:x} granted with TTL 60s\n"
    )
    doc = json.loads(ok(await run(["lease", "grant", "30", "--id", "0xabc", "-o", "json", *c])))
    assert doc == {"id": 0xABC, "id_hex": "abc", "ttl": 30}
    assert ok(await run(["put", "k", "v", "--lease", "abc", *c])).startswith("OK")
    missing = await run(["put", "k2", "v", "--lease", "def", *c])
    assert missing.exit_code == 1 and "not_found" in missing.stderr
    assert ok(await run(["lease", "list", *c])).split() == ["abc", f"{FIRST_LEASE:x}"]
    assert ok(await run(["lease", "ttl", "abc", "--keys", *c])) == (
        "lease abc granted with TTL 30s, 30s left\nkeys: k\n"
    )
    doc = json.loads(ok(await run(["lease", "ttl", "abc", "-o", "json", *c])))
    assert doc == {"id": 0xABC, "id_hex": "abc", "ttl": 30, "granted_ttl": 30}
    assert ok(await run(["lease", "revoke", "abc", *c])).startswith("lease abc revoked (revision")
    assert "k" not in st.data
    gone = await run(["lease", "ttl", "abc", *c])
    assert gone.exit_code == 1 and "not_found" in gone.stderr
    bad = await run(["lease", "ttl", "xyz", *c])
    assert bad.exit_code == 2 and "lease id" in bad.stderr
    assert (await run(["lease", "grant", "0", *c])).exit_code == 2


async def test_lease_keepalive_until_ctrl_c_or_lost(cluster: FakeCluster, certs: Path) -> None:
    st = cluster.store
    lease = FIRST_LEASE
    # TTL 5: the keeper renews every ~1.7 s and calls the lease lost only after 5 s
    # without a confirmed renewal. With TTL 1 a one-second stall of a loaded CI machine
    # made it give the lease up before the Ctrl-C (exit 1 instead of 0).
    st.write({"op": "lease_grant", "ttl": 5})
    st.write({"op": "lease_grant", "ttl": 5})
    args = ["lease", "keepalive", f"{lease:x}", "-o", "json", *common(cluster, certs)]
    with trio.fail_after(HANG):
        async with process(args) as proc:
            lines = await read_lines(proc, 2, [])
            assert json.loads(lines[0]) == {"id": lease, "id_hex": f"{lease:x}", "ttl": 5}
            proc.send_signal(signal.SIGINT)
            await proc.wait()
        assert proc.returncode == 0
        args[2] = f"{lease + 1:x}"
        async with process(args) as proc:
            await read_lines(proc, 1, [])
            st.expire(lease + 1)
            await proc.wait()
            err = await read_all(proc.stderr)
        assert proc.returncode == 1 and f"lease {lease + 1:x} lost" in err


# ---------------------------------------------------------------- lock


async def test_lock_runs_the_command_and_exits_with_its_code(
    cluster: FakeCluster, certs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "env"
    script = (
        "import os, sys; "
        f"open({str(out)!r}, 'w').write(os.environ['LIFERAFT_LOCK_KEY'] + ' ' "
        "+ os.environ['LIFERAFT_LOCK_TOKEN']); sys.exit(7)"
    )
    result = await run(["lock", "job", *common(cluster, certs), "--", sys.executable, "-c", script])
    assert result.exit_code == 7, result.output
    key, token = out.read_text().split()
    assert key == f"_liferaft/lock/job/{FIRST_LEASE:x}" and int(token) >= 1
    assert cluster.store.data == {} and cluster.store.leases == {}  # released
    again = await run(["lock", "job", *common(cluster, certs), "--", sys.executable, "-c", ""])
    assert again.exit_code == 0
    missing = await run(["lock", "job", *common(cluster, certs), "--", "/nonexistent/cmd"])
    assert missing.exit_code == 2 and "cannot run" in missing.stderr


async def test_lock_lost_terminates_the_command(cluster: FakeCluster, certs: Path) -> None:
    """The lock's lease expires while the command runs: the command is terminated and
    liferaft exits 1, saying the lock was lost."""
    st = cluster.store
    sleeper = [sys.executable, "-c", "import time; print('in', flush=True); time.sleep(60)"]
    args = ["lock", "job", "--ttl", "1", *common(cluster, certs), "--", *sleeper]
    with trio.fail_after(HANG):
        async with process(args) as proc:
            assert await read_lines(proc, 1, []) == ["in"]
            st.expire(next(iter(st.leases)))
            await proc.wait()
            err = await read_all(proc.stderr)
    assert proc.returncode == 1
    assert "lock 'job' lost while the command ran (it was terminated)" in err


async def test_lock_lost_terminates_what_the_command_started_too(
    cluster: FakeCluster, certs: Path, tmp_path: Path
) -> None:
    """A shell command's own children are stopped with it when the lock is lost: they
    would otherwise go on working without the lock."""
    st = cluster.store
    pidfile = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pidfile}; echo in; wait"
    args = ["lock", "job", "--ttl", "1", *common(cluster, certs), "--", "sh", "-c", script]
    with trio.fail_after(HANG):
        async with process(args) as proc:
            assert await read_lines(proc, 1, []) == ["in"]
            child = int(pidfile.read_text())
            st.expire(next(iter(st.leases)))
            await proc.wait()
        assert proc.returncode == 1
        while running(child):  # noqa: ASYNC110 - another process
            await trio.sleep(0.01)


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, not yet reaped, has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# ---------------------------------------------------------------- elect


async def test_elect_and_listen(cluster: FakeCluster, certs: Path) -> None:
    """A listener prints each leader; a campaigner prints its key and proposal when it
    wins, and resigns on Ctrl-C, after which the second campaigner wins."""
    c = common(cluster, certs)
    with trio.fail_after(HANG):
        async with (
            process(["elect", "svc", "--listen", "-o", "json", *c]) as listener,
            process(["elect", "svc", "alpha", *c]) as alpha,
        ):
            alpha_out: list[bytes] = []
            lines = await read_lines(alpha, 2, alpha_out)
            assert lines[0].startswith("_liferaft/elect/svc/") and lines[1] == "alpha"
            async with process(["elect", "svc", "beta", *c]) as beta:
                await cluster.store.until(lambda: len(cluster.store.data) == 2)
                alpha.send_signal(signal.SIGINT)
                await alpha.wait()
                assert alpha.returncode == 0
                assert (await read_lines(beta, 2, []))[1] == "beta"
                seen: list[bytes] = []
                leaders = [
                    json.loads(line)["value"] for line in await read_lines(listener, 2, seen)
                ]
                assert leaders == ["alpha", "beta"]
    usage = await run(["elect", "svc", *c])
    assert usage.exit_code == 2 and "PROPOSAL" in usage.stderr


async def test_lock_without_a_command_holds_until_ctrl_c(cluster: FakeCluster, certs: Path) -> None:
    st = cluster.store
    with trio.fail_after(HANG):
        async with process(["lock", "job", "-o", "json", *common(cluster, certs)]) as proc:
            [line] = await read_lines(proc, 1, [])
            doc = json.loads(line)
            assert doc["key"] in st.data and doc["token"] == st.data[doc["key"]]["create_revision"]
            proc.send_signal(signal.SIGINT)
            await proc.wait()
    assert proc.returncode == 0 and st.data == {} and st.leases == {}  # released
