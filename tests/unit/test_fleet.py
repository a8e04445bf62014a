"""The router's Fleet (servers/instances.py): which pair a request gets, how many each
instance takes, who waits, in what order, and for how long (pure asyncio, no HTTP)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from deepstack_runtime.servers.instances import Fleet, Instance, Pair, Pool, Unavailable

CONTRACT = "c0ffee0000"


def fleet(
    languages: int = 1,
    encoders: int = 1,
    per_instance: int = 2,
    queue_wait: float = 5.0,
    instance_wait: float = 0.2,
) -> Fleet:
    pools = {role: Pool(role, []) for role in ("language", "encode")}
    for role, count in (("language", languages), ("encode", encoders)):
        for n in range(count):
            url = f"http://{role}-{n}"
            pools[role].instances[url] = Instance(
                url, healthy=True, contract=CONTRACT, bootstrap=f"{role}-{n}:8998"
            )
    return Fleet(
        pools, CONTRACT, per_instance=per_instance, instance_wait=instance_wait,
        queue_wait=queue_wait, health_interval=1.0,
    )  # fmt: skip


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_pairs_are_least_loaded_and_each_instance_takes_at_most_its_share() -> None:
    async def scenario() -> None:
        f = fleet(languages=2, encoders=2, per_instance=2)
        pairs = [await f.acquire(True) for _ in range(4)]
        loads = {i.url: i.inflight for p in f.pools.values() for i in p.instances.values()}
        assert set(loads.values()) == {2}  # spread evenly, each at its share
        fifth = asyncio.create_task(f.acquire(True))
        await asyncio.sleep(0.05)
        assert not fifth.done()
        assert f.waiting == 1
        f.release(pairs[0])
        granted = await fifth
        assert granted.language is pairs[0].language
        assert f.waiting == 0

    run(scenario)


def test_waiters_are_served_in_arrival_order() -> None:
    async def scenario() -> None:
        f = fleet(per_instance=1)
        first = await f.acquire(True)
        order: list[int] = []
        held: list[Pair] = []

        async def wait(n: int) -> None:
            held.append(await f.acquire(True))
            order.append(n)

        tasks = []
        for n in range(5):
            tasks.append(asyncio.create_task(wait(n)))
            await asyncio.sleep(0.01)
        f.release(first)
        for _ in range(5):
            await asyncio.sleep(0.01)
            f.release(held[-1])
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3, 4]

    run(scenario)


def test_a_text_request_does_not_wait_behind_full_encoders() -> None:
    async def scenario() -> None:
        f = fleet(per_instance=1, languages=2, encoders=1)
        await f.acquire(True)  # the only encoder is full
        blocked = asyncio.create_task(f.acquire(True))
        await asyncio.sleep(0.01)
        text = await f.acquire(False)  # the second language instance has room
        assert text.encoder is None
        assert not blocked.done()
        blocked.cancel()

    run(scenario)


def test_all_busy_for_the_queue_wait_is_unavailable_with_a_reason() -> None:
    async def scenario() -> None:
        f = fleet(per_instance=1, queue_wait=0.2)
        await f.acquire(True)
        with pytest.raises(Unavailable, match=r"every language instance .* is busy \(1 x 1"):
            await f.acquire(True)
        assert f.waiting == 0
        with pytest.raises(Unavailable):  # without waiting: at once
            await f.acquire(True, wait=False)

    run(scenario)


def test_no_healthy_instance_waits_only_the_instance_wait() -> None:
    async def scenario() -> None:
        f = fleet(encoders=0, queue_wait=60, instance_wait=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Unavailable, match="no healthy encode instance"):
            await f.acquire(True)
        assert loop.time() - started < 2
        assert (await f.acquire(False)).encoder is None  # text needs no encoder

    run(scenario)


def test_instances_of_another_contract_or_avoided_ones_are_not_used() -> None:
    async def scenario() -> None:
        f = fleet(languages=2)
        f.pools["language"].instances["http://language-0"].contract = "another000"
        pair = await f.acquire(True)
        assert pair.language.url == "http://language-1"
        with pytest.raises(Unavailable):
            await f.acquire(True, frozenset({"http://language-1"}), wait=False)

    run(scenario)


def test_a_waiter_that_gives_up_leaves_nothing_taken() -> None:
    async def scenario() -> None:
        f = fleet(per_instance=1)
        first = await f.acquire(True)
        waiting = asyncio.create_task(f.acquire(True))
        await asyncio.sleep(0.01)
        f.release(first)  # granted to the waiter...
        waiting.cancel()  # ...which gave up before it ran
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert [i.inflight for p in f.pools.values() for i in p.instances.values()] == [0, 0]
        assert f.waiting == 0

    run(scenario)


def test_retry_after_is_the_wait_at_the_recent_rate() -> None:
    async def scenario() -> None:
        f = fleet(per_instance=100)
        assert f.retry_after() == 1  # nothing completed yet
        for _ in range(20):  # 20 in the last 10 s: 2 per second
            f.release(await f.acquire(True))
        assert f.retry_after() == 1
        held = [await f.acquire(True) for _ in range(100)]
        waiters = [asyncio.create_task(f.acquire(True)) for _ in range(9)]
        await asyncio.sleep(0.01)
        assert f.retry_after() == 5  # (9 waiting + this one) at 2 per second
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        for pair in held:
            f.release(pair)

    run(scenario)


async def health_server(role: str) -> tuple[web.AppRunner, str]:
    """A /health that answers as an instance of `role` would (on 127.0.0.1)."""

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"role": role, "contract": CONTRACT, "bootstrap": "x:1"})

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def test_an_instance_listed_again_keeps_the_count_of_its_requests(tmp_path: Path) -> None:
    """A pod whose readiness flapped (out of the Service, back in) while its requests ran
    is not taken for an idle one: it is given no more than its share."""

    async def scenario() -> None:
        runner, url = await health_server("encode")
        listing = tmp_path / "instances.json"
        pool = Pool("encode", [], instances_file=str(listing))
        try:
            async with aiohttp.ClientSession() as session:
                listing.write_text(json.dumps({"encode": [url]}))
                await pool.refresh(session)
                busy = pool.instances[url]
                assert busy.healthy
                busy.inflight = 2  # two requests on it
                listing.write_text(json.dumps({"encode": []}))
                await pool.refresh(session)
                assert url not in pool.instances
                busy.inflight -= 1  # one of them ends while it is not listed
                listing.write_text(json.dumps({"encode": [url]}))
                await pool.refresh(session)
                assert pool.instances[url] is busy
                assert (busy.inflight, busy.healthy) == (1, True)
        finally:
            await runner.cleanup()

    run(scenario)


@pytest.mark.parametrize("listing", ['{"encode": null}', '{"encode": 5}', "[]", "\xff"])
def test_an_odd_instances_file_keeps_the_instances_known(tmp_path: Path, listing: str) -> None:
    async def scenario() -> None:
        path = tmp_path / "instances.json"
        path.write_text(listing, encoding="latin-1")
        pool = Pool("encode", [], instances_file=str(path))
        assert await pool.discover() is None

    run(scenario)
