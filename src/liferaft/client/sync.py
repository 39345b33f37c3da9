"""A blocking wrapper around :class:`~liferaft.client.Client` for scripts and REPLs.

It runs a Trio event loop in a background thread that owns one connected Client; each
method hands the call to that loop with ``trio.from_thread.run`` and blocks until the
result (or the typed error) comes back::

    from liferaft.client import SyncClient

    with SyncClient(["wss://127.0.0.1:8001"], token=jwt, cacert="certs/ca.pem") as c:
        c.put("greeting", "hello")
        print(c.get("greeting").value)          # b'hello'
        with c.watch(prefix="jobs/") as events:
            for ev in events:                   # blocks until the next event
                print(ev.type, ev.kv.key)

Calls from several threads at once are fine: they run concurrently on the one loop and
are batched like concurrent tasks would be. Do not call it from inside a Trio run (use
the async Client there).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import trio

from liferaft.client.client import DEFAULT_MAX_MESSAGE_BYTES, Client
from liferaft.client.models import KeyValue, TxnResult, WatchEvent
from liferaft.client.watch import Watch
from liferaft.client.wire import MAX_BATCH

T = TypeVar("T")


class SyncClient:
    """The blocking twin of :class:`Client`: same methods, same errors. It connects in
    the constructor and must be closed (``close()`` or ``with``)."""

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        token: str,
        cacert: Path | str | None = None,
        timeout: float = 5.0,
        max_batch: int = MAX_BATCH,
        attempt_timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        reads: str = "leader",
    ) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._client: Client | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._closed = False

        async def main() -> None:
            try:
                client = await Client.connect(
                    endpoints,
                    token=token,
                    cacert=cacert,
                    timeout=timeout,
                    max_batch=max_batch,
                    attempt_timeout=attempt_timeout,
                    max_message_bytes=max_message_bytes,
                    reads=reads,
                )
            except BaseException as exc:  # handed to the constructor's thread
                self._error = exc
                self._ready.set()
                return
            self._client = client
            self._trio_token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await client.aclose()

        self._thread = threading.Thread(
            target=trio.run, args=(main,), name="liferaft-sync-client", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            error, self._error = self._error, None
            raise error

    def _run(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        if self._closed or self._trio_token is None:
            raise RuntimeError("the SyncClient is closed")

        async def call() -> T:
            return await fn(*args, **kwargs)

        return trio.from_thread.run(call, trio_token=self._trio_token)

    @property
    def client(self) -> Client:
        """The async Client underneath (for use on its own loop only)."""
        assert self._client is not None
        return self._client

    def close(self) -> None:
        """Close the connection and stop the background loop; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._trio_token is not None and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._trio_token)
        self._thread.join()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- the methods

    def put(self, key: str, value: bytes | str) -> int:
        """See :meth:`Client.put`."""
        return self._run(self.client.put, key, value)

    def put_many(self, items: Sequence[tuple[str, bytes | str]]) -> list[int]:
        """See :meth:`Client.put_many`."""
        return self._run(self.client.put_many, items)

    def get(self, key: str, *, serializable: bool = False, revision: int = 0) -> KeyValue | None:
        """See :meth:`Client.get`."""
        return self._run(self.client.get, key, serializable=serializable, revision=revision)

    def range(
        self,
        prefix: str,
        *,
        limit: int = 0,
        serializable: bool = False,
        after: str | None = None,
        revision: int = 0,
    ) -> tuple[list[KeyValue], bool]:
        """See :meth:`Client.range`."""
        return self._run(
            self.client.range,
            prefix,
            limit=limit,
            serializable=serializable,
            after=after,
            revision=revision,
        )

    def compact(self, revision: int) -> int:
        """See :meth:`Client.compact`."""
        return self._run(self.client.compact, revision)

    def delete(self, key: str | None = None, *, prefix: str | None = None) -> int:
        """See :meth:`Client.delete`."""
        return self._run(self.client.delete, key, prefix=prefix)

    def txn(
        self,
        compare: Sequence[Mapping[str, Any]] = (),
        success: Sequence[Mapping[str, Any]] = (),
        failure: Sequence[Mapping[str, Any]] = (),
    ) -> TxnResult:
        """See :meth:`Client.txn`."""
        return self._run(self.client.txn, compare, success, failure)

    def watch(
        self, key: str | None = None, *, prefix: str | None = None, start_revision: int = 0
    ) -> SyncWatch:
        """See :meth:`Client.watch`; iterate it in a ``with`` block."""
        w = self.client.watch(key, prefix=prefix, start_revision=start_revision)
        return SyncWatch(self, w)

    def status(self) -> dict[str, Any]:
        """See :meth:`Client.status`."""
        return self._run(self.client.status)

    def member_list(self) -> list[dict[str, Any]]:
        """See :meth:`Client.member_list`."""
        return self._run(self.client.member_list)

    def member_add(self, id: str, peer: str, client: str) -> list[dict[str, Any]]:
        """See :meth:`Client.member_add`."""
        return self._run(self.client.member_add, id, peer, client)

    def member_promote(self, id: str) -> list[dict[str, Any]]:
        """See :meth:`Client.member_promote`."""
        return self._run(self.client.member_promote, id)

    def member_remove(self, id: str) -> list[dict[str, Any]]:
        """See :meth:`Client.member_remove`."""
        return self._run(self.client.member_remove, id)

    def transfer_leader(self, to: str | None = None) -> str:
        """See :meth:`Client.transfer_leader`."""
        return self._run(self.client.transfer_leader, to)

    def refresh(self, token: str) -> None:
        """See :meth:`Client.refresh`."""
        self._run(self.client.refresh, token)


class SyncWatch:
    """A blocking iterator of :class:`WatchEvent`; a context manager that unwatches."""

    def __init__(self, owner: SyncClient, watch: Watch) -> None:
        self._owner = owner
        self._watch = watch

    def __enter__(self) -> SyncWatch:
        self._owner._run(self._watch.__aenter__)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[WatchEvent]:
        return self

    def __next__(self) -> WatchEvent:
        try:
            return self._owner._run(self._watch.__anext__)
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        """Stop watching."""
        if not self._owner._closed:
            self._owner._run(self._watch.aclose)
