"""put_many: many puts in one call (what it promises: :meth:`Client.put_many`).

Each put has its own seq; a turn's puts are queued at once and waited for once, and only
those that fail in a retriable way go again (together, with the same verdicts as a single
call's). One wake-up per turn instead of one per put is where the saving is: the client's
CPU per write should stay well below what a node spends on it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from liferaft.client.connection import Connection, ConnectionLost
from liferaft.client.errors import (
    ConnectionFailed,
    InvalidRequest,
    LiferaftError,
    TooLarge,
    Unavailable,
)
from liferaft.client.models import check_key, to_bytes, uint_from_wire
from liferaft.client.retry import Retrier, Retry, Tries
from liferaft.client.session import SessionWindow
from liferaft.client.wire import encode_request


async def put_many(
    items: Sequence[tuple[str, bytes | str]],
    *,
    retrier: Retrier,
    window: SessionWindow,
    session: bytes,
    max_message_bytes: int,
) -> list[int]:
    """The revision of each put of ``items``, in order, or the error of the first put that
    failed once every put is over; the puts go in turns as the session window allows."""
    if retrier.pool.closed:
        raise trio.ClosedResourceError("the client is closed")
    if isinstance(items, str | bytes | Mapping):
        raise InvalidRequest("items must be a sequence of (key, value) pairs")
    puts: list[tuple[str, bytes]] = []
    for item in items:
        pair = type(item) is tuple or (
            isinstance(item, Sequence) and not isinstance(item, str | bytes)
        )
        if not pair or len(item) != 2:
            raise InvalidRequest(f"put_many item {len(puts)}: not a (key, value) pair")
        key, value = item
        value = to_bytes(value)
        puts.append((check_key(key), value))
        if len(value) + 4 * len(key) + 128 > max_message_bytes:  # maybe too big
            _check_size(
                {"op": "put", "key": key, "value": value, "session": session},
                len(puts) - 1,
                max_message_bytes,
            )
    n = len(puts)
    revisions = [0] * n
    errors: dict[int, Exception] = {}
    done = 0
    while done < n:
        deadline = trio.current_time() + retrier.timeout
        try:
            seqs = await window.take(n - done, deadline)
        except Unavailable as exc:  # not sent: surely not applied
            errors.update(dict.fromkeys(range(done, n), exc))
            break
        try:
            requests = [
                {"op": "put", "key": key, "value": value, "session": session, "seq": seq}
                for (key, value), seq in zip(puts[done : done + len(seqs)], seqs, strict=True)
            ]
            await _put_turn(retrier, requests, done, deadline, revisions, errors)
        finally:
            window.release(seqs)
        done += len(seqs)
    if errors:
        first = min(errors)
        err = errors[first]
        if isinstance(err, LiferaftError):
            # A copy: the same error object may have failed other calls too (a
            # connection attempt shared by several), and the note is this call's.
            err = copy.copy(err)
            err.__notes__ = list(getattr(err, "__notes__", ()))
            err.add_note(
                f"put_many: {len(errors)} of {n} puts failed, the first of them "
                f"#{first} (key {puts[first][0]!r}); the other {n - len(errors)} succeeded"
            )
        raise err
    return revisions


def _check_size(request: dict[str, Any], index: int, max_message_bytes: int) -> None:
    """TooLarge if ``request`` cannot fit one message, whatever its id and seq: it is
    refused before any put of the call is sent."""
    biggest = {"id": 2**64 - 1, **request, "seq": 2**63 - 1}
    size = len(encode_request(biggest))
    if size > max_message_bytes:
        raise TooLarge(
            f"put_many item {index}: request of {size} bytes exceeds max_message_bytes "
            f"({max_message_bytes})"
        )


async def _put_turn(
    retrier: Retrier,
    requests: list[dict[str, Any]],
    base: int,
    deadline: float,
    revisions: list[int],
    errors: dict[int, Exception],
) -> None:
    """The puts ``requests`` (items ``base`` on of the call), all in one attempt on one
    connection; then the ones to retry, again together and in order, as
    :meth:`Retrier.request` retries one request (the same verdicts on each failure, one
    back-off for all), until ``deadline``."""
    pool = retrier.pool
    todo = list(range(len(requests)))  # the offsets of the puts still to do, in order
    tries: dict[int, Tries] = {}  # of the puts that failed an attempt
    failures = 0
    while True:
        now = trio.current_time()
        if now >= deadline:
            for off in todo:
                last = tries[off].last if off in tries else None
                errors[base + off] = last or Unavailable(f"no answer within {retrier.timeout:g}s")
            return
        conn: Connection | None = None
        batch = None
        failed: Exception | None = None  # what failed the attempt before any answer
        with trio.move_on_at(min(deadline, now + retrier.attempt_timeout)):
            try:
                conn = pool.conn
                if conn is None or not conn.alive or conn.retired:
                    conn = None
                    conn = await pool.connection()
                batch, group = conn.submit_many(
                    requests if len(todo) == len(requests) else [requests[o] for o in todo]
                )
                await conn.wait_all(batch, group)
            except (ConnectionFailed, ConnectionLost, TooLarge) as exc:
                failed = exc
        again: list[int] = []
        at_once = True  # every put to retry follows its first redirect: no back-off
        for i, off in enumerate(todo):
            p = batch[i] if batch is not None else None
            resp = p.response if p is not None else None
            try:
                if resp is not None and resp.get("ok") is True:
                    revisions[base + off] = uint_from_wire(resp, "revision")
                    continue
                t = tries.get(off)
                if t is None:
                    t = tries[off] = Tries()
                if resp is not None:
                    assert conn is not None
                    at_once &= retrier.judge_error(conn, resp, Retry.ALWAYS, t)
                else:
                    at_once = False
                    lost = p.error if p is not None else failed
                    if isinstance(lost, ConnectionLost):
                        assert conn is not None
                        retrier.judge_lost(conn, lost, Retry.ALWAYS, t)
                    elif isinstance(lost, LiferaftError):  # ConnectionFailed, TooLarge
                        if not isinstance(lost, ConnectionFailed):
                            raise lost
                        t.last = lost
                    else:
                        retrier.judge_silence(conn, Retry.ALWAYS, t, deadline)
            except LiferaftError as exc:  # refused: this put is over
                errors[base + off] = exc
                continue
            again.append(off)
        todo = again
        if not todo:
            return
        if not at_once:
            await retrier.backoff(failures, deadline)
            failures += 1
