"""The language side: preallocates `default_tokens`, receives what fits, and asks the encode
side to resume into newly allocated blocks until the whole sequence is in place."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable

from deepstack_runtime.allocator import BlockAllocator
from deepstack_runtime.buffers import AuxField, MultimodalDataBuffers, MultimodalItem
from deepstack_runtime.errors import FailureReason, TransferError
from deepstack_runtime.metrics import TransferMetrics
from deepstack_runtime.transfer import protocol
from deepstack_runtime.transfer.base import Transport
from deepstack_runtime.transfer.plan import region_of
from deepstack_runtime.transfer.settings import TransferSettings

# Called when a chunk has arrived, before the receiver answers: (room, round).
ChunkObserver = Callable[[str, int], None]


class EmbeddingReceiver:
    def __init__(
        self,
        buffers: MultimodalDataBuffers,
        transport: Transport,
        settings: TransferSettings,
        metrics: TransferMetrics | None = None,
        *,
        on_chunk_received: ChunkObserver | None = None,
    ) -> None:
        self.buffers = buffers
        self.layout = buffers.layout
        self.transport = transport
        self.settings = settings
        self.metrics = metrics or TransferMetrics()
        self.allocator = BlockAllocator(self.layout.num_blocks, on_change=self.metrics.set_blocks)
        self._freed = asyncio.Event()
        self._on_chunk_received = on_chunk_received
        self._default_blocks = self.layout.blocks_for(settings.default_tokens)
        if self._default_blocks > self.layout.num_blocks:
            raise ValueError(
                f"default_tokens={settings.default_tokens} needs {self._default_blocks} blocks; "
                f"the pool has {self.layout.num_blocks}"
            )

    def start(self) -> None:
        self.transport.register(self.buffers.base_ptr, self.buffers.nbytes)

    async def receive(
        self, room: str, sender_address: str, out: MultimodalItem | None = None
    ) -> MultimodalItem:
        """Receive the item of `room` from the encoder at `sender_address` ("host:port"),
        into `out` if given (it must hold exactly the sequence's tokens: the language side
        knows the count from the image grid). Raises TransferError; every block it took is
        free again when it returns or raises."""
        protocol.check_room(room)
        started = time.monotonic()
        held: list[int] = []
        writer: asyncio.StreamWriter | None = None
        self.metrics.inflight.inc()
        try:
            async with asyncio.timeout(self.settings.transfer_timeout):
                held += await self._alloc(self._default_blocks)
                reader, writer = await self._connect(sender_address)
                item = await self._receive_rounds(room, held, reader, writer, out)
            self.metrics.duration.observe(time.monotonic() - started)
            return item
        except TimeoutError:
            error = TransferError(
                FailureReason.TIMEOUT,
                f"room {room}: not received within {self.settings.transfer_timeout:g}s",
            )
            await self._fail(error, writer)
            raise error from None
        except TransferError as error:
            await self._fail(error, writer)
            raise
        finally:
            if held:
                self.allocator.free(held)
                self._freed.set()
            self.metrics.inflight.dec()
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _fail(self, error: TransferError, writer: asyncio.StreamWriter | None) -> None:
        self.metrics.record_failure(error.reason)
        if writer is not None and error.reason is not FailureReason.PEER_LOST:
            await protocol.send_error_quietly(writer, error)

    async def _connect(self, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise TransferError(FailureReason.BAD_REQUEST, f"bad encoder address {address!r}")
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(host, int(port), limit=protocol.MAX_MESSAGE_BYTES),
                self.settings.handshake_timeout,
            )
        except TimeoutError:
            raise TransferError(
                FailureReason.TIMEOUT,
                f"connecting to {address} took over {self.settings.handshake_timeout:g}s",
            ) from None
        except OSError as e:
            raise TransferError(
                FailureReason.CONNECT_FAILED, f"cannot reach encoder {address}: {e}"
            ) from e

    async def _alloc(self, count: int) -> list[int]:
        """Allocate, waiting for blocks freed by other requests up to the resume timeout."""
        deadline = time.monotonic() + self.settings.resume_timeout
        while True:
            try:
                return self.allocator.alloc(count)
            except TransferError as e:
                if e.reason is not FailureReason.POOL_EXHAUSTED:
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                self._freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), left)

    async def _receive_rounds(
        self,
        room: str,
        held: list[int],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        out: MultimodalItem | None,
    ) -> MultimodalItem:
        await protocol.send(
            writer,
            "hello",
            room=room,
            session=self.transport.session_id,
            layout=dataclasses.asdict(self.layout),
            region=dataclasses.asdict(region_of(self.buffers)),
            blocks=held,
        )
        received = 0
        round_no = 0
        # The encoder may still be encoding: the first answer may take until the deadline.
        waiting = self.settings.transfer_timeout
        while True:
            msg = await protocol.receive(reader, waiting, "written")
            if msg["op"] != "written" or protocol.int_field(msg, "offset") != received:
                raise TransferError(
                    FailureReason.BAD_REQUEST, f"unexpected {msg} at offset {received}"
                )
            tokens, total = protocol.int_field(msg, "tokens"), protocol.int_field(msg, "total")
            if out is not None and out.num_tokens != total:
                raise TransferError(
                    FailureReason.BAD_REQUEST,
                    f"room {room}: the encoder sends {total} tokens, {out.num_tokens} expected",
                )
            if (
                tokens < 1
                or received + tokens > total
                or received + tokens > len(held) * self.layout.block_tokens
            ):
                raise TransferError(
                    FailureReason.BAD_REQUEST, f"bad chunk {msg} for {len(held)} blocks"
                )
            if self._on_chunk_received is not None:
                self._on_chunk_received(room, round_no)
            received += tokens
            if received == total:
                item = self.buffers.gather(held, total, out)
                if self.settings.checksum:
                    self._verify(held, total)
                await protocol.send(writer, "done")
                return item
            round_no += 1
            if round_no > self.settings.max_rounds:
                raise TransferError(
                    FailureReason.TOO_MANY_ROUNDS,
                    f"{total} tokens need more than {self.settings.max_rounds} resume rounds",
                )
            needed = self.layout.blocks_for(total - received)
            if len(held) + needed > self.layout.num_blocks:
                raise TransferError(
                    FailureReason.OVERSIZE,
                    f"room {room}: {total} tokens need {self.layout.blocks_for(total)} blocks; "
                    f"the whole pool has {self.layout.num_blocks}",
                )
            self.metrics.resumptions.inc()
            more = await self._alloc(needed)
            held += more
            await protocol.send(writer, "resume", offset=received, blocks=more)
            waiting = self.settings.resume_timeout

    def _verify(self, blocks: list[int], total: int) -> None:
        for i, block in enumerate(blocks[: self.layout.blocks_for(total)]):
            aux = self.buffers.aux[block]
            if (
                int(aux[AuxField.TOKEN_OFFSET]) != i * self.layout.block_tokens
                or int(aux[AuxField.TOTAL_TOKENS]) != total
            ):
                raise TransferError(
                    FailureReason.TRANSFER_ERROR, f"block {i}: aux record out of place"
                )
            if self.buffers.block_checksum(block) != int(aux[AuxField.CHECKSUM]):
                raise TransferError(FailureReason.TRANSFER_ERROR, f"block {i}: checksum mismatch")
