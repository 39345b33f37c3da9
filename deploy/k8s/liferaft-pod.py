"""A liferaft pod's own steps in the StatefulSet (docs/deploy.md, "Kubernetes").

    python /opt/liferaft-pod/liferaft-pod.py init    # init container: config, certs, join
    python /opt/liferaft-pod/liferaft-pod.py leave   # preStop hook: leave on scale-down

Runs in the liferaft image (Python standard library and the ``liferaft`` command only).
The pod's name is its member id (``liferaft-3``) and its ordinal (3) picks its role:

``init`` writes ``$LIFERAFT_ETC_DIR/node.toml`` for this pod, copies its own certificate
and key out of the Secret (mode 0600: the node refuses a key others can read, and a
Secret volume with ``fsGroup`` is group-readable), and decides whether the node starts a
new cluster or joins a running one:

- a data dir that already holds a node (``raft.db``) restarts as it was, and is added
  back as a learner if the cluster answers and no longer lists it (it was removed by an
  earlier scale-down, and its volume kept);
- an empty data dir first asks the cluster (``liferaft member list`` through the client
  Service and the initial members). If it answers and does not list this pod, the pod
  is added (``liferaft member add --learner``) and joins (``join = true``); if it lists
  it already, the pod starts empty and catches up (an initial member from the bootstrap
  membership like the others, any other with ``join = true``). If nothing answers, an
  initial member (ordinal below the initial size) starts the cluster with the others;
  any other pod fails, and the kubelet runs the init container again later.

``leave`` removes this pod's member from the cluster, handing leadership over first, but
only when the StatefulSet has been scaled below this pod's ordinal (its ``spec.replicas``,
read from the Kubernetes API with the pod's service account) and not to 0. On any other
stop (a rolling update, a drain, scaling to 0, deleting the StatefulSet) it does nothing:
the pod comes back with its volume.
When the API cannot be read it does nothing either, and says so: a member left behind
is reported by ``liferaft member list``; one removed by mistake would cost a replica.

Every setting comes from the environment (the StatefulSet sets them; the defaults are
the manifests' paths): see ``Env`` below.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_UNAVAILABLE = 4  # `liferaft` client commands: the cluster did not answer


def log(msg: str) -> None:
    """One line on stderr: the init container's log, or the preStop hook's event."""
    print(f"liferaft-pod: {msg}", file=sys.stderr, flush=True)


class Failed(Exception):
    """A step that cannot go on: exit 1 with this message (the kubelet retries init)."""


def _int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise Failed(f"{name} must be an integer, got {text!r}") from None


@dataclass(frozen=True)
class Env:
    """What the pod is told, from its environment variables."""

    pod: str  # POD_NAME: liferaft-3, the member id
    namespace: str  # POD_NAMESPACE
    initial: int  # LIFERAFT_INITIAL_MEMBERS: ordinals below it start the cluster
    peer_service: str  # LIFERAFT_PEER_SERVICE: the headless Service (pod DNS names)
    client_service: str  # LIFERAFT_CLIENT_SERVICE
    domain: str  # LIFERAFT_CLUSTER_DOMAIN
    host_template: str  # LIFERAFT_HOST_TEMPLATE: a member's address, from {id} and the above
    listen_host: str  # LIFERAFT_LISTEN_HOST: 0.0.0.0, or :: for IPv6
    peer_port: int
    client_port: int
    metrics_port: int
    auto_promote: bool  # LIFERAFT_AUTO_PROMOTE: write [cluster] auto_promote = true
    secrets: Path  # LIFERAFT_SECRETS_DIR: tls/ (ca.pem, <id>.pem, <id>-key.pem), jwt/, admin/
    etc: Path  # LIFERAFT_ETC_DIR: where node.toml and the copied certs go (an emptyDir)
    data: Path  # LIFERAFT_DATA_DIR: the node's data dir, on its volume
    extra: Path  # LIFERAFT_EXTRA_CONFIG: TOML appended to node.toml if the file exists
    endpoints: str  # LIFERAFT_ENDPOINTS: where membership calls go (default: computed)
    statefulset: str  # LIFERAFT_STATEFULSET (default: the pod name without its ordinal)
    leave_seconds: float  # LIFERAFT_LEAVE_SECONDS: how long `leave` may try

    @classmethod
    def read(cls) -> Env:
        pod = os.environ.get("POD_NAME", "")
        base, sep, ordinal = pod.rpartition("-")
        if not sep or not base or not ordinal.isdigit():
            raise Failed(f"POD_NAME must be a StatefulSet pod name like liferaft-0, got {pod!r}")
        e = os.environ.get
        return cls(
            pod=pod,
            namespace=e("POD_NAMESPACE", "default"),
            initial=_int("LIFERAFT_INITIAL_MEMBERS", 3),
            peer_service=e("LIFERAFT_PEER_SERVICE", "liferaft-peer"),
            client_service=e("LIFERAFT_CLIENT_SERVICE", "liferaft-client"),
            domain=e("LIFERAFT_CLUSTER_DOMAIN", "cluster.local"),
            host_template=e("LIFERAFT_HOST_TEMPLATE", "{id}.{service}.{namespace}.svc.{domain}"),
            listen_host=e("LIFERAFT_LISTEN_HOST", "0.0.0.0"),
            peer_port=_int("LIFERAFT_PEER_PORT", 7001),
            client_port=_int("LIFERAFT_CLIENT_PORT", 8001),
            metrics_port=_int("LIFERAFT_METRICS_PORT", 9001),
            auto_promote=e("LIFERAFT_AUTO_PROMOTE", "false").lower() == "true",
            secrets=Path(e("LIFERAFT_SECRETS_DIR", "/var/run/liferaft")),
            etc=Path(e("LIFERAFT_ETC_DIR", "/etc/liferaft")),
            data=Path(e("LIFERAFT_DATA_DIR", "/var/lib/liferaft/data")),
            extra=Path(e("LIFERAFT_EXTRA_CONFIG", "/etc/liferaft-extra/extra.toml")),
            endpoints=e("LIFERAFT_ENDPOINTS", ""),
            statefulset=e("LIFERAFT_STATEFULSET", base),
            leave_seconds=float(_int("LIFERAFT_LEAVE_SECONDS", 40)),
        )

    @property
    def ordinal(self) -> int:
        return int(self.pod.rpartition("-")[2])

    @property
    def base(self) -> str:
        return self.pod.rpartition("-")[0]

    def member_id(self, ordinal: int) -> str:
        return f"{self.base}-{ordinal}"

    def host(self, ordinal: int) -> str:
        """A pod's DNS name under the headless Service (resolves before it is ready)."""
        try:
            return self.host_template.format(
                id=self.member_id(ordinal),
                service=self.peer_service,
                namespace=self.namespace,
                domain=self.domain,
            )
        except (KeyError, IndexError, ValueError) as e:
            raise Failed(f"LIFERAFT_HOST_TEMPLATE {self.host_template!r}: {e!r}") from None

    def cluster_endpoints(self) -> str:
        """The client Service first, then every initial member directly."""
        if self.endpoints:
            return self.endpoints
        service = f"{self.client_service}.{self.namespace}.svc.{self.domain}"
        urls = [f"wss://{service}:{self.client_port}"]
        urls += [f"wss://{self.host(i)}:{self.client_port}" for i in range(self.initial)]
        return ",".join(urls)

    @property
    def cacert(self) -> Path:
        return self.etc / "tls" / "ca.pem"

    @property
    def token_file(self) -> Path:
        return self.secrets / "admin" / "token"


# ---------------------------------------------------------------- config and certs


def _listen(env: Env, port: int) -> str:
    host = env.listen_host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render_config(env: Env, *, join: bool) -> str:
    """This pod's node.toml (docs/operations.md, "Configuration", lists every key)."""
    members = "\n".join(
        f'  {{ id = "{env.member_id(i)}", peer = "{env.host(i)}:{env.peer_port}",'
        f' client = "{env.host(i)}:{env.client_port}" }},'
        for i in range(env.initial)
    )
    tls = env.etc / "tls"
    text = f"""\
# Written by liferaft-pod.py init for pod {env.pod}; rewritten at every start.
[node]
id = "{env.pod}"
data_dir = "{env.data}"

[peer]
listen = "{_listen(env, env.peer_port)}"

[client]
listen = "{_listen(env, env.client_port)}"

[metrics]
listen = "{_listen(env, env.metrics_port)}"

[cluster]
members = [
{members}
]
join = {"true" if join else "false"}
"""
    if env.auto_promote:
        text += "auto_promote = true\n"
    text += f"""
[tls]
ca = "{tls / "ca.pem"}"
cert = "{tls / "node.pem"}"
key = "{tls / "node-key.pem"}"

[auth]
jwt_public_keys = ["{env.etc / "jwt-public.pem"}"]
issuer = "liferaft"
audience = "liferaft"
"""
    if env.extra.is_file():
        text += f"\n# From {env.extra}:\n{env.extra.read_text()}"
    return text


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temp file and rename) with ``mode`` from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_certs(env: Env) -> None:
    """Copy this pod's certificate and key (only these) and the CA and JWT public key
    from the Secret volumes to ``etc``; the node's container never mounts the Secret."""
    tls = env.secrets / "tls"
    wanted = [
        (tls / "ca.pem", env.etc / "tls" / "ca.pem", 0o644),
        (tls / f"{env.pod}.pem", env.etc / "tls" / "node.pem", 0o644),
        (tls / f"{env.pod}-key.pem", env.etc / "tls" / "node-key.pem", 0o600),
        (env.secrets / "jwt" / "jwt-public.pem", env.etc / "jwt-public.pem", 0o644),
    ]
    for src, dst, mode in wanted:
        if not src.is_file():
            raise Failed(
                f"{src} is missing: the Secret has no such file (issue the certificates"
                f" for every member id up to the largest replica count; docs/deploy.md)"
            )
        _write(dst, src.read_bytes(), mode)


# ---------------------------------------------------------------- talking to the cluster


def liferaft(env: Env, *args: str, endpoints: str | None = None) -> tuple[int, Any]:
    """Run a ``liferaft`` client command with ``-o json``; (exit code, parsed output)."""
    cmd = [
        os.environ.get("LIFERAFT_BIN", "liferaft"),
        *args,
        "--endpoints",
        endpoints or env.cluster_endpoints(),
        "--cacert",
        str(env.cacert),
        "--token-file",
        str(env.token_file),
        "--timeout",
        os.environ.get("LIFERAFT_CALL_TIMEOUT", "5"),
        "-o",
        "json",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except OSError as e:
        raise Failed(f"cannot run {cmd[0]}: {e}") from None
    if proc.returncode != 0:
        log(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    try:
        return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        raise Failed(f"{' '.join(args)}: output is not JSON: {proc.stdout!r}") from None


def member_ids(env: Env) -> set[str] | None:
    """The cluster's member ids, or None when no endpoint answered."""
    code, doc = liferaft(env, "member", "list")
    if code == EXIT_UNAVAILABLE:
        return None
    if code != 0:
        raise Failed(f"liferaft member list failed (exit {code}); see above")
    return {str(m["id"]) for m in doc["members"]}


def add_self(env: Env) -> None:
    """``member add <pod> --learner`` with this pod's DNS name as its addresses."""
    host = env.host(env.ordinal)
    code, _ = liferaft(
        env,
        "member",
        "add",
        env.pod,
        "--peer",
        f"{host}:{env.peer_port}",
        "--client",
        f"{host}:{env.client_port}",
        "--learner",
    )
    if code != 0:
        raise Failed(f"liferaft member add {env.pod} failed (exit {code}); retried at next start")
    promote = "promotes it" if env.auto_promote else "needs `liferaft member promote` for it"
    log(f"added {env.pod} as a learner; the leader {promote} once it has caught up")


def init(env: Env) -> None:
    """The init container: certs, then membership, then node.toml."""
    copy_certs(env)
    fresh = not (env.data / "raft.db").exists()
    scaled = env.ordinal >= env.initial
    if not env.token_file.is_file():
        raise Failed(f"{env.token_file} is missing: the admin token Secret (docs/deploy.md)")
    if fresh:
        members = member_ids(env)
        if members is None:
            if scaled:
                raise Failed("the cluster does not answer, and this pod is not an initial member")
            log(f"no cluster answers: {env.pod} starts it with the other initial members")
            join = False
        elif env.pod in members:
            # Listed already: an initial member slower to start than the others (it starts
            # from the same bootstrap membership they did), or a pod added before its node
            # ever ran. Either way it starts empty and catches up from the leader.
            join = scaled
            log(f"{env.pod} is already a member; it starts empty and catches up")
        else:
            join = True
            add_self(env)
    else:
        # A restart on its own data: an initial member's config lists it, any other joined.
        join = scaled
        members = member_ids(env)
        if members is None:
            log("the cluster does not answer; starting on the data dir as it is")
        elif env.pod not in members:
            log(f"{env.pod} has data but is no member (removed by a scale-down): adding it")
            add_self(env)
    _write(env.etc / "node.toml", render_config(env, join=join).encode(), 0o644)
    log(f"wrote {env.etc / 'node.toml'} (join = {str(join).lower()})")


# ---------------------------------------------------------------- leaving


def statefulset_replicas(env: Env) -> int | None:
    """``spec.replicas`` of this pod's StatefulSet from the Kubernetes API, or None."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    sa = Path(os.environ.get("LIFERAFT_SA_DIR", "/var/run/secrets/kubernetes.io/serviceaccount"))
    if not host:
        log("KUBERNETES_SERVICE_HOST is not set: not in a pod")
        return None
    if ":" in host:
        host = f"[{host}]"
    url = f"https://{host}:{port}/apis/apps/v1/namespaces/{env.namespace}/statefulsets/{env.statefulset}"
    try:
        token = (sa / "token").read_text().strip()
        ctx = ssl.create_default_context(cafile=str(sa / "ca.crt"))
        request = urllib.request.Request(
            url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}
        )
        with urllib.request.urlopen(request, context=ctx, timeout=5) as response:
            doc = json.load(response)
        return int(doc["spec"]["replicas"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log(f"cannot read {url}: {e}")
        return None


def leader(env: Env) -> str | None:
    """The leader's id as the endpoints that answer `liferaft status` see it."""
    _, doc = liferaft(env, "status")
    for row in (doc or {}).get("endpoints", []):
        leader_id = (row.get("status") or {}).get("leader_id")
        if leader_id:
            return str(leader_id)
    return None


def leave(env: Env) -> bool:
    """The preStop hook: remove this member if the StatefulSet shrank below it.
    True if it was removed (or was no member), False if it stays."""
    replicas = statefulset_replicas(env)
    if replicas is None:
        log("replica count unknown: staying a member")
        return False
    if replicas == 0 or env.ordinal < replicas:
        # Scaled to 0 is "stop everything", not "shrink to nothing": every member stays.
        log(f"{env.pod} stops but stays a member ({replicas} replicas)")
        return False
    deadline = time.monotonic() + env.leave_seconds
    pause = 0.5
    while True:
        if leader(env) == env.pod:
            liferaft(env, "transfer-leader")
        code, _ = liferaft(env, "member", "remove", env.pod)
        if code == 0:
            log(f"removed {env.pod} from the cluster ({replicas} replicas)")
            return True
        members = member_ids(env)
        if members is not None and env.pod not in members:
            log(f"{env.pod} is no member (any more)")
            return True
        if time.monotonic() + pause > deadline:
            raise Failed(f"could not remove {env.pod} in {env.leave_seconds:.0f} s")
        time.sleep(pause)  # another change in flight, or an election: try again
        pause = min(pause * 2, 5.0)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("init", "leave"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        env = Env.read()
        if argv[1] == "init":
            init(env)
        else:
            leave(env)
    except Failed as e:
        log(str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
