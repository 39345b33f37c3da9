"""One client connection: pipelined requests answered by id, responses batched.

The writes of one message stay one unit (docs/architecture.md, "The life of a write"): they
are checked as they are read, become ONE log entry proposed without a task of their
own (``api.writes``), and are answered together, with one audit record per kind of
outcome. The writes of all the messages one read brought are one such unit. Every other request runs
as its own task (so a slow linearizable read holds up nothing behind it), bounded by a
per-connection semaphore. Responses ready at the same moment leave as one WebSocket
message (an array), because a message costs the server far more than a response inside
it. Watch events use the same outgoing queue. A client that does not read its responses
fills the queue and is disconnected: it never grows our memory without bound.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from liferaft.api import access, handlers
from liferaft.api.backups import BackupStream
from liferaft.api.errors import ApiError, invalid, unavailable
from liferaft.api.watch import RESET, Subscription
from liferaft.api.writes import ConnectionWrites
from liferaft.kv.commands import WRITE_OPS, RequestError, plain_put, validate_request
from liferaft.kv.state import StateDB
from liferaft.kv.watch import Compacted
from liferaft.observability.logs import event
from liferaft.safecbor import CBORError, dumps, loads
from liferaft.security.tokens import Claims, Role, TokenError
from liferaft.websocket import INVALID_PAYLOAD, UNSUPPORTED_DATA, ConnectionClosed, WebSocket

if TYPE_CHECKING:
    from liferaft.api.server import ClientServer

log = logging.getLogger("liferaft.api")
audit_log = logging.getLogger("liferaft.audit")

MAX_BATCH = 1024  # requests in one array message (docs/client-protocol.md, "Messages")
MAX_IN_FLIGHT = 4096  # requests other than writes being handled per connection
MAX_QUEUED = 65536  # responses and events waiting to be sent before we give up
# ... or this many bytes of values in them (reads and watch events carry values; a
# client that pipelines gets of large values and never reads would hold them here)
MAX_QUEUED_BYTES = 32 * 1024 * 1024
# a watch reading history waits while more than this is queued (backpressure, so a
# long catch-up over large values never trips MAX_QUEUED_BYTES itself)
CATCH_UP_WATERMARK = MAX_QUEUED_BYTES // 4
CATCH_UP_PAGE_BYTES = MAX_QUEUED_BYTES // 8  # values read from history at a time, about
TRY_LATER = 1013  # WebSocket close code (RFC 6455 §7.4.1, IANA registry)


class Closing(Exception):
    """Close the connection with ``code`` (after what is queued has been sent)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Connection:
    def __init__(
        self,
        server: ClientServer,
        ws: WebSocket,
        claims: Claims,
        remote: str,
    ) -> None:
        self.server = server
        self.ws = ws
        self.claims = claims
        self.remote = remote
        self._out: list[dict[str, Any]] = []
        self._out_bytes = 0  # bytes of values in _out (about)
        self._no_space = False  # refuse the current read's writes that grow the store
        self._wake = trio.Event()
        self._sent = trio.Event()  # set (and replaced) after each message sent
        self._slots = trio.Semaphore(MAX_IN_FLIGHT)
        self._writes = ConnectionWrites(self)
        self._ended = False  # run() has returned
        # writes answered and not yet audited: (op, result) -> keys (``_audit_answered``)
        self._audit_writes: dict[tuple[str, str], list[str | None]] = {}
        self._watches: dict[int, _Watch] = {}
        self._claims_changed = trio.Event()  # wakes the expiry guard after a refresh
        self._next_watch = 1
        self._scope = trio.CancelScope()
        self._overflow: Closing | None = None
        self._backup = BackupStream(server.node, server.backups)

    async def run(self) -> None:
        try:
            await self._serve()
        finally:
            self._ended = True
            self._backup.close()
            self._audit_answered()  # writes answered but never sent are audited too

    async def _serve(self) -> None:
        close: Closing | None = None
        gone = False
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._sender)
                nursery.start_soon(self._expiry_guard)
                await nursery.start(self._writes.run)
                try:
                    await self._receive(nursery)
                except Closing as c:
                    close = c
                nursery.cancel_scope.cancel()
        except* ConnectionClosed:
            gone = True  # the client went away; its pending requests die with it
        if gone:
            return
        close = close or self._overflow
        if close is not None:
            event(log, "client_closed", remote=self.remote, code=close.code, reason=close.reason)
            with trio.move_on_after(1):
                await self._flush()
                await self.ws.aclose(close.code, close.reason)

    # ---------------------------------------------------------------- receiving

    async def _receive(self, nursery: trio.Nursery) -> None:
        while True:
            # Every message one read brought: their writes go to the log as one batch.
            writes: list[dict[str, Any]] = []
            size = 0
            try:
                messages = await self.ws.get_messages()
                # once per read, not per write: the disk's nospace alarm (node/space.py)
                self._no_space = self.server.node.refuses_growth(sum(map(len, messages)))
                for data in messages:
                    await self._take_message(data, writes, nursery)
                    size += len(data)
                    if len(writes) >= MAX_BATCH:  # an entry stays within the core's bounds
                        await self._writes.submit(writes, size)
                        writes, size = [], 0
            finally:  # also when a later message was malformed: these were accepted
                if writes:
                    await self._writes.submit(writes, size)

    async def _take_message(
        self, data: bytes | str, writes: list[dict[str, Any]], nursery: trio.Nursery
    ) -> None:
        if not isinstance(data, bytes):
            raise Closing(UNSUPPORTED_DATA, "binary CBOR messages only")
        try:
            obj = loads(data, max_depth=24)
        except CBORError as exc:
            raise Closing(INVALID_PAYLOAD, str(exc)[:120]) from None
        if isinstance(obj, dict):
            batch = [obj]
        elif isinstance(obj, list) and 1 <= len(obj) <= MAX_BATCH:
            batch = obj
        else:
            raise Closing(INVALID_PAYLOAD, "a message is a request map or 1..1024 of them")
        for req in batch:
            rid = req.get("id") if isinstance(req, dict) else None
            if type(rid) is not int or rid < 0:
                raise Closing(INVALID_PAYLOAD, "every request needs an unsigned integer id")
            op = req.get("op")
            if type(op) is str and op in WRITE_OPS:
                self._take_write(req, writes)
            elif op == "refresh":  # at once: it applies to the requests after it
                self._answer_refresh(req)
            else:
                try:
                    self._slots.acquire_nowait()  # no trip through the scheduler
                except trio.WouldBlock:
                    await self._slots.acquire()  # too many in flight: stop reading
                nursery.start_soon(self._handle, req, nursery)

    def _take_write(self, req: dict[str, Any], writes: list[dict[str, Any]]) -> None:
        """Check a write as it is read: a refused one is answered at once, a good one
        joins the message's batch."""
        try:
            if self.claims.exp + self.server.leeway_s < time.time():
                raise ApiError("unauthenticated", "the token expired; send refresh with a new one")
            if plain_put(req, id_field=True):
                if not self._may_write:
                    raise ApiError("permission_denied", "put needs the write role")
                if not self.claims.covers(req["key"]):
                    raise ApiError("permission_denied", f"the token does not cover {req['key']!r}")
            else:
                try:
                    validate_request(req)
                except RequestError as exc:
                    raise ApiError(exc.code, str(exc)) from None
                access.check(self.claims, req)
                if req["op"] == "lease_revoke":  # it deletes the lease's keys
                    self._lease_keys_covered(req["lease"])
            if self._no_space and _grows_store(req):
                raise ApiError(
                    "no_space",
                    "the leader's disk is nearly full: it takes no puts until space is "
                    "freed (deletes, compaction and reads still work)",
                )
        except ApiError as exc:
            self._queue({"id": req["id"], "ok": False, "error": exc.body()})
            self.server.observe(req["op"], exc.code, 0.0)
            self._audit_writes_of(req["op"], exc.code, [_audited_key(req)])
            return
        writes.append(req)

    def answer_writes(
        self, reqs: list[dict[str, Any]], results: list[dict[str, Any]], started: float
    ) -> None:
        """Queue each write's answer (``api.writes`` calls this, from whatever task the
        results came in). Writes answered after the connection ended are audited at
        once: every write that reached the log has its record."""
        seconds = time.perf_counter() - started
        outcomes = self._audit_writes
        for req, result in zip(reqs, results, strict=True):
            err = result.get("error")
            if err is None:
                self._out.append({"id": req["id"], "ok": True, **result})
                code = "ok"
            else:
                self._out.append({"id": req["id"], "ok": False, "error": err})
                code = err["code"]
            op = req["op"]
            self.server.observe(op, code, seconds)
            outcomes.setdefault((op, code), []).append(_audited_key(req))
        if self._ended:
            self._out.clear()
            self._audit_answered()
            return
        self._queued(applying=self.server.node.applying)

    def _audit_answered(self) -> None:
        """One audit record per op and result for the writes answered since the last
        call: the sender calls it for each message it sends (so a record covers the
        writes of one response message), and the connection at its end."""
        outcomes, self._audit_writes = self._audit_writes, {}
        for (op, code), keys in outcomes.items():
            self._audit_writes_of(op, code, keys)

    def _audit_writes_of(self, op: str, code: str, keys: list[str | None]) -> None:
        """The audit record of writes: one op and result, the keys they touched."""
        event(
            audit_log,
            "audit",
            subject=self.claims.sub,
            remote=self.remote,
            op=op,
            keys=keys,
            result=code,
        )

    def _answer_refresh(self, req: dict[str, Any]) -> None:
        try:
            self._queue({"id": req["id"], "ok": True, **self._refresh(req)})
            code = "ok"
        except ApiError as exc:
            self._queue({"id": req["id"], "ok": False, "error": exc.body()})
            code = exc.code
        self.server.observe("refresh", code, 0.0)
        if code in ("permission_denied", "unauthenticated"):
            self._audit(req, "refresh", code)

    async def _handle(self, req: dict[str, Any], nursery: trio.Nursery) -> None:
        rid = req["id"]
        op = req.get("op")
        started = time.perf_counter()
        code = "ok"
        try:
            result = await self._dispatch(req, nursery)
            self._queue({"id": rid, "ok": True, **result}, _result_bytes(result))
        except ApiError as exc:
            code = exc.code
            self._queue({"id": rid, "ok": False, "error": exc.body()})
        except Exception as exc:  # a bug of ours: answer it, log it, keep serving
            code = "internal"
            event(log, "request_failed", level=logging.ERROR, op=op, error=repr(exc)[:300])
            self._queue(
                {"id": rid, "ok": False, "error": {"code": code, "message": "internal error"}}
            )
        finally:
            self._slots.release()
        opname = op if isinstance(op, str) and op in access.OP_ROLE else "invalid"
        self.server.observe(opname, code, time.perf_counter() - started)
        if code in ("permission_denied", "unauthenticated"):
            self._audit(req, opname, code)

    async def _dispatch(self, req: dict[str, Any], nursery: trio.Nursery) -> dict[str, Any]:
        op = req.get("op")
        if not isinstance(op, str) or op not in access.OP_ROLE:
            raise invalid(f"unknown op {op!r}")
        if self.claims.exp + self.server.leeway_s < time.time():
            raise ApiError("unauthenticated", "the token expired; send refresh with a new one")
        try:
            validate_request(req)
        except RequestError as exc:
            raise ApiError(exc.code, str(exc)) from None
        access.check(self.claims, req)
        node = self.server.node
        if op in ("get", "range"):
            return await handlers.read(node, req)
        if op == "watch":
            return self._watch(req, nursery)
        if op == "unwatch":
            return self._unwatch(req)
        if op == "status":
            return handlers.status(node)
        if op == "transfer_leader":
            return await handlers.transfer_leader(node, req)
        if op == "lease_keepalive":
            return await handlers.lease_keepalive(node, req)
        if op == "lease_ttl":
            if req.get("keys"):
                self._lease_keys_covered(req["lease"])
            return await handlers.lease_ttl(node, req)
        if op == "lease_list":
            return await handlers.lease_list(node)
        if op == "snapshot":
            return await self._backup.begin()
        if op == "snapshot_chunk":
            return await self._backup.chunk(req)
        return await handlers.member_change(node, req)

    def _lease_keys_covered(self, lease: int) -> None:
        """A token limited to key prefixes may revoke a lease, or see its keys, only if
        it covers every key the lease holds (as etcd checks): another client's lease is
        not its to end. At most 10,000 keys, one indexed read."""
        if self.claims.prefixes is None:
            return
        try:
            keys = self.server.node.kv.read_now(lambda db: db.lease_keys(lease))
        except trio.WouldBlock:
            raise unavailable("the state is being replaced by a snapshot; retry") from None
        for key in keys:
            if not self.claims.covers(key):
                raise ApiError(
                    "permission_denied", f"lease {lease:x} holds keys this token does not cover"
                )

    @property
    def _may_write(self) -> bool:
        return self.claims.allows(Role.WRITE)

    def _refresh(self, req: dict[str, Any]) -> dict[str, Any]:
        """Allowed with an expired token: it is how to recover."""
        try:
            validate_request(req)
        except RequestError as exc:
            raise ApiError(exc.code, str(exc)) from None
        token = req.get("token")
        if not isinstance(token, str):
            raise invalid("refresh needs a token")
        try:
            self.claims = self.server.verifier.verify(token, now=time.time())
        except TokenError as exc:
            self.server.metrics.auth_failures.labels(exc.reason).inc()
            raise ApiError("unauthenticated", f"token refused: {exc.reason}") from None
        self._claims_changed.set()
        # The new token may allow less: a watch it no longer covers ends now.
        for wid, w in list(self._watches.items()):
            try:
                access.check(self.claims, w.request)
            except ApiError as exc:
                self._end_watch(wid, exc.code, f"the refreshed token does not allow it: {exc}")
        return {}

    async def _expiry_guard(self) -> None:
        """End every watch once the token expires (plus the leeway): a stream must not
        outlive the token that opened it. A refresh moves the deadline."""
        while True:
            self._claims_changed = trio.Event()
            left = self.claims.exp + self.server.leeway_s - time.time()
            with trio.move_on_after(max(0.0, left)):
                await self._claims_changed.wait()
                continue  # refreshed: look at the new expiry
            if self.claims.exp + self.server.leeway_s <= time.time():
                for wid in list(self._watches):
                    self._end_watch(wid, "unauthenticated", "the token expired; watch again")
                await self._claims_changed.wait()  # nothing to guard until a refresh

    def _end_watch(
        self, wid: int, code: str, message: str, *, audit: bool = True, **extra: Any
    ) -> None:
        """Stop watch ``wid`` with a last message saying why (and audit it: an access
        decision)."""
        w = self._watches.pop(wid, None)
        if w is None:
            return
        w.scope.cancel()
        self._queue(
            {
                "watch_id": wid,
                "events": [],
                "revision": w.last,
                "canceled": True,
                "error": {"code": code, "message": message, **extra},
            }
        )
        if audit:
            self._audit(w.request, "watch", code)

    # ---------------------------------------------------------------- watches

    def _watch(self, req: dict[str, Any], nursery: trio.Nursery) -> dict[str, Any]:
        """Subscribe to live events first, then read the history up to the revision the
        subscription starts at: no event falls in between, none comes twice."""
        state = self.server.node.kv
        key, prefix = req.get("key"), req.get("prefix")
        start = req.get("start_revision", 0)
        if start and start <= state.db.compact_revision:
            raise handlers.compacted(Compacted(state.db.compact_revision))
        wid = self._next_watch
        self._next_watch += 1
        sub = self.server.watch_hub.subscribe()
        now = state.db.revision  # committed: its events are in the database
        watch = self._watches[wid] = _Watch(
            {k: req[k] for k in ("op", "key", "prefix") if k in req},
            trio.CancelScope(),
            now if not start else start - 1,
        )
        nursery.start_soon(self._stream, wid, key, prefix, start, now, sub, watch)
        # The revision the watch starts after: a client that must resubscribe resumes
        # from it without a gap (docs/client-protocol.md, "Watches").
        return {"watch_id": wid, "revision": now}

    async def _stream(
        self,
        wid: int,
        key: str | None,
        prefix: str | None,
        start: int,
        now: int,
        sub: Subscription,
        watch: _Watch,
    ) -> None:
        state = self.server.node.kv
        with watch.scope, sub:
            await trio.lowlevel.checkpoint()  # let the watch_id answer go first
            watch.last = now if not start else start - 1  # the newest revision covered
            if not await self._catch_up(wid, key, prefix, now, watch):
                return
            async for batch in sub.events:
                if batch is RESET:  # a snapshot replaced the state: read what it brought
                    if not await self._catch_up(wid, key, prefix, state.db.revision, watch):
                        return
                    continue
                last = watch.last
                chosen = [e for e in batch if e["revision"] > last and _matches(e, key, prefix)]
                if batch:
                    watch.last = max(last, batch[-1]["revision"])
                if chosen:
                    self._queue(
                        {"watch_id": wid, "events": chosen, "revision": watch.last},
                        _events_bytes(chosen),
                    )
            # The hub cut us off: we fell too far behind to deliver every event.
            self._overflow = Closing(TRY_LATER, "a watch fell behind; watch again from a revision")
            self._scope.cancel()

    async def _catch_up(
        self, wid: int, key: str | None, prefix: str | None, upto: int, watch: _Watch
    ) -> bool:
        """Deliver the history after ``watch.last`` up to ``upto`` from the database, a
        page at a time; False if it was compacted meanwhile (the watch then ends)."""
        state = self.server.node.kv
        while watch.last < upto:
            page = partial(
                StateDB.events,
                start=watch.last + 1,
                end=upto,
                key=key,
                prefix=prefix,
                max_bytes=CATCH_UP_PAGE_BYTES,
            )
            try:
                events, watch.last = await state.read(page)
            except Compacted as exc:  # compacted before we read it: the client resumes
                self._end_watch(
                    wid,
                    "compacted",
                    str(exc),
                    audit=False,
                    compact_revision=exc.compact_revision,
                )
                return False
            if events:
                self._queue(
                    {"watch_id": wid, "events": events, "revision": watch.last},
                    _events_bytes(events),
                )
            while self._out_bytes > CATCH_UP_WATERMARK:  # let the client take it first
                await self._sent.wait()
        return True

    def _unwatch(self, req: dict[str, Any]) -> dict[str, Any]:
        wid = req.get("watch_id")
        watch = self._watches.pop(wid, None) if type(wid) is int else None
        if watch is None:
            raise invalid(f"no watch {wid!r} on this connection")
        watch.scope.cancel()
        return {}

    # ---------------------------------------------------------------- sending

    def _queue(self, item: dict[str, Any], size: int = 0) -> None:
        """Queue ``item`` to send; ``size`` is about the bytes of values it carries."""
        self._out.append(item)
        self._out_bytes += size
        self._queued()

    def _queued(self, *, applying: bool = False) -> None:
        """Wake the sender for what was appended to ``_out``; or, for answers of the
        applier's current run, leave them to its ``after_apply`` hook (``send_now``)."""
        if len(self._out) > MAX_QUEUED or self._out_bytes > MAX_QUEUED_BYTES:
            # a client that does not read: let it go
            self._out.clear()
            self._out_bytes = 0
            self._overflow = Closing(TRY_LATER, "the client does not read its responses")
            self._scope.cancel()
            return
        if applying:
            self.server.answered[self] = None
        else:
            self._wake.set()

    def send_now(self) -> None:
        """Send what is queued from the caller's task (the applier's, at the end of a
        run), if no send is under way: it spares the answers a switch to the sender's
        task. Otherwise, or for what the socket did not take at once, the sender does."""
        if not self._out or self._ended:
            return
        ws = self.ws
        if not ws.can_send_now:
            self._wake.set()
            return
        try:
            sent = ws.send_now([self._take_out()])
        except ConnectionClosed:
            self._wake.set()  # the sender finds the connection closed and ends it
            return
        assert sent  # can_send_now held, and nothing ran since
        self._message_sent()
        if ws.pending:
            self._wake.set()  # the sender sends what the socket did not take

    def wake_sender(self) -> None:
        self._wake.set()

    async def _sender(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await self._flush()

    async def _flush(self) -> None:
        while self._out:
            await self.ws.send_message(self._take_out())
            self._message_sent()
        await self.ws.flush()  # what ``send_now`` left, if anything

    def _take_out(self) -> bytes:
        """Everything queued, audited and encoded as one message."""
        self._audit_answered()
        batch, self._out = self._out, []
        self._out_bytes = 0  # the message being sent is the socket's to hold now
        return dumps(batch[0] if len(batch) == 1 else batch)

    def _message_sent(self) -> None:
        self._sent.set()  # every catch-up waiting on it wakes
        self._sent = trio.Event()

    def _audit(self, req: dict[str, Any], op: str, code: str) -> None:
        event(
            audit_log,
            "audit",
            subject=self.claims.sub,
            remote=self.remote,
            op=op,
            key=_audited_key(req),
            result=code,
        )


def _grows_store(req: dict[str, Any]) -> bool:
    """A put, or a transaction that may put: refused under the nospace alarm. Deletes
    and compaction stay allowed: they are how room is made."""
    op = req["op"]
    if op == "put":
        return True
    if op == "txn":
        ops = [*(req.get("success") or ()), *(req.get("failure") or ())]
        return any(isinstance(o, dict) and o.get("op") == "put" for o in ops)
    return False


def _value_bytes(kv: object) -> int:
    value = kv.get("value") if isinstance(kv, dict) else None
    return len(value) if isinstance(value, (bytes, str)) else 0


def _result_bytes(result: dict[str, Any]) -> int:
    """About the bytes of values in a read's result (a get's kv, a range's kvs)."""
    kvs = result.get("kvs")
    n = _value_bytes(result.get("kv"))
    data = result.get("data")  # a backup's chunk
    if isinstance(data, bytes):
        n += len(data)
    if isinstance(kvs, list):
        n += sum(_value_bytes(kv) for kv in kvs)
    return n


def _events_bytes(events: list[dict[str, Any]]) -> int:
    return sum(_value_bytes(e.get("kv")) for e in events)


def _audited_key(req: dict[str, Any]) -> str | None:
    """The key (or prefix) a request names at its top level; None for a txn or compact."""
    key = req.get("key", req.get("prefix"))
    return key if isinstance(key, str) else None


@dataclass
class _Watch:
    request: dict[str, Any]  # op, key or prefix: what the token must keep covering
    scope: trio.CancelScope
    last: int  # the newest revision delivered (or skipped as not matching)


def _matches(e: dict[str, Any], key: str | None, prefix: str | None) -> bool:
    k = e["kv"]["key"]
    if key is not None:
        return bool(k == key)
    return prefix is None or bool(k.startswith(prefix))
