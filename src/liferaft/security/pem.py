"""PEM blocks of a file that may hold several (a CA bundle, a file of JWT public keys).

A rotation needs the old and the new key or CA trusted at once for a while; keeping
both in one file means the config never has to change for it (docs/security.md,
"Rotating certificates and keys").
"""

from __future__ import annotations

import re

_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)


def pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """Each ``(label, block)`` in ``data``, in order: ``("PUBLIC KEY", b"-----BEGIN...")``.
    Text between blocks (comments) is skipped, as OpenSSL does."""
    return [(m.group(1).decode("ascii"), m.group(0)) for m in _BLOCK.finditer(data)]
