"""The transfer check: before a language server takes traffic, one small transfer from an
encode peer over the real path (handshake, Mooncake write, the configured transport,
checksums when on), compared with what was sent.

The receiver asks for a room named `check_room()`; an encoder that is asked for such a
room sends `check_item(layout, room)`, a pattern derived from the room's name alone, so
the receiver knows what must arrive without being told.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from deepstack_runtime.buffers import DTYPES, BufferLayout, MultimodalItem
from deepstack_runtime.errors import TransferError

if TYPE_CHECKING:
    from deepstack_runtime.transfer.receiver import EmbeddingReceiver

CHECK_PREFIX = "transfer-check."


def check_room() -> str:
    return f"{CHECK_PREFIX}{uuid.uuid4().hex}"


def is_check_room(room: str) -> bool:
    return room.startswith(CHECK_PREFIX)


def check_item(layout: BufferLayout, room: str) -> MultimodalItem:
    """One block of tokens, every value from the room's name."""
    seed = int.from_bytes(hashlib.sha256(room.encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed)
    tokens, hidden, layers = layout.block_tokens, layout.hidden_size, layout.num_deepstack
    dtype = DTYPES[layout.dtype]

    def values(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    return MultimodalItem(
        embeddings=values(tokens, hidden),
        deepstack=values(tokens, layers, hidden) if layers else None,
        fill_ids=torch.randint(0, 1 << 20, (tokens,), generator=generator),
        positions=torch.randint(0, 1 << 12, (tokens, 3), generator=generator),
    )


def same_item(a: MultimodalItem, b: MultimodalItem) -> bool:
    if (a.deepstack is None) != (b.deepstack is None):
        return False
    pairs = [(a.embeddings, b.embeddings), (a.fill_ids, b.fill_ids), (a.positions, b.positions)]
    if a.deepstack is not None and b.deepstack is not None:
        pairs.append((a.deepstack, b.deepstack))
    return all(x.shape == y.shape and torch.equal(x.cpu(), y.cpu()) for x, y in pairs)


@dataclass(frozen=True)
class CheckResult:
    peer: str
    transport: str
    nbytes: int
    seconds: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


async def check_peer(receiver: EmbeddingReceiver, address: str, transport: str) -> CheckResult:
    """One check transfer from the encoder at `address`; never raises for a failed one."""
    room = check_room()
    expected = check_item(receiver.layout, room)
    started = time.monotonic()
    try:
        got = await receiver.receive(room, address)
    except TransferError as e:
        return CheckResult(address, transport, 0, time.monotonic() - started, str(e))
    seconds = time.monotonic() - started
    nbytes = receiver.layout.token_bytes * got.num_tokens
    if not same_item(got, expected):
        return CheckResult(address, transport, nbytes, seconds, "the bytes differ from those sent")
    return CheckResult(address, transport, nbytes, seconds)
