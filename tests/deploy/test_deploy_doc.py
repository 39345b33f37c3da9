"""docs/deploy.md's example config for a bare process is one a node accepts."""

from __future__ import annotations

import re
from pathlib import Path

from deploytools import ROOT

from liferaft import config
from liferaft.security.certs import generate


def test_the_bare_process_example_config_loads(tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", doc, flags=re.DOTALL)
    assert blocks, "docs/deploy.md has no toml example"
    certs = tmp_path / "certs"
    generate(certs, ["n1", "n2", "n3"])
    text = blocks[0].replace("/etc/liferaft/certs", str(certs))
    text = text.replace("/var/lib/liferaft", str(tmp_path / "data"))
    (tmp_path / "n1.toml").write_text(text)
    s = config.load(tmp_path / "n1.toml")
    assert s.node.id == "n1" and [m.id for m in s.cluster.members] == ["n1", "n2", "n3"]
    assert s.tls.key == certs / "n1-key.pem"
