"""The node's Prometheus series (docs/operations.md) and the HTTP server that exposes them
with /healthz, /livez and /readyz; bad and idle clients must not hurt it. Last, a real
cluster fills the series as clients use it."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from liferaft import __version__
from liferaft.client import open_client
from liferaft.observability.http import MAX_REQUEST_BYTES, HealthServer, parse_request
from liferaft.observability.metrics import FSYNC_BUCKETS, NodeMetrics
from liferaft.testing.localcluster import LocalCluster
from liferaft.testing.localcluster import wait_until as wait_for_nodes
from liferaft.transport.stats import TransportStats

HANG_GUARD = 10.0  # seconds; only there so that a bug fails the test instead of hanging it

# name -> (type, label names) as docs/operations.md lists them ("Health and metrics"),
# apart from those in EXTRA_SERIES.
SERIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "liferaft_server_has_leader": ("gauge", ()),
    "liferaft_server_is_leader": ("gauge", ()),
    "liferaft_server_leader_changes_seen_total": ("counter", ()),
    "liferaft_server_term": ("gauge", ()),
    "liferaft_server_commit_index": ("gauge", ()),
    "liferaft_server_applied_index": ("gauge", ()),
    "liferaft_server_proposals_committed_total": ("counter", ()),
    "liferaft_server_proposals_failed_total": ("counter", ()),
    "liferaft_server_proposals_pending": ("gauge", ()),
    "liferaft_disk_fsync_duration_seconds": ("histogram", ()),
    "liferaft_network_peer_sent_bytes_total": ("counter", ("peer",)),
    "liferaft_network_peer_received_bytes_total": ("counter", ("peer",)),
    "liferaft_network_peer_round_trip_time_seconds": ("histogram", ("peer",)),
    "liferaft_client_requests_total": ("counter", ("code", "op")),
    "liferaft_client_request_duration_seconds": ("histogram", ("op",)),
    "liferaft_auth_failures_total": ("counter", ("reason",)),
}
EXTRA_SERIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "liferaft_storage_db_size_bytes": ("gauge", ()),
    "liferaft_server_info": ("gauge", ("node_id", "version")),
    "liferaft_gc_pause_seconds": ("histogram", ()),
    "liferaft_server_apply_duration_seconds": ("histogram", ()),
    "liferaft_snapshot_duration_seconds": ("histogram", ("stage",)),
    "liferaft_client_connections": ("gauge", ()),
    "liferaft_client_handshaking_connections": ("gauge", ()),
    "liferaft_client_watchers": ("gauge", ()),
    "liferaft_network_peer_dropped_messages_total": ("counter", ("peer",)),
    "liferaft_network_unknown_peer_messages_total": ("counter", ()),
    "liferaft_network_peer_connects_total": ("counter", ("direction",)),
    "liferaft_network_peer_connect_failures_total": ("counter", ("peer",)),
    "liferaft_network_peer_disconnects_total": ("counter", ("peer",)),
    "liferaft_network_peer_rejected_connections_total": ("counter", ("reason",)),
    "liferaft_network_peer_closed_connections_total": ("counter", ("reason",)),
    "process_cpu_seconds_total": ("counter", ()),
    "process_resident_memory_bytes": ("gauge", ()),
    "python_gc_collections_total": ("counter", ("generation",)),
}


def transport_stats() -> TransportStats:
    """Transport counters as a node's peer transport would have them."""
    st = TransportStats()
    st.dropped["n2"] = 3
    st.dropped_unknown = 1
    st.connects, st.accepts = 2, 4
    st.connect_failures["n3"] = 5
    st.disconnects["n2"] = 1
    st.rejects["not_member"] = 2
    st.closes["idle"] = 1
    return st


def exercise(m: NodeMetrics) -> None:
    """Touch every series once, so the labelled ones have a child to expose."""
    m.has_leader.set(1)
    m.is_leader.set(0)
    m.leader_changes.inc()
    m.term.set(3)
    m.commit_index.set(10)
    m.applied_index.set(9)
    m.proposals_committed.inc(4)
    m.proposals_failed.inc()
    m.proposals_pending.set(2)
    m.fsync_duration.observe(0.003)
    m.gc_pause.observe(0.001)
    m.db_size_bytes.set(4096)
    m.peer_sent_bytes.labels(peer="n2").inc(100)
    m.peer_received_bytes.labels(peer="n2").inc(50)
    m.peer_round_trip_time.labels(peer="n2").observe(0.0012)
    m.client_requests.labels(op="put", code="ok").inc()
    m.client_request_duration.labels(op="put").observe(0.02)
    m.auth_failures.labels(reason="expired").inc()
    m.apply_duration.observe(0.0002)
    m.snapshot_duration.labels("send").observe(1.5)
    m.client_connections.set(2)
    m.client_handshakes.set(1)
    m.client_watchers.set(3)
    m.peer_stats = transport_stats()


# -------------------------------------------------------------------- a raw client


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


async def exchange(port: int, raw: bytes) -> Reply:
    """Send ``raw`` bytes, read until the server hangs up, parse the answer."""
    with trio.fail_after(HANG_GUARD):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(raw)
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    version, status, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(int(status), headers, body)


async def get(port: int, path: str, method: str = "GET") -> Reply:
    return await exchange(port, f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())


async def wait_until(condition: Callable[[], bool]) -> None:
    """Wait (bounded by the hang guard) until ``condition()`` holds. It reads server
    state that has no event to wait on, hence the short poll."""
    with trio.fail_after(HANG_GUARD):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.005)


@dataclass
class Node:
    """What a HealthServer asks its node; tests flip these."""

    healthy: bool = True
    ready: tuple[bool, str] = (True, "")
    metrics: NodeMetrics = field(default_factory=lambda: NodeMetrics("n1"))


async def start(
    nursery: trio.Nursery, node: Node, *, max_connections: int = 64, request_timeout: float = 5.0
) -> tuple[HealthServer, int]:
    server = HealthServer(
        node.metrics,
        lambda: node.healthy,
        lambda: node.ready,
        max_connections=max_connections,
        request_timeout=request_timeout,
    )
    port = await nursery.start(server.run, "127.0.0.1", 0)
    assert port == server.port != 0
    return server, port


# -------------------------------------------------------------------- /metrics


async def test_every_spec_series_is_exposed_under_its_exact_name(nursery: trio.Nursery) -> None:
    node = Node()
    exercise(node.metrics)
    _, port = await start(nursery, node)

    reply = await get(port, "/metrics")

    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = reply.body.decode()
    families = list(text_string_to_metric_families(text))
    samples = {s.name: s for f in families for s in f.samples}
    for name, (kind, labels) in (SERIES | EXTRA_SERIES).items():
        assert f"# TYPE {name} {kind}\n" in text, name
        sample = samples[f"{name}_count" if kind == "histogram" else name]
        assert tuple(sorted(sample.labels)) == labels, name
    assert samples["liferaft_server_info"].labels == {"node_id": "n1", "version": __version__}
    assert samples["liferaft_server_info"].value == 1
    assert samples["liferaft_server_term"].value == 3
    assert samples["liferaft_network_peer_sent_bytes_total"].value == 100


async def test_unused_labelled_series_are_still_declared(nursery: trio.Nursery) -> None:
    _, port = await start(nursery, Node())
    text = (await get(port, "/metrics")).body.decode()
    for name, (kind, _labels) in SERIES.items():
        assert f"# TYPE {name} {kind}\n" in text, name


def test_transport_counters_are_read_when_scraped() -> None:
    """The transport counts in plain integers; each scrape reads them as they are then."""
    m = NodeMetrics("n1")

    def sample(name: str, **labels: str) -> float | None:
        values = [
            s.value
            for f in text_string_to_metric_families(m.exposition().decode())
            for s in f.samples
            if s.name == name and s.labels == labels
        ]
        return values[0] if values else None

    dropped = "liferaft_network_peer_dropped_messages_total"
    assert sample(dropped, peer="n2") is None  # no transport yet: declared, no samples
    st = m.peer_stats = transport_stats()
    assert sample(dropped, peer="n2") == 3
    assert sample("liferaft_network_peer_connects_total", direction="out") == 2
    assert sample("liferaft_network_peer_connects_total", direction="in") == 4
    assert sample("liferaft_network_peer_rejected_connections_total", reason="not_member") == 2
    st.dropped["n2"] += 4
    st.connects += 1
    st.rejects["tls"] += 1
    assert sample(dropped, peer="n2") == 7
    assert sample("liferaft_network_peer_connects_total", direction="out") == 3
    assert sample("liferaft_network_peer_rejected_connections_total", reason="tls") == 1
    assert sample("liferaft_network_unknown_peer_messages_total") == 1


def test_fsync_buckets_run_from_half_a_millisecond_to_about_four_seconds() -> None:
    m = NodeMetrics("n1")
    m.fsync_duration.observe(0.0001)
    families = text_string_to_metric_families(m.exposition().decode())
    (fsync,) = (f for f in families if f.name == "liferaft_disk_fsync_duration_seconds")
    bounds = [float(s.labels["le"]) for s in fsync.samples if s.name.endswith("_bucket")]
    assert bounds[0] == 0.0005
    assert 4.0 <= bounds[-2] < 5.0
    assert bounds[-1] == float("inf")
    assert bounds[:-1] == sorted(bounds[:-1]) == list(FSYNC_BUCKETS)


async def test_two_nodes_in_one_process_keep_their_own_series(nursery: trio.Nursery) -> None:
    n1, n2 = Node(metrics=NodeMetrics("n1")), Node(metrics=NodeMetrics("n2"))
    n1.metrics.term.set(5)
    n1.metrics.leader_changes.inc(3)
    n2.metrics.term.set(7)
    (_, p1), (_, p2) = await start(nursery, n1), await start(nursery, n2)

    def values(text: str) -> dict[str, object]:
        samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
        return {
            "term": samples["liferaft_server_term"].value,
            "changes": samples["liferaft_server_leader_changes_seen_total"].value,
            "node": samples["liferaft_server_info"].labels["node_id"],
        }

    assert values((await get(p1, "/metrics")).body.decode()) == {
        "term": 5,
        "changes": 3,
        "node": "n1",
    }
    assert values((await get(p2, "/metrics")).body.decode()) == {
        "term": 7,
        "changes": 0,
        "node": "n2",
    }


def test_promtool_accepts_the_exposition() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    m = NodeMetrics("n1")
    exercise(m)
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=m.exposition(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


# -------------------------------------------------------------------- health and readiness


@pytest.mark.parametrize("path", ["/healthz", "/livez"])
async def test_health_is_200_ok_while_healthy_and_503_with_a_reason_after(
    nursery: trio.Nursery, path: str
) -> None:
    node = Node()
    _, port = await start(nursery, node)

    reply = await get(port, path)
    assert (reply.status, reply.body) == (200, b"ok")
    assert reply.headers["connection"] == "close"
    assert reply.headers["content-length"] == "2"

    node.healthy = False
    reply = await get(port, path)
    assert reply.status == 503
    assert b"unhealthy" in reply.body


async def test_readyz_gives_ready_or_the_reason_it_is_not(nursery: trio.Nursery) -> None:
    node = Node()
    _, port = await start(nursery, node)

    reply = await get(port, "/readyz")
    assert (reply.status, reply.body) == (200, b"ready")

    node.ready = (False, "no leader known")
    reply = await get(port, "/readyz")
    assert (reply.status, reply.body) == (503, b"no leader known")


async def test_head_gets_the_headers_without_the_body(nursery: trio.Nursery) -> None:
    node = Node()
    _, port = await start(nursery, node)

    full = await get(port, "/metrics")
    head = await get(port, "/metrics", method="HEAD")
    assert head.status == 200
    assert head.body == b""
    assert head.headers["content-type"] == full.headers["content-type"]
    assert int(head.headers["content-length"]) > 0

    head = await get(port, "/readyz", method="HEAD")
    assert (head.status, head.body, head.headers["content-length"]) == (200, b"", "5")


async def test_query_strings_and_http_1_0_are_accepted(nursery: trio.Nursery) -> None:
    _, port = await start(nursery, Node())
    reply = await exchange(port, b"GET /healthz?verbose=1 HTTP/1.0\r\n\r\n")
    assert (reply.status, reply.body) == (200, b"ok")


# -------------------------------------------------------------------- bad requests


async def test_unknown_path_is_404(nursery: trio.Nursery) -> None:
    _, port = await start(nursery, Node())
    assert (await get(port, "/nope")).status == 404
    assert (await get(port, "/metrics/extra")).status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_other_methods_are_405_with_allow(nursery: trio.Nursery, method: str) -> None:
    _, port = await start(nursery, Node())
    reply = await exchange(
        port, f"{method} /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc".encode()
    )
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"GET  /metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1 extra\r\n\r\n",
        b"GET /metrics FTP/1.1\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"GET /m\xe9trics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nbad name: x\r\n\r\n",
        b"\x00\x01\x02\xff\r\n\r\n",
        b"\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n",  # then EOF before the blank line
    ],
)
async def test_malformed_requests_are_400(nursery: trio.Nursery, raw: bytes) -> None:
    _, port = await start(nursery, Node())
    with trio.fail_after(HANG_GUARD):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(raw)
            await stream.send_eof()
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert (await get(port, "/healthz")).status == 200  # the server lives on


async def test_http_2_request_line_is_refused(nursery: trio.Nursery) -> None:
    _, port = await start(nursery, Node())
    assert (await exchange(port, b"GET /metrics HTTP/2.0\r\n\r\n")).status == 505


async def test_a_request_head_over_8_kib_is_refused(nursery: trio.Nursery) -> None:
    _, port = await start(nursery, Node())
    filler = b"x" * MAX_REQUEST_BYTES
    reply = await exchange(port, b"GET /metrics HTTP/1.1\r\nX-Filler: " + filler + b"\r\n\r\n")
    assert reply.status == 431
    long_line = await exchange(port, b"GET /" + filler + b" HTTP/1.1\r\n\r\n")
    assert long_line.status == 431
    # just under the limit is fine
    fits = b"GET /healthz HTTP/1.1\r\nX-Filler: "
    fits += b"x" * (MAX_REQUEST_BYTES - len(fits) - 4) + b"\r\n\r\n"
    assert len(fits) == MAX_REQUEST_BYTES
    assert (await exchange(port, fits)).status == 200


def test_parse_request_splits_target_and_headers() -> None:
    req = parse_request(b"GET /readyz?x=1 HTTP/1.1\r\nHost: a\r\nX-Y:  z \r\n\r\n")
    assert (req.method, req.target, req.path) == ("GET", "/readyz?x=1", "/readyz")
    assert req.headers == (("host", "a"), ("x-y", "z"))
    assert parse_request(b"GET http://h:9/metrics HTTP/1.1\n\n").path == "/metrics"


async def test_an_exception_in_a_handler_is_a_500_and_the_server_lives_on(
    nursery: trio.Nursery,
) -> None:
    node = Node()

    def broken_health() -> bool:
        raise RuntimeError("boom")

    server = HealthServer(node.metrics, broken_health, lambda: node.ready)
    port = await nursery.start(server.run, "127.0.0.1", 0)

    reply = await get(port, "/healthz")
    assert reply.status == 500
    assert b"boom" not in reply.body  # internals are logged, not sent
    assert (await get(port, "/readyz")).status == 200


# -------------------------------------------------------------------- idle and excess clients


@pytest.mark.parametrize("sent", [b"", b"GET /metrics HTTP/1.1\r\nHost: x\r\n"])
async def test_a_slowloris_is_cut_off_after_request_timeout_and_blocks_no_one(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock, sent: bytes
) -> None:
    # The request timeout is crossed only by jumping the mock clock, so no real delay
    # (a loaded machine) can cut the slow client off early or late. The clock also runs
    # at real speed, for the hang guards and polls; a timeout of an hour is never
    # reached that way.
    mock_clock.rate = 1.0
    timeout = 3600.0
    server, port = await start(nursery, Node(), request_timeout=timeout)

    with trio.fail_after(HANG_GUARD):
        slow = await trio.open_tcp_stream("127.0.0.1", port)
    await slow.send_all(sent)
    await wait_until(lambda: server.active_connections == 1)

    reply = await get(port, "/healthz")  # served while the slow client hangs on
    assert reply.status == 200
    await wait_until(lambda: server.active_connections == 1)  # the slow one, still held

    mock_clock.jump(timeout * 0.99)
    await trio.testing.wait_all_tasks_blocked()  # anything due at this time has run
    assert server.active_connections == 1  # not cut off before its timeout

    mock_clock.jump(timeout * 0.02)
    with trio.fail_after(HANG_GUARD):
        data = await slow.receive_some(65536)
    assert data == b""  # hung up on, without an answer
    await slow.aclose()
    await wait_until(lambda: server.active_connections == 0)


async def test_connections_over_the_cap_are_closed_at_once(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    # On the mock clock (at real speed, never jumped) the idle clients' hour-long request
    # timeout cannot pass, so whatever closes the extra connection is the cap.
    mock_clock.rate = 1.0
    server, port = await start(nursery, Node(), max_connections=2, request_timeout=3600.0)

    with trio.fail_after(HANG_GUARD):
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
    await wait_until(lambda: server.active_connections == 2)

    with trio.fail_after(HANG_GUARD):
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        assert await extra.receive_some(65536) == b""
        await extra.aclose()
    assert server.refused_connections == 1
    assert server.active_connections == 2  # closed while the idle two are still held

    for stream in idle:
        await stream.aclose()
    await wait_until(lambda: server.active_connections == 0)
    assert (await get(port, "/healthz")).status == 200


async def test_a_client_that_hangs_up_mid_request_does_no_harm(nursery: trio.Nursery) -> None:
    server, port = await start(nursery, Node())
    for _ in range(5):
        with trio.fail_after(HANG_GUARD):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /met")
            await stream.aclose()
    await wait_until(lambda: server.active_connections == 0)
    assert (await get(port, "/metrics")).status == 200


def test_server_rejects_nonsense_limits() -> None:
    m = NodeMetrics("n1")
    with pytest.raises(ValueError):
        HealthServer(m, lambda: True, lambda: (True, ""), max_connections=0)
    with pytest.raises(ValueError):
        HealthServer(m, lambda: True, lambda: (True, ""), request_timeout=0)


# -------------------------------------------------------------------- a real cluster

CLUSTER_HANG_GUARD = 120.0  # seconds; a guard against hangs, not a performance claim
PUTS = 12
GETS = 7

Scrape = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Scrape:
    """One node's /metrics: (sample name, labels) -> value."""
    reply = await get(port, "/metrics")
    assert reply.status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(reply.body.decode())
        for s in family.samples
    }


def value(scraped: Scrape, name: str, **labels: str) -> float:
    """The sample's value, 0 for a labelled child not created yet."""
    return scraped.get((name, frozenset(labels.items())), 0.0)


async def test_a_real_cluster_fills_its_series_as_clients_write_and_read(
    tmp_path: Path, certs: Path
) -> None:
    """The series the runtime updates (not ones the test sets) move on a real 3-node
    cluster: fsyncs, client requests by op and code, committed proposals, the applied
    index. ``liferaft_network_peer_round_trip_time_seconds`` is not filled in yet
    (docs/operations.md), so it is not checked here."""
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"])
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(CLUSTER_HANG_GUARD):
            await c.wait_leader()
            ports = {nid: c.nodes[nid].settings.metrics.listen.port for nid in c.ids}
            before = {nid: await scrape(p) for nid, p in ports.items()}

            # An attempt outlives the server's own 5 s request timeout, so the client never
            # gives up on an answer the server still sends: each call is answered "ok"
            # exactly once, on whichever node served it.
            async with open_client(
                c.endpoints(),
                token=c.token(),
                cacert=certs / "ca.pem",
                timeout=60,
                attempt_timeout=30,
            ) as client:
                for i in range(PUTS):
                    await client.put(f"m/{i}", f"v{i}")
                for i in range(GETS):
                    kv = await client.get(f"m/{i}")
                    assert kv is not None and kv.value == f"v{i}".encode()

            target = max(n.applied for n in c.nodes.values())  # every put is applied there
            await wait_for_nodes(lambda: all(n.applied >= target for n in c.nodes.values()))
            after = {nid: await scrape(p) for nid, p in ports.items()}
        nursery.cancel_scope.cancel()

    def delta(name: str, node: str, **labels: str) -> float:
        return value(after[node], name, **labels) - value(before[node], name, **labels)

    def total(name: str, **labels: str) -> float:
        return sum(delta(name, nid, **labels) for nid in c.ids)

    requests = "liferaft_client_requests_total"
    assert total(requests, op="put", code="ok") == PUTS
    assert total(requests, op="get", code="ok") == GETS
    codes = {
        dict(labels)["code"] for node in after.values() for name, labels in node if name == requests
    }
    for op in ("put", "get"):  # one duration observed per request, whatever its code
        answered = sum(total(requests, op=op, code=code) for code in codes)
        assert total("liferaft_client_request_duration_seconds_count", op=op) == answered

    for nid in c.ids:  # every node stores and applies every put
        assert delta("liferaft_disk_fsync_duration_seconds_count", nid) > 0, nid
        assert delta("liferaft_server_proposals_committed_total", nid) >= PUTS, nid
        assert delta("liferaft_server_applied_index", nid) >= PUTS, nid
        assert value(after[nid], "liferaft_server_applied_index") >= target, nid
