"""Counters the peer transport keeps for metrics, and its logging hook.

Plain integers and Counters, read by the node's metrics collector; nothing here knows
about Prometheus. Log events carry only ids, addresses, reasons and sizes: never a key,
a certificate or a payload.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

LogFn = Callable[[str, dict[str, object]], None]

_logger = logging.getLogger("liferaft.transport")


def default_log(event: str, fields: dict[str, object]) -> None:
    _logger.info("%s %s", event, fields)


@dataclass(slots=True)
class TransportStats:
    sent_bytes: Counter[str] = field(default_factory=Counter)  # peer -> payload bytes
    sent_batches: Counter[str] = field(default_factory=Counter)  # peer -> WebSocket messages
    received_bytes: Counter[str] = field(default_factory=Counter)
    received_batches: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)  # peer -> peer messages dropped
    dropped_unknown: int = 0  # messages addressed to a node that is not a peer
    connects: int = 0  # outgoing links established
    connect_failures: Counter[str] = field(default_factory=Counter)  # peer -> failed dials
    disconnects: Counter[str] = field(default_factory=Counter)  # peer -> outgoing links lost
    accepts: int = 0  # incoming links authenticated and upgraded
    rejects: Counter[str] = field(default_factory=Counter)  # reason -> incoming refused
    closes: Counter[str] = field(default_factory=Counter)  # reason -> incoming closed by us
