"""Admission: one request at a time through a resource, a bounded number waiting."""

from __future__ import annotations

import asyncio

import pytest

from deepstack_runtime.servers.common import Admission, Busy


def test_waiters_beyond_the_bound_are_refused_at_once_and_the_rest_go_in_order() -> None:
    async def scenario() -> tuple[list[str], str]:
        admission = Admission("the model", max_waiting=2)
        order: list[str] = []
        release = asyncio.Event()

        async def request(name: str) -> None:
            async with admission.turn():
                order.append(name)
                await release.wait()

        first = asyncio.create_task(request("a"))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(request(n)) for n in ("b", "c")]
        for _ in range(3):
            await asyncio.sleep(0)
        assert admission.waiting == 2
        with pytest.raises(Busy) as refused:
            async with admission.turn():
                pass
        release.set()
        await asyncio.gather(first, *waiting)
        assert admission.waiting == 0
        return order, str(refused.value)

    order, message = asyncio.run(scenario())
    assert order == ["a", "b", "c"]
    assert "2 requests already wait for the model" in message


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def scenario() -> int:
        admission = Admission("the model", max_waiting=1)
        hold = asyncio.Event()

        async def request() -> None:
            async with admission.turn():
                await hold.wait()

        first = asyncio.create_task(request())
        await asyncio.sleep(0)
        second = asyncio.create_task(request())
        await asyncio.sleep(0)
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        room = admission.waiting
        third = asyncio.create_task(request())  # not refused: the cancelled one left
        await asyncio.sleep(0)
        hold.set()
        await asyncio.gather(first, third)
        return room

    assert asyncio.run(scenario()) == 0
