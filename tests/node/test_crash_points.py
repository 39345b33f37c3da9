"""``kill -9`` of real ``liferaft node`` processes at the instants that matter
(``liferaft.crashpoint``): half-way through applying a batch to ``state.db``, while the
leader copies the state for a follower, while a follower receives a snapshot file, and
between the follower's raft.db recording a snapshot and its state.db being replaced.

Every test ends the same way: the nodes are stopped cleanly (SIGTERM, exit 0) and each
node's ``state.db`` and ``raft.db`` are read from disk. All replicas must hold the same
``applied`` index and the same ``digest()``, every key written (each exactly once, and
each acknowledged) must be there with its value at version 1, the store revision must
equal the number of keys (no command applied twice), and ``applied`` must not be behind
the commit index raft.db recorded.

The processes log JSON lines; each run's stderr is kept in ``<tmp>/logs/<id>-<run>.log``
so the tests can check what a node did (``snapshot_sent``, ``snapshot_installed``) and a
failure can be read afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from liferaft.client import open_client
from liferaft.client.client import Client
from liferaft.core import EntryKind
from liferaft.kv.commands import decode_entry
from liferaft.kv.state import StateDB, read_applied
from liferaft.node import transfer
from liferaft.node.state import install_path
from liferaft.node.transfer import CHUNK_BYTES
from liferaft.security.tokens import mint
from liferaft.storage.sqlite import Storage
from liferaft.testing.localcluster import wait_until
from liferaft.testing.processes import ProcessCluster, process_cluster

HANG = 60  # a guard against hangs, not a performance claim
IDS = ["n1", "n2", "n3"]
POLL = 0.05


# ---------------------------------------------------------------- the cluster


@dataclass
class Nodes:
    """Three ``liferaft node`` processes on loopback, started and stopped one by one."""

    base: Path
    pc: ProcessCluster
    token: str
    procs: dict[str, trio.Process] = field(default_factory=dict)
    runs: Counter[str] = field(default_factory=Counter)

    @classmethod
    def layout(cls, base: Path, certs: Path, *, snapshot_entries: int) -> Nodes:
        """The cluster's config files, with ``snapshot_entries``."""
        pc = process_cluster(base, list(IDS), certs=certs, snapshot_entries=snapshot_entries)
        (base / "logs").mkdir()
        token = mint(
            (certs / "jwt-private.pem").read_bytes(),
            sub="crash-tests",
            roles=["read", "write", "admin"],
            now=time.time(),
        )
        return cls(base, pc, token)

    def data_dir(self, i: str) -> Path:
        return self.base / "data" / i

    def endpoint(self, i: str) -> str:
        return self.pc.endpoints[IDS.index(i)]

    def running(self) -> list[str]:
        return [i for i, p in self.procs.items() if p.returncode is None]

    async def start(self, i: str, crash: str | None = None) -> None:
        """Start node ``i``; ``crash`` (``<point>:<n>``) arms a crash point, else none is."""
        assert i not in self.running()
        env = {k: v for k, v in os.environ.items() if k != "LIFERAFT_CRASHPOINT"}
        if crash is not None:
            env["LIFERAFT_CRASHPOINT"] = crash
        self.runs[i] += 1
        log = self.base / "logs" / f"{i}-{self.runs[i]}.log"
        with open(log, "wb") as err:  # noqa: ASYNC230 - a local file, once per start
            self.procs[i] = await trio.lowlevel.open_process(
                self.pc.command(i), stdout=subprocess.DEVNULL, stderr=err, env=env
            )

    async def stop(self, i: str) -> None:
        """SIGTERM: a clean stop, which must exit 0."""
        p = self.procs[i]
        p.send_signal(signal.SIGTERM)
        assert await p.wait() == 0, f"{i} did not stop cleanly"

    async def stop_all(self, leader: str | None = None) -> None:
        """Followers first, so that no new leader is elected (and commits a no-op)
        while the others go."""
        for i in sorted(self.running(), key=lambda n: n == leader):
            await self.stop(i)

    async def kill_all(self) -> None:
        for p in self.procs.values():
            if p.returncode is None:
                p.kill()
                await p.wait()

    def events(self, i: str, msg: str, run: int | None = None) -> list[dict[str, Any]]:
        """The log events named ``msg`` of node ``i`` (of one run, or of all)."""
        out = []
        runs = [run] if run is not None else range(1, self.runs[i] + 1)
        for r in runs:
            text = (self.base / "logs" / f"{i}-{r}.log").read_text(errors="replace")
            for line in text.splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(json.JSONDecodeError):
                        e = json.loads(line)
                        if e.get("msg") == msg:
                            out.append(e)
        return out

    # ------------------------------------------------------------ talking to it

    def client(self, ids: list[str] | None = None, timeout: float = 30) -> Any:
        eps = [self.endpoint(i) for i in (ids or IDS)]
        return open_client(eps, token=self.token, cacert=self.pc.certs / "ca.pem", timeout=timeout)

    async def status(self, i: str) -> dict[str, Any] | None:
        """Node ``i``'s own view (None if it does not answer yet)."""
        try:
            async with self.client([i], timeout=2) as c:
                return await c.status()
        except Exception:  # starting, or busy electing: ask again
            return None

    async def wait_answering(self, i: str) -> None:
        while True:
            if await self.status(i) is not None:
                return
            await trio.sleep(POLL)

    async def statuses(self, ids: list[str]) -> dict[str, dict[str, Any]] | None:
        out = {}
        for i in ids:
            st = await self.status(i)
            if st is None:
                return None
            out[i] = st
        return out

    async def wait_leader(self, ids: list[str] | None = None) -> str:
        """The leader every node of ``ids`` (default: the running ones) agrees on."""
        while True:
            sts = await self.statuses(ids or self.running())
            if sts:
                leaders = {st["leader_id"] for st in sts.values()}
                (lead,) = leaders if len(leaders) == 1 else (None,)
                if lead is not None and lead in sts and sts[lead]["role"] == "leader":
                    return str(lead)
            await trio.sleep(POLL)

    async def make_leader(self, want: str) -> None:
        """Hand leadership to ``want`` (if it does not lead already)."""
        while (lead := await self.wait_leader()) != want:
            async with self.client([lead]) as c:
                with contextlib.suppress(Exception):  # moved meanwhile: look again
                    await c.transfer_leader(want)

    async def wait_converged(self, ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Until every node agrees on the leader and has applied all it knows committed,
        the same index on each."""
        ids = ids or list(IDS)
        while True:
            sts = await self.statuses(ids)
            if sts is not None:
                applied = {st["applied_index"] for st in sts.values()}
                commits = {st["commit_index"] for st in sts.values()}
                leaders = {st["leader_id"] for st in sts.values()}
                agreed = len(leaders) == 1 and None not in leaders
                if agreed and len(applied) == 1 and applied == commits:
                    return sts
            await trio.sleep(POLL)


async def write_keys(
    c: Client,
    keys: list[str],
    value: Callable[[str], bytes],
    acked: dict[str, bytes],
    *,
    writers: int = 16,
) -> None:
    """Put each key once, ``writers`` at a time; ``acked`` gets each answered put."""

    async def writer(mine: list[str]) -> None:
        for k in mine:
            v = value(k)
            await c.put(k, v)
            acked[k] = v

    async with trio.open_nursery() as nursery:
        for w in range(writers):
            nursery.start_soon(writer, keys[w::writers])


def small_value(key: str) -> bytes:
    return f"value-of-{key}".encode()


def big_value(key: str) -> bytes:
    """2 KiB derived from the key."""
    return (hashlib.sha256(key.encode()).hexdigest() * 32).encode()


# ---------------------------------------------------------------- reading the disks


@dataclass(frozen=True)
class RaftDisk:
    commit: int
    snapshot_index: int
    transfer: int | None  # the transfer the snapshot came with, if installed from one
    last_index: int
    put_entries: int  # client puts in the log (a retried put is in it again)


def read_raft(data_dir: Path) -> RaftDisk:
    """What a stopped node's raft.db holds."""
    storage = Storage.open(data_dir)
    try:
        r = storage.load()
    finally:
        storage.close()
    snap_index = r.snapshot.meta.index if r.snapshot is not None else 0
    about = transfer.parse(r.snapshot.data) if r.snapshot is not None else {}
    last = r.entries[-1].index if r.entries else snap_index
    puts = sum(
        1
        for e in r.entries
        if e.kind is EntryKind.NORMAL
        for cmd in decode_entry(e.data)[1]
        if cmd["op"] == "put"
    )
    return RaftDisk(r.hard_state.commit, snap_index, about.get("transfer"), last, puts)


def live_snapshot_index(data_dir: Path) -> int:
    """The snapshot index in a running node's raft.db (a read-only look, as WAL allows)."""
    uri = f"file:{data_dir / 'raft.db'}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            row = conn.execute("SELECT idx FROM snapshot WHERE id = 0").fetchone()
    except sqlite3.OperationalError:  # busy for a moment: the caller polls again
        return 0
    return int(row[0]) if row else 0


def snapshot_files(data_dir: Path) -> list[str]:
    d = data_dir / "snapshots"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def check_stopped_cluster(nodes: Nodes, expected: dict[str, bytes]) -> tuple[int, str]:
    """The end state every test requires, read from the disks of the stopped nodes;
    returns the common applied index and digest."""
    assert not nodes.running()
    seen: dict[str, tuple[int, str]] = {}
    for i in IDS:
        d = nodes.data_dir(i)
        raft = read_raft(d)
        db = StateDB.open(d / "state.db")
        try:
            applied, digest = db.applied, db.digest()
            kvs, more, revision = db.range("")
        finally:
            db.close()
        assert not more
        got = {kv["key"]: kv["value"] for kv in kvs}
        missing = sorted(expected.keys() - got.keys())
        assert not missing, f"{i} lost acknowledged keys: {missing[:10]} ({len(missing)})"
        assert got == expected, f"{i}: unexpected keys or values"
        twice = [kv["key"] for kv in kvs if kv["version"] != 1]
        assert not twice, f"{i}: keys written more than once: {twice[:10]}"
        assert revision == len(expected), f"{i}: revision {revision} for {len(expected)} puts"
        assert applied >= raft.commit, f"{i}: applied {applied} behind raft.db commit"
        # No half-received file, no copy made for sending and no received file the
        # core had no use for (``install-<id>.db``) survives a clean stop.
        left = snapshot_files(d)
        assert left == [], f"{i}: leftover snapshot files {left}"
        seen[i] = (applied, digest)
    assert len(set(seen.values())) == 1, f"replicas differ: {seen}"
    return seen[IDS[0]]


async def leave_a_follower_behind(
    nodes: Nodes,
    keys: list[str],
    value: Callable[[str], bytes],
    acked: dict[str, bytes],
    *,
    crash: str | None = None,
) -> tuple[str, str, str, int]:
    """Start the cluster, stop a follower F, write ``keys`` through the other two until
    both have compacted their logs past F's last entry, then restart the leader L (with
    ``crash`` armed, if given). Returns L, F, the third node M and F's last log index.

    Why the restart: while F is down, L goes on sending it appends, which L's transport
    queues for it; delivered when F is back, they would let F catch up without any
    snapshot. A restarted node has no such queue and starts F's replication afresh from
    its own log, which no longer holds F's next entry: F must get a snapshot."""
    for i in IDS:
        await nodes.start(i)
    lead = await nodes.wait_leader()
    f, m = (i for i in IDS if i != lead)
    await nodes.stop(f)
    f_last = read_raft(nodes.data_dir(f)).last_index
    async with nodes.client([lead, m]) as c:
        # Two writers: a message's writes are one log entry, and the log must grow
        # past ``snapshot_entries`` entries (not writes) for the leader to compact.
        await write_keys(c, keys, value, acked, writers=2)
    await wait_until(
        lambda: min(live_snapshot_index(nodes.data_dir(i)) for i in (lead, m)) > f_last, POLL
    )
    await nodes.stop(lead)
    await nodes.start(lead, crash=crash)
    await nodes.wait_leader()
    return lead, f, m, f_last


# ---------------------------------------------------------------- 1. apply


@pytest.mark.parametrize("role", ["leader", "follower"])
@pytest.mark.parametrize("point", ["apply_before_commit", "apply_after_commit"])
async def test_kill_9_while_applying_loses_and_repeats_nothing(
    tmp_path: Path, certs: Path, point: str, role: str
) -> None:
    """n1 is armed to die on its 5th apply transaction (before or after its COMMIT)
    and made the leader or a follower (by a leadership transfer) before a client
    writes 300 distinct keys; it dies mid-load, is restarted unarmed, and the writes
    finish. Killing the leader after its COMMIT leaves the client without an answer for
    a write that is applied: its retry (same session and seq) must not apply it again."""
    nodes = Nodes.layout(tmp_path, certs, snapshot_entries=10000)
    armed = "n1"
    keys = [f"k/{n:04d}" for n in range(300)]
    acked: dict[str, bytes] = {}
    death: dict[str, int] = {}
    try:
        with trio.fail_after(HANG):
            for i in IDS:
                await nodes.start(i, crash=f"{point}:5" if i == armed else None)
            if role == "leader":
                await nodes.make_leader(armed)
            elif await nodes.wait_leader() == armed:
                await nodes.make_leader("n2")
            async with nodes.client() as c:

                async def restart_when_dead() -> None:
                    death["rc"] = await nodes.procs[armed].wait()
                    death["acked"] = len(acked)
                    await nodes.start(armed)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(restart_when_dead)
                    await write_keys(c, keys, small_value, acked)
            sts = await nodes.wait_converged()
            leader = next(iter(sts.values()))["leader_id"]
            await nodes.stop_all(leader)
        applied, digest = check_stopped_cluster(nodes, {k: small_value(k) for k in keys})
        puts = read_raft(nodes.data_dir("n2")).put_entries
    finally:
        await nodes.kill_all()
    seen = nodes.events(armed, "leader_changed", run=1)[-1]["leader"]  # as it died
    print(
        f"{point} {role}: leader seen by {armed} when it died={seen} rc={death['rc']} "
        f"acked at death={death['acked']} put entries in the log={puts} "
        f"applied={applied} digest={digest}"
    )
    assert death["rc"] == -signal.SIGKILL
    assert death["acked"] < len(keys)  # it died while the load ran
    assert (seen == armed) == (role == "leader") and seen is not None
    assert len(acked) == len(keys)


# ---------------------------------------------------------------- 2. snapshot copy


async def test_kill_9_of_the_leader_copying_a_snapshot_then_the_next_leader_sends_one(
    tmp_path: Path, certs: Path
) -> None:
    """The leader dies right after making the state copy for a follower behind its log.

    Arming: which node leads is not known in advance, so the crash point is armed by a
    restart: once follower F is down and the other two have compacted past F's log,
    the leader L is stopped (SIGTERM) and started again with ``snapshot_copy:1``; if
    the other node M wins the election meanwhile, leadership is handed back to L. Only
    a leader sending a snapshot passes the point, and nothing needs a snapshot before F
    comes back, so L is the one to die, at its first copy. F is started unarmed, L
    makes a copy for it and dies; M (never armed) is elected and streams its own copy;
    L is restarted unarmed; all three converge."""
    nodes = Nodes.layout(tmp_path, certs, snapshot_entries=50)
    keys = [f"k/{n:04d}" for n in range(300)]
    acked: dict[str, bytes] = {}
    try:
        with trio.fail_after(HANG):
            lead, f, m, f_last = await leave_a_follower_behind(
                nodes, keys, small_value, acked, crash="snapshot_copy:1"
            )
            await nodes.make_leader(lead)
            await nodes.start(f)  # unarmed
            rc = await nodes.procs[lead].wait()
            copies = snapshot_files(nodes.data_dir(lead))
            assert await nodes.wait_leader([m, f]) == m
            await nodes.wait_converged([m, f])
            await nodes.start(lead)  # unarmed
            await nodes.wait_converged()
            await nodes.stop_all(m)
        applied, digest = check_stopped_cluster(nodes, acked)
    finally:
        await nodes.kill_all()
    print(
        f"snapshot_copy: leader {lead} rc={rc} copies left={copies} F={f} "
        f"f_last={f_last} applied={applied} digest={digest}"
    )
    assert rc == -signal.SIGKILL
    assert len(acked) == len(keys)
    assert [c for c in copies if c.startswith(f"send-{f}-")], copies  # died after copying
    assert not nodes.events(lead, "snapshot_send_started", run=2)  # ...before sending
    sent = [e for e in nodes.events(m, "snapshot_sent") if e.get("peer") == f]
    assert sent, f"{m} never sent {f} a snapshot"
    assert nodes.events(f, "snapshot_installed")


# ---------------------------------------------------------------- 3. receiving


@pytest.mark.parametrize(
    ("crash", "n_keys", "value"),
    [
        ("snapshot_chunk:2", 1500, big_value),  # a file of several 512 KiB chunks
        ("snapshot_before_swap:1", 300, small_value),
    ],
    ids=["snapshot_chunk", "snapshot_before_swap"],
)
async def test_kill_9_of_a_follower_receiving_a_snapshot_then_it_catches_up(
    tmp_path: Path,
    certs: Path,
    crash: str,
    n_keys: int,
    value: Callable[[str], bytes],
) -> None:
    """Follower F is stopped, the others write and compact past its log (and the
    leader is restarted: see ``leave_a_follower_behind``), F is started
    armed and dies receiving the snapshot (after its 2nd chunk, or after raft.db took
    the snapshot and before state.db was swapped); restarted unarmed, it converges. For
    the swap, the restart itself must finish the install: right after it, before any
    write, state.db has applied at least the snapshot index raft.db records."""
    point = crash.partition(":")[0]
    after: tuple[RaftDisk, int, list[str]] | None = None
    nodes = Nodes.layout(tmp_path, certs, snapshot_entries=50)
    keys = [f"k/{n:04d}" for n in range(n_keys)]
    acked: dict[str, bytes] = {}
    try:
        with trio.fail_after(HANG):
            _, f, _, f_last = await leave_a_follower_behind(nodes, keys, value, acked)
            fdir = nodes.data_dir(f)
            await nodes.start(f, crash=crash)
            armed_run = nodes.runs[f]
            rc = await nodes.procs[f].wait()
            # What the crash left on disk.
            files = snapshot_files(fdir)
            raft = read_raft(fdir)
            state_applied = read_applied(fdir / "state.db")
            await nodes.start(f)  # unarmed
            if point == "snapshot_before_swap":
                # Up and answering means it opened its state; stop it before any write.
                await nodes.wait_answering(f)
                await nodes.stop(f)
                after = (read_raft(fdir), read_applied(fdir / "state.db"), snapshot_files(fdir))
                await nodes.start(f)
            sts = await nodes.wait_converged()
            await nodes.stop_all(next(iter(sts.values()))["leader_id"])
        applied, digest = check_stopped_cluster(nodes, acked)
    finally:
        await nodes.kill_all()
    size = nodes.events(f, "snapshot_receive_started", run=armed_run)[0]["bytes"]
    failed = [e.get("reason") for i in IDS for e in nodes.events(i, "snapshot_send_failed")]
    print(
        f"{crash}: F={f} rc={rc} f_last={f_last} snapshot bytes={size} "
        f"({-(-size // CHUNK_BYTES)} chunks) left={files} raft={raft} "
        f"state applied={state_applied} leader's failed sends={failed} "
        f"after restart={after} final applied={applied} digest={digest}"
    )
    assert rc == -signal.SIGKILL
    assert len(acked) == len(keys)
    if point == "snapshot_chunk":
        # It died half-way through a file of several chunks, with a partial file and
        # no snapshot taken; a later transfer was installed.
        assert size > 2 * CHUNK_BYTES
        assert [x for x in files if x.startswith("incoming-") and x.endswith(".part")], files
        assert raft.snapshot_index <= f_last
        assert state_applied <= f_last
        assert nodes.events(f, "snapshot_installed", run=armed_run + 1)
    else:
        # raft.db stands on the snapshot, state.db is older, the file is waiting.
        assert raft.transfer is not None
        assert raft.snapshot_index > state_applied
        assert files == [install_path(fdir, raft.transfer).name]
        # The restart finished the install.
        assert after is not None
        after_raft, after_applied, after_files = after
        assert after_raft.snapshot_index >= raft.snapshot_index
        assert after_applied >= raft.snapshot_index
        assert install_path(fdir, raft.transfer).name not in after_files
