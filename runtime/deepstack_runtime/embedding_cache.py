"""An encode pod's cache of per-image rows: embeddings and DeepStack features.

Why: users send the same image again and again (follow-up turns repeat the whole
history), and each time the vision tower would decode, preprocess and encode it anew. A
hit skips all three, and its rows are bit-identical to a miss's: both come out of the
entry, which holds the rows cast to the pool's dtype exactly as `Tensor.copy_` casts
them into the pool.

- Key (`cache_key`): the image bytes' hash, the processor settings that change the
  rows (`settings_fingerprint`) and the contract hash.
- Value: embeddings [T, hidden] and DeepStack [T, K, hidden] (None when K = 0) in the
  pool's dtype, on `device`. Fill ids and M-RoPE positions are not stored: they follow
  from the image's grid, which the request carries anyway (32 bytes a token against
  2 x hidden x (1 + K)).
- A checksum of the stored bytes, taken at insert and checked on every hit: a mismatch
  drops the entry, is counted, and is a miss; corrupt rows are never served. It is the
  wrapping int64 sum of the rows' words plus a sum weighted by token index (so moved
  rows show too), computed where the rows live (a device reduction on a GPU; no copy to
  the host). About 60 us per MiB on a busy 2-core host (16 GB/s, one thread): a
  quarter to a tenth of zlib.crc32 there, a twentieth of blake2b or sha256.
- LRU, bounded in bytes of rows; capacity 0 turns the cache off (every lookup computes,
  nothing is kept); an entry larger than the whole budget is served but not kept.
- Single flight: concurrent lookups of one cold key share one computation. If it fails,
  every waiter gets its error and nothing is kept; a waiter that is cancelled leaves it
  running for the others (and its result is kept).

All state lives on the event loop's thread; copies and checksums of whole entries run
on worker threads so that a large image does not stall the loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge

from deepstack_runtime.buffers import MultimodalItem, copy_rows, settle

# What a miss runs: the item of one image (its fill ids and positions are ignored).
Compute = Callable[[], Awaitable[MultimodalItem]]
Checksum = tuple[int, int]


def cache_key(content_hash: str, settings_fingerprint: str, contract: str) -> str:
    """The cache key of one image: 64 hex digits. Each part must be non-empty, so that
    no two contracts or settings can ever share an entry by omission."""
    parts = (content_hash, settings_fingerprint, contract)
    if not all(parts):
        raise ValueError("content hash, settings fingerprint and contract must be non-empty")
    h = hashlib.blake2b(digest_size=32, person=b"deepstack-cache")
    for part in parts:  # length-prefixed: no two part lists encode alike
        data = part.encode()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def settings_fingerprint(settings: Mapping[str, object]) -> str:
    """A stable hash of the processor settings that change an image's rows (pixel limits,
    patch and merge sizes, normalization, ...): their canonical JSON (keys sorted)."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class CachedRows:
    """One image's rows, in the cache's dtype and on its device. The tensors may be the
    stored entry itself: read them, never write them."""

    embeddings: torch.Tensor  # [T, hidden]
    deepstack: torch.Tensor | None  # [T, K, hidden]; None when K == 0

    @property
    def num_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def nbytes(self) -> int:
        extra = 0 if self.deepstack is None else self.deepstack.nbytes
        return int(self.embeddings.nbytes) + int(extra)

    def write_into(self, out: MultimodalItem, start: int = 0) -> None:
        """Copy the rows into tokens [start, start + T) of `out` (for example the views of
        a pool reservation holding several images), then wait for device writes to land.
        Fill ids and positions are the caller's (they follow from the grid)."""
        end = start + self.num_tokens
        if start < 0 or end > out.num_tokens:
            raise ValueError(f"tokens [{start}, {end}) do not fit an item of {out.num_tokens}")
        if (self.deepstack is None) != (out.deepstack is None):
            raise ValueError("the rows and the target must both carry DeepStack rows, or neither")
        copy_rows(out.embeddings[start:end], self.embeddings)
        if self.deepstack is not None and out.deepstack is not None:
            copy_rows(out.deepstack[start:end], self.deepstack)
        settle(out.embeddings)


# Integer words of the widest width that divides a token's bytes: exact sums of any dtype.
_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def rows_checksum(rows: CachedRows) -> Checksum:
    """(wrapping int64 sum of all words, sum of each token's word sum x (index + 1)),
    over the raw bytes of the rows: exact, and the same in any reduction order. Host
    rows are summed by numpy on the calling thread (torch's thread pool made it 4 to 17
    times slower on a busy 2-core host, as for copies: see buffers.PARALLEL_COPY_BYTES);
    device rows on the device, with one synchronization."""
    t = rows.num_tokens
    words = []
    for part in (rows.embeddings, rows.deepstack):
        if part is not None:
            raw = part.reshape(t, -1).view(torch.uint8)
            words.append(raw.view(next(dt for width, dt in _WORDS if raw.shape[1] % width == 0)))
    if rows.embeddings.device.type == "cpu":
        index = np.arange(1, t + 1, dtype=np.int64)
        per_token = [w.numpy().sum(axis=1, dtype=np.int64) for w in words]
        return (
            sum(int(p.sum()) for p in per_token),
            sum(int((p * index).sum()) for p in per_token),
        )
    on_device = torch.arange(1, t + 1, dtype=torch.int64, device=rows.embeddings.device)
    sums = []
    for w in words:
        p = w.sum(dim=1, dtype=torch.int64)
        sums += [p.sum(), (p * on_device).sum()]
    both: list[int] = torch.stack(sums).tolist()
    return sum(both[0::2]), sum(both[1::2])


@dataclass(frozen=True)
class _Entry:
    rows: CachedRows
    checksum: Checksum


class EmbeddingCacheMetrics:
    """The cache's series (base units, `_total` counters). Every lookup counts once, as a
    hit, a miss (it started a computation) or coalesced (it waited for another's)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.hits = Counter(
            "deepstack_embedding_cache_hits",
            "Image lookups served from a stored entry whose checksum matched.",
            registry=r,
        )
        self.misses = Counter(
            "deepstack_embedding_cache_misses",
            "Image lookups that started a computation (decode, preprocessing, tower).",
            registry=r,
        )
        self.coalesced = Counter(
            "deepstack_embedding_cache_coalesced",
            "Image lookups that waited for the computation another lookup of the same "
            "image had started.",
            registry=r,
        )
        self.evictions = Counter(
            "deepstack_embedding_cache_evictions",
            "Entries dropped, least recently used first, to make room for new ones.",
            registry=r,
        )
        self.corrupt = Counter(
            "deepstack_embedding_cache_corrupt",
            "Entries whose rows no longer matched their checksum: dropped, never served.",
            registry=r,
        )
        self.bytes = Gauge("deepstack_embedding_cache_bytes", "Bytes of rows held.", registry=r)
        self.entries = Gauge("deepstack_embedding_cache_entries", "Entries held.", registry=r)
        self.capacity = Gauge(
            "deepstack_embedding_cache_capacity_bytes",
            "The byte budget of the cache (encode.embeddingCache); 0 when it is off.",
            registry=r,
        )


class EmbeddingCache:
    def __init__(
        self,
        capacity_bytes: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        metrics: EmbeddingCacheMetrics | None = None,
    ) -> None:
        """`dtype`: the pool's dtype; `device`: where entries live (cuda when the budget
        fits in device memory, else cpu); `capacity_bytes`: 0 turns the cache off."""
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        if not dtype.is_floating_point:
            raise ValueError(f"rows are floating point; got dtype {dtype}")
        self.capacity_bytes = capacity_bytes
        self.dtype = dtype
        self.device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0"
        self.metrics = metrics if metrics is not None else EmbeddingCacheMetrics()
        self.metrics.capacity.set(capacity_bytes)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recent first
        self._bytes = 0
        self._inflight: dict[str, asyncio.Task[CachedRows]] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of rows held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Whether an entry is stored for `key` (not checked, not counted, LRU untouched)."""
        return key in self._entries

    async def get_or_compute(self, key: str, compute: Compute) -> CachedRows:
        """The rows of `key`: a stored entry whose checksum still matches, else the rows of
        the computation in flight for `key`, else those of `compute()`, which is started
        once for everyone waiting (and its rows are kept, if they fit). Raises what
        `compute` raised, to every waiter."""
        if not self.capacity_bytes:
            self.metrics.misses.inc()
            return await asyncio.to_thread(self._rows_of, await compute(), False)
        entry = self._entries.get(key)
        if entry is not None:
            if await asyncio.to_thread(rows_checksum, entry.rows) == entry.checksum:
                if self._entries.get(key) is entry:
                    self._entries.move_to_end(key)
                self.metrics.hits.inc()
                return entry.rows
            self._drop_corrupt(key, entry)
        task = self._inflight.get(key)
        if task is None:
            self.metrics.misses.inc()
            task = asyncio.get_running_loop().create_task(self._fill(key, compute))
            task.add_done_callback(_retrieve)
            self._inflight[key] = task
        else:
            self.metrics.coalesced.inc()
        # A cancelled waiter stops waiting; the computation goes on for the others.
        return await asyncio.shield(task)

    async def aclose(self) -> None:
        """Cancel the computations in flight, wait for them, and drop every entry."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._entries.clear()
        self._bytes = 0
        self._publish()

    async def _fill(self, key: str, compute: Compute) -> CachedRows:
        try:
            item = await compute()
            entry = await asyncio.to_thread(self._entry_of, item)
            self._store(key, entry)
            return entry.rows
        finally:  # before any waiter wakes: a retry after a failure computes anew
            self._inflight.pop(key, None)

    def _entry_of(self, item: MultimodalItem) -> _Entry:
        rows = self._rows_of(item, True)
        return _Entry(rows, rows_checksum(rows))

    def _rows_of(self, item: MultimodalItem, own: bool) -> CachedRows:
        """The item's rows in the cache's dtype, contiguous, on its device: copies when
        `own` (the item may be views of pool blocks that will be reused) or when the
        dtype, device or layout differ. The cast is `Tensor.copy_`'s, the pool's own."""
        embeddings, deepstack = item.embeddings, item.deepstack
        t = embeddings.shape[0] if embeddings.dim() == 2 else 0
        if t < 1 or embeddings.shape[1] < 1:
            raise ValueError(f"embeddings must be [tokens >= 1, hidden], got {embeddings.shape}")
        if deepstack is not None and deepstack.numel() == 0:
            deepstack = None
        if deepstack is not None and (
            deepstack.dim() != 3 or (deepstack.shape[0], deepstack.shape[2]) != embeddings.shape
        ):
            raise ValueError(
                f"deepstack must be [{t}, K, {embeddings.shape[1]}], got {deepstack.shape}"
            )
        owned = None if deepstack is None else self._owned(deepstack, own)
        return CachedRows(self._owned(embeddings, own), owned)

    def _owned(self, rows: torch.Tensor, copy: bool) -> torch.Tensor:
        same = rows.dtype == self.dtype and rows.device == self.device
        if same and not copy and rows.is_contiguous():
            return rows
        out = torch.empty(rows.shape, dtype=self.dtype, device=self.device)
        copy_rows(out, rows)
        settle(out)
        return out

    def _store(self, key: str, entry: _Entry) -> None:
        size = entry.rows.nbytes
        if size > self.capacity_bytes:
            return  # served to its waiters, never kept
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.rows.nbytes
        while self._bytes + size > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.rows.nbytes
            self.metrics.evictions.inc()
        self._entries[key] = entry
        self._bytes += size
        self._publish()

    def _drop_corrupt(self, key: str, entry: _Entry) -> None:
        if self._entries.get(key) is not entry:
            return  # another lookup found it first
        del self._entries[key]
        self._bytes -= entry.rows.nbytes
        self.metrics.corrupt.inc()
        self._publish()

    def _publish(self) -> None:
        self.metrics.bytes.set(self._bytes)
        self.metrics.entries.set(len(self._entries))


def _retrieve(task: asyncio.Task[CachedRows]) -> None:
    """Mark a failure as seen: all its waiters may have been cancelled."""
    if not task.cancelled():
        task.exception()
