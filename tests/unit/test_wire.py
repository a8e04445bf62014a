"""The media body an encode pod reads from the network: every malformed body is a
BadRequest that says what is wrong, and a well-formed one round-trips."""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, replace
from typing import Any

import pytest

from deepstack_runtime.servers.common import BadRequest
from deepstack_runtime.servers.wire import MediaItem, content_hash, decode_media, encode_media

DATA = [b"first image bytes", b"second"]
ITEMS = [
    MediaItem(content_hash(d), len(d), "PNG", 64, 48, (1, 6, 8)) for d in DATA
]  # fmt: skip


def body_with(header: Any, payload: bytes = b"".join(DATA)) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack(">I", len(raw)) + raw + payload


def test_round_trip() -> None:
    room, items = decode_media(encode_media("room-1", list(zip(ITEMS, DATA, strict=True))))
    assert room == "room-1"
    assert [(item, bytes(data)) for item, data in items] == list(zip(ITEMS, DATA, strict=True))


def described(**change: Any) -> dict[str, Any]:
    return {"room": "r", "items": [{**asdict(ITEMS[0]), **change}, asdict(ITEMS[1])]}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\x00\x00", "too short"),
        (struct.pack(">I", 1000) + b"{}", "does not fit the body"),
        (struct.pack(">I", 2) + b"{]", "not JSON"),
        (body_with([]), "an object with a list of items"),
        (body_with({"items": []}), "at least one item"),
        (body_with(described(grid="123")), "grid must be a list of three integers"),
        (body_with(described(grid=[1, 6])), "grid must be a list of three integers"),
        (body_with(described(grid=[1, True, 8])), "grid must be a list of three integers"),
        (body_with(described(width="64")), "width must be a int"),
        (body_with(described(size=True)), "size must be a int"),
        (body_with(described(grid=[0, 6, 8])), "must be positive"),
        (body_with(described(sha256="ab")), "64 hex digits"),
        (body_with({"items": ["x"]}), "must be an object"),
        (body_with(described(), b"".join(DATA) + b"extra"), "do not add up"),
        (body_with(described(), b"".join(DATA)[:-1]), "do not add up"),
        (body_with(described(), b"F" + b"".join(DATA)[1:]), "not have the sha256"),
    ],
)
def test_malformed_bodies_are_refused_with_the_reason(body: bytes, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        decode_media(body)


def test_the_identity_changes_with_every_field() -> None:
    item = ITEMS[0]
    others = [
        replace(item, format="JPEG"), replace(item, width=65), replace(item, height=47),
        replace(item, grid=(1, 8, 6)), replace(item, size=item.size + 1),
        replace(item, sha256="0" * 64),
    ]  # fmt: skip
    identities = {item.identity(), *(other.identity() for other in others)}
    assert len(identities) == len(others) + 1
