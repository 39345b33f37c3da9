"""Retries and redirects (docs/client-protocol.md, "Writes, sessions and retries").

A call's life: take the current connection (or open one to the next endpoint, shared by
every call that needs it), queue the request, wait for its response under the attempt
timeout. On ``not_leader`` with a ``leader_endpoint`` the client moves to that endpoint
(at once the first time); on ``unavailable``, a lost connection or a timeout it moves to
the next endpoint and waits a jittered, capped exponential back-off; all within the
call's ``timeout``. Writes with a session may be retried after any of these failures,
since the server runs a session's seq at most once. Membership changes and leader
transfers have no session: they are retried only when the server surely did not run
them (no connection, not sent, ``not_leader``).

The attempt deadline of a single call on an open connection is kept by the connection's
timer, not by a cancel scope per request: the client's CPU per write should stay well
below what a node spends on it.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from typing import Any

import trio

from liferaft.client.connection import AttemptExpired, Connection, ConnectionLost, OnOk
from liferaft.client.errors import (
    ConnectionFailed,
    LiferaftError,
    NotLeader,
    TooLarge,
    Unavailable,
    error_from_wire,
)
from liferaft.client.pool import ConnectionPool
from liferaft.client.wire import Endpoint, parse_endpoint

BACKOFF_BASE = 0.05  # seconds: the first retry waits 25-50 ms, doubling up to the cap
BACKOFF_CAP = 1.0


class Retry(enum.Enum):
    ALWAYS = "always"  # reads, and writes with a session: any failure may be retried
    SAFE = "safe"  # no session: only when the server surely did not run the request


class Tries:
    """How the attempts of one request went so far."""

    __slots__ = ("failures", "last", "redirects")

    def __init__(self) -> None:
        self.failures = 0  # attempts followed by a back-off
        self.redirects = 0  # not_leader answers with a leader_endpoint
        self.last: LiferaftError | None = None  # the error to raise at the deadline


class Retrier:
    """Runs requests over ``pool`` until they succeed, are refused, or run out of time.
    ``timeout`` bounds a call, retries included; ``attempt_timeout`` one try of it."""

    def __init__(
        self, pool: ConnectionPool, *, timeout: float, attempt_timeout: float, rng: random.Random
    ) -> None:
        self.pool = pool
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.rng = rng  # the jitter of back-offs: a seam for tests

    async def first_connection(self) -> None:
        """Connect within ``timeout``, so that a bad token, a bad CA or an unreachable
        cluster shows up when the client is opened, not at its first call."""
        deadline = trio.current_time() + self.timeout
        failures = 0
        last: ConnectionFailed | None = None
        while True:
            try:
                with trio.fail_at(deadline):
                    await self.pool.connection()
                return
            except trio.TooSlowError:
                urls = ", ".join(e.url for e in self.pool.endpoints)
                why = f"; last error: {last.message}" if last is not None else ""
                raise ConnectionFailed(
                    f"cannot connect to any endpoint within {self.timeout:g}s ({urls}){why}"
                ) from None
            except ConnectionFailed as exc:
                last = exc
                if trio.current_time() + self.backoff_delay(failures) >= deadline:
                    raise ConnectionFailed(
                        f"{exc.message} (and no endpoint connected within {self.timeout:g}s)"
                    ) from None
                await self.backoff(failures, deadline)
                failures += 1

    async def request(
        self,
        fields: Mapping[str, Any],
        *,
        retry: Retry = Retry.ALWAYS,
        on_ok: OnOk | None = None,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """The success response to ``fields``, retried per ``retry`` until ``deadline``
        (default: ``timeout`` from now)."""
        pool = self.pool
        if pool.closed:
            raise trio.ClosedResourceError("the client is closed")
        if deadline is None:
            deadline = trio.current_time() + self.timeout
        t = Tries()
        while True:
            now = trio.current_time()
            if now >= deadline:
                raise t.last or Unavailable(f"no answer within {self.timeout:g}s")
            conn = pool.conn
            if (
                conn is not None
                and conn.alive
                and not conn.retired
                and now + self.attempt_timeout <= deadline
            ):
                # The common case, without a cancel scope: a connection is up and the
                # attempt ends before the call's deadline, so the connection's timer can
                # keep the attempt's deadline (AttemptExpired).
                try:
                    resp = await conn.wait(conn.submit(fields, on_ok=on_ok, timed=True))
                except ConnectionLost as exc:
                    self.judge_lost(conn, exc, retry, t)
                except AttemptExpired:
                    self.judge_silence(conn, retry, t, deadline)
                else:
                    if resp.get("ok") is True:
                        return resp
                    if self.judge_error(conn, resp, retry, t):
                        continue  # follow the first redirect at once
                await self.backoff(t.failures, deadline)
                t.failures += 1
                continue
            conn = None
            with trio.move_on_at(min(deadline, now + self.attempt_timeout)) as attempt:
                try:
                    conn = await pool.connection()
                    resp = await conn.wait(conn.submit(fields, on_ok=on_ok))
                except ConnectionFailed as exc:  # nothing was sent
                    t.last = exc
                except ConnectionLost as exc:
                    assert conn is not None
                    self.judge_lost(conn, exc, retry, t)
                else:
                    if resp.get("ok") is True:
                        return resp
                    if self.judge_error(conn, resp, retry, t):
                        continue  # follow the first redirect at once
            if attempt.cancelled_caught:
                self.judge_silence(conn, retry, t, deadline)
            await self.backoff(t.failures, deadline)
            t.failures += 1

    # The verdicts on a failed attempt, shared by request and put_many: each notes the
    # error in ``t.last`` and moves the client off ``conn`` as the failure calls for, or
    # raises the error when it must not be retried.

    def judge_lost(self, conn: Connection, exc: ConnectionLost, retry: Retry, t: Tries) -> None:
        self.pool.lost(conn)
        if exc.too_big:
            raise TooLarge(f"{conn.endpoint.url} refused a message as too big") from None
        t.last = ConnectionFailed(f"{conn.endpoint.url}: {exc.reason}")
        if exc.sent and retry is Retry.SAFE:
            raise t.last from None

    def judge_error(
        self, conn: Connection, resp: Mapping[str, Any], retry: Retry, t: Tries
    ) -> bool:
        """True: retry at once (the first redirect), without a back-off."""
        err = error_from_wire(resp.get("error"))
        if isinstance(err, NotLeader):
            t.last = err
            leader = _parse_or_none(err.leader_endpoint)
            if leader is not None:
                self.pool.redirect(conn, leader)
                t.redirects += 1
                return t.redirects == 1
            self.pool.rotate(conn)
        elif isinstance(err, Unavailable) and retry is Retry.ALWAYS:
            t.last = err
            self.pool.rotate(conn)
        else:
            raise err
        return False

    def judge_silence(
        self, conn: Connection | None, retry: Retry, t: Tries, deadline: float
    ) -> None:
        """The attempt ran out of time (connecting, if ``conn`` is None, or waiting)."""
        if conn is not None:
            t.last = Unavailable(
                f"no answer from {conn.endpoint.url} within {self.attempt_timeout:g}s"
            )
            self.pool.rotate(conn)
            if retry is Retry.SAFE:
                raise t.last
        elif t.last is None or trio.current_time() < deadline:
            # (cut short by the call's deadline, the error before it says more)
            t.last = ConnectionFailed(
                f"cannot connect to an endpoint within {self.attempt_timeout:g}s"
            )

    def backoff_delay(self, failures: int) -> float:
        cap = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(failures, 16))
        return cap / 2 + self.rng.uniform(0, cap / 2)  # "equal jitter": never ~0

    async def backoff(self, failures: int, deadline: float) -> None:
        await trio.sleep_until(min(deadline, trio.current_time() + self.backoff_delay(failures)))


def _parse_or_none(url: str | None) -> Endpoint | None:
    if not url:
        return None
    try:
        return parse_endpoint(url)
    except ValueError:
        return None
