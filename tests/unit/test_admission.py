"""Admission: a bounded number of requests admitted to a resource that computes one thing
at a time; an admitted request is never refused, however many turns it takes."""

from __future__ import annotations

import asyncio

import pytest

from deepstack_runtime.servers.common import Admission, Busy


def test_requests_beyond_the_bound_are_refused_at_once_and_turns_go_in_order() -> None:
    async def scenario() -> tuple[list[str], str]:
        admission = Admission("the model", max_waiting=3)
        order: list[str] = []
        release = asyncio.Event()

        async def request(name: str) -> None:
            async with admission.admit(), admission.turn():
                order.append(name)
                await release.wait()

        tasks = [asyncio.create_task(request(n)) for n in ("a", "b", "c")]
        for _ in range(3):
            await asyncio.sleep(0)
        assert admission.waiting == 3
        with pytest.raises(Busy) as refused:
            async with admission.admit():
                pass
        release.set()
        await asyncio.gather(*tasks)
        assert admission.waiting == 0
        return order, str(refused.value)

    order, message = asyncio.run(scenario())
    assert order == ["a", "b", "c"]
    assert "3 requests already wait for the model" in message


def test_an_admitted_request_with_many_images_is_never_refused() -> None:
    """Two requests of three images each fill a bound of two: every one of their six
    turns is taken, none refused (the bound counts requests, not images)."""

    async def scenario() -> list[str]:
        admission = Admission("the model", max_waiting=2)
        done: list[str] = []

        async def image(name: str) -> None:
            async with admission.turn():
                await asyncio.sleep(0)
                done.append(name)

        async def request(name: str) -> None:
            async with admission.admit():
                await asyncio.gather(*(image(f"{name}{i}") for i in range(3)))

        await asyncio.gather(request("a"), request("b"))
        return done

    assert sorted(asyncio.run(scenario())) == ["a0", "a1", "a2", "b0", "b1", "b2"]


def test_a_cancelled_request_leaves_room() -> None:
    async def scenario() -> int:
        admission = Admission("the model", max_waiting=2)
        hold = asyncio.Event()

        async def request() -> None:
            async with admission.admit(), admission.turn():
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

    assert asyncio.run(scenario()) == 1
