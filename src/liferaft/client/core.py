"""The client's protocol core, sans I/O: the decisions of docs/client-protocol.md that do
not depend on how bytes move or how tasks wait.

Both transports, Trio (liferaft.client.client and the modules it is made of) and asyncio
(liferaft.client.aio), drive these plain objects: they feed them what happened (a
response, a lost connection, an attempt that ran out of time, a renewal confirmed) and
the current time, and do what they answer (connect to this endpoint next, wait this
long, raise this error, send these requests in one message). Nothing here imports an
event loop, a socket or a clock, so it is tested without a network, as the node's Raft
core is (docs/architecture.md).

What lives here:

- :func:`take_batch`: which of the requests queued on a connection leave in the next
  WebSocket message, within ``max_batch`` and ``max_message_bytes``; :func:`encode` gives
  each its id and bytes and refuses one too large for any message.
- :class:`SeqWindow`: the seqs of a session that may be in flight at once, and which
  waiting write gets the room a finished one frees.
- :class:`EndpointRing`: which endpoint to connect to next (the next of the list, or the
  leader a ``not_leader`` named).
- :class:`Tries`, :func:`on_error`, :func:`on_lost`, :func:`on_silence`: the verdict on a
  failed attempt (retry at once, retry after a back-off, or raise; and whether to leave
  the connection), and :class:`Backoff`, the jittered delays from a seeded rng.
- :class:`WatchState`: a watch's resumption point (the revision after the last event
  delivered) and the ``watch`` request that resubscribes from it.
- :class:`KeepAliveSchedule`: when to renew which lease, and which are lost.
"""

from __future__ import annotations

import enum
import math
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from liferaft.client.errors import (
    ConnectionFailed,
    InternalError,
    LiferaftError,
    NotLeader,
    TooLarge,
    Unavailable,
    error_from_wire,
)
from liferaft.client.models import WatchEvent, event_from_wire
from liferaft.client.wire import Endpoint, encode_request, packed_size, parse_endpoint

# ---------------------------------------------------------------- requests and batches


class Queued(Protocol):
    """A request queued on a connection, as :func:`take_batch` sees it."""

    @property
    def encoded(self) -> bytes: ...

    @property
    def cancelled(self) -> bool: ...


Q = TypeVar("Q", bound=Queued)


def encode(request: Mapping[str, Any], request_id: int, max_message_bytes: int) -> bytes:
    """``request`` with its ``id``, as CBOR; TooLarge if it cannot fit any message."""
    encoded = encode_request({**request, "id": request_id})
    if len(encoded) > max_message_bytes:
        raise TooLarge(
            f"request of {len(encoded)} bytes exceeds max_message_bytes ({max_message_bytes})"
        )
    return encoded


def take_batch(outbox: list[Q], max_batch: int, max_message_bytes: int) -> list[Q]:
    """Remove from ``outbox`` and return the next message's worth of requests: in order,
    at most ``max_batch`` of them and at most ``max_message_bytes`` packed (always at
    least one, which :func:`encode` made sure fits); withdrawn ones are dropped."""
    batch: list[Q] = []
    size = 0
    rest = len(outbox)
    for i, p in enumerate(outbox):
        if p.cancelled:
            continue
        grown = size + len(p.encoded)
        if batch and (
            len(batch) >= max_batch or packed_size(len(batch) + 1, grown) > max_message_bytes
        ):
            rest = i
            break
        batch.append(p)
        size = grown
    del outbox[:rest]
    return batch


# ---------------------------------------------------------------- the session window


SESSION_WINDOW = 128  # results per session the server remembers (liferaft.kv.sessions)


class SeqWaiter:
    """A write waiting for room in a :class:`SeqWindow`; ``seqs`` once granted."""

    __slots__ = ("count", "seqs")

    def __init__(self, count: int) -> None:
        self.count = count  # how many seqs it wants (it takes fewer if that is the room)
        self.seqs: range | None = None


class SeqWindow:
    """The seqs of one session (docs/client-protocol.md, "Writes, sessions and retries"):
    handed out in order, as a range per write (or per turn of put_many), released in any
    order; a seq is handed out only within ``size`` of the oldest one still in flight.

    The server remembers the results of a session's newest 128 seqs and refuses an older
    seq, even one it never saw; so writes beyond the window wait in line
    (:meth:`wait`), and :meth:`release` says which waiters it granted, first come, first
    served. The transport wakes them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._seq = 0  # the last seq handed out
        # the seqs handed out and not yet released, oldest first, and those released
        # behind an older one
        self._open: deque[range] = deque()
        self._done: set[range] = set()
        self._waiters: deque[SeqWaiter] = deque()

    def _room(self) -> int:
        if not self._open:
            return self.size
        return self._open[0].start + self.size - 1 - self._seq

    def try_take(self, count: int) -> range | None:
        """The next seqs, ``count`` or fewer (at least one), if there is room and no one
        waits before us; None else."""
        if self._waiters:
            return None
        room = self._room()
        return self._grant(min(count, room)) if room > 0 else None

    def wait(self, count: int) -> SeqWaiter:
        """Join the line for ``count`` seqs; :meth:`release` grants it in turn."""
        waiter = SeqWaiter(count)
        self._waiters.append(waiter)
        return waiter

    def withdraw(self, waiter: SeqWaiter) -> None:
        """``waiter`` gives up (timed out, cancelled): out of the line, or its seqs back."""
        if waiter.seqs is not None:
            self.release(waiter.seqs)
        elif waiter in self._waiters:
            self._waiters.remove(waiter)

    def _grant(self, count: int) -> range:
        first = self._seq + 1
        self._seq += count
        seqs = range(first, self._seq + 1)
        self._open.append(seqs)
        return seqs

    def release(self, seqs: range) -> list[SeqWaiter]:
        """The writes of ``seqs`` (as handed out) are over: move the window; the waiters
        granted the room it made (their ``seqs`` set), to be woken."""
        open_seqs = self._open
        if open_seqs[0] is not seqs:
            self._done.add(seqs)  # behind an older one: the window stays
            return []
        open_seqs.popleft()
        done = self._done
        while open_seqs and open_seqs[0] in done:
            done.discard(open_seqs.popleft())
        granted = []
        waiters = self._waiters
        while waiters and (room := self._room()) > 0:
            waiter = waiters.popleft()
            waiter.seqs = self._grant(min(waiter.count, room))
            granted.append(waiter)
        return granted


def window_full(size: int, timeout: float) -> Unavailable:
    """The error of a write that waited ``timeout`` for a seq in vain (never sent)."""
    return Unavailable(
        f"the oldest of this client's {size} newest writes is still unanswered after {timeout:g}s"
    )


# ---------------------------------------------------------------- endpoints


class EndpointRing:
    """Which endpoint a client connects to next: the one a ``not_leader`` named, if any,
    else the next of its list (round robin, from ``first``)."""

    def __init__(self, endpoints: Sequence[Endpoint], first: int = 0) -> None:
        if not endpoints:
            raise ValueError("no endpoints given")
        self.endpoints = list(endpoints)
        self._index = first
        self._override: Endpoint | None = None

    def next(self) -> Endpoint:
        """The endpoint to try now (a redirect is used once)."""
        endpoint = self._override or self.endpoints[self._index % len(self.endpoints)]
        self._override = None
        return endpoint

    def advance(self) -> None:
        """The endpoint tried or used last failed: the next one of the list next time."""
        self._index += 1

    def redirect(self, leader: Endpoint) -> None:
        """A node named the leader: connect there next."""
        self._override = leader


class AvoidLeader:
    """``reads="followers"``: after a connection opens, ask the node's status and move on
    to the next endpoint if it leads, unless every endpoint was tried since the last
    connection kept (then the leader it is: the only node that answers)."""

    STATUS: Mapping[str, Any] = {"op": "status"}

    def __init__(self, enabled: bool, endpoints: int) -> None:
        self.enabled = enabled and endpoints > 1
        self._endpoints = endpoints
        self._skipped = 0

    def check(self) -> bool:
        """Whether to ask the new connection's node for its status."""
        if not self.enabled or self._skipped >= self._endpoints - 1:
            self._skipped = 0
            return False
        return True

    def skip(self, status: Mapping[str, Any]) -> bool:
        """Given the node's status answer: True to close the connection and move on."""
        if status.get("ok") is not True or status.get("node_id") != status.get("leader_id"):
            self._skipped = 0
            return False
        self._skipped += 1
        return True


# ---------------------------------------------------------------- retries and redirects


class Retry(enum.Enum):
    ALWAYS = "always"  # reads, and writes with a session: any failure may be retried
    SAFE = "safe"  # no session: only when the server surely did not run the request


class Move(enum.Enum):
    """What a failed attempt means for the connection it used."""

    STAY = "stay"  # keep it
    LOST = "lost"  # it broke: connect to the next endpoint
    ROTATE = "rotate"  # its node cannot serve us now: retire it, the next endpoint
    REDIRECT = "redirect"  # its node named the leader: retire it, connect there


class Tries:
    """How the attempts of one request went so far."""

    __slots__ = ("failures", "last", "redirects")

    def __init__(self) -> None:
        self.failures = 0  # attempts followed by a back-off
        self.redirects = 0  # not_leader answers with a leader_endpoint
        self.last: LiferaftError | None = None  # the error to raise at the deadline


@dataclass(frozen=True, slots=True)
class Verdict:
    """The verdict on a failed attempt. ``move`` (and ``leader`` for a redirect) says what
    to do with the connection; then, if ``fatal``, raise ``error``; else retry, at once
    if ``at_once`` (the first redirect of a request), or after a back-off."""

    move: Move
    error: LiferaftError
    fatal: bool = False
    at_once: bool = False
    leader: Endpoint | None = None


def on_error(error_map: object, retry: Retry, t: Tries) -> Verdict:
    """An error answer (``{"ok": false, "error": {...}}``'s ``error``)."""
    err = error_from_wire(error_map)
    if isinstance(err, NotLeader):
        t.last = err
        leader = _parse_or_none(err.leader_endpoint)
        if leader is not None:
            t.redirects += 1
            return Verdict(Move.REDIRECT, err, at_once=t.redirects == 1, leader=leader)
        return Verdict(Move.ROTATE, err)
    if isinstance(err, Unavailable) and retry is Retry.ALWAYS:
        t.last = err
        return Verdict(Move.ROTATE, err)
    return Verdict(Move.STAY, err, fatal=True)


def on_lost(url: str, reason: str, *, sent: bool, too_big: bool, retry: Retry, t: Tries) -> Verdict:
    """The connection to ``url`` broke before the answer came; ``sent``: the request had
    reached the socket (so it may have run); ``too_big``: the server closed it 1009."""
    if too_big:
        return Verdict(Move.LOST, TooLarge(f"{url} refused a message as too big"), fatal=True)
    t.last = ConnectionFailed(f"{url}: {reason}")
    return Verdict(Move.LOST, t.last, fatal=sent and retry is Retry.SAFE)


def on_silence(url: str, attempt_timeout: float, retry: Retry, t: Tries) -> Verdict:
    """No answer from ``url`` within ``attempt_timeout``: the node may be paused or cut
    off; the request may have run."""
    t.last = Unavailable(f"no answer from {url} within {attempt_timeout:g}s")
    return Verdict(Move.ROTATE, t.last, fatal=retry is Retry.SAFE)


def on_connect_timeout(attempt_timeout: float, t: Tries, *, cut_by_deadline: bool) -> None:
    """No connection within ``attempt_timeout`` (nothing was sent). When the call's own
    deadline cut the attempt short, the error before it says more."""
    if t.last is None or not cut_by_deadline:
        t.last = ConnectionFailed(f"cannot connect to an endpoint within {attempt_timeout:g}s")


def out_of_time(t: Tries, timeout: float) -> LiferaftError:
    """The error a call raises when its ``timeout`` has passed."""
    return t.last or Unavailable(f"no answer within {timeout:g}s")


BACKOFF_BASE = 0.05  # seconds: the first retry waits 25-50 ms, doubling up to the cap
BACKOFF_CAP = 1.0


class Backoff:
    """The waits between attempts: capped exponential with "equal jitter" (never ~0),
    from ``rng`` (seed it to replay a test)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def delay(self, failures: int) -> float:
        cap = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(failures, 16))
        return cap / 2 + self.rng.uniform(0, cap / 2)


def _parse_or_none(url: str | None) -> Endpoint | None:
    if not url:
        return None
    try:
        return parse_endpoint(url)
    except ValueError:
        return None


# ---------------------------------------------------------------- watches


class WatchState:
    """One watch's bookkeeping (docs/client-protocol.md, "Watches"): the request that
    subscribes it (again, after a reconnect: from the revision after the last event
    delivered, so none is missed or repeated), and the events of each message."""

    def __init__(self, selector: Mapping[str, Any], start_revision: int) -> None:
        self.selector = dict(selector)
        self.next_revision = start_revision  # where to resume; 0 = "from now"
        self.closed = False

    def subscribe_request(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"op": "watch", **self.selector}
        if self.next_revision:
            fields["start_revision"] = self.next_revision
        return fields

    def subscribed(self, resp: Mapping[str, Any]) -> int:
        """The ``watch`` answer: its ``watch_id`` (InternalError if none)."""
        watch_id = resp.get("watch_id")
        if type(watch_id) is not int:
            raise InternalError("watch response without a watch_id")
        revision = resp.get("revision")
        if not self.next_revision and type(revision) is int:
            self.next_revision = revision + 1  # resume after the revision we started at
        return watch_id

    def events(self, msg: Mapping[str, Any]) -> list[WatchEvent]:
        """The events of one event message, in order; the server's error if it ended the
        watch (then the watch is closed)."""
        if "error" in msg:
            self.closed = True
            raise error_from_wire(msg["error"])
        raw_events = msg.get("events", [])
        if not isinstance(raw_events, list):
            raise InternalError("watch message without an events list")
        revision = msg.get("revision")
        out = []
        for raw in raw_events:
            ev = event_from_wire(raw)
            at = ev.kv.mod_revision or (revision if type(revision) is int else 0)
            self.next_revision = max(self.next_revision, at + 1)
            out.append(ev)
        return out


# ---------------------------------------------------------------- lease keepalives


FRACTION = 1 / 3  # renew at this fraction of the TTL, as etcd's client does
RETRY_CAP = 1.0  # seconds: the longest wait before a failed renewal is tried again


@dataclass
class _Kept:
    id: int
    interval: float  # renew this long after the last confirmed renewal was sent
    due: float  # when to send the next renewal
    deadline: float  # when the lease may have expired, as far as the client knows
    in_flight: bool = False
    failures: int = 0
    last_error: LiferaftError | None = None


class KeepAliveSchedule:
    """When to renew which lease, and which are lost (sans I/O: ``now`` is given).

    A lease is renewed every ``fraction`` of its TTL, counted from when the last renewal
    the cluster confirmed was *sent* (the server counts from when it received it, which
    is later, so the client's deadline errs early). When one lease is due, every lease due
    within the shortest renewal interval goes along, so leases of one TTL settle into one
    message per round. A lease whose deadline passes with no confirmed renewal is lost."""

    def __init__(self, fraction: float = FRACTION) -> None:
        if not 0 < fraction < 1:
            raise ValueError("fraction must be between 0 and 1")
        self.fraction = fraction
        self._leases: dict[int, _Kept] = {}

    def __contains__(self, lease_id: int) -> bool:
        return lease_id in self._leases

    @property
    def leases(self) -> list[int]:
        return list(self._leases)

    @property
    def in_flight(self) -> int:
        return sum(k.in_flight for k in self._leases.values())

    def add(
        self, lease_id: int, ttl: float | None, now: float, *, renewed_at: float | None = None
    ) -> None:
        """Keep ``lease_id``. With ``renewed_at`` (when the grant or last renewal was
        sent) and ``ttl`` its schedule is known; else it is renewed at once, and given
        ``ttl`` (or, unknown, ``ttl=None``: until a first answer) to answer."""
        if renewed_at is not None and ttl is not None:
            interval = ttl * self.fraction
            kept = _Kept(lease_id, interval, renewed_at + interval, renewed_at + ttl)
        else:
            deadline = now + ttl if ttl is not None else math.inf
            kept = _Kept(lease_id, 0.0, now, deadline)
        self._leases[lease_id] = kept

    def remove(self, lease_id: int) -> None:
        self._leases.pop(lease_id, None)

    def remove_all(self) -> list[int]:
        """Stop keeping every lease; returns their ids (to report them lost)."""
        ids, self._leases = list(self._leases), {}
        return ids

    def deadline(self, lease_id: int) -> float | None:
        kept = self._leases.get(lease_id)
        return kept.deadline if kept is not None else None

    def next_wakeup(self) -> float:
        """When something is next to do: a renewal due, or a deadline (inf: nothing)."""
        times = [k.deadline for k in self._leases.values()]
        times += [k.due for k in self._leases.values() if not k.in_flight]
        return min(times, default=math.inf)

    def take_due(self, now: float) -> list[int]:
        """The leases to renew now (marked in flight): none unless one is due; then
        every lease due before the next round would come."""
        idle = [k for k in self._leases.values() if not k.in_flight]
        if not any(k.due <= now for k in idle):
            return []
        known = [k.interval for k in self._leases.values() if k.interval > 0]
        horizon = now + min(known, default=0.0)
        out = []
        for k in idle:
            if k.due <= horizon:
                k.in_flight = True
                out.append(k.id)
        return out

    def renewed(self, lease_id: int, ttl: float, sent_at: float) -> None:
        """The renewal sent at ``sent_at`` was confirmed with ``ttl`` seconds left."""
        kept = self._leases.get(lease_id)
        if kept is None:
            return
        kept.in_flight = False
        kept.failures = 0
        kept.last_error = None
        kept.interval = ttl * self.fraction
        kept.due = sent_at + kept.interval
        kept.deadline = sent_at + ttl

    def failed(self, lease_id: int, now: float, error: LiferaftError) -> None:
        """A renewal failed without a verdict on the lease: try again soon (before its
        deadline, which stays where it was)."""
        kept = self._leases.get(lease_id)
        if kept is None:
            return
        kept.in_flight = False
        kept.failures += 1
        kept.last_error = error
        left = kept.deadline - now
        kept.due = now + min(RETRY_CAP, 0.05 * 2 ** min(kept.failures, 5), max(left / 4, 0.0))

    def expired(self, now: float) -> list[tuple[int, LiferaftError | None]]:
        """The leases whose deadline passed without a confirmed renewal (removed), each
        with the last error its renewals met."""
        gone = [(k.id, k.last_error) for k in self._leases.values() if k.deadline <= now]
        for lease_id, _ in gone:
            del self._leases[lease_id]
        return gone
