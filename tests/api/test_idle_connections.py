"""Connections that open TCP and then say nothing (a slow-loris, or a flood of idle
sockets) must not lock legitimate clients out. Before: 1,500 idle connections to the
client port filled ``max_connections`` and every real client was refused until the 5 s
handshake timeout closed them. Now connections still in their handshake are bounded on
their own, and a new connection evicts the oldest one still in its handshake, so a
client that completes TLS and the upgrade promptly always gets in (docs/security.md,
"Connections that say nothing")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from liferaft.api import server
from liferaft.client import open_client
from liferaft.testing.localcluster import LocalCluster

HANG = 60


async def test_idle_connections_do_not_lock_clients_out(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # small bounds, so that a few hundred sockets are a flood
    monkeypatch.setattr(server, "MAX_HANDSHAKING", 32, raising=False)
    init = server.ClientServer.__init__

    def small(self: server.ClientServer, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.max_connections = 64

    monkeypatch.setattr(server.ClientServer, "__init__", small)
    c = LocalCluster(tmp_path, certs, ["n1"])
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(HANG):
            await c.wait_leader()
            node = c.nodes["n1"]
            port = int(c.endpoints()[0].rsplit(":", 1)[1].split("/")[0])
            idle = []
            for _ in range(300):  # more than MAX_HANDSHAKING, and than max_connections below
                idle.append(await trio.open_tcp_stream("127.0.0.1", port))
            await trio.lowlevel.checkpoint()
            assert node.settings.client.handshake_timeout_ms >= 5000  # they would stay 5 s
            with trio.fail_after(3):  # well before any handshake timeout
                async with open_client(
                    c.endpoints(), token=c.token(), cacert=certs / "ca.pem", timeout=3
                ) as client:
                    assert await client.put("k", b"v") > 0
            for s in idle:
                await s.aclose()
        nursery.cancel_scope.cancel()
