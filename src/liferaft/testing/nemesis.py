"""``liferaft check``: a nemesis against real ``liferaft node`` processes.

It starts a local cluster it owns (three processes with fresh certificates, on loopback;
or, with ``run_against``, uses one the user runs, with API faults only), runs concurrent
clients through the client library, and meanwhile injects faults: SIGKILL and restart,
SIGSTOP and SIGCONT (of the leader or any node), network partitions, and leadership
transfers. Partitions are made by TCP proxies it places on every peer link: node X
dials node Y through the proxy (X→Y) (X's config gives it as Y's peer address), so
cutting that proxy cuts X→Y only, and a node can be isolated, or one direction of one
link cut. After the run it heals everything, waits for the cluster to settle, reads the
whole history of the run's keys (a watch from the revision the run started at) and
checks:

- the client history is linearizable, per key (``testing.linearizability``);
- no acknowledged put is lost, none is stored twice, and nothing is stored that no
  client put (a retried write is applied once: sessions);

and reports the fault timeline, the anomalies and, for a history that is not
linearizable, the operations of the offending key (docs/reliability.md).

The workload and fault schedule come from ``--seed``; the processes and the network do
not replay exactly (they run in real time), so a seed reproduces the schedule, not the
interleaving.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from liferaft.client import Client, LiferaftError, Status
from liferaft.security.certs import generate
from liferaft.security.tokens import mint
from liferaft.testing.linearizability import Op, check
from liferaft.testing.localcluster import free_ports, write_config
from liferaft.testing.processes import ProcessCluster

FAULTS = ("kill", "pause", "partition", "transfer", "member")
API_FAULTS = ("transfer",)  # what a check can do to a cluster it does not own
PREFIX = "check/"
REMOVED_STOP_S = 15.0  # a removed node must stop by itself within this
IDS = ["n1", "n2", "n3"]


# ---------------------------------------------------------------- the proxies


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; ``cut`` drops its connections and
    refuses new ones until ``heal``."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.cut_off = False
        self._scopes: set[trio.CancelScope] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._serve, listeners)
            task_status.started()

    def cut(self) -> None:
        self.cut_off = True
        for scope in list(self._scopes):
            scope.cancel()

    def heal(self) -> None:
        self.cut_off = False

    async def _serve(self, inbound: trio.SocketStream) -> None:
        if self.cut_off:
            await trio.aclose_forcefully(inbound)
            return
        scope = trio.CancelScope()
        self._scopes.add(scope)
        try:
            with scope:
                out = await trio.open_tcp_stream("127.0.0.1", self.target)
                async with inbound, out, trio.open_nursery() as nursery:
                    nursery.start_soon(_pump, inbound, out, nursery.cancel_scope)
                    nursery.start_soon(_pump, out, inbound, nursery.cancel_scope)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the target is down or a side went away: the link breaks, as a real one
        finally:
            self._scopes.discard(scope)


async def _pump(src: trio.SocketStream, dst: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        while data := await src.receive_some(65536):
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # one side went away: the other is closed with it
    done.cancel()


# ---------------------------------------------------------------- the cluster


@dataclass
class Report:
    seed: int
    seconds: float
    faults_enabled: list[str]
    operations: int = 0
    acked_writes: int = 0
    faults: list[dict[str, Any]] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    offending: list[dict[str, Any]] = field(default_factory=list)  # ops of a bad key
    stored_events: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # client error codes seen

    @property
    def ok(self) -> bool:
        return not self.anomalies

    def doc(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seed": self.seed,
            "seconds": self.seconds,
            "operations": self.operations,
            "acked_writes": self.acked_writes,
            "faults": self.faults,
            "anomalies": self.anomalies,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "offending_history": self.offending,
            "stored_events": self.stored_events,
            "client_errors": dict(sorted(self.errors.items())),
        }


def analyze(history: Sequence[Op], stored: Sequence[tuple[str, bytes]], report: Report) -> None:
    """The checks, given the client history and every put the store holds (key, value)
    in revision order: fills the report's anomalies, lost, duplicates and offending."""
    counts = Counter(stored)
    puts = {(o.key, o.value): o for o in history if o.kind == "put"}
    for (key, value), n in sorted(counts.items()):
        if n > 1:
            report.duplicates.append(f"{key}={value!r}")
            report.anomalies.append(f"put {key}={value!r} applied {n} times")
        if (key, value) not in puts:
            report.anomalies.append(f"stored {key}={value!r}, which no client put")
    for (k, v), o in sorted(puts.items(), key=lambda kv: (kv[0][0], kv[0][1] or b"")):
        if o.complete is not None and v is not None and (k, v) not in counts:
            report.lost.append(f"{k}={v!r}")
            report.anomalies.append(f"acknowledged put {k}={v!r} is lost")
    verdict = check(history)
    if not verdict:
        report.anomalies.append(f"the history of {verdict.key!r} is not linearizable")
        report.offending = [
            {
                "client": o.client,
                "op": o.kind,
                "key": o.key,
                "value": None if o.value is None else o.value.decode("utf-8", "replace"),
                "invoke": round(o.invoke, 4),
                "complete": None if o.complete is None else round(o.complete, 4),
            }
            for o in sorted(history, key=lambda o: o.invoke)
            if o.key == verdict.key
        ]


class NemesisCluster:
    """Three node processes whose peer links all pass through ``TcpProxy``s."""

    def __init__(self, base: Path, *, heartbeat_ms: int, election_ms: int) -> None:
        self.base = base
        self.certs = base / "certs"
        generate(self.certs, IDS)
        ports = free_ports(3 * len(IDS))
        self.ports = {
            i: (ports[3 * n], ports[3 * n + 1], ports[3 * n + 2]) for n, i in enumerate(IDS)
        }
        self.timing = (heartbeat_ms, election_ms)
        self.proxies = {(a, b): TcpProxy(self.ports[b][0]) for a in IDS for b in IDS if a != b}
        self.procs: dict[str, trio.Process] = {}
        self.paused: set[str] = set()
        self.exits: list[str] = []  # node processes that ended without being stopped
        self.configs: dict[str, Path] = {}

    async def start(self, nursery: trio.Nursery) -> None:
        for proxy in self.proxies.values():
            await nursery.start(proxy.run)
        for i in IDS:
            self._write_config(i, join=False)
        for i in IDS:
            await self.start_node(i)

    def _write_config(self, i: str, *, join: bool) -> None:
        # node i reaches node j through the proxy (i -> j); a learner the leader
        # promotes itself once caught up (the member fault adds one)
        members = {
            j: (self.ports[j][0] if j == i else self.proxies[i, j].port, *self.ports[j][1:])
            for j in IDS
        }
        self.configs[i] = write_config(
            self.base / f"{i}.toml",
            i,
            members,
            self.certs,
            self.base / "data" / i,
            heartbeat_ms=self.timing[0],
            election_ms=self.timing[1],
            join=join,
            auto_promote=True,
        )

    def log_tail(self, node_id: str, lines: int = 12) -> str:
        """The last lines of ``node_id``'s log (what it said as it stopped)."""
        try:
            text = (self.base / f"{node_id}.log").read_text(errors="replace")
        except OSError as exc:
            return f"(unreadable: {exc})"
        return " | ".join(text.splitlines()[-lines:])[-3000:]

    def fresh_joiner(self, node_id: str) -> tuple[str, str]:
        """``node_id``'s data gone and its config a joining node's (``join = true``): the
        peer and client addresses to add it back with. The others learn its address
        from the change and dial it directly from then on, not through their proxies."""
        shutil.rmtree(self.base / "data" / node_id, ignore_errors=True)
        self._write_config(node_id, join=True)
        peer, client, _ = self.ports[node_id]
        return f"127.0.0.1:{peer}", f"127.0.0.1:{client}"

    @property
    def endpoints(self) -> list[str]:
        return [f"wss://127.0.0.1:{self.ports[i][1]}/v1" for i in IDS]

    def token(self) -> str:
        key = (self.certs / "jwt-private.pem").read_bytes()
        return mint(
            key, sub="check", roles=["read", "write", "admin"], ttl_s=86400, now=time.time()
        )

    def command(self, node_id: str) -> list[str]:
        pc = ProcessCluster(IDS, self.certs, self.ports, self.configs)
        return pc.command(node_id)

    async def start_node(self, node_id: str) -> None:
        log = (self.base / f"{node_id}.log").open("ab")
        try:
            self.procs[node_id] = await trio.lowlevel.open_process(
                self.command(node_id), stdout=log, stderr=log
            )
        finally:
            log.close()

    def check_running(self, node_id: str) -> None:
        """Note ``node_id``'s process if it ended by itself (a crash: the nemesis stops
        nodes only by kill, by removal and at the end)."""
        code = self.procs[node_id].returncode
        if code is not None:
            self.exits.append(
                f"{node_id} exited {code} by itself; its log ends: {self.log_tail(node_id)}"
            )

    async def kill(self, node_id: str) -> None:
        p = self.procs[node_id]
        self.check_running(node_id)
        if node_id in self.paused:
            p.send_signal(signal.SIGCONT)
            self.paused.discard(node_id)
        p.kill()
        await p.wait()

    def pause(self, node_id: str) -> None:
        self.procs[node_id].send_signal(signal.SIGSTOP)
        self.paused.add(node_id)

    def resume(self, node_id: str) -> None:
        if node_id in self.paused:
            self.procs[node_id].send_signal(signal.SIGCONT)
            self.paused.discard(node_id)

    def cut(self, src: str, dst: str) -> None:
        self.proxies[src, dst].cut()

    def heal(self) -> None:
        for proxy in self.proxies.values():
            proxy.heal()

    async def stop(self) -> None:
        for i, p in self.procs.items():
            self.resume(i)
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        with trio.move_on_after(10) as scope:
            for p in self.procs.values():
                await p.wait()
        if scope.cancelled_caught:
            for p in self.procs.values():
                if p.returncode is None:
                    p.kill()
                    await p.wait()


async def _node_status(endpoint: str, token: str, cacert: Path | None) -> Status | None:
    try:
        with trio.move_on_after(1.5):
            async with await Client.connect(
                [endpoint], token=token, cacert=cacert, timeout=1.0
            ) as c:
                return await c.status()
    except LiferaftError:
        return None
    return None


@dataclass(frozen=True)
class Target:
    """Where the clients go: the endpoints, a token and CA, and the processes behind them
    when the check owns the cluster (None: a cluster the user runs)."""

    endpoints: list[str]
    token: str
    cacert: Path | None
    cluster: NemesisCluster | None = None


class Check:
    def __init__(
        self,
        seed: int,
        seconds: float,
        faults: Sequence[str],
        *,
        clients: int = 6,
        keys: int = 5,
        heartbeat_ms: int = 50,
        election_ms: int = 300,
        log: Any = None,
    ) -> None:
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; choose from {', '.join(FAULTS)}")
        self.rng = random.Random(seed)
        self.report = Report(seed, seconds, list(faults))
        self.seconds = seconds
        self.faults = list(faults)
        self.clients = clients
        self.keys = keys
        self.timing = (heartbeat_ms, election_ms)
        self.history: list[Op] = []
        self._log = log or (lambda line: None)
        self._t0 = 0.0
        # keys of this run only: a cluster the user runs may hold other checks' keys
        self.prefix = f"{PREFIX}{seed}-{random.Random().getrandbits(32):08x}/"

    def _fault(self, what: str, **detail: Any) -> None:
        t = round(trio.current_time() - self._t0, 3)
        self.report.faults.append({"t": t, "fault": what, **detail})
        self._log(f"{t:8.3f}s {what} {detail if detail else ''}".rstrip())

    async def run(self, base: Path | None = None) -> Report:
        """Against a local cluster of its own (its files under ``base``, or a temp dir)."""
        async with _workdir(base) as d:
            cluster = NemesisCluster(d, heartbeat_ms=self.timing[0], election_ms=self.timing[1])
            try:
                async with trio.open_nursery() as nursery:
                    await cluster.start(nursery)
                    target = Target(
                        cluster.endpoints, cluster.token(), cluster.certs / "ca.pem", cluster
                    )
                    await self._run(target)
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await cluster.stop()
        return self.report

    async def run_against(self, endpoints: list[str], token: str, cacert: Path | None) -> Report:
        """Against a cluster the user runs: only faults made through the client API."""
        if set(self.faults) - set(API_FAULTS):
            raise ValueError(
                f"on a cluster it does not own, only {', '.join(API_FAULTS)} (or none)"
            )
        await self._run(Target(endpoints, token, cacert))
        return self.report

    async def _run(self, target: Target) -> None:
        # the history is read back from here: older revisions may be compacted
        start = int((await _wait_for_leader(target, 30))["revision"])
        self._t0 = trio.current_time()
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            if self.faults:
                nursery.start_soon(self._nemesis, target, stop)
            async with trio.open_nursery() as workers:
                for cid in range(self.clients):
                    workers.start_soon(self._client, cid, target)
            stop.set()
        cluster = target.cluster
        if cluster is not None:
            self._fault("heal")
            cluster.heal()
            for i in IDS:
                cluster.resume(i)
                cluster.check_running(i)
                if cluster.procs[i].returncode is not None:
                    await cluster.start_node(i)
            self.report.anomalies += cluster.exits
        await _settled(target, 60)
        stored = await _stored_puts(target, self.prefix, start + 1)
        self.report.operations = len(self.history)
        self.report.acked_writes = sum(
            1 for o in self.history if o.kind == "put" and o.complete is not None
        )
        self.report.stored_events = len(stored)
        analyze(self.history, stored, self.report)

    async def _client(self, cid: int, target: Target) -> None:
        rng = random.Random(self.rng.getrandbits(64))
        deadline = self._t0 + self.seconds
        async with await Client.connect(
            target.endpoints,
            token=target.token,
            cacert=target.cacert,
            timeout=5.0,
            attempt_timeout=1.0,
            rng=random.Random(rng.getrandbits(64)),
        ) as client:
            n = 0
            while trio.current_time() < deadline and n < MAX_OPS_PER_CLIENT:
                n += 1
                key = f"{self.prefix}{rng.randrange(self.keys)}"
                start = trio.current_time()
                if rng.random() < 0.5:
                    value = b"c%d-%d" % (cid, n)
                    try:
                        await client.put(key, value)
                        end: float | None = trio.current_time()
                    except LiferaftError as exc:
                        self.report.errors[exc.code] += 1
                        end = None  # it may have happened or not
                    self.history.append(Op(cid, "put", key, value, start, end))
                else:
                    try:
                        kv = await client.get(key)
                    except LiferaftError as exc:
                        self.report.errors[exc.code] += 1
                        continue
                    got = kv.value if kv is not None else None
                    self.history.append(Op(cid, "get", key, got, start, trio.current_time()))

    async def _nemesis(self, target: Target, stop: trio.Event) -> None:
        rng = random.Random(self.rng.getrandbits(64))
        while not stop.is_set():
            with trio.move_on_after(rng.uniform(0.5, 2.0)):
                await stop.wait()
            if stop.is_set():
                return
            fault = rng.choice(self.faults)
            leader = await _leader(target)
            if fault == "transfer":
                await self._transfer(target, leader, rng)
                continue
            if fault == "member":
                await self._replace(target, rng.choice(IDS))
                continue
            cluster = target.cluster
            assert cluster is not None  # run_against allows API faults only
            victim = leader if leader is not None and rng.random() < 0.5 else rng.choice(IDS)
            span = rng.uniform(0.5, 2.5)
            if fault == "kill":
                self._fault("kill", node=victim, leader=victim == leader)
                await cluster.kill(victim)
                with trio.move_on_after(span):
                    await stop.wait()
                self._fault("restart", node=victim)
                await cluster.start_node(victim)
            elif fault == "pause":
                self._fault("pause", node=victim, leader=victim == leader)
                cluster.pause(victim)
                with trio.move_on_after(span):
                    await stop.wait()
                self._fault("resume", node=victim)
                cluster.resume(victim)
            else:
                others = [i for i in IDS if i != victim]
                how = rng.choice(["isolate", "one-way in", "one-way out"])
                if how == "isolate":
                    for o in others:
                        cluster.cut(victim, o)
                        cluster.cut(o, victim)
                elif how == "one-way in":  # the victim hears nobody, everyone hears it
                    for o in others:
                        cluster.cut(o, victim)
                else:  # the victim's messages reach nobody
                    for o in others:
                        cluster.cut(victim, o)
                self._fault("partition", kind=how, node=victim, leader=victim == leader)
                with trio.move_on_after(span):
                    await stop.wait()
                self._fault("heal")
                cluster.heal()

    async def _replace(self, target: Target, victim: str) -> None:
        """Remove ``victim``, which must then stop by itself (exit 0: node/removal.py),
        and add it back under its id on fresh data, as operations.md says to: a learner
        that catches up and that the leader promotes."""
        cluster = target.cluster
        assert cluster is not None
        cluster.check_running(victim)
        self._fault("remove", node=victim)
        try:
            async with await Client.connect(
                target.endpoints, token=target.token, cacert=target.cacert, timeout=5.0
            ) as admin:
                await admin.member_remove(victim)
                with trio.move_on_after(REMOVED_STOP_S) as waited:
                    code = await cluster.procs[victim].wait()
                if waited.cancelled_caught:
                    self.report.anomalies.append(
                        f"removed node {victim} still ran {REMOVED_STOP_S:g} s after its removal"
                    )
                    await cluster.kill(victim)
                elif code != 0:
                    self.report.anomalies.append(
                        f"removed node {victim} exited {code}, not 0; its log ends: "
                        + cluster.log_tail(victim)
                    )
                self._fault("stopped", node=victim)
                peer, client = cluster.fresh_joiner(victim)
                deadline = trio.current_time() + REMOVED_STOP_S
                while True:  # (a change still in flight, or an election: try again)
                    try:
                        await admin.member_add(victim, peer, client, learner=True)
                        break
                    except LiferaftError:
                        if trio.current_time() > deadline:
                            raise
                        await trio.sleep(0.2)
                self._fault("add learner", node=victim)
                await cluster.start_node(victim)
        except LiferaftError as exc:
            self._fault("member failed", error=exc.code)
            self.report.anomalies.append(f"could not remove and add back {victim}: {exc}")

    async def _transfer(self, target: Target, leader: str | None, rng: random.Random) -> None:
        """Leadership to another voter (the most caught-up one: the node decides)."""
        self._fault("transfer", frm=leader)
        try:
            async with await Client.connect(
                target.endpoints, token=target.token, cacert=target.cacert, timeout=3.0
            ) as admin:
                self._fault("transferred", to=await admin.transfer_leader(None))
        except LiferaftError as exc:  # e.g. no voter caught up enough: logged, not fatal
            self._fault("transfer failed", error=exc.code)


MAX_OPS_PER_CLIENT = 100_000  # a bound on the load loop besides its time


@contextlib.asynccontextmanager
async def _workdir(base: Path | None) -> AsyncIterator[Path]:
    if base is not None:
        await trio.Path(base).mkdir(parents=True, exist_ok=True)
        yield base
        return
    with tempfile.TemporaryDirectory(prefix="liferaft-check-") as d:
        yield Path(d)


async def _leader_status(target: Target) -> Status | None:
    for endpoint in target.endpoints:
        st = await _node_status(endpoint, target.token, target.cacert)
        if st is not None and st.role == "leader":
            return st
    return None


async def _leader(target: Target) -> str | None:
    st = await _leader_status(target)
    return None if st is None else st.node_id


async def _wait_for_leader(target: Target, wait: float) -> Status:
    """The leader's status, once there is one."""
    with trio.fail_after(wait):
        while (st := await _leader_status(target)) is None:  # noqa: ASYNC110
            await trio.sleep(0.1)  # polling the nodes: no event tells
    return st


async def _settled(target: Target, wait: float) -> int:
    """Wait until every node has applied the same index; its revision. TooSlowError
    (saying what each node reported last) if that does not come within ``wait``."""
    st: list[Status | None] = []
    try:
        return await _settle(target, wait, st)
    except trio.TooSlowError:
        seen = "; ".join(
            f"{e}: none"
            if s is None
            else f"{s.node_id} {s.role} term {s.term} leader {s.leader_id} "
            f"commit {s.commit_index} applied {s.applied_index}"
            for e, s in zip(target.endpoints, st, strict=False)
        )
        raise trio.TooSlowError(f"the cluster did not settle in {wait:g} s: {seen}") from None


async def _settle(target: Target, wait: float, st: list[Status | None]) -> int:
    with trio.fail_after(wait):
        while True:
            st[:] = [await _node_status(e, target.token, target.cacert) for e in target.endpoints]
            if all(s is not None for s in st):
                applied = {s.applied_index for s in st if s is not None}
                commits = {s.commit_index for s in st if s is not None}
                leaders = {s.leader_id for s in st if s is not None}
                if (
                    len(applied) == 1
                    and applied == commits
                    and len(leaders) == 1
                    and None not in leaders
                ):
                    return st[0].revision  # type: ignore[union-attr]
            await trio.sleep(0.2)


async def _stored_puts(target: Target, prefix: str, start: int) -> list[tuple[str, bytes]]:
    """Every put the store holds under ``prefix``, in revision order: a watch from
    ``start`` up to a last put of the run's own (``prefix`` + "end"), not returned."""
    out: list[tuple[str, bytes]] = []
    end = f"{prefix}end"
    async with await Client.connect(
        target.endpoints, token=target.token, cacert=target.cacert, timeout=30
    ) as c:
        await c.put(end, b"")
        with trio.fail_after(60):
            async with c.watch(prefix=prefix, start_revision=start) as events:
                async for ev in events:
                    if ev.kv.key == end:
                        break
                    if ev.type == "put":
                        out.append((ev.kv.key, bytes(ev.kv.value)))
    return out


def run_check(
    seed: int, seconds: float, faults: Sequence[str], *, log: Any = None, **kw: Any
) -> Report:
    """One ``liferaft check`` run, in a Trio run of its own."""
    check_run = Check(seed, seconds, faults, log=log, **kw)
    return trio.run(check_run.run)


__all__ = ["FAULTS", "Check", "Report", "TcpProxy", "analyze", "run_check"]
