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

The verdicts and the back-off are the protocol core's (liferaft.client.core), shared with
the asyncio client; this module runs them on Trio against a ConnectionPool.

The attempt deadline of a single call on an open connection is kept by the connection's
timer, not by a cancel scope per request: the client's CPU per write should stay well
below what a node spends on it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import trio

from liferaft.client.connection import AttemptExpired, Connection, ConnectionLost, OnOk
from liferaft.client.core import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    Backoff,
    Retry,
    Tries,
    Verdict,
    on_connect_timeout,
    on_error,
    on_lost,
    on_silence,
    out_of_time,
)
from liferaft.client.errors import ConnectionFailed, LiferaftError
from liferaft.client.pool import ConnectionPool

__all__ = ["BACKOFF_BASE", "BACKOFF_CAP", "Retrier", "Retry", "Tries"]


class Retrier:
    """Runs requests over ``pool`` until they succeed, are refused, or run out of time.
    ``timeout`` bounds a call, retries included; ``attempt_timeout`` one try of it."""

    def __init__(
        self, pool: ConnectionPool, *, timeout: float, attempt_timeout: float, rng: random.Random
    ) -> None:
        self.pool = pool
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self._backoff = Backoff(rng)

    @property
    def rng(self) -> random.Random:
        """The jitter of back-offs: a seam for tests (it may be replaced)."""
        return self._backoff.rng

    @rng.setter
    def rng(self, rng: random.Random) -> None:
        self._backoff.rng = rng

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
                raise out_of_time(t, self.timeout)
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

    # The verdicts on a failed attempt, shared by request and put_many, are the protocol
    # core's (liferaft.client.core): each notes the error in ``t.last``; here the client
    # moves off ``conn`` as the verdict says, and raises the error when it is fatal.

    def _apply(self, conn: Connection, verdict: Verdict) -> bool:
        self.pool.apply(conn, verdict)
        if verdict.fatal:
            raise verdict.error
        return verdict.at_once

    def judge_lost(self, conn: Connection, exc: ConnectionLost, retry: Retry, t: Tries) -> None:
        verdict = on_lost(
            conn.endpoint.url, exc.reason, sent=exc.sent, too_big=exc.too_big, retry=retry, t=t
        )
        try:
            self._apply(conn, verdict)
        except LiferaftError as err:
            raise err from None

    def judge_error(
        self, conn: Connection, resp: Mapping[str, Any], retry: Retry, t: Tries
    ) -> bool:
        """True: retry at once (the first redirect), without a back-off."""
        return self._apply(conn, on_error(resp.get("error"), retry, t))

    def judge_silence(
        self, conn: Connection | None, retry: Retry, t: Tries, deadline: float
    ) -> None:
        """The attempt ran out of time (connecting, if ``conn`` is None, or waiting)."""
        if conn is not None:
            self._apply(conn, on_silence(conn.endpoint.url, self.attempt_timeout, retry, t))
        else:
            on_connect_timeout(
                self.attempt_timeout, t, cut_by_deadline=trio.current_time() >= deadline
            )

    def backoff_delay(self, failures: int) -> float:
        return self._backoff.delay(failures)

    async def backoff(self, failures: int, deadline: float) -> None:
        await trio.sleep_until(min(deadline, trio.current_time() + self.backoff_delay(failures)))
