"""The asyncio client against the fake server (tests/client/fakeserver.py), which runs on
Trio in a thread of its own: what the real cluster cannot show, the requests on the wire
(batching, the session and seq of every retry, where a redirect goes) and every error
code mapped to the Trio client's classes."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from fakeserver import TOKEN, FakeCluster, make_certs

import liferaft.client
import liferaft.client.aio
from liferaft.client import (
    LOCK_PREFIX,
    Client,
    Compacted,
    InternalError,
    InvalidRequest,
    LeaseLost,
    LiferaftError,
    LockLost,
    MemberError,
    NotElected,
    NotFound,
    PermissionDenied,
    Status,
    TooLarge,
    Unauthenticated,
)
from liferaft.client.aio import AsyncioClient, Election, Lock, open_client


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("aio-certs")
    make_certs(d)
    return d


class Fake:
    """A FakeCluster served by a Trio loop in a thread; ``call`` runs a function there."""

    def __init__(self, cluster: FakeCluster, token: trio.lowlevel.TrioToken) -> None:
        self.cluster = cluster
        self.token = token

    def call(self, fn: Callable[[], Any]) -> Any:
        return trio.from_thread.run_sync(fn, trio_token=self.token)

    def open(self, *nodes: str, **kw: Any) -> Any:
        urls = [self.cluster[n].url for n in nodes] if nodes else self.cluster.urls[:1]
        kw.setdefault("cacert", self.certs / "ca.pem")
        return open_client(urls, token=TOKEN, **kw)

    certs: Path


@pytest.fixture
def fake(certs: Path) -> Iterator[Fake]:
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            box["cluster"] = await FakeCluster(certs).start(nursery)
            box["token"] = trio.lowlevel.current_trio_token()
            box["scope"] = nursery.cancel_scope
            ready.set()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    assert ready.wait(30)
    f = Fake(box["cluster"], box["token"])
    f.certs = certs
    try:
        yield f
    finally:
        trio.from_thread.run_sync(box["scope"].cancel, trio_token=box["token"])
        thread.join(10)


def test_concurrent_writes_share_a_message_and_retries_keep_session_and_seq(fake: Fake) -> None:
    n1, n2 = fake.cluster["n1"], fake.cluster["n2"]

    async def main() -> None:
        async with fake.open("n1", "n2") as c:
            assert isinstance(c, AsyncioClient)
            revs = await asyncio.gather(*(c.put(f"k/{i}", b"v") for i in range(50)))
            assert sorted(revs) == list(range(1, 51))
            fake.call(lambda: n1.inject("unavailable", op="put"))
            await c.put("again", b"v")  # n1: unavailable; then n2, the next endpoint
            assert c.endpoint == n2.url + "/v1"
            fake.call(lambda: n2.inject("drop", op="put", apply=True))  # answer lost
            await c.put("once", b"v")  # n2 applied it; the retry at n1 gets that result
            assert c.endpoint == n1.url + "/v1"
            assert (await c.get("once")) is not None
            st = await c.status()
            assert isinstance(st, Status) and st.node_id in ("n1", "n2")

    asyncio.run(main())
    puts = [m for m in n1.messages if isinstance(m, list) and m and m[0]["op"] == "put"]
    assert sum(len(m) for m in puts[:3]) == 50  # 50 puts in at most three messages
    sent = [r for n in (n1, n2) for r in n.requests if r["op"] == "put"]
    again = [r for r in sent if r["key"] == "again"]
    once = [r for r in sent if r["key"] == "once"]
    assert len(again) == 2 and len({(r["session"], r["seq"]) for r in again}) == 1
    assert len(once) == 2 and len({(r["session"], r["seq"]) for r in once}) == 1
    assert again[0]["seq"] != once[0]["seq"]
    assert len(fake.cluster.store.applied) == 52  # each write applied once


def test_not_leader_is_followed_and_a_watch_resumes_after_a_drop(fake: Fake) -> None:
    n1, n2 = fake.cluster["n1"], fake.cluster["n2"]

    async def main() -> None:
        async with fake.open("n1") as c:
            fake.call(lambda: n1.inject("not_leader", op="put", leader_endpoint=n2.url))
            await c.put("moved", b"v")
            assert c.endpoint == n2.url + "/v1"  # the leader's address, not in the list
            async with c.watch(prefix="r/") as events:
                await c.put("r/1", b"1")
                assert (await events.__anext__()).kv.key == "r/1"
                await trio_call(fake, n2.drop_all)
                await c.put("r/2", b"2")
                await c.put("r/3", b"3")
                keys = [(await events.__anext__()).kv.key for _ in range(2)]
            assert keys == ["r/2", "r/3"]

    asyncio.run(main())
    # subscribed at n2 (the leader it was sent to), then again at n1 from after r/1
    first = [r for r in n2.requests if r["op"] == "watch"]
    again = [r for r in n1.requests if r["op"] == "watch"]
    assert len(first) == len(again) == 1 and "start_revision" not in first[0]
    assert again[0]["start_revision"] == 3


async def trio_call(fake: Fake, fn: Callable[[], Any]) -> None:
    """Run the Trio coroutine function ``fn`` in the fake's loop (from a thread)."""
    await asyncio.to_thread(trio.from_thread.run, fn, trio_token=fake.token)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("invalid_request", InvalidRequest),
        ("too_large", TooLarge),
        ("unauthenticated", Unauthenticated),
        ("permission_denied", PermissionDenied),
        ("compacted", Compacted),
        ("member_error", MemberError),
        ("not_found", NotFound),
        ("internal", InternalError),
    ],
)
def test_error_codes_are_typed_as_on_trio(fake: Fake, code: str, cls: type[LiferaftError]) -> None:
    async def main() -> None:
        async with fake.open() as c:
            fake.call(lambda: fake.cluster["n1"].inject("error", code=code, compact_revision=7))
            with pytest.raises(cls) as info:
                await c.put("k", b"v")
            assert info.value.code == code and "injected" in info.value.message

    asyncio.run(main())
    assert len([r for r in fake.cluster["n1"].requests if r["op"] == "put"]) == 1  # not retried


def test_a_bad_token_is_unauthenticated(fake: Fake) -> None:
    async def main() -> None:
        with pytest.raises(Unauthenticated):
            await AsyncioClient.connect(
                fake.cluster.urls, token="wrong", cacert=fake.certs / "ca.pem", timeout=2
            )

    asyncio.run(main())


def test_a_lost_lease_cancels_the_keep_alive_block_with_lease_lost(fake: Fake) -> None:
    async def main() -> None:
        async with fake.open() as c:
            lease = await c.lease_grant(1)
            ka = c.keep_alive(lease)
            with pytest.raises(LeaseLost) as info:
                async with ka:
                    await asyncio.sleep(0.5)  # renewed (at once, then every 1/3 s)
                    assert not ka.lost.is_set()
                    fake.call(lambda: fake.cluster.store.expire(lease.id))
                    await asyncio.sleep(5)  # cancelled at the next renewal
            assert info.value.lease == lease.id and ka.lost.is_set()
            assert await c.put("after", b"v") > 0  # the client goes on

    asyncio.run(main())


def test_a_client_closed_under_its_keeper_reports_the_lease_lost(fake: Fake) -> None:
    async def main() -> None:
        async with fake.open() as c:
            lease = await c.lease_grant(60)
            ka = c.keep_alive(lease)
            with pytest.raises(LeaseLost) as info:
                async with asyncio.timeout(30), ka:
                    await c.aclose()
                    await asyncio.sleep(30)  # cancelled by the loss
            assert "client was closed" in str(info.value)
            assert ka.lost.is_set() and list(ka.lost_leases) == [lease.id]

    asyncio.run(main())


def keys_under(fake: Fake, prefix: str) -> list[str]:
    """The keys under ``prefix`` in the fake store, oldest first."""
    data = fake.call(lambda: dict(fake.cluster.store.data))
    kvs = sorted(
        (kv for k, kv in data.items() if k.startswith(prefix)), key=lambda kv: kv["create_revision"]
    )
    return [kv["key"] for kv in kvs]


async def until(fake: Fake, done: Callable[[], bool]) -> None:
    """Poll ``done`` (it may call into the fake) until true; a hang guard of 30 s."""
    async with asyncio.timeout(30):
        while not done():  # noqa: ASYNC110 - polls the fake and the contenders
            await asyncio.sleep(0.01)


def test_lock_waiters_watch_their_predecessor_and_take_turns(fake: Fake) -> None:
    """Three contenders on asyncio queue in create_revision order; each waiter watches
    only its predecessor's key; the sections never overlap; tokens grow; every lease is
    revoked at the end."""
    pfx = LOCK_PREFIX + "job/"

    async def main() -> None:
        holder: list[int] = []
        tokens: list[int] = []
        release = [asyncio.Event() for _ in range(3)]
        async with fake.open() as c:
            locks = [Lock(c, "job") for _ in range(3)]

            async def contender(i: int) -> None:
                async with locks[i] as lock:
                    assert not holder
                    holder.append(i)
                    tokens.append(lock.token)
                    await release[i].wait()
                    holder.remove(i)

            tasks = []
            for i in range(3):
                tasks.append(asyncio.create_task(contender(i)))
                await until(fake, lambda i=i: len(keys_under(fake, pfx)) == i + 1)
            await until(fake, lambda: locks[2].watching is not None)
            assert locks[1].watching == locks[0].key and locks[2].watching == locks[1].key
            for i in range(3):
                await until(fake, lambda i=i: len(tokens) == i + 1)
                release[i].set()
            await asyncio.gather(*tasks)
        assert tokens == sorted(set(tokens)) and len(tokens) == 3
        assert [lock.watches for lock in locks] == [0, 1, 1]
        assert (
            keys_under(fake, pfx) == [] and fake.call(lambda: dict(fake.cluster.store.leases)) == {}
        )

    asyncio.run(main())


def test_a_lost_lock_cancels_the_holder_with_lock_lost(fake: Fake) -> None:
    async def main() -> None:
        async with fake.open() as c:
            with pytest.raises(LockLost) as info:
                async with Lock(c, "x", ttl=1) as lock:
                    token = lock.token
                    lease = lock.lease
                    assert lease is not None and not lock.lost.is_set()
                    fake.call(lambda: fake.cluster.store.expire(lease.id))
                    await asyncio.sleep(30)  # cancelled at the next renewal (1/3 s)
            assert "lock 'x'" in str(info.value) and not lock.held
            assert info.value.lease == lease.id
            async with Lock(c, "x") as again:
                assert again.token > token
            assert await c.put("after", b"v") > 0  # the task was not left cancelled

    asyncio.run(main())


def test_giving_up_while_waiting_leaves_no_key(fake: Fake) -> None:
    pfx = LOCK_PREFIX + "g/"

    async def main() -> None:
        async with fake.open() as c, Lock(c, "g") as held:
            waiter = Lock(c, "g")
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await waiter.acquire()
            assert not waiter.held and waiter.lease is None
            assert keys_under(fake, pfx) == [held.key]
            assert held.lease is not None
            assert list(fake.call(lambda: dict(fake.cluster.store.leases))) == [held.lease.id]

    asyncio.run(main())


def test_election_campaign_proclaim_resign_observe(fake: Fake) -> None:
    async def main() -> None:
        seen: list[bytes] = []
        async with fake.open() as c:
            one, two = Election(c, "svc"), Election(c, "svc")
            assert await one.leader() is None

            async def observe() -> None:
                async with Election(c, "svc").observe() as leaders:
                    async for kv in leaders:
                        seen.append(kv.value)

            observer = asyncio.create_task(observe())
            async with one:
                await one.campaign("one")
                await until(fake, lambda: seen == [b"one"])
                second = asyncio.create_task(two.campaign("two"))
                await until(fake, lambda: two.watching is not None)
                await one.proclaim("one, again")
                await until(fake, lambda: len(seen) == 2)
                with pytest.raises(NotElected):
                    await two.proclaim("me")
            await second
            await until(fake, lambda: len(seen) == 3)
            assert two.leading and not one.leading
            leader = await two.leader()
            assert leader is not None and leader.value == b"two"
            await two.resign()
            observer.cancel()
            await asyncio.gather(observer, return_exceptions=True)
        assert seen == [b"one", b"one, again", b"two"]

    asyncio.run(main())


def test_a_lost_lease_ends_the_election_block_with_lease_lost(fake: Fake) -> None:
    async def main() -> None:
        async with fake.open() as c:
            election = Election(c, "db", ttl=1)
            with pytest.raises(LeaseLost):
                async with election:
                    await election.campaign("a")
                    assert election.lease is not None
                    lease_id = election.lease.id
                    fake.call(lambda: fake.cluster.store.expire(lease_id))
                    await asyncio.sleep(30)
            assert not election.leading
            assert await c.put("after", b"v") > 0

    asyncio.run(main())


def test_lock_and_election_have_the_trio_api() -> None:
    def public(cls: type) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_")}

    for name in ("Lock", "Election", "LeaderWatch"):
        trio_cls, aio_cls = getattr(liferaft.client, name), getattr(liferaft.client.aio, name)
        assert public(trio_cls) == public(aio_cls), name
        for attr in public(trio_cls):
            trio_fn, aio_fn = getattr(trio_cls, attr), getattr(aio_cls, attr)
            if callable(trio_fn):
                trio_params = list(inspect.signature(trio_fn).parameters)
                assert trio_params == list(inspect.signature(aio_fn).parameters), (name, attr)
    assert liferaft.client.aio.LockLost is liferaft.client.LockLost


def test_the_same_api_as_the_trio_client() -> None:
    def public(cls: type) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_")}

    assert public(Client) == public(AsyncioClient)
    for name in public(Client) & public(AsyncioClient) - {"connect"}:
        trio_fn, aio_fn = getattr(Client, name), getattr(AsyncioClient, name)
        if callable(trio_fn):
            trio_sig, aio_sig = inspect.signature(trio_fn), inspect.signature(aio_fn)
            assert trio_sig.parameters == aio_sig.parameters, name


def test_without_websockets_the_import_error_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "websockets.asyncio.client", None)  # as if absent
    monkeypatch.delitem(sys.modules, "liferaft.client.aio")
    with pytest.raises(ImportError, match=r"pip install 'liferaft\[asyncio\]'"):
        import liferaft.client.aio  # noqa: F401


def test_a_pool_that_avoids_the_leader_opens_one_connection_for_concurrent_callers() -> None:
    """reads="followers": the first connection is checked (is it the leader?) before it
    is handed out; callers that wait for it meanwhile must not open a second one, which
    nothing would ever use or close."""
    from liferaft.client.aio import _Pool
    from liferaft.client.wire import parse_endpoint

    opened: list[StandInConnection] = []

    class StandInConnection:
        alive, retired = True, False

        def __init__(self, endpoint: Any) -> None:
            self.endpoint = endpoint

        def submit(self, fields: Any) -> None:
            return None

        async def wait(self, req: None) -> dict[str, Any]:
            await asyncio.sleep(0.01)  # the status round trip
            return {"ok": True, "node_id": "n2", "leader_id": "n1"}  # a follower

        def retire(self) -> None:
            self.retired = True

    async def open_(endpoint: Any) -> Any:
        conn = StandInConnection(endpoint)
        opened.append(conn)
        return conn

    async def main() -> None:
        ends = [parse_endpoint(f"wss://127.0.0.1:{p}/v1") for p in (1, 2, 3)]
        pool = _Pool(ends, open_, attempt_timeout=1.0, avoid_leader=True)
        conns = await asyncio.gather(*(pool.connection() for _ in range(8)))
        assert len(opened) == 1 and all(c is opened[0] for c in conns)

    asyncio.run(main())
