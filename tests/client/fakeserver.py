"""A small fake of the client API (docs/client-protocol.md) for the client library's tests.

Real TLS (a node certificate from ``liferaft.security.certs.generate``) and real
trio-websocket, a dict-backed store shared by the fake nodes of one FakeCluster, and
knobs a test turns: answer ``not_leader`` (with or without a ``leader_endpoint``),
``unavailable`` or any error, refuse writes under some prefixes, drop the connection
(before or after applying a write), stay silent, answer a message's requests in reverse
order one message each. Every received WebSocket message is recorded, decoded, so tests
can assert batching.

Leases: granted, renewed, revoked and listed like the real ones, with keys put under a
lease; they never expire by themselves: a test expires one with ``Store.expire`` (its
keys go at one revision, with delete events, as a leader's expiry would). Every
keepalive is recorded with the (possibly mock) time it arrived.

It is not the server: no Raft, no JWT (the token is compared as a string), no limits.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import trio
import trio_websocket

from liferaft.security.certs import generate
from liferaft.security.tls import client_server_context

TOKEN = "good-token"
WRITES = frozenset({"put", "delete", "txn", "lease_grant", "lease_revoke"})
# what only the leader answers (a node with redirect_to set sends these there)
LEADER_OPS = WRITES | {"lease_keepalive", "lease_ttl", "lease_list"}
FIRST_LEASE = 0x7E57_0001


@asynccontextmanager
async def refusing_port() -> AsyncIterator[int]:
    """A local port that refuses connections: bound but not listening, and held, so that
    no other process (another test's server) can take it meanwhile."""
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def make_certs(directory: Path, ids: tuple[str, ...] = ("n1", "n2")) -> Path:
    """The CA and node certificates in ``directory``; returns the CA file."""
    generate(directory, list(ids))
    return directory / "ca.pem"


@dataclass
class Fault:
    action: str  # not_leader | unavailable | error | drop | silence
    op: str | None  # only requests of this op (None: any)
    times: int
    args: dict[str, Any] = field(default_factory=dict)


class Store:
    """The shared state: keys, one revision counter, event history, sessions, members."""

    def __init__(self) -> None:
        self.revision = 0
        self.data: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []  # events, each with its revision
        self.sessions: dict[tuple[bytes, int], dict[str, Any]] = {}
        self.applied: list[dict[str, Any]] = []  # write requests actually applied
        self.members: list[dict[str, Any]] = []
        self.watchers: list[_Watcher] = []
        self.leader_id = "n1"
        self.leases: dict[int, _Lease] = {}
        self.next_lease = FIRST_LEASE
        self.keepalives: list[tuple[float, int]] = []  # (time, lease) of each renewal
        self.event_pushes = 0  # watch event messages sent, to every watcher
        self._changed = trio.Event()

    def changed(self) -> None:
        """Wake the tests waiting in :meth:`until`."""
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, predicate: Any) -> None:
        """Wait until ``predicate()`` holds; checked after every request handled."""
        while not predicate():
            await self._changed.wait()

    def expire(self, lease_id: int) -> int:
        """Expire a lease as the leader would: its keys deleted at one revision, with
        delete events; the revision (unchanged if it had no keys)."""
        lease = self.leases.pop(lease_id)
        events: list[dict[str, Any]] = []
        rev = self.revision + 1
        for key in sorted(lease.keys):
            self._delete({"key": key}, rev, events)
        self._commit(rev, events)
        self.changed()
        return self.revision

    def _check_lease(self, lease_id: object) -> None:
        if lease_id is not None and lease_id not in self.leases:
            raise _Refused("not_found", f"lease {lease_id!r} not found")

    def _attach(self, key: str, lease_id: int | None) -> None:
        for lease in self.leases.values():
            lease.keys.discard(key)
        if lease_id is not None:
            self.leases[lease_id].keys.add(key)

    def kv(self, key: str) -> dict[str, Any] | None:
        return self.data.get(key)

    def _put(
        self,
        key: str,
        value: bytes,
        rev: int,
        events: list[dict[str, Any]],
        lease: int | None = None,
    ) -> None:
        self._attach(key, lease)
        old = self.data.get(key)
        kv = {
            "key": key,
            "value": value,
            "create_revision": old["create_revision"] if old else rev,
            "mod_revision": rev,
            "version": old["version"] + 1 if old else 1,
        }
        self.data[key] = kv
        events.append({"type": "put", "kv": dict(kv)})

    def _delete(self, req: dict[str, Any], rev: int, events: list[dict[str, Any]]) -> int:
        if "key" in req:
            keys = [req["key"]] if req["key"] in self.data else []
        else:
            keys = sorted(k for k in self.data if k.startswith(req["prefix"]))
        for k in keys:
            self._attach(k, None)
            old = self.data.pop(k)
            events.append(
                {
                    "type": "delete",
                    "kv": {
                        "key": k,
                        "value": b"",
                        "create_revision": old["create_revision"],
                        "mod_revision": rev,
                        "version": 0,
                    },
                }
            )
        return len(keys)

    def _range(self, req: dict[str, Any]) -> dict[str, Any]:
        keys = sorted(k for k in self.data if k.startswith(req["prefix"]))
        limit = req.get("limit", 0)
        shown = keys[:limit] if limit else keys
        return {"kvs": [self.data[k] for k in shown], "more": len(shown) < len(keys)}

    def _holds(self, c: dict[str, Any]) -> bool:
        kv = self.data.get(c["key"])
        target = c["target"]
        actual = (kv["value"] if kv else None) if target == "value" else (kv[target] if kv else 0)
        want = c["value"]
        if c["result"] == "==":
            return bool(actual == want)
        if c["result"] == "!=":
            return bool(actual != want)
        if actual is None or want is None:
            return False
        return bool(actual < want) if c["result"] == "<" else bool(actual > want)

    def write(self, req: dict[str, Any]) -> dict[str, Any]:
        """Apply a write at most once per (session, seq); the result without id/ok."""
        sid = (req.get("session"), req.get("seq"))
        if isinstance(sid[0], bytes) and isinstance(sid[1], int) and sid in self.sessions:
            return self.sessions[sid]  # type: ignore[index]
        op = req["op"]
        # refusals first: a refused write applies nothing
        if op == "put":
            self._check_lease(req.get("lease"))
        elif op == "txn":
            succeeded = all(self._holds(c) for c in req["compare"])
            for sub in req["success"] if succeeded else req["failure"]:
                if sub["op"] == "put":
                    self._check_lease(sub.get("lease"))
        elif op == "lease_revoke":
            self._check_lease(req["lease"])
        elif op == "lease_grant" and req.get("lease") in self.leases:
            raise _Refused("invalid_request", f"lease {req['lease']} exists")
        self.applied.append(req)
        rev = self.revision + 1
        events: list[dict[str, Any]] = []
        if op == "put":
            self._put(req["key"], req["value"], rev, events, req.get("lease"))
            result: dict[str, Any] = {}
        elif op == "delete":
            result = {"deleted": self._delete(req, rev, events)}
        elif op == "lease_grant":
            lease_id = req.get("lease")
            if lease_id is None:
                lease_id = self.next_lease
                self.next_lease += 1
            self.leases[lease_id] = _Lease(req["ttl"])
            result = {"lease": lease_id, "ttl": req["ttl"]}
        elif op == "lease_revoke":
            for key in sorted(self.leases.pop(req["lease"]).keys):
                self._delete({"key": key}, rev, events)
            result = {}
        else:
            results = []
            for sub in req["success"] if succeeded else req["failure"]:
                if sub["op"] == "put":
                    self._put(sub["key"], sub["value"], rev, events, sub.get("lease"))
                    results.append({"revision": rev})
                elif sub["op"] == "delete":
                    results.append({"deleted": self._delete(sub, rev, events)})
                elif sub["op"] == "get":
                    results.append({"kv": self.data.get(sub["key"])})
                else:
                    results.append(self._range(sub))
            result = {"succeeded": succeeded, "results": results}
        self._commit(rev, events)
        result["revision"] = self.revision
        if isinstance(sid[0], bytes) and isinstance(sid[1], int):
            self.sessions[sid] = result  # type: ignore[index]
        return result

    def _commit(self, rev: int, events: list[dict[str, Any]]) -> None:
        if events:
            self.revision = rev
        for ev in events:
            self.history.append({**ev, "revision": rev})
        for w in list(self.watchers):
            mine = [e for e in events if w.matches(e["kv"]["key"])]
            if mine:
                w.conn.push({"watch_id": w.watch_id, "events": mine, "revision": rev})
                self.event_pushes += 1


@dataclass
class _Lease:
    ttl: int  # as granted
    keys: set[str] = field(default_factory=set)
    left: int | None = None  # what lease_ttl answers (None: ttl)


@dataclass
class _Watcher:
    conn: _Conn
    watch_id: int
    key: str | None
    prefix: str | None

    def matches(self, key: str) -> bool:
        return key == self.key if self.key is not None else key.startswith(self.prefix or "")


class _Conn:
    """One accepted connection: the socket and its ordered outgoing queue."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.send, self.receive = trio.open_memory_channel[object](math.inf)
        # While a message of this connection is handled, its watch events wait here:
        # a watch made by that message must be answered before its first event.
        self.deferred: list[object] | None = None

    def push(self, msg: object) -> None:
        if self.deferred is not None:
            self.deferred.append(msg)
        else:
            self.send.send_nowait(msg)

    async def writer(self) -> None:
        async for msg in self.receive:
            try:
                await self.ws.send_message(cbor2.dumps(msg))
            except trio_websocket.ConnectionClosed:
                return


class FakeServer:
    """One fake node. ``await nursery.start(server.run)`` serves on a free port."""

    def __init__(self, node_id: str, store: Store, certs: Path, *, token: str = TOKEN) -> None:
        self.node_id = node_id
        self.store = store
        self.token = token
        self._ctx = client_server_context(certs / f"{node_id}.pem", certs / f"{node_id}-key.pem")
        self.port = 0
        self.messages: list[object] = []  # every WebSocket message received, decoded
        self.arrivals: list[float] = []  # trio.current_time() of each request received
        self.faults: deque[Fault] = deque()
        self.redirect_to: str | None = None  # set: every write answers not_leader -> here
        self.forbidden: tuple[str, ...] = ()  # writes to keys under these: permission_denied
        self.reverse = False  # answer each request of a message alone, in reverse order
        self.accepted = 0
        self.rejected = 0
        self.write_answers = 0  # write responses sent
        self.seqs: list[tuple[int, int]] = []  # (seq, write_answers) per write received
        self._conns: list[_Conn] = []
        self._next_watch = 1

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every request received, in order, across messages."""
        out: list[dict[str, Any]] = []
        for m in self.messages:
            out.extend(m if isinstance(m, list) else [m])  # type: ignore[arg-type]
        return out

    def inject(self, action: str, *, op: str | None = None, times: int = 1, **args: Any) -> None:
        """Make the next ``times`` requests (of ``op``) meet ``action``."""
        self.faults.append(Fault(action, op, times, args))

    async def drop_all(self) -> None:
        """Close every open connection (as a crashing node would)."""
        for c in list(self._conns):
            await c.ws.aclose(1011, "dropped by the test")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trio_websocket.serve_websocket, self._handle, "127.0.0.1", 0, self._ctx
            )
            self.port = server.port
            task_status.started()

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        headers = {k.lower(): v for k, v in request.headers}
        if headers.get(b"authorization") != f"Bearer {self.token}".encode():
            self.rejected += 1
            await request.reject(401, body=b"bad token")
            return
        if request.path != "/v1":
            await request.reject(404)
            return
        ws = await request.accept()
        self.accepted += 1
        conn = _Conn(ws)
        self._conns.append(conn)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.writer)
                await self._serve(conn)
                nursery.cancel_scope.cancel()
        finally:
            self._conns.remove(conn)
            self.store.watchers = [w for w in self.store.watchers if w.conn is not conn]

    async def _serve(self, conn: _Conn) -> None:
        try:
            while True:
                data = await conn.ws.get_message()
                assert isinstance(data, bytes), "the client sends binary messages only"
                msg = cbor2.loads(data)
                self.messages.append(msg)
                self.arrivals += [trio.current_time()] * (len(msg) if isinstance(msg, list) else 1)
                responses = []
                conn.deferred = []
                for req in msg if isinstance(msg, list) else [msg]:
                    if req["op"] in WRITES:
                        self.seqs.append((req["seq"], self.write_answers))
                    fault = self._fault(req["op"])
                    if fault is not None and fault.action == "drop":
                        if fault.args.get("apply") and req["op"] in WRITES:
                            self.store.write(req)
                        await conn.ws.aclose(1011, "dropped by the test")
                        return
                    if fault is not None and fault.action == "silence":
                        continue
                    resp = self._answer(conn, req, fault)
                    responses.append(resp)
                    self.write_answers += req["op"] in WRITES
                    self.store.changed()
                live = conn.deferred
                conn.deferred = None
                if self.reverse:
                    for resp in reversed(responses):
                        conn.push(resp)
                elif responses:
                    conn.push(responses[0] if len(responses) == 1 else responses)
                for resp in responses:  # replays of watches with a start_revision
                    for event_msg in resp.pop("_after", []):
                        conn.push(event_msg)
                for event_msg in live:  # what writes of this message made
                    conn.push(event_msg)
        except trio_websocket.ConnectionClosed:
            return

    def _fault(self, op: str) -> Fault | None:
        for f in self.faults:
            if f.op is None or f.op == op:
                f.times -= 1
                if f.times <= 0:
                    self.faults.remove(f)
                return f
        return None

    def _answer(self, conn: _Conn, req: dict[str, Any], fault: Fault | None) -> dict[str, Any]:
        rid = req["id"]
        if fault is not None:
            if fault.action == "not_leader":
                extra = {}
                if fault.args.get("leader_endpoint"):
                    extra["leader_endpoint"] = fault.args["leader_endpoint"]
                return _error(rid, "not_leader", "not the leader", **extra)
            if fault.action == "unavailable":
                return _error(rid, "unavailable", "no quorum")
            code = fault.args.get("code", "internal")
            extra = {k: v for k, v in fault.args.items() if k != "code"}
            return _error(rid, code, f"injected {code}", **extra)
        op = req["op"]
        if op in LEADER_OPS and self.redirect_to is not None:
            return _error(rid, "not_leader", "not the leader", leader_endpoint=self.redirect_to)
        if op in WRITES and self.forbidden and str(req.get("key", "")).startswith(self.forbidden):
            return _error(rid, "permission_denied", f"the token does not cover {req['key']!r}")
        try:
            result = self._do(conn, req)
        except _Refused as exc:
            return _error(rid, exc.code, exc.message)
        return {"id": rid, "ok": True, **result}

    def _do(self, conn: _Conn, req: dict[str, Any]) -> dict[str, Any]:
        st = self.store
        op = req["op"]
        if op in WRITES:
            return dict(st.write(req))
        if op == "get":
            return {"kv": st.kv(req["key"]), "revision": st.revision}
        if op == "range":
            return {**st._range(req), "revision": st.revision}
        if op == "watch":
            watch_id = self._next_watch
            self._next_watch += 1
            st.watchers.append(_Watcher(conn, watch_id, req.get("key"), req.get("prefix")))
            result: dict[str, Any] = {"watch_id": watch_id, "revision": st.revision}
            start = req.get("start_revision", 0)
            if start:
                w = st.watchers[-1]
                old = [
                    e for e in st.history if e["revision"] >= start and w.matches(e["kv"]["key"])
                ]
                result["_after"] = [
                    {"watch_id": watch_id, "events": [_event(e)], "revision": e["revision"]}
                    for e in old
                ]
            return result
        if op == "lease_keepalive":
            st._check_lease(req["lease"])
            st.keepalives.append((trio.current_time(), req["lease"]))
            return {"ttl": st.leases[req["lease"]].ttl}
        if op == "lease_ttl":
            st._check_lease(req["lease"])
            lease = st.leases[req["lease"]]
            out: dict[str, Any] = {
                "ttl": lease.ttl if lease.left is None else lease.left,
                "granted_ttl": lease.ttl,
            }
            if req.get("keys"):
                out["keys"] = sorted(lease.keys)
            return out
        if op == "lease_list":
            return {"leases": sorted(st.leases)}
        if op == "unwatch":
            st.watchers = [
                w for w in st.watchers if not (w.conn is conn and w.watch_id == req["watch_id"])
            ]
            return {}
        if op == "refresh":
            if req.get("token") != self.token:
                raise _Refused("unauthenticated", "bad token")
            return {}
        if op == "status":
            return {
                "node_id": self.node_id,
                "role": "leader" if st.leader_id == self.node_id else "follower",
                "term": 3,
                "leader_id": st.leader_id,
                "leader_endpoint": None,
                "commit_index": 10 + st.revision,
                "applied_index": 10 + st.revision,
                "revision": st.revision,
                "members": [dict(m) for m in st.members],
                "db_size": 123456,
                "version": "0.1.0",
                "alarms": ["nospace"] if self.node_id == "n2" else [],
                "last_error": (
                    {"event": "tls_reload_refused", "at": time.time() - 90}
                    if self.node_id == "n2"
                    else None
                ),
            }
        if op in ("member_add", "member_promote", "member_remove"):
            return self._member(req)
        if op == "transfer_leader":
            to = req.get("to") or next(m["id"] for m in st.members if m["id"] != st.leader_id)
            if not any(m["id"] == to and m["voter"] for m in st.members):
                raise _Refused("member_error", f"{to} is not a voter")
            st.leader_id = to
            return {"leader_id": to}
        raise _Refused("invalid_request", f"unknown op {op!r}")

    def _member(self, req: dict[str, Any]) -> dict[str, Any]:
        st = self.store
        mid = req["member_id"]
        known = {m["id"]: m for m in st.members}
        if req["op"] == "member_add":
            if mid in known:
                raise _Refused("member_error", f"{mid} is already a member")
            voter = not req.get("learner", False)
            st.members.append(
                {"id": mid, "peer": req["peer"], "client": req["client"], "voter": voter}
            )
        elif mid not in known:
            raise _Refused("member_error", f"{mid} is not a member")
        elif req["op"] == "member_promote":
            known[mid]["voter"] = True
        else:
            st.members.remove(known[mid])
        return {"members": [dict(m) for m in st.members]}


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _error(rid: int, code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": {"code": code, "message": message, **extra}}


def _event(e: dict[str, Any]) -> dict[str, Any]:
    return {"type": e["type"], "kv": e["kv"]}


class FakeCluster:
    """Fake nodes sharing one Store; members n1.. with their URLs as client addresses."""

    def __init__(self, certs: Path, ids: tuple[str, ...] = ("n1", "n2")) -> None:
        self.store = Store()
        self.nodes = {i: FakeServer(i, self.store, certs) for i in ids}

    async def start(self, nursery: trio.Nursery) -> FakeCluster:
        for node in self.nodes.values():
            await nursery.start(node.run)
        self.store.members = [
            {"id": i, "peer": f"127.0.0.1:{7000 + n}", "client": node.url, "voter": True}
            for n, (i, node) in enumerate(self.nodes.items(), start=1)
        ]
        return self

    def __getitem__(self, node_id: str) -> FakeServer:
        return self.nodes[node_id]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes.values()]
