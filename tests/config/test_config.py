"""The config file (docs/operations.md): the shipped configs load, defaults apply,
relative paths follow the file, and every mistake is one ConfigError naming the file and
the key."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from liferaft.config import (
    Address,
    ClientSettings,
    ConfigError,
    Member,
    RaftSettings,
    Settings,
    load,
)
from liferaft.security.certs import generate

SHIPPED = Path(__file__).resolve().parents[2] / "config"
NODES = ("n1", "n2", "n3")


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One set of certificates for the session; each test gets its own copy."""
    directory = tmp_path_factory.mktemp("generated") / "certs"
    generate(directory, list(NODES))
    return directory


@pytest.fixture
def root(tmp_path: Path, generated: Path) -> Path:
    """tmp_path/config/node{1,2,3}.toml (the shipped files) and tmp_path/certs."""
    shutil.copytree(SHIPPED, tmp_path / "config")
    shutil.copytree(generated, tmp_path / "certs")
    return tmp_path


@pytest.fixture
def node1(root: Path) -> Path:
    return root / "config" / "node1.toml"


def replace(text: str, old: str, new: str) -> str:
    assert old in text, f"test edit does not apply: {old!r}"
    return text.replace(old, new, 1)


def drop_section(text: str, name: str) -> str:
    """Remove ``[name]`` and its body up to the next section header."""
    out, n = re.subn(rf"(?ms)^\[{name}\].*?(?=^\[|\Z)", "", text)
    assert n == 1
    return out


def edit(path: Path, change: Callable[[str], str]) -> None:
    path.write_text(change(path.read_text()))


def expect_error(path: Path, key: str | None, fragment: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path)
    err = info.value
    assert err.path == path
    assert err.key == key
    where = f"{path}: {key}: " if key is not None else f"{path}: "
    assert str(err).startswith(where), str(err)
    assert fragment in str(err), str(err)
    return err


# ---------------------------------------------------------------- what loads


@pytest.mark.parametrize("n", [1, 2, 3])
def test_shipped_configs_load(root: Path, n: int) -> None:
    path = root / "config" / f"node{n}.toml"
    s = load(path)
    certs = (root / "certs").resolve()
    assert s.path == path.resolve()
    assert s.node.id == f"n{n}"
    assert s.node.data_dir == (root / "data" / f"n{n}").resolve()
    assert s.peer.listen == Address("127.0.0.1", 7000 + n)
    assert s.client.listen == Address("127.0.0.1", 8000 + n)
    assert s.metrics.listen == Address("127.0.0.1", 9000 + n)
    assert s.cluster.members == tuple(
        Member(f"n{i}", Address("127.0.0.1", 7000 + i), Address("127.0.0.1", 8000 + i))
        for i in (1, 2, 3)
    )
    assert s.cluster.join is False
    assert (s.tls.ca, s.tls.cert, s.tls.key) == (
        certs / "ca.pem",
        certs / f"n{n}.pem",
        certs / f"n{n}-key.pem",
    )
    assert s.auth.jwt_public_keys == (certs / "jwt-public.pem",)
    assert (s.auth.issuer, s.auth.audience, s.auth.leeway_s) == ("liferaft", "liferaft", 5)
    assert s.client == ClientSettings(Address("127.0.0.1", 8000 + n), 1048576, 1024, 5000)
    assert s.raft == RaftSettings(50, 300, 10000)


def test_defaults_apply_when_keys_are_left_out(node1: Path) -> None:
    def strip(text: str) -> str:
        text = drop_section(text, "raft")
        for line in ("max_message_bytes", "max_connections", "handshake_timeout_ms", "leeway_s"):
            text = re.sub(rf"(?m)^{line} = .*\n", "", text)
        return text

    edit(node1, strip)
    s = load(node1)
    assert s.client == ClientSettings(Address("127.0.0.1", 8001))
    assert (s.client.max_message_bytes, s.client.max_connections) == (1048576, 1024)
    assert s.client.handshake_timeout_ms == 5000
    assert s.auth.leeway_s == 5
    assert s.raft == RaftSettings()
    assert (s.raft.heartbeat_interval_ms, s.raft.election_timeout_ms) == (50, 300)
    assert s.raft.snapshot_entries == 10000
    assert s.cluster.join is False
    assert s.cluster.auto_promote is False
    assert s.log.level == "info"


def test_the_audit_file_is_resolved_next_to_the_config(node1: Path) -> None:
    assert load(node1).audit.file is None  # the shipped "": with the log, on stderr
    edit(node1, lambda t: drop_section(t, "audit") + '\n[audit]\nfile = "logs/audit.jsonl"\n')
    assert load(node1).audit.file == (node1.parent / "logs" / "audit.jsonl").resolve()


def test_the_log_level_is_read_and_checked(node1: Path) -> None:
    edit(node1, lambda text: drop_section(text, "log") + '\n[log]\nlevel = "WARNING"\n')
    assert load(node1).log.level == "warning"
    edit(node1, lambda text: text.replace('level = "WARNING"', 'level = "loud"'))
    expect_error(node1, "log.level", "must be one of debug, info, warning, error, got 'loud'")


def test_relative_paths_follow_the_config_file_not_the_cwd(
    node1: Path,
    root: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    s = load(os.path.relpath(node1))  # a relative config path works too
    assert s.node.data_dir == (root / "data" / "n1").resolve()
    assert s.tls.ca == (root / "certs" / "ca.pem").resolve()
    assert s.path == node1.resolve()


def test_absolute_paths_are_kept(node1: Path, root: Path) -> None:
    ca = (root / "certs" / "ca.pem").resolve()
    edit(node1, lambda t: replace(t, 'ca = "../certs/ca.pem"', f'ca = "{ca}"'))
    assert load(node1).tls.ca == ca


def test_join_allows_a_node_outside_the_initial_members(node1: Path) -> None:
    def joiner(text: str) -> str:
        text = replace(text, 'id = "n1"\n', 'id = "n4"\n')
        text = replace(text, 'cert = "../certs/n1.pem"', 'cert = "../certs/n4.pem"')
        text = replace(text, 'key = "../certs/n1-key.pem"', 'key = "../certs/n4-key.pem"')
        return replace(text, "# join = true", "join = true")

    certs = node1.parent.parent / "certs"
    generate(certs, ["n1", "n2", "n3", "n4"])  # adds n4 only
    edit(node1, joiner)
    s = load(node1)
    assert s.node.id == "n4"
    assert s.cluster.join is True
    assert s.cluster.member("n4") is None


def test_auto_promote_is_read(node1: Path) -> None:
    edit(node1, lambda text: replace(text, "# auto_promote = true", "auto_promote = true"))
    assert load(node1).cluster.auto_promote is True


def test_members_as_an_array_of_tables_and_ipv6_addresses(node1: Path) -> None:
    def tables(text: str) -> str:
        text = re.sub(r"(?ms)^members = \[.*?^\]\n", "", text)
        text = replace(text, 'listen = "127.0.0.1:7001"', 'listen = "[::1]:7001"')
        return text + "".join(
            f'\n[[cluster.members]]\nid = "n{i}"\npeer = "[::1]:700{i}"\n'
            f'client = "localhost:800{i}"\n'
            for i in (1, 2, 3)
        )

    edit(node1, tables)
    s = load(node1)
    assert s.peer.listen == Address("::1", 7001)
    assert [str(m.peer) for m in s.cluster.members] == ["[::1]:7001", "[::1]:7002", "[::1]:7003"]
    assert str(s.cluster.members[0].client) == "localhost:8001"


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:7001", Address("127.0.0.1", 7001)),
        ("[::1]:7001", Address("::1", 7001)),
        ("[fe80::1%eth0]:1", Address("fe80::1%eth0", 1)),
        ("node-1.example.com:65535", Address("node-1.example.com", 65535)),
    ],
)
def test_address_parse_and_str_round_trip(text: str, address: Address) -> None:
    assert Address.parse(text) == address
    assert str(address) == text


def test_settings_are_frozen(node1: Path) -> None:
    s = load(node1)
    assert isinstance(s, Settings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.node = s.node  # type: ignore[misc]


def test_invariants_hold_for_settings_built_in_code() -> None:
    with pytest.raises(ValueError, match="election_timeout_ms"):
        RaftSettings(heartbeat_interval_ms=100, election_timeout_ms=150)
    with pytest.raises(ValueError, match="max_message_bytes"):
        ClientSettings(Address("h", 1), max_message_bytes=10)
    with pytest.raises(ValueError, match="port"):
        Address("h", 0)


# ---------------------------------------------------------------- the file itself


def test_missing_file(tmp_path: Path) -> None:
    expect_error(tmp_path / "raft.toml", None, "no such file")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    expect_error(tmp_path, None, "is a directory")


# Root reads a file whatever its mode, through CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH.
# So as root (CI) the loader runs in a child that is still uid 0, and so still the owner
# of the venv, the source and tmp_path, but has lost both capabilities for good (from its
# bounding and inheritable sets): its open() of a mode-000 file gets the kernel's own
# EACCES, and the real load() turns it into the ConfigError.
DROP_DAC = [
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
]
LOAD_IN_CHILD = """
import json, os, sys
from liferaft.config import ConfigError, load
try:
    load(sys.argv[1])
except ConfigError as e:
    print(json.dumps({"euid": os.geteuid(), "path": str(e.path), "key": e.key, "error": str(e)}))
else:
    sys.exit("load() read the mode-000 file: the child still bypasses file modes")
"""


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_unreadable_file(node1: Path) -> None:
    node1.chmod(0o000)
    if os.geteuid() != 0:
        expect_error(node1, None, "not readable (permission denied)")
        return
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "as root, this test needs setpriv (util-linux) to drop CAP_DAC_*"
    child = subprocess.run(
        [setpriv, *DROP_DAC, sys.executable, "-c", LOAD_IN_CHILD, str(node1)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0 and child.stdout, child.stdout + child.stderr
    assert json.loads(child.stdout) == {
        "euid": 0,
        "path": str(node1),
        "key": None,
        "error": f"{node1}: not readable (permission denied)",
    }


def test_toml_syntax_error_names_line_and_column(node1: Path) -> None:
    edit(node1, lambda t: replace(t, 'id = "n1"\n', "id = \n"))
    expect_error(node1, None, "invalid TOML: Invalid value (at line 2, column 6)")


def test_not_utf8(node1: Path) -> None:
    node1.write_bytes(b'[node]\nid = "\xff"\n')
    expect_error(node1, None, "not UTF-8")


# ---------------------------------------------------------------- keys and values

Change = Callable[[str], str]


def sub(old: str, new: str) -> Change:
    return lambda text: replace(text, old, new)


def member(i: int, old: str, new: str) -> Change:
    """Edit one line of the members array (i from 1, as in the id)."""

    def change(text: str) -> str:
        line = next(ln for ln in text.splitlines() if f'{{ id = "n{i}"' in ln)
        return replace(text, line, replace(line, old, new))

    return change


CASES = [
    # missing sections and keys
    pytest.param(lambda t: drop_section(t, "tls"), "tls", "missing section", id="missing-section"),
    pytest.param(sub('listen = "127.0.0.1:7001"', ""), "peer.listen", "missing", id="missing-key"),
    pytest.param(sub('id = "n1"\n', ""), "node.id", "missing", id="missing-node-id"),
    pytest.param(
        lambda t: re.sub(r"(?ms)^members = \[.*?^\]\n", "", t),
        "cluster.members",
        "missing",
        id="missing-members",
    ),
    pytest.param(
        member(2, ', client = "127.0.0.1:8002"', ""),
        "cluster.members[1].client",
        "missing",
        id="missing-member-key",
    ),
    pytest.param(sub('issuer = "liferaft"\n', ""), "auth.issuer", "missing", id="missing-issuer"),
    # unknown sections and keys
    pytest.param(
        lambda t: t + "\n[nodes]\nid = 1\n",
        "nodes",
        "unknown section (did you mean node?)",
        id="unknown-section",
    ),
    pytest.param(
        sub('id = "n1"', 'idd = "n1"'),
        "node.idd",
        "unknown key (did you mean node.id?)",
        id="unknown-key",
    ),
    pytest.param(
        lambda t: "verbose = true\n" + t, "verbose", "unknown key", id="unknown-top-level-key"
    ),
    pytest.param(
        member(1, "}", ", voter = true }"),
        "cluster.members[0].voter",
        "unknown key",
        id="unknown-member-key",
    ),
    pytest.param(
        sub("snapshot_entries", "snapshot_entry"),
        "raft.snapshot_entry",
        "did you mean raft.snapshot_entries?",
        id="unknown-raft-key",
    ),
    # wrong types
    pytest.param(
        sub("max_connections = 1024", "max_connections = true"),
        "client.max_connections",
        "expected an integer, got boolean true",
        id="bool-is-not-int",
    ),
    pytest.param(
        sub("leeway_s = 5", "leeway_s = 5.0"),
        "auth.leeway_s",
        "expected an integer, got float 5.0",
        id="float-is-not-int",
    ),
    pytest.param(
        sub("heartbeat_interval_ms = 50", 'heartbeat_interval_ms = "50"'),
        "raft.heartbeat_interval_ms",
        "expected an integer, got string '50'",
        id="string-is-not-int",
    ),
    pytest.param(
        sub('id = "n1"\n', "id = 1\n"),
        "node.id",
        "expected a string, got integer 1",
        id="int-is-not-string",
    ),
    pytest.param(
        sub("# join = true", 'join = "yes"'),
        "cluster.join",
        "expected a boolean",
        id="string-is-not-bool",
    ),
    pytest.param(
        sub("# auto_promote = true", "auto_promote = 1"),
        "cluster.auto_promote",
        "expected a boolean (true or false), got integer 1",
        id="int-is-not-bool",
    ),
    pytest.param(
        lambda t: "raft = 5\n" + drop_section(t, "raft"),
        "raft",
        "expected a table, got integer 5",
        id="section-not-a-table",
    ),
    pytest.param(
        lambda t: re.sub(r"(?ms)^members = \[.*?^\]", 'members = "n1"', t),
        "cluster.members",
        "expected an array, got string 'n1'",
        id="members-not-an-array",
    ),
    pytest.param(
        lambda t: re.sub(r"(?ms)^members = \[.*?^\]", 'members = ["n1"]', t),
        "cluster.members[0]",
        "expected a table, got string 'n1'",
        id="member-not-a-table",
    ),
    pytest.param(
        sub('["../certs/jwt-public.pem"]', '"../certs/jwt-public.pem"'),
        "auth.jwt_public_keys",
        "expected an array",
        id="keys-not-an-array",
    ),
    pytest.param(
        sub('["../certs/jwt-public.pem"]', '["../certs/jwt-public.pem", 7]'),
        "auth.jwt_public_keys[1]",
        "expected a string, got integer 7",
        id="key-not-a-string",
    ),
    pytest.param(
        sub('data_dir = "../data/n1"', 'data_dir = ""'),
        "node.data_dir",
        "must not be empty",
        id="path-empty",
    ),
    # bad addresses
    pytest.param(
        sub('"127.0.0.1:7001"', '"127.0.0.1"'),
        "peer.listen",
        "expected host:port, got '127.0.0.1'",
        id="address-no-port",
    ),
    pytest.param(
        sub('"127.0.0.1:8001"', '"127.0.0.1:0"'),
        "client.listen",
        "port must be 1..65535, got '127.0.0.1:0'",
        id="address-port-zero",
    ),
    pytest.param(
        sub('"127.0.0.1:9001"', '"127.0.0.1:65536"'),
        "metrics.listen",
        "port must be 1..65535",
        id="address-port-too-big",
    ),
    pytest.param(
        sub('"127.0.0.1:9001"', '"127.0.0.1:http"'),
        "metrics.listen",
        "port 'http' is not a number",
        id="address-port-not-a-number",
    ),
    pytest.param(
        sub('"127.0.0.1:7001"', '":7001"'),
        "peer.listen",
        "expected host:port, got ':7001'",
        id="address-empty-host",
    ),
    pytest.param(
        sub('"127.0.0.1:7001"', '"my host:7001"'),
        "peer.listen",
        "is not a host name or IP address",
        id="address-bad-host",
    ),
    pytest.param(
        sub('"127.0.0.1:7001"', '"::1:7001"'),
        "peer.listen",
        "IPv6 host in brackets",
        id="address-ipv6-unbracketed",
    ),
    pytest.param(
        sub('"127.0.0.1:7001"', '"[::zz]:7001"'),
        "peer.listen",
        "is not an IPv6 address",
        id="address-bad-ipv6",
    ),
    pytest.param(
        sub('"127.0.0.1:7001"', '"[::1]"'),
        "peer.listen",
        "expected host:port, got '[::1]'",
        id="address-ipv6-no-port",
    ),
    pytest.param(
        member(3, '"127.0.0.1:7003"', '"127.0.0.1"'),
        "cluster.members[2].peer",
        "expected host:port",
        id="member-bad-address",
    ),
    # numbers out of range
    pytest.param(
        sub("max_message_bytes = 1048576", "max_message_bytes = 1023"),
        "client.max_message_bytes",
        "must be at least 1024, got 1023",
        id="max-message-bytes",
    ),
    pytest.param(
        sub("max_connections = 1024", "max_connections = 0"),
        "client.max_connections",
        "must be at least 1, got 0",
        id="max-connections",
    ),
    pytest.param(
        sub("handshake_timeout_ms = 5000", "handshake_timeout_ms = 99"),
        "client.handshake_timeout_ms",
        "must be at least 100, got 99",
        id="handshake-timeout",
    ),
    pytest.param(
        sub("heartbeat_interval_ms = 50", "heartbeat_interval_ms = 0"),
        "raft.heartbeat_interval_ms",
        "must be at least 1, got 0",
        id="heartbeat",
    ),
    pytest.param(
        sub("election_timeout_ms = 300", "election_timeout_ms = 99"),
        "raft.election_timeout_ms",
        "must be at least 2 x heartbeat_interval_ms (50) = 100, got 99",
        id="election-vs-heartbeat",
    ),
    pytest.param(
        sub("snapshot_entries = 10000", "snapshot_entries = 0"),
        "raft.snapshot_entries",
        "must be at least 1, got 0",
        id="snapshot-entries",
    ),
    pytest.param(
        sub("leeway_s = 5", "leeway_s = -1"),
        "auth.leeway_s",
        "must be at least 0, got -1",
        id="leeway",
    ),
    pytest.param(
        sub('issuer = "liferaft"', 'issuer = ""'),
        "auth.issuer",
        "must not be empty",
        id="issuer-empty",
    ),
    pytest.param(
        sub('["../certs/jwt-public.pem"]', "[]"),
        "auth.jwt_public_keys",
        "at least one",
        id="no-jwt-keys",
    ),
    # members and identity
    pytest.param(
        lambda t: re.sub(r"(?ms)^members = \[.*?^\]", "members = []", t),
        "cluster.members",
        "at least one member",
        id="no-members",
    ),
    pytest.param(
        member(3, 'id = "n3"', 'id = "n1"'),
        "cluster.members[2].id",
        "duplicate member id 'n1' (also members[0])",
        id="duplicate-member-id",
    ),
    pytest.param(
        member(2, "127.0.0.1:7002", "127.0.0.1:7001"),
        "cluster.members[1].peer",
        "address 127.0.0.1:7001 is already used by members[0].peer",
        id="duplicate-peer-address",
    ),
    pytest.param(
        member(3, "127.0.0.1:7003", "127.0.0.1:8001"),
        "cluster.members[2].peer",
        "already used by members[0].client",
        id="peer-equals-a-client",
    ),
    pytest.param(
        sub('"127.0.0.1:9001"', '"0.0.0.0:8001"'),
        "metrics.listen",
        "collides with client.listen (127.0.0.1:8001)",
        id="listen-collision",
    ),
    pytest.param(
        sub('id = "n1"\n', 'id = "n9"\n'),
        "node.id",
        "'n9' is not among cluster.members (n1, n2, n3)",
        id="node-not-a-member",
    ),
    # node ids: the rule of liferaft.security.certs.validate_node_id (a DNS label, not reserved)
    pytest.param(
        sub('id = "n1"\n', 'id = "N1"\n'), "node.id", "bad node id 'N1'", id="node-id-syntax"
    ),
    pytest.param(
        sub('id = "n1"\n', f'id = "{"n" * 64}"\n'),
        "node.id",
        "use 1-63 characters",
        id="node-id-too-long",
    ),
    pytest.param(
        sub('id = "n1"\n', 'id = "-n1"\n'), "node.id", "bad node id '-n1'", id="node-id-hyphen"
    ),
    pytest.param(
        sub('id = "n1"\n', 'id = "localhost"\n'),
        "node.id",
        "bad node id 'localhost': reserved",
        id="node-id-reserved",
    ),
    pytest.param(
        member(2, '"n2"', '"n_2"'),
        "cluster.members[1].id",
        "bad node id 'n_2'",
        id="member-id-syntax",
    ),
]


@pytest.mark.parametrize(("change", "key", "fragment"), CASES)
def test_bad_value_names_file_and_key(node1: Path, change: Change, key: str, fragment: str) -> None:
    edit(node1, change)
    expect_error(node1, key, fragment)


# ---------------------------------------------------------------- the files it names


@pytest.mark.parametrize(
    ("key", "line", "file"),
    [
        ("tls.ca", 'ca = "../certs/ca.pem"', "ca.pem"),
        ("tls.cert", 'cert = "../certs/n1.pem"', "n1.pem"),
        ("tls.key", 'key = "../certs/n1-key.pem"', "n1-key.pem"),
        ("auth.jwt_public_keys[0]", '"../certs/jwt-public.pem"', "jwt-public.pem"),
    ],
)
def test_missing_file_names_key_and_resolved_path(
    node1: Path, root: Path, key: str, line: str, file: str
) -> None:
    edit(node1, sub(line, line.replace(file, "nope-" + file)))
    resolved = (root / "certs" / ("nope-" + file)).resolve()
    expect_error(node1, key, f"{resolved} does not exist")


def test_data_dir_that_is_a_file(node1: Path, root: Path) -> None:
    (root / "data").mkdir()
    (root / "data" / "n1").write_text("")
    expect_error(node1, "node.data_dir", f"{(root / 'data' / 'n1').resolve()} is not a directory")


def test_certificate_of_another_node(node1: Path, root: Path) -> None:
    edit(node1, sub("certs/n1.pem", "certs/n2.pem"))
    expect_error(node1, "tls.cert", "certificate names n2, localhost, not this node n1")


def test_certificate_that_is_not_pem(node1: Path, root: Path) -> None:
    (root / "certs" / "n1.pem").write_text("not a certificate\n")
    expect_error(node1, "tls.cert", "is not a PEM certificate")


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_private_key_readable_by_others(node1: Path, root: Path, mode: int) -> None:
    key = root / "certs" / "n1-key.pem"
    key.chmod(mode)
    expect_error(
        node1, "tls.key", f"{key.resolve()} is readable by others (mode {mode:04o}); chmod 600 it"
    )
