"""JSON-lines logs: one parseable object per record, the right node id on every line
(even with several nodes in one process), and no secret ever written."""

from __future__ import annotations

import io
import itertools
import json
import logging
import re
from collections.abc import Iterator

import pytest
import trio
import trio.lowlevel

from liferaft.observability.logs import (
    REDACTED,
    bind_node,
    configure,
    current_node,
    event,
    format_ts,
    node_context,
    reset,
)

log = logging.getLogger("liferaft.test.logs")
RFC3339_MS_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    """Logging configured for process node "proc" into a buffer, undone afterwards."""
    buf = io.StringIO()
    configure("proc", stream=buf, level="DEBUG")
    try:
        yield buf
    finally:
        reset()


def lines(buf: io.StringIO) -> list[dict[str, object]]:
    text = buf.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_an_event_is_one_json_line_with_ts_level_node_msg_and_fields(out: io.StringIO) -> None:
    event(log, "leader_changed", term=3, leader="n2")

    (line,) = lines(out)
    assert RFC3339_MS_UTC.fullmatch(str(line["ts"]))
    assert line == {
        "ts": line["ts"],
        "level": "info",
        "node": "proc",
        "logger": "liferaft.test.logs",
        "msg": "leader_changed",
        "term": 3,
        "leader": "n2",
    }


def test_timestamps_are_rfc3339_utc_with_milliseconds() -> None:
    assert format_ts(0.5) == "1970-01-01T00:00:00.500Z"
    assert format_ts(1714564800.123456) == "2024-05-01T12:00:00.123Z"


def test_a_timestamp_is_right_whichever_second_came_before_it() -> None:
    """The text of a second is reused until the next one; records of threads may come
    out of order, so going back a second must not reuse the later one."""
    seq = [1714564800.125, 1714564800.875, 1714564801.0, 1714564800.5, 1714564861.25]
    assert [format_ts(t) for t in seq] == [
        "2024-05-01T12:00:00.125Z",
        "2024-05-01T12:00:00.875Z",
        "2024-05-01T12:00:01.000Z",
        "2024-05-01T12:00:00.500Z",
        "2024-05-01T12:01:01.250Z",
    ]


def test_plain_logger_calls_and_extra_fields_are_json_too(out: io.StringIO) -> None:
    log.warning("disk %s%% full", 91, extra={"peer": "n3"})

    (line,) = lines(out)
    assert (line["level"], line["msg"], line["peer"], line["node"]) == (
        "warning",
        "disk 91% full",
        "n3",
        "proc",
    )


def test_levels_exceptions_and_odd_values(out: io.StringIO) -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError as exc:
        event(log, "apply_failed", level=logging.ERROR, exc_info=True, error=exc)
    event(
        log,
        "odd",
        name="n4",  # LogRecord has a `name`: must not clash
        args=[1, 2],
        msg="shadowed",  # a base key: written as msg_
        ratio=float("nan"),
        when={"a": (1, 2)},
        blob=b"\x00" * 10,
    )

    first, second = lines(out)
    assert (first["level"], first["msg"], first["error"]) == (
        "error",
        "apply_failed",
        "ValueError: bad\nthing",
    )
    assert "Traceback" in str(first["exc"])
    assert second["msg"] == "odd"
    assert (second["name"], second["args"], second["msg_"]) == ("n4", [1, 2], "shadowed")
    assert (second["ratio"], second["when"], second["blob"]) == ("nan", {"a": [1, 2]}, "<10 bytes>")


def test_records_below_the_level_are_dropped() -> None:
    buf = io.StringIO()
    configure("n1", stream=buf, level="warning")
    try:
        event(log, "chatty")
        event(log, "loud", level=logging.WARNING)
    finally:
        reset()
    assert [line["msg"] for line in lines(buf)] == ["loud"]


def test_configure_twice_replaces_rather_than_duplicates() -> None:
    first, second = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers)
    configure("n1", stream=first)
    configure("n2", stream=second)
    try:
        event(log, "once")
    finally:
        reset()
    assert first.getvalue() == ""
    assert [(line["node"], line["msg"]) for line in lines(second)] == [("n2", "once")]
    assert root.handlers == before


async def test_two_nodes_running_concurrently_log_their_own_ids(out: io.StringIO) -> None:
    """Each node binds its id at the root of its task tree; children inherit it."""

    async def chatter(origin: str, i: int) -> None:
        for step in range(20):
            event(log, "tick", origin=origin, task=i, step=step)
            await trio.lowlevel.checkpoint()

    async def node(node_id: str) -> None:
        with node_context(node_id):
            assert current_node() == node_id
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(chatter, node_id, i)
                logging.getLogger("liferaft.test.plain").info("plain call from %s", node_id)

    async def unbound() -> None:
        event(log, "tick", origin="proc", task=0, step=0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(node, "n1")
        nursery.start_soon(node, "n2")
        nursery.start_soon(unbound)

    records = lines(out)
    ticks = [r for r in records if r["msg"] == "tick"]
    assert len(ticks) == 2 * 3 * 20 + 1
    assert all(r["node"] == r["origin"] for r in ticks)
    # the two nodes really did interleave
    order = [r["node"] for r in ticks if r["node"] != "proc"]
    assert any(a != b for a, b in itertools.pairwise(order))
    plain = {str(r["msg"]): r["node"] for r in records if r["logger"] == "liferaft.test.plain"}
    assert plain == {"plain call from n1": "n1", "plain call from n2": "n2"}
    assert current_node() is None  # node_context undid itself


async def test_bind_node_in_a_task_does_not_leak_to_its_siblings(out: io.StringIO) -> None:
    async def bound() -> None:
        bind_node("n7")
        event(log, "mine")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bound)
    event(log, "theirs")
    assert [(r["msg"], r["node"]) for r in lines(out)] == [("mine", "n7"), ("theirs", "proc")]


def test_an_explicit_node_on_the_record_wins(out: io.StringIO) -> None:
    with node_context("n1"):
        log.info("relayed", extra={"node": "n9"})
    assert lines(out)[0]["node"] == "n9"


def test_a_logger_adapter_passes_its_extra_as_fields(out: io.StringIO) -> None:
    adapter = logging.LoggerAdapter(log, {"peer": "n2"})
    event(adapter, "peer_connected", attempt=2)
    (line,) = lines(out)
    assert (line["msg"], line["peer"], line["attempt"]) == ("peer_connected", "n2", 2)


# -------------------------------------------------------------------- secrets


def test_secret_fields_are_masked_in_any_case_and_at_any_depth(out: io.StringIO) -> None:
    original: dict[str, object] = {
        "Token": "eyJhbGciOi",
        "AUTHORIZATION": "Bearer abc",
        "password": "hunter2",
        "key": "/users/alice",  # a store key: shown (the audit log needs it)
        "private_key": "-----BEGIN PRIVATE KEY-----",
        "Value": b"salary",
        "peer": "n2",
        "request": {"op": "put", "key": "k", "value": "v", "nested": [{"token": "t"}]},
    }
    event(log, "fields", **original)
    (line,) = lines(out)
    masked = {k: v for k, v in line.items() if k not in ("ts", "level", "node", "logger", "msg")}
    assert masked == {
        "Token": REDACTED,
        "AUTHORIZATION": REDACTED,
        "password": REDACTED,
        "key": "/users/alice",
        "private_key": REDACTED,
        "Value": REDACTED,
        "peer": "n2",
        "request": {
            "op": "put",
            "key": "k",
            "value": REDACTED,
            "nested": [{"token": REDACTED}],
        },
    }
    assert original["password"] == "hunter2"  # a copy: the input is untouched


def test_secrets_never_reach_the_log_line(out: io.StringIO) -> None:
    secrets = ["eyJhbGciOiJFUzI1NiJ9.secret", "Bearer s3cr3t", "hunter2", "-----BEGIN", "v4lue"]
    event(
        log,
        "put_rejected",
        token=secrets[0],
        Authorization=secrets[1],
        PASSWORD=secrets[2],
        private_key=secrets[3],
        value=secrets[4],
        request={"value": secrets[4], "op": "put"},
        peer="n2",
    )
    log.info("handshake", extra={"authorization": secrets[1]})

    text = out.getvalue()
    for secret in secrets:
        assert secret not in text
    first, second = lines(out)
    assert first["token"] == first["private_key"] == first["value"] == REDACTED
    assert first["request"] == {"value": REDACTED, "op": "put"}
    assert first["peer"] == "n2"
    assert second["authorization"] == REDACTED
