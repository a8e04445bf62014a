"""The encoder's bootstrap port against hellos that would cost it or another pod: checked
whole before anything is allocated, only for the connecting peer's own memory, and with
a bounded share per peer (real sockets, the in-process transport)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from deepstack_runtime.buffers import BufferLayout, MultimodalDataBuffers
from deepstack_runtime.errors import FailureReason, TransferError
from deepstack_runtime.transfer import protocol
from deepstack_runtime.transfer.check import check_room
from deepstack_runtime.transfer.plan import region_of
from deepstack_runtime.transfer.sender import EmbeddingSender
from deepstack_runtime.transfer.settings import TransferSettings
from tests.support.inprocess_transport import InProcessTransport

LAYOUT = BufferLayout(num_blocks=8, block_tokens=4, hidden_size=8, num_deepstack=2, dtype="float32")
SETTINGS = TransferSettings(default_tokens=8, handshake_timeout=2, transfer_timeout=4, max_queued=2)
SESSION = "127.0.0.1:7"  # on the address the test connects from


def hello(room: str, session: str = SESSION, blocks: list[int] | None = None) -> dict[str, Any]:
    return {
        "op": "hello",
        "room": room,
        "session": session,
        "layout": dataclasses.asdict(LAYOUT),
        "region": dataclasses.asdict(region_of(MultimodalDataBuffers(LAYOUT))),
        "blocks": [0, 1] if blocks is None else blocks,
    }


@asynccontextmanager
async def encoder() -> AsyncIterator[EmbeddingSender]:
    sender = EmbeddingSender(MultimodalDataBuffers(LAYOUT), InProcessTransport(), SETTINGS)
    await sender.start()
    try:
        yield sender
    finally:
        await sender.stop()


async def connect(
    sender: EmbeddingSender, message: dict[str, Any] | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = sender.address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    if message is not None:
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()
    return reader, writer


async def answer(reader: asyncio.StreamReader) -> TransferError:
    """The encoder's refusal, which must come at once."""
    with pytest.raises(TransferError) as refused:
        await protocol.receive(reader, 1.0, "answer")
    assert refused.value.from_peer, refused.value  # its error, not our timeout
    return refused.value


def test_a_transfer_check_hello_with_bad_blocks_allocates_nothing() -> None:
    async def scenario() -> tuple[TransferError, int, int]:
        async with encoder() as sender:
            reader, writer = await connect(sender, hello(check_room(), blocks=[LAYOUT.num_blocks]))
            error = await answer(reader)
            writer.close()
            return error, sender.allocator.used_blocks, sender.rooms

    error, used, rooms = asyncio.run(scenario())
    assert error.reason is FailureReason.BAD_REQUEST
    assert "blocks must be" in error.message
    assert (used, rooms) == (0, 0)


def test_a_hello_for_another_hosts_memory_is_refused() -> None:
    async def scenario() -> tuple[TransferError, int]:
        async with encoder() as sender:
            reader, writer = await connect(sender, hello("r1", session="10.9.8.7:15001"))
            error = await answer(reader)
            writer.close()
            return error, sender.parked

    error, parked = asyncio.run(scenario())
    assert error.reason is FailureReason.BAD_REQUEST
    assert "10.9.8.7 is not the connecting peer 127.0.0.1" in error.message
    assert parked == 0


def test_one_peer_waits_for_at_most_its_share_of_rooms() -> None:
    """Rooms not yet submitted hold a connection each: a peer's share of connections
    bounds them (as many as a language pod of the same resource can have in flight)."""

    async def scenario() -> tuple[TransferError, int, int]:
        async with encoder() as sender:
            share = sender.max_peer_connections
            waiting = [await connect(sender, hello(f"r{i}")) for i in range(share)]
            async with asyncio.timeout(2):
                while sender.parked < share:
                    await asyncio.sleep(0.005)
            reader, writer = await connect(sender, hello("one-too-many"))
            error = await answer(reader)
            for _, w in [*waiting, (reader, writer)]:
                w.close()
            return error, sender.parked, share

    error, parked, share = asyncio.run(scenario())
    assert error.reason is FailureReason.POOL_EXHAUSTED
    assert f"already holds {share} connections" in error.message
    assert parked == share


def test_one_peer_holds_at_most_its_share_of_connections() -> None:
    async def scenario() -> tuple[TransferError, int]:
        async with encoder() as sender:
            share = sender.max_peer_connections
            idle = [await connect(sender, None) for _ in range(share)]  # no hello yet
            reader, writer = await connect(sender, None)
            error = await answer(reader)
            for _, w in [*idle, (reader, writer)]:
                w.close()
            return error, share

    error, share = asyncio.run(scenario())
    assert share == SETTINGS.max_queued + LAYOUT.num_blocks
    assert error.reason is FailureReason.POOL_EXHAUSTED
    assert f"already holds {share} connections" in error.message


@pytest.mark.parametrize(
    ("session", "peer", "refusal"),
    [
        ("127.0.0.1:15001", "127.0.0.1", ""),
        ("10.0.0.5:15001", "::ffff:10.0.0.5", ""),  # an IPv4 peer on a dual-stack socket
        ("[fd00::5]:15001", "fd00::5", ""),
        ("fd00::5:15001", "fd00:0::5", ""),  # unbracketed, as Mooncake may spell it
        ("10.0.0.6:15001", "10.0.0.5", "is not the connecting peer"),
        ("127.0.0.2:15001", "127.0.0.1", "is not the connecting peer"),
        ("pod-0.svc:15001", "10.0.0.5", "is not an IP address"),
        ("10.0.0.5", "10.0.0.5", "bad session"),
        ("10.0.0.5:port", "10.0.0.5", "bad session"),
        (None, "10.0.0.5", "bad session"),
    ],
)
def test_a_session_must_name_the_connecting_peer(session: object, peer: str, refusal: str) -> None:
    if not refusal:
        assert protocol.check_session(session, peer) == session
        return
    with pytest.raises(TransferError, match=refusal) as refused:
        protocol.check_session(session, peer)
    assert refused.value.reason is FailureReason.BAD_REQUEST
