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
sets, ``reason`` from the auth checker's fixed set. Never put a key, value or token in a label.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

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


class NodeMetrics:
    """Every series one node exports, registered in ``self.registry``."""

    def __init__(self, node_id: str, version: str = __version__) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

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

        # ------------------------------------------------------------ certificates
        self.tls_cert_expiry = Gauge(
            "liferaft_tls_cert_expiry_timestamp_seconds",
            "When the node certificate in use expires (Unix time); follows reloads.",
            registry=r,
        )

    def exposition(self) -> bytes:
        """This node's series in the Prometheus text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
