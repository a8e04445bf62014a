"""Transfer endpoints in their own OS processes, driven from a test over a pipe.

Each peer process runs one EmbeddingSender or EmbeddingReceiver on a real Mooncake
TransferEngine (tcp, 127.0.0.1) and executes commands concurrently:
    ("submit", room, item)      sender
    ("receive", room, address[, give_up_after[, tokens]])  receiver -> item; with
                                give_up_after the receive is cancelled after that many
                                seconds, as an abandoned request's is; with tokens the
                                length is known beforehand (as the language server knows it)
    ("slow_next_write", seconds)  sender: its next write starts that much later (a late
                                write, as from an overloaded or stalled peer)
    ("corrupt_next_write",)     sender: its next write sends one byte other than the one
                                it checksummed (a bit flipped on the way)
    ("checksums", blocks, tokens)  -> the pool's checksums of those blocks (what landed)
    ("changed_after_free",)     with watch_frees: the blocks whose bytes changed after they
                                were freed (and before they were taken again): a late write
    ("state",)                  -> {"used", "free", "fenced", "rooms", "parked", "calls",
                                "unsettled", "metrics": text}
A peer can be told to die (os._exit) right after its first chunk, to inject faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import itertools
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

import torch

from deepstack_runtime.buffers import BufferLayout, MultimodalItem
from deepstack_runtime.errors import TransferError
from deepstack_runtime.transfer.check import check_peer
from deepstack_runtime.transfer.settings import TransferSettings

DIE_EXIT_CODE = 17


def encode_item(item: MultimodalItem) -> bytes:
    buf = io.BytesIO()
    torch.save(asdict(item), buf)
    return buf.getvalue()


def decode_item(data: bytes) -> MultimodalItem:
    return MultimodalItem(**torch.load(io.BytesIO(data), weights_only=True))


def _peer_main(
    role: str,
    layout: BufferLayout,
    settings: TransferSettings,
    conn: Connection,
    die: bool,
    device: str,
    watch_frees: bool,
) -> None:
    asyncio.run(_peer(role, layout, settings, conn, die, device, watch_frees))


async def _peer(
    role: str,
    layout: BufferLayout,
    settings: TransferSettings,
    conn: Connection,
    die: bool,
    device: str,
    watch_frees: bool,
) -> None:
    from prometheus_client import generate_latest

    from deepstack_runtime.buffers import MultimodalDataBuffers
    from deepstack_runtime.transfer.mooncake import MooncakeTransport
    from deepstack_runtime.transfer.receiver import EmbeddingReceiver
    from deepstack_runtime.transfer.sender import EmbeddingSender

    def die_now(room: str, round_no: int) -> None:
        os._exit(DIE_EXIT_CODE)

    hook = die_now if die else None

    class StallableTransport(MooncakeTransport):
        delay_next = 0.0
        corrupt_next = False

        def write(self, target_session: str, entries: Any, timeout: float | None = None) -> None:
            delay, StallableTransport.delay_next = StallableTransport.delay_next, 0.0
            if delay:
                time.sleep(delay)  # on the write thread, as a stalled write would
            if StallableTransport.corrupt_next and device == "cpu":
                StallableTransport.corrupt_next = False
                flipped = ctypes.c_uint8.from_address(entries[0].src_ptr + 40)  # an embedding
                flipped.value ^= 0x10
            super().write(target_session, entries, timeout)

    transport = StallableTransport("127.0.0.1", "tcp")
    buffers = MultimodalDataBuffers(layout, device=device)
    node: EmbeddingSender | EmbeddingReceiver
    if role == "sender":
        node = EmbeddingSender(buffers, transport, settings, on_chunk_written=hook)
        await node.start()
        conn.send(("ready", node.address))
    else:
        node = EmbeddingReceiver(buffers, transport, settings, on_chunk_received=hook)
        node.start()
        conn.send(("ready", transport.session_id))
    # With watch_frees: each freed block's bytes as they were when it was freed, until it
    # is taken again.
    freed: dict[int, torch.Tensor] = {}
    if watch_frees:
        allocator, rows = node.allocator, layout.block_tokens
        alloc, free = allocator.alloc, allocator.free

        def watched_alloc(count: int) -> list[int]:
            blocks = alloc(count)
            for block in blocks:
                freed.pop(block, None)
            return blocks

        def watched_free(blocks: Sequence[int]) -> None:
            for block in blocks:
                freed[block] = buffers.arena[block * rows : (block + 1) * rows].clone()
            free(blocks)

        allocator.alloc = watched_alloc  # type: ignore[method-assign]
        allocator.free = watched_free  # type: ignore[method-assign]

    async def run(cmd_id: int, cmd: tuple[Any, ...]) -> None:
        try:
            if cmd[0] == "submit":
                assert isinstance(node, EmbeddingSender)
                await node.submit(cmd[1], decode_item(cmd[2]))
                result: tuple[Any, ...] = ("ok", None)
            elif cmd[0] == "receive":
                assert isinstance(node, EmbeddingReceiver)
                # ("receive", room, address, give_up_after or None, tokens or None): with
                # tokens, the length is known beforehand, as the language server knows it.
                out = node.buffers.empty_item(cmd[4]) if len(cmd) > 4 and cmd[4] else None
                receiving = node.receive(cmd[1], cmd[2], out)
                if len(cmd) > 3 and cmd[3] is not None:
                    try:
                        got = await asyncio.wait_for(receiving, cmd[3])
                    except TimeoutError:
                        result = ("error", "abandoned", f"given up after {cmd[3]}s")
                        conn.send((cmd_id, result))
                        return
                else:
                    got = await receiving
                result = ("ok", encode_item(got))
            elif cmd[0] == "check":  # ("check", sender address): the transfer check
                assert isinstance(node, EmbeddingReceiver)
                checked = await check_peer(node, cmd[1], transport.protocol)
                result = ("ok", asdict(checked))
            elif cmd[0] == "slow_next_write":
                StallableTransport.delay_next = float(cmd[1])
                result = ("ok", None)
            elif cmd[0] == "corrupt_next_write":
                StallableTransport.corrupt_next = True
                result = ("ok", None)
            elif cmd[0] == "checksums":
                result = ("ok", buffers.checksums(list(range(cmd[1])), cmd[2]))
            elif cmd[0] == "changed_after_free":
                rows = layout.block_tokens
                changed = [
                    block
                    for block, then in sorted(freed.items())
                    if not torch.equal(buffers.arena[block * rows : (block + 1) * rows], then)
                ]
                result = ("ok", changed)
            elif cmd[0] == "state":
                sender = node if isinstance(node, EmbeddingSender) else None
                state = {
                    "fenced": node.fenced_blocks,
                    "used": node.allocator.used_blocks,
                    "free": node.allocator.free_blocks,
                    "rooms": sender.rooms if sender is not None else 0,
                    "parked": sender.parked if sender is not None else 0,
                    "calls": transport.calls,
                    "unsettled": transport.unsettled,
                    "metrics": generate_latest(node.metrics.registry).decode(),
                }
                result = ("ok", state)
            else:
                result = ("error", "bad_command", repr(cmd[0]))
        except TransferError as e:
            result = ("error", e.reason.value, e.message)
        conn.send((cmd_id, result))

    tasks: set[asyncio.Task[None]] = set()
    while True:
        cmd_id, cmd = await asyncio.to_thread(conn.recv)
        if cmd[0] == "stop":
            break
        task = asyncio.create_task(run(cmd_id, cmd))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if isinstance(node, EmbeddingSender):
        await node.stop()
    transport.close()


class Peer:
    """A peer process. Use as a context manager: the process is always stopped."""

    def __init__(
        self,
        role: str,
        layout: BufferLayout,
        settings: TransferSettings,
        *,
        die: bool = False,
        device: str = "cpu",
        watch_frees: bool = False,
    ) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_peer_main,
            args=(role, layout, settings, child, die, device, watch_frees),
            daemon=True,
        )
        self._ids = itertools.count()
        self._pending: dict[int, tuple[Any, ...]] = {}
        self.address = ""

    def __enter__(self) -> Peer:
        self.process.start()
        if not self._conn.poll(60):
            raise AssertionError("peer did not start within 60s")
        tag, self.address = self._conn.recv()
        assert tag == "ready"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send((-1, ("stop",)))
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)

    def send(self, *cmd: Any) -> int:
        cmd_id = next(self._ids)
        self._conn.send((cmd_id, cmd))
        return cmd_id

    def result(self, cmd_id: int, timeout: float = 60) -> tuple[Any, ...]:
        """Wait (with a deadline) for the answer to command `cmd_id`."""
        while cmd_id not in self._pending:
            if not self._conn.poll(timeout):
                raise AssertionError(f"no answer to command {cmd_id} within {timeout}s")
            got_id, result = self._conn.recv()
            self._pending[got_id] = result
        return self._pending.pop(cmd_id)

    def call(self, *cmd: Any, timeout: float = 60) -> tuple[Any, ...]:
        return self.result(self.send(*cmd), timeout)

    def state(self) -> dict[str, Any]:
        status, state = self.call("state")
        assert status == "ok"
        assert isinstance(state, dict)
        return state
