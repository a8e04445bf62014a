"""A write stalled past its deadline, between two OS processes over real Mooncake (tcp).

The receiving process is stopped (SIGSTOP) while the encoder writes an item far larger
than the sockets can buffer, so that the write cannot finish. Mooncake never gives such a
write up: once the receiver runs again (SIGCONT) the whole write lands. So its blocks, on
both sides, must stay fenced until Mooncake reports the write final, and no byte may
land in a block after it was freed.
"""

from __future__ import annotations

import os
import signal
import time
from functools import partial
from typing import Any

import torch

from deepstack_runtime.buffers import BufferLayout, MultimodalItem
from deepstack_runtime.transfer.settings import TransferSettings
from devkit.cluster import wait_for
from devkit.transfer_peers import Peer, decode_item, encode_item

TOKENS = 2048
LAYOUT = BufferLayout(num_blocks=160, block_tokens=16, hidden_size=1024, num_deepstack=3,
                      dtype="float32")  # fmt: skip
BLOCKS = TOKENS // LAYOUT.block_tokens  # 128 blocks, 33.6 MB: far beyond socket buffers
SETTINGS = TransferSettings(
    default_tokens=TOKENS,
    handshake_timeout=2,
    transfer_timeout=10,
    resume_timeout=5,
    write_timeout=1,
    checksum=True,
)


def item(seed: int, tokens: int = TOKENS) -> MultimodalItem:
    g = torch.Generator().manual_seed(seed)
    h, k = LAYOUT.hidden_size, LAYOUT.num_deepstack
    return MultimodalItem(
        embeddings=torch.randn(tokens, h, generator=g),
        deepstack=torch.randn(tokens, k, h, generator=g),
        fill_ids=torch.arange(tokens),
        positions=torch.randint(0, 1000, (tokens, 3), generator=g),
    )


def idle(peer: Peer) -> dict[str, Any] | None:
    state = peer.state()
    return state if state["used"] == state["fenced"] == state["rooms"] == 0 else None


def test_a_write_stalled_past_its_deadline_stays_fenced_until_mooncake_says_it_is_final() -> None:
    with (
        Peer("sender", LAYOUT, SETTINGS) as sender,
        Peer("receiver", LAYOUT, SETTINGS, watch_frees=True) as receiver,
    ):
        # A first transfer opens Mooncake's segment of the receiver (as the language
        # pod's transfer check does): opening one on a stopped process would block.
        warm = item(1, LAYOUT.block_tokens)
        pending = receiver.send("receive", "warm", sender.address)
        assert sender.call("submit", "warm", encode_item(warm)) == ("ok", None)
        status, got = receiver.result(pending)
        assert status == "ok"
        assert torch.equal(decode_item(got).embeddings, warm.embeddings)

        pending = receiver.send("receive", "stalled", sender.address)
        wait_for(lambda: sender.state()["parked"] == 1, timeout=10, what="the hello")
        pid = receiver.process.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            assert sender.call("submit", "stalled", encode_item(item(2))) == ("ok", None)

            def past_deadline() -> dict[str, Any] | None:
                state = sender.state()
                return state if state["fenced"] else None

            started = time.monotonic()
            state = wait_for(past_deadline, timeout=10, what="the write to miss its deadline")
            assert time.monotonic() - started >= SETTINGS.write_seconds / 2
            # Its request has failed, but the source blocks, the room and its connection
            # (which tells the receiver when its blocks are safe) are all kept.
            assert state["fenced"] == state["used"] == BLOCKS
            assert state["rooms"] == 1
            assert state["unsettled"] == 1
            # Still unsettled a while later: Mooncake does not give up a stalled write.
            time.sleep(SETTINGS.write_seconds)
            assert sender.state()["fenced"] == BLOCKS
        finally:
            os.kill(pid, signal.SIGCONT)

        status, reason, message = receiver.result(pending, timeout=30)
        assert (status, reason) == ("error", "timeout"), message
        final = {name: wait_for(partial(idle, peer), timeout=30, what=f"{name} idle")
                 for name, peer in (("sender", sender), ("receiver", receiver))}  # fmt: skip
        assert final["sender"]["unsettled"] == 0
        # The stalled write did land in full once the receiver ran again...
        assert receiver.call("checksums", BLOCKS, TOKENS) == sender.call(
            "checksums", BLOCKS, TOKENS
        )
        # ...and all of it before the receiver let its blocks go.
        assert receiver.call("changed_after_free") == ("ok", [])
