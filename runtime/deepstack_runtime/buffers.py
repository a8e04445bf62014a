"""Preallocated, block-based storage for what the encode side sends the language side.

One arena of token records, registered once with the transfer engine. A record holds
everything about one visual token, its DeepStack rows included; a block is `block_tokens`
consecutive records, and blocks sit end to end:

    token = | fill id (int64) | M-RoPE position t,h,w (3 x int64) | embedding (hidden)
            | DeepStack feature 0..K-1 (K x hidden) | padding to 16 B |

So the tokens of a run of consecutive blocks are one contiguous byte range: a chunk of a
sequence moves as one transfer entry of exactly its own bytes, always with the DeepStack
rows of its own tokens, and a sequence received into one run is read where it landed
(`views`: row-strided tensors, no copy). Only token records go on the wire; where a
chunk belongs and its checksums travel in the control messages. Typed views:

    embeddings [num_blocks, block_tokens, hidden]        deepstack [.., K, hidden] (None if K=0)
    fill_ids   [num_blocks, block_tokens] int64          positions [.., 3] int64
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Same-width integer views: exact checksums and bit-for-bit copies of any payload dtype.
_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16}

# Host copies below this size run on the calling thread alone. torch splits even small
# copies over its worker threads, and waking a worker whose core is busy (with transfer
# threads, say) stalled 0.25-4 MiB requests for ~4 ms on a 2-core machine, ten times
# the copy itself; above it, two threads copy about twice as fast.
PARALLEL_COPY_BYTES = 8 << 20

_META_BYTES = 32  # fill id + 3 positions
_ALIGN = 16


@dataclass(frozen=True)
class BufferLayout:
    """The shape both sides must agree on before any byte moves."""

    num_blocks: int
    block_tokens: int
    hidden_size: int
    num_deepstack: int
    dtype: str

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_tokens < 1 or self.hidden_size < 1:
            raise ValueError(f"invalid buffer layout {self}")
        if self.num_deepstack < 0:
            raise ValueError("num_deepstack must be >= 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def element_size(self) -> int:
        return torch.empty(0, dtype=DTYPES[self.dtype]).element_size()

    @property
    def embedding_bytes(self) -> int:
        """Bytes of one token's embedding row."""
        return self.hidden_size * self.element_size

    @property
    def token_bytes(self) -> int:
        raw = _META_BYTES + self.embedding_bytes * (1 + self.num_deepstack)
        return -(-raw // _ALIGN) * _ALIGN

    @property
    def block_bytes(self) -> int:
        return self.block_tokens * self.token_bytes

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def chunk_bytes(self, tokens: int) -> int:
        """Bytes that move for `tokens` tokens."""
        return tokens * self.token_bytes

    def payload_bytes(self, tokens: int) -> dict[str, int]:
        """`chunk_bytes(tokens)` split by payload (metric labels): the rows of embeddings
        and DeepStack features; everything else (ids, positions, padding) is aux."""
        embedding = tokens * self.embedding_bytes
        deepstack = embedding * self.num_deepstack
        return {
            "embedding": embedding,
            "deepstack": deepstack,
            "aux": self.chunk_bytes(tokens) - embedding - deepstack,
        }

    def compatible(self, other: BufferLayout) -> bool:
        """Pools may differ in size; blocks must not."""
        return (self.block_tokens, self.hidden_size, self.num_deepstack, self.dtype) == (
            other.block_tokens,
            other.hidden_size,
            other.num_deepstack,
            other.dtype,
        )


@dataclass
class MultimodalItem:
    """The encode side's output for one request: T visual tokens."""

    embeddings: torch.Tensor  # [T, hidden]
    deepstack: torch.Tensor | None  # [T, K, hidden], None when K == 0
    fill_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T, 3] int64

    @property
    def num_tokens(self) -> int:
        return int(self.embeddings.shape[0])


class MultimodalDataBuffers:
    def __init__(self, layout: BufferLayout, device: str | torch.device = "cpu") -> None:
        self.layout = layout
        n, b, h, k = (
            layout.num_blocks,
            layout.block_tokens,
            layout.hidden_size,
            layout.num_deepstack,
        )
        dtype = DTYPES[layout.dtype]
        eb = layout.embedding_bytes
        r = layout.token_bytes
        # [all tokens, record]: blocks end to end, so runs of blocks are runs of records.
        self.arena = torch.zeros((n * b, r), dtype=torch.uint8, device=device)
        self._words = self.arena.view(torch.int64)  # exact checksums of whole records
        self._flat: list[torch.Tensor] = [  # per payload, [all tokens, ...]
            self.arena[:, _META_BYTES : _META_BYTES + eb].view(dtype),
            self.arena[:, 0:8].view(torch.int64)[:, 0],
            self.arena[:, 8:_META_BYTES].view(torch.int64),
        ]
        if k:  # K == 0 leaves no room in the record and adds nothing to a transfer
            flat_ds = self.arena[:, _META_BYTES + eb : _META_BYTES + eb * (1 + k)].view(dtype)
            self._flat.append(flat_ds.view(n * b, k, h))
        self.embeddings = self._flat[0].view(n, b, h)
        self.fill_ids = self._flat[1].view(n, b)
        self.positions = self._flat[2].view(n, b, 3)
        self.deepstack = self._flat[3].view(n, b, k, h) if k else None

    @property
    def base_ptr(self) -> int:
        return int(self.arena.data_ptr())

    @property
    def nbytes(self) -> int:
        return self.arena.numel()

    # --- scatter / gather --------------------------------------------------------------

    def scatter(
        self,
        blocks: Sequence[int],
        item: MultimodalItem,
        *,
        start: int = 0,
        count: int | None = None,
    ) -> None:
        """Copy tokens [start, start + count) of `item` (default: all of it) into `blocks`,
        in order. `start` is a block boundary."""
        self.check_item(item)
        t = item.num_tokens - start if count is None else count
        b = self.layout.block_tokens
        if start % b or t < 1 or start + t > item.num_tokens:
            raise ValueError(f"tokens [{start}, {start + t}) are not a chunk of the item")
        if len(blocks) != self.layout.blocks_for(t):
            raise ValueError(
                f"{t} tokens need {self.layout.blocks_for(t)} blocks, got {len(blocks)}"
            )
        for dst, src in self._pieces(blocks, start, t, item):
            copy_rows(dst, src)
        self.settle()

    def settle(self) -> None:
        settle(self.arena)

    def gather(
        self,
        blocks: Sequence[int],
        num_tokens: int,
        out: MultimodalItem | None = None,
        *,
        start: int = 0,
    ) -> MultimodalItem:
        """Copy the first `num_tokens` tokens held by `blocks` (in order) into rows
        [start, start + num_tokens) of `out`, or into new tensors."""
        if len(blocks) < self.layout.blocks_for(num_tokens):
            raise ValueError(f"{num_tokens} tokens do not fit in {len(blocks)} blocks")
        if out is None:
            if start:
                raise ValueError("gathering from a start offset needs `out`")
            out = self.empty_item(num_tokens)
        else:
            self.check_item(out)
            if start + num_tokens > out.num_tokens:
                raise ValueError(f"out holds {out.num_tokens} tokens, not {start + num_tokens}")
        for stored, result in self._pieces(blocks, start, num_tokens, out):
            copy_rows(result, stored)
        return out

    def views(self, blocks: Sequence[int], num_tokens: int) -> MultimodalItem | None:
        """The first `num_tokens` tokens held by `blocks`, in place: row-strided views of
        the arena, valid while the blocks are held. None when the blocks are not one run
        of consecutive ids (then `gather` copies them)."""
        if len(blocks) < self.layout.blocks_for(num_tokens):
            raise ValueError(f"{num_tokens} tokens do not fit in {len(blocks)} blocks")
        used = blocks[: self.layout.blocks_for(num_tokens)]
        if not used or len(_runs(used)) != 1:
            return None
        lo = used[0] * self.layout.block_tokens
        rows = [flat[lo : lo + num_tokens] for flat in self._flat]
        return MultimodalItem(
            embeddings=rows[0],
            fill_ids=rows[1],
            positions=rows[2],
            deepstack=rows[3] if len(rows) > 3 else None,
        )

    def empty_item(self, num_tokens: int) -> MultimodalItem:
        """Uninitialised tensors of the right shapes for `num_tokens` tokens."""
        h, k = self.layout.hidden_size, self.layout.num_deepstack
        dtype, device = self.embeddings.dtype, self.embeddings.device
        return MultimodalItem(
            embeddings=torch.empty((num_tokens, h), dtype=dtype, device=device),
            deepstack=torch.empty((num_tokens, k, h), dtype=dtype, device=device) if k else None,
            fill_ids=torch.empty((num_tokens,), dtype=torch.int64, device=device),
            positions=torch.empty((num_tokens, 3), dtype=torch.int64, device=device),
        )

    def _pieces(
        self, blocks: Sequence[int], start: int, t: int, item: MultimodalItem
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(rows of the arena, rows of the item) pairs covering t tokens, item rows from
        `start`: one pair per payload per run of consecutive blocks."""
        b = self.layout.block_tokens
        given = [item.embeddings, item.fill_ids, item.positions, item.deepstack]
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for first, index, count in _runs(blocks[: self.layout.blocks_for(t)]):
            lo = index * b
            n = min(count * b, t - lo)
            for flat, g in zip(self._flat, given[: len(self._flat)], strict=True):
                assert g is not None  # check_item: DeepStack rows whenever K > 0
                pairs.append((flat[first * b : first * b + n], g[start + lo : start + lo + n]))
        return pairs

    def checksums(self, blocks: Sequence[int], num_tokens: int) -> list[int]:
        """Per block, the exact integer sum of the words of its share of the first
        `num_tokens` tokens (whole records: ids, positions, embeddings, DeepStack rows)."""
        b = self.layout.block_tokens
        sums = []
        for i, block in enumerate(blocks[: self.layout.blocks_for(num_tokens)]):
            n = min(b, num_tokens - i * b)
            words = self._words[block * b : block * b + n]
            sums.append(int(words.sum(dtype=torch.int64)))
        return sums

    def check_item(self, item: MultimodalItem) -> None:
        t, h, k = item.num_tokens, self.layout.hidden_size, self.layout.num_deepstack
        if item.embeddings.shape != (t, h) or item.embeddings.dtype != self.embeddings.dtype:
            raise ValueError(
                f"embeddings must be [{t}, {h}] {self.embeddings.dtype}, got "
                f"{list(item.embeddings.shape)} {item.embeddings.dtype}"
            )
        if k and (item.deepstack is None or item.deepstack.shape != (t, k, h)):
            raise ValueError(f"deepstack must be [{t}, {k}, {h}]")
        if not k and item.deepstack is not None and item.deepstack.numel():
            raise ValueError("this pool carries no DeepStack features (num_deepstack=0)")
        if item.fill_ids.shape != (t,) or item.positions.shape != (t, 3):
            raise ValueError(f"fill_ids must be [{t}] and positions [{t}, 3]")
        for name in ("embeddings", "deepstack", "fill_ids", "positions"):
            tensor = getattr(item, name)
            if tensor is not None and not tensor.is_contiguous():
                raise ValueError(f"{name} must be contiguous")


def settle(memory: torch.Tensor) -> None:
    """Wait for device writes into `memory`: Mooncake reads it directly, outside any CUDA
    stream."""
    if memory.is_cuda:
        torch.cuda.current_stream(memory.device).synchronize()


def copy_item(src: MultimodalItem, out: MultimodalItem | None = None) -> MultimodalItem:
    """`src` copied into `out` (same shapes), or into new contiguous tensors."""
    if out is None:
        out = MultimodalItem(
            embeddings=torch.empty_like(src.embeddings, memory_format=torch.contiguous_format),
            deepstack=None
            if src.deepstack is None
            else torch.empty_like(src.deepstack, memory_format=torch.contiguous_format),
            fill_ids=torch.empty_like(src.fill_ids, memory_format=torch.contiguous_format),
            positions=torch.empty_like(src.positions, memory_format=torch.contiguous_format),
        )
    elif out.num_tokens != src.num_tokens:
        raise ValueError(f"out holds {out.num_tokens} tokens, not {src.num_tokens}")
    elif (src.deepstack is None) != (out.deepstack is None):
        raise ValueError("both items must carry DeepStack rows, or neither")
    pairs = [(out.embeddings, src.embeddings), (out.fill_ids, src.fill_ids)]
    pairs.append((out.positions, src.positions))
    if src.deepstack is not None and out.deepstack is not None:
        pairs.append((out.deepstack, src.deepstack))
    for dst, rows in pairs:
        copy_rows(dst, rows)
    return out


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst.copy_(src)`; small same-dtype host copies stay on this thread (see
    PARALLEL_COPY_BYTES)."""
    # numpy copies on one thread; an integer view of the same width carries any dtype
    # (numpy has no bfloat16) bit for bit.
    as_int = _INT_VIEW.get(src.element_size())
    if (
        as_int is None
        or dst.dtype != src.dtype
        or dst.device.type != "cpu"
        or src.device.type != "cpu"
        or src.numel() * src.element_size() >= PARALLEL_COPY_BYTES
    ):
        dst.copy_(src)
        return
    np.copyto(dst.view(as_int).numpy(), src.view(as_int).numpy())


def _runs(blocks: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split `blocks` into runs of consecutive block ids:
    (first block id, index of the run's first block in `blocks`, run length)."""
    runs: list[tuple[int, int, int]] = []
    i = 0
    while i < len(blocks):
        j = i + 1
        while j < len(blocks) and blocks[j] == blocks[j - 1] + 1:
            j += 1
        runs.append((blocks[i], i, j - i))
        i = j
    return runs
