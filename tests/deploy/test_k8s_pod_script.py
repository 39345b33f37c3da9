"""deploy/k8s/liferaft-pod.py, the pod's init and preStop steps: the config it writes for
an ordinal is one liferaft's own loader accepts, and against a real node it starts a
cluster, adds a scaled-up pod as a learner (once), and removes a member only when the
StatefulSet (a stand-in API server on loopback) was scaled below it."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from deploytools import DEPLOY

from liferaft import config
from liferaft.security.certs import generate
from liferaft.testing.localcluster import free_ports

K8S = DEPLOY / "k8s"
SCRIPT = K8S / "liferaft-pod.py"
IDS = [f"liferaft-{i}" for i in range(5)]
HANG = 60.0  # a guard against hangs, not a performance claim
# The --san list docs/deploy.md gives for namespace liferaft.
SANS = [
    "liferaft-client",
    "liferaft-client.liferaft",
    "liferaft-client.liferaft.svc",
    "liferaft-client.liferaft.svc.cluster.local",
    "*.liferaft-peer.liferaft.svc.cluster.local",
]


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("liferaft_pod", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["liferaft_pod"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


pod = load_script()


def manifest_env() -> dict[str, str]:
    """The liferaft-env literals of kustomization.yaml: what the pods are told."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (gen,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "liferaft-env"]
    return dict(literal.split("=", 1) for literal in gen["literals"])


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three Secrets as a pod sees them: liferaft certs for liferaft-0..4 with the
    client Service's names, every file mode 0440 (a Secret volume with fsGroup)."""
    root = tmp_path_factory.mktemp("secrets")
    made = root / "made"
    generate(made, IDS, sans=SANS)
    (root / "tls").mkdir()
    (root / "jwt").mkdir()
    (root / "admin").mkdir()
    for f in ["ca.pem", *(f"{i}.pem" for i in IDS), *(f"{i}-key.pem" for i in IDS)]:
        shutil.copy(made / f, root / "tls" / f)
    shutil.copy(made / "jwt-public.pem", root / "jwt" / "jwt-public.pem")
    token = subprocess.run(
        [
            *(sys.executable, "-m", "liferaft", "token"),
            *("--key", str(made / "jwt-private.pem")),
            *("--sub", "k8s", "--roles", "admin", "--ttl", "3600"),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=HANG,
    ).stdout.strip()
    (root / "admin" / "token").write_text(token + "\n")
    for f in root.glob("*/*"):
        f.chmod(0o440)
    return root


def pod_env(name: str, secrets: Path, where: Path, **extra: str) -> dict[str, str]:
    return {
        **manifest_env(),
        "POD_NAME": name,
        "POD_NAMESPACE": "liferaft",
        "LIFERAFT_SECRETS_DIR": str(secrets),
        "LIFERAFT_ETC_DIR": str(where / name / "etc"),
        "LIFERAFT_DATA_DIR": str(where / name / "data"),
        "LIFERAFT_EXTRA_CONFIG": str(K8S / "extra.toml"),
        **extra,
    }


def read_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Any:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return pod.Env.read()


@pytest.mark.parametrize(("ordinal", "join"), [(0, False), (2, False), (4, True)])
def test_the_config_for_an_ordinal_loads(
    secrets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ordinal: int, join: bool
) -> None:
    env = read_env(monkeypatch, pod_env(f"liferaft-{ordinal}", secrets, tmp_path))
    pod.copy_certs(env)
    path = env.etc / "node.toml"
    path.write_text(pod.render_config(env, join=join))
    s = config.load(path)
    assert s.node.id == f"liferaft-{ordinal}"
    assert s.cluster.join is join
    assert [m.id for m in s.cluster.members] == ["liferaft-0", "liferaft-1", "liferaft-2"]
    fqdn = "liferaft-1.liferaft-peer.liferaft.svc.cluster.local"
    assert (s.cluster.members[1].peer.host, s.cluster.members[1].peer.port) == (fqdn, 7001)
    assert (s.cluster.members[1].client.host, s.cluster.members[1].client.port) == (fqdn, 8001)
    assert str(s.metrics.listen) == "0.0.0.0:9001" and str(s.peer.listen) == "0.0.0.0:7001"
    assert s.raft.heartbeat_interval_ms == 50  # from extra.toml
    assert stat.S_IMODE(s.tls.key.stat().st_mode) == 0o600  # the Secret's was 0440


def test_auto_promote_is_written_when_asked(
    secrets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With LIFERAFT_AUTO_PROMOTE=true the node's config turns the leader's automatic
    promotion of caught-up learners on."""
    env = pod_env("liferaft-3", secrets, tmp_path, LIFERAFT_AUTO_PROMOTE="true")
    e = read_env(monkeypatch, env)
    pod.copy_certs(e)
    path = e.etc / "node.toml"
    path.write_text(pod.render_config(e, join=True))
    assert "auto_promote = true" in path.read_text()
    assert config.load(path).cluster.auto_promote is True


def test_a_pod_without_a_certificate_in_the_secret_is_told_so(
    secrets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = read_env(monkeypatch, pod_env("liferaft-7", secrets, tmp_path))
    with pytest.raises(pod.Failed, match=r"liferaft-7\.pem is missing"):
        pod.copy_certs(env)


# ---------------------------------------------------------------- against a real node


@dataclass
class FakeApi:
    """A Kubernetes API server stand-in on 127.0.0.1: GET of the liferaft StatefulSet."""

    port: int
    sa_dir: Path
    replicas: int = 3
    seen: list[str] = field(default_factory=list)


@pytest.fixture
def api(secrets: Path, tmp_path: Path) -> Iterator[FakeApi]:
    made = secrets / "made"
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("sa-token")
    shutil.copy(made / "ca.pem", sa / "ca.crt")
    state = FakeApi(0, sa)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.seen.append(self.path)
            ok_path = self.path == "/apis/apps/v1/namespaces/liferaft/statefulsets/liferaft"
            if self.headers.get("Authorization") != "Bearer sa-token" or not ok_path:
                self.send_response(403)
                self.end_headers()
                return
            body = json.dumps({"kind": "StatefulSet", "spec": {"replicas": state.replicas}})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(made / "liferaft-0.pem", made / "liferaft-0-key.pem")  # IP 127.0.0.1
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def run_script(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), command],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=HANG,
        check=False,
    )


def members(secrets: Path, endpoint: str) -> dict[str, bool]:
    """id -> voter, from `liferaft member list -o json`."""
    out = subprocess.run(
        [
            *(sys.executable, "-m", "liferaft", "member", "list", "-o", "json"),
            *("--endpoints", endpoint, "--cacert", str(secrets / "made" / "ca.pem")),
            *("--token-file", str(secrets / "admin" / "token")),
        ],
        capture_output=True,
        text=True,
        timeout=HANG,
        check=True,
    ).stdout
    return {m["id"]: m["voter"] for m in json.loads(out)["members"]}


def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the node exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass  # not listening or not ready yet
        time.sleep(0.05)
    raise AssertionError("the node did not get ready")


def test_init_starts_a_cluster_joins_a_scaled_pod_and_leave_removes_it_on_scale_down(
    secrets: Path, tmp_path: Path, api: FakeApi
) -> None:
    peer0, client0, metrics0, peer1, client1, metrics1 = free_ports(6)
    endpoint = f"wss://127.0.0.1:{client0}"
    common = {
        "LIFERAFT_INITIAL_MEMBERS": "1",
        "LIFERAFT_LISTEN_HOST": "127.0.0.1",
        "LIFERAFT_HOST_TEMPLATE": "127.0.0.1",  # loopback only: no DNS names here
        "LIFERAFT_ENDPOINTS": endpoint,
        "LIFERAFT_BIN": str(Path(sys.executable).parent / "liferaft"),
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(api.port),
        "LIFERAFT_SA_DIR": str(api.sa_dir),
    }
    ports0 = {"LIFERAFT_PEER_PORT": str(peer0), "LIFERAFT_CLIENT_PORT": str(client0)}
    ports0["LIFERAFT_METRICS_PORT"] = str(metrics0)
    ports1 = {"LIFERAFT_PEER_PORT": str(peer1), "LIFERAFT_CLIENT_PORT": str(client1)}
    ports1["LIFERAFT_METRICS_PORT"] = str(metrics1)
    env0 = pod_env("liferaft-0", secrets, tmp_path, **common, **ports0)
    env1 = pod_env("liferaft-1", secrets, tmp_path, **common, **ports1)

    # No cluster answers, and liferaft-0 is an initial member: it starts one.
    first = run_script("init", {**env0, "LIFERAFT_CALL_TIMEOUT": "1"})
    assert first.returncode == 0, first.stderr
    assert "starts it with the other initial members" in first.stderr
    cfg0 = Path(env0["LIFERAFT_ETC_DIR"]) / "node.toml"
    assert config.load(cfg0).cluster.join is False

    # A scaled-up pod with nothing to join fails, and the kubelet will run it again.
    env2 = pod_env("liferaft-2", secrets, tmp_path, **common, **ports1)
    orphan = run_script("init", {**env2, "LIFERAFT_CALL_TIMEOUT": "1"})
    assert orphan.returncode == 1
    assert "not an initial member" in orphan.stderr

    node = subprocess.Popen(
        [sys.executable, "-m", "liferaft", "node", "--config", str(cfg0)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(metrics0, node)

        # An initial member whose init runs once the others already run (its volume
        # empty): listed already, it starts from the bootstrap membership, not as a joiner.
        late_env = pod_env("liferaft-0", secrets, tmp_path / "late", **common, **ports0)
        late = run_script("init", late_env)
        assert late.returncode == 0, late.stderr
        assert "already a member" in late.stderr
        late_cfg = Path(late_env["LIFERAFT_ETC_DIR"]) / "node.toml"
        assert config.load(late_cfg).cluster.join is False

        joined = run_script("init", env1)
        assert joined.returncode == 0, joined.stderr
        assert "added liferaft-1 as a learner" in joined.stderr
        assert members(secrets, endpoint) == {"liferaft-0": True, "liferaft-1": False}
        assert config.load(Path(env1["LIFERAFT_ETC_DIR"]) / "node.toml").cluster.join is True

        again = run_script("init", env1)  # the init container runs again: no second add
        assert again.returncode == 0, again.stderr
        assert "already a member" in again.stderr

        api.replicas = 2  # liferaft-1 stops in a rolling update: it stays
        stays = run_script("leave", env1)
        assert stays.returncode == 0, stays.stderr
        assert "stays a member" in stays.stderr
        assert "liferaft-1" in members(secrets, endpoint)

        api.replicas = 0  # scaled to 0: "stop everything", nobody leaves
        assert run_script("leave", env0).returncode == 0
        assert "liferaft-0" in members(secrets, endpoint)

        api.replicas = 1  # scaled down below liferaft-1: it leaves
        left = run_script("leave", env1)
        assert left.returncode == 0, left.stderr
        assert "removed liferaft-1" in left.stderr
        assert members(secrets, endpoint) == {"liferaft-0": True}
        assert api.seen and all(p.endswith("/statefulsets/liferaft") for p in api.seen)
    finally:
        node.terminate()
        assert node.wait(timeout=HANG) == 0


def test_leave_stays_when_the_api_cannot_be_read(
    secrets: Path, tmp_path: Path, api: FakeApi
) -> None:
    """A token the API refuses: no replica count, so no removal (and no client call)."""
    (api.sa_dir / "token").write_text("wrong")
    env = pod_env(
        "liferaft-4",
        secrets,
        tmp_path,
        KUBERNETES_SERVICE_HOST="127.0.0.1",
        KUBERNETES_SERVICE_PORT=str(api.port),
        LIFERAFT_SA_DIR=str(api.sa_dir),
        LIFERAFT_BIN="/nonexistent/liferaft",  # any client call would fail the run
    )
    result = run_script("leave", env)
    assert result.returncode == 0, result.stderr
    assert "HTTP Error 403" in result.stderr and "staying a member" in result.stderr


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("liferaft-client.liferaft.svc.cluster.local", True),
        ("liferaft-client", True),
        ("liferaft-3.liferaft-peer.liferaft.svc.cluster.local", True),  # the wildcard
        ("liferaft-3.liferaft-peer.other.svc.cluster.local", False),
    ],
)
def test_the_documented_sans_satisfy_a_client_that_dialled_those_names(
    secrets: Path, api: FakeApi, name: str, ok: bool
) -> None:
    """A TLS client checks the name it dialled against the certificate: a handshake on
    loopback with that name as server_hostname (no DNS involved)."""
    ctx = ssl.create_default_context(cafile=str(secrets / "made" / "ca.pem"))
    with socket.create_connection(("127.0.0.1", api.port), timeout=HANG) as raw:
        if ok:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.version() is not None
        else:
            with pytest.raises(ssl.SSLCertVerificationError):
                ctx.wrap_socket(raw, server_hostname=name)
