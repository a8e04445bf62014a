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


# Blocks of 4 records of 32 bytes, end to end: a block is 128 bytes.
SRC = RegionInfo(base_ptr=1000, block_tokens=4, token_bytes=32)
DST = RegionInfo(base_ptr=9000, block_tokens=4, token_bytes=32)


@pytest.mark.parametrize(
    ("src_blocks", "dst_blocks", "tokens", "entries"),
    [
        # One token: one record.
        ([0], [0], 1, [WriteEntry(1000, 9000, 32)]),
        # A full block.
        ([1], [2], 4, [WriteEntry(1000 + 128, 9000 + 256, 128)]),
        # 10 tokens, 3 consecutive blocks, the last partial: one entry, exact bytes.
        ([2, 3, 4], [0, 1, 2], 10, [WriteEntry(1000 + 256, 9000, 10 * 32)]),
        # A fragmented destination splits the run.
        (
            [0, 1, 2],
            [5, 6, 0],
            9,
            [WriteEntry(1000, 9000 + 5 * 128, 256), WriteEntry(1000 + 256, 9000, 32)],
        ),
    ],
)
def test_plan_chunk(
    src_blocks: list[int], dst_blocks: list[int], tokens: int, entries: list[WriteEntry]
) -> None:
    assert plan_chunk(SRC, DST, src_blocks, dst_blocks, tokens, 4) == entries


def test_entry_count_does_not_grow_with_blocks() -> None:
    n = 1000
    entries = plan_chunk(SRC, DST, list(range(n)), list(range(n, 2 * n)), n * 4 - 1, 4)
    assert len(entries) == 1
    assert entries[0].nbytes == (n * 4 - 1) * 32


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
    with pytest.raises(ValueError, match="block sizes differ"):
        plan_chunk(SRC, RegionInfo(9000, 4, 48), [0], [0], 4, 4)
