from __future__ import annotations

import asyncio
import itertools

from deepstack_operator.workqueue import Backoff, Key, WorkQueue


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    b = Backoff(base=0.5, cap=3.0)
    key = ("ns", "a")
    assert [b.next_delay(key) for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    b.forget(key)
    assert b.next_delay(key) == 0.5


def test_keys_are_deduplicated_and_never_processed_twice_at_once() -> None:
    async def scenario() -> tuple[list[Key], int]:
        queue = WorkQueue()
        seen: list[Key] = []
        running = 0
        most = 0
        release = asyncio.Event()

        async def process(key: Key) -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            seen.append(key)
            if len(seen) == 1:
                queue.add(key)  # changed while being processed: must run again, later
                await release.wait()
            running -= 1

        for _ in range(3):
            queue.add(("ns", "a"))
        workers = [asyncio.create_task(queue.worker(process)) for _ in range(3)]
        await asyncio.sleep(0.05)
        release.set()
        async with asyncio.timeout(5):
            while len(seen) < 2:
                await asyncio.sleep(0.01)
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        return seen, most

    seen, most = asyncio.run(scenario())
    assert seen == [("ns", "a"), ("ns", "a")]
    assert most == 1


def test_failures_are_retried_with_backoff_and_requeue_after_is_honoured() -> None:
    async def scenario() -> list[tuple[Key, float]]:
        queue = WorkQueue(Backoff(base=0.05, cap=0.05))
        loop = asyncio.get_running_loop()
        calls: list[tuple[Key, float]] = []

        async def process(key: Key) -> float | None:
            calls.append((key, loop.time()))
            if len(calls) == 1:
                raise RuntimeError("API server hiccup")
            return 0.1 if len(calls) == 2 else None

        queue.add(("ns", "b"))
        worker = asyncio.create_task(queue.worker(process))
        async with asyncio.timeout(5):
            while len(calls) < 3:
                await asyncio.sleep(0.01)
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        queue.shutdown()
        return calls

    calls = asyncio.run(scenario())
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(calls)]
    # Not before the delay (upper bounds only guard against a lost key on a busy machine).
    assert 0.05 <= gaps[0] < 3
    assert 0.1 <= gaps[1] < 3
