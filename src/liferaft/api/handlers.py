"""What each op does, given a node. One function per op family; each returns the result
fields of docs/client-protocol.md (without ``id``/``ok``) or raises ApiError."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from liferaft import __version__
from liferaft.api.errors import ApiError, invalid, unavailable
from liferaft.core import ConfChange, ConfChangeType, NotLeader, ProposalRefused, Role
from liferaft.kv.state import FutureRevision, StateDB
from liferaft.kv.watch import Compacted
from liferaft.node.lessor import LeaseNotFound
from liferaft.node.waiters import NodeStopped, ProposalDropped, ReadFailed

if TYPE_CHECKING:
    from liferaft.node.node import Node

T = TypeVar("T")

REQUEST_TIMEOUT = 5.0  # seconds a request may wait for the cluster before `unavailable`
INLINE_RANGE_LIMIT = 64  # a range with a limit up to this runs on the event loop, as a get


def not_leader(node: Node, leader: str | None) -> ApiError:
    """``not_leader`` with the leader's URL; with no leader known the cluster cannot take
    the request anywhere right now, which is ``unavailable``."""
    if leader is None:
        return unavailable("no leader is known (an election is under way or no quorum)")
    endpoint = node.client_endpoint(leader)
    extra = {"leader_endpoint": endpoint} if endpoint else {}
    return ApiError("not_leader", f"this node is not the leader (leader: {leader})", **extra)


async def _awaited_leader(node: Node) -> str | None:
    """During an election (or while the leader is out of reach, most likely dead): wait
    (up to two election timeouts) for a leader this node reaches."""
    return await node.wait_for_leader(2 * node.settings.raft.election_timeout_ms / 1000)


async def write_batch(node: Node, reqs: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """Replicate checked writes as one unit (with the batches of other connections that
    reach the core loop at the same time, in ONE log entry); returns each one's result
    from the state machine (a map with ``error`` for one that failed there), in order.
    ``size``: about their encoded bytes (the message's). The connection's usual path
    is ``api.writes`` (no task, no waiting); this one waits out elections.

    A follower answers ``not_leader`` with the leader's client URL (the client library
    follows it), rather than forwarding: forwarding would double the leader's work per
    request and hide a misrouted client's cost.
    """
    cmds = write_commands(reqs)
    try:
        with trio.fail_after(REQUEST_TIMEOUT):
            try:
                results = await node.propose_writes(cmds, size)
            except NotLeader as exc:
                leader = exc.leader
                if leader is None or not node.reaches(leader):
                    leader = await _awaited_leader(node)
                if leader != node.id:
                    raise NotLeader(leader) from None
                results = await node.propose_writes(cmds, size)  # elected meanwhile
    except Exception as exc:
        raise write_failure(node, exc) from None
    return write_results(results, len(reqs))


def write_commands(reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The log's commands of checked write requests: the request without its ``id``."""
    return [{k: v for k, v in req.items() if k != "id"} for req in reqs]


def write_results(results: object, count: int) -> list[dict[str, Any]]:
    """Each write's result from what the state machine returned for the batch."""
    if type(results) is list and len(results) == count:
        return results
    if isinstance(results, dict) and "error" in results:  # the entry as a whole failed
        return [results] * count
    raise ApiError("internal", "the state machine gave no result")


def write_failure(node: Node, exc: BaseException) -> ApiError:
    """The answer for writes whose proposal failed with ``exc``."""
    if isinstance(exc, NotLeader):
        return not_leader(node, exc.leader)
    if isinstance(exc, (ProposalDropped, ProposalRefused, NodeStopped, trio.TooSlowError)):
        return unavailable(f"the write may or may not have happened: {exc}")
    if isinstance(exc, ApiError):
        return exc
    raise exc


async def read(node: Node, req: dict[str, Any]) -> dict[str, Any]:
    """Linearizable unless ``serializable``: confirm the read index with a quorum (the
    leader does it; a follower asks the leader), wait to apply it, then read the state
    database: a get or a range of at most INLINE_RANGE_LIMIT keys right away (bounded
    and cheaper than a thread hop), anything larger on a reader thread (a big read
    never blocks the event loop)."""
    if not req.get("serializable", False):
        await confirm_read(node)
    revision = req.get("revision", 0)
    try:
        if req["op"] == "get":  # one indexed lookup: on the event loop
            key = req["key"]
            kv, current = await node.kv.read_small(lambda db: db.get(key, revision=revision))
            return {"kv": kv, "revision": current}
        prefix, limit, after = req["prefix"], req.get("limit", 0), req.get("after")

        def scan(db: StateDB) -> tuple[list[dict[str, Any]], bool, int]:
            return db.range(prefix, limit=limit, after=after, revision=revision)

        if 0 < limit <= INLINE_RANGE_LIMIT:
            kvs, more, current = await node.kv.read_small(scan)
        else:  # possibly the whole store: on a reader thread
            kvs, more, current = await node.kv.read(scan)
    except Compacted as exc:
        raise compacted(exc) from None
    except FutureRevision as exc:
        raise invalid(str(exc)) from None
    return {"kvs": kvs, "more": more, "revision": current}


async def confirm_read(node: Node) -> None:
    """Confirm the read index with a quorum and wait until it is applied: what is read
    next includes every write acknowledged before this call."""
    try:
        with trio.fail_after(REQUEST_TIMEOUT):
            try:
                await node.read_index()
            except (NotLeader, ReadFailed) as exc:
                # No leader known (NotLeader) or it was lost under the read
                # (ReadFailed): once the election is over, ask again.
                if isinstance(exc, NotLeader) and exc.leader is not None:
                    raise
                if await _awaited_leader(node) is None:
                    raise
                await node.read_index()
    except (ReadFailed, NotLeader, trio.TooSlowError) as exc:
        raise unavailable(f"could not confirm the read with a quorum: {exc}") from None


def compacted(exc: Compacted) -> ApiError:
    return ApiError(
        "compacted",
        f"revisions before {exc.compact_revision} are compacted",
        compact_revision=exc.compact_revision,
    )


def status(node: Node) -> dict[str, Any]:
    st = node.status()
    members = []
    for mid in sorted(st.membership.members):
        peer, client = node.addresses.get(mid, ("", ""))
        members.append(
            {"id": mid, "peer": peer, "client": client, "voter": mid in st.membership.voters}
        )
    return {
        "node_id": st.id,
        "role": st.role.value,
        "term": st.term,
        "leader_id": st.leader,
        "leader_endpoint": node.client_endpoint(st.leader) if st.leader else None,
        "commit_index": st.commit,
        "applied_index": node.applied,
        "revision": node.kv.db.revision,
        "members": members,
        "db_size": node.db_size,
        "version": __version__,
        "alarms": ["nospace"] if node.space.raised else [],
        "last_error": node.last_error.last,
    }


async def member_change(node: Node, req: dict[str, Any]) -> dict[str, Any]:
    op = req["op"]
    # The member is "member_id", since "id" is the request id (docs/client-protocol.md).
    mid = req.get("member_id")
    if not isinstance(mid, str) or not mid:
        raise invalid("member_id must be a node id")
    if op == "member_add":
        peer, client = req.get("peer"), req.get("client")
        if not isinstance(peer, str) or not isinstance(client, str):
            raise invalid("member_add needs peer and client addresses (host:port)")
        change = ConfChange(
            ConfChangeType.ADD_LEARNER if req.get("learner") else ConfChangeType.ADD_VOTER,
            mid,
            node.encode_addresses(peer, client),
        )
    elif op == "member_promote":
        change = ConfChange(ConfChangeType.PROMOTE, mid)
    else:
        change = ConfChange(ConfChangeType.REMOVE, mid)
    try:
        with trio.fail_after(REQUEST_TIMEOUT):
            if change.type is ConfChangeType.REMOVE and mid == node.id and _leads(node):
                # Removing the leader: hand leadership to the most caught-up voter first,
                # then send the client there to remove this node as a follower (no
                # leaderless gap; docs/operations.md, "Scaling a running cluster").
                raise NotLeader(await node.transfer_leadership(None))
            await node.change_membership(change)
    except NotLeader as exc:
        raise not_leader(node, exc.leader) from None
    except ProposalRefused as exc:
        raise ApiError("member_error", str(exc)) from None
    except (ProposalDropped, NodeStopped, trio.TooSlowError) as exc:
        raise unavailable(f"the change may or may not have happened: {exc}") from None
    return {"members": status(node)["members"]}


def _leads(node: Node) -> bool:
    return node.raft is not None and node.raft.role is Role.LEADER


async def transfer_leader(node: Node, req: dict[str, Any]) -> dict[str, Any]:
    to = req.get("to")
    if to is not None and not isinstance(to, str):
        raise invalid("to must be a node id")
    try:
        with trio.fail_after(REQUEST_TIMEOUT):
            leader = await node.transfer_leadership(to)
    except NotLeader as exc:
        raise not_leader(node, exc.leader) from None
    except ProposalRefused as exc:
        raise ApiError("member_error", str(exc)) from None
    except trio.TooSlowError:
        raise unavailable("leadership did not move in time") from None
    return {"leader_id": leader}


# ---------------------------------------------------------------- leases


async def lease_keepalive(node: Node, req: dict[str, Any]) -> dict[str, Any]:
    """Renew a lease at the leader."""
    lease = req["lease"]
    return {"ttl": await _at_leader(node, lease, lambda: node.lessor.keepalive(lease))}


async def lease_ttl(node: Node, req: dict[str, Any]) -> dict[str, Any]:
    """The TTL a lease has left, by the leader's clock (and its keys if asked)."""
    lease = req["lease"]
    left, granted = await _at_leader(node, lease, lambda: node.lessor.time_to_live(lease))
    out: dict[str, Any] = {"ttl": left, "granted_ttl": granted}
    if req.get("keys"):
        out["keys"] = await node.kv.read(lambda db: db.lease_keys(lease))
    return out


async def _at_leader(node: Node, lease: int, ask: Callable[[], Awaitable[T]]) -> T:
    """Ask the leader's lease clock, once a read index confirmed that this node leads
    (a deposed leader must not renew what the new one will expire); a follower answers
    not_leader at once."""
    try:
        _leader_only(node)
        await confirm_read(node)
        return await ask()
    except LeaseNotFound:
        raise ApiError("not_found", f"lease {lease:x} not found (expired or revoked)") from None
    except NotLeader as exc:
        raise not_leader(node, exc.leader) from None
    except trio.TooSlowError:
        raise unavailable("the leader could not answer for the lease now; retry") from None


async def lease_list(node: Node) -> dict[str, Any]:
    await confirm_read(node)
    leases = await node.kv.read(lambda db: db.leases())
    return {"leases": [lease for lease, _ttl, _left in leases]}


def _leader_only(node: Node) -> None:
    raft = node.raft
    if raft is None or raft.role is not Role.LEADER:
        raise NotLeader(raft.leader if raft is not None else None)
