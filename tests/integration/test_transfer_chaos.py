"""Soak under faults: thousands of transfers between real processes over real Mooncake
(tcp, checksums on) while faults are injected at random: peers SIGKILLed and restarted,
writes stalled past every timeout (late writes), items larger than the pool, receivers
that give up mid-transfer (an abandoned request). At the end: no corrupted item, no block
held on either side, every failure counted under a reason."""

from __future__ import annotations

import random
import time
from collections import Counter
from functools import partial
from typing import Any

import torch

from deepstack_runtime.buffers import BufferLayout, MultimodalItem
from deepstack_runtime.transfer.settings import TransferSettings
from devkit.cluster import wait_for
from devkit.metrics import sample
from devkit.transfer_peers import Peer, decode_item, encode_item

TRANSFERS = 2000
IN_FLIGHT = 16
LAYOUT = BufferLayout(num_blocks=64, block_tokens=8, hidden_size=32, num_deepstack=3,
                      dtype="bfloat16")  # fmt: skip
SETTINGS = TransferSettings(
    default_tokens=16,  # more than 16 tokens: resumed rounds
    handshake_timeout=1,
    transfer_timeout=2,
    resume_timeout=1,
    max_rounds=8,
    checksum=True,
)
STALL = 2.5  # past every timeout above
REASONS = ("timeout", "peer_lost", "connect_failed", "unknown_room", "oversize",
           "pool_exhausted", "transfer_error", "aborted", "bad_request")  # fmt: skip


def item_for(seed: int, tokens: int) -> MultimodalItem:
    g = torch.Generator().manual_seed(seed)
    h, k = LAYOUT.hidden_size, LAYOUT.num_deepstack
    return MultimodalItem(
        embeddings=torch.randn(tokens, h, generator=g).to(torch.bfloat16),
        deepstack=torch.randn(tokens, k, h, generator=g).to(torch.bfloat16),
        fill_ids=torch.full((tokens,), seed, dtype=torch.int64),
        positions=torch.randint(0, 1000, (tokens, 3), generator=g),
    )


def same(a: MultimodalItem, b: MultimodalItem) -> bool:
    pairs = [(a.embeddings, b.embeddings), (a.fill_ids, b.fill_ids), (a.positions, b.positions)]
    pairs.append((a.deepstack, b.deepstack))  # type: ignore[arg-type]
    return all(torch.equal(x.view(torch.int16) if x.dtype == torch.bfloat16 else x,
                           y.view(torch.int16) if y.dtype == torch.bfloat16 else y)
               for x, y in pairs)  # fmt: skip


def failures(state: dict[str, Any]) -> int:
    return int(sum(sample(state["metrics"], "deepstack_transfer_failures_total", reason=r)
                   for r in REASONS))  # fmt: skip


def idle(peer: Peer) -> dict[str, Any] | None:
    state = peer.state()
    return state if state["used"] == state["fenced"] == state["rooms"] == 0 else None


def answer(peer: Peer, cmd_id: int) -> tuple[Any, ...]:
    try:
        return peer.result(cmd_id, timeout=30)
    except (AssertionError, EOFError, OSError):  # the peer was killed
        return ("error", "peer_died", "")


def test_thousands_of_transfers_under_faults_corrupt_nothing_and_leak_nothing() -> None:
    rng = random.Random(1234)
    outcomes: Counter[str] = Counter()
    corrupted = 0
    receiver_failures = 0  # failed receives the current receiver process must have counted
    peers = {
        "sender": Peer("sender", LAYOUT, SETTINGS),
        "receiver": Peer("receiver", LAYOUT, SETTINGS),
    }
    for peer in peers.values():
        peer.__enter__()
    started = time.monotonic()
    try:
        done = 0
        while done < TRANSFERS:
            sender, receiver = peers["sender"], peers["receiver"]
            batch = []
            for seed in range(done, min(done + IN_FLIGHT, TRANSFERS)):
                fault, tokens, room = rng.random(), rng.randint(1, 60), f"r{seed}"
                if fault < 0.02:
                    tokens = LAYOUT.num_blocks * LAYOUT.block_tokens + 8  # larger than the pool
                submit = None  # 0.97-0.99: never submitted, the receiver hears unknown_room
                if not 0.97 <= fault < 0.99:
                    submit = sender.send("submit", room, encode_item(item_for(seed, tokens)))
                if 0.05 <= fault < 0.07:
                    sender.send("slow_next_write", STALL)  # a late write
                args: tuple[Any, ...] = (room, sender.address)
                if 0.07 <= fault < 0.10:
                    args += (rng.uniform(0.0, 0.05),)  # the request is abandoned
                batch.append((seed, tokens, submit, receiver.send("receive", *args)))
            victim = rng.choice(["sender", "receiver"]) if rng.random() < 0.02 else None
            if victim is not None:  # dies with transfers in flight
                peers[victim].process.kill()
            for seed, tokens, submit, receive in batch:
                result = answer(receiver, receive)
                if submit is not None:
                    answer(sender, submit)
                if result[0] == "ok":
                    outcomes["ok"] += 1
                    corrupted += not same(decode_item(result[1]), item_for(seed, tokens))
                else:
                    outcomes[result[1]] += 1
                    receiver_failures += result[1] != "peer_died"
            done += len(batch)
            if victim is not None:
                survivor = "receiver" if victim == "sender" else "sender"
                wait_for(partial(idle, peers[survivor]), timeout=30,
                         what=f"the {survivor} to free what the dead {victim} had")  # fmt: skip
                peers[victim].__exit__(None, None, None)
                peers[victim] = Peer(victim, LAYOUT, SETTINGS).__enter__()
                if victim == "receiver":
                    receiver_failures = 0
                outcomes["peer_killed"] += 1
        final = {name: wait_for(partial(idle, peer), timeout=60, what=f"{name} idle")
                 for name, peer in peers.items()}  # fmt: skip
    finally:
        for peer in peers.values():
            peer.__exit__(None, None, None)
    elapsed = time.monotonic() - started
    counted = {name: failures(state) for name, state in final.items()}
    print(f"{TRANSFERS} transfers in {elapsed:.1f}s: {dict(outcomes)}; corrupted {corrupted}; "
          f"failures counted by the last sender/receiver {counted}")  # fmt: skip
    assert corrupted == 0, corrupted
    assert outcomes["transfer_error"] == 0  # no checksum mismatch either
    assert sum(outcomes.values()) - outcomes["peer_killed"] == TRANSFERS
    assert outcomes["ok"] > TRANSFERS * 0.7
    for kind in ("oversize", "unknown_room", "timeout", "abandoned"):
        assert outcomes[kind] > 0, kind  # each fault was injected and seen
    # Every failure of the last receiver process is counted under a reason, exactly once.
    assert counted["receiver"] == receiver_failures
