"""Preallocated, block-based storage for what the encode side sends the language side.

One tensor per payload, block-major, so that a run of consecutive blocks is one contiguous
piece of memory (one transfer entry) and every token's rows, DeepStack included, sit in
the block that holds the token:

    embeddings  [num_blocks, block_tokens, hidden]
    deepstack   [num_blocks, block_tokens, K, hidden]      (absent when K == 0)
    fill_ids    [num_blocks, block_tokens]                 int64
    positions   [num_blocks, block_tokens, 3]              int64, M-RoPE (t, h, w)
    aux         [num_blocks, AUX_FIELDS]                   int64, see AuxField
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Same-width integer views, for exact checksums of floating-point payloads.
_INT_VIEW = {4: torch.int32, 2: torch.int16}


class AuxField(IntEnum):
    TOKEN_OFFSET = 0  # index in the sequence of the block's first token
    NUM_TOKENS = 1  # valid tokens in this block
    TOTAL_TOKENS = 2  # length of the whole sequence
    CHECKSUM = 3  # integer sum of the block's embedding and DeepStack bits


AUX_FIELDS = len(AuxField)
PAYLOADS = ("embedding", "deepstack", "fill_ids", "positions", "aux")


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

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def compatible(self, other: BufferLayout) -> bool:
        """Pools may differ in size; rows must not."""
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


@dataclass(frozen=True)
class Region:
    """One payload's storage: where it starts and how many bytes a block and a token take."""

    payload: str
    base_ptr: int
    block_bytes: int
    token_bytes: int  # 0 for per-block payloads (aux)
    nbytes: int


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
        self.embeddings = torch.zeros((n, b, h), dtype=dtype, device=device)
        # K == 0 allocates nothing and adds no transfer entry.
        self.deepstack = torch.zeros((n, b, k, h), dtype=dtype, device=device) if k else None
        self.fill_ids = torch.zeros((n, b), dtype=torch.int64, device=device)
        self.positions = torch.zeros((n, b, 3), dtype=torch.int64, device=device)
        self.aux = torch.zeros((n, AUX_FIELDS), dtype=torch.int64, device=device)

    # --- memory regions (registered once with the transfer engine) ---------------------

    def regions(self) -> list[Region]:
        out = [
            self._region("embedding", self.embeddings, per_token=True),
            self._region("fill_ids", self.fill_ids, per_token=True),
            self._region("positions", self.positions, per_token=True),
            self._region("aux", self.aux, per_token=False),
        ]
        if self.deepstack is not None:
            out.insert(1, self._region("deepstack", self.deepstack, per_token=True))
        return out

    def _region(self, payload: str, t: torch.Tensor, *, per_token: bool) -> Region:
        block_bytes = t[0].numel() * t.element_size()
        token_bytes = block_bytes // self.layout.block_tokens if per_token else 0
        return Region(payload, t.data_ptr(), block_bytes, token_bytes, t.numel() * t.element_size())

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.regions())

    # --- scatter / gather --------------------------------------------------------------

    def scatter(
        self, blocks: Sequence[int], item: MultimodalItem, *, checksum: bool = False
    ) -> None:
        """Copy `item` into `blocks` (in order) and fill each block's aux record."""
        t = item.num_tokens
        self._check_item(item)
        if len(blocks) != self.layout.blocks_for(t):
            raise ValueError(
                f"{t} tokens need {self.layout.blocks_for(t)} blocks, got {len(blocks)}"
            )
        b = self.layout.block_tokens
        for run_start, first, count in _runs(blocks):
            lo, hi = first * b, min(t, (first + count) * b)
            n = hi - lo
            sl = slice(run_start, run_start + count)
            self.embeddings[sl].view(-1, self.layout.hidden_size)[:n].copy_(item.embeddings[lo:hi])
            if self.deepstack is not None and item.deepstack is not None:
                self.deepstack[sl].view(-1, *self.deepstack.shape[2:])[:n].copy_(
                    item.deepstack[lo:hi]
                )
            self.fill_ids[sl].view(-1)[:n].copy_(item.fill_ids[lo:hi])
            self.positions[sl].view(-1, 3)[:n].copy_(item.positions[lo:hi])
        for i, block in enumerate(blocks):
            n = min(b, t - i * b)
            aux = self.aux[block]
            aux[AuxField.TOKEN_OFFSET] = i * b
            aux[AuxField.NUM_TOKENS] = n
            aux[AuxField.TOTAL_TOKENS] = t
            aux[AuxField.CHECKSUM] = self.block_checksum(block, n) if checksum else 0

    def gather(self, blocks: Sequence[int], num_tokens: int) -> MultimodalItem:
        """Copy the first `num_tokens` tokens held by `blocks` (in order) into new tensors."""
        if len(blocks) < self.layout.blocks_for(num_tokens):
            raise ValueError(f"{num_tokens} tokens do not fit in {len(blocks)} blocks")
        h, k = self.layout.hidden_size, self.layout.num_deepstack
        dtype = self.embeddings.dtype
        device = self.embeddings.device
        out = MultimodalItem(
            embeddings=torch.empty((num_tokens, h), dtype=dtype, device=device),
            deepstack=torch.empty((num_tokens, k, h), dtype=dtype, device=device) if k else None,
            fill_ids=torch.empty((num_tokens,), dtype=torch.int64, device=device),
            positions=torch.empty((num_tokens, 3), dtype=torch.int64, device=device),
        )
        b = self.layout.block_tokens
        for run_start, first, count in _runs(blocks[: self.layout.blocks_for(num_tokens)]):
            lo, hi = first * b, min(num_tokens, (first + count) * b)
            n = hi - lo
            sl = slice(run_start, run_start + count)
            out.embeddings[lo:hi].copy_(self.embeddings[sl].view(-1, h)[:n])
            if out.deepstack is not None and self.deepstack is not None:
                out.deepstack[lo:hi].copy_(self.deepstack[sl].view(-1, k, h)[:n])
            out.fill_ids[lo:hi].copy_(self.fill_ids[sl].view(-1)[:n])
            out.positions[lo:hi].copy_(self.positions[sl].view(-1, 3)[:n])
        return out

    def block_checksum(self, block: int, num_tokens: int | None = None) -> int:
        """Exact integer sum of the bits of the block's first `num_tokens` embedding and
        DeepStack rows (default: as many as its aux record says)."""
        n = int(self.aux[block, AuxField.NUM_TOKENS]) if num_tokens is None else num_tokens
        view = _INT_VIEW[self.embeddings.element_size()]
        total = int(self.embeddings[block, :n].view(view).sum(dtype=torch.int64))
        if self.deepstack is not None:
            total += int(self.deepstack[block, :n].view(view).sum(dtype=torch.int64))
        return total

    def _check_item(self, item: MultimodalItem) -> None:
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
