"""deploy/grafana/liferaft.json: an importable Grafana dashboard whose every query names
only series a live node exports (scraped over HTTP from a real 3-node cluster), in valid
PromQL, and shows something when a real Prometheus scrapes a live cluster; and the
series added for it (transport, apply, snapshot, client connections and watches,
process) move as the cluster is used.

The Prometheus test takes about 7 s, most of it Prometheus's own 5 s delay before it
applies its first targets; it skips without the ``prometheus`` program, which the
Debian package that brings ``promtool`` installs too (``make tools``)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from liferaft import __version__
from liferaft.client import PermissionDenied, Unauthenticated, open_client
from liferaft.testing.localcluster import LocalCluster, free_ports

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "liferaft.json"
HANG_GUARD = 60.0  # seconds; a guard against hangs, not a performance claim
WRITES = 10

# A series name in a PromQL expression: ours, prometheus_client's process and GC ones.
SERIES_NAME = re.compile(r"\b(?:liferaft|process|python)_\w+")
# The sample names each metric type exposes, from the family name the parser gives.
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count", ""),
}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too, rows left out."""
    for panel in board["panels"]:
        yield from (p for p in panel.get("panels", []) if p.get("type") != "row")
        if panel.get("type") != "row":
            yield panel


def queries(board: dict[str, Any]) -> dict[str, list[str]]:
    """Panel title (or ``$variable``) -> the PromQL expressions it runs."""
    found = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in panels(board)}
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            found[f"${var['name']}"] = [var["query"]["query"]]
    return found


def series_used(board: dict[str, Any]) -> set[str]:
    return {n for exprs in queries(board).values() for e in exprs for n in SERIES_NAME.findall(e)}


def exposed_names(families: dict[str, str]) -> set[str]:
    """The sample names Prometheus stores for ``families`` (name -> type, as parsed)."""
    return {
        name + suffix for name, kind in families.items() for suffix in SUFFIXES.get(kind, ("",))
    }


def missing(board: dict[str, Any], families: dict[str, str]) -> dict[str, set[str]]:
    """Panel -> the series names its queries use that ``families`` does not expose."""
    exposed = exposed_names(families)
    gaps = {
        title: {n for e in exprs for n in SERIES_NAME.findall(e)} - exposed
        for title, exprs in queries(board).items()
    }
    return {title: names for title, names in gaps.items() if names}


# -------------------------------------------------------------------- a live cluster


async def scrape(port: int) -> str:
    """GET /metrics from a node's metrics listener (the HTTP server closes after one)."""
    with trio.fail_after(HANG_GUARD):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return body.decode()


def families_of(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples_of(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 for a labelled child not created yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


# -------------------------------------------------------------------- the file


def test_the_dashboard_is_importable_grafana_json_with_datasource_and_node_variables() -> None:
    board = dashboard()
    assert board["uid"] == "liferaft" and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    assert variables["instance"]["label"] == "node"
    assert variables["instance"]["includeAll"] and variables["instance"]["multi"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    taken: set[tuple[int, int]] = set()
    every = list(panels(board))
    assert len(every) >= 20
    for panel in board["panels"]:  # rows too: nothing overlaps, nothing is wider than 24
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["w"] >= 1 and g["x"] + g["w"] <= 24, panel["title"]
        cells = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
    for panel in every:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", panel["title"]
            assert SERIES_NAME.search(t["expr"]), (panel["title"], t["expr"])
            assert 'instance=~"$instance"' in t["expr"], (panel["title"], t["expr"])


def test_the_dashboard_shows_what_an_operator_needs() -> None:
    """The issue's list: leader and term, leader changes, writes by op with latency
    percentiles, fsync, commit/apply lag, peer RTT and bytes, auth failures,
    connections, and the series added with the dashboard."""
    used = series_used(dashboard())
    for name in (
        "liferaft_server_is_leader",
        "liferaft_server_has_leader",
        "liferaft_server_term",
        "liferaft_server_leader_changes_seen_total",
        "liferaft_client_requests_total",
        "liferaft_client_request_duration_seconds_bucket",
        "liferaft_disk_fsync_duration_seconds_bucket",
        "liferaft_server_commit_index",
        "liferaft_server_applied_index",
        "liferaft_network_peer_round_trip_time_seconds_bucket",
        "liferaft_network_peer_sent_bytes_total",
        "liferaft_network_peer_received_bytes_total",
        "liferaft_auth_failures_total",
        "liferaft_client_connections",
        "liferaft_client_watchers",
        "liferaft_server_apply_duration_seconds_bucket",
        "liferaft_snapshot_duration_seconds_bucket",
        "liferaft_network_peer_dropped_messages_total",
        "liferaft_network_peer_connects_total",
        "liferaft_network_peer_rejected_connections_total",
        "process_cpu_seconds_total",
        "python_gc_collections_total",
    ):
        assert name in used, name


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each expression (as a recording rule), with the dashboard's
    variables replaced by what Grafana would put there."""
    promtool = shutil.which("promtool")
    if promtool is None:  # make test installs it (make tools); say so when it could not
        pytest.skip("promtool is not installed (make tools installs it as root)")
    exprs = [e for es in queries(dashboard()).values() for e in es]
    substitutions = {"$__rate_interval": "1m", "$instance": ".*", "$job": ".*"}
    rules = []
    for i, expr in enumerate(exprs):
        for var, text in substitutions.items():
            expr = expr.replace(var, text)
        assert "$" not in expr, expr
        if expr.startswith("label_values("):  # Grafana's, not PromQL: check its selector
            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
        rules.append({"record": f"dashboard:query{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # YAML
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout, result.stdout


def test_the_check_catches_a_panel_that_queries_a_series_no_node_exports() -> None:
    families = {"liferaft_server_term": "gauge", "liferaft_x_seconds": "histogram"}
    families["liferaft_client_requests"] = "counter"
    board: dict[str, Any] = {
        "templating": {"list": []},
        "panels": [
            {"type": "row", "title": "r", "panels": [{"title": "in a row", "targets": []}]},
            {"title": "ok", "targets": [{"expr": "max(liferaft_server_term)"}]},
            {"title": "hist", "targets": [{"expr": "rate(liferaft_x_seconds_bucket[1m])"}]},
            {"title": "typo", "targets": [{"expr": "liferaft_server_trem"}]},
            {"title": "no suffix", "targets": [{"expr": "rate(liferaft_x_seconds[1m])"}]},
            {"title": "not a histogram", "targets": [{"expr": "liferaft_server_term_bucket"}]},
            {"title": "counter", "targets": [{"expr": "liferaft_client_requests"}]},
            {"title": "process", "targets": [{"expr": "process_open_fds"}]},
        ],
    }
    assert missing(board, families) == {
        "typo": {"liferaft_server_trem"},
        "no suffix": {"liferaft_x_seconds"},
        "not a histogram": {"liferaft_server_term_bucket"},
        "counter": {"liferaft_client_requests"},
        "process": {"process_open_fds"},
    }


# -------------------------------------------------------------------- against live nodes


async def test_every_series_the_dashboard_queries_is_on_each_live_nodes_metrics(
    tmp_path: Path, certs: Path
) -> None:
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"])
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG_GUARD):
            lead = await c.wait_leader()
            async with open_client(
                [c.endpoints()[c.ids.index(lead)]], token=c.token(), cacert=certs / "ca.pem"
            ) as client:
                for i in range(WRITES):
                    await client.put(f"d/{i}", f"v{i}")
            texts = {nid: await scrape(c.nodes[nid].settings.metrics.listen.port) for nid in c.ids}
        nursery.cancel_scope.cancel()

    board = dashboard()
    assert len(series_used(board)) >= 30  # the parse found series: the check is not empty
    for nid, text in texts.items():
        assert missing(board, families_of(text)) == {}, nid


async def test_the_new_series_move_as_the_cluster_is_used(tmp_path: Path, certs: Path) -> None:
    """Client connections and watches go up and back down, handshaking connections
    show a client that says nothing, applies are timed, peer links are counted both ways
    and a refused peer connection and a lost peer show, next to the process series."""
    c = LocalCluster(tmp_path, certs, ["n1", "n2", "n3"])
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG_GUARD):
            lead = await c.wait_leader()
            node = c.nodes[lead]
            port = node.settings.metrics.listen.port

            async def now() -> Samples:
                return samples_of(await scrape(port))

            async def until(name: str, wanted: float, **labels: str) -> None:
                """Wait for a sample to read ``wanted``: the node updates some series on
                its own schedule (peer links once a second), hence the poll."""
                while value(await now(), name, **labels) != wanted:  # noqa: ASYNC110
                    await trio.sleep(0.01)

            async def at_least(name: str, wanted: float, **labels: str) -> None:
                while value(await now(), name, **labels) < wanted:  # noqa: ASYNC110
                    await trio.sleep(0.01)

            # The leader dialled both followers, and both dialled it.
            await at_least("liferaft_network_peer_connects_total", 2, direction="out")
            await at_least("liferaft_network_peer_connects_total", 2, direction="in")

            before = await now()
            assert value(before, "liferaft_client_connections") == 0
            assert value(before, "liferaft_client_watchers") == 0

            async with open_client(
                [c.endpoints()[c.ids.index(lead)]], token=c.token(), cacert=certs / "ca.pem"
            ) as client:
                for i in range(WRITES):
                    await client.put(f"n/{i}", f"v{i}")
                during = await now()
                async with client.watch(key="w"):
                    watching = await now()
                await until("liferaft_client_watchers", 0)
            await until("liferaft_client_connections", 0)

            # A client that opens TCP and says nothing is in its handshake.
            client_port = node.settings.client.listen.port
            silent = await trio.open_tcp_stream("127.0.0.1", client_port)
            await until("liferaft_client_handshaking_connections", 1)
            await silent.aclose()
            await until("liferaft_client_handshaking_connections", 0)

            # Plain bytes on the peer port are refused in the TLS handshake.
            peer_port = node.settings.peer.listen.port
            bad = await trio.open_tcp_stream("127.0.0.1", peer_port)
            await bad.send_all(b"GET / HTTP/1.1\r\n\r\n")
            rejected = "liferaft_network_peer_rejected_connections_total"
            await until(rejected, value(before, rejected, reason="tls") + 1, reason="tls")
            await bad.aclose()

            # A follower that goes away: its link ends, and dials to it fail.
            victim = next(i for i in c.ids if i != lead)
            c.crash(victim)
            await until("liferaft_network_peer_connected", 0, peer=victim)
            await at_least("liferaft_network_peer_connect_failures_total", 1, peer=victim)
            after = await now()
        nursery.cancel_scope.cancel()

    assert value(during, "liferaft_client_connections") == 1
    assert value(watching, "liferaft_client_watchers") == 1
    applies = "liferaft_server_apply_duration_seconds_count"
    assert value(during, applies) - value(before, applies) >= 1
    assert value(during, "liferaft_server_apply_duration_seconds_sum") > 0
    assert value(after, "liferaft_network_peer_disconnects_total", peer=victim) >= 1
    assert value(after, "process_cpu_seconds_total") > 0
    assert value(after, "process_resident_memory_bytes") > 0
    assert value(after, "python_gc_collections_total", generation="0") > 0
    info = value(after, "liferaft_server_info", node_id=lead, version=__version__)
    assert info == 1


# -------------------------------------------------------------------- through Prometheus

SCRAPE_INTERVAL = "500ms"
RATE_WINDOW = "3s"  # what Grafana's $__rate_interval is at this scrape interval, about
SCRAPES = 4  # of every node before the panels are asked
MAX_WRITES = 1000  # bounds the write loop while Prometheus scrapes
# Panels that may rightly show nothing on a healthy cluster.
MAY_BE_EMPTY: frozenset[str] = frozenset()


def prometheus_config(path: Path, targets: list[str]) -> Path:
    path.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL},
                "scrape_configs": [
                    {"job_name": "liferaft", "static_configs": [{"targets": targets}]}
                ],
            }
        )
    )
    return path


async def prom_query(port: int, expr: str) -> list[dict[str, Any]]:
    """An instant query to the Prometheus HTTP API; its result (a vector), or the
    assertion error naming the query Prometheus refused."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})

    def get() -> dict[str, Any]:
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                answer: dict[str, Any] = json.load(r)
        except urllib.error.HTTPError as exc:  # 400/422: a query Prometheus refuses
            answer = json.load(exc)
        return answer

    answer = await trio.to_thread.run_sync(get)
    assert answer["status"] == "success", (expr, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


async def wait_ready(port: int) -> None:
    """Prometheus answers /-/ready with 200 once it serves queries; until then the
    connection is refused or 503, hence the poll (bounded by the caller)."""

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as r:
                return bool(r.status == 200)
        except OSError:  # refused while it starts; HTTPError (503) is an OSError too
            return False

    while not await trio.to_thread.run_sync(ready):  # noqa: ASYNC110
        await trio.sleep(0.1)


async def test_every_panel_answers_from_a_real_prometheus_scraping_a_live_cluster(
    tmp_path: Path, certs: Path
) -> None:
    """Prometheus (the Debian package's server, beside promtool) scrapes a 3-node cluster
    that takes writes, a refused write and a refused token; then every panel's queries,
    with the dashboard's variables filled in as Grafana would, must run without error,
    and each panel must show something."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:  # make tools installs the package (promtool and prometheus)
        pytest.skip("prometheus is not installed (make tools installs it as root)")
    (port,) = free_ports(1)
    c = LocalCluster(tmp_path / "cluster", certs, ["n1", "n2", "n3"])
    targets = [f"127.0.0.1:{c.ports[i][2]}" for i in c.ids]
    config = prometheus_config(tmp_path / "prometheus.yml", targets)
    command = [
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=error",
    ]
    board = dashboard()
    answers: dict[str, list[int]] = {}
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        nursery.start_soon(partial(trio.run_process, command, check=False))
        with trio.fail_after(HANG_GUARD):
            lead = await c.wait_leader()
            endpoint = [c.endpoints()[c.ids.index(lead)]]
            async with open_client(endpoint, token=c.token(), cacert=certs / "ca.pem") as client:
                for i in range(WRITES):
                    await client.put(f"p/{i}", f"v{i}")
                async with open_client(
                    endpoint, token=c.token("read"), cacert=certs / "ca.pem"
                ) as reader:
                    with pytest.raises(PermissionDenied):
                        await reader.put("p/denied", "x")
                with pytest.raises(Unauthenticated):
                    async with open_client(endpoint, token="not-a-token", cacert=certs / "ca.pem"):
                        pass
                # Plain bytes on a peer port: a refused peer connection.
                bad = await trio.open_tcp_stream("127.0.0.1", c.ports[lead][0])
                await bad.send_all(b"GET / HTTP/1.1\r\n\r\n")
                await wait_ready(port)
                # Writes go on until each node has been scraped SCRAPES times.
                # up is 1 for a scrape that worked: SCRAPES of them, and the last one too.
                scraped = (
                    f'sum_over_time(up{{job="liferaft"}}[1m]) >= {SCRAPES} '
                    'and on (instance) up{job="liferaft"} == 1'
                )
                for i in range(WRITES, MAX_WRITES):  # a few writes a second meanwhile
                    if len(await prom_query(port, scraped)) == len(targets):
                        break
                    await client.put(f"p/{i % WRITES}", f"v{i}")
                    await trio.sleep(0.1)
                else:
                    raise AssertionError(f"Prometheus did not scrape every node {SCRAPES} times")
                await bad.aclose()
                fill = {"$__rate_interval": RATE_WINDOW, "$instance": ".*", "$job": ".*"}
                for title, exprs in queries(board).items():
                    for expr in exprs:
                        for var, text in fill.items():
                            expr = expr.replace(var, text)
                        if expr.startswith("label_values("):  # a variable: its selector
                            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
                        result = await prom_query(port, expr)
                        answers.setdefault(title, []).append(len(result))
        nursery.cancel_scope.cancel()

    empty = {title for title, sizes in answers.items() if not any(sizes)}
    assert empty <= MAY_BE_EMPTY, f"panels that show nothing: {sorted(empty)}"
    assert answers["$instance"] == [len(targets)]  # the node variable lists each node
    assert answers["Leader"] == [1]
