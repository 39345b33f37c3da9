"""deploy/compose.yml: three nodes and a one-shot certs job, wired the way docs/deploy.md
says, and every node's inline config accepted by liferaft's own config loader. (Docker
Compose itself is not on this machine; the file is read as YAML.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from deploytools import DEPLOY

from liferaft import config
from liferaft.security.certs import generate

NODES = ("n1", "n2", "n3")
CERTS = "/etc/liferaft/certs"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


def test_three_nodes_and_a_certs_job(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"certs", *NODES}
    job = compose["services"]["certs"]
    command = job["command"]
    assert command[0] == "certs"
    assert command[command.index("--nodes") + 1].split(",") == list(NODES)
    assert command[command.index("--dir") + 1] == CERTS
    assert job["volumes"] == [f"certs:{CERTS}"]
    assert job["restart"] == "no"  # one-shot


def test_each_node_waits_for_the_certs_and_mounts_its_own_volume(compose: dict[str, Any]) -> None:
    published: list[str] = []
    for name in NODES:
        node = compose["services"][name]
        assert node["depends_on"] == {"certs": {"condition": "service_completed_successfully"}}
        assert sorted(node["volumes"]) == sorted(
            [f"{name}-data:/var/lib/liferaft", f"certs:{CERTS}:ro"]
        )
        assert node["configs"] == [{"source": name, "target": "/etc/liferaft/node.toml"}]
        assert node["hostname"] == name
        for port in node["ports"]:
            host_ip, host_port, container_port = port.split(":")
            assert host_ip == "127.0.0.1"  # never on every interface by default
            assert container_port in ("8001", "9001")  # client and metrics, not peer
            published.append(host_port)
    assert len(published) == len(set(published)) == 6
    assert set(compose["volumes"]) == {"certs", *(f"{n}-data" for n in NODES)}


def test_each_node_has_a_livez_healthcheck(compose: dict[str, Any]) -> None:
    for name in NODES:
        check = compose["services"][name]["healthcheck"]
        assert check["test"][0] == "CMD"
        assert "http://127.0.0.1:9001/livez" in " ".join(check["test"])
        assert {"interval", "timeout", "retries", "start_period"} <= set(check)


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the certs job writes: `liferaft certs --nodes n1,n2,n3`."""
    d = tmp_path_factory.mktemp("compose-certs")
    generate(d, list(NODES))
    return d


@pytest.mark.parametrize("name", NODES)
def test_each_inline_config_loads(
    compose: dict[str, Any], certs_dir: Path, tmp_path: Path, name: str
) -> None:
    """The config as the node sees it, with the certs volume's path pointed at a directory
    the certs job's command filled."""
    text = compose["configs"][name]["content"]
    text = text.replace(CERTS, str(certs_dir)).replace("/var/lib/liferaft", str(tmp_path))
    (tmp_path / "node.toml").write_text(text)
    s = config.load(tmp_path / "node.toml")
    assert s.node.id == name
    assert s.node.data_dir == tmp_path / "data"
    assert [m.id for m in s.cluster.members] == list(NODES)
    assert not s.cluster.join
    for m in s.cluster.members:  # service names, on the ports every container listens on
        assert (m.peer.host, m.peer.port) == (m.id, s.peer.listen.port)
        assert (m.client.host, m.client.port) == (m.id, s.client.listen.port)
    assert (s.metrics.listen.host, s.metrics.listen.port) == ("0.0.0.0", 9001)
    assert s.client.listen.port == 8001 and s.peer.listen.port == 7001
    assert s.tls.cert == certs_dir / f"{name}.pem"


def test_a_config_naming_the_wrong_certificate_is_refused(
    compose: dict[str, Any], certs_dir: Path, tmp_path: Path
) -> None:
    """The load above can fail: n2's config pointed at n1's certificate is an error."""
    text = compose["configs"]["n2"]["content"].replace("/n2.pem", "/n1.pem")
    text = text.replace(CERTS, str(certs_dir)).replace("/var/lib/liferaft", str(tmp_path))
    (tmp_path / "node.toml").write_text(text)
    with pytest.raises(config.ConfigError, match=r"tls\.cert"):
        config.load(tmp_path / "node.toml")
