"""The same behaviour from both client flavours, Trio (``liferaft.client``) and asyncio
(``liferaft.client.aio``), against one real cluster of three ``liferaft node``
processes: each scenario is written once against the shared API and run under
``trio.run`` and under ``asyncio.run`` (plain sync tests, outside pytest-trio's loop).

Covered: every key-value op and the typed results, errors mapped to the same classes,
a ``not_leader`` followed to the leader, writes retried across a leader SIGKILL and
applied exactly once (session and seq), a watch that resumes after its node is killed
with no event missed or repeated, a lease kept alive past its TTL, and coordination
(docs/coordination.md): mutual exclusion of a Lock with growing fencing tokens across a
leader SIGKILL and restart, and an Election whose observers never see two leaders at
once and whose leader, its client closed without resigning, is replaced once its lease
expires."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

import liferaft.client
import liferaft.client.aio
from liferaft.backupfile import read_info
from liferaft.client import (
    InvalidRequest,
    KeyValue,
    LockLost,
    Member,
    NotFound,
    PermissionDenied,
    Status,
    TLSError,
    Unauthenticated,
    compare,
    op_get,
    op_put,
)
from liferaft.security.certs import generate
from liferaft.security.tokens import mint
from liferaft.testing.processes import ProcessCluster, process_cluster

FLAVOURS = ["trio", "asyncio"]
HANG = 60.0  # a guard against hangs, not a performance claim


@dataclass
class Cluster:
    """Three node processes; ``kill`` and ``start`` one by id."""

    pc: ProcessCluster
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, node_id: str) -> None:
        with open(self.logs / f"{node_id}.log", "ab") as log:
            self.procs[node_id] = subprocess.Popen(self.pc.command(node_id), stdout=log, stderr=log)

    def revive(self) -> None:
        """Start again every node a scenario killed and left down (it failed before
        its own restart): the next scenario starts from a whole cluster."""
        for node_id, proc in list(self.procs.items()):
            if proc.poll() is not None:
                self.start(node_id)

    def kill(self, node_id: str) -> None:
        proc = self.procs[node_id]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def endpoint(self, node_id: str) -> str:
        return self.pc.endpoints[self.pc.ids.index(node_id)]

    def node_of(self, url: str | None) -> str:
        assert url is not None
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        return next(i for i in self.pc.ids if self.pc.members[i][1] == port)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("flavours")
    pc = process_cluster(base, ["n1", "n2", "n3"], heartbeat_ms=50, election_ms=300)
    c = Cluster(pc, base)
    try:
        for i in pc.ids:
            c.start(i)
        yield c
    finally:
        for p in c.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@dataclass
class Env:
    """What a scenario needs from its event loop, for each flavour."""

    flavour: str
    cluster: Cluster

    @property
    def module(self) -> Any:
        """The flavour's client module: Client, Lock, Election, open_client."""
        return liferaft.client if self.flavour == "trio" else liferaft.client.aio

    def now(self) -> float:
        """The flavour's clock."""
        if self.flavour == "trio":
            return trio.current_time()
        return asyncio.get_running_loop().time()

    async def until(self, done: Callable[[], bool], within: float, what: str) -> None:
        """Wait until ``done()``; fail after ``within`` seconds (a hang guard)."""
        deadline = time.monotonic() + within
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {within:g}s: {what}")
            await self.sleep(0.01)

    async def connect(self) -> Any:
        """A connected client of the flavour, to be closed with ``aclose``."""
        cls: Any = (
            liferaft.client.Client if self.flavour == "trio" else liferaft.client.aio.AsyncioClient
        )
        return await cls.connect(
            self.cluster.pc.endpoints,
            token=self.cluster.pc.token(["read", "write"]),
            cacert=self.cluster.pc.certs / "ca.pem",
            timeout=10.0,
        )

    def open(
        self, endpoints: list[str] | None = None, *, token: str | None = None, **kw: Any
    ) -> AbstractAsyncContextManager[Any]:
        module: Any = liferaft.client if self.flavour == "trio" else liferaft.client.aio
        kw.setdefault("cacert", self.cluster.pc.certs / "ca.pem")
        kw.setdefault("timeout", 10.0)
        return module.open_client(  # type: ignore[no-any-return]
            endpoints or self.cluster.pc.endpoints,
            token=token or self.cluster.pc.token(["read", "write", "admin"]),
            **kw,
        )

    async def sleep(self, seconds: float) -> None:
        if self.flavour == "trio":
            await trio.sleep(seconds)
        else:
            await asyncio.sleep(seconds)

    async def gather(self, *fns: Callable[[], Awaitable[Any]]) -> list[Any]:
        """Run ``fns`` concurrently; their results in order."""
        if self.flavour == "asyncio":
            return list(await asyncio.gather(*(fn() for fn in fns)))
        out: list[Any] = [None] * len(fns)

        async def one(i: int) -> None:
            out[i] = await fns[i]()

        async with trio.open_nursery() as nursery:
            for i in range(len(fns)):
                nursery.start_soon(one, i)
        return out

    @contextlib.asynccontextmanager
    async def background(self, fn: Callable[[], Awaitable[Any]]) -> AsyncIterator[None]:
        """Run ``fn`` while the block runs; cancel it after."""
        if self.flavour == "trio":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fn)
                yield
                nursery.cancel_scope.cancel()
        else:
            task = asyncio.ensure_future(fn())
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def leader(self) -> str:
        """The id of the leader, once every node answers and names the same one (a
        node killed by an earlier scenario is back)."""
        deadline = time.monotonic() + HANG
        while time.monotonic() < deadline:
            leaders = set()
            for url in self.cluster.pc.endpoints:
                try:
                    async with self.open([url], timeout=1.0) as c:
                        leaders.add((await c.status()).leader_id)
                except liferaft.client.LiferaftError:
                    leaders.add(None)
            if len(leaders) == 1 and None not in leaders:
                return str(leaders.pop())
            await self.sleep(0.1)
        raise AssertionError("no leader")


def run(flavour: str, cluster: Cluster, scenario: Callable[[Env], Awaitable[None]]) -> None:
    env = Env(flavour, cluster)
    if flavour == "trio":

        async def main() -> None:
            with trio.fail_after(HANG):
                await scenario(env)

        try:
            trio.run(main)
        finally:
            cluster.revive()
    else:

        async def amain() -> None:
            await asyncio.wait_for(scenario(env), HANG)

        try:
            asyncio.run(amain())
        finally:
            cluster.revive()


# ---------------------------------------------------------------- the scenarios


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_key_value_ops_and_typed_results(flavour: str, cluster: Cluster) -> None:
    async def scenario(env: Env) -> None:
        await env.leader()
        p = f"kv-{flavour}/"
        async with env.open() as c:
            rev = await c.put(p + "a", "1")
            kv = await c.get(p + "a")
            assert isinstance(kv, KeyValue) and kv.value == b"1" and kv.mod_revision == rev
            revs = await c.put_many([(p + "b", b"2"), (p + "c", b"3")])
            assert revs == sorted(revs) and revs[0] > rev
            kvs, more = await c.range(p)
            assert [x.key for x in kvs] == [p + "a", p + "b", p + "c"] and not more
            kvs, more = await c.range(p, limit=1, after=p + "a")
            assert [x.key for x in kvs] == [p + "b"] and more
            old = await c.get(p + "a", revision=rev)
            assert old is not None and old.text == "1"
            r = await c.txn(
                [compare(p + "a", "value", "==", "1")],
                [op_put(p + "a", "2"), op_get(p + "b")],
                [],
            )
            assert r.succeeded and r.results[1]["kv"].value == b"2"
            r = await c.txn([compare(p + "a", "version", "==", 0)], [], [op_get(p + "a")])
            assert not r.succeeded and r.results[0]["kv"].text == "2"
            assert await c.delete(p + "a") == 1
            assert await c.get(p + "a") is None
            assert await c.delete(prefix=p) == 2
            st = await c.status()
            assert isinstance(st, Status) and st.revision >= r.revision
            assert st.leader_id in ("n1", "n2", "n3") and st.version
            assert all(isinstance(m, Member) for m in st.members)
            assert sorted(m.id for m in await c.member_list()) == ["n1", "n2", "n3"]
            assert all(m.voter for m in st.members)
            # errors: the same classes on both flavours
            with pytest.raises(InvalidRequest):
                await c.put("", "x")  # refused before sending
            with pytest.raises(InvalidRequest):
                await c.get(p + "a", revision=st.revision + 10_000)  # the server's refusal
            with pytest.raises(NotFound):
                await c.lease_revoke(0x5EED_0000_0001)
        async with env.open(token=env.cluster.pc.token(["read"])) as ro:
            with pytest.raises(PermissionDenied):
                await ro.put(p + "x", "no")
        with pytest.raises(Unauthenticated):
            async with env.open(token="not-a-token", timeout=2.0):
                pass
        wrong_ca = env.cluster.logs / "other-ca"
        if not (wrong_ca / "ca.pem").exists():
            generate(wrong_ca, ["n1"])
        with pytest.raises(TLSError):
            async with env.open(cacert=wrong_ca / "ca.pem", timeout=2.0):
                pass

    run(flavour, cluster, scenario)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_not_leader_is_followed_to_the_leader(flavour: str, cluster: Cluster) -> None:
    async def scenario(env: Env) -> None:
        lead = await env.leader()
        follower = next(i for i in env.cluster.pc.ids if i != lead)
        async with env.open([env.cluster.endpoint(follower)]) as c:
            assert env.cluster.node_of(c.endpoint) == follower
            rev = await c.put(f"redirect-{flavour}", "x")  # not_leader, then the leader
            assert env.cluster.node_of(c.endpoint) == lead
            kv = await c.get(f"redirect-{flavour}")
            assert kv is not None and kv.mod_revision == rev

    run(flavour, cluster, scenario)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_reads_from_followers_see_every_acknowledged_write_and_take_a_refreshed_token(
    flavour: str, cluster: Cluster
) -> None:
    """reads="followers": gets and ranges go over a connection of their own to a node
    that does not lead, and still see each write acknowledged before them; a refresh
    replaces the token on that connection too (a narrower token then refuses reads)."""

    async def scenario(env: Env) -> None:
        lead = await env.leader()
        p = f"followers-{flavour}/"
        async with env.open(reads="followers") as c:
            for i in range(10):
                await c.put(f"{p}{i}", f"v{i}")
                kv = await c.get(f"{p}{i}")
                assert kv is not None and kv.value == f"v{i}".encode()
            kvs, more = await c.range(p)
            assert len(kvs) == 10 and not more
            assert env.cluster.node_of(c.endpoint) == lead  # writes: the leader
            reads = c._read_pool.conn
            assert reads is not None and env.cluster.node_of(reads.endpoint.url) != lead
            key = (env.cluster.pc.certs / "jwt-private.pem").read_bytes()
            elsewhere = mint(
                key, sub="t", roles=["read", "write"], prefixes=["x/"], now=time.time()
            )
            await c.refresh(elsewhere)
            with pytest.raises(PermissionDenied):
                await c.get(f"{p}0")  # the reads' connection took the new token
            assert c._read_pool.conn is reads  # refreshed in place, not reconnected
            with pytest.raises(PermissionDenied):
                await c.put(f"{p}after", "x")  # and so did the writes' one
            assert await c.put("x/after", "x") > 0

    run(flavour, cluster, scenario)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_snapshot_save_writes_a_whole_backup_and_a_refused_one_leaves_no_file(
    flavour: str, cluster: Cluster, tmp_path: Path
) -> None:
    """The backup holds every write acknowledged before the call, in a file that
    ``liferaft snapshot status`` accepts whole; progress is reported up to the total.
    Without the admin role the call raises PermissionDenied and leaves nothing."""

    async def scenario(env: Env) -> None:
        p = f"backup-{flavour}/"
        seen: list[tuple[int, int]] = []
        async with env.open() as c:
            revs = [await c.put(f"{p}{i}", "v") for i in range(20)]
            meta = await c.snapshot_save(
                tmp_path / "b.lrb", progress=lambda got, total: seen.append((got, total))
            )
        info = read_info(tmp_path / "b.lrb")
        assert info.revision >= revs[-1] and meta["revision"] == info.revision
        assert meta["keys"] == info.keys >= 20
        assert seen and seen[-1][0] == seen[-1][1] == info.db_bytes
        async with env.open(token=env.cluster.pc.token(["read", "write"])) as c:
            with pytest.raises(PermissionDenied):
                await c.snapshot_save(tmp_path / "denied.lrb")

    run(flavour, cluster, scenario)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["b.lrb"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_writes_across_a_leader_kill_apply_exactly_once(flavour: str, cluster: Cluster) -> None:
    """Writes in flight when the leader is SIGKILLed are retried with their session and
    seq at the new leader: each applies once (version 1) and returns the revision of
    that one application."""

    async def scenario(env: Env) -> None:
        old = await env.leader()
        p = f"once-{flavour}/"
        results: dict[str, int] = {}
        async with env.open() as c:
            await c.put(p + "warm-up", "x")
            assert env.cluster.node_of(c.endpoint) == old

            spans: dict[str, tuple[float, float]] = {}
            in_flight = 0

            async def put(key: str) -> None:
                nonlocal in_flight
                started = time.monotonic()
                in_flight += 1
                try:
                    results[key] = await c.put(key, "v")
                finally:
                    in_flight -= 1
                spans[key] = (started, time.monotonic())

            async def writer(n: int) -> None:
                for i in range(n):
                    await env.gather(*(lambda k=f"{p}{i:03}-{j}": put(k) for j in range(8)))

            killed_at = 0
            kill_time: list[float] = []

            async def killer() -> None:
                nonlocal killed_at
                # Kill while puts are in flight (not between two rounds of them): the
                # kill runs on the event loop, so they are answered after kill_time.
                while len(results) < 24 or not in_flight:
                    assert len(results) < 12 * 8, "the writers finished before the kill"
                    await env.sleep(0.001)
                killed_at = len(results)
                env.cluster.kill(old)
                kill_time.append(time.monotonic())

            await env.gather(lambda: writer(12), killer)
            assert killed_at and len(results) == 12 * 8
            # the kill came with puts in flight (the killer waits for that): they were
            # retried at the new leader, and (below) still applied once each
            crossed = [k for k, (a, b) in spans.items() if a < kill_time[0] < b]
            assert crossed
            new = env.cluster.node_of(c.endpoint)
            assert new != old
            kvs, _ = await c.range(p)
            got = {kv.key: kv for kv in kvs if not kv.key.endswith("warm-up")}
            assert set(got) == set(results)
            assert all(kv.version == 1 for kv in got.values())  # applied once each
            assert {k: kv.mod_revision for k, kv in got.items()} == results
        env.cluster.start(old)

    run(flavour, cluster, scenario)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_watch_resumes_after_its_node_dies_without_a_gap(flavour: str, cluster: Cluster) -> None:
    async def scenario(env: Env) -> None:
        lead = await env.leader()
        ids = env.cluster.pc.ids
        follower = next(i for i in ids if i != lead)
        p = f"watch-{flavour}/"
        n = 40
        ends = [env.cluster.endpoint(follower), env.cluster.endpoint(lead)]
        lead_only = [env.cluster.endpoint(lead)]
        async with (
            env.open(ends) as w,
            env.open(lead_only) as writer,
            w.watch(prefix=p) as events,
        ):
            assert env.cluster.node_of(w.endpoint) == follower

            async def write() -> None:
                for i in range(n):
                    await writer.put(f"{p}{i:03}", str(i))
                    if i == n // 3:
                        env.cluster.kill(follower)  # the watch's connection goes
                    await env.sleep(0.002)

            seen: list[KeyValue] = []
            async with env.background(write):
                async for ev in events:
                    assert ev.type == "put"
                    seen.append(ev.kv)
                    if len(seen) == n:
                        break
            assert [kv.key for kv in seen] == [f"{p}{i:03}" for i in range(n)]
            revs = [kv.mod_revision for kv in seen]
            assert revs == sorted(set(revs))  # in order, none twice
            assert env.cluster.node_of(w.endpoint) == lead  # it moved on
            assert events.next_revision == revs[-1] + 1
        env.cluster.start(follower)

    run(flavour, cluster, scenario)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_lease_kept_alive_outlives_its_ttl_and_revoke_deletes_its_keys(
    flavour: str, cluster: Cluster
) -> None:
    async def scenario(env: Env) -> None:
        await env.leader()
        key = f"lease-{flavour}"
        async with env.open() as c:
            lease = await c.lease_grant(1)
            await c.put(key, "held", lease=lease.id)
            async with c.keep_alive(lease) as ka:
                await env.sleep(2.5)  # well past the TTL: renewed about every 1/3 s
                assert not ka.lost.is_set()
                info = await c.lease_ttl(lease.id, keys=True)
                assert info.keys == [key] and info.granted_ttl == 1
            assert await c.get(key) is not None
            assert lease.id in await c.lease_list()
            rev = await c.lease_revoke(lease.id)
            assert await c.get(key) is None
            kv_gone = await c.get(key, revision=rev - 1)
            assert kv_gone is not None and kv_gone.text == "held"
            with pytest.raises(NotFound):
                await c.lease_keepalive_once(lease.id)

    run(flavour, cluster, scenario)


# ---------------------------------------------------------------- coordination


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_lock_mutual_exclusion_across_a_leader_kill(flavour: str, cluster: Cluster) -> None:
    """Three contenders, each with its own client (its own session, as separate processes
    would have), take one lock three times each while the cluster's leader is SIGKILLed
    and later restarted. The critical sections, recorded with the flavour's clock, never
    overlap, and every holder's fencing token is higher than the one before."""

    async def scenario(env: Env) -> None:
        lead = await env.leader()
        name = f"mx-{flavour}"
        sections: list[tuple[float, float, int, int]] = []  # (entered, left, token, who)
        holder: list[int] = []
        lost: list[int] = []
        restarted: list[str] = []

        async def contender(i: int) -> None:
            async with env.open() as c:
                for _ in range(3):
                    try:
                        async with env.module.Lock(c, name, ttl=5) as lock:
                            entered = env.now()
                            assert not holder, f"{i} entered while {holder} held the lock"
                            holder.append(i)
                            await c.put(f"{name}/owner", str(i))  # a write while holding
                            await env.sleep(0.05)
                            holder.remove(i)
                            sections.append((entered, env.now(), lock.token, i))
                    except LockLost:
                        holder.clear()
                        lost.append(i)

        async def kill_and_restart() -> None:
            await env.until(lambda: len(sections) >= 2, HANG, "two critical sections")
            env.cluster.kill(lead)
            await env.until(lambda: len(sections) >= 5, HANG, "sections after the kill")
            env.cluster.start(lead)
            restarted.append(lead)

        try:
            await env.gather(kill_and_restart, *(lambda i=i: contender(i) for i in range(3)))
        finally:
            if not restarted and env.cluster.procs[lead].poll() is not None:
                env.cluster.start(lead)
        assert not lost and len(sections) == 9, (lost, sections)
        for (_, left, token, _), (entered, _, next_token, _) in itertools.pairwise(sections):
            assert left <= entered, sections  # never two holders at once
            assert token < next_token, sections  # a fenced store never refuses the next
        async with env.open() as c:
            kvs, _ = await c.range(f"_liferaft/lock/{name}/")
            assert kvs == []  # every contender released (revoked its lease)

    run(flavour, cluster, scenario)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_election_observed_and_a_closed_leader_replaced(flavour: str, cluster: Cluster) -> None:
    """A leads; B campaigns and waits (watching A's key); an observer follows. A's client
    is closed without resigning: once A's lease expires B is elected (within a bounded
    wait: a hang guard, not a timing claim). The observer sees A, then B, then B's
    proclaimed value: never two leaders at once, and B only once A's key is gone."""

    async def scenario(env: Env) -> None:
        await env.leader()
        name = f"svc-{flavour}"
        ttl = 2
        seen: list[KeyValue] = []
        won: list[str] = []
        async with env.open() as watcher, env.open() as b_client:
            a_client = await env.connect()
            a = env.module.Election(a_client, name, ttl=ttl)
            b = env.module.Election(b_client, name, ttl=ttl)

            async def observe() -> None:
                async with env.module.Election(watcher, name).observe() as leaders:
                    async for kv in leaders:
                        seen.append(kv)

            async def campaign_b() -> None:
                await b.campaign("b")
                won.append(str(b.key))

            async with env.background(observe):
                await a.campaign("a")
                await env.until(lambda: len(seen) == 1, HANG, "the observer sees a")
                assert seen[0].value == b"a" and seen[0].key == a.key
                a_key = a.key
                async with env.background(campaign_b):
                    await env.until(lambda: b.watching == a_key, HANG, "b waits for a")
                    assert (await b.leader()).key == a_key and not won
                    await a_client.aclose()  # no resign, no revoke: the lease must expire
                    await env.until(lambda: bool(won), ttl + 15.0, "b elected after a died")
                    assert await watcher.get(a_key) is None  # a's key went with its lease
                    await env.until(lambda: len(seen) == 2, HANG, "the observer sees b")
                    await b.proclaim("b2")
                    await env.until(lambda: len(seen) == 3, HANG, "the observer sees b2")
                    leader = await b.leader()
                    assert leader is not None and leader.value == b"b2"
                    await b.resign()
                await env.sleep(0.2)  # nobody leads now: nothing more is shown
            assert [kv.value for kv in seen] == [b"a", b"b", b"b2"]
            assert [kv.key for kv in seen] == [a_key, won[0], won[0]]
            assert seen[0].create_revision < seen[1].create_revision
            assert await b.leader() is None

    run(flavour, cluster, scenario)
