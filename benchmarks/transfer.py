"""Transfer benchmark: our full path against the raw baselines, side by side in one run.

For each request size, between two OS processes on 127.0.0.1:
  ours      from an encoded item in the encoder's blocks (the vision tower writes its rows
            there when it computes in the pool's dtype, as on a GPU) to the receiver
            holding it in its own blocks: submit, one Mooncake transfer call (tcp) on a
            write thread, which then sends the "written" notice itself, and a lease of
            views on the language side (no copy there). The clock stops in the receiver.
            The receiver's hello is posted before the clock starts, as in service, where
            it overlaps the encoding.
  mooncake  one bare TransferEngine.transfer_sync_write of the same bytes
  socket    the same bytes over a plain loopback TCP socket, with a one-byte ack
  memcpy    one in-process copy of the same bytes
`added_latency_ms_p50` is the median of (ours - mooncake) over paired runs.
`mooncake_notify_ms`: the bare write with Mooncake's own notification (transfer_sync
with a TransferNotify) until a receiver thread polling get_notifies every 50 us sees it,
the other way a receiver could learn of completion.
`mooncake_on_thread_ms`: the same bare write issued from a write thread, as ours is (writes
never run on the event loop), timed on that thread.
`thread_dispatch_ms` (handing work to a write thread) and `receiver_wake_ms` (waking the
receiver's event loop with a few bytes) are what any design with a write thread and an
asyncio receiver pays on this machine: the floor under `added_latency_ms_p50`.
`encode_copy_ms` is the one copy the encoder makes when its tower cannot write in place
(another dtype, as on these CPUs in bfloat16): not on ours' clock, shown for what it
would add. A second line per size, `inflight: 8`, has 8 requests in flight at once
against 8 bare writes in flight at once (aggregate throughput, from the first start to
the last arrival). `receiver_copies` counts items the receiver had to copy out of its
pool (blocks not in one run).

Prints JSON objects with --json, else tables: throughput from the median of --repeat runs
(4x as many below 16 MiB). `--checksum` runs ours with per-block checksums (computed by the
sender at submit, checked by the receiver on arrival, both on the clock), as the resource's
`transfer.checksum` does; without it, ours runs without them: run both to see their cost.

    python benchmarks/transfer.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import torch

from deepstack_runtime.buffers import (
    BufferLayout,
    MultimodalDataBuffers,
    MultimodalItem,
    copy_item,
)
from deepstack_runtime.transfer.mooncake import MooncakeTransport
from deepstack_runtime.transfer.receiver import EmbeddingReceiver
from deepstack_runtime.transfer.sender import EmbeddingSender
from deepstack_runtime.transfer.settings import TransferSettings

HIDDEN = 2048  # Qwen3-VL-30B-A3B
K = 3
DTYPE = "bfloat16"
BLOCK_TOKENS = 256
SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]
INFLIGHT = 8
# Each timed run starts from a quiet machine: on 2 cores, threads still busy from the run
# before (torch's OpenMP workers spin after a parallel copy) took a core from Mooncake's
# and doubled single runs. The same pause, then one tiny write to wake Mooncake's
# threads, precede ours and the bare write.
SETTLE = 0.03


def token_bytes() -> int:
    return BufferLayout(1, 1, HIDDEN, K, DTYPE).token_bytes


def tokens_for(size: int) -> int:
    return max(1, size // token_bytes())


def pool_blocks(max_size: int, inflight_max: int) -> int:
    one = -(-tokens_for(max_size) // BLOCK_TOKENS)
    many = INFLIGHT * -(-tokens_for(min(max_size, inflight_max)) // BLOCK_TOKENS)
    return max(one, many) + INFLIGHT


def raw_bytes(max_size: int, inflight_max: int) -> int:
    return max(max_size, INFLIGHT * min(max_size, inflight_max)) + (1 << 20)


def settings_for(blocks: int, checksum: bool) -> TransferSettings:
    # Large enough that no request needs resumption: this measures the path itself.
    return TransferSettings(
        default_tokens=blocks * BLOCK_TOKENS,
        transfer_timeout=300,
        handshake_timeout=60,
        resume_timeout=60,
        max_queued=64,
        checksum=checksum,
    )


def make_item(tokens: int) -> MultimodalItem:
    g = torch.Generator().manual_seed(tokens)
    return MultimodalItem(
        embeddings=torch.randn(tokens, HIDDEN, generator=g).to(torch.bfloat16),
        deepstack=torch.randn(tokens, K, HIDDEN, generator=g).to(torch.bfloat16),
        fill_ids=torch.arange(tokens),
        positions=torch.zeros(tokens, 3, dtype=torch.int64),
    )


# --- receiver process ----------------------------------------------------------------------


def receiver_main(blocks: int, raw: int, checksum: bool, conn: Connection) -> None:
    asyncio.run(_receiver(blocks, raw, checksum, conn))


async def _receiver(blocks: int, raw: int, checksum: bool, conn: Connection) -> None:
    transport = MooncakeTransport("127.0.0.1", "tcp")
    buffers = MultimodalDataBuffers(BufferLayout(blocks, BLOCK_TOKENS, HIDDEN, K, DTYPE))
    buffers.arena.fill_(0)  # touch the pages once, as a live pod's pool is
    receiver = EmbeddingReceiver(buffers, transport, settings_for(blocks, checksum))
    receiver.start()
    raw_dst = torch.zeros(raw, dtype=torch.uint8)  # target of the bare baseline
    transport.register(raw_dst.data_ptr(), raw_dst.numel())
    # Raw socket sink: read N bytes, ack with one byte.
    sink = socket.create_server(("127.0.0.1", 0))
    sink_buf = bytearray(raw)

    def serve_sink() -> None:
        while True:
            c, _ = sink.accept()
            with c:
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while True:
                    head = c.recv(8, socket.MSG_WAITALL)
                    if len(head) < 8:
                        break
                    n = int.from_bytes(head, "little")
                    view, got = memoryview(sink_buf), 0
                    while got < n:
                        got += c.recv_into(view[got:n])
                    c.sendall(b"k")

    threading.Thread(target=serve_sink, daemon=True).start()

    async def stamp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """For each byte, when this event loop saw it (the receiver's wake-up)."""
        while await reader.read(1):
            writer.write(f"{time.perf_counter():.9f}\n".encode())

    stamps = await asyncio.start_server(stamp, "127.0.0.1", 0)
    conn.send(
        {
            "session": transport.session_id,
            "raw_dst": raw_dst.data_ptr(),
            "sink": sink.getsockname()[1],
            "stamps": stamps.sockets[0].getsockname()[1],
        }
    )

    async def receive(room: str, address: str, tokens: int) -> None:
        async with receiver.lease(room, address, tokens) as item:
            # perf_counter is CLOCK_MONOTONIC: comparable between processes of one machine.
            conn.send(("ok", room, item.num_tokens, time.perf_counter()))

    def notified(name: str) -> None:
        """Poll Mooncake's notifications (every 50 us) until `name` is among them."""
        while not any(n.name == name for n in transport._engine.get_notifies()):
            time.sleep(50e-6)
        conn.send(("notified", name, time.perf_counter()))

    tasks = set()
    while True:
        cmd = await asyncio.to_thread(conn.recv)
        if cmd[0] == "stop":
            conn.send(("gathered", receiver.metrics.gathered._value.get()))
            break
        if cmd[0] == "notify":
            threading.Thread(target=notified, args=(cmd[1],), daemon=True).start()
            continue
        task = asyncio.create_task(receive(*cmd[1:]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


# --- sender process (does the timing) --------------------------------------------------------


def sender_main(
    blocks: int, raw: int, args: argparse.Namespace, conn: Connection, peer: dict[str, Any]
) -> None:
    asyncio.run(_sender(blocks, raw, args, conn, peer))


def _median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1e3, 3)


async def _sender(
    blocks: int, raw: int, args: argparse.Namespace, conn: Connection, peer: dict[str, Any]
) -> None:
    transport = MooncakeTransport("127.0.0.1", "tcp")
    buffers = MultimodalDataBuffers(BufferLayout(blocks, BLOCK_TOKENS, HIDDEN, K, DTYPE))
    buffers.arena.fill_(0)
    sender = EmbeddingSender(buffers, transport, settings_for(blocks, args.checksum))
    await sender.start()
    src = torch.ones(raw, dtype=torch.uint8)
    transport.register(src.data_ptr(), src.numel())
    copy_dst = torch.empty_like(src)
    sock = socket.create_connection(("127.0.0.1", peer["sink"]))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    engine = transport._engine  # the bare baseline calls the engine itself
    writers = ThreadPoolExecutor(INFLIGHT)
    stamps = socket.create_connection(("127.0.0.1", peer["stamps"]))
    stamps.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stamp_lines = stamps.makefile("rb")
    loop = asyncio.get_running_loop()

    async def floor() -> tuple[float, float]:
        """What any path with a write thread and an event-loop receiver pays here: handing
        work to a thread, and waking the receiver's event loop with a few bytes."""
        time.sleep(SETTLE)
        t0 = time.perf_counter()
        dispatched = await loop.run_in_executor(writers, time.perf_counter) - t0
        t0 = time.perf_counter()
        stamps.sendall(b"x")
        woken = float(stamp_lines.readline()) - t0
        return dispatched, woken

    room_ids = iter(range(1 << 30))

    def bare_write(offset: int, nbytes: int) -> None:
        rc = engine.transfer_sync_write(
            peer["session"], src.data_ptr() + offset, peer["raw_dst"] + offset, nbytes
        )
        assert rc == 0, rc

    def notified_write(nbytes: int) -> float:
        """A bare write with Mooncake's own completion notification, until the receiver's
        poller sees it: the alternative to our "written" notice."""
        from mooncake.engine import TransferNotify, TransferOpcode

        name = f"notify-{next(room_ids)}"
        conn.send(("notify", name))
        time.sleep(SETTLE)
        wake()
        t0 = time.perf_counter()
        rc = engine.transfer_sync(
            peer["session"],
            src.data_ptr(),
            peer["raw_dst"],
            nbytes,
            TransferOpcode.Write,
            TransferNotify(name, "written"),
        )
        assert rc == 0, rc
        reply = conn.recv()
        assert reply[:2] == ("notified", name), reply
        return float(reply[2]) - t0

    def timed_bare_write(nbytes: int) -> float:
        """The bare write, timed on the thread that makes it (a write thread, as ours)."""
        t0 = time.perf_counter()
        bare_write(0, nbytes)
        return time.perf_counter() - t0

    def wake() -> None:
        """One tiny write just before a timed run, ours or bare alike: Mooncake's threads on
        both sides are awake, as they are under steady traffic."""
        bare_write(raw - 64, 64)

    async def ours_once(items: list[MultimodalItem]) -> float:
        """Seconds from the first submit to the last item held by the receiver."""
        rooms = [f"bench-{next(room_ids)}" for _ in items]
        for room, item in zip(rooms, items, strict=True):
            conn.send(("receive", room, sender.address, item.num_tokens))
        await asyncio.sleep(SETTLE + 0.01 * len(items))  # the hellos arrive, wait for rooms
        lent = []
        for room, item in zip(rooms, items, strict=True):
            reserved = await sender.reserve(room, item.num_tokens)
            assert reserved is not None
            copy_item(item, reserved.item)  # the vision tower writing its rows in place
            lent.append(reserved)
        wake()
        t0 = time.perf_counter()
        finished = [await sender.submit(r.room, r.item, r) for r in lent]
        await asyncio.gather(*finished)
        arrivals = [conn.recv() for _ in items]
        assert all(a[0] == "ok" for a in arrivals), arrivals
        return max(a[3] for a in arrivals) - t0

    rows = []
    for size in [s for s in SIZES if s <= args.max_size]:
        item = make_item(tokens_for(size))
        nbytes = item.num_tokens * token_bytes()
        calls_before = transport.calls
        ours, bare, sock_t, copy_t, scatter_t, notify_t = [], [], [], [], [], []
        dispatch_t, wake_t, thread_t = [], [], []
        # Small transfers are quick and noisy (Mooncake's tcp latency is bimodal here):
        # take more samples of them.
        runs = args.repeat if size >= 16 << 20 else args.repeat * 4
        for _ in range(runs + 1):  # the first round warms up connections
            ours.append(await ours_once([item]))

            time.sleep(SETTLE)
            wake()
            t0 = time.perf_counter()
            bare_write(0, nbytes)
            bare.append(time.perf_counter() - t0)

            notify_t.append(notified_write(nbytes))

            time.sleep(SETTLE)
            wake()
            thread_t.append(await loop.run_in_executor(writers, timed_bare_write, nbytes))
            dispatched, woken = await floor()
            dispatch_t.append(dispatched)
            wake_t.append(woken)

            t0 = time.perf_counter()
            sock.sendall(nbytes.to_bytes(8, "little"))
            sock.sendall(memoryview(src.numpy())[:nbytes])
            assert sock.recv(1) == b"k"
            sock_t.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            copy_dst[:nbytes].copy_(src[:nbytes])
            copy_t.append(time.perf_counter() - t0)

            # The request's blocks are free again: the encoder's copy, alone.
            taken = sender.allocator.alloc(buffers.layout.blocks_for(item.num_tokens))
            t0 = time.perf_counter()
            buffers.scatter(taken, item)
            scatter_t.append(time.perf_counter() - t0)
            sender.allocator.free(taken)
        calls = (transport.calls - calls_before) / (runs + 1)
        ours, bare, sock_t, copy_t, scatter_t, notify_t, thread_t = (
            x[1:] for x in (ours, bare, sock_t, copy_t, scatter_t, notify_t, thread_t)
        )
        med = [statistics.median(x) for x in (ours, bare, sock_t, copy_t)]
        added = statistics.median(o - b for o, b in zip(ours, bare, strict=True))
        gbps = [nbytes / t / 1e9 for t in med]
        rows.append(
            {
                "size_bytes": nbytes,
                "tokens": item.num_tokens,
                "checksum": args.checksum,
                "ours_gbps": round(gbps[0], 3),
                "mooncake_gbps": round(gbps[1], 3),
                "socket_gbps": round(gbps[2], 3),
                "memcpy_gbps": round(gbps[3], 3),
                "ours_vs_mooncake": round(med[1] / med[0], 3),
                "added_latency_ms_p50": round(added * 1e3, 3),
                "ours_ms": _median_ms(ours),
                "mooncake_ms": _median_ms(bare),
                "encode_copy_ms": _median_ms(scatter_t),
                "mooncake_notify_ms": _median_ms(notify_t),
                "mooncake_on_thread_ms": _median_ms(thread_t),
                "thread_dispatch_ms": _median_ms(dispatch_t),
                "receiver_wake_ms": _median_ms(wake_t),
                "transfer_calls_per_request": calls,
            }
        )
        if size > args.inflight_max_size:
            continue
        many = [make_item(item.num_tokens) for _ in range(INFLIGHT)]
        ours_many, bare_many = [], []
        for _ in range(max(3, args.repeat // 2) + 1):
            ours_many.append(await ours_once(many))
            time.sleep(SETTLE)
            wake()
            t0 = time.perf_counter()
            list(
                writers.map(bare_write, [i * nbytes for i in range(INFLIGHT)], [nbytes] * INFLIGHT)
            )
            bare_many.append(time.perf_counter() - t0)
        o, b = statistics.median(ours_many[1:]), statistics.median(bare_many[1:])
        rows.append(
            {
                "size_bytes": nbytes,
                "inflight": INFLIGHT,
                "ours_gbps": round(INFLIGHT * nbytes / o / 1e9, 3),
                "mooncake_gbps": round(INFLIGHT * nbytes / b / 1e9, 3),
                "ours_vs_mooncake": round(b / o, 3),
            }
        )
    conn.send(("stop",))
    gathered = conn.recv()
    await sender.stop()
    # The language side read every item where it landed: no copy there.
    for row in rows:
        row["receiver_copies"] = gathered[1]
    print_rows(rows, as_json=args.json)


def print_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    for kind in (False, True):
        chosen = [r for r in rows if ("inflight" in r) == kind]
        if chosen:
            cols = list(chosen[0])
            print(" | ".join(cols))
            for row in chosen:
                print(" | ".join(str(row[c]) for c in cols))


def main() -> None:
    # Idle OpenMP workers sleep instead of spinning (inherited by both processes).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--max-size", type=int, default=SIZES[-1], help="largest request, bytes")
    parser.add_argument(
        "--inflight-max-size",
        type=int,
        default=64 << 20,
        help=f"largest request measured with {INFLIGHT} in flight (memory: {INFLIGHT}x per side)",
    )
    parser.add_argument("--repeat", type=int, default=9, help="timed runs per size")
    parser.add_argument("--checksum", action="store_true", help="ours with per-block checksums")
    args = parser.parse_args()
    blocks = pool_blocks(args.max_size, args.inflight_max_size)
    raw = raw_bytes(args.max_size, args.inflight_max_size)
    ctx = mp.get_context("spawn")
    to_receiver, receiver_end = ctx.Pipe()
    receiver = ctx.Process(
        target=receiver_main, args=(blocks, raw, args.checksum, receiver_end), daemon=True
    )
    receiver.start()
    peer = to_receiver.recv()
    sender = ctx.Process(
        target=sender_main, args=(blocks, raw, args, to_receiver, peer), daemon=True
    )
    sender.start()
    sender.join()
    receiver.kill()
    receiver.join()
    raise SystemExit(sender.exitcode)


if __name__ == "__main__":
    main()
