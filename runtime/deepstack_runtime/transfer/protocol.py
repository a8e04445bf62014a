"""The bootstrap/control channel between a receiver (language) and a sender (encode).

Newline-delimited JSON over one TCP connection per room:

    receiver -> sender  hello   {room, session, layout, regions, blocks}
    sender -> receiver  written {offset, tokens, total, checksums}   after the bytes are in place
                        (checksums: one per block of the chunk, empty when they are off)
    receiver -> sender  resume  {offset, blocks}               when total > received
    receiver -> sender  done                                   sender frees its blocks
    either way          error   {reason, message}

The sender sends `error` only once no write of the room can land any more (Mooncake
reported its last one final): the receiver may then reuse its blocks at once. A
connection that ends without it proves nothing about writes still under way: the
receiver keeps the blocks fenced for the write timeout first (receiver.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
from typing import Any

from deepstack_runtime.errors import FailureReason, TransferError

MAX_MESSAGE_BYTES = 4 << 20
ROOM_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

Message = dict[str, Any]


def check_room(room: object) -> str:
    if not isinstance(room, str) or not ROOM_PATTERN.match(room):
        raise TransferError(
            FailureReason.BAD_REQUEST,
            f"invalid room id {room!r}: 1-128 characters of [A-Za-z0-9._:-], "
            "starting with a letter or digit",
        )
    return room


def host_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IP address as one value whatever its spelling: brackets, zone and the IPv4 form
    of an IPv4-mapped IPv6 address (a dual-stack socket reports IPv4 peers so) removed.
    Raises ValueError for what is not an IP address."""
    ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def check_session(session: object, peer: str) -> str:
    """A hello's Mooncake session ("host:port"), which must name the connecting peer
    itself: the encoder writes wherever the session says, so that a pod could otherwise
    aim its writes into another pod's pool."""
    host, _, port = session.rpartition(":") if isinstance(session, str) else ("", "", "")
    if not host or not port.isdigit():
        raise TransferError(FailureReason.BAD_REQUEST, f"hello with a bad session {session!r}")
    try:
        same = host_ip(host) == host_ip(peer)
    except ValueError:
        raise TransferError(
            FailureReason.BAD_REQUEST,
            f"hello's session host {host!r} is not an IP address (it must be the receiver's own)",
        ) from None
    if not same:
        raise TransferError(
            FailureReason.BAD_REQUEST,
            f"hello's session host {host} is not the connecting peer {peer}: a receiver "
            "may only ask for writes into its own memory",
        )
    assert isinstance(session, str)
    return session


def encode(op: str, **fields: Any) -> bytes:
    """One message, as it goes on the wire."""
    return json.dumps({"op": op, **fields}, separators=(",", ":")).encode() + b"\n"


async def send(writer: asyncio.StreamWriter, op: str, **fields: Any) -> None:
    try:
        writer.write(encode(op, **fields))
        await writer.drain()
    except ConnectionError as e:
        raise TransferError(FailureReason.PEER_LOST, f"control connection failed: {e}") from e


async def receive(reader: asyncio.StreamReader, timeout: float | None, waiting_for: str) -> Message:
    """The next message (`timeout` None: however long it takes). Raises TransferError:
    the peer's own `error` (from_peer), PEER_LOST when the connection ends, TIMEOUT,
    BAD_REQUEST for a malformed line."""
    try:
        async with asyncio.timeout(timeout):  # (3.11's wait_for can swallow a cancel)
            line = await reader.readline()
    except TimeoutError:
        raise TransferError(
            FailureReason.TIMEOUT, f"no {waiting_for} from the peer within {timeout:g}s"
        ) from None
    except (ConnectionError, ValueError) as e:  # ValueError: line over the limit
        raise TransferError(FailureReason.PEER_LOST, f"control connection failed: {e}") from e
    if not line:
        raise TransferError(
            FailureReason.PEER_LOST,
            f"the peer closed the connection while we waited for {waiting_for}",
        )
    try:
        msg = json.loads(line)
    except json.JSONDecodeError as e:
        raise TransferError(FailureReason.BAD_REQUEST, f"malformed control message: {e}") from e
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise TransferError(FailureReason.BAD_REQUEST, "control message without an op")
    if msg["op"] == "error":
        reason = _reason(msg.get("reason"))
        raise TransferError(reason, f"peer reported: {msg.get('message', '')}", from_peer=True)
    return msg


def _reason(value: object) -> FailureReason:
    try:
        return FailureReason(str(value))
    except ValueError:
        return FailureReason.ABORTED


def int_list(msg: Message, key: str, *, limit: int) -> list[int]:
    """1..limit distinct integers in [0, limit): block ids of a pool of `limit` blocks."""
    value = msg.get(key)
    if (
        not isinstance(value, list)
        or not value
        or len(value) > limit
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < limit for v in value)
        or len(set(value)) != len(value)
    ):
        raise TransferError(
            FailureReason.BAD_REQUEST, f"{key} must be 1..{limit} distinct integers in [0, {limit})"
        )
    return value


def int_field(msg: Message, key: str) -> int:
    value = msg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TransferError(FailureReason.BAD_REQUEST, f"{key} must be a non-negative integer")
    return value


async def send_error_quietly(writer: asyncio.StreamWriter, error: TransferError) -> None:
    """Tell the peer why, if it is still there."""
    with contextlib.suppress(OSError, TimeoutError, RuntimeError):
        async with asyncio.timeout(1.0):
            await send(writer, "error", reason=error.reason.value, message=error.message)
