"""Shared by the deployment tests: where the repo's deploy files are, and finding the
external checkers they run (hadolint, kubectl, systemd-analyze)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def require_tool(name: str, how: str) -> str:
    """The path of program ``name`` (on PATH or beside this Python, as pip installs
    hadolint into the venv). Missing: skip on a developer's machine, but fail under CI
    (CI=true), where `make tools` must have installed it: a check that silently skips in
    CI checks nothing."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.is_file() else shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed ({how})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
