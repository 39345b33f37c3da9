"""Certificate and token-key rotation on a running three-process cluster under write
load (docs/security.md, "Rotating certificates and keys"): nothing acknowledged is lost,
no request fails, and new connections see the new material."""

from __future__ import annotations

import json
import signal
import ssl
import time
from pathlib import Path
from typing import IO, Any

import pytest
import trio
from cryptography import x509

from liferaft.client import Client, open_client
from liferaft.client.errors import Unauthenticated
from liferaft.security.certs import drop_old_jwt_keys, new_jwt_key, renew
from liferaft.security.tls import peer_client_context
from liferaft.security.tokens import mint
from liferaft.testing.processes import ProcessCluster, process_cluster

HANG = 60  # a guard against hangs, not a performance claim
MAX_WRITES = 1500  # per writer: the load is bounded in count as well as in time


def events(log: Path, name: str) -> list[dict[str, Any]]:
    lines = log.read_text().splitlines()
    return [e for e in (json.loads(x) for x in lines if x.startswith("{")) if e["msg"] == name]


async def wait_events(logs: dict[str, Path], name: str, count: int) -> None:
    """Until every node has logged ``name`` ``count`` times (polled: real processes)."""
    while any(len(events(log, name)) < count for log in logs.values()):  # noqa: ASYNC110 - another process
        await trio.sleep(0.02)


async def served_serial(port: int, ctx: ssl.SSLContext, server_hostname: str) -> int:
    """The serial of the certificate a new TLS connection to ``port`` is shown."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=server_hostname)
    try:
        await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
    finally:
        await trio.aclose_forcefully(stream)
    return x509.load_der_x509_certificate(der).serial_number


async def http_get(port: int, path: str) -> tuple[int, str]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def wait_ready(pc: ProcessCluster) -> None:
    """Until every node answers /readyz: only then is its SIGHUP handler in place (before
    it, SIGHUP's default action would end the process)."""
    for _, _, metrics_port in pc.members.values():
        while True:
            try:
                if (await http_get(metrics_port, "/readyz"))[0] == 200:
                    break
            except OSError:
                pass  # not listening yet
            await trio.sleep(0.05)


async def metric(port: int, name: str) -> float:
    for line in (await http_get(port, "/metrics"))[1].splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not on /metrics")


class Load:
    """Writers that put distinct keys through one client until told to stop; what they
    acknowledge and every request that failed (after the client's own retries)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.acked: list[str] = []
        self.failed: list[str] = []
        self.stop = trio.Event()
        self._progress = trio.lowlevel.ParkingLot()
        self._running = 0

    async def writer(self, client: Client, w: int) -> None:
        self._running += 1
        try:
            await self._write(client, w)
        finally:
            self._running -= 1
            self._progress.unpark_all()

    async def stopped(self) -> None:
        """Stop, and wait for the writes in flight to end."""
        self.stop.set()
        while self._running:
            await self._progress.park()

    async def _write(self, client: Client, w: int) -> None:
        for n in range(MAX_WRITES):
            if self.stop.is_set():
                return
            key = f"load/{self.name}/{w}/{n}"
            try:
                await client.put(key, key)
            except Exception as exc:  # counted, and the test fails on any
                self.failed.append(f"{key}: {exc!r}")
                self._progress.unpark_all()
                return
            self.acked.append(key)
            self._progress.unpark_all()

    async def until(self, count: int) -> None:
        """Until ``count`` writes are acknowledged in all (or a writer gave up)."""
        while len(self.acked) < count and not self.failed:
            await self._progress.park()


def token(pc: ProcessCluster) -> str:
    key = (pc.certs / "jwt-private.pem").read_bytes()
    return mint(key, sub="rotation", roles=["write"], now=time.time())


async def test_certificates_and_token_keys_rotate_under_load_losing_nothing(
    tmp_path: Path,
) -> None:
    pc = process_cluster(tmp_path, ["n1", "n2", "n3"])  # its own certs: they are replaced
    ca = pc.certs / "ca.pem"
    logs = {i: tmp_path / f"{i}.log" for i in pc.ids}
    files: list[IO[bytes]] = []
    procs: dict[str, trio.Process] = {}
    old_token = token(pc)
    old_serials = {
        i: x509.load_pem_x509_certificate((pc.certs / f"{i}.pem").read_bytes()).serial_number
        for i in pc.ids
    }
    client_ctx = ssl.create_default_context(cafile=str(ca))

    def sighup_all() -> None:
        for p in procs.values():
            p.send_signal(signal.SIGHUP)

    with trio.fail_after(HANG):
        try:
            for i in pc.ids:
                files.append(logs[i].open("wb"))
                procs[i] = await trio.lowlevel.open_process(pc.command(i), stderr=files[-1])
            await wait_ready(pc)
            old_load, new_load = Load("old"), Load("new")
            async with (
                open_client(pc.endpoints, token=old_token, cacert=ca, timeout=30) as old_client,
                trio.open_nursery() as nursery,
            ):
                for w in range(4):
                    nursery.start_soon(old_load.writer, old_client, w)
                await old_load.until(100)

                # Renew every node's certificate and start a new token key, then SIGHUP.
                renew(pc.certs, pc.ids)
                new_jwt_key(pc.certs)
                sighup_all()
                await wait_events(logs, "tls_reloaded", 1)
                await wait_events(logs, "jwt_keys_reloaded", 1)
                at_reload = len(old_load.acked)

                # New connections are shown the new certificates, on both listeners.
                for i in pc.ids:
                    cert = x509.load_pem_x509_certificate((pc.certs / f"{i}.pem").read_bytes())
                    assert cert.serial_number != old_serials[i]
                    peer, client_port, metrics_port = pc.members[i]
                    assert (
                        await served_serial(client_port, client_ctx, "127.0.0.1")
                        == cert.serial_number
                    )
                    other = "n2" if i == "n1" else "n1"
                    dialler = peer_client_context(
                        ca, pc.certs / f"{other}.pem", pc.certs / f"{other}-key.pem"
                    )
                    assert await served_serial(peer, dialler, i) == cert.serial_number
                    expiry = await metric(
                        metrics_port, "liferaft_tls_cert_expiry_timestamp_seconds"
                    )
                    assert expiry == cert.not_valid_after_utc.timestamp()

                # Clients move to the new key; during the overlap the old one still works.
                new_token = token(pc)
                async with open_client(pc.endpoints, token=old_token, cacert=ca) as late:
                    await late.put("overlap/old-token", "x")
                async with (
                    open_client(pc.endpoints, token=new_token, cacert=ca, timeout=30) as new_client,
                    trio.open_nursery() as new_writers,
                ):
                    for w in range(2):
                        new_writers.start_soon(new_load.writer, new_client, w)
                    await old_load.until(at_reload + 100)  # the old connection carried on
                    await old_load.stopped()

                    # End the overlap: the old key goes, new connections with it are refused.
                    drop_old_jwt_keys(pc.certs)
                    sighup_all()
                    await wait_events(logs, "jwt_keys_reloaded", 2)
                    with pytest.raises(Unauthenticated):
                        async with open_client(pc.endpoints, token=old_token, cacert=ca) as c:
                            await c.put("after/old-token", "x")
                    async with open_client(pc.endpoints, token=new_token, cacert=ca) as c:
                        await c.put("after/new-token", "x")
                    await new_load.until(len(new_load.acked) + 100)
                    await new_load.stopped()

            assert old_load.failed == [] and new_load.failed == []
            async with open_client(pc.endpoints, token=new_token, cacert=ca) as c:
                kvs, more = await c.range("load/")
                got = {kv.key for kv in kvs}
                assert not more and got == set(old_load.acked) | set(new_load.acked)
                assert len(got) == len(old_load.acked) + len(new_load.acked)
                assert (await c.get("overlap/old-token")) is not None
                assert (await c.get("after/old-token")) is None
            for i in pc.ids:
                assert events(logs[i], "tls_reload_refused") == []
                assert events(logs[i], "jwt_keys_reload_refused") == []
                loaded = events(logs[i], "tls_reloaded")  # the second SIGHUP reloads too
                cert = x509.load_pem_x509_certificate((pc.certs / f"{i}.pem").read_bytes())
                assert [int(e["serial"], 16) for e in loaded] == [cert.serial_number] * 2
            for p in procs.values():
                p.send_signal(signal.SIGTERM)
            for p in procs.values():
                assert await p.wait() == 0
        finally:
            for p in procs.values():
                if p.returncode is None:
                    p.kill()
                    await p.wait()
            for f in files:
                f.close()
