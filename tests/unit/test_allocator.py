from __future__ import annotations

import pytest

from deepstack_runtime.allocator import BlockAllocator
from deepstack_runtime.errors import FailureReason, TransferError


@pytest.mark.parametrize(
    ("frees", "request_", "expected"),
    [
        # (blocks freed after allocating the whole pool of 8, request, blocks given)
        ([], 0, []),
        ([2, 3, 4], 3, [2, 3, 4]),  # an exact run
        ([0, 5, 6, 7], 3, [5, 6, 7]),  # first run long enough wins over lower blocks
        ([0, 2, 4, 6], 3, [0, 2, 4]),  # no run: lowest blocks
        ([1, 2, 5, 6, 7], 2, [1, 2]),  # first fit
    ],
)
def test_allocation_prefers_contiguous_runs(
    frees: list[int], request_: int, expected: list[int]
) -> None:
    a = BlockAllocator(8)
    assert a.alloc(8) == list(range(8))
    a.free(frees)
    assert a.alloc(request_) == expected
    assert a.used_blocks == 8 - len(frees) + request_


def test_free_merges_runs_back_into_one() -> None:
    a = BlockAllocator(6)
    first, second, third = a.alloc(2), a.alloc(2), a.alloc(2)
    a.free(second)
    a.free(first)
    a.free(third)
    assert a.alloc(6) == list(range(6))


def test_accounting_reaches_listener() -> None:
    seen: list[tuple[int, int]] = []
    a = BlockAllocator(4, on_change=lambda used, free: seen.append((used, free)))
    blocks = a.alloc(3)
    a.free(blocks)
    assert seen == [(0, 4), (3, 1), (0, 4)]


@pytest.mark.parametrize(
    ("count", "reason"),
    [(5, FailureReason.OVERSIZE), (3, FailureReason.POOL_EXHAUSTED)],
)
def test_requests_that_do_not_fit(count: int, reason: FailureReason) -> None:
    a = BlockAllocator(4)
    a.alloc(2)
    with pytest.raises(TransferError) as caught:
        a.alloc(count)
    assert caught.value.reason is reason
    assert a.used_blocks == 2  # nothing taken by the failed request


@pytest.mark.parametrize("bad", [[1], [0, 0], [9], [-1]])
def test_double_or_foreign_free_is_refused_and_changes_nothing(bad: list[int]) -> None:
    a = BlockAllocator(4)
    a.alloc(1)  # block 0 in use
    with pytest.raises(ValueError, match=r"not allocated|twice"):
        a.free(bad)
    assert a.used_blocks == 1
    a.free([0])
    assert a.used_blocks == 0
