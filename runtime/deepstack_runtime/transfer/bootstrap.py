"""The encode side's bootstrap port: which receivers it lets in.

The bootstrap port takes only what it can afford: a hello is checked whole (room,
session, layout, region, blocks) before anything is allocated for it; its session host
must be the connecting peer's own address (else a pod could aim the writes into another
pod's pool); one peer address may hold at most `max_queued + num_blocks` connections,
rooms not yet submitted included: what a language pod of the same resource can have in
flight at most (a receipt holds at least one of its blocks, or waits in its queue).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from deepstack_runtime.buffers import BufferLayout
from deepstack_runtime.errors import FailureReason, TransferError
from deepstack_runtime.metrics import TransferMetrics
from deepstack_runtime.transfer import protocol
from deepstack_runtime.transfer.plan import RegionInfo
from deepstack_runtime.transfer.settings import TransferSettings


def peer_connection_limit(settings: TransferSettings, layout: BufferLayout) -> int:
    """Bootstrap connections one peer address may hold, waiting rooms included: a
    language pod like this one has at most a receipt per block of its pool, and its
    queue, in flight."""
    return settings.max_queued + layout.num_blocks


class PeerConnections:
    """The open bootstrap connections of each peer address, each peer bounded."""

    def __init__(self, metrics: TransferMetrics) -> None:
        self.metrics = metrics
        self._open: dict[str, int] = {}  # open bootstrap connections per peer address

    async def admit(self, writer: asyncio.StreamWriter, limit: int) -> str | None:
        """The connecting peer's address, its connection counted (`leave` when it ends);
        None, the peer told why and the connection closed, when the peer already holds
        `limit` connections."""
        peername = writer.get_extra_info("peername")
        peer = str(protocol.host_ip(peername[0])) if peername else "?"
        if self._open.get(peer, 0) >= limit:
            error = TransferError(
                FailureReason.POOL_EXHAUSTED,
                f"{peer} already holds {limit} connections to this encoder, the most one peer may",
            )
            self.metrics.record_failure(error.reason)
            await protocol.send_error_quietly(writer, error)
            writer.close()
            return None
        self._open[peer] = self._open.get(peer, 0) + 1
        return peer

    def leave(self, peer: str) -> None:
        self._open[peer] -= 1
        if not self._open[peer]:
            del self._open[peer]


@dataclass(frozen=True)
class Hello:
    """A receiver's hello, checked: its room, where to write and how it lays out blocks."""

    room: str
    session: str
    region: RegionInfo
    blocks: list[int]  # where the first round goes
    layout: BufferLayout  # the receiver's


def check_hello(
    hello: protocol.Message, peer: str, layout: BufferLayout, region: RegionInfo
) -> Hello:
    """The whole hello, checked against this encoder's `layout` and `region` before
    anything is allocated for it."""
    if hello["op"] != "hello":
        raise TransferError(FailureReason.BAD_REQUEST, f"expected hello, got {hello['op']}")
    room = protocol.check_room(hello.get("room"))
    session = protocol.check_session(hello.get("session"), peer)
    try:
        theirs = BufferLayout(**hello["layout"])
    except (KeyError, TypeError, ValueError) as e:
        raise TransferError(FailureReason.BAD_REQUEST, f"hello with a bad layout: {e}") from e
    if not layout.compatible(theirs):
        raise TransferError(
            FailureReason.LAYOUT_MISMATCH,
            f"receiver layout {theirs} does not match this encoder's {layout}",
        )
    try:
        r = hello["region"]
        dst = RegionInfo(int(r["base_ptr"]), int(r["block_tokens"]), int(r["token_bytes"]))
    except (KeyError, TypeError, ValueError) as e:
        raise TransferError(FailureReason.BAD_REQUEST, f"hello with a bad region: {e}") from e
    if (dst.block_tokens, dst.token_bytes) != (region.block_tokens, region.token_bytes):
        raise TransferError(
            FailureReason.LAYOUT_MISMATCH, "the receiver's blocks are sized differently"
        )
    blocks = protocol.int_list(hello, "blocks", limit=theirs.num_blocks)
    return Hello(room, session, dst, blocks, theirs)
