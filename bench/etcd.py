"""The same write load as ``liferaft bench``, against etcd 3.4: the side-by-side figure.

Starts a throw-away 3-member etcd cluster on 127.0.0.1 (distinct free ports, data in a
temporary directory, mutual TLS on the peer and the client links, fsync on: etcd's
default, ``--unsafe-no-fsync`` is not passed; heartbeat 100 ms / election 1000 ms, etcd's
defaults, unless ``--heartbeat-ms`` and ``--election-ms`` say otherwise), loads it, and
prints committed puts/s, p50/p90/p99/p99.9 latency with a histogram, errors by gRPC code,
elections during the run, CPU seconds per etcd process (``/proc/PID/stat``) and of the
load generator, how many of the machine's cores were busy (``/proc/stat``: anything else
running on the machine shows there) and the leader's WAL fsyncs and backend commits (its
``/metrics``), all over the timed part only. Then it stops the members and removes the
directory, also on Ctrl-C or SIGTERM; if the script is killed outright the members die
with it (PR_SET_PDEATHSIG) and only the directory (``etcd-bench-*`` in the temporary
directory) is left. ``-o json`` prints one object with the keys of ``liferaft bench -o
json`` (``ops_per_s``, ``p50_ms``, ``p99_ms``, ``cpu_s``, ``bench_cpu_s``, ...) plus
``system``, ``leader``, ``load_generator``, ``machine_busy_cores`` and ``leader_disk``.

The certificates come from liferaft's own generator (``liferaft.security.certs``): a CA,
a certificate per member (SANs: its id, localhost and IP 127.0.0.1; server and client
auth, so it serves both ends of the peer link) and one for the load generator.

The load has the shapes of ``liferaft bench`` (src/liferaft/cli/bench.py): ``--connections
C --writers W`` is a closed loop of C x W concurrent puts, W sharing each connection;
``--serial`` is one put at a time; ``--rate R`` is an open loop (request k due at start +
k/R, at most C x W in flight, latency counted from when it was due). Values are 100 random
bytes (``--value-size``), keys cycle over bench/000000..bench/099999. Requests start for
``--seconds`` (or until ``--max-ops``), then those in flight get one ``--timeout``. There
is no ``--batch`` (gRPC multiplexes concurrent calls on a connection; etcd's client has no
batching of independent puts) and no ``--reads``.

What measures it: ``bench/etcd_load.go``, a small Go program on etcd's own client
(go.etcd.io/etcd/clientv3, the 3.4 source that Debian ships as golang-etcd-server-dev),
built once with Debian's Go into ``bench/.cache/`` (git-ignored; about 20 s; rebuilt when
the source, Go or etcd changes; nothing is downloaded). It does what etcd's
``tools/benchmark put --conns C --clients C*W`` does (that tool is not in any package
reachable here, and no Go module proxy is), with liferaft bench's keys, bounds, open loop
and report. So both systems are driven by a client in their server's own language, and a
Python gRPC client's cost does not show up as etcd's. Each connection is one
clientv3.Client (one HTTP/2 connection) to the leader only, as ``liferaft bench`` starts
at the leader; a put counts when etcd answers it, i.e. committed and applied.

Limits: the load generator shares the two cores with the three members, as with
``liferaft bench``, and every CPU second it spends is taken from the servers; the two
load generators do not cost the same per put (liferaft's batches requests per WebSocket
message, etcd's client sends one gRPC call per put), so compare the members' CPU seconds
per 1,000 puts as well as the rates, and check ``machine_busy_cores`` for other load.
Without Go the script stops and says what to install, rather than fall back to a Python
gRPC client, which would measure Python rather than etcd.

Needs, once, as root (etcd-client brings etcdctl, handy for poking but not used here):

    apt-get update && apt-get install -y etcd-server etcd-client golang-go golang-etcd-server-dev

Examples (run one at a time: the load takes the whole machine):

    .venv/bin/python bench/etcd.py --seconds 10                        # 4 x 64, as liferaft bench
    .venv/bin/python bench/etcd.py --connections 8 --writers 256 --seconds 10
    .venv/bin/python bench/etcd.py --serial --seconds 5
    .venv/bin/python bench/etcd.py --rate 2000 --seconds 10 -o json

Exit codes: 0 done (errors during the run are counted, not fatal), 2 usage error or
something missing or failing to build, 4 the cluster did not come up.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from liferaft.cli.bench import latency_summary, open_loop_summary, result_lines, stop_processes
from liferaft.security.certs import generate
from liferaft.testing.localcluster import free_ports

HERE = Path(__file__).resolve().parent
LOAD_SOURCE = HERE / "etcd_load.go"
CACHE = HERE / ".cache"
GOPATH = Path("/usr/share/gocode")  # where Debian's golang-*-dev packages put Go source
CLIENTV3 = GOPATH / "src/go.etcd.io/etcd/clientv3"
INSTALL = (
    "apt-get update && apt-get install -y etcd-server etcd-client golang-go golang-etcd-server-dev"
)
MEMBERS = ["e1", "e2", "e3"]
CLIENT = "bench"  # the load generator's client certificate
READY_WAIT_S = 30.0  # members listening; the load generator then waits as long for a leader
STOP_WAIT_S = 2.0  # SIGTERM, then SIGKILL (a leader stopping with its peers can hang ~7 s)
EXIT_USAGE, EXIT_UNAVAILABLE = 2, 4


class Failure(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- tools


def find_tools(etcd: str) -> tuple[str, str, str]:
    """The etcd binary, its version and the go binary; Failure naming the install if not."""
    etcd_bin = shutil.which(etcd)
    go_bin = shutil.which("go")
    missing = [
        what
        for what, ok in (
            (f"{etcd} (etcd-server)", etcd_bin),
            ("go (golang-go)", go_bin),
            (f"{CLIENTV3} (golang-etcd-server-dev)", CLIENTV3.is_dir()),
        )
        if not ok
    ]
    if missing or etcd_bin is None or go_bin is None:
        raise Failure(f"missing {', '.join(missing)}; as root run:\n  {INSTALL}", EXIT_USAGE)
    out = subprocess.run([etcd_bin, "--version"], capture_output=True, text=True, check=False)
    m = re.search(r"etcd Version: (\S+)", out.stdout)
    version = m.group(1) if m else "unknown"
    if not version.startswith("3.4."):
        print(f"warning: {etcd_bin} is etcd {version}, not 3.4", file=sys.stderr)
    return etcd_bin, version, go_bin


def build_load(go: str) -> tuple[Path, str]:
    """Build bench/etcd_load.go once (GOPATH mode, Debian's Go source only); return the
    binary and what it was built from."""
    go_version = subprocess.run(
        [go, "version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    client_version = "unknown"
    version_go = GOPATH / "src/go.etcd.io/etcd/version/version.go"
    with contextlib.suppress(OSError):
        m = re.search(r'^\s*Version\s*=\s*"([^"]+)"', version_go.read_text(), re.M)
        client_version = m.group(1) if m else client_version
    what = f"bench/etcd_load.go on etcd clientv3 {client_version}, {go_version.split()[2]}"
    digest = hashlib.sha256()
    for part in (LOAD_SOURCE.read_bytes(), go_version.encode(), client_version.encode()):
        digest.update(part)
    binary = CACHE / f"etcd_load-{digest.hexdigest()[:16]}"
    if binary.exists():
        return binary, what
    CACHE.mkdir(exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    print(f"building {binary.relative_to(HERE.parent)} (once, about 20 s)", file=sys.stderr)
    env = {
        **os.environ,
        "GO111MODULE": "off",  # Debian's packaged source, no modules, no downloads
        "GOPATH": str(GOPATH),
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOTOOLCHAIN": "local",
        "GOCACHE": str(CACHE / "go-build"),
        "CGO_ENABLED": "0",
    }
    tmp = binary.with_suffix(".tmp")
    done = subprocess.run(
        [go, "build", "-o", str(tmp), str(LOAD_SOURCE)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise Failure(f"building the load generator failed:\n{done.stderr}", EXIT_USAGE)
    tmp.replace(binary)
    for old in CACHE.glob("etcd_load-*"):
        if old != binary:
            old.unlink(missing_ok=True)  # built from an older source, Go or etcd
    return binary, what


# ---------------------------------------------------------------- the cluster


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if this script dies without cleaning up."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def member_command(
    etcd: str, base: Path, i: int, ports: list[int], args: argparse.Namespace
) -> list[str]:
    certs = base / "certs"
    name = MEMBERS[i]
    peer = [f"https://127.0.0.1:{ports[2 * n]}" for n in range(len(MEMBERS))]
    client = f"https://127.0.0.1:{ports[2 * i + 1]}"
    cluster = ",".join(f"{m}={p}" for m, p in zip(MEMBERS, peer, strict=True))
    return [
        etcd,
        f"--name={name}",
        f"--data-dir={base / 'data' / name}",
        f"--listen-peer-urls={peer[i]}",
        f"--initial-advertise-peer-urls={peer[i]}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--initial-cluster={cluster}",
        "--initial-cluster-state=new",
        f"--initial-cluster-token=bench-{base.name}",
        f"--heartbeat-interval={args.heartbeat_ms}",
        f"--election-timeout={args.election_ms}",
        # mutual TLS on both links, with liferaft's certificates (SANs: the member id,
        # localhost and 127.0.0.1; server and client auth)
        f"--trusted-ca-file={certs / 'ca.pem'}",
        f"--cert-file={certs / f'{name}.pem'}",
        f"--key-file={certs / f'{name}-key.pem'}",
        "--client-cert-auth",
        f"--peer-trusted-ca-file={certs / 'ca.pem'}",
        f"--peer-cert-file={certs / f'{name}.pem'}",
        f"--peer-key-file={certs / f'{name}-key.pem'}",
        "--peer-client-cert-auth",
        "--logger=zap",
        "--log-level=warn",
    ]


@contextlib.contextmanager
def etcd_cluster(
    etcd: str, base: Path, args: argparse.Namespace
) -> Iterator[tuple[list[str], dict[str, int]]]:
    """Three etcd members under ``base``: yields the client URLs and the member pids once
    every member listens; stops them on exit."""
    generate(base / "certs", [*MEMBERS, CLIENT])
    ports = free_ports(2 * len(MEMBERS))
    urls = [f"https://127.0.0.1:{ports[2 * i + 1]}" for i in range(len(MEMBERS))]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for i, name in enumerate(MEMBERS):
            with (base / f"{name}.log").open("wb") as log:
                procs[name] = subprocess.Popen(
                    member_command(etcd, base, i, ports, args),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                    start_new_session=True,  # Ctrl-C reaches this script, which stops them
                    preexec_fn=_die_with_parent,
                )
        wait_listening(base, procs, [ports[2 * i + 1] for i in range(len(MEMBERS))])
        yield urls, {name: p.pid for name, p in procs.items()}
    finally:
        stop_processes(procs.values(), STOP_WAIT_S)


def wait_listening(base: Path, procs: dict[str, subprocess.Popen[bytes]], ports: list[int]) -> None:
    deadline = time.monotonic() + READY_WAIT_S
    waiting = dict(zip(procs, ports, strict=True))
    while waiting:
        for name, p in procs.items():
            if p.poll() is not None:
                raise Failure(
                    f"etcd member {name} exited with {p.returncode}:\n{log_tail(base, name)}",
                    EXIT_UNAVAILABLE,
                )
        for name, port in list(waiting.items()):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                del waiting[name]
        if time.monotonic() > deadline:
            raise Failure(f"etcd members {', '.join(waiting)} not listening", EXIT_UNAVAILABLE)
        time.sleep(0.1)


def log_tail(base: Path, name: str, lines: int = 15) -> str:
    try:
        return "\n".join((base / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- the run


def run_load(
    binary: Path, base: Path, urls: list[str], pids: dict[str, int], args: argparse.Namespace
) -> tuple[dict[str, Any], list[float]]:
    certs = base / "certs"
    lat_file = base / "latencies.bin"
    cmd = [
        str(binary),
        f"-endpoints={','.join(urls)}",
        f"-cacert={certs / 'ca.pem'}",
        f"-cert={certs / f'{CLIENT}.pem'}",
        f"-key={certs / f'{CLIENT}-key.pem'}",
        f"-conns={args.connections}",
        f"-writers={args.writers}",
        f"-rate={args.rate or 0}",
        f"-seconds={args.seconds}",
        f"-max-ops={args.max_ops}",
        f"-value-size={args.value_size}",
        f"-timeout={args.timeout}s",
        f"-wait={READY_WAIT_S}s",
        f"-pids={','.join(str(p) for p in pids.values())}",
        f"-latencies={lat_file}",
    ]
    if args.output == "text" and sys.stderr.isatty():
        cmd.append("-progress")
    bound = 2 * READY_WAIT_S + args.seconds + args.timeout + 10
    try:
        done = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            timeout=bound,
            check=False,
            preexec_fn=_die_with_parent,
        )
    except subprocess.TimeoutExpired:
        raise Failure(f"the load generator did not finish within {bound:g} s", 1) from None
    if done.returncode != 0:
        tails = "\n".join(f"--- {m}.log\n{log_tail(base, m)}" for m in MEMBERS)
        raise Failure(f"the load generator failed (see above); member logs:\n{tails}", 4)
    result: dict[str, Any] = json.loads(done.stdout)
    lats = array.array("d")
    with lat_file.open("rb") as f:
        lats.frombytes(f.read())
    if sys.byteorder != "little":
        lats.byteswap()
    return result, list(lats)


def report(
    args: argparse.Namespace,
    mode: str,
    result: dict[str, Any],
    latencies: list[float],
    urls: list[str],
    pids: dict[str, int],
    version: str,
    load_generator: str,
) -> dict[str, Any]:
    percentiles, rows = latency_summary(latencies)
    tick = os.sysconf("SC_CLK_TCK")
    ticks: dict[str, int] = result["cpu_ticks"]
    elapsed = float(result["seconds"])
    where = (
        f"a local 3-member etcd {version} cluster (mutual TLS, fsync, heartbeat "
        f"{args.heartbeat_ms} ms, election {args.election_ms} ms)"
    )
    shape = {
        "mode": mode,
        "connections": args.connections,
        "writers": args.writers,
        "rate": args.rate,
        "seconds": args.seconds,
        "max_ops": args.max_ops,
        "value_size": args.value_size,
        "reads": 0.0,
        "cluster": where,
    }
    term_after = result["term_after"]
    doc: dict[str, Any] = {
        "system": f"etcd {version}",
        "ops": len(latencies),
        "seconds": round(elapsed, 3),
        "ops_per_s": round(len(latencies) / elapsed, 1) if elapsed > 0 else 0.0,
        "puts": len(latencies),
        "gets": 0,
        **percentiles,
        "errors": dict(sorted(result["errors"].items())),
        "elections": None if term_after is None else term_after - result["term_before"],
        "term_before": result["term_before"],
        "term_after": term_after,
        "leader": MEMBERS[urls.index(result["leader"])],
        "shape": shape,
        "cpu_s": {
            name: round(ticks[str(pid)] / tick, 2)
            for name, pid in pids.items()
            if str(pid) in ticks
        },
        "bench_cpu_s": round(result["self_cpu_ticks"] / tick, 2),
        "machine_busy_cores": busy_cores(result),
        "leader_disk": leader_disk(result.get("leader_metrics"), len(latencies)),
        "load_generator": load_generator,
        "histogram": rows,
    }
    if args.rate is not None:
        doc["open_loop"] = open_loop_summary(
            args.rate,
            args.seconds,
            args.max_ops,
            args.connections * args.writers,
            result["late"],
            result["issued"],
        )
    return doc


def busy_cores(result: dict[str, Any]) -> float | None:
    """How many of the machine's cores were busy on average over the timed part: all
    processes, the load generator and anyone else's included."""
    total = int(result.get("machine_total_ticks") or 0)
    if total <= 0:
        return None
    return round((os.cpu_count() or 1) * int(result["machine_busy_ticks"]) / total, 2)


def leader_disk(m: dict[str, float] | None, ops: int) -> dict[str, Any] | None:
    """The leader's WAL fsyncs and backend commits over the timed part, from its /metrics."""
    if not m:
        return None
    fsyncs = int(m.get("etcd_disk_wal_fsync_duration_seconds_count", 0))
    commits = int(m.get("etcd_disk_backend_commit_duration_seconds_count", 0))
    fsync_s = m.get("etcd_disk_wal_fsync_duration_seconds_sum", 0.0)
    commit_s = m.get("etcd_disk_backend_commit_duration_seconds_sum", 0.0)
    return {
        "wal_fsyncs": fsyncs,
        "wal_fsync_mean_ms": round(1000 * fsync_s / fsyncs, 3) if fsyncs else None,
        "puts_per_wal_fsync": round(ops / fsyncs, 1) if fsyncs else None,
        "backend_commits": commits,
        "backend_commit_mean_ms": round(1000 * commit_s / commits, 3) if commits else None,
        "proposals_applied": int(m.get("etcd_server_proposals_applied_total", 0)),
    }


def print_text(doc: dict[str, Any]) -> None:
    sh = doc["shape"]
    if sh["mode"] == "serial":
        how = "serial (one client, one request at a time)"
    elif sh["mode"] == "open":
        how = f"open loop at {sh['rate']:,g}/s over {sh['connections']} connections"
    else:
        how = f"closed loop, {sh['connections']} connections x {sh['writers']} writers"
    print(f"etcd bench: {how}, {sh['value_size']}-byte values, {sh['seconds']:g} s")
    print(f"cluster:    {sh['cluster']}, leader {doc['leader']}")
    print(f"load:       {doc['load_generator']}")
    print(
        f"ops:        {doc['ops']:,} puts committed in {doc['seconds']:.1f} s = "
        f"{doc['ops_per_s']:,.0f} puts/s"
    )
    for line in result_lines(doc):
        print(line)
    members = ", ".join(f"{m} {s:.2f} s" for m, s in doc["cpu_s"].items())
    busy = doc["machine_busy_cores"]
    machine = "" if busy is None else f"; machine {busy:.2f} of {os.cpu_count()} cores busy"
    print(f"cpu:        {members}; load generator {doc['bench_cpu_s']:.2f} s{machine}")
    disk = doc["leader_disk"]
    if disk is not None and disk["wal_fsyncs"]:
        commit = disk["backend_commit_mean_ms"]
        print(
            f"leader:     {disk['wal_fsyncs']:,} WAL fsyncs "
            f"(mean {disk['wal_fsync_mean_ms']:.2f} ms, {disk['puts_per_wal_fsync']:,.1f} puts "
            f"each), {disk['backend_commits']:,} backend commits"
            + ("" if commit is None else f" (mean {commit:.2f} ms)")
        )


# ---------------------------------------------------------------- the command


def positive(kind: type[int] | type[float], top: float = math.inf) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if not 0 < value <= top:
            raise argparse.ArgumentTypeError(f"must be > 0 and <= {top:g}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Load a throw-away local 3-member etcd cluster as `liferaft bench` loads "
        "liferaft; see the docstring of bench/etcd.py.",
    )
    p.add_argument("--serial", action="store_true", help="one client, one request at a time")
    p.add_argument("--connections", type=positive(int, 256), default=4, help="default 4")
    p.add_argument(
        "--writers",
        type=positive(int, 4096),
        default=64,
        help="concurrent puts per connection (open loop: the in-flight cap); default 64",
    )
    p.add_argument("--rate", type=positive(float), help="open loop: requests per second")
    p.add_argument("--seconds", type=positive(float, 86400), default=10.0, help="default 10")
    p.add_argument("--max-ops", type=positive(int), default=10_000_000, help="default 10M")
    p.add_argument("--value-size", type=int, default=100, help="bytes per value; default 100")
    p.add_argument("--timeout", type=positive(float), default=5.0, help="per put; default 5 s")
    p.add_argument("--heartbeat-ms", type=positive(int), default=100, help="default 100")
    p.add_argument("--election-ms", type=positive(int), default=1000, help="default 1000")
    p.add_argument("--etcd", default="etcd", help="the etcd binary; default etcd on PATH")
    p.add_argument("--logs", type=Path, help="copy the members' logs into this directory")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    args = p.parse_args(argv)
    if args.serial and args.rate is not None:
        p.error("--serial is a closed loop; it does not take --rate")
    if args.election_ms < 5 * args.heartbeat_ms:
        p.error("etcd wants --election-ms at least 5 x --heartbeat-ms")
    if not 0 <= args.value_size <= 1024 * 1024:
        p.error("--value-size must be 0 .. 1 MiB")
    if args.serial:
        args.connections = args.writers = 1
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so that the finally blocks stop the members


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "serial" if args.serial else "open" if args.rate is not None else "closed"
    signal.signal(signal.SIGTERM, _terminate)
    try:
        etcd, version, go = find_tools(args.etcd)
        binary, load_generator = build_load(go)
        with tempfile.TemporaryDirectory(prefix="etcd-bench-") as tmp:
            base = Path(tmp)
            if args.output == "text":
                print(f"starting a local 3-member etcd cluster in {base}", file=sys.stderr)
            try:
                with etcd_cluster(etcd, base, args) as (urls, pids):
                    result, latencies = run_load(binary, base, urls, pids, args)
            finally:
                if args.logs is not None:
                    args.logs.mkdir(parents=True, exist_ok=True)
                    for name in MEMBERS:
                        with contextlib.suppress(OSError):
                            shutil.copy(base / f"{name}.log", args.logs / f"{name}.log")
            doc = report(args, mode, result, latencies, urls, pids, version, load_generator)
    except Failure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("interrupted; the members are stopped and their directory removed", file=sys.stderr)
        return 130
    if args.output == "json":
        print(json.dumps(doc))
    else:
        print_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
