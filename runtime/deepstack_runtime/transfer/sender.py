"""The encode side: holds encoded items in its pool until a receiver asks for them, then
writes them into the receiver's blocks, in as many rounds as the receiver needs.

A room goes WAITING (submitted, no receiver yet) -> SENDING (a write in flight) <->
AWAITING (the receiver has the chunk; resume or done?) -> DONE, or FAILED from any state
(timeout, abort from either side, peer lost). The fence: a room's blocks are freed, and
its receiver told why (an `error`, then the connection closed), only once Mooncake has
reported its last write final, completed or failed, so that a write can never land in
receiver blocks that were freed and reused, nor read sender blocks reused meanwhile. A
write not final within its deadline (`write_timeout`) fails its room at once, but its
blocks stay `fenced` until it is final, however long that takes (writes.py). So an
`error` from the sender always means that no write of the room can land any more; the
receiver frees its blocks when it hears one (see receiver.py).

The rooms and their table: rooms.py. The writes, on their own threads, and the wait for
a write to be final: writes.py. Which receivers the bootstrap port lets in, and what it
checks before anything is allocated for them: bootstrap.py.
"""

from __future__ import annotations

import asyncio
import contextlib

from deepstack_runtime.allocator import BlockAllocator
from deepstack_runtime.buffers import BufferLayout, MultimodalDataBuffers, MultimodalItem
from deepstack_runtime.errors import FailureReason, TransferError
from deepstack_runtime.metrics import ChunkStats, TransferMetrics
from deepstack_runtime.transfer import protocol
from deepstack_runtime.transfer.base import Transport
from deepstack_runtime.transfer.bootstrap import PeerConnections, check_hello, peer_connection_limit
from deepstack_runtime.transfer.check import check_item, is_check_room
from deepstack_runtime.transfer.plan import plan_chunk, region_of
from deepstack_runtime.transfer.rooms import Reserved, Room, RoomTable, SenderState, Target
from deepstack_runtime.transfer.settings import TransferSettings
from deepstack_runtime.transfer.writes import (
    WRITE_THREADS,
    ChunkObserver,
    ChunkWriter,
    WriteFence,
    own_descriptor,
)

# Where they were defined before rooms.py and writes.py held them.
__all__ = ["WRITE_THREADS", "ChunkObserver", "EmbeddingSender", "Reserved", "SenderState"]


class EmbeddingSender:
    def __init__(
        self,
        buffers: MultimodalDataBuffers,
        transport: Transport,
        settings: TransferSettings,
        metrics: TransferMetrics | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        on_chunk_written: ChunkObserver | None = None,
    ) -> None:
        self.buffers = buffers
        self.layout = buffers.layout
        self.transport = transport
        self.settings = settings
        self.metrics = metrics or TransferMetrics()
        # Set (from any thread) whenever blocks are taken or given back: a request that
        # waits for room looks again.
        self._blocks_changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.allocator = BlockAllocator(self.layout.num_blocks, on_change=self._on_blocks)
        self._host, self._port = host, port
        self._table = RoomTable(self.layout, self.allocator, settings, self.metrics)
        # Receivers whose hello came before their room: submit starts their first write
        # itself, with no hop through the serving task.
        self._parked: dict[str, Target] = {}
        self._connections = PeerConnections(self.metrics)
        self._write_fence = WriteFence(self.metrics)
        self._server: asyncio.Server | None = None
        self._region = region_of(buffers)
        self._writes = ChunkWriter(transport, settings, self.metrics, on_chunk_written)

    def _on_blocks(self, used: int, free: int) -> None:
        self.metrics.set_blocks(used, free)
        if self._loop is not None and self._blocks_changed is not None:
            self._loop.call_soon_threadsafe(self._blocks_changed.set)

    async def wait_for_room(self, num_tokens: int, timeout: float) -> bool:
        """Wait, up to `timeout`, until the pool has blocks free for `num_tokens` (the
        rooms it holds leave as their receivers take them); False when it still has not.
        An item the whole pool could never hold does not wait: `reserve` refuses it."""
        needed = self.layout.blocks_for(num_tokens)
        if needed > self.allocator.num_blocks:
            return False
        loop = asyncio.get_running_loop()
        if self._blocks_changed is None:
            self._loop, self._blocks_changed = loop, asyncio.Event()
        deadline = loop.time() + timeout
        while self.allocator.free_blocks < needed:
            self._blocks_changed.clear()
            if self.allocator.free_blocks >= needed:
                break
            try:
                async with asyncio.timeout_at(deadline):
                    await self._blocks_changed.wait()
            except TimeoutError:
                return False
        return True

    async def start(self) -> None:
        self.transport.register(self.buffers.base_ptr, self.buffers.nbytes)
        self._server = await asyncio.start_server(
            self._serve, self._host, self._port, limit=protocol.MAX_MESSAGE_BYTES
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for room in list(self._table.rooms):
            self.abort(room, "the encoder is stopping")
        if self._server is not None:
            await self._server.wait_closed()
        self._writes.shutdown()  # the fence: no write outlives the sender

    def abort(self, room: str, why: str) -> None:
        """Give up on `room` (its requester went away, say): a room no receiver has claimed
        is dropped now; one being sent stops after the write in flight, and the receiver
        is told why."""
        entry = self._table.rooms.get(room)
        if entry is None:
            return
        if not entry.claimed:
            error = TransferError(FailureReason.ABORTED, f"room {room}: {why}")
            self._table.drop(room, error)
            self.metrics.record_failure(error.reason)
        elif not entry.aborted:
            entry.aborted = why
            if entry.task is not None:  # the fence in _serve waits for a write in flight
                entry.task.cancel()

    @property
    def address(self) -> str:
        """Where receivers connect (the bootstrap endpoint)."""
        return f"{self._host}:{self._port}"

    @property
    def rooms(self) -> int:
        return len(self._table.rooms)

    @property
    def parked(self) -> int:
        """Receivers waiting for a room not yet submitted."""
        return len(self._parked)

    @property
    def fenced_blocks(self) -> int:
        """Blocks held until their room's last write is final."""
        return self._write_fence.blocks

    @property
    def max_peer_connections(self) -> int:
        """Bootstrap connections one peer address may hold, waiting rooms included: a
        language pod like this one has at most a receipt per block of its pool, and its
        queue, in flight."""
        return peer_connection_limit(self.settings, self.layout)

    async def reserve(self, room: str, num_tokens: int) -> Reserved | None:
        """Blocks for the item of `room`, lent as views for the encoder to write its rows
        into where they will be sent from (then `submit(room, reserved.item, reserved)`:
        no copy). None when no single run of blocks is free now: encode, then submit the
        item (one copy). Raises TransferError, which `room`'s receiver hears at once,
        when the pool cannot hold the item."""
        self._table.check_new(room, num_tokens)
        blocks = await self._table.alloc(room, num_tokens)
        views = self.buffers.views(blocks, num_tokens)
        if views is None:
            self.allocator.free(blocks)
            return None
        return Reserved(room, blocks, views)

    def release(self, reserved: Reserved) -> None:
        """Give back a reservation that will not be submitted (the encoding failed)."""
        self.allocator.free(reserved.blocks)

    async def submit(
        self, room: str, item: MultimodalItem, reserved: Reserved | None = None
    ) -> asyncio.Future[None]:
        """Hold `item` for the receiver of `room`: in `reserved`, where the encoder wrote
        it, or copied into blocks taken now. Raises TransferError (and keeps nothing, the
        reservation included) for a bad or duplicate room or an item the pool cannot
        hold. The returned future completes when the receiver has the whole item, or
        fails with TransferError."""
        loop = asyncio.get_running_loop()
        if reserved is not None:
            if reserved.room != room or reserved.item is not item:
                self.release(reserved)
                raise ValueError("submit a reservation with its own room and item")
            if room in self._table.rooms:
                self.release(reserved)
                raise TransferError(
                    FailureReason.DUPLICATE_ROOM, f"room {room} is already submitted"
                )
            blocks = reserved.blocks
        else:
            self._table.check_new(room, item.num_tokens)
            blocks = await self._table.alloc(room, item.num_tokens)
        try:
            if reserved is None:
                # The encoder's rows could not be written in place: one copy.
                self.buffers.scatter(blocks, item)
                self.metrics.scattered.inc()
            checksums = (
                self.buffers.checksums(blocks, item.num_tokens) if self.settings.checksum else []
            )
        except Exception:
            self.allocator.free(blocks)
            raise
        finished: asyncio.Future[None] = loop.create_future()
        # Callers may ignore the outcome; never warn about an unretrieved exception.
        finished.add_done_callback(lambda f: f.cancelled() or f.exception())
        entry = Room(blocks, item.num_tokens, finished, checksums)
        # Nobody came for it: free the blocks.
        entry.expiry = loop.call_later(self.settings.transfer_timeout, self._table.expire, room)
        self._table.rooms[room] = entry
        target = self._parked.pop(room, None)
        if target is not None:  # its receiver is waiting: write at once
            self._claim(entry, target)
            self._start_round(room, entry, target, 0, target.blocks, 0)
        await self._table.announce()
        return finished

    async def refuse(self, room: str, error: TransferError) -> None:
        """`room` will not be submitted (the pool cannot hold it, the encoder is full, ...):
        its receiver hears why at once, for one handshake timeout, instead of waiting."""
        await self._table.refuse(room, error)

    # --- one receiver connection ------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = await self._connections.admit(writer, self.max_peer_connections)
        if peer is None:
            return
        try:
            await self._serve_peer(peer, reader, writer)
        finally:
            self._connections.leave(peer)

    async def _serve_peer(
        self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        room: str | None = None
        entry: Room | None = None
        failure: TransferError | None = None
        self.metrics.inflight.inc()
        try:
            hello = await protocol.receive(reader, self.settings.handshake_timeout, "hello")
            checked = check_hello(hello, peer, self.layout, self._region)
            room, theirs = checked.room, checked.layout
            target = Target(
                checked.session, checked.region, checked.blocks, peer, writer,
                asyncio.current_task(),
            )  # fmt: skip
            if room not in self._table.rooms and room not in self._parked:
                if is_check_room(room):
                    # A receiver's transfer check: the pattern it expects, sent as any item.
                    await self.submit(room, check_item(self.layout, room))
                else:
                    self._park(room, target)
            try:
                found, heard = await self._wait_for_room_or_abort(room, reader)
            finally:
                if self._parked.get(room) is target:
                    del self._parked[room]
                entry = target.entry  # claimed by submit, maybe writing already
            if entry is None:
                if heard is not None:  # the receiver spoke before anything was written
                    raise TransferError(FailureReason.BAD_REQUEST, f"unexpected {heard['op']}")
                if found.claimed:
                    raise TransferError(
                        FailureReason.DUPLICATE_ROOM, f"room {room} already has a receiver"
                    )
                entry = found
                self._claim(entry, target)
            if entry.aborted:  # while this task was not yet the room's
                raise asyncio.CancelledError
            async with asyncio.timeout(self.settings.transfer_timeout):
                await self._send_rounds(room, entry, target, theirs, reader, heard)
        except TimeoutError:
            failure = TransferError(
                FailureReason.TIMEOUT,
                f"room {room}: not finished within {self.settings.transfer_timeout:g}s",
            )
        except TransferError as error:
            failure = error
        except asyncio.CancelledError:
            why = entry.aborted if entry is not None and entry.aborted else "the encoder stopped"
            failure = TransferError(FailureReason.ABORTED, f"room {room}: {why}")
            if entry is None or not entry.aborted:
                raise  # the server is going away, not an abort of ours
        except Exception as e:  # a bug or a broken hook: a failure, never a success
            failure = TransferError(FailureReason.TRANSFER_ERROR, f"room {room}: {e!r}")
        finally:
            try:
                if entry is not None:
                    await self._write_fence.settle(entry)
                    entry.state = SenderState.FAILED if failure is not None else SenderState.DONE
                if failure is not None:
                    self.metrics.record_failure(failure.reason)
                    if failure.reason is not FailureReason.PEER_LOST:
                        # Only now: an error tells the receiver that no write can land.
                        await protocol.send_error_quietly(writer, failure)
            finally:  # even when cancelled while telling the receiver why
                if entry is not None and room is not None:
                    self._table.drop(room, failure)
                self.metrics.inflight.dec()
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    def _park(self, room: str, target: Target) -> None:
        """Let `target` wait for its room (bounded by its peer's share of connections)."""
        self._parked[room] = target

    @staticmethod
    def _claim(entry: Room, target: Target) -> None:
        entry.claimed = True
        entry.task = target.task
        target.entry = entry
        if entry.expiry is not None:
            entry.expiry.cancel()

    async def _wait_for_room_or_abort(
        self, room: str, reader: asyncio.StreamReader
    ) -> tuple[Room, protocol.Message | None]:
        """Wait for the room, unless the receiver gives up first (it says why, or hangs
        up; a write submit started meanwhile is fenced by the caller). Also returns
        what the receiver said meanwhile, if anything: its answer to a first write that
        submit started at once, which the rounds must read first."""
        waiting = asyncio.ensure_future(self._table.wait_for(room))
        hearing = asyncio.ensure_future(
            protocol.receive(reader, self.settings.transfer_timeout, "the room")
        )
        try:
            await asyncio.wait({waiting, hearing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiting, hearing):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, TransferError):
                        await task
        heard = None
        if hearing.done() and not hearing.cancelled():
            heard = hearing.result()  # raises the receiver's error, or PEER_LOST
        if waiting.cancelled():
            assert heard is not None
            raise TransferError(FailureReason.BAD_REQUEST, f"unexpected {heard['op']}")
        return waiting.result(), heard

    def _start_round(
        self,
        room: str,
        entry: Room,
        target: Target,
        offset: int,
        dst_blocks: list[int],
        round_no: int,
    ) -> None:
        """Hand the round's one transfer call (and its notice) to a write thread."""
        b = self.layout.block_tokens
        tokens = min(entry.num_tokens - offset, len(dst_blocks) * b)
        first = offset // b
        src = entry.blocks[first : first + self.layout.blocks_for(tokens)]
        entries = plan_chunk(self._region, target.region, src, dst_blocks[: len(src)], tokens, b)
        notice = protocol.encode(
            "written",
            offset=offset,
            tokens=tokens,
            total=entry.num_tokens,
            checksums=entry.checksums[first : first + len(src)],
        )
        fd = own_descriptor(target.writer)
        entry.state = SenderState.SENDING
        entry.sending = tokens
        entry.writing = self._writes.submit(
            room, round_no, target.session, entries, target.writer, fd,
            notice, ChunkStats(self.layout.payload_bytes(tokens), resumed=round_no > 0),
        )  # fmt: skip

    async def _send_rounds(
        self,
        room: str,
        entry: Room,
        target: Target,
        theirs: BufferLayout,
        reader: asyncio.StreamReader,
        heard: protocol.Message | None,
    ) -> None:
        writer = target.writer
        total = entry.num_tokens
        dst_blocks = target.blocks
        offset = 0
        round_no = 0
        while True:
            if entry.state is not SenderState.SENDING:  # else submit started it
                self._start_round(room, entry, target, offset, dst_blocks, round_no)
            assert entry.writing is not None
            unsent = await asyncio.wrap_future(entry.writing)
            entry.state = SenderState.AWAITING
            tokens = entry.sending
            if unsent:  # the socket was full: the rest goes the usual way, in order
                writer.write(unsent)
                await writer.drain()
            offset += tokens
            reply = heard or await protocol.receive(
                reader,
                self.settings.resume_timeout if offset < total else self.settings.handshake_timeout,
                "resume" if offset < total else "done",
            )
            heard = None
            if reply["op"] == "done" and offset == total:
                return
            if reply["op"] != "resume" or offset >= total:
                raise TransferError(
                    FailureReason.BAD_REQUEST, f"unexpected {reply['op']} at {offset}/{total}"
                )
            round_no += 1
            if round_no > self.settings.max_rounds:
                raise TransferError(
                    FailureReason.TOO_MANY_ROUNDS,
                    f"more than {self.settings.max_rounds} resume rounds",
                )
            if protocol.int_field(reply, "offset") != offset:
                raise TransferError(
                    FailureReason.BAD_REQUEST,
                    f"resume from {reply['offset']} but {offset} tokens were sent",
                )
            dst_blocks = protocol.int_list(reply, "blocks", limit=theirs.num_blocks)
