from __future__ import annotations

from pathlib import Path

import pytest

from liferaft.security.certs import generate


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA and certificates for n1..n6, shared by every node test."""
    d = tmp_path_factory.mktemp("certs")
    generate(d, [f"n{i}" for i in range(1, 7)])
    return d
