from __future__ import annotations

import pytest

from deepstack_runtime.transfer.plan import RegionInfo, Run, WriteEntry, coalesce, plan_chunk


@pytest.mark.parametrize(
    ("src", "dst", "runs"),
    [
        ([], [], []),
        ([4], [9], [Run(4, 9, 1, 0)]),
        ([0, 1, 2, 3], [10, 11, 12, 13], [Run(0, 10, 4, 0)]),
        ([0, 1, 2, 3], [10, 11, 20, 21], [Run(0, 10, 2, 0), Run(2, 20, 2, 2)]),
        ([0, 1, 5, 6], [3, 4, 5, 6], [Run(0, 3, 2, 0), Run(5, 5, 2, 2)]),
        ([3, 2, 1], [0, 1, 2], [Run(3, 0, 1, 0), Run(2, 1, 1, 1), Run(1, 2, 1, 2)]),
    ],
)
def test_coalesce(src: list[int], dst: list[int], runs: list[Run]) -> None:
    assert coalesce(src, dst) == runs


SRC = {
    "embedding": RegionInfo(base_ptr=1000, block_bytes=64, token_bytes=16),
    "aux": RegionInfo(base_ptr=5000, block_bytes=32, token_bytes=0),
}
DST = {
    "embedding": RegionInfo(base_ptr=9000, block_bytes=64, token_bytes=16),
    "aux": RegionInfo(base_ptr=7000, block_bytes=32, token_bytes=0),
}


def test_contiguous_blocks_are_one_entry_per_payload_with_exact_bytes() -> None:
    # 10 tokens in blocks of 4: 4 + 4 + 2, the last block partial.
    entries = plan_chunk(SRC, DST, [2, 3, 4], [0, 1, 2], tokens=10, block_tokens=4)
    assert entries == [
        WriteEntry("embedding", 1000 + 2 * 64, 9000, 10 * 16),
        WriteEntry("aux", 5000 + 2 * 32, 7000, 3 * 32),
    ]


def test_fragmented_destination_splits_runs() -> None:
    entries = plan_chunk(SRC, DST, [0, 1, 2], [5, 6, 0], tokens=9, block_tokens=4)
    assert [(e.payload, e.dst_ptr, e.nbytes) for e in entries] == [
        ("embedding", 9000 + 5 * 64, 8 * 16),
        ("aux", 7000 + 5 * 32, 2 * 32),
        ("embedding", 9000, 1 * 16),
        ("aux", 7000, 32),
    ]


def test_entry_count_does_not_grow_with_blocks() -> None:
    n = 1000
    entries = plan_chunk(SRC, DST, list(range(n)), list(range(n, 2 * n)), n * 4, 4)
    assert len(entries) == len(SRC)


@pytest.mark.parametrize(
    ("src_blocks", "dst_blocks", "tokens", "message"),
    [
        ([0, 1], [0], 8, "2 source blocks but 1 destination"),
        ([0, 1], [0, 1], 9, "do not fill"),
        ([0, 1], [0, 1], 4, "do not fill"),
        ([0], [0], 0, "do not fill"),
    ],
)
def test_inconsistent_chunks_are_refused(
    src_blocks: list[int], dst_blocks: list[int], tokens: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        plan_chunk(SRC, DST, src_blocks, dst_blocks, tokens, 4)


def test_mismatched_block_sizes_are_refused() -> None:
    dst = {**DST, "embedding": RegionInfo(9000, 128, 32)}
    with pytest.raises(ValueError, match="block sizes differ"):
        plan_chunk(SRC, dst, [0], [0], 4, 4)
