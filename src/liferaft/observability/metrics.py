"""The Prometheus series of one node (docs/operations.md, "Health and metrics"), in a
registry of its own.

Each ``NodeMetrics`` owns one ``CollectorRegistry``, so several nodes can live in one
process (tests, the local cluster) without their series colliding in the global
registry. The class is a plain holder: one typed attribute per series, updated by the
runtime with the ordinary prometheus_client calls (``.set``, ``.inc``, ``.observe``,
``.labels(...)``).

Counters are declared without ``_total``: prometheus_client appends it, so the exposed
names are exactly those docs/operations.md lists. Labels are bounded by construction:
``peer`` is a cluster member id, ``op`` and ``code`` come from the client protocol's fixed
sets, ``reason`` from the auth checker's or the peer listener's fixed set, ``stage`` and
``direction`` from the fixed sets below. Never put a key, value or token in a label.

What is already counted elsewhere as a plain integer (the peer transport's counters, open
client connections and watches) is read when ``/metrics`` is scraped, by a collector
(``peer_stats``) or a gauge's function (``set_function``), so the paths that count stay
as cheap as an integer increment. The registry also carries prometheus_client's process
(``process_*``), Python GC (``python_gc_*``) and platform (``python_info``) collectors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Final, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from liferaft import __version__

#: The content type of ``NodeMetrics.exposition()`` (Prometheus text format 0.0.4).
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4


def _exponential(start: float, factor: float, count: int) -> tuple[float, ...]:
    """Prometheus's ExponentialBuckets (as etcd uses them), rounded to tame float noise."""
    return tuple(round(start * factor**i, 9) for i in range(count))


#: WAL fsync latency: 0.5 ms .. 4.096 s, like etcd's ``wal_fsync_duration_seconds``.
FSYNC_BUCKETS: Final = _exponential(0.0005, 2, 14)
#: Peer round trip: 0.1 ms .. 0.8192 s, like etcd's ``peer_round_trip_time_seconds``.
RTT_BUCKETS: Final = _exponential(0.0001, 2, 14)
#: Client request latency: 0.5 ms .. 8.192 s (a linearizable write includes an fsync).
REQUEST_BUCKETS: Final = _exponential(0.0005, 2, 15)
#: Applying one run of committed entries: 50 µs (a lone write, applied inline) .. 1.6 s.
APPLY_BUCKETS: Final = _exponential(0.00005, 2, 16)
#: A snapshot stage (copy, stream, receive, install of a state database): 1 ms .. 65 s.
SNAPSHOT_BUCKETS: Final = _exponential(0.001, 2, 17)

#: The ``stage`` label of ``liferaft_snapshot_duration_seconds``.
SNAPSHOT_STAGES: Final = ("make", "send", "receive", "install")


class PeerStats(Protocol):
    """What the peer transport counts, as plain integers on its own paths
    (``liferaft.transport.stats.TransportStats`` has these fields). Read-only here."""

    @property
    def dropped(self) -> Mapping[str, int]: ...  # peer -> messages dropped
    @property
    def dropped_unknown(self) -> int: ...  # messages for a node that is not a peer
    @property
    def connects(self) -> int: ...  # outgoing links established
    @property
    def accepts(self) -> int: ...  # incoming links authenticated and upgraded
    @property
    def connect_failures(self) -> Mapping[str, int]: ...  # peer -> failed dials
    @property
    def disconnects(self) -> Mapping[str, int]: ...  # peer -> outgoing links ended
    @property
    def rejects(self) -> Mapping[str, int]: ...  # reason -> incoming refused
    @property
    def closes(self) -> Mapping[str, int]: ...  # reason -> incoming closed by us


class _PeerStatsCollector(Collector):
    """The transport's counters as Prometheus counters, read at each scrape. Every family
    is declared even before the node has a transport (then without samples)."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        st = self._metrics.peer_stats
        dropped = CounterMetricFamily(
            "liferaft_network_peer_dropped_messages",
            "Messages to each peer dropped: its queue over its bound, lost with a failed "
            "link, too large to send, or queued when the peer was removed.",
            labels=["peer"],
        )
        unknown = CounterMetricFamily(
            "liferaft_network_unknown_peer_messages",
            "Messages dropped because they were addressed to a node that is not a peer.",
        )
        connects = CounterMetricFamily(
            "liferaft_network_peer_connects",
            "Peer links established: out = this node's dial succeeded, in = a peer's "
            "connection was authenticated and upgraded.",
            labels=["direction"],
        )
        failures = CounterMetricFamily(
            "liferaft_network_peer_connect_failures",
            "Dials to each peer that failed (refused, timed out, TLS or upgrade refused).",
            labels=["peer"],
        )
        disconnects = CounterMetricFamily(
            "liferaft_network_peer_disconnects",
            "Established outgoing links to each peer that ended (lost, or redialled at "
            "a new address).",
            labels=["peer"],
        )
        rejected = CounterMetricFamily(
            "liferaft_network_peer_rejected_connections",
            "Connections refused on the peer port, by reason (tls, not_member, upgrade, "
            "path, handshake_timeout, max_connections; malformed: closed for bad data).",
            labels=["reason"],
        )
        closed = CounterMetricFamily(
            "liferaft_network_peer_closed_connections",
            "Incoming peer links this node closed, by reason (idle, replaced, removed).",
            labels=["reason"],
        )
        if st is not None:
            for family, counts in (
                (dropped, st.dropped),
                (failures, st.connect_failures),
                (disconnects, st.disconnects),
                (rejected, st.rejects),
                (closed, st.closes),
            ):
                for label, n in sorted(counts.items()):
                    family.add_metric([label], n)
            unknown.add_metric([], st.dropped_unknown)
            connects.add_metric(["out"], st.connects)
            connects.add_metric(["in"], st.accepts)
        yield from (dropped, unknown, connects, failures, disconnects, rejected, closed)


class NodeMetrics:
    """Every series one node exports, registered in ``self.registry``."""

    def __init__(self, node_id: str, version: str = __version__) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        #: The peer transport's counters, exported at each scrape (set by the node).
        self.peer_stats: PeerStats | None = None

        # ------------------------------------------------------------ server (raft)
        self.has_leader = Gauge(
            "liferaft_server_has_leader",
            "1 if this node knows a current leader, else 0.",
            registry=r,
        )
        self.is_leader = Gauge(
            "liferaft_server_is_leader", "1 if this node is the leader, else 0.", registry=r
        )
        self.leader_changes = Counter(
            "liferaft_server_leader_changes_seen",
            "Number of leader changes this node has seen.",
            registry=r,
        )
        self.term = Gauge("liferaft_server_term", "The node's current Raft term.", registry=r)
        self.commit_index = Gauge(
            "liferaft_server_commit_index", "The highest log index known committed.", registry=r
        )
        self.applied_index = Gauge(
            "liferaft_server_applied_index",
            "The highest log index applied to the state machine.",
            registry=r,
        )
        self.proposals_committed = Counter(
            "liferaft_server_proposals_committed",
            "Number of proposals committed and applied.",
            registry=r,
        )
        self.proposals_failed = Counter(
            "liferaft_server_proposals_failed",
            "Number of proposals that failed (lost leadership, dropped, cancelled).",
            registry=r,
        )
        self.proposals_pending = Gauge(
            "liferaft_server_proposals_pending",
            "Number of proposals waiting to be applied.",
            registry=r,
        )
        self.info = Gauge(
            "liferaft_server_info",
            "Constant 1, labelled with the node id and software version.",
            ["node_id", "version"],
            registry=r,
        )
        self.info.labels(node_id=node_id, version=version).set(1)
        self.apply_duration = Histogram(
            "liferaft_server_apply_duration_seconds",
            "Time to apply one run of committed entries to the state machine (one state "
            "transaction), answer their callers and publish their watch events.",
            buckets=APPLY_BUCKETS,
            registry=r,
        )
        self.snapshot_duration = Histogram(
            "liferaft_snapshot_duration_seconds",
            "Time of each stage of a snapshot transfer that completed: make (the leader "
            "copies its state database), send (the leader streams it to a follower until "
            "the last chunk is acknowledged), receive (the follower, first chunk to the "
            "file on disk), install (the follower swaps it in as its state).",
            ["stage"],
            buckets=SNAPSHOT_BUCKETS,
            registry=r,
        )
        for stage in SNAPSHOT_STAGES:
            self.snapshot_duration.labels(stage)

        # ------------------------------------------------------------ disk
        self.fsync_duration = Histogram(
            "liferaft_disk_fsync_duration_seconds",
            "Latency of durable writes (SQLite WAL commit with fsync).",
            buckets=FSYNC_BUCKETS,
            registry=r,
        )
        self.gc_pause = Histogram(
            "liferaft_gc_pause_seconds",
            "Time each Python garbage collection held the process (event loop included).",
            buckets=FSYNC_BUCKETS,
            registry=r,
        )
        self.db_size_bytes = Gauge(
            "liferaft_storage_db_size_bytes", "Size of the node's database files.", registry=r
        )
        self.disk_free_bytes = Gauge(
            "liferaft_storage_disk_free_bytes",
            "Free bytes on the filesystem of the node's data dir.",
            registry=r,
        )
        self.alarm = Gauge(
            "liferaft_server_alarm",
            "1 while the alarm is raised: nospace = the data dir's filesystem is nearly full "
            "and this node refuses writes that grow the store (docs/operations.md).",
            ["type"],
            registry=r,
        )
        self.alarm.labels("nospace").set(0)

        # ------------------------------------------------------------ network (peers)
        self.peer_connected = Gauge(
            "liferaft_network_peer_connected",
            "1 while this node's link to the member is up, 0 while it is not.",
            ["peer"],
            registry=r,
        )
        self.peer_sent_bytes = Counter(
            "liferaft_network_peer_sent_bytes",
            "Bytes sent to each peer.",
            ["peer"],
            registry=r,
        )
        self.peer_received_bytes = Counter(
            "liferaft_network_peer_received_bytes",
            "Bytes received from each peer.",
            ["peer"],
            registry=r,
        )
        self.peer_round_trip_time = Histogram(
            "liferaft_network_peer_round_trip_time_seconds",
            "Round trip time to each peer (heartbeat to response).",
            ["peer"],
            buckets=RTT_BUCKETS,
            registry=r,
        )

        # ------------------------------------------------------------ clients
        self.client_requests = Counter(
            "liferaft_client_requests",
            "Client requests handled, by operation and result code.",
            ["op", "code"],
            registry=r,
        )
        self.client_request_duration = Histogram(
            "liferaft_client_request_duration_seconds",
            "Client request latency, by operation.",
            ["op"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.auth_failures = Counter(
            "liferaft_auth_failures",
            "Rejected client authentications, by reason.",
            ["reason"],
            registry=r,
        )
        # Their values come from the client API (set_function), read at each scrape.
        self.client_connections = Gauge(
            "liferaft_client_connections",
            "Client connections open now (authenticated, past the WebSocket upgrade).",
            registry=r,
        )
        self.client_handshakes = Gauge(
            "liferaft_client_handshaking_connections",
            "Client connections in their TLS handshake or WebSocket upgrade now.",
            registry=r,
        )
        self.client_watchers = Gauge(
            "liferaft_client_watchers",
            "Watches open now, over all client connections.",
            registry=r,
        )

        # ------------------------------------------------------------ the process
        r.register(_PeerStatsCollector(self))
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_open_fds, ...
        GCCollector(registry=r)  # python_gc_objects_collected_total, ...
        PlatformCollector(registry=r)  # python_info{version, implementation, ...}

        # ------------------------------------------------------------ certificates
        self.tls_cert_expiry = Gauge(
            "liferaft_tls_cert_expiry_timestamp_seconds",
            "When the node certificate in use expires (Unix time); follows reloads.",
            registry=r,
        )

    def exposition(self) -> bytes:
        """This node's series in the Prometheus text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
