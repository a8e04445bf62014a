"""The encode side's writes: each chunk's one transfer call runs on a write thread, and its
"written" notice goes from there straight onto the control socket; and the fence's wait
for a write to be final (sender.py states the fence).

A write not final within its deadline (`write_timeout`) fails its room at once, but its
blocks stay `fenced` until it is final, however long that takes: Mooncake keeps such a
write going (a stalled tcp write lands in full once its receiver runs again), and the
transport reports when it is final (UnsettledWrite.settled).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from deepstack_runtime.metrics import ChunkStats, TransferMetrics
from deepstack_runtime.transfer.base import Transport, UnsettledWrite
from deepstack_runtime.transfer.plan import WriteEntry
from deepstack_runtime.transfer.rooms import Room
from deepstack_runtime.transfer.settings import TransferSettings

# Called on the write thread after a chunk's bytes are in the receiver's memory, before
# it is told: (room, round).
ChunkObserver = Callable[[str, int], None]
# Writes run on these threads, never on the event loop: one slow peer must not stall the
# other transfers or the health probes.
WRITE_THREADS = 4


def own_descriptor(writer: asyncio.StreamWriter) -> int:
    """A duplicate of the connection's descriptor for one write's notice (-1: none): if
    the connection is closed meanwhile, its number may be reused by another one, which
    must never get this notice. The write closes it."""
    sock = writer.get_extra_info("socket")
    return os.dup(sock.fileno()) if sock is not None else -1


class ChunkWriter:
    """Runs each chunk's transfer call, then tells the receiver, on a write thread."""

    def __init__(
        self,
        transport: Transport,
        settings: TransferSettings,
        metrics: TransferMetrics,
        on_chunk_written: ChunkObserver | None = None,
    ) -> None:
        self.transport = transport
        self.settings = settings
        self.metrics = metrics
        self._on_chunk_written = on_chunk_written
        self._pool = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="mooncake-write")

    def submit(
        self,
        room: str,
        round_no: int,
        session: str,
        entries: list[WriteEntry],
        writer: asyncio.StreamWriter,
        fd: int,
        notice: bytes,
        chunk: ChunkStats,
    ) -> Future[bytes]:
        """Hand the chunk's transfer call and its notice to a write thread (see
        `_write_then_tell`); `fd` from `own_descriptor`."""
        return self._pool.submit(
            self._write_then_tell, room, round_no, session, entries, writer, fd, notice, chunk
        )

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)  # the fence: no write outlives the sender

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


class WriteFence:
    """Holds each room's blocks until its last write is final, and counts them."""

    def __init__(self, metrics: TransferMetrics) -> None:
        self.metrics = metrics
        self.blocks = 0  # blocks of rooms whose last write is not yet final

    async def settle(self, entry: Room) -> None:
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
        self.blocks += len(entry.blocks)
        self.metrics.set_fenced(self.blocks)
        try:
            while not settled.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(asyncio.wrap_future(settled))
        finally:
            entry.fenced = False
            self.blocks -= len(entry.blocks)
            self.metrics.set_fenced(self.blocks)
