"""Preallocated, block-based storage for what the encode side sends the language side.

One byte arena, registered once with the transfer engine. A block is a small header (the
aux record) followed by `block_tokens` token records; a token record holds everything
about one visual token, its DeepStack rows included:

    block   = | aux header (64 B) | token 0 | token 1 | ... | token B-1 |
    token   = | fill id (int64) | M-RoPE position t,h,w (3 x int64) | embedding (hidden)
              | DeepStack feature 0..K-1 (K x hidden) | padding to 16 B |

So the first t tokens of a run of consecutive blocks are one contiguous byte range: a
chunk of a sequence moves as one transfer entry with exactly its own bytes, and a chunk
always carries the DeepStack rows of its own tokens. Typed views give per-payload access:

    embeddings [num_blocks, block_tokens, hidden]        deepstack [.., K, hidden] (None if K=0)
    fill_ids   [num_blocks, block_tokens] int64          positions [.., 3] int64
    aux        [num_blocks, AUX_FIELDS] int64
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

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

HEADER_BYTES = 64
_META_BYTES = 32  # fill id + 3 positions
_ALIGN = 16


class AuxField(IntEnum):
    TOKEN_OFFSET = 0  # index in the sequence of the block's first token
    NUM_TOKENS = 1  # valid tokens in this block
    TOTAL_TOKENS = 2  # length of the whole sequence
    CHECKSUM = 3  # integer sum of the block's embedding and DeepStack bits


AUX_FIELDS = len(AuxField)


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
        return HEADER_BYTES + self.block_tokens * self.token_bytes

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def chunk_bytes(self, tokens: int) -> int:
        """Bytes that move for `tokens` tokens starting at a block boundary."""
        return self.blocks_for(tokens) * HEADER_BYTES + tokens * self.token_bytes

    def payload_bytes(self, tokens: int) -> dict[str, int]:
        """`chunk_bytes(tokens)` split by payload (metric labels): the rows of embeddings
        and DeepStack features; everything else (ids, positions, headers, padding) is aux."""
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
        self.arena = torch.zeros((n, layout.block_bytes), dtype=torch.uint8, device=device)
        tokens = self.arena[:, HEADER_BYTES:].view(n, b, layout.token_bytes)
        self.aux = self.arena[:, : AUX_FIELDS * 8].view(torch.int64)
        self.fill_ids = tokens[:, :, 0:8].view(torch.int64)[:, :, 0]
        self.positions = tokens[:, :, 8:_META_BYTES].view(torch.int64)
        self.embeddings = tokens[:, :, _META_BYTES : _META_BYTES + eb].view(dtype)
        # K == 0 leaves no room in the record and adds nothing to a transfer.
        self.deepstack = (
            tokens[:, :, _META_BYTES + eb : _META_BYTES + eb * (1 + k)].view(dtype).view(n, b, k, h)
            if k
            else None
        )

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
        checksum: bool = False,
    ) -> None:
        """Copy tokens [start, start + count) of `item` (default: all of it) into `blocks`,
        in order, and fill each block's aux record. `start` is a block boundary."""
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
        for i, block in enumerate(blocks):
            n = min(b, t - i * b)
            aux = self.aux[block]
            aux[AuxField.TOKEN_OFFSET] = start + i * b
            aux[AuxField.NUM_TOKENS] = n
            aux[AuxField.TOTAL_TOKENS] = item.num_tokens
            aux[AuxField.CHECKSUM] = self.block_checksum(block, n) if checksum else 0

    def gather(
        self,
        blocks: Sequence[int],
        num_tokens: int,
        out: MultimodalItem | None = None,
        *,
        start: int = 0,
    ) -> MultimodalItem:
        """Copy the first `num_tokens` tokens held by `blocks` (in order) into rows
        [start, start + num_tokens) of `out`, or into new tensors. Passing the consumer's
        own memory (for example the rows of the prompt's input embeddings) saves an
        allocation and a copy."""
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
        """(view into blocks, view into item) pairs covering t tokens, item rows from
        `start`: one pair per payload per run of whole consecutive blocks, plus one per
        payload for a partial last block."""
        b = self.layout.block_tokens
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        stored = [self.embeddings, self.fill_ids, self.positions]
        given = [item.embeddings, item.fill_ids, item.positions]
        if self.deepstack is not None and item.deepstack is not None:
            stored.append(self.deepstack)
            given.append(item.deepstack)
        for first, index, count in _runs(blocks[: self.layout.blocks_for(t)]):
            lo = index * b
            full = min(count, (t - lo) // b)
            if full:
                for s, g in zip(stored, given, strict=True):
                    rows = g[start + lo : start + lo + full * b]
                    pairs.append((s[first : first + full], rows.view(full, b, *rows.shape[1:])))
            if full < count:  # the sequence ends inside this run's last block
                tail_lo = lo + full * b
                n = t - tail_lo
                for s, g in zip(stored, given, strict=True):
                    pairs.append((s[first + full, :n], g[start + tail_lo : start + tail_lo + n]))
        return pairs

    def block_checksum(self, block: int, num_tokens: int | None = None) -> int:
        """Exact integer sum of the bits of the block's first `num_tokens` embedding and
        DeepStack rows (default: as many as its aux record says)."""
        n = int(self.aux[block, AuxField.NUM_TOKENS]) if num_tokens is None else num_tokens
        view = _INT_VIEW[self.layout.element_size]
        total = int(self.embeddings[block, :n].view(view).sum(dtype=torch.int64))
        if self.deepstack is not None:
            total += int(self.deepstack[block, :n].view(view).sum(dtype=torch.int64))
        return total

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
