"""The encode side: holds encoded items in its pool until a receiver asks for them, then
writes them into the receiver's blocks, in as many rounds as the receiver needs.

A room goes WAITING (submitted, no receiver yet) -> SENDING (a write in flight) <->
AWAITING (the receiver has the chunk; resume or done?) -> DONE, or FAILED from any state
(timeout, abort from either side, peer lost). The fence: a room's blocks are freed, and
its receiver told why (an `error`, then the connection closed), only once Mooncake has
reported its last write final, completed or failed, so that a write can never land in
receiver blocks that were freed and reused, nor read sender blocks reused meanwhile. A
write not final within its deadline (`write_timeout`) fails its room at once, but its
blocks stay `fenced` until it is final, however long that takes: Mooncake keeps such a
write going (a stalled tcp write lands in full once its receiver runs again). So an
`error` from the sender always means that no write of the room can land any more; the
receiver frees its blocks when it hears one (see receiver.py).

The bootstrap port takes only what it can afford: a hello is checked whole (room,
session, layout, region, blocks) before anything is allocated for it; its session host
must be the connecting peer's own address (else a pod could aim the writes into another
pod's pool); one peer address may hold at most `max_queued + num_blocks` connections,
rooms not yet submitted included: what a language pod of the same resource can have in
flight at most (a receipt holds at least one of its blocks, or waits in its queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from deepstack_runtime.allocator import BlockAllocator
from deepstack_runtime.buffers import BufferLayout, MultimodalDataBuffers, MultimodalItem
from deepstack_runtime.errors import FailureReason, TransferError
from deepstack_runtime.metrics import ChunkStats, TransferMetrics
from deepstack_runtime.transfer import protocol
from deepstack_runtime.transfer.base import Transport, UnsettledWrite
from deepstack_runtime.transfer.check import check_item, is_check_room
from deepstack_runtime.transfer.plan import RegionInfo, WriteEntry, plan_chunk, region_of
from deepstack_runtime.transfer.settings import TransferSettings

# Called on the write thread after a chunk's bytes are in the receiver's memory, before
# it is told: (room, round).
ChunkObserver = Callable[[str, int], None]
# Writes run on these threads, never on the event loop: one slow peer must not stall the
# other transfers or the health probes.
WRITE_THREADS = 4


class SenderState(enum.Enum):
    WAITING = "waiting"
    SENDING = "sending"
    AWAITING = "awaiting"
    DONE = "done"
    FAILED = "failed"


@dataclass
class _Room:
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
class _Target:
    """A receiver's side of a room, from its hello: where to write, how to tell it."""

    session: str
    region: RegionInfo
    blocks: list[int]  # where the first round goes
    peer: str  # the connecting address
    writer: asyncio.StreamWriter
    task: asyncio.Task[None] | None  # the connection's serving task
    entry: _Room | None = None  # the room, once claimed


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
        self.allocator = BlockAllocator(self.layout.num_blocks, on_change=self.metrics.set_blocks)
        self._host, self._port = host, port
        self._rooms: dict[str, _Room] = {}
        # Rooms refused at submit (an item the pool cannot hold, ...), kept for one
        # handshake timeout so that their receiver hears why at once, not by a timeout.
        self._refused: dict[str, TransferError] = {}
        self._room_added = asyncio.Condition()
        # Receivers whose hello came before their room: submit starts their first write
        # itself, with no hop through the serving task.
        self._parked: dict[str, _Target] = {}
        self._connections: dict[str, int] = {}  # open bootstrap connections per peer address
        self._fenced = 0  # blocks of rooms whose last write is not yet final
        self._server: asyncio.Server | None = None
        self._on_chunk_written = on_chunk_written
        self._region = region_of(buffers)
        self._write_pool = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="mooncake-write")

    async def start(self) -> None:
        self.transport.register(self.buffers.base_ptr, self.buffers.nbytes)
        self._server = await asyncio.start_server(
            self._serve, self._host, self._port, limit=protocol.MAX_MESSAGE_BYTES
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for room in list(self._rooms):
            self.abort(room, "the encoder is stopping")
        if self._server is not None:
            await self._server.wait_closed()
        self._write_pool.shutdown(wait=True)  # the fence: no write outlives the sender

    def abort(self, room: str, why: str) -> None:
        """Give up on `room` (its requester went away, say): a room no receiver has claimed
        is dropped now; one being sent stops after the write in flight, and the receiver
        is told why."""
        entry = self._rooms.get(room)
        if entry is None:
            return
        if not entry.claimed:
            error = TransferError(FailureReason.ABORTED, f"room {room}: {why}")
            self._drop(room, error)
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
        return len(self._rooms)

    @property
    def parked(self) -> int:
        """Receivers waiting for a room not yet submitted."""
        return len(self._parked)

    @property
    def fenced_blocks(self) -> int:
        """Blocks held until their room's last write is final."""
        return self._fenced

    @property
    def max_peer_connections(self) -> int:
        """Bootstrap connections one peer address may hold, waiting rooms included: a
        language pod like this one has at most a receipt per block of its pool, and its
        queue, in flight."""
        return self.settings.max_queued + self.layout.num_blocks

    async def reserve(self, room: str, num_tokens: int) -> Reserved | None:
        """Blocks for the item of `room`, lent as views for the encoder to write its rows
        into where they will be sent from (then `submit(room, reserved.item, reserved)`:
        no copy). None when no single run of blocks is free now: encode, then submit the
        item (one copy). Raises TransferError, which `room`'s receiver hears at once,
        when the pool cannot hold the item."""
        self._check_new(room, num_tokens)
        blocks = await self._alloc(room, num_tokens)
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
            if room in self._rooms:
                self.release(reserved)
                raise TransferError(
                    FailureReason.DUPLICATE_ROOM, f"room {room} is already submitted"
                )
            blocks = reserved.blocks
        else:
            self._check_new(room, item.num_tokens)
            blocks = await self._alloc(room, item.num_tokens)
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
        entry = _Room(blocks, item.num_tokens, finished, checksums)
        # Nobody came for it: free the blocks.
        entry.expiry = loop.call_later(self.settings.transfer_timeout, self._expire, room)
        self._rooms[room] = entry
        target = self._parked.pop(room, None)
        if target is not None:  # its receiver is waiting: write at once
            self._claim(entry, target)
            self._start_round(room, entry, target, 0, target.blocks, 0)
        async with self._room_added:
            self._room_added.notify_all()
        return finished

    def _check_new(self, room: str, num_tokens: int) -> None:
        protocol.check_room(room)
        if room in self._rooms:
            raise TransferError(FailureReason.DUPLICATE_ROOM, f"room {room} is already submitted")
        if num_tokens < 1:
            raise TransferError(FailureReason.BAD_REQUEST, "an item must have at least one token")

    async def _alloc(self, room: str, num_tokens: int) -> list[int]:
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
        """`room` will not be submitted (the pool cannot hold it, the encoder is full, ...):
        its receiver hears why at once, for one handshake timeout, instead of waiting."""
        self._refused[room] = error
        asyncio.get_running_loop().call_later(
            self.settings.handshake_timeout, self._forget_refusal, room, error
        )
        async with self._room_added:
            self._room_added.notify_all()

    def _forget_refusal(self, room: str, error: TransferError) -> None:
        if self._refused.get(room) is error:
            del self._refused[room]

    def _expire(self, room: str) -> None:
        entry = self._rooms.get(room)
        if entry is not None and not entry.claimed:
            error = TransferError(
                FailureReason.TIMEOUT,
                f"room {room}: no receiver came within {self.settings.transfer_timeout:g}s",
            )
            self._drop(room, error)
            self.metrics.record_failure(error.reason)

    def _drop(self, room: str, error: TransferError | None) -> None:
        entry = self._rooms.pop(room, None)
        if entry is not None:
            if entry.expiry is not None:
                entry.expiry.cancel()
            self.allocator.free(entry.blocks)
            if not entry.finished.done():
                if error is None:
                    entry.finished.set_result(None)
                else:
                    entry.finished.set_exception(error)

    async def _wait_for_room(self, room: str) -> _Room:
        async def present() -> _Room:
            async with self._room_added:
                await self._room_added.wait_for(
                    lambda: room in self._rooms or room in self._refused
                )
            if room in self._rooms:
                return self._rooms[room]
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

    # --- one receiver connection ------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = str(protocol.host_ip(peername[0])) if peername else "?"
        if self._connections.get(peer, 0) >= self.max_peer_connections:
            error = TransferError(
                FailureReason.POOL_EXHAUSTED,
                f"{peer} already holds {self.max_peer_connections} connections to this "
                "encoder, the most one peer may",
            )
            self.metrics.record_failure(error.reason)
            await protocol.send_error_quietly(writer, error)
            writer.close()
            return
        self._connections[peer] = self._connections.get(peer, 0) + 1
        try:
            await self._serve_peer(peer, reader, writer)
        finally:
            self._connections[peer] -= 1
            if not self._connections[peer]:
                del self._connections[peer]

    async def _serve_peer(
        self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        room: str | None = None
        entry: _Room | None = None
        failure: TransferError | None = None
        self.metrics.inflight.inc()
        try:
            hello = await protocol.receive(reader, self.settings.handshake_timeout, "hello")
            room, session, dst_region, dst_blocks, theirs = self._check_hello(hello, peer)
            target = _Target(session, dst_region, dst_blocks, peer, writer, asyncio.current_task())
            if room not in self._rooms and room not in self._parked:
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
                    await self._fence(entry)
                    entry.state = SenderState.FAILED if failure is not None else SenderState.DONE
                if failure is not None:
                    self.metrics.record_failure(failure.reason)
                    if failure.reason is not FailureReason.PEER_LOST:
                        # Only now: an error tells the receiver that no write can land.
                        await protocol.send_error_quietly(writer, failure)
            finally:  # even when cancelled while telling the receiver why
                if entry is not None and room is not None:
                    self._drop(room, failure)
                self.metrics.inflight.dec()
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    def _park(self, room: str, target: _Target) -> None:
        """Let `target` wait for its room (bounded by its peer's share of connections)."""
        self._parked[room] = target

    @staticmethod
    def _claim(entry: _Room, target: _Target) -> None:
        entry.claimed = True
        entry.task = target.task
        target.entry = entry
        if entry.expiry is not None:
            entry.expiry.cancel()

    async def _wait_for_room_or_abort(
        self, room: str, reader: asyncio.StreamReader
    ) -> tuple[_Room, protocol.Message | None]:
        """Wait for the room, unless the receiver gives up first (it says why, or hangs
        up; a write submit started meanwhile is fenced by the caller). Also returns
        what the receiver said meanwhile, if anything: its answer to a first write that
        submit started at once, which the rounds must read first."""
        waiting = asyncio.ensure_future(self._wait_for_room(room))
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

    async def _fence(self, entry: _Room) -> None:
        """Wait until the room's write in flight, if any, is final: done, failed, or
        past its deadline and then reported final by the transport."""
        pending = entry.writing
        settled = None
        while pending is not None and not pending.done():
            try:
                await asyncio.shield(asyncio.wrap_future(pending))
            except asyncio.CancelledError:
                continue  # cancelled again: the write still has to end first
            except Exception:
                break
        if pending is not None and pending.done() and not pending.cancelled():
            error = pending.exception()
            if isinstance(error, UnsettledWrite):
                settled = error.settled
        if settled is None or settled.done():
            return
        entry.fenced = True
        self._fenced += len(entry.blocks)
        self.metrics.set_fenced(self._fenced)
        try:
            while not settled.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(asyncio.wrap_future(settled))
        finally:
            entry.fenced = False
            self._fenced -= len(entry.blocks)
            self.metrics.set_fenced(self._fenced)

    def _write_then_tell(
        self,
        room: str,
        round_no: int,
        session: str,
        entries: list[WriteEntry],
        writer: asyncio.StreamWriter,
        fd: int,
        notice: bytes,
        chunk: ChunkStats,
    ) -> bytes:
        """On a write thread: the chunk's one transfer call, its accounting, then the
        "written" notice straight onto the control socket, so that the receiver hears of it
        without a hop back through this event loop (and never before it is counted).
        Returns what could not be sent now (usually nothing). Safe: while a room is
        SENDING nothing else writes to its connection, and `fd` is this write's own
        duplicate of the connection's descriptor."""
        try:
            nbytes = sum(e.nbytes for e in entries)
            self.transport.write(session, entries, self.settings.write_deadline(nbytes))
            self.metrics.record_chunk(chunk)  # prometheus_client counters are thread-safe
            if self._on_chunk_written is not None:
                self._on_chunk_written(room, round_no)
            if fd < 0 or writer.transport.get_write_buffer_size():
                return notice
            try:
                sent = os.write(fd, notice)  # non-blocking (shared flags): never waits
            except (BlockingIOError, InterruptedError):
                return notice
            except OSError:
                return b""  # the receiver is gone: its next message (none) says so
            return notice[sent:]
        finally:
            if fd >= 0:
                os.close(fd)

    def _check_hello(
        self, hello: protocol.Message, peer: str
    ) -> tuple[str, str, RegionInfo, list[int], BufferLayout]:
        """The whole hello, checked before anything is allocated for it: (room, session,
        region, first blocks, the receiver's layout)."""
        if hello["op"] != "hello":
            raise TransferError(FailureReason.BAD_REQUEST, f"expected hello, got {hello['op']}")
        room = protocol.check_room(hello.get("room"))
        session = protocol.check_session(hello.get("session"), peer)
        try:
            theirs = BufferLayout(**hello["layout"])
        except (KeyError, TypeError, ValueError) as e:
            raise TransferError(FailureReason.BAD_REQUEST, f"hello with a bad layout: {e}") from e
        if not self.layout.compatible(theirs):
            raise TransferError(
                FailureReason.LAYOUT_MISMATCH,
                f"receiver layout {theirs} does not match this encoder's {self.layout}",
            )
        try:
            r = hello["region"]
            region = RegionInfo(int(r["base_ptr"]), int(r["block_tokens"]), int(r["token_bytes"]))
        except (KeyError, TypeError, ValueError) as e:
            raise TransferError(FailureReason.BAD_REQUEST, f"hello with a bad region: {e}") from e
        mine = self._region
        if (region.block_tokens, region.token_bytes) != (mine.block_tokens, mine.token_bytes):
            raise TransferError(
                FailureReason.LAYOUT_MISMATCH, "the receiver's blocks are sized differently"
            )
        blocks = protocol.int_list(hello, "blocks", limit=theirs.num_blocks)
        return room, session, region, blocks, theirs

    def _start_round(
        self,
        room: str,
        entry: _Room,
        target: _Target,
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
        # A descriptor of our own: if the connection is closed meanwhile, its number may
        # be reused by another one, which must never get this notice.
        sock = target.writer.get_extra_info("socket")
        fd = os.dup(sock.fileno()) if sock is not None else -1
        entry.state = SenderState.SENDING
        entry.sending = tokens
        entry.writing = self._write_pool.submit(
            self._write_then_tell, room, round_no, target.session, entries, target.writer, fd,
            notice, ChunkStats(self.layout.payload_bytes(tokens), resumed=round_no > 0),
        )  # fmt: skip

    async def _send_rounds(
        self,
        room: str,
        entry: _Room,
        target: _Target,
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
