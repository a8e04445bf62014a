"""The language side: preallocates `default_tokens`, receives what fits, and asks the encode
side to resume into newly allocated blocks until the whole sequence is in place.

A receipt goes CONNECTING -> RECEIVING (waiting for a chunk) <-> RESUMING (allocating
more, asking for it) -> DONE, or FAILED (timeout, abort, cancellation, peer lost). The
fence: after a failure while the encoder may still be writing (RECEIVING), the blocks
count as `fenced` and are freed only once the encoder says that none of its writes can
land any more: its `error`, which it sends only after Mooncake reported its last write
final (sender.py). A connection that ends without that word (the encoder died, or the
connection broke) does not prove that the encoder stopped writing: the blocks stay
fenced for the write timeout (`write_timeout`, plus one second per GB of the chunk, as
Mooncake counts), then are freed. Between rounds (RESUMING) nothing can be written, and
a failure frees the blocks at once.

Which receipt gets blocks, and when (admission in arrival order, without deadlock):
admission.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import time
from collections.abc import AsyncIterator, Callable

from deepstack_runtime.allocator import BlockAllocator
from deepstack_runtime.buffers import MultimodalDataBuffers, MultimodalItem, copy_item
from deepstack_runtime.errors import FailureReason, TransferError
from deepstack_runtime.metrics import TransferMetrics
from deepstack_runtime.transfer import protocol
from deepstack_runtime.transfer.admission import BlockAdmission
from deepstack_runtime.transfer.base import Transport
from deepstack_runtime.transfer.plan import region_of
from deepstack_runtime.transfer.settings import TransferSettings

# Called when a chunk has arrived, before the receiver answers: (room, round).
ChunkObserver = Callable[[str, int], None]


class ReceiptState(enum.Enum):
    CONNECTING = "connecting"
    RECEIVING = "receiving"  # the encoder may be writing into our blocks
    RESUMING = "resuming"  # a chunk arrived; no write until we ask for the next
    DONE = "done"
    FAILED = "failed"


@dataclasses.dataclass
class _Receipt:
    room: str
    state: ReceiptState = ReceiptState.CONNECTING
    reserved: int = 0  # blocks admitted for it and not yet taken
    writable: int = 0  # bytes the encoder may be writing now (the blocks of this round)


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
        self._admission = BlockAdmission(self.layout, self.allocator, settings, self.metrics)
        self._fenced = 0  # blocks waiting for their encoder to close the connection
        self._fences: set[asyncio.Task[None]] = set()
        self._on_chunk_received = on_chunk_received
        self._default_blocks = self.layout.blocks_for(settings.default_tokens)
        if self._default_blocks > self.layout.num_blocks:
            raise ValueError(
                f"default_tokens={settings.default_tokens} needs {self._default_blocks} blocks; "
                f"the pool has {self.layout.num_blocks}"
            )

    @property
    def fenced_blocks(self) -> int:
        """Blocks held until their encoder can no longer write into them."""
        return self._fenced

    def start(self) -> None:
        self.transport.register(self.buffers.base_ptr, self.buffers.nbytes)

    async def receive(
        self, room: str, sender_address: str, out: MultimodalItem | None = None
    ) -> MultimodalItem:
        """`lease`, copied into `out` if given (it must hold exactly the sequence's tokens)
        or into new tensors; every block it took is free again when it returns or raises."""
        async with self.lease(
            room, sender_address, None if out is None else out.num_tokens
        ) as lent:
            return copy_item(lent, out)

    @contextlib.asynccontextmanager
    async def lease(
        self, room: str, sender_address: str, num_tokens: int | None = None
    ) -> AsyncIterator[MultimodalItem]:
        """Receive the item of `room` from the encoder at `sender_address` ("host:port")
        and lend it: views of this pool's blocks, where it landed, when they are one run
        (no copy; `deepstack_transfer_gathered_total` counts the other case, a copy). The
        blocks are free again when the block exits. `num_tokens`, when the language
        side knows it from the image grid, admits the request only once the pool can
        hold all of it. Raises TransferError, having freed every block it took."""
        held, total = await self._receive(room, sender_address, num_tokens)
        try:
            lent = self.buffers.views(held, total)
            if lent is None:
                self.metrics.gathered.inc()
                lent = self.buffers.gather(held, total)
            yield lent
        finally:
            self._admission.free(held)

    async def _receive(
        self, room: str, sender_address: str, num_tokens: int | None
    ) -> tuple[list[int], int]:
        """The blocks holding the room's sequence, in order, and its length; on failure
        every block is freed (or fenced) and TransferError raised."""
        protocol.check_room(room)
        started = time.monotonic()
        held: list[int] = []
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        failure: TransferError | None = None
        receipt = _Receipt(room)
        self.metrics.inflight.inc()
        try:
            async with asyncio.timeout(self.settings.transfer_timeout):
                first = self._default_blocks
                if num_tokens is not None:
                    receipt.reserved = await self._admission.admit(
                        self.layout.blocks_for(num_tokens)
                    )
                    first = min(first, receipt.reserved)
                held += await self._admission.take(receipt, first)
                reader, writer = await self._connect(sender_address)
                total = await self._receive_rounds(receipt, held, reader, writer, num_tokens)
            self.metrics.duration.observe(time.monotonic() - started)
            return held, total
        except TimeoutError:
            failure = TransferError(
                FailureReason.TIMEOUT,
                f"room {room}: not received within {self.settings.transfer_timeout:g}s",
            )
            raise failure from None
        except TransferError as error:
            failure = error
            raise
        except asyncio.CancelledError:  # the request was abandoned
            failure = TransferError(FailureReason.ABORTED, f"room {room}: the request went away")
            raise
        except Exception as e:  # a bug or a broken hook: still a failure, never a leak
            failure = TransferError(FailureReason.TRANSFER_ERROR, f"room {room}: {e!r}")
            raise failure from e
        finally:
            self._admission.unreserve(receipt.reserved)
            self.metrics.inflight.dec()
            writing_possible = receipt.state is ReceiptState.RECEIVING
            receipt.state = ReceiptState.FAILED if failure is not None else ReceiptState.DONE
            if failure is not None:
                self.metrics.record_failure(failure.reason)
                wait_out = self.settings.write_deadline(receipt.writable)
                self._release(held, reader, writer, failure, writing_possible, wait_out)
            elif writer is not None:
                writer.close()  # done: the blocks are the lease's now

    def _release(
        self,
        held: list[int],
        reader: asyncio.StreamReader | None,
        writer: asyncio.StreamWriter | None,
        failure: TransferError,
        writing_possible: bool,
        wait_out: float,
    ) -> None:
        """After a failure: free the blocks now when no write can land in them any more
        (between rounds, or the encoder said so with its error); else fence them until
        the encoder says so, or for `wait_out` seconds once the connection ended."""
        if writer is None or reader is None:
            self._admission.free(held)
            return
        ended = reader.at_eof() or failure.reason is FailureReason.PEER_LOST
        if not writing_possible or failure.from_peer:
            self._admission.free(held)
            if ended or failure.from_peer:
                writer.close()
            else:
                task = asyncio.get_running_loop().create_task(self._tell(writer, failure))
                self._fences.add(task)
                task.add_done_callback(self._fences.discard)
            return
        self._fenced += len(held)
        self.metrics.set_fenced(self._fenced)
        task = asyncio.get_running_loop().create_task(
            self._fence(held, reader, writer, failure, wait_out, ended)
        )
        self._fences.add(task)
        task.add_done_callback(self._fences.discard)

    async def _fence(
        self,
        held: list[int],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        failure: TransferError,
        wait_out: float,
        ended: bool,
    ) -> None:
        try:
            final = False
            if not ended:
                await protocol.send_error_quietly(writer, failure)
                final = await self._hear_final(reader)
            if not final:  # the encoder may be writing still, for all we know
                await asyncio.sleep(wait_out)
        finally:
            self._fenced -= len(held)
            self.metrics.set_fenced(self._fenced)
            self._admission.free(held)
            writer.close()

    @staticmethod
    async def _hear_final(reader: asyncio.StreamReader) -> bool:
        """Listen until the encoder's error (True: its writes are final) or the end of
        the connection (False); a notice of the write we gave up on may come first."""
        while True:
            try:
                await protocol.receive(reader, None, "the encoder's error")
            except TransferError as e:
                if e.from_peer or e.reason is FailureReason.PEER_LOST:
                    return e.from_peer
            except OSError:
                return False

    @staticmethod
    async def _tell(writer: asyncio.StreamWriter, failure: TransferError) -> None:
        try:
            await protocol.send_error_quietly(writer, failure)
        finally:
            writer.close()

    async def close(self) -> None:
        """Wait (up to the transfer timeout) for the fences still up: their encoders say
        when their writes are over."""
        if self._fences:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.transfer_timeout):
                    await asyncio.gather(*self._fences, return_exceptions=True)

    async def _connect(self, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise TransferError(FailureReason.BAD_REQUEST, f"bad encoder address {address!r}")
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancellation (a
            # client that went away) that arrives as the connection completes.
            async with asyncio.timeout(self.settings.handshake_timeout):
                return await asyncio.open_connection(
                    host, int(port), limit=protocol.MAX_MESSAGE_BYTES
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

    async def _receive_rounds(
        self,
        receipt: _Receipt,
        held: list[int],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        expected: int | None,
    ) -> int:
        """Run the rounds until the whole sequence is in `held` (in order); its length."""
        room = receipt.room
        block_bytes = self.layout.token_bytes * self.layout.block_tokens
        receipt.writable = len(held) * block_bytes
        receipt.state = ReceiptState.RECEIVING  # from the hello on, the encoder may write
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
        chunk_blocks = held  # where the encoder writes this round
        # The encoder may still be encoding: the first answer may take until the deadline.
        waiting = self.settings.transfer_timeout
        while True:
            msg = await protocol.receive(reader, waiting, "written")
            receipt.state = ReceiptState.RESUMING
            if msg["op"] != "written" or protocol.int_field(msg, "offset") != received:
                raise TransferError(
                    FailureReason.BAD_REQUEST, f"unexpected {msg} at offset {received}"
                )
            tokens, total = protocol.int_field(msg, "tokens"), protocol.int_field(msg, "total")
            if expected is not None and expected != total:
                raise TransferError(
                    FailureReason.BAD_REQUEST,
                    f"room {room}: the encoder sends {total} tokens, {expected} expected",
                )
            if (
                tokens < 1
                or received + tokens > total
                or received + tokens > len(held) * self.layout.block_tokens
                or tokens > len(chunk_blocks) * self.layout.block_tokens
            ):
                raise TransferError(
                    FailureReason.BAD_REQUEST, f"bad chunk {msg} for {len(held)} blocks"
                )
            sent = msg.get("checksums")
            if self.settings.checksum and sent != []:  # [] from an encoder that has them off
                self._verify(chunk_blocks, tokens, sent)
            if self._on_chunk_received is not None:
                self._on_chunk_received(room, round_no)
            received += tokens
            if received == total:
                await protocol.send(writer, "done")
                return total
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
            chunk_blocks = await self._admission.take(receipt, needed)
            held += chunk_blocks
            receipt.writable = len(chunk_blocks) * block_bytes
            receipt.state = ReceiptState.RECEIVING
            await protocol.send(writer, "resume", offset=received, blocks=chunk_blocks)
            waiting = self.settings.resume_timeout

    def _verify(self, blocks: list[int], tokens: int, sent: object) -> None:
        """Compare each block of a chunk with the checksum its encoder computed."""
        mine = self.buffers.checksums(blocks, tokens)
        if not isinstance(sent, list) or len(sent) != len(mine):
            raise TransferError(
                FailureReason.BAD_REQUEST, f"a chunk of {len(mine)} blocks needs as many checksums"
            )
        for i, (got, want) in enumerate(zip(mine, sent, strict=True)):
            if got != want:
                raise TransferError(FailureReason.TRANSFER_ERROR, f"block {i}: checksum mismatch")
