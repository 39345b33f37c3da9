"""The storage thread (``WorkerThread``): calls run on one other thread, in order, one at
a time; results and exceptions come back; a cancelled caller's call still runs to the
end; ``run_now`` runs inline only when the thread is idle; ``close`` is the last call."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from liferaft.storage.worker import WorkerThread


async def test_calls_run_on_one_other_thread_in_the_order_made() -> None:
    worker = WorkerThread("test-worker")
    seen: list[tuple[int, int]] = []
    try:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(worker.run, lambda i=i: seen.append((i, threading.get_ident())))
                await trio.testing.wait_all_tasks_blocked()
    finally:
        await worker.close()
    assert [i for i, _ in seen] == list(range(20))
    threads = {t for _, t in seen}
    assert len(threads) == 1
    assert threads != {threading.get_ident()}


async def test_a_result_and_an_exception_come_back_to_the_caller() -> None:
    worker = WorkerThread("test-worker")
    try:
        assert await worker.run(lambda: 6 * 7) == 42
        with pytest.raises(ZeroDivisionError):
            await worker.run(lambda: 1 / 0)
        assert await worker.run(lambda: "still serving") == "still serving"
    finally:
        await worker.close()


async def test_a_cancelled_caller_still_waits_for_its_call_to_finish() -> None:
    worker = WorkerThread("test-worker")
    release = threading.Event()
    finished: list[str] = []

    def slow() -> None:
        release.wait(10)
        finished.append("done")

    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def cancel_then_release() -> None:
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()  # while the call runs
                    release.set()

                nursery.start_soon(cancel_then_release)
                await worker.run(slow)
                await trio.sleep_forever()  # the cancellation lands here, after the call
        assert scope.cancelled_caught
        assert finished == ["done"]
    finally:
        release.set()
        await worker.close()


async def test_run_now_runs_inline_only_while_the_thread_is_idle() -> None:
    worker = WorkerThread("test-worker")
    release = threading.Event()
    try:
        assert worker.run_now(threading.get_ident) == threading.get_ident()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.run, lambda: release.wait(10))
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.WouldBlock):
                worker.run_now(lambda: None)
            release.set()
        assert worker.run_now(lambda: "idle again") == "idle again"
    finally:
        release.set()
        await worker.close()


async def test_close_runs_its_last_call_and_then_refuses_more() -> None:
    worker = WorkerThread("test-worker")
    last: list[str] = []
    await worker.close(lambda: last.append("closed"))
    assert last == ["closed"]
    with pytest.raises(RuntimeError):
        await worker.run(lambda: None)
    with pytest.raises(RuntimeError):
        worker.run_now(lambda: None)
    await worker.close()  # twice is harmless
