"""The operations of the client, written once for both transports (docs/client-library.md).

:class:`ClientAPI` turns each method's arguments into the request of
docs/client-protocol.md (checked before anything is sent) and the response into typed
results. It does no I/O and imports no event loop: a transport subclass supplies three
coroutines, and the methods here only ``await`` them, so the same code runs on Trio
(:class:`liferaft.client.Client`) and on asyncio (:class:`liferaft.client.aio.AsyncioClient`):

- ``_request(fields, retry=..., deadline=...)``: the success response to ``fields``,
  retried and redirected as the protocol core decides (liferaft.client.core);
- ``_read(fields)``: the same for gets and ranges (with ``reads="followers"`` the Trio
  client sends them over a connection of their own);
- ``_write(op, **fields)``: a write under the next seq of the client's session.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from liferaft.client.core import Retry
from liferaft.client.errors import InternalError, InvalidRequest, NotFound
from liferaft.client.models import (
    KeyValue,
    Lease,
    LeaseTTL,
    TxnResult,
    check_key,
    check_lease_id,
    check_limit,
    check_prefix,
    check_revision,
    check_ttl,
    compare_to_wire,
    kv_from_wire,
    ops_to_wire,
    result_from_wire,
    to_bytes,
    uint_from_wire,
)


class _Mapped:
    """Read access by field name as well, ``st["leader_id"]`` as ``st.leader_id``: what
    ``status()`` and the member calls returned when they were dicts."""

    __slots__ = ()

    def __getitem__(self, name: str) -> Any:
        if name not in self._names():
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name) if name in self._names() else default

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        """The wire's map form (for JSON output)."""
        out = {}
        for name in self._names():
            value = getattr(self, name)
            if isinstance(value, list):
                value = [v.as_dict() if isinstance(v, _Mapped) else v for v in value]
            out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class Member(_Mapped):
    """A member of the cluster: its ``id``, ``peer`` address (Raft), ``client`` address
    (what a ``not_leader`` redirect leads to) and whether it is a ``voter`` (else a
    learner)."""

    id: str
    peer: str
    client: str
    voter: bool


@dataclass(frozen=True, slots=True)
class Status(_Mapped):
    """The answering node's view (docs/client-protocol.md, ``status``). ``leader_id`` and
    ``leader_endpoint`` are None while it knows no leader; ``last_error`` is None or
    ``{"event", "at"}``; ``extra`` holds fields a newer server adds."""

    node_id: str
    role: str
    term: int
    leader_id: str | None
    leader_endpoint: str | None
    commit_index: int
    applied_index: int
    revision: int
    members: list[Member]
    db_size: int
    version: str
    alarms: list[str]
    last_error: dict[str, Any] | None
    extra: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """The wire's map form (for JSON output), ``extra`` merged in."""
        out = _Mapped.as_dict(self)
        out.update(out.pop("extra"))
        return out

    @property
    def is_leader(self) -> bool:
        return self.leader_id is not None and self.leader_id == self.node_id


def member_from_wire(m: object) -> Member:
    if not isinstance(m, Mapping):
        raise InternalError(f"server sent a member that is not a map: {m!r:.60}")
    mid, peer, client = m.get("id"), m.get("peer"), m.get("client", "")
    if not isinstance(mid, str) or not isinstance(peer, str):
        raise InternalError(f"server sent a member without an id and peer: {m!r:.60}")
    return Member(mid, peer, client if isinstance(client, str) else "", m.get("voter") is not False)


def members_from_wire(resp: Mapping[str, Any]) -> list[Member]:
    members = resp.get("members")
    if not isinstance(members, list):
        raise InternalError("response without a members list")
    return [member_from_wire(m) for m in members]


_STATUS_FIELDS = {
    "node_id",
    "role",
    "term",
    "leader_id",
    "leader_endpoint",
    "commit_index",
    "applied_index",
    "revision",
    "members",
    "db_size",
    "version",
    "alarms",
    "last_error",
}


def status_from_wire(resp: Mapping[str, Any]) -> Status:
    def text(name: str) -> str | None:
        value = resp.get(name)
        return value if isinstance(value, str) and value else None

    def num(name: str) -> int:
        value = resp.get(name, 0)
        return value if type(value) is int else 0

    alarms = resp.get("alarms")
    last_error = resp.get("last_error")
    return Status(
        node_id=text("node_id") or "",
        role=text("role") or "",
        term=num("term"),
        leader_id=text("leader_id"),
        leader_endpoint=text("leader_endpoint"),
        commit_index=num("commit_index"),
        applied_index=num("applied_index"),
        revision=num("revision"),
        members=members_from_wire(resp) if "members" in resp else [],
        db_size=num("db_size"),
        version=text("version") or "",
        alarms=[str(a) for a in alarms] if isinstance(alarms, list) else [],
        last_error=dict(last_error) if isinstance(last_error, Mapping) else None,
        extra={k: v for k, v in resp.items() if k not in _STATUS_FIELDS and k not in ("id", "ok")},
    )


class ClientAPI:
    """The operations shared by the Trio and asyncio clients (see the module)."""

    session: bytes

    async def _request(
        self,
        fields: Mapping[str, Any],
        *,
        retry: Retry = Retry.ALWAYS,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        raise NotImplementedError

    async def _read(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        return await self._request(fields)

    async def _write(self, op: str, **fields: Any) -> dict[str, Any]:
        raise NotImplementedError

    # ---------------------------------------------------------------- key-value

    async def put(self, key: str, value: bytes | str, *, lease: int | None = None) -> int:
        """Set ``key`` to ``value`` (``str`` is stored as UTF-8); the revision it made.
        With ``lease`` (an id from :meth:`lease_grant`) the key is deleted when that
        lease expires or is revoked; an unknown or expired lease raises NotFound.

        Retried, with the same session and seq, until it succeeds or ``timeout`` passes.
        """
        if lease is None:
            resp = await self._write("put", key=check_key(key), value=to_bytes(value))
        else:
            resp = await self._write(
                "put", key=check_key(key), value=to_bytes(value), lease=check_lease_id(lease)
            )
        return uint_from_wire(resp, "revision")

    async def get(
        self, key: str, *, serializable: bool = False, revision: int = 0
    ) -> KeyValue | None:
        """The key-value of ``key``, or None. ``serializable=True`` lets any node answer
        from its own state (faster, possibly stale); the default is linearizable.
        ``revision`` reads the store as it was right after that revision (0: now);
        raises Compacted when that history is gone."""
        fields: dict[str, Any] = {"op": "get", "key": check_key(key)}
        if serializable:
            fields["serializable"] = True
        if check_revision(revision):
            fields["revision"] = revision
        kv = (await self._read(fields)).get("kv")
        return None if kv is None else kv_from_wire(kv)

    async def range(
        self,
        prefix: str,
        *,
        limit: int = 0,
        serializable: bool = False,
        after: str | None = None,
        revision: int = 0,
    ) -> tuple[list[KeyValue], bool]:
        """The keys under ``prefix`` in key order, at most ``limit`` of them (0: all), and
        whether there are more. ``prefix=""`` is every key. Page with ``after`` (the
        last key of the previous page) and, for one consistent view, ``revision``."""
        fields: dict[str, Any] = {"op": "range", "prefix": check_prefix(prefix)}
        if check_limit(limit):
            fields["limit"] = limit
        if serializable:
            fields["serializable"] = True
        if after is not None:
            fields["after"] = check_key(after, "after")
        if check_revision(revision):
            fields["revision"] = revision
        resp = await self._read(fields)
        kvs = resp.get("kvs")
        if not isinstance(kvs, list):
            raise InternalError("range response without a kvs list")
        return [kv_from_wire(kv) for kv in kvs], resp.get("more") is True

    async def delete(self, key: str | None = None, *, prefix: str | None = None) -> int:
        """Delete ``key``, or every key under ``prefix``; how many keys were deleted."""
        if (key is None) == (prefix is None):
            raise InvalidRequest("give exactly one of key and prefix")
        if key is not None:
            resp = await self._write("delete", key=check_key(key))
        else:
            resp = await self._write("delete", prefix=check_prefix(prefix))
        return uint_from_wire(resp, "deleted")

    async def txn(
        self,
        compare: Sequence[Mapping[str, Any]] = (),
        success: Sequence[Mapping[str, Any]] = (),
        failure: Sequence[Mapping[str, Any]] = (),
    ) -> TxnResult:
        """If every compare holds run ``success``, else ``failure``, atomically at one
        revision. Compares and ops are dicts as on the wire, or made with
        :func:`~liferaft.client.compare`, :func:`~liferaft.client.op_put`, ...::

            r = await client.txn([compare("lock", "version", "==", 0)],
                                 [op_put("lock", "me")], [op_get("lock")])
        """
        if isinstance(compare, str | bytes | Mapping):
            raise InvalidRequest("compare must be a list of compares")
        resp = await self._write(
            "txn",
            compare=[compare_to_wire(c) for c in compare],
            success=ops_to_wire(success, "success"),
            failure=ops_to_wire(failure, "failure"),
        )
        results = resp.get("results", [])
        if not isinstance(results, list) or type(resp.get("succeeded")) is not bool:
            raise InternalError("txn response without succeeded and results")
        return TxnResult(
            resp["succeeded"],
            [result_from_wire(r) for r in results],
            uint_from_wire(resp, "revision"),
        )

    @staticmethod
    def _watch_selector(key: str | None, prefix: str | None, start_revision: int) -> dict[str, Any]:
        """The ``key``/``prefix`` of a watch request, checked."""
        if (key is None) == (prefix is None):
            raise InvalidRequest("give exactly one of key and prefix")
        if type(start_revision) is not int or start_revision < 0:
            raise InvalidRequest("start_revision must be an int >= 0")
        return {"key": check_key(key)} if key is not None else {"prefix": check_prefix(prefix)}

    # ---------------------------------------------------------------- leases

    async def lease_grant(self, ttl: int, *, lease: int | None = None) -> Lease:
        """A new lease of ``ttl`` seconds (1..86400), with the id ``lease`` if given (else
        the cluster picks one). It expires unless kept alive (:meth:`keep_alive`).
        A write: retried with its session and seq, so a retry never grants twice."""
        fields: dict[str, Any] = {"ttl": check_ttl(ttl)}
        if lease is not None:
            fields["lease"] = check_lease_id(lease)
        resp = await self._write("lease_grant", **fields)
        return Lease(uint_from_wire(resp, "lease"), uint_from_wire(resp, "ttl"))

    async def lease_keepalive_once(self, lease: int) -> int:
        """Renew ``lease`` once; the seconds it has left. NotFound if it is gone. For
        renewing as long as needed, use :meth:`keep_alive`."""
        return await self._lease_keepalive(check_lease_id(lease))

    async def _lease_keepalive(self, lease: int, *, deadline: float | None = None) -> int:
        # Not a logged write (the leader renews in memory): retried freely.
        resp = await self._request({"op": "lease_keepalive", "lease": lease}, deadline=deadline)
        ttl = uint_from_wire(resp, "ttl")
        if ttl <= 0:  # what etcd answers for a lease it no longer has
            raise NotFound(f"lease {lease:x} has expired")
        return ttl

    async def lease_revoke(self, lease: int) -> int:
        """Revoke ``lease``: its keys are deleted, at the revision returned (with delete
        events). NotFound if it is already gone."""
        resp = await self._write("lease_revoke", lease=check_lease_id(lease))
        return uint_from_wire(resp, "revision")

    async def lease_ttl(self, lease: int, *, keys: bool = False) -> LeaseTTL:
        """What the cluster says of ``lease``: seconds left, granted TTL and, with
        ``keys=True``, its keys. NotFound if it is gone."""
        fields: dict[str, Any] = {"op": "lease_ttl", "lease": check_lease_id(lease)}
        if keys:
            fields["keys"] = True
        resp = await self._request(fields)
        ttl = resp.get("ttl")
        if type(ttl) is not int:
            raise InternalError("lease_ttl response without an integer ttl")
        key_list = resp.get("keys") if keys else None
        if keys and not (isinstance(key_list, list) and all(isinstance(k, str) for k in key_list)):
            raise InternalError("lease_ttl response without a keys list")
        return LeaseTTL(lease, ttl, uint_from_wire(resp, "granted_ttl"), key_list)

    async def lease_list(self) -> list[int]:
        """The ids of every lease the cluster holds."""
        leases = (await self._request({"op": "lease_list"})).get("leases")
        if not isinstance(leases, list) or not all(type(x) is int for x in leases):
            raise InternalError("lease_list response without a list of ids")
        return list(leases)

    async def _range_at(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` and the revision they were read at."""
        resp = await self._request({"op": "range", "prefix": check_prefix(prefix)})
        kvs = resp.get("kvs")
        if not isinstance(kvs, list):
            raise InternalError("range response without a kvs list")
        return [kv_from_wire(kv) for kv in kvs], uint_from_wire(resp, "revision")

    # ---------------------------------------------------------------- cluster

    async def status(self) -> Status:
        """The answering node's view: ``node_id``, ``role``, ``term``, ``leader_id``,
        ``leader_endpoint``, ``commit_index``, ``applied_index``, ``revision``,
        ``members`` (:class:`Member`), ``db_size``, ``version``, ``alarms`` and
        ``last_error``, as a :class:`Status` (``st["term"]`` reads a field too)."""
        return status_from_wire(await self._request({"op": "status"}))

    async def member_list(self) -> list[Member]:
        """The members (``status().members``)."""
        return (await self.status()).members

    async def member_add(
        self, id: str, peer: str, client: str, *, learner: bool = False
    ) -> list[Member]:
        """Add node ``id``, dialled at ``peer`` and serving clients at ``client`` (both
        ``host:port``), as a voter, or with ``learner=True`` as a learner that catches up
        before it counts for a quorum (then :meth:`member_promote` it); the new members."""
        fields: dict[str, Any] = {"op": "member_add", "member_id": id, "peer": peer}
        fields["client"] = client
        if learner:
            fields["learner"] = True
        return members_from_wire(await self._request(fields, retry=Retry.SAFE))

    async def member_promote(self, id: str) -> list[Member]:
        """Make learner ``id`` a voter; the new member list."""
        resp = await self._request({"op": "member_promote", "member_id": id}, retry=Retry.SAFE)
        return members_from_wire(resp)

    async def member_remove(self, id: str) -> list[Member]:
        """Remove member ``id``; the new member list."""
        resp = await self._request({"op": "member_remove", "member_id": id}, retry=Retry.SAFE)
        return members_from_wire(resp)

    async def transfer_leader(self, to: str | None = None) -> str:
        """Hand leadership to ``to`` (None: the most caught-up voter); the new leader id."""
        fields: dict[str, Any] = {"op": "transfer_leader"}
        if to is not None:
            fields["to"] = to
        leader = (await self._request(fields, retry=Retry.SAFE)).get("leader_id")
        if not isinstance(leader, str):
            raise InternalError("transfer_leader response without leader_id")
        return leader

    async def compact(self, revision: int) -> int:
        """Drop the history before ``revision`` on every node (admin); the store's
        revision. Reads before it, and watches from it or before, get Compacted."""
        if not check_revision(revision):
            raise InvalidRequest("compact needs a revision >= 1")
        resp = await self._write("compact", revision=revision)
        return uint_from_wire(resp, "revision")
