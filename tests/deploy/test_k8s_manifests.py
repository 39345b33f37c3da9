"""deploy/k8s: `kubectl kustomize` builds it, every resource validates against the
Kubernetes schemas of the versions below (kubernetes-validate, strict: an unknown field
is an error), and the pieces fit together the way docs/deploy.md describes."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploytools import DEPLOY, require_tool

K8S = DEPLOY / "k8s"
# The oldest Kubernetes the manifests are meant for, and the newest the validator knows.
VERSIONS = ("1.30.0", "1.37.0")
SECRETS = {"liferaft-tls", "liferaft-jwt", "liferaft-admin-token"}


def kustomize() -> list[dict[str, Any]]:
    kubectl = require_tool("kubectl", "make tools installs it as root: apt kubernetes-client")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def built() -> dict[tuple[str, str], dict[str, Any]]:
    """The built resources by (kind, name), generated ConfigMaps under their base name."""
    out = {}
    for doc in kustomize():
        name = doc["metadata"]["name"]
        if doc["kind"] == "ConfigMap":
            name = name.rsplit("-", 1)[0]  # drop kustomize's content hash
        out[(doc["kind"], name)] = doc
    return out


def source_documents() -> list[tuple[Path, dict[str, Any]]]:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    return [(K8S / f, d) for f in listed for d in yaml.safe_load_all((K8S / f).read_text()) if d]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_source_manifest_validates(version: str) -> None:
    docs = source_documents()
    assert {d["kind"] for _, d in docs} == {
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
    }
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {e.message}")


@pytest.mark.parametrize("version", VERSIONS)
def test_the_kustomize_build_validates(
    built: dict[tuple[str, str], dict[str, Any]], version: str
) -> None:
    for doc in built.values():
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_a_misspelt_field() -> None:
    """Strict validation can fail: a typo in the pod template is caught."""
    (sts,) = [d for _, d in source_documents() if d["kind"] == "StatefulSet"]
    sts["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, VERSIONS[0], strict=True)


def pod(built: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = built[("StatefulSet", "liferaft")]["spec"]["template"]["spec"]
    return spec


def test_statefulset_names_volumes_and_pod_management(
    built: dict[tuple[str, str], dict[str, Any]],
) -> None:
    sts = built[("StatefulSet", "liferaft")]["spec"]
    assert sts["serviceName"] == "liferaft-peer"
    assert sts["podManagementPolicy"] == "Parallel"  # OrderedReady never gets a quorum
    (claim,) = sts["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    env = built[("ConfigMap", "liferaft-env")]["data"]
    assert int(env["LIFERAFT_INITIAL_MEMBERS"]) == sts["replicas"] == 3


def test_services_headless_publishes_unready_and_client_selects_the_pods(
    built: dict[tuple[str, str], dict[str, Any]],
) -> None:
    labels = built[("StatefulSet", "liferaft")]["spec"]["template"]["metadata"]["labels"]
    peer = built[("Service", "liferaft-peer")]["spec"]
    assert peer["clusterIP"] == "None" and peer["publishNotReadyAddresses"] is True
    client = built[("Service", "liferaft-client")]["spec"]
    assert client.get("publishNotReadyAddresses", False) is False
    for svc in (peer, client):
        assert svc["selector"].items() <= labels.items()
    assert {p["name"]: p["port"] for p in client["ports"]} == {"client": 8001}
    env = built[("ConfigMap", "liferaft-env")]["data"]
    assert env["LIFERAFT_PEER_SERVICE"] == "liferaft-peer"
    assert env["LIFERAFT_CLIENT_SERVICE"] == "liferaft-client"


def test_pdb_allows_one_member_down(built: dict[tuple[str, str], dict[str, Any]]) -> None:
    pdb = built[("PodDisruptionBudget", "liferaft")]["spec"]
    assert pdb["maxUnavailable"] == 1
    labels = built[("StatefulSet", "liferaft")]["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()


def test_probes_hooks_and_ports(built: dict[tuple[str, str], dict[str, Any]]) -> None:
    (node,) = pod(built)["containers"]
    ports = {p["name"]: p["containerPort"] for p in node["ports"]}
    env = built[("ConfigMap", "liferaft-env")]["data"]
    assert ports == {
        "peer": int(env["LIFERAFT_PEER_PORT"]),
        "client": int(env["LIFERAFT_CLIENT_PORT"]),
        "metrics": int(env["LIFERAFT_METRICS_PORT"]),
    }
    assert node["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert node["startupProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert node["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert node["args"] == ["node", "--config", "/etc/liferaft/node.toml"]
    assert node["lifecycle"]["preStop"]["exec"]["command"][-1] == "leave"
    (init,) = pod(built)["initContainers"]
    assert init["command"][-1] == "init"
    grace = pod(built)["terminationGracePeriodSeconds"]
    assert int(env["LIFERAFT_LEAVE_SECONDS"]) < grace  # leave finishes before SIGKILL


def test_security_context_and_resources(built: dict[tuple[str, str], dict[str, Any]]) -> None:
    spec = pod(built)
    ctx = spec["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == ctx["fsGroup"] == 10001
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec["initContainers"] + spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(c["resources"]["requests"])
        assert "memory" in c["resources"]["limits"]


def test_secrets_reach_the_init_container_and_only_the_token_the_node(
    built: dict[tuple[str, str], dict[str, Any]],
) -> None:
    spec = pod(built)
    volumes = {v["name"]: v for v in spec["volumes"]}
    secret_volumes = {n: v["secret"]["secretName"] for n, v in volumes.items() if "secret" in v}
    assert set(secret_volumes.values()) == SECRETS
    (init,) = spec["initContainers"]
    (node,) = spec["containers"]
    init_mounts = {m["name"] for m in init["volumeMounts"]}
    node_mounts = {m["name"] for m in node["volumeMounts"]}
    assert set(secret_volumes) <= init_mounts
    # The tls Secret holds every member's key: the node only sees its own copy (etc).
    assert {n for n in node_mounts if n in secret_volumes} == {"admin-token"}
    assert volumes["etc"]["emptyDir"]["medium"] == "Memory"
    for v in volumes.values():  # every ConfigMap the pod names is one kustomize built
        if "configMap" in v:
            base = v["configMap"]["name"].rsplit("-", 1)[0]
            assert ("ConfigMap", base) in built
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    assert mounts["/var/run/liferaft/tls"] == "tls"  # where liferaft-pod.py looks
    assert mounts["/etc/liferaft"] == "etc" and mounts["/var/lib/liferaft"] == "data"


def test_rbac_lets_the_pod_read_its_statefulset_only(
    built: dict[tuple[str, str], dict[str, Any]],
) -> None:
    (rule,) = built[("Role", "liferaft")]["rules"]
    assert rule == {
        "apiGroups": ["apps"],
        "resources": ["statefulsets"],
        "resourceNames": ["liferaft"],
        "verbs": ["get"],
    }
    binding = built[("RoleBinding", "liferaft")]
    assert binding["subjects"][0]["name"] == pod(built)["serviceAccountName"] == "liferaft"
