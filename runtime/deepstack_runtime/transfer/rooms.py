"""The encode side's rooms: an item held for its receiver (its state is the one sender.py
runs), the receiver's side of it, and the table of the rooms an encoder holds until their
receivers come, where a receiver waits for its room.

A room nobody came for within the transfer timeout expires, its blocks freed. A room
refused at submit (an item the pool cannot hold, the encoder full, ...) is kept as a
refusal for one handshake timeout, so that its receiver hears why at once instead of
waiting for it until `room_wait`.
"""

from __future__ import annotations

import asyncio
import enum
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from deepstack_runtime.allocator import BlockAllocator
from deepstack_runtime.buffers import BufferLayout, MultimodalItem
from deepstack_runtime.errors import FailureReason, TransferError
from deepstack_runtime.metrics import TransferMetrics
from deepstack_runtime.transfer import protocol
from deepstack_runtime.transfer.plan import RegionInfo
from deepstack_runtime.transfer.settings import TransferSettings


class SenderState(enum.Enum):
    WAITING = "waiting"
    SENDING = "sending"
    AWAITING = "awaiting"
    DONE = "done"
    FAILED = "failed"


@dataclass
class Room:
    blocks: list[int]
    num_tokens: int
    finished: asyncio.Future[None]
    checksums: list[int]  # per block, when checksums are on
    state: SenderState = SenderState.WAITING
    claimed: bool = False
    aborted: str = ""  # why, when this side gave up on the room
    writing: Future[bytes] | None = None  # the write in flight, if any (the fence)
    fenced: bool = False  # its last write missed its deadline and is not yet final
    sending: int = 0  # tokens of that write
    task: asyncio.Task[None] | None = None  # serving its receiver
    expiry: asyncio.TimerHandle | None = None
    submitted_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Reserved:
    """Blocks lent to an encoder for one room's item, and views of them to write into."""

    room: str
    blocks: list[int]
    item: MultimodalItem


@dataclass
class Target:
    """A receiver's side of a room, from its hello: where to write, how to tell it."""

    session: str
    region: RegionInfo
    blocks: list[int]  # where the first round goes
    peer: str  # the connecting address
    writer: asyncio.StreamWriter
    task: asyncio.Task[None] | None  # the connection's serving task
    entry: Room | None = None  # the room, once claimed


class RoomTable:
    """The rooms submitted to an encoder and not yet over, and the rooms it refused."""

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
        self.rooms: dict[str, Room] = {}
        # Rooms refused at submit (an item the pool cannot hold, ...), kept for one
        # handshake timeout so that their receiver hears why at once, not by a timeout.
        self._refused: dict[str, TransferError] = {}
        self._room_added = asyncio.Condition()

    def check_new(self, room: str, num_tokens: int) -> None:
        protocol.check_room(room)
        if room in self.rooms:
            raise TransferError(FailureReason.DUPLICATE_ROOM, f"room {room} is already submitted")
        if num_tokens < 1:
            raise TransferError(FailureReason.BAD_REQUEST, "an item must have at least one token")

    async def alloc(self, room: str, num_tokens: int) -> list[int]:
        """Blocks for `room`; a refusal is kept for one handshake timeout so that the
        room's receiver hears why at once."""
        try:
            blocks = self.allocator.alloc(self.layout.blocks_for(num_tokens))
        except TransferError as e:
            await self.refuse(room, e)
            raise
        self._refused.pop(room, None)  # submitted again, and this time it fits
        return blocks

    async def refuse(self, room: str, error: TransferError) -> None:
        """`room` will not be submitted: its receiver hears why at once, for one
        handshake timeout, instead of waiting."""
        self._refused[room] = error
        asyncio.get_running_loop().call_later(
            self.settings.handshake_timeout, self._forget_refusal, room, error
        )
        await self.announce()

    def _forget_refusal(self, room: str, error: TransferError) -> None:
        if self._refused.get(room) is error:
            del self._refused[room]

    async def announce(self) -> None:
        """Wake the receivers waiting for their room: it came, or was refused."""
        async with self._room_added:
            self._room_added.notify_all()

    def expire(self, room: str) -> None:
        entry = self.rooms.get(room)
        if entry is not None and not entry.claimed:
            error = TransferError(
                FailureReason.TIMEOUT,
                f"room {room}: no receiver came within {self.settings.transfer_timeout:g}s",
            )
            self.drop(room, error)
            self.metrics.record_failure(error.reason)

    def drop(self, room: str, error: TransferError | None) -> None:
        entry = self.rooms.pop(room, None)
        if entry is not None:
            if entry.expiry is not None:
                entry.expiry.cancel()
            self.allocator.free(entry.blocks)
            if not entry.finished.done():
                if error is None:
                    entry.finished.set_result(None)
                else:
                    entry.finished.set_exception(error)

    async def wait_for(self, room: str) -> Room:
        async def present() -> Room:
            async with self._room_added:
                await self._room_added.wait_for(lambda: room in self.rooms or room in self._refused)
            if room in self.rooms:
                return self.rooms[room]
            refused = self._refused[room]
            raise TransferError(refused.reason, f"the encoder refused it: {refused.message}")

        # Nearly as long as the receiver waits for its first chunk (the encode request may
        # still be queued behind other images), so that the receiver hears why in time.
        wait = self.settings.room_wait
        try:
            async with asyncio.timeout(wait):
                return await present()
        except TimeoutError:
            raise TransferError(
                FailureReason.UNKNOWN_ROOM,
                f"room {room} was not submitted to this encoder within {wait:g}s",
            ) from None
