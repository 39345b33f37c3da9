"""Real ``liferaft node`` processes on loopback: the files and command lines for a
local cluster of them (tests/node/test_process.py, bench/). Callers start and stop the
processes their own way (Trio in tests, a profiler in benchmarks)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from liferaft.security.certs import generate
from liferaft.security.tokens import mint
from liferaft.testing.localcluster import free_ports, write_config


@dataclass(frozen=True, slots=True)
class ProcessCluster:
    ids: list[str]
    certs: Path
    members: dict[str, tuple[int, int, int]]  # id -> peer, client, metrics ports
    configs: dict[str, Path]

    @property
    def endpoints(self) -> list[str]:
        return [f"wss://127.0.0.1:{self.members[i][1]}/v1" for i in self.ids]

    def token(self, roles: Sequence[str], *, ttl_s: int = 3600, sub: str = "bench") -> str:
        """A client token signed with the cluster's own key."""
        key = (self.certs / "jwt-private.pem").read_bytes()
        return mint(key, sub=sub, roles=roles, ttl_s=ttl_s, now=time.time())

    def bench_command(self, token: str, *args: str) -> list[str]:
        """``liferaft bench`` aimed at this cluster, with ``args`` (the load's shape)."""
        return [
            sys.executable,
            *("-m", "liferaft", "bench", "--endpoints", ",".join(self.endpoints)),
            *("--cacert", str(self.certs / "ca.pem"), "--token", token),
            *args,
        ]

    def command(self, node_id: str, *python_args: str) -> list[str]:
        """``python [python_args] -m liferaft node --config <its file>``."""
        return [
            sys.executable,
            *python_args,
            "-m",
            "liferaft",
            "node",
            "--config",
            str(self.configs[node_id]),
        ]


def process_cluster(
    base: Path,
    ids: list[str],
    *,
    certs: Path | None = None,
    heartbeat_ms: int = 50,
    election_ms: int = 300,
    snapshot_entries: int = 10000,
    auto_promote: bool = False,
) -> ProcessCluster:
    """Config files (and, unless ``certs`` is given, certificates) under ``base``."""
    if certs is None:
        certs = base / "certs"
        generate(certs, ids)
    ports = free_ports(3 * len(ids))
    members = {i: (ports[3 * n], ports[3 * n + 1], ports[3 * n + 2]) for n, i in enumerate(ids)}
    configs = {
        i: write_config(
            base / f"{i}.toml",
            i,
            members,
            certs,
            base / "data" / i,
            heartbeat_ms=heartbeat_ms,
            election_ms=election_ms,
            snapshot_entries=snapshot_entries,
            auto_promote=auto_promote,
        )
        for i in ids
    }
    return ProcessCluster(ids, certs, members, configs)


def add_joiner(
    pc: ProcessCluster,
    base: Path,
    node_id: str,
    *,
    heartbeat_ms: int = 50,
    election_ms: int = 300,
    snapshot_entries: int = 10000,
    auto_promote: bool = False,
) -> tuple[str, str]:
    """Ports and a config file with ``join = true`` for a node to add to ``pc`` while it
    runs (``pc.command(node_id)`` starts it, empty); returns the peer and client
    addresses to give ``member add``."""
    peer, client, metrics = free_ports(3)
    pc.members[node_id] = (peer, client, metrics)
    pc.ids.append(node_id)
    pc.configs[node_id] = write_config(
        base / f"{node_id}.toml",
        node_id,
        pc.members,
        pc.certs,
        base / "data" / node_id,
        heartbeat_ms=heartbeat_ms,
        election_ms=election_ms,
        snapshot_entries=snapshot_entries,
        join=True,
        auto_promote=auto_promote,
    )
    return f"127.0.0.1:{peer}", f"127.0.0.1:{client}"
