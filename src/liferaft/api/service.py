"""A whole node as an operator runs it: the Raft node and its client API side by side."""

from __future__ import annotations

import trio

from liferaft.api.server import ClientServer
from liferaft.node.node import Node


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
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        if listen:
            await nursery.start(api.run, address.host, address.port)
        task_status.started(api)
