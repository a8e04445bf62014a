"""Real Mooncake over tcp on 127.0.0.1 between two OS processes: bit-identical round trips
(resumption included), exact byte accounting, and faults that leave no block behind."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from deepstack_runtime.buffers import DTYPES, BufferLayout, MultimodalItem
from deepstack_runtime.transfer.settings import TransferSettings
from devkit.cluster import wait_for
from devkit.metrics import sample
from devkit.transfer_peers import DIE_EXIT_CODE, Peer, decode_item, encode_item

BLOCK = 16
DEFAULT_TOKENS = 64  # 4 blocks
HIDDEN = 64
POOL = 64
LENGTHS = {
    "1": 1,
    "block-1": BLOCK - 1,
    "block": BLOCK,
    "block+1": BLOCK + 1,
    "1x-default": DEFAULT_TOKENS,
    "2.5x-default": int(2.5 * DEFAULT_TOKENS),
    "7x-default": 7 * DEFAULT_TOKENS,
}
SETTINGS = TransferSettings(
    default_tokens=DEFAULT_TOKENS,
    handshake_timeout=5,
    transfer_timeout=30,
    resume_timeout=10,
    max_rounds=8,
    checksum=True,
)


def layout(k: int, dtype: str, blocks: int = POOL, hidden: int = HIDDEN) -> BufferLayout:
    return BufferLayout(blocks, BLOCK, hidden, k, dtype)


def random_item(tokens: int, k: int, dtype: str, seed: int, hidden: int = HIDDEN) -> MultimodalItem:
    g = torch.Generator().manual_seed(seed)
    return MultimodalItem(
        embeddings=torch.randn(tokens, hidden, generator=g).to(DTYPES[dtype]),
        deepstack=torch.randn(tokens, k, hidden, generator=g).to(DTYPES[dtype]) if k else None,
        fill_ids=torch.randint(0, 1 << 40, (tokens,), generator=g),
        positions=torch.randint(0, 1 << 20, (tokens, 3), generator=g),
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    """Compare floats bit for bit (NaN-safe, -0.0 distinct)."""
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def assert_identical(got: MultimodalItem, want: MultimodalItem) -> None:
    assert torch.equal(bits(got.embeddings), bits(want.embeddings))
    if want.deepstack is None:
        assert got.deepstack is None
    else:
        assert got.deepstack is not None
        assert torch.equal(bits(got.deepstack), bits(want.deepstack))
    assert torch.equal(got.fill_ids, want.fill_ids)
    assert torch.equal(got.positions, want.positions)


def payload_bytes(tokens: int, k: int, dtype: str) -> dict[str, int]:
    """What moving `tokens` tokens must cost, exactly: their embedding and DeepStack rows;
    as aux, their fill id and positions (32 bytes, padded with the rows to 16 bytes);
    nothing else (no per-block header goes on the wire)."""
    es = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    rows = HIDDEN * es * (1 + k)
    record = -(-(32 + rows) // 16) * 16
    return {
        "embedding": tokens * HIDDEN * es,
        "deepstack": tokens * k * HIDDEN * es,
        "aux": tokens * (record - rows),
    }


def transfer(sender: Peer, receiver: Peer, room: str, item: MultimodalItem) -> tuple[Any, ...]:
    pending = receiver.send("receive", room, sender.address)
    assert sender.call("submit", room, encode_item(item)) == ("ok", None)
    return receiver.result(pending)


def no_blocks_held(peer: Peer) -> None:
    def idle() -> dict[str, Any] | None:
        state = peer.state()
        return state if state["used"] == 0 and state["rooms"] == 0 else None

    wait_for(idle, timeout=20, what="every block free")


@pytest.fixture(
    scope="module",
    params=[(0, "float32"), (3, "float32"), (3, "bfloat16"), (0, "bfloat16")],
    ids=lambda p: f"K{p[0]}-{p[1]}",
)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Peer, Peer, int, str]]:
    k, dtype = request.param
    with (
        Peer("sender", layout(k, dtype), SETTINGS) as sender,
        Peer("receiver", layout(k, dtype), SETTINGS) as receiver,
    ):
        yield sender, receiver, k, dtype


@pytest.mark.parametrize("length", LENGTHS.values(), ids=LENGTHS.keys())
def test_round_trip_is_bit_identical_and_accounted(
    pair: tuple[Peer, Peer, int, str], length: int
) -> None:
    sender, receiver, k, dtype = pair
    before_s, before_r = sender.state(), receiver.state()
    item = random_item(length, k, dtype, seed=length)

    result = transfer(sender, receiver, f"room-{k}-{dtype}-{length}", item)
    assert result[0] == "ok", result
    status, data = result

    assert status == "ok", data
    assert_identical(decode_item(data), item)
    after_s, after_r = sender.state(), receiver.state()
    # Bytes: exactly the rows of the sequence, each sent once, resumed rounds included.
    want = payload_bytes(length, k, dtype)
    for payload, nbytes in want.items():
        moved = sample(after_s["metrics"], "deepstack_transfer_bytes_total", payload=payload)
        moved -= sample(before_s["metrics"], "deepstack_transfer_bytes_total", payload=payload)
        assert moved == nbytes, payload
    rounds = -(-length // DEFAULT_TOKENS)  # with all-at-once resumption: 1 or 2
    resumed = sample(after_r["metrics"], "deepstack_transfer_resumptions_total") - sample(
        before_r["metrics"], "deepstack_transfer_resumptions_total"
    )
    assert resumed == (1 if rounds > 1 else 0)
    resumed_bytes = sample(after_s["metrics"], "deepstack_transfer_resumed_bytes_total") - sample(
        before_s["metrics"], "deepstack_transfer_resumed_bytes_total"
    )
    first_round = payload_bytes(min(length, DEFAULT_TOKENS), k, dtype)
    assert resumed_bytes == sum(want.values()) - sum(first_round.values())
    # One transfer call per round, however many blocks.
    assert after_s["calls"] - before_s["calls"] == min(rounds, 2)
    # Nothing held afterwards, on either side.
    assert after_r["used"] == 0
    no_blocks_held(sender)
    count = sample(after_r["metrics"], "deepstack_transfer_duration_seconds_count")
    assert count == sample(before_r["metrics"], "deepstack_transfer_duration_seconds_count") + 1


def test_metric_series_exist_at_zero_from_start() -> None:
    with Peer("receiver", layout(3, "float32"), SETTINGS) as receiver:
        text = receiver.state()["metrics"]
    for payload in ("embedding", "deepstack", "aux"):
        assert sample(text, "deepstack_transfer_bytes_total", payload=payload) == 0
    assert sample(text, "deepstack_transfer_failures_total", reason="peer_lost") == 0
    assert sample(text, "deepstack_transfer_resumptions_total") == 0
    assert sample(text, "deepstack_transfer_resumed_bytes_total") == 0
    assert sample(text, "deepstack_transfer_inflight_requests") == 0
    assert sample(text, "deepstack_buffer_blocks", state="free") == POOL
    assert sample(text, "deepstack_buffer_blocks", state="used") == 0


# --- faults ------------------------------------------------------------------------------

FAST = TransferSettings(
    default_tokens=DEFAULT_TOKENS,
    handshake_timeout=1,
    transfer_timeout=3,
    resume_timeout=2,
    checksum=True,
)


def failures(peer: Peer, reason: str) -> float:
    return sample(peer.state()["metrics"], "deepstack_transfer_failures_total", reason=reason)


def test_receiver_killed_mid_transfer_frees_sender_blocks() -> None:
    with (
        Peer("sender", layout(3, "float32"), FAST) as sender,
        Peer("receiver", layout(3, "float32"), FAST, die=True) as receiver,
    ):
        item = random_item(int(2.5 * DEFAULT_TOKENS), 3, "float32", seed=1)
        receiver.send("receive", "doomed", sender.address)
        assert sender.call("submit", "doomed", encode_item(item)) == ("ok", None)
        receiver.process.join(20)
        assert receiver.process.exitcode == DIE_EXIT_CODE  # died after the first chunk
        no_blocks_held(sender)
        assert failures(sender, "peer_lost") == 1


def test_sender_killed_mid_transfer_frees_receiver_blocks_after_the_write_timeout() -> None:
    """The encoder dies while its write may be under way: a closed connection does not
    prove that nothing more lands (bytes still in the sockets, or an encoder that lost
    only its control connection), so the blocks stay fenced for the write timeout."""
    with (
        Peer("sender", layout(3, "float32"), FAST, die=True) as sender,
        Peer("receiver", layout(3, "float32"), FAST) as receiver,
    ):
        item = random_item(int(2.5 * DEFAULT_TOKENS), 3, "float32", seed=2)
        pending = receiver.send("receive", "doomed", sender.address)
        sender.send("submit", "doomed", encode_item(item))
        status, reason, message = receiver.result(pending)
        failed = time.monotonic()
        assert (status, reason) == ("error", "peer_lost"), message
        assert "closed the connection" in message
        sender.process.join(20)
        assert sender.process.exitcode == DIE_EXIT_CODE
        state = receiver.state()
        assert state["fenced"] == state["used"] == DEFAULT_TOKENS // BLOCK
        no_blocks_held(receiver)
        assert time.monotonic() - failed > FAST.write_seconds / 2
        assert receiver.state()["fenced"] == 0
        assert failures(receiver, "peer_lost") == 1


def test_a_byte_changed_on_the_way_fails_the_checksum_and_frees_both_sides() -> None:
    with (
        Peer("sender", layout(3, "float32"), FAST) as sender,
        Peer("receiver", layout(3, "float32"), FAST) as receiver,
    ):
        assert sender.call("corrupt_next_write") == ("ok", None)
        status, reason, message = transfer(
            sender, receiver, "flipped", random_item(9, 3, "float32", seed=4)
        )
        assert (status, reason) == ("error", "transfer_error"), message
        assert "checksum mismatch" in message
        no_blocks_held(sender)
        no_blocks_held(receiver)
        item = random_item(9, 3, "float32", seed=5)  # the next one is whole again
        status, got = transfer(sender, receiver, "whole", item)
        assert status == "ok"
        assert_identical(decode_item(got), item)


def test_handshake_for_a_room_never_submitted_times_out() -> None:
    with (
        Peer("sender", layout(3, "float32"), FAST) as sender,
        Peer("receiver", layout(3, "float32"), FAST) as receiver,
    ):
        started = time.monotonic()
        status, reason, message = receiver.call("receive", "nobody-sends-this", sender.address)
        assert (status, reason) == ("error", "unknown_room")
        assert f"was not submitted to this encoder within {FAST.room_wait:g}s" in message
        assert time.monotonic() - started < 10
        assert receiver.state()["used"] == 0
        assert failures(sender, "unknown_room") == 1


def test_unreachable_encoder_is_a_clear_error() -> None:
    with Peer("receiver", layout(3, "float32"), FAST) as receiver:
        status, reason, message = receiver.call("receive", "r1", "127.0.0.1:1")
        assert (status, reason) == ("error", "connect_failed")
        assert "cannot reach encoder 127.0.0.1:1" in message
        assert receiver.state()["used"] == 0


def test_submitted_room_without_receiver_expires_and_frees() -> None:
    with Peer("sender", layout(3, "float32"), FAST) as sender:
        item = random_item(40, 3, "float32", seed=3)
        assert sender.call("submit", "orphan", encode_item(item)) == ("ok", None)
        assert sender.state()["used"] == 3
        no_blocks_held(sender)
        assert failures(sender, "timeout") == 1


def test_request_beyond_the_whole_receiver_pool_fails_cleanly() -> None:
    small = layout(3, "float32", blocks=8)  # 128 tokens
    with (
        Peer("sender", layout(3, "float32"), FAST) as sender,
        Peer("receiver", small, FAST) as receiver,
    ):
        item = random_item(200, 3, "float32", seed=4)
        status, reason, message = transfer(sender, receiver, "huge", item)
        assert (status, reason) == ("error", "oversize")
        assert "200 tokens need 13 blocks; the whole pool has 8" in message
        assert receiver.state()["used"] == 0
        no_blocks_held(sender)
        # The sender was told why and counted it too.
        assert failures(sender, "oversize") == 1


def test_submit_beyond_the_whole_sender_pool_is_refused() -> None:
    with Peer("sender", layout(3, "float32", blocks=8), FAST) as sender:
        item = random_item(200, 3, "float32", seed=5)
        status, reason, message = sender.call("submit", "huge", encode_item(item))
        assert (status, reason) == ("error", "oversize")
        assert "13 blocks requested but the whole pool has 8" in message
        assert sender.state()["used"] == 0


def test_receiver_of_a_refused_room_hears_why_at_once() -> None:
    """The encoder refused the room (its pool cannot hold the item): its receiver gets
    the reason, not an unknown room after the handshake timeout; the same room submitted
    again with an item that fits then goes through."""
    with (
        Peer("sender", layout(3, "float32", blocks=8), SETTINGS) as sender,
        Peer("receiver", layout(3, "float32"), SETTINGS) as receiver,
    ):
        status, reason, _ = sender.call(
            "submit", "r", encode_item(random_item(200, 3, "float32", 6))
        )
        assert (status, reason) == ("error", "oversize")
        started = time.monotonic()
        status, reason, message = receiver.call("receive", "r", sender.address)
        assert (status, reason) == ("error", "oversize")
        assert "the encoder refused it" in message
        assert time.monotonic() - started < SETTINGS.handshake_timeout / 2
        assert receiver.state()["used"] == 0
        item = random_item(40, 3, "float32", seed=7)
        assert sender.call("submit", "r", encode_item(item)) == ("ok", None)
        status, got = receiver.call("receive", "r", sender.address)
        assert status == "ok"
        assert torch.equal(bits(decode_item(got).embeddings), bits(item.embeddings))


def test_receivers_under_pool_pressure_never_hold_and_wait() -> None:
    """Four receivers of 6-block items on an 8-block pool, 4 blocks preallocated each: if
    each took its first blocks and waited for the rest, all would stall and fail; admitted
    whole, in arrival order, all four get their item."""
    pool = layout(3, "float32", blocks=8)
    items = {f"p{i}": random_item(6 * BLOCK, 3, "float32", seed=20 + i) for i in range(4)}
    with (
        Peer("sender", layout(3, "float32"), SETTINGS) as sender,
        Peer("receiver", pool, SETTINGS) as receiver,
    ):
        pending = {
            room: receiver.send("receive", room, sender.address, None, 6 * BLOCK) for room in items
        }
        for room, item in items.items():
            assert sender.call("submit", room, encode_item(item)) == ("ok", None)
        for room, item in items.items():
            status, got = receiver.result(pending[room], timeout=60)
            assert status == "ok", got
            assert torch.equal(bits(decode_item(got).embeddings), bits(item.embeddings))
        assert receiver.state()["used"] == 0
        assert failures(receiver, "pool_exhausted") == 0


def test_bad_and_duplicate_rooms_are_refused() -> None:
    with Peer("sender", layout(0, "float32"), FAST) as sender:
        item = encode_item(random_item(5, 0, "float32", seed=6))
        status, reason, message = sender.call("submit", "bad room!", item)
        assert (status, reason) == ("error", "bad_request")
        assert "invalid room id 'bad room!'" in message
        assert sender.call("submit", "r1", item) == ("ok", None)
        status, reason, message = sender.call("submit", "r1", item)
        assert (status, reason) == ("error", "duplicate_room")
        assert sender.state()["used"] == 1


def test_layout_mismatch_is_refused_before_any_byte_moves() -> None:
    with (
        Peer("sender", layout(3, "float32"), FAST) as sender,
        Peer("receiver", layout(3, "float32", hidden=32), FAST) as receiver,
    ):
        item = random_item(20, 3, "float32", seed=7)
        status, reason, message = transfer(sender, receiver, "mismatch", item)
        assert (status, reason) == ("error", "layout_mismatch")
        assert "does not match" in message
        assert (
            sample(sender.state()["metrics"], "deepstack_transfer_bytes_total", payload="embedding")
            == 0
        )
        no_blocks_held(sender)
        assert receiver.state()["used"] == 0


def test_the_transfer_check_proves_the_path_and_names_the_transport() -> None:
    """A language server's check before it takes traffic: one block from the encoder,
    compared byte for byte with the pattern both derive from the room; nothing held."""
    with (
        Peer("sender", layout(3, "bfloat16"), SETTINGS) as sender,
        Peer("receiver", layout(3, "bfloat16"), SETTINGS) as receiver,
    ):
        status, result = receiver.call("check", sender.address)
        assert status == "ok"
        assert result["error"] == ""
        assert result["transport"] == "tcp"
        assert result["peer"] == sender.address
        assert result["nbytes"] == layout(3, "bfloat16").token_bytes * BLOCK
        for peer in (sender, receiver):
            no_blocks_held(peer)
        assert sample(sender.state()["metrics"], "deepstack_transfer_bytes_total",
                      payload="deepstack") > 0  # fmt: skip


def test_a_transfer_check_against_another_layout_fails_with_the_reason() -> None:
    with (
        Peer("sender", layout(2, "float32"), FAST) as sender,
        Peer("receiver", layout(3, "float32"), FAST) as receiver,
    ):
        status, result = receiver.call("check", sender.address)
        assert status == "ok"
        assert "layout" in result["error"], result
        assert result["nbytes"] == 0
        no_blocks_held(receiver)
        no_blocks_held(sender)


def test_mooncake_asked_for_rdma_without_a_device_says_it_fell_back_to_tcp() -> None:
    """These machines have no RDMA device: Mooncake then serves over TCP without an error.
    The transport reports it instead of claiming RDMA."""
    from deepstack_runtime.transfer.mooncake import MooncakeTransport

    rdma = MooncakeTransport("127.0.0.1", "rdma", "mlx5_0")
    tcp = MooncakeTransport("127.0.0.1", "tcp")
    try:
        assert rdma.devices == []
        assert rdma.protocol == "tcp"
        assert "no RDMA device found" in rdma.fallback
        assert (tcp.protocol, tcp.fallback) == ("tcp", "")
    finally:
        rdma.close()
        tcp.close()


# A process of its own: Mooncake reads its ports once, when it loads.
PINNED = """
import json, os, sys
from deepstack_runtime.transfer.mooncake import MooncakeTransport
from tests.support.listening import listening_ports
low, high = int(sys.argv[1]), int(sys.argv[2])
if len(sys.argv) > 3:
    import mooncake.engine  # loaded before the transport could set its ports
try:
    transport = MooncakeTransport("127.0.0.1", "tcp", ports=(low, high))
except RuntimeError as e:
    print(json.dumps({"error": str(e)}))
else:
    ports = sorted(listening_ports(os.getpid()))
    print(json.dumps({"session": transport.session_id, "ports": ports}))
"""


def free_port_pair() -> int:
    """A port p, below the ephemeral range, with p and p + 1 free."""
    import socket

    for low in range(21000, 32000, 7):
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("0.0.0.0", low))
                b.bind(("0.0.0.0", low + 1))
            except OSError:
                continue
            return low
    raise AssertionError("no two free ports")


def test_mooncake_listens_only_on_the_configured_ports() -> None:
    """What the NetworkPolicy admits between the groups: Mooncake's handshake port and
    its tcp data port, both within transfer.mooncakePorts (here pinned to two ports)."""
    import json
    import subprocess
    import sys

    from devkit.cluster import REPO

    low = free_port_pair()
    run = [sys.executable, "-c", PINNED, str(low), str(low + 1)]
    result = subprocess.run(run, capture_output=True, text=True, timeout=60, cwd=REPO)
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["ports"] == [low, low + 1], got
    assert got["session"] in (f"127.0.0.1:{low}", f"127.0.0.1:{low + 1}")
    # Loaded before its ports were set, Mooncake would pick its own: a clear error.
    result = subprocess.run([*run, "early"], capture_output=True, text=True, timeout=60, cwd=REPO)
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert "was loaded before its ports could be set" in got["error"]
