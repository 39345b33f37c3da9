"""Typed errors: one class per error code of docs/client-protocol.md, plus the client's own
failures.

Every error the client raises for a request derives from :class:`LiferaftError` and carries
the wire ``code``, the server's ``message`` and any extra fields of the error map in
``details``::

    try:
        await client.put("k", b"v")
    except PermissionDenied as exc:
        print("not allowed:", exc.message)
    except Unavailable:
        print("no quorum, or no endpoint answered before the deadline")

Which errors the client retries by itself (with the same session and seq for writes):
``not_leader``, ``unavailable``, a lost connection and an attempt that timed out. What
reaches the caller is the last of those once the call's deadline has passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class LiferaftError(Exception):
    """Base class: a request failed. ``code`` is the protocol's error code (or the
    client's own ``tls``), ``message`` a human-readable reason."""

    code: str = "error"

    def __init__(self, message: str = "", *, code: str | None = None, **details: Any) -> None:
        super().__init__(message or self.code)
        if code is not None:
            self.code = code
        self.message = message
        self.details: dict[str, Any] = details

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code


class InvalidRequest(LiferaftError):
    """The request was malformed (bad key, wrong field type, unknown op)."""

    code = "invalid_request"


class TooLarge(LiferaftError):
    """The request (or the message carrying it) is over the server's size limit."""

    code = "too_large"


class Unauthenticated(LiferaftError):
    """The token was refused: HTTP 401 at the handshake, or it expired on a live
    connection (call ``Client.refresh`` with a new one)."""

    code = "unauthenticated"


class PermissionDenied(LiferaftError):
    """The token is valid but its roles or key prefixes do not allow the request."""

    code = "permission_denied"


class NotLeader(LiferaftError):
    """The node is not the leader; ``leader_endpoint`` is the leader's client URL if known.
    The client follows it by itself, so callers see this only when the deadline ran out."""

    code = "not_leader"

    @property
    def leader_endpoint(self) -> str | None:
        value = self.details.get("leader_endpoint")
        return value if isinstance(value, str) and value else None


class Unavailable(LiferaftError):
    """No quorum, a timeout, or no endpoint could be reached before the deadline. A write
    that failed this way was sent with a session, so retrying it later with a new call is
    safe but may apply it (the earlier attempt may have committed)."""

    code = "unavailable"


class ConnectionFailed(Unavailable):
    """No endpoint accepted a connection (refused, reset, TLS handshake or upgrade failed)
    or the connection broke, before the deadline. ``code`` stays ``unavailable``."""


class TLSError(LiferaftError):
    """The server's certificate did not verify against ``cacert`` or does not name the
    host in the endpoint URL: a configuration error, not retried."""

    code = "tls"


class Compacted(LiferaftError):
    """The requested revision was compacted away; ``compact_revision`` is the oldest
    revision still available, when the server says."""

    code = "compacted"

    @property
    def compact_revision(self) -> int | None:
        value = self.details.get("compact_revision")
        return value if type(value) is int else None


class MemberError(LiferaftError):
    """A membership change was refused (unknown id, already a member, change in progress)."""

    code = "member_error"


class NotFound(LiferaftError):
    """The lease named does not exist: never granted, revoked, or expired (a lease op, or
    a put with that lease). Not retried: the lease and its keys are gone."""

    code = "not_found"


class LeaseLost(LiferaftError):
    """The client's own verdict that a lease it was keeping alive is gone: the cluster
    said ``not_found``, or no renewal was confirmed within its TTL (so it may have
    expired). Whatever the lease guarded (a lock, a leadership) must be taken as lost:
    another holder may already have it. ``lease`` is the lease's id."""

    code = "lease_lost"

    @property
    def lease(self) -> int | None:
        value = self.details.get("lease")
        return value if type(value) is int else None


class NoSpace(LiferaftError):
    """The leader's disk is nearly full: it refuses writes that would grow the store
    (puts, transactions with puts) until space returns; reads, deletes and compaction
    still work. Not retried: space comes back only when someone frees it."""

    code = "no_space"


class InternalError(LiferaftError):
    """The server failed, or it sent something this client cannot understand."""

    code = "internal"


_BY_CODE: dict[str, type[LiferaftError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        TooLarge,
        Unauthenticated,
        PermissionDenied,
        NotLeader,
        Unavailable,
        Compacted,
        MemberError,
        NotFound,
        NoSpace,
        InternalError,
    )
}


def error_from_wire(error: object) -> LiferaftError:
    """The typed error for a response's ``error`` map ``{"code", "message", ...}``.

    >>> error_from_wire({"code": "compacted", "message": "gone", "compact_revision": 7})
    Compacted('gone')
    >>> error_from_wire({"code": "mystery", "message": "?"}).code
    'mystery'
    """
    if not isinstance(error, Mapping):
        return InternalError(f"malformed error in response: {error!r:.100}")
    code = error.get("code")
    message = error.get("message")
    text = message if isinstance(message, str) else ""
    details = {str(k): v for k, v in error.items() if k not in ("code", "message")}
    if not isinstance(code, str) or not code:
        return InternalError(text or f"error without a code: {error!r:.100}", **details)
    cls = _BY_CODE.get(code)
    if cls is None:  # a code from a newer server: keep it, untyped
        return LiferaftError(text, code=code, **details)
    return cls(text, **details)
