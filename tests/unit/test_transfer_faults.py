"""Sender and receiver on faults of their own (pure logic over the in-process transport;
the Mooncake tests cover the real path): nothing leaks, nothing reports success."""

from __future__ import annotations

import asyncio

import pytest
import torch

from deepstack_runtime.buffers import BufferLayout, MultimodalDataBuffers, MultimodalItem
from deepstack_runtime.errors import FailureReason, TransferError
from deepstack_runtime.transfer.receiver import EmbeddingReceiver
from deepstack_runtime.transfer.sender import EmbeddingSender
from deepstack_runtime.transfer.settings import TransferSettings
from tests.support.inprocess_transport import InProcessTransport

LAYOUT = BufferLayout(num_blocks=8, block_tokens=4, hidden_size=8, num_deepstack=2, dtype="float32")
SETTINGS = TransferSettings(default_tokens=8, handshake_timeout=2, transfer_timeout=4)


def item(tokens: int) -> MultimodalItem:
    return MultimodalItem(
        embeddings=torch.randn(tokens, 8),
        deepstack=torch.randn(tokens, 2, 8),
        fill_ids=torch.arange(tokens),
        positions=torch.zeros(tokens, 3, dtype=torch.int64),
    )


def test_a_receiver_failing_for_any_reason_frees_its_blocks() -> None:
    def broken(room: str, round_no: int) -> None:
        raise RuntimeError("a hook that breaks")

    async def scenario() -> tuple[TransferError, int, int]:
        sender = EmbeddingSender(MultimodalDataBuffers(LAYOUT), InProcessTransport(), SETTINGS)
        receiver = EmbeddingReceiver(
            MultimodalDataBuffers(LAYOUT), InProcessTransport(), SETTINGS,
            on_chunk_received=broken,
        )  # fmt: skip
        await sender.start()
        receiver.start()
        receiving = asyncio.ensure_future(receiver.receive("r", sender.address))
        await sender.submit("r", item(6))
        with pytest.raises(TransferError) as failed:
            await receiving
        receiver_used = receiver.allocator.used_blocks  # freed before it raised
        await receiver.close()
        async with asyncio.timeout(5):  # the encoder hears why and lets go of the room
            while sender.rooms:
                await asyncio.sleep(0.01)
        sender_used = sender.allocator.used_blocks
        await sender.stop()
        return failed.value, receiver_used, sender_used

    error, receiver_used, sender_used = asyncio.run(scenario())
    assert error.reason is FailureReason.TRANSFER_ERROR
    assert "a hook that breaks" in error.message
    assert (receiver_used, sender_used) == (0, 0)


def test_a_reservation_for_a_room_taken_meanwhile_is_refused_and_given_back() -> None:
    async def scenario() -> int:
        sender = EmbeddingSender(MultimodalDataBuffers(LAYOUT), InProcessTransport(), SETTINGS)
        await sender.start()
        reserved = await sender.reserve("same", 4)
        assert reserved is not None
        await sender.submit("same", item(4))  # another request with the same room, first
        with pytest.raises(TransferError, match="already submitted"):
            await sender.submit("same", reserved.item, reserved)
        used = sender.allocator.used_blocks  # the first room's block only
        await sender.stop()
        return used

    assert asyncio.run(scenario()) == 1


def test_a_refused_room_is_heard_at_once_by_its_waiting_receiver() -> None:
    async def scenario() -> tuple[TransferError, float]:
        sender = EmbeddingSender(MultimodalDataBuffers(LAYOUT), InProcessTransport(), SETTINGS)
        receiver = EmbeddingReceiver(MultimodalDataBuffers(LAYOUT), InProcessTransport(), SETTINGS)
        await sender.start()
        receiver.start()
        receiving = asyncio.ensure_future(receiver.receive("busy", sender.address))
        async with asyncio.timeout(5):  # its hello is in: it waits for the room
            while "busy" not in sender._parked:
                await asyncio.sleep(0.005)
        started = asyncio.get_running_loop().time()
        await sender.refuse("busy", TransferError(FailureReason.POOL_EXHAUSTED, "tower full"))
        with pytest.raises(TransferError) as refused:
            await receiving
        waited = asyncio.get_running_loop().time() - started
        await sender.stop()
        return refused.value, waited

    error, waited = asyncio.run(scenario())
    assert error.reason is FailureReason.POOL_EXHAUSTED
    assert "tower full" in error.message
    assert waited < 1.0  # not the room wait (the transfer timeout less one handshake)


def test_rows_wait_for_a_full_pool_to_free_blocks_instead_of_being_refused() -> None:
    """A pool full of rows whose receivers have not taken them yet: the next item waits
    until a receiver takes its room (then fits), and is refused only if none does."""

    async def scenario() -> tuple[bool, bool, float]:
        sender = EmbeddingSender(MultimodalDataBuffers(LAYOUT), InProcessTransport(), SETTINGS)
        receiver = EmbeddingReceiver(MultimodalDataBuffers(LAYOUT), InProcessTransport(), SETTINGS)
        await sender.start()
        receiver.start()
        held = await sender.submit("first", item(LAYOUT.num_blocks * LAYOUT.block_tokens))
        assert sender.allocator.free_blocks == 0
        gave_up = await sender.wait_for_room(4, timeout=0.2)  # nobody takes "first"
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiting = asyncio.ensure_future(sender.wait_for_room(4, timeout=5))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await receiver.receive("first", sender.address)  # its receiver comes
        await held
        fits = await waiting
        waited = loop.time() - started
        await receiver.close()
        await sender.stop()
        return gave_up, fits, waited

    gave_up, fits, waited = asyncio.run(scenario())
    assert (gave_up, fits) == (False, True)
    assert 0.1 <= waited < 4
