"""A whole node as an operator runs it: the Raft node and its client API side by side."""

from __future__ import annotations

import trio

from liferaft.api.server import ClientServer
from liferaft.node.node import Node
from liferaft.observability.logs import node_context


async def serve(
    node: Node,
    *,
    listen: bool = True,
    task_status: trio.TaskStatus[ClientServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``node`` and its client listener until cancelled; ``started()`` gives the
    ClientServer once both listen. With ``listen=False`` (the whole-node simulator)
    clients reach the ClientServer only through ``serve_stream``."""
    api = ClientServer(node, node.settings)
    node.on_events.append(api.watch_hub.publish)
    node.on_restore = api.watch_hub.reset
    address = node.settings.client.listen
    # the API's tasks log as this node too, and record its errors for status
    with node_context(node.id, node.last_error):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            if listen:
                await nursery.start(api.run, address.host, address.port)
            task_status.started(api)


def reload_credentials(api: ClientServer) -> bool:
    """What SIGHUP does besides reopening the audit file: the node's certificate, key and
    CA, and the token keys, are read again and used for every new handshake and token
    check (docs/security.md, "Rotating certificates and keys"). Each half is refused on
    its own if its files are bad, keeping the old material; True when both took."""
    tls_ok = api.node.reload_tls()
    keys_ok = api.reload_token_keys()
    return tls_ok and keys_ok
