"""Block allocator over a fixed pool, with exact accounting.

Allocation prefers one contiguous run (first fit), because contiguous blocks coalesce into a
single transfer entry; when no run is long enough it takes the lowest free blocks.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

from deepstack_runtime.errors import FailureReason, TransferError

UsageListener = Callable[[int, int], None]  # (used, free)


class BlockAllocator:
    def __init__(self, num_blocks: int, on_change: UsageListener | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # Free space as sorted, disjoint, non-adjacent [start, end) runs.
        self._starts: list[int] = [0]
        self._ends: list[int] = [num_blocks]
        self._free = num_blocks
        self._lock = threading.Lock()
        self._on_change = on_change
        self._notify()

    @property
    def free_blocks(self) -> int:
        return self._free

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self._free

    def alloc(self, count: int) -> list[int]:
        """Take `count` blocks. Raises TransferError(OVERSIZE) if the pool could never
        hold them and TransferError(POOL_EXHAUSTED) if it cannot now."""
        if count < 0:
            raise ValueError(f"cannot allocate {count} blocks")
        if count > self.num_blocks:
            raise TransferError(
                FailureReason.OVERSIZE,
                f"{count} blocks requested but the whole pool has {self.num_blocks}",
            )
        with self._lock:
            if count > self._free:
                raise TransferError(
                    FailureReason.POOL_EXHAUSTED,
                    f"{count} blocks requested, {self._free} of {self.num_blocks} free",
                )
            blocks = self._take_run(count)
            if blocks is None:
                blocks = self._take_lowest(count)
            self._free -= count
        self._notify()
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Return blocks. Freeing a block that is not allocated raises ValueError and
        changes nothing."""
        if not blocks:
            return
        ordered = sorted(blocks)
        if len(set(ordered)) != len(ordered):
            raise ValueError("the same block appears twice in one free()")
        with self._lock:
            for block in ordered:
                if not 0 <= block < self.num_blocks or self._is_free(block):
                    raise ValueError(f"block {block} is not allocated (double free?)")
            for block in ordered:
                self._insert(block)
            self._free += len(ordered)
        self._notify()

    # --- internals -------------------------------------------------------------------

    def _notify(self) -> None:
        if self._on_change is not None:
            self._on_change(self.used_blocks, self._free)

    def _is_free(self, block: int) -> bool:
        i = bisect.bisect_right(self._starts, block) - 1
        return i >= 0 and block < self._ends[i]

    def _take_run(self, count: int) -> list[int] | None:
        for i, (start, end) in enumerate(zip(self._starts, self._ends, strict=True)):
            if end - start >= count:
                if end - start == count:
                    del self._starts[i], self._ends[i]
                else:
                    self._starts[i] = start + count
                return list(range(start, start + count))
        return None

    def _take_lowest(self, count: int) -> list[int]:
        taken: list[int] = []
        while len(taken) < count:
            start, end = self._starts[0], self._ends[0]
            n = min(end - start, count - len(taken))
            taken.extend(range(start, start + n))
            if start + n == end:
                del self._starts[0], self._ends[0]
            else:
                self._starts[0] = start + n
        return taken

    def _insert(self, block: int) -> None:
        i = bisect.bisect_right(self._starts, block)
        joins_left = i > 0 and self._ends[i - 1] == block
        joins_right = i < len(self._starts) and self._starts[i] == block + 1
        if joins_left and joins_right:
            self._ends[i - 1] = self._ends[i]
            del self._starts[i], self._ends[i]
        elif joins_left:
            self._ends[i - 1] = block + 1
        elif joins_right:
            self._starts[i] = block
        else:
            self._starts.insert(i, block)
            self._ends.insert(i, block + 1)
