from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from deepstack_runtime.buffers import (
    BufferLayout,
    MultimodalDataBuffers,
    MultimodalItem,
    copy_item,
)
from deepstack_runtime.embedding_cache import (
    CachedRows,
    EmbeddingCache,
    EmbeddingCacheMetrics,
    cache_key,
    rows_checksum,
    settings_fingerprint,
)

T = TypeVar("T")
HIDDEN, K = 8, 3
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tower_output(tokens: int, seed: int, k: int = K) -> MultimodalItem:
    """What the reference encoder returns for one image: float32 rows."""
    g = torch.Generator().manual_seed(seed)
    return MultimodalItem(
        embeddings=torch.randn(tokens, HIDDEN, generator=g),
        deepstack=torch.randn(tokens, k, HIDDEN, generator=g) if k else None,
        fill_ids=torch.full((tokens,), 7, dtype=torch.int64),
        positions=torch.zeros(tokens, 3, dtype=torch.int64),
    )


class Tower:
    """A counted stand-in for the vision tower (the cache's logic is what is tested)."""

    def __init__(self, tokens: int = 4, k: int = K) -> None:
        self.tokens, self.k = tokens, k
        self.runs: dict[str, int] = {}
        self.release = asyncio.Event()
        self.release.set()
        self.error: Exception | None = None

    def compute(self, key: str) -> Callable[[], Awaitable[MultimodalItem]]:
        async def run() -> MultimodalItem:
            self.runs[key] = self.runs.get(key, 0) + 1
            await self.release.wait()
            if self.error is not None:
                raise self.error
            return tower_output(self.tokens, seed=sum(key.encode()), k=self.k)

        return run

    @property
    def total_runs(self) -> int:
        return sum(self.runs.values())


def entry_bytes(tokens: int = 4, k: int = K, element: int = 2) -> int:
    return tokens * HIDDEN * (1 + k) * element


def cache_of(
    capacity: int, device: str = "cpu", dtype: torch.dtype = torch.bfloat16
) -> EmbeddingCache:
    return EmbeddingCache(capacity, dtype, device, EmbeddingCacheMetrics(CollectorRegistry()))


def metric(cache: EmbeddingCache, name: str) -> float:
    value = cache.metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(30):
            return await coro

    return asyncio.run(bounded())


async def until(condition: Callable[[], bool]) -> None:
    """Wait for `condition`, yielding to the loop, within a deadline."""
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0)


def same_rows(a: CachedRows, b: CachedRows) -> bool:
    if (a.deepstack is None) != (b.deepstack is None):
        return False
    ds = a.deepstack is None or (b.deepstack is not None and torch.equal(a.deepstack, b.deepstack))
    return torch.equal(a.embeddings, b.embeddings) and ds


# --- keys ------------------------------------------------------------------------------


def test_cache_key_depends_on_every_part_and_is_stable() -> None:
    base = cache_key("img", "settings", "contract")
    assert base == cache_key("img", "settings", "contract")
    assert len(base) == 64
    others = {
        cache_key("img2", "settings", "contract"),
        cache_key("img", "settings2", "contract"),
        cache_key("img", "settings", "contract2"),
        cache_key("im", "gsettings", "contract"),  # same concatenation, other split
    }
    assert base not in others
    assert len(others) == 4
    with pytest.raises(ValueError, match="non-empty"):
        cache_key("img", "settings", "")


def test_settings_fingerprint_is_canonical() -> None:
    a = settings_fingerprint({"max_pixels": 65536, "patch_size": 8, "mean": [0.5, 0.5]})
    assert a == settings_fingerprint({"mean": [0.5, 0.5], "patch_size": 8, "max_pixels": 65536})
    assert a != settings_fingerprint({"max_pixels": 65537, "patch_size": 8, "mean": [0.5, 0.5]})
    with pytest.raises(ValueError, match="JSON compliant"):
        settings_fingerprint({"scale": float("nan")})


# --- LRU, bytes, size 0, oversize ---------------------------------------------------------


def test_lru_order_and_byte_bound() -> None:
    async def scenario() -> tuple[EmbeddingCache, Tower]:
        cache, tower = cache_of(3 * entry_bytes()), Tower()
        for key in "abc":
            await cache.get_or_compute(key, tower.compute(key))
        assert cache.nbytes == 3 * entry_bytes()
        await cache.get_or_compute("a", tower.compute("a"))  # a hit: now most recent
        await cache.get_or_compute("d", tower.compute("d"))  # evicts b, the least recent
        assert [k in cache for k in "abcd"] == [True, False, True, True]
        await cache.get_or_compute("e", tower.compute("e"))  # evicts c
        assert [k in cache for k in "abcde"] == [True, False, False, True, True]
        await cache.get_or_compute("b", tower.compute("b"))  # recomputed; evicts a
        return cache, tower

    cache, tower = run(scenario())
    assert tower.runs == {"a": 1, "b": 2, "c": 1, "d": 1, "e": 1}
    assert len(cache) == 3
    assert cache.nbytes == 3 * entry_bytes() <= cache.capacity_bytes
    assert metric(cache, "deepstack_embedding_cache_evictions_total") == 3
    assert metric(cache, "deepstack_embedding_cache_hits_total") == 1
    assert metric(cache, "deepstack_embedding_cache_misses_total") == 6
    assert metric(cache, "deepstack_embedding_cache_bytes") == 3 * entry_bytes()
    assert metric(cache, "deepstack_embedding_cache_entries") == 3


def test_a_budget_between_sizes_holds_what_fits() -> None:
    async def scenario() -> EmbeddingCache:
        cache, tower = cache_of(2 * entry_bytes() + entry_bytes() // 2), Tower()
        for key in "abc":
            await cache.get_or_compute(key, tower.compute(key))
        return cache

    cache = run(scenario())
    assert ["a" in cache, "b" in cache, "c" in cache] == [False, True, True]
    assert cache.nbytes == 2 * entry_bytes()


def test_size_zero_is_off() -> None:
    async def scenario() -> tuple[EmbeddingCache, Tower, list[CachedRows]]:
        cache, tower = cache_of(0), Tower()
        got = [await cache.get_or_compute("a", tower.compute("a")) for _ in range(3)]
        return cache, tower, got

    cache, tower, got = run(scenario())
    assert tower.runs == {"a": 3}
    assert len(cache) == 0
    assert "a" not in cache
    assert cache.nbytes == 0
    assert metric(cache, "deepstack_embedding_cache_misses_total") == 3
    assert metric(cache, "deepstack_embedding_cache_hits_total") == 0
    assert metric(cache, "deepstack_embedding_cache_capacity_bytes") == 0
    assert got[0].embeddings.dtype == torch.bfloat16  # still the pool's dtype
    assert same_rows(got[0], got[2])


def test_size_zero_neither_coalesces_nor_copies() -> None:
    """Off is a pass-through: concurrent lookups each compute (every lookup a miss), and
    rows already in the pool's dtype (written in place, say) come back as they are."""
    _, given = scratch()

    async def compute() -> MultimodalItem:
        return given

    async def scenario() -> tuple[EmbeddingCache, Tower, CachedRows]:
        cache, tower = cache_of(0), Tower()
        tower.release.clear()
        waiters = [
            asyncio.create_task(cache.get_or_compute("a", tower.compute("a"))) for _ in range(4)
        ]
        await until(lambda: tower.total_runs == 4)
        tower.release.set()
        await asyncio.gather(*waiters)
        return cache, tower, await cache.get_or_compute("b", compute)

    cache, tower, passed = run(scenario())
    assert tower.runs == {"a": 4}
    assert metric(cache, "deepstack_embedding_cache_misses_total") == 5
    assert metric(cache, "deepstack_embedding_cache_coalesced_total") == 0
    assert passed.embeddings.data_ptr() == given.embeddings.data_ptr()


def test_an_entry_larger_than_the_budget_is_served_not_kept() -> None:
    async def scenario() -> tuple[EmbeddingCache, Tower, CachedRows]:
        cache, small, big = cache_of(2 * entry_bytes()), Tower(), Tower(tokens=12)
        await cache.get_or_compute("small", small.compute("small"))
        rows = await cache.get_or_compute("big", big.compute("big"))
        await cache.get_or_compute("big", big.compute("big"))
        return cache, big, rows

    cache, big, rows = run(scenario())
    assert rows.num_tokens == 12
    assert big.runs == {"big": 2}
    assert "big" not in cache
    assert "small" in cache  # nothing was evicted for it
    assert metric(cache, "deepstack_embedding_cache_evictions_total") == 0


# --- bit-identical rows --------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("k", [0, K])
def test_a_hit_writes_the_same_bytes_into_the_pool_as_a_miss(
    device: str, dtype: str, k: int
) -> None:
    """A miss today: the tower's float32 rows are copied (cast) into pool blocks. With the
    cache, the rows of a miss and of every later hit come out of the entry; the pool must
    hold exactly the same bytes either way."""
    layout = BufferLayout(8, 4, HIDDEN, k, dtype)
    pool = MultimodalDataBuffers(layout, device)
    tower = Tower(tokens=6, k=k)
    cache = EmbeddingCache(1 << 20, pool.embeddings.dtype, device)

    async def scenario() -> tuple[CachedRows, CachedRows]:
        miss = await cache.get_or_compute("img", tower.compute("img"))
        hit = await cache.get_or_compute("img", tower.compute("img"))
        return miss, hit

    miss, hit = run(scenario())
    assert tower.total_runs == 1
    assert same_rows(miss, hit)
    assert (hit.embeddings.dtype, hit.embeddings.device) == (
        pool.embeddings.dtype,
        pool.embeddings.device,
    )  # stored as the pool holds them: no cast on the way in
    # Two images in one reservation: the cached one at token 5, after a 5-token image.
    without_cache = pool.views(list(range(0, 3)), 11)
    with_cache = pool.views(list(range(3, 6)), 11)
    assert without_cache is not None
    assert with_cache is not None
    direct = tower_output(6, seed=sum(b"img"), k=k)
    tail = MultimodalItem(
        without_cache.embeddings[5:],
        None if without_cache.deepstack is None else without_cache.deepstack[5:],
        without_cache.fill_ids[5:],
        without_cache.positions[5:],
    )
    copy_item(direct, tail)
    hit.write_into(with_cache, start=5)
    assert torch.equal(with_cache.embeddings[5:], without_cache.embeddings[5:])
    if k:
        assert with_cache.deepstack is not None
        assert without_cache.deepstack is not None
        assert torch.equal(with_cache.deepstack[5:], without_cache.deepstack[5:])
        assert with_cache.embeddings[5:].view(torch.uint8).any()  # not trivially zero
    assert not with_cache.embeddings[:5].view(torch.uint8).any()  # nothing before start


def pool_views() -> tuple[MultimodalDataBuffers, MultimodalItem]:
    """Row-strided views of pool blocks, as the encoder writes them in place."""
    pool = MultimodalDataBuffers(BufferLayout(4, 4, HIDDEN, K, "bfloat16"))
    views = pool.views([0, 1], 6)
    assert views is not None
    return pool, views


def scratch() -> tuple[MultimodalDataBuffers, MultimodalItem]:
    """Contiguous rows already in the cache's dtype: nothing about them forces a copy."""
    pool = MultimodalDataBuffers(BufferLayout(4, 4, HIDDEN, K, "bfloat16"))
    item = pool.empty_item(6)
    return pool, item


@pytest.mark.parametrize("source", [pool_views, scratch])
def test_the_cache_owns_its_rows(
    source: Callable[[], tuple[MultimodalDataBuffers, MultimodalItem]],
) -> None:
    """compute may hand over memory that is reused once the request is done (pool blocks,
    a scratch buffer): the entry is a copy, never an alias."""
    _, given = source()
    copy_item(tower_output(6, seed=1), given)

    async def compute() -> MultimodalItem:
        return given

    async def scenario() -> tuple[CachedRows, CachedRows]:
        cache = cache_of(1 << 20)
        first = await cache.get_or_compute("img", compute)
        assert given.deepstack is not None
        for reused in (given.embeddings, given.deepstack):  # the memory is reused
            reused.view(torch.uint8).fill_(0x5A)
        return first, await cache.get_or_compute("img", compute)

    first, hit = run(scenario())
    expected = tower_output(6, seed=1)
    assert torch.equal(hit.embeddings, expected.embeddings.to(torch.bfloat16))
    assert expected.deepstack is not None
    assert hit.deepstack is not None
    assert torch.equal(hit.deepstack, expected.deepstack.to(torch.bfloat16))
    assert same_rows(first, hit)


def rows(tokens: int, deepstack_shape: tuple[int, ...] | None) -> MultimodalItem:
    ds = None if deepstack_shape is None else torch.zeros(deepstack_shape)
    return MultimodalItem(
        torch.zeros(tokens, HIDDEN), ds, torch.zeros(tokens), torch.zeros(tokens, 3)
    )


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (rows(0, None), "tokens"),
        (rows(4, (3, K, HIDDEN)), "deepstack"),  # not one row per token
        (rows(4, (4, HIDDEN)), "deepstack"),  # no K axis
    ],
)
def test_malformed_rows_are_refused_and_not_kept(item: MultimodalItem, message: str) -> None:
    async def compute() -> MultimodalItem:
        return item

    async def scenario() -> EmbeddingCache:
        cache = cache_of(1 << 20)
        with pytest.raises(ValueError, match=message):
            await cache.get_or_compute("img", compute)
        return cache

    cache = run(scenario())
    assert len(cache) == 0


def test_write_into_checks_the_target() -> None:
    rows = CachedRows(torch.zeros(4, HIDDEN), torch.zeros(4, K, HIDDEN))
    out = tower_output(6, seed=0)
    with pytest.raises(ValueError, match="do not fit"):
        rows.write_into(out, start=3)
    with pytest.raises(ValueError, match="DeepStack"):
        rows.write_into(tower_output(6, seed=0, k=0))
    rows.write_into(out, start=2)
    assert not out.embeddings[2:].any()
    assert out.embeddings[:2].any()


# --- corruption -----------------------------------------------------------------------------


def flip_byte(t: torch.Tensor, index: int) -> None:
    t.view(torch.uint8).view(-1)[index] ^= 0x10


def swap_tokens(t: torch.Tensor) -> None:
    t[[0, 1]] = t[[1, 0]]


@pytest.mark.parametrize(
    ("damage", "part"),
    [
        (lambda t: flip_byte(t, 0), "embeddings"),
        (lambda t: flip_byte(t, 37), "deepstack"),
        (swap_tokens, "embeddings"),  # every word intact, two tokens' rows exchanged
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_a_corrupted_entry_is_never_served(
    damage: Callable[[torch.Tensor], None], part: str, device: str
) -> None:
    async def scenario() -> tuple[EmbeddingCache, Tower, CachedRows, CachedRows, CachedRows]:
        cache, tower = cache_of(1 << 20, device), Tower()
        good = await cache.get_or_compute("img", tower.compute("img"))
        assert good.deepstack is not None
        pristine = CachedRows(good.embeddings.clone(), good.deepstack.clone())
        stored = await cache.get_or_compute("img", tower.compute("img"))
        damage(getattr(stored, part))  # a stray write into the stored entry
        served = await cache.get_or_compute("img", tower.compute("img"))
        return cache, tower, pristine, stored, served

    cache, tower, pristine, stored, served = run(scenario())
    assert not same_rows(stored, pristine)  # the damage is real
    assert tower.runs == {"img": 2}  # recomputed, not served
    assert served.embeddings.data_ptr() != stored.embeddings.data_ptr()
    assert same_rows(served, pristine)
    assert metric(cache, "deepstack_embedding_cache_corrupt_total") == 1
    assert metric(cache, "deepstack_embedding_cache_hits_total") == 1  # the one before
    assert metric(cache, "deepstack_embedding_cache_misses_total") == 2
    assert cache.nbytes == served.nbytes  # the damaged entry's bytes were released


def test_checksum_covers_every_byte_of_an_odd_shape() -> None:
    """Rows whose byte width is not a multiple of 8 (hidden 3 in bfloat16: 6 bytes)."""
    rows = CachedRows(torch.randn(5, 3).to(torch.bfloat16), torch.randn(5, 1, 3).half())
    before = rows_checksum(rows)
    for part in (rows.embeddings, rows.deepstack):
        assert part is not None
        for index in range(part.numel() * part.element_size()):
            flip_byte(part, index)
            assert rows_checksum(rows) != before
            flip_byte(part, index)
    assert rows_checksum(rows) == before


def test_host_and_device_checksums_agree() -> None:
    """Host rows are summed by numpy, device rows by torch: the same definition."""
    rows = CachedRows(torch.randn(9, 16).to(torch.bfloat16), torch.randn(9, 2, 16).half())
    index = torch.arange(1, 10)
    expected = [0, 0]
    for part in (rows.embeddings, rows.deepstack):
        assert part is not None
        per_token = part.reshape(9, -1).view(torch.int64).sum(dim=1)
        expected[0] += int(per_token.sum())
        expected[1] += int((per_token * index).sum())
    assert rows_checksum(rows) == tuple(expected)
    for device in DEVICES[1:]:
        on_device = CachedRows(rows.embeddings.to(device), rows.deepstack.to(device))  # type: ignore[union-attr]
        assert rows_checksum(on_device) == tuple(expected)


# --- single flight -------------------------------------------------------------------------


def test_eight_concurrent_cold_requests_run_the_tower_once() -> None:
    async def scenario() -> tuple[EmbeddingCache, Tower, list[CachedRows]]:
        cache, tower = cache_of(1 << 20), Tower()
        tower.release.clear()
        waiters = [
            asyncio.create_task(cache.get_or_compute("img", tower.compute("img"))) for _ in range(8)
        ]
        await until(lambda: metric(cache, "deepstack_embedding_cache_coalesced_total") == 7)
        tower.release.set()
        return cache, tower, list(await asyncio.gather(*waiters))

    cache, tower, got = run(scenario())
    assert tower.runs == {"img": 1}
    assert all(same_rows(rows, got[0]) for rows in got)
    assert metric(cache, "deepstack_embedding_cache_misses_total") == 1
    assert metric(cache, "deepstack_embedding_cache_coalesced_total") == 7
    assert len(cache) == 1


def test_a_failed_computation_fails_every_waiter_and_a_retry_recomputes() -> None:
    async def scenario() -> tuple[EmbeddingCache, Tower, list[BaseException | CachedRows]]:
        cache, tower = cache_of(1 << 20), Tower()
        tower.release.clear()
        tower.error = RuntimeError("the tower ran out of memory")
        waiters = [
            asyncio.create_task(cache.get_or_compute("img", tower.compute("img"))) for _ in range(8)
        ]
        await until(lambda: metric(cache, "deepstack_embedding_cache_coalesced_total") == 7)
        tower.release.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert "img" not in cache
        tower.error = None
        results.append(await cache.get_or_compute("img", tower.compute("img")))
        return cache, tower, results

    cache, tower, results = run(scenario())
    assert all(isinstance(r, RuntimeError) and "out of memory" in str(r) for r in results[:8])
    assert isinstance(results[8], CachedRows)
    assert tower.runs == {"img": 2}
    assert len(cache) == 1
    assert metric(cache, "deepstack_embedding_cache_misses_total") == 2


def test_a_cancelled_waiter_does_not_cancel_the_shared_computation() -> None:
    """The first caller (whose lookup started the computation) goes away; the others still
    get the rows, the tower ran once, and the entry is kept."""

    async def scenario() -> tuple[EmbeddingCache, Tower, list[CachedRows], bool]:
        cache, tower = cache_of(1 << 20), Tower()
        tower.release.clear()
        first = asyncio.create_task(cache.get_or_compute("img", tower.compute("img")))
        await until(lambda: tower.total_runs == 1)
        others = [
            asyncio.create_task(cache.get_or_compute("img", tower.compute("img"))) for _ in range(3)
        ]
        await until(lambda: metric(cache, "deepstack_embedding_cache_coalesced_total") == 3)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        tower.release.set()
        got = list(await asyncio.gather(*others))
        return cache, tower, got, first.cancelled()

    cache, tower, got, cancelled = run(scenario())
    assert cancelled
    assert tower.runs == {"img": 1}
    assert len(got) == 3
    assert "img" in cache


def test_when_every_waiter_goes_away_the_computation_finishes_and_nothing_leaks() -> None:
    errors: list[dict[str, Any]] = []

    async def scenario() -> tuple[EmbeddingCache, int]:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
        cache, tower = cache_of(1 << 20), Tower()
        for key, error in (("kept", None), ("failed", RuntimeError("boom"))):
            tower.release.clear()
            tower.error = error
            waiter = asyncio.create_task(cache.get_or_compute(key, tower.compute(key)))
            await until(lambda key=key: tower.runs.get(key) == 1)  # type: ignore[misc]
            waiter.cancel()
            tower.release.set()
            await until(lambda: not cache._inflight)
        gc.collect()  # an unretrieved task exception is reported when the task is freed
        pending = len(asyncio.all_tasks()) - 1  # this one
        return cache, pending

    cache, pending = run(scenario())
    assert "kept" in cache
    assert "failed" not in cache
    assert pending == 0
    assert errors == []


def test_aclose_cancels_what_is_in_flight_and_empties_the_cache() -> None:
    async def scenario() -> tuple[EmbeddingCache, BaseException | CachedRows, int]:
        cache, tower = cache_of(1 << 20), Tower()
        await cache.get_or_compute("a", tower.compute("a"))
        tower.release.clear()
        waiter = asyncio.create_task(cache.get_or_compute("b", tower.compute("b")))
        await until(lambda: tower.runs.get("b") == 1)
        await cache.aclose()
        result = (await asyncio.gather(waiter, return_exceptions=True))[0]
        return cache, result, len(asyncio.all_tasks()) - 1

    cache, result, pending = run(scenario())
    assert isinstance(result, asyncio.CancelledError)
    assert pending == 0
    assert len(cache) == 0
    assert cache.nbytes == 0
    assert metric(cache, "deepstack_embedding_cache_bytes") == 0


# --- metrics -------------------------------------------------------------------------------


def test_metrics_are_exposed_under_the_projects_names() -> None:
    registry = CollectorRegistry()
    cache = EmbeddingCache(1 << 20, torch.bfloat16, metrics=EmbeddingCacheMetrics(registry))
    tower = Tower()

    async def scenario() -> None:
        await cache.get_or_compute("a", tower.compute("a"))
        await cache.get_or_compute("a", tower.compute("a"))

    run(scenario())
    exposed = dict(
        line.split(" ")
        for line in generate_latest(registry).decode().splitlines()
        if line.startswith("deepstack_") and "_created" not in line
    )
    assert {name: float(value) for name, value in exposed.items()} == {
        "deepstack_embedding_cache_hits_total": 1,
        "deepstack_embedding_cache_misses_total": 1,
        "deepstack_embedding_cache_coalesced_total": 0,
        "deepstack_embedding_cache_evictions_total": 0,
        "deepstack_embedding_cache_corrupt_total": 0,
        "deepstack_embedding_cache_bytes": entry_bytes(),
        "deepstack_embedding_cache_entries": 1,
        "deepstack_embedding_cache_capacity_bytes": 1 << 20,
    }


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        EmbeddingCache(-1, torch.bfloat16)
    with pytest.raises(ValueError, match="floating"):
        EmbeddingCache(1, torch.int64)
