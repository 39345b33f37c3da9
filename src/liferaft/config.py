"""A node's config file (docs/operations.md, "Configuration"): TOML into typed, validated,
frozen settings.

``load(path)`` reads the file with the stdlib ``tomllib`` and returns a :class:`Settings`,
or raises one :class:`ConfigError` whose message names the file and the key at fault::

    config/node1.toml: peer.listen: expected host:port, got '127.0.0.1'

Exactly the keys listed in docs/operations.md are accepted: a key without a default there
is required, an unknown key or section is an error (a typo never falls back to a default
silently). Relative paths are relative to the config file's directory; the settings hold
them resolved and absolute.

Rules beyond the list of keys (the choices made here):

- Types are TOML's own: an integer setting takes a TOML integer, never a boolean, float
  or string; ``cluster.members`` is an array of tables (inline or ``[[cluster.members]]``).
- Addresses are ``host:port`` with port 1..65535; IPv6 hosts go in brackets
  (``[::1]:7001``). The three listen addresses must not collide; no two member
  addresses (peer or client) may be equal.
- Node ids (``node.id`` and every member id) follow the rule of
  ``liferaft.security.certs.validate_node_id``, the one ``liferaft certs`` applies: 1 to 63
  of a-z, 0-9 and '-', a DNS label (no leading or trailing '-'), not a reserved name such
  as ``localhost``, which every node certificate carries.
- ``raft.election_timeout_ms >= 2 * raft.heartbeat_interval_ms``: a follower must be able
  to miss a heartbeat without starting an election. etcd asks for 5x and recommends 10x;
  2x is the floor below which a cluster flaps, the defaults (50/300) keep 6x.
- ``node.id`` must be one of ``cluster.members`` unless ``cluster.join = true``;
  ``cluster.members`` is never empty.
- The files named by ``tls`` and ``auth`` must exist when the config is loaded; the
  certificate at ``tls.cert`` must carry ``node.id`` as a DNS SAN, and the private key at
  ``tls.key`` must not be accessible to group or others (POSIX only).
- ``ConfigError.path`` and the message name the config file as the caller gave it;
  ``Settings.path`` holds it resolved. In ``cluster.members[i]`` the index counts from 0.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from typing import Final, TypeVar

from liferaft.security.certs import node_ids, validate_node_id

__all__ = [
    "Address",
    "AuthSettings",
    "ClientSettings",
    "ClusterSettings",
    "ConfigError",
    "Member",
    "MetricsSettings",
    "NodeSettings",
    "PeerSettings",
    "RaftSettings",
    "Settings",
    "TlsSettings",
    "load",
]

_HOST_RE: Final = re.compile(r"[A-Za-z0-9._-]+")
_WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::"})


class ConfigError(Exception):
    """A config file that cannot be used: ``"<file>: <key>: <problem>"``.

    ``key`` is the dotted key at fault (``"client.listen"``,
    ``"cluster.members[1].id"``), or None when the problem is the file as a whole.
    """

    def __init__(self, path: Path, key: str | None, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        where = f"{path}: {key}" if key is not None else str(path)
        super().__init__(f"{where}: {problem}")


class _Invalid(ValueError):
    """A settings value breaks an invariant; ``field`` is its key relative to the
    dataclass that found it (``load`` prefixes the section)."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


def _at_least(field: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise _Invalid(field, f"must be at least {minimum}, got {value}")


def _check_node_id(field: str, value: str) -> None:
    try:
        validate_node_id(value)
    except ValueError as e:
        raise _Invalid(field, str(e)) from None


# ---------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint. ``host`` is a DNS name or an IP address, IPv6 without brackets."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not self.host:
            raise _Invalid("host", "must not be empty")
        if not 1 <= self.port <= 65535:
            raise _Invalid("port", f"must be 1..65535, got {self.port}")

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """``"host:port"`` or ``"[v6addr]:port"``; raises ValueError with the reason."""
        expected = f"expected host:port, got {text!r}"
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or not port_text or (host[0] == "[") != (host[-1] == "]"):
            raise ValueError(expected)
        if host.startswith("["):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{expected} ({host!r} is not an IPv6 address)") from None
        elif ":" in host:
            raise ValueError(f"{expected} (write an IPv6 host in brackets: [::1]:7001)")
        elif not _HOST_RE.fullmatch(host):
            raise ValueError(f"{expected} ({host!r} is not a host name or IP address)")
        if not (port_text.isascii() and port_text.isdigit()):
            raise ValueError(f"{expected} (port {port_text!r} is not a number)")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError(f"port must be 1..65535, got {text!r}")
        return cls(host, port)

    def _same_as(self, other: Address) -> bool:
        return self.port == other.port and _host_key(self.host) == _host_key(other.host)

    def _binds_with(self, other: Address) -> bool:
        """Whether listening on both would collide (same port, same or wildcard host)."""
        if self.port != other.port:
            return False
        return self._same_as(other) or bool({self.host, other.host} & _WILDCARD_HOSTS)


def _host_key(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")


# ---------------------------------------------------------------- sections


@dataclass(frozen=True, slots=True)
class NodeSettings:
    id: str
    data_dir: Path  # SQLite database and snapshots; created by the node if absent

    def __post_init__(self) -> None:
        _check_node_id("id", self.id)


@dataclass(frozen=True, slots=True)
class PeerSettings:
    listen: Address  # mutual-TLS wss for other nodes, path /raft


@dataclass(frozen=True, slots=True)
class ClientSettings:
    listen: Address  # TLS wss for clients, path /v1
    max_message_bytes: int = 1048576
    max_connections: int = 1024  # more are refused at accept
    handshake_timeout_ms: int = 5000  # TLS + upgrade; the peer listener uses it too

    def __post_init__(self) -> None:
        _at_least("max_message_bytes", self.max_message_bytes, 1024)
        _at_least("max_connections", self.max_connections, 1)
        _at_least("handshake_timeout_ms", self.handshake_timeout_ms, 100)


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    listen: Address  # plain HTTP: /metrics /healthz /readyz


@dataclass(frozen=True, slots=True)
class Member:
    """An initial cluster member, with the addresses *this* node dials it at."""

    id: str
    peer: Address
    client: Address

    def __post_init__(self) -> None:
        _check_node_id("id", self.id)


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    members: tuple[Member, ...]  # the initial members, used when data_dir is empty
    join: bool = False  # start empty as a learner, to be added by `member add`
    # the leader promotes a caught-up learner to voter by itself (node/promote.py)
    auto_promote: bool = False

    def __post_init__(self) -> None:
        if not self.members:
            raise _Invalid("members", "must name at least one member")
        seen_ids: dict[str, int] = {}
        seen_addrs: list[tuple[Address, str]] = []
        for i, m in enumerate(self.members):
            if m.id in seen_ids:
                raise _Invalid(
                    f"members[{i}].id",
                    f"duplicate member id {m.id!r} (also members[{seen_ids[m.id]}])",
                )
            seen_ids[m.id] = i
            for name, addr in (("peer", m.peer), ("client", m.client)):
                here = f"members[{i}].{name}"
                for other, where in seen_addrs:
                    if addr._same_as(other):
                        raise _Invalid(here, f"address {addr} is already used by {where}")
                seen_addrs.append((addr, here))

    def member(self, node_id: str) -> Member | None:
        return next((m for m in self.members if m.id == node_id), None)


@dataclass(frozen=True, slots=True)
class TlsSettings:
    ca: Path
    cert: Path  # must carry the node id as a DNS SAN
    key: Path  # mode 0600


@dataclass(frozen=True, slots=True)
class AuthSettings:
    jwt_public_keys: tuple[Path, ...]  # PEM public keys or JWKS JSON files
    issuer: str
    audience: str
    leeway_s: int = 5  # clock skew allowed on exp/nbf/iat

    def __post_init__(self) -> None:
        if not self.jwt_public_keys:
            raise _Invalid("jwt_public_keys", "must name at least one key file")
        if not self.issuer:
            raise _Invalid("issuer", "must not be empty")
        if not self.audience:
            raise _Invalid("audience", "must not be empty")
        _at_least("leeway_s", self.leeway_s, 0)


@dataclass(frozen=True, slots=True)
class RaftSettings:
    """Raft timing in milliseconds; the node maps it onto core ticks."""

    heartbeat_interval_ms: int = 50
    election_timeout_ms: int = 300  # randomized in [t, 2t); at least 2x the heartbeat
    snapshot_entries: int = 10000  # compact the log after this many applied entries

    def __post_init__(self) -> None:
        _at_least("heartbeat_interval_ms", self.heartbeat_interval_ms, 1)
        if self.election_timeout_ms < 2 * self.heartbeat_interval_ms:
            raise _Invalid(
                "election_timeout_ms",
                f"must be at least 2 x heartbeat_interval_ms ({self.heartbeat_interval_ms})"
                f" = {2 * self.heartbeat_interval_ms}, got {self.election_timeout_ms}",
            )
        _at_least("snapshot_entries", self.snapshot_entries, 1)


@dataclass(frozen=True, slots=True)
class KvSettings:
    """The key-value store; every replica must use the same values."""

    history_revisions: int = 100000  # automatic compaction keeps this many revisions

    def __post_init__(self) -> None:
        _at_least("history_revisions", self.history_revisions, 1)


LOG_LEVELS: Final = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class LogSettings:
    """What the node logs: records at ``level`` and above (docs/operations.md, "Logs")."""

    level: str = "info"

    def __post_init__(self) -> None:
        if self.level not in LOG_LEVELS:
            raise _Invalid("level", f"must be one of {', '.join(LOG_LEVELS)}, got {self.level!r}")


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """Where audit records go: with the log on stderr (None), or as JSON lines to a file
    of their own, reopened on SIGHUP so that logrotate can move it."""

    file: Path | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    node: NodeSettings
    peer: PeerSettings
    client: ClientSettings
    metrics: MetricsSettings
    cluster: ClusterSettings
    tls: TlsSettings
    auth: AuthSettings
    raft: RaftSettings
    kv: KvSettings
    path: Path  # the config file, absolute
    log: LogSettings = LogSettings()
    audit: AuditSettings = AuditSettings()

    def __post_init__(self) -> None:
        if not self.cluster.join and self.cluster.member(self.node.id) is None:
            ids = ", ".join(m.id for m in self.cluster.members)
            raise _Invalid(
                "node.id",
                f"{self.node.id!r} is not among cluster.members ({ids}); add it there,"
                " or set cluster.join = true to join a running cluster",
            )
        listens = [
            ("peer.listen", self.peer.listen),
            ("client.listen", self.client.listen),
            ("metrics.listen", self.metrics.listen),
        ]
        for i, (key, addr) in enumerate(listens):
            for other_key, other in listens[:i]:
                if addr._binds_with(other):
                    raise _Invalid(key, f"{addr} collides with {other_key} ({other})")


# ---------------------------------------------------------------- loading

_T = TypeVar("_T")
_MISSING: Final = object()

_SECTIONS: Final[Mapping[str, tuple[str, ...]]] = {
    "node": ("id", "data_dir"),
    "peer": ("listen",),
    "client": ("listen", "max_message_bytes", "max_connections", "handshake_timeout_ms"),
    "metrics": ("listen",),
    "cluster": ("members", "join", "auto_promote"),
    "tls": ("ca", "cert", "key"),
    "auth": ("jwt_public_keys", "issuer", "audience", "leeway_s"),
    "raft": ("heartbeat_interval_ms", "election_timeout_ms", "snapshot_entries"),
    "kv": ("history_revisions",),
    "log": ("level",),
    "audit": ("file",),
}
_OPTIONAL_SECTIONS: Final = frozenset({"raft", "kv", "log", "audit"})  # all keys have defaults
_MEMBER_KEYS: Final = ("id", "peer", "client")


def _describe(value: object) -> str:
    """A TOML value as an operator would name it in an error message."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime):
        return "a date-time"
    if isinstance(value, date):
        return "a date"
    if isinstance(value, time):
        return "a time"
    return type(value).__name__  # pragma: no cover - tomllib yields nothing else


class _Table:
    """One TOML table being read: typed getters, errors naming ``<file>: <key>``."""

    def __init__(
        self, loader: _Loader, prefix: str, data: dict[str, object], known: tuple[str, ...]
    ) -> None:
        self._loader = loader
        self._prefix = prefix
        self._data = data
        for name in data:  # unknown keys first: a typo explains the "missing" that follows
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {self.key(close[0])}?)" if close else ""
                kind = "section" if not prefix and isinstance(data[name], dict) else "key"
                raise self.error(name, f"unknown {kind}{hint}")

    def key(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self._loader.display, self.key(name), problem)

    def _get(self, name: str, kind: type[_T], what: str, default: object = _MISSING) -> _T:
        value = self._data.get(name, default)
        if value is _MISSING:
            raise self.error(name, "missing")
        # bool is an int subclass; TOML booleans are never integers here.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(name, f"expected {what}, got {_describe(value)}")
        return value

    def string(self, name: str) -> str:
        return self._get(name, str, "a string")

    def optional_string(self, name: str, default: str) -> str:
        return self._get(name, str, "a string", default)

    def integer(self, name: str, default: int) -> int:
        return self._get(name, int, "an integer", default)

    def boolean(self, name: str, default: bool) -> bool:
        return self._get(name, bool, "a boolean (true or false)", default)

    def address(self, name: str) -> Address:
        try:
            return Address.parse(self.string(name))
        except ValueError as e:
            raise self.error(name, str(e)) from None

    def path(self, name: str) -> Path:
        return self._loader.resolve(self.key(name), self.string(name))

    def array(self, name: str) -> list[object]:
        return self._get(name, list, "an array")

    def table(self, name: str, known: tuple[str, ...]) -> _Table:
        if name not in self._data and name not in _OPTIONAL_SECTIONS:
            raise self.error(name, "missing section")
        data = self._get(name, dict, "a table", {})
        return _Table(self._loader, self.key(name), data, known)

    def item_table(self, name: str, index: int, value: object, known: tuple[str, ...]) -> _Table:
        """Element ``index`` of the array ``name``, which must be a table."""
        here = f"{name}[{index}]"
        if not isinstance(value, dict):
            raise self.error(here, f"expected a table, got {_describe(value)}")
        return _Table(self._loader, self.key(here), value, known)

    @contextmanager
    def invariants(self) -> Iterator[None]:
        """Turn a dataclass's invariant failure into a ConfigError under this table."""
        try:
            yield
        except _Invalid as e:
            raise self.error(e.field, e.problem) from None


class _Loader:
    def __init__(self, display: Path) -> None:
        self.display = display  # the file as the caller named it
        self.file = display.resolve()
        self.base = self.file.parent

    def error(self, key: str | None, problem: str) -> ConfigError:
        return ConfigError(self.display, key, problem)

    def resolve(self, key: str, text: str) -> Path:
        if not text:
            raise self.error(key, "must not be empty")
        return (self.base / text).resolve()

    def read(self) -> dict[str, object]:
        try:
            with open(self.file, "rb") as f:
                return tomllib.load(f)
        except FileNotFoundError:
            raise self.error(None, "no such file") from None
        except IsADirectoryError:
            raise self.error(None, "is a directory, not a config file") from None
        except PermissionError:
            raise self.error(None, "not readable (permission denied)") from None
        except OSError as e:
            raise self.error(None, f"cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise self.error(None, f"not UTF-8 text (byte offset {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise self.error(None, f"invalid TOML: {e}") from None

    def settings(self, doc: dict[str, object]) -> Settings:
        root = _Table(self, "", doc, tuple(_SECTIONS))

        t = root.table("node", _SECTIONS["node"])
        with t.invariants():
            node = NodeSettings(id=t.string("id"), data_dir=t.path("data_dir"))

        t = root.table("peer", _SECTIONS["peer"])
        peer = PeerSettings(listen=t.address("listen"))

        t = root.table("client", _SECTIONS["client"])
        with t.invariants():
            client = ClientSettings(
                listen=t.address("listen"),
                max_message_bytes=t.integer("max_message_bytes", 1048576),
                max_connections=t.integer("max_connections", 1024),
                handshake_timeout_ms=t.integer("handshake_timeout_ms", 5000),
            )

        t = root.table("metrics", _SECTIONS["metrics"])
        metrics = MetricsSettings(listen=t.address("listen"))

        cluster = self._cluster(root.table("cluster", _SECTIONS["cluster"]))

        t = root.table("tls", _SECTIONS["tls"])
        tls = TlsSettings(ca=t.path("ca"), cert=t.path("cert"), key=t.path("key"))

        t = root.table("auth", _SECTIONS["auth"])
        keys = tuple(
            self.resolve(t.key(f"jwt_public_keys[{i}]"), _item_string(t, "jwt_public_keys", i, v))
            for i, v in enumerate(t.array("jwt_public_keys"))
        )
        with t.invariants():
            auth = AuthSettings(
                jwt_public_keys=keys,
                issuer=t.string("issuer"),
                audience=t.string("audience"),
                leeway_s=t.integer("leeway_s", 5),
            )

        t = root.table("raft", _SECTIONS["raft"])
        with t.invariants():
            raft = RaftSettings(
                heartbeat_interval_ms=t.integer("heartbeat_interval_ms", 50),
                election_timeout_ms=t.integer("election_timeout_ms", 300),
                snapshot_entries=t.integer("snapshot_entries", 10000),
            )

        t = root.table("kv", _SECTIONS["kv"])
        with t.invariants():
            kv = KvSettings(history_revisions=t.integer("history_revisions", 100000))

        t = root.table("log", _SECTIONS["log"])
        with t.invariants():
            log = LogSettings(level=t.optional_string("level", "info").lower())

        t = root.table("audit", _SECTIONS["audit"])
        with t.invariants():
            name = t.optional_string("file", "")
            audit = AuditSettings(file=self.resolve(t.key("file"), name) if name else None)

        with root.invariants():
            return Settings(
                node, peer, client, metrics, cluster, tls, auth, raft, kv, self.file, log, audit
            )

    def _cluster(self, t: _Table) -> ClusterSettings:
        members = []
        for i, item in enumerate(t.array("members")):
            m = t.item_table("members", i, item, _MEMBER_KEYS)
            with m.invariants():
                members.append(
                    Member(id=m.string("id"), peer=m.address("peer"), client=m.address("client"))
                )
        with t.invariants():
            return ClusterSettings(
                members=tuple(members),
                join=t.boolean("join", False),
                auto_promote=t.boolean("auto_promote", False),
            )

    # -------------------------------------------------------- the files it names

    def check_files(self, s: Settings) -> None:
        if s.node.data_dir.exists() and not s.node.data_dir.is_dir():
            raise self.error("node.data_dir", f"{s.node.data_dir} is not a directory")
        self._readable_file("tls.ca", s.tls.ca)
        self._readable_file("tls.cert", s.tls.cert)
        self._check_cert_names(s.tls.cert, s.node.id)
        self._readable_file("tls.key", s.tls.key)
        self._check_private(s.tls.key)
        for i, p in enumerate(s.auth.jwt_public_keys):
            self._readable_file(f"auth.jwt_public_keys[{i}]", p)

    def _readable_file(self, key: str, path: Path) -> None:
        if not path.exists():
            raise self.error(key, f"{path} does not exist")
        if not path.is_file():
            raise self.error(key, f"{path} is not a regular file")
        if not os.access(path, os.R_OK):
            raise self.error(key, f"{path} is not readable (permission denied)")

    def _check_cert_names(self, path: Path, node_id: str) -> None:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise self.error("tls.cert", f"cannot read {path}: {e.strerror or e}") from None
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise self.error("tls.cert", f"{path} is not a PEM certificate")
        try:
            names = sorted(node_ids(data), key=lambda n: (n == "localhost", n))
        except ValueError:
            raise self.error("tls.cert", f"{path} is not a PEM certificate") from None
        if node_id not in names:
            named = f"names {', '.join(names)}" if names else "has no DNS name"
            raise self.error("tls.cert", f"certificate {named}, not this node {node_id} ({path})")

    def _check_private(self, path: Path) -> None:
        if os.name != "posix":
            return
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise self.error(
                "tls.key", f"{path} is readable by others (mode {mode:04o}); chmod 600 it"
            )


def _item_string(t: _Table, name: str, index: int, value: object) -> str:
    if not isinstance(value, str):
        raise t.error(f"{name}[{index}]", f"expected a string, got {_describe(value)}")
    return value


def load(path: Path | str) -> Settings:
    """Read and check the config file at ``path``; raise ConfigError on the first fault."""
    loader = _Loader(Path(path))
    settings = loader.settings(loader.read())
    loader.check_files(settings)
    return settings
