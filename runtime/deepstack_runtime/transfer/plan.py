"""Pure planning of the writes that move one chunk of a sequence between two pools.

A chunk is a run of tokens that starts at a block boundary. Source block i holds the same
tokens as destination block i. Blocks consecutive on both sides merge into one entry, so
the number of entries depends on fragmentation, never on the number of blocks; an entry
covers exactly the token records of its tokens (see buffers.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from deepstack_runtime.buffers import MultimodalDataBuffers


@dataclass(frozen=True)
class RegionInfo:
    """A pool's arena, as the receiver describes it to the sender."""

    base_ptr: int
    block_tokens: int
    token_bytes: int

    @property
    def block_bytes(self) -> int:
        return self.block_tokens * self.token_bytes


def region_of(buffers: MultimodalDataBuffers) -> RegionInfo:
    layout = buffers.layout
    return RegionInfo(buffers.base_ptr, layout.block_tokens, layout.token_bytes)


@dataclass(frozen=True)
class WriteEntry:
    src_ptr: int
    dst_ptr: int
    nbytes: int


@dataclass(frozen=True)
class Run:
    src_block: int
    dst_block: int
    count: int
    index: int  # position of the run's first block within the chunk


def coalesce(src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> list[Run]:
    """Group block pairs into runs consecutive on both sides."""
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(
            f"{len(src_blocks)} source blocks but {len(dst_blocks)} destination blocks"
        )
    runs: list[Run] = []
    i = 0
    while i < len(src_blocks):
        j = i + 1
        while (
            j < len(src_blocks)
            and src_blocks[j] == src_blocks[j - 1] + 1
            and dst_blocks[j] == dst_blocks[j - 1] + 1
        ):
            j += 1
        runs.append(Run(src_blocks[i], dst_blocks[i], j - i, i))
        i = j
    return runs


def plan_chunk(
    src: RegionInfo,
    dst: RegionInfo,
    src_blocks: Sequence[int],
    dst_blocks: Sequence[int],
    tokens: int,
    block_tokens: int,
) -> list[WriteEntry]:
    """Entries that copy `tokens` tokens (all blocks full but maybe the last) from
    `src_blocks` to `dst_blocks`."""
    if tokens < 1 or -(-tokens // block_tokens) != len(src_blocks):
        raise ValueError(f"{tokens} tokens do not fill {len(src_blocks)} blocks of {block_tokens}")
    if (src.block_tokens, src.token_bytes) != (dst.block_tokens, dst.token_bytes):
        raise ValueError("block sizes differ between the two pools")
    entries: list[WriteEntry] = []
    for run in coalesce(src_blocks, dst_blocks):
        run_tokens = min(tokens - run.index * block_tokens, run.count * block_tokens)
        entries.append(
            WriteEntry(
                src.base_ptr + run.src_block * src.block_bytes,
                dst.base_ptr + run.dst_block * dst.block_bytes,
                run_tokens * src.token_bytes,
            )
        )
    return entries
