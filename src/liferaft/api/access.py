"""Who may do what: the role each op needs and the keys a request touches.

Roles (docs/security.md, "What a token can do"): ``read`` = get, range, watch, status;
``write`` = read + put, delete, txn, leases; ``admin`` = everything (membership, leader transfer,
compaction, backups). A token's ``prefixes`` (absent: all keys) must cover every key and prefix a
request touches, txn compares and nested ops included.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from liferaft.api.errors import denied
from liferaft.security.tokens import Claims, Role

OP_ROLE: dict[str, Role] = {
    "get": Role.READ,
    "range": Role.READ,
    "watch": Role.READ,
    "unwatch": Role.READ,
    "status": Role.READ,
    "refresh": Role.READ,
    "put": Role.WRITE,
    "delete": Role.WRITE,
    "txn": Role.WRITE,
    "member_add": Role.ADMIN,
    "member_promote": Role.ADMIN,
    "member_remove": Role.ADMIN,
    "transfer_leader": Role.ADMIN,
    "compact": Role.ADMIN,
    "lease_grant": Role.WRITE,
    "lease_revoke": Role.WRITE,
    "lease_keepalive": Role.WRITE,
    "lease_ttl": Role.WRITE,
    "lease_list": Role.WRITE,
    "snapshot": Role.ADMIN,  # a backup holds every key: admin only
    "snapshot_chunk": Role.ADMIN,
}


def touched(req: dict[str, Any]) -> Iterator[str]:
    """Every key or prefix the request reads or writes (prefixes as themselves)."""
    if req.get("op") in ("snapshot", "snapshot_chunk", "lease_list"):
        # A backup holds every key, and the lease list is every client's: only a token
        # for all keys may take them. (lease_revoke and lease_ttl's keys are checked
        # against the keys the lease holds: Connection._lease_keys_covered.)
        yield ""
        return
    for field in ("key", "prefix"):
        value = req.get(field)
        if isinstance(value, str):
            yield value
    if req.get("op") == "txn":
        for c in req.get("compare") or ():
            if isinstance(c, dict) and isinstance(c.get("key"), str):
                yield c["key"]
        for branch in ("success", "failure"):
            for op in req.get(branch) or ():
                if isinstance(op, dict):
                    yield from touched(op)


def check(claims: Claims, req: dict[str, Any]) -> None:
    """Raise permission_denied unless ``claims`` allow ``req`` (already validated)."""
    op = req["op"]
    role = OP_ROLE[op]
    if not claims.allows(role):
        raise denied(f"{op} needs the {role.value} role")
    for key in touched(req):
        if not claims.covers(key):
            raise denied(f"the token does not cover {key!r}")
