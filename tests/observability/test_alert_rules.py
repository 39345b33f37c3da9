"""deploy/prometheus/liferaft-rules.yml: promtool accepts the rules, their unit tests
(liferaft-rules.test.yml) pass, and every series they query is one a node exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from liferaft.observability.metrics import NodeMetrics

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:  # make test installs it (make tools); say so when it could not
        pytest.skip("promtool is not installed (make tools installs it as root)")
    return path


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES / "liferaft-rules.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_unit_tests_pass() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", "liferaft-rules.test.yml"],
        cwd=RULES,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def exported_series() -> set[str]:
    names = set()
    for family in NodeMetrics("n1").registry.collect():
        kind, name = family.type, family.name
        names |= {
            "counter": {f"{name}_total"},
            "histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"},
        }.get(kind, {name})
    return names


def test_every_series_the_rules_query_is_exported() -> None:
    text = (RULES / "liferaft-rules.yml").read_text()
    exprs = re.findall(r"^\s+expr: (.*)$", text, flags=re.MULTILINE)
    used = {name for e in exprs for name in re.findall(r"\bliferaft_[a-z_]+", e)}
    assert len(exprs) == 10 and used
    assert used <= exported_series(), used - exported_series()
