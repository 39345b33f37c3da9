"""deploy/systemd/liferaft@.service: `systemd-analyze verify` accepts it without a single
warning (it only warns, exit 0, on a value it cannot parse, so the test reads its output
too), and it has the settings docs/deploy.md describes."""

from __future__ import annotations

import configparser
import subprocess
from pathlib import Path

from deploytools import DEPLOY, require_tool

UNIT = DEPLOY / "systemd" / "liferaft@.service"
EXEC = "/opt/liferaft/bin/liferaft"


def verify(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Verify instance n1 of the unit ``text``. verify insists that ExecStart's program
    exists, so the installed path is pointed at a stand-in executable here."""
    analyze = require_tool("systemd-analyze", "make tools installs it as root: apt systemd")
    stand_in = tmp_path / "liferaft"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    assert text.count(f"ExecStart={EXEC} ") == 1
    (tmp_path / "liferaft@.service").write_text(text.replace(EXEC, str(stand_in)))
    return subprocess.run(
        [analyze, "verify", "--man=no", "./liferaft@n1.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    result = verify(UNIT.read_text(), tmp_path)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr


def test_verify_reports_a_bad_value(tmp_path: Path) -> None:
    """The check can fail: a limit systemd cannot parse is reported."""
    text = UNIT.read_text().replace("LimitNOFILE=65536", "LimitNOFILE=plenty")
    assert "plenty" in text
    result = verify(text, tmp_path)
    assert "LimitNOFILE" in result.stderr or "plenty" in result.stderr


def test_restart_reload_limits_and_hardening() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    svc = unit["Service"]
    assert svc["ExecStart"] == f"{EXEC} node --config /etc/liferaft/%i.toml"
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"  # reopens the audit file
    assert svc["Restart"] == "on-failure"
    assert svc["RestartPreventExitStatus"] == "2"  # a config error: restarting cannot help
    assert int(svc["LimitNOFILE"]) >= 4096
    assert svc["User"] == "liferaft" and svc["StateDirectory"] == "liferaft/%i"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }.items():
        assert svc[key] == value, key
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_the_sysusers_file_creates_the_user_the_unit_runs_as(tmp_path: Path) -> None:
    """systemd-sysusers, into an empty root, makes the liferaft user and group."""
    sysusers = require_tool("systemd-sysusers", "make tools installs it as root: apt systemd")
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(DEPLOY / "systemd" / "liferaft.sysusers")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    users = [line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()]
    (user,) = [u for u in users if u[0] == "liferaft"]
    assert user[5:] == ["/var/lib/liferaft", "/usr/sbin/nologin"]
    assert any(g.startswith("liferaft:") for g in (tmp_path / "etc" / "group").read_text().split())
