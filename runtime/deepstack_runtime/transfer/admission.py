"""The language side's blocks: which receipt gets them, and when.

Allocation cannot deadlock: when the sequence length is known (the language side knows it
from the prompt), a receipt is admitted only once the pool can hold all of it, in arrival
order, and the blocks of its later rounds are reserved then, so no receipt ever holds
blocks while it waits for more (no hold-and-wait). At most `max_queued` receipts wait;
the next is refused at once (POOL_EXHAUSTED, which the server answers 503 + Retry-After).
Without a known length, a round waits for blocks at most `resume_timeout` and then
fails, freeing what it held.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Protocol

from deepstack_runtime.allocator import BlockAllocator
from deepstack_runtime.buffers import BufferLayout
from deepstack_runtime.errors import FailureReason, TransferError
from deepstack_runtime.metrics import TransferMetrics
from deepstack_runtime.transfer.settings import TransferSettings


class Reserving(Protocol):
    reserved: int  # blocks admitted for it and not yet taken


class BlockAdmission:
    """Admits receipts to the pool in arrival order and hands them blocks."""

    def __init__(
        self,
        layout: BufferLayout,
        allocator: BlockAllocator,
        settings: TransferSettings,
        metrics: TransferMetrics,
    ) -> None:
        self.layout = layout
        self.allocator = allocator
        self.settings = settings
        self.metrics = metrics
        self._freed = asyncio.Event()
        self._promised = 0  # blocks reserved by admitted receipts, not yet allocated
        self._queue: list[object] = []  # receipts waiting for admission, in arrival order

    def _available(self) -> int:
        return self.allocator.free_blocks - self._promised

    async def admit(self, blocks: int) -> int:
        """Reserve `blocks` for one receipt, waiting in arrival order (up to the resume
        timeout) until the pool can hold them all; returns the reservation."""
        if blocks > self.layout.num_blocks:
            raise TransferError(
                FailureReason.OVERSIZE,
                f"{blocks} blocks needed; the whole pool has {self.layout.num_blocks}",
            )
        if len(self._queue) >= self.settings.max_queued:
            # Bounded: a client told "busy" at once can go elsewhere or retry later.
            raise TransferError(
                FailureReason.POOL_EXHAUSTED,
                f"{len(self._queue)} requests already wait for blocks "
                f"({self._available()} of {self.layout.num_blocks} free)",
            )
        ticket = object()
        self._queue.append(ticket)
        self.metrics.queued.set(len(self._queue))
        try:
            await self._wait_until(
                lambda: self._queue[0] is ticket and self._available() >= blocks,
                f"{blocks} blocks needed",
            )
            self._promised += blocks
            return blocks
        finally:
            self._queue.remove(ticket)
            self.metrics.queued.set(len(self._queue))
            self._freed.set()  # the next in line may fit now

    def unreserve(self, blocks: int) -> None:
        if blocks:
            self._promised -= blocks
            self._freed.set()

    async def take(self, receipt: Reserving, count: int) -> list[int]:
        """`count` blocks for `receipt`: from its reservation, which never waits, or (for a
        receipt of unknown length) from the pool, waiting up to the resume timeout."""
        from_reservation = min(count, receipt.reserved)
        blocks = []
        if from_reservation:
            receipt.reserved -= from_reservation
            self._promised -= from_reservation
            blocks = self.allocator.alloc(from_reservation)  # free >= promised: never fails
        if count > from_reservation:
            try:
                blocks += await self._alloc(count - from_reservation)
            except BaseException:
                self.free(blocks)
                raise
        return blocks

    def free(self, held: list[int]) -> None:
        if held:
            self.allocator.free(held)
            self._freed.set()

    async def _alloc(self, count: int) -> list[int]:
        """Allocate from what no reservation holds, waiting for blocks freed by other
        requests up to the resume timeout."""
        if count <= self.layout.num_blocks:
            await self._wait_until(lambda: self._available() >= count, f"{count} blocks needed")
        return self.allocator.alloc(count)  # OVERSIZE beyond the whole pool

    async def _wait_until(self, ready: Callable[[], bool], need: str) -> None:
        """Wait until `ready()`, re-checked whenever blocks are freed, up to the resume
        timeout; then POOL_EXHAUSTED."""
        deadline = time.monotonic() + self.settings.resume_timeout
        while not ready():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferError(
                    FailureReason.POOL_EXHAUSTED,
                    f"{need}, {self._available()} of {self.layout.num_blocks} free for "
                    f"{self.settings.resume_timeout:g}s",
                )
            self._freed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._freed.wait()
