"""Pure planning of the writes that move one chunk of a sequence between two pools.

A chunk is a run of tokens that starts at a block boundary. Source block i holds the same
tokens as destination block i. Pairs of blocks that are consecutive on both sides merge
into one entry per payload, so the number of entries depends on fragmentation, never on
the number of blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RegionInfo:
    """Where a payload lives in one pool (what the receiver tells the sender)."""

    base_ptr: int
    block_bytes: int
    token_bytes: int  # 0 for per-block payloads (aux)


@dataclass(frozen=True)
class WriteEntry:
    payload: str
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
    src: Mapping[str, RegionInfo],
    dst: Mapping[str, RegionInfo],
    src_blocks: Sequence[int],
    dst_blocks: Sequence[int],
    tokens: int,
    block_tokens: int,
) -> list[WriteEntry]:
    """Entries that copy `tokens` tokens (all blocks full but maybe the last) from
    `src_blocks` to `dst_blocks`, for every payload both sides have."""
    if tokens < 1 or -(-tokens // block_tokens) != len(src_blocks):
        raise ValueError(f"{tokens} tokens do not fill {len(src_blocks)} blocks of {block_tokens}")
    if set(src) != set(dst):
        raise ValueError(f"payloads differ: {sorted(src)} vs {sorted(dst)}")
    entries: list[WriteEntry] = []
    for run in coalesce(src_blocks, dst_blocks):
        run_tokens = min(tokens - run.index * block_tokens, run.count * block_tokens)
        for payload, s in src.items():
            d = dst[payload]
            if (s.block_bytes, s.token_bytes) != (d.block_bytes, d.token_bytes):
                raise ValueError(f"{payload}: block sizes differ between the two pools")
            nbytes = run_tokens * s.token_bytes if s.token_bytes else run.count * s.block_bytes
            entries.append(
                WriteEntry(
                    payload,
                    s.base_ptr + run.src_block * s.block_bytes,
                    d.base_ptr + run.dst_block * d.block_bytes,
                    nbytes,
                )
            )
    return entries
