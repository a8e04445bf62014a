"""Transfer benchmark: our full path against the raw baselines, side by side in one run.

For each request size, between two OS processes on 127.0.0.1:
  ours      scatter into the sender's pool, transfer (Mooncake tcp), "written" notice,
            gather into the receiver's output rows (the clock stops there, in the
            receiver; the "done" ack that frees the sender's blocks is off that path).
            The receiver's handshake is posted before the clock starts, as in service,
            where it overlaps the encoding; the output rows exist already, as the
            prompt's embeddings do.
  mooncake  one bare TransferEngine.transfer_sync_write of the same bytes
  socket    the same bytes over a plain loopback TCP socket, with a one-byte ack
  memcpy    one in-process copy of the same bytes
  copies    our scatter plus our gather of the same item, alone (no transfer): the two
            copies our path must make on top of the wire. `ceiling_vs_mooncake` =
            mooncake / (mooncake + copies) is the most our path can reach where copies
            and wire share the same CPUs; `ours_vs_ceiling` is how close it comes.
Prints one JSON object per size with --json, else a table: throughput from the median of
--repeat runs (4x as many below 16 MiB), and the ratio of the best runs as well.

    python benchmarks/transfer.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import statistics
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

from deepstack_runtime.buffers import BufferLayout, MultimodalDataBuffers, MultimodalItem
from deepstack_runtime.transfer.mooncake import MooncakeTransport
from deepstack_runtime.transfer.receiver import EmbeddingReceiver
from deepstack_runtime.transfer.sender import EmbeddingSender
from deepstack_runtime.transfer.settings import TransferSettings

HIDDEN = 2048  # Qwen3-VL-30B-A3B
K = 3
DTYPE = "bfloat16"
BLOCK_TOKENS = 256
SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]


def token_bytes() -> int:
    return (1 + K) * HIDDEN * 2 + 8 + 3 * 8  # embedding + deepstack + fill id + positions


def tokens_for(size: int) -> int:
    return max(1, size // token_bytes())


def layout_for(max_size: int) -> BufferLayout:
    blocks = -(-tokens_for(max_size) // BLOCK_TOKENS) + 1
    return BufferLayout(blocks, BLOCK_TOKENS, HIDDEN, K, DTYPE)


def settings_for(max_size: int) -> TransferSettings:
    # Large enough that no request needs resumption: this measures the path itself.
    lay = layout_for(max_size)
    return TransferSettings(
        default_tokens=(lay.num_blocks - 1) * BLOCK_TOKENS, transfer_timeout=120, resume_timeout=60
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


def receiver_main(max_size: int, conn: Connection) -> None:
    asyncio.run(_receiver(max_size, conn))


async def _receiver(max_size: int, conn: Connection) -> None:
    transport = MooncakeTransport("127.0.0.1", "tcp")
    buffers = MultimodalDataBuffers(layout_for(max_size))
    receiver = EmbeddingReceiver(buffers, transport, settings_for(max_size))
    receiver.start()
    raw_dst = torch.empty(max_size + (1 << 20), dtype=torch.uint8)  # target of the bare baseline
    transport.register(raw_dst.data_ptr(), raw_dst.numel())
    # Raw socket sink: read N bytes, ack with one byte.
    sink = socket.create_server(("127.0.0.1", 0))
    sink_buf = bytearray(max_size)

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
    conn.send(
        {
            "session": transport.session_id,
            "raw_dst": raw_dst.data_ptr(),
            "sink": sink.getsockname()[1],
        }
    )
    outputs: dict[int, MultimodalItem] = {}
    while True:
        cmd = await asyncio.to_thread(conn.recv)
        if cmd[0] == "stop":
            break
        _, room, address, tokens = cmd
        if tokens not in outputs:
            outputs[tokens] = buffers.empty_item(tokens)
            for t in (outputs[tokens].embeddings, outputs[tokens].deepstack):
                if t is not None:
                    t.zero_()  # touch the pages once, as a live model's buffers are
        item = await receiver.receive(room, address, outputs[tokens])
        # perf_counter is CLOCK_MONOTONIC: comparable between processes of one machine.
        conn.send(("ok", item.num_tokens, time.perf_counter()))


# --- sender process (does the timing) --------------------------------------------------------


def sender_main(max_size: int, repeat: int, conn: Connection, peer: dict[str, Any]) -> None:
    asyncio.run(_sender(max_size, repeat, conn, peer))


async def _sender(max_size: int, repeat: int, conn: Connection, peer: dict[str, Any]) -> None:
    transport = MooncakeTransport("127.0.0.1", "tcp")
    buffers = MultimodalDataBuffers(layout_for(max_size))
    sender = EmbeddingSender(buffers, transport, settings_for(max_size))
    await sender.start()
    raw = torch.ones(max_size + (1 << 20), dtype=torch.uint8)
    transport.register(raw.data_ptr(), raw.numel())
    copy_dst = torch.empty_like(raw)
    sock = socket.create_connection(("127.0.0.1", peer["sink"]))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    engine = transport._engine  # the bare baseline calls the engine itself
    rows = []
    room_ids = iter(range(1 << 30))
    for size in [s for s in SIZES if s <= max_size]:
        item = make_item(tokens_for(size))
        nbytes = item.num_tokens * token_bytes()
        ours, bare, sock_t, copy_t, copies_t, calls = [], [], [], [], [], []
        gathered = buffers.empty_item(item.num_tokens)
        for t in (gathered.embeddings, gathered.deepstack):
            if t is not None:
                t.zero_()  # touched once, like the receiver's output rows
        # Small transfers are quick and noisy (Mooncake's tcp latency is bimodal here):
        # take more samples of them.
        runs = repeat if size >= 16 << 20 else repeat * 4
        for _ in range(runs + 1):  # the first round warms up connections
            room = f"bench-{next(room_ids)}"
            conn.send(("receive", room, sender.address, item.num_tokens))
            await asyncio.sleep(0.01)  # let the receiver's hello arrive: it waits for the room
            before = transport.calls
            t0 = time.perf_counter()
            finished = await sender.submit(room, item)
            await finished
            status, _, delivered = conn.recv()
            assert status == "ok"
            ours.append(delivered - t0)  # until the receiver holds the data in its rows
            calls.append(transport.calls - before)

            t0 = time.perf_counter()
            rc = engine.transfer_sync_write(
                peer["session"], raw.data_ptr(), peer["raw_dst"], nbytes
            )
            bare.append(time.perf_counter() - t0)
            assert rc == 0, rc

            t0 = time.perf_counter()
            sock.sendall(nbytes.to_bytes(8, "little"))
            sock.sendall(memoryview(raw.numpy())[:nbytes])
            assert sock.recv(1) == b"k"
            sock_t.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            copy_dst[:nbytes].copy_(raw[:nbytes])
            copy_t.append(time.perf_counter() - t0)

            # The request's blocks are free again: the same copies, on the same memory.
            blocks = sender.allocator.alloc(buffers.layout.blocks_for(item.num_tokens))
            t0 = time.perf_counter()
            buffers.scatter(blocks, item)
            buffers.gather(blocks, item.num_tokens, gathered)
            copies_t.append(time.perf_counter() - t0)
            sender.allocator.free(blocks)
        med = [statistics.median(x[1:]) for x in (ours, bare, sock_t, copy_t, copies_t)]
        ceiling = med[1] + med[4]  # seconds: the bare write plus our two copies
        best = [min(x[1:]) for x in (ours, bare)]
        gbps = [nbytes / t / 1e9 for t in med]
        rows.append(
            {
                "size_bytes": nbytes,
                "tokens": item.num_tokens,
                "blocks": layout_for(max_size).blocks_for(item.num_tokens),
                "ours_gbps": round(gbps[0], 3),
                "mooncake_gbps": round(gbps[1], 3),
                "socket_gbps": round(gbps[2], 3),
                "memcpy_gbps": round(gbps[3], 3),
                "ours_vs_mooncake": round(gbps[0] / gbps[1], 3),
                "ours_vs_mooncake_best": round(best[1] / best[0], 3),
                "ceiling_vs_mooncake": round(med[1] / ceiling, 3),
                "ours_vs_ceiling": round(ceiling / med[0], 3),
                "transfer_calls": max(calls[1:]),
                "ours_ms": round(med[0] * 1e3, 3),
                "mooncake_ms": round(med[1] * 1e3, 3),
                "copies_ms": round(med[4] * 1e3, 3),
            }
        )
    conn.send(("stop",))
    await sender.stop()
    print_rows(rows, as_json=bool(peer["json"]))


def print_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    cols = list(rows[0])
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per size")
    parser.add_argument("--max-size", type=int, default=SIZES[-1], help="largest request, bytes")
    parser.add_argument("--repeat", type=int, default=9, help="timed runs per size")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    to_receiver, receiver_end = ctx.Pipe()
    receiver = ctx.Process(target=receiver_main, args=(args.max_size, receiver_end), daemon=True)
    receiver.start()
    peer = to_receiver.recv()
    peer["json"] = args.json
    sender = ctx.Process(
        target=sender_main, args=(args.max_size, args.repeat, to_receiver, peer), daemon=True
    )
    sender.start()
    sender.join()
    receiver.kill()
    receiver.join()
    raise SystemExit(sender.exitcode)


if __name__ == "__main__":
    main()
