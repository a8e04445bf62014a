"""What the router, encode and language servers send each other, apart from the transfer
(one module both sides import: the codec, the payloads' checks, the body limits).

router -> encode   POST /v1/encode, Content-Type MEDIA_TYPE: the images as they came,
                   not decoded and not re-encoded:

                       u32 (big-endian) length of the header | header JSON | item bytes...

                   header = {"room", "items": [{"sha256", "size", "format", "width",
                   "height", "grid": [t, h, w], "kind": "image" | "video"}]}: the items'
                   bytes follow in order, each `size` long, nothing after them. The
                   encode pod checks every field against the bytes (their hash, their
                   header) before it spends work.
router -> language POST /v1/generate (JSON): {room, encoder, input_ids, image_grid_thw
                   (a video's temporal patches as images of [1, h, w]), content (a hash of
                   the media's hashes), sampling, n, stream}; the pod streams steps, one
                   JSON line each.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass
from typing import Any

from deepstack_runtime.servers.common import BadRequest

# The most a request to any runtime server may carry (a client's chat request with its
# images inline as base64, or the images' bytes on their way to an encode pod).
MAX_BODY = 64 << 20
MEDIA_TYPE = "application/x-deepstack-media"
_LENGTH = struct.Struct(">I")
MAX_HEADER_BYTES = 1 << 20
MEDIA_KINDS = ("image", "video")
# The media bytes of one request: an encode body is these and a header.
MAX_MEDIA_BYTES = MAX_BODY - MAX_HEADER_BYTES - _LENGTH.size


def content_hash(data: bytes | memoryview) -> str:
    """The name of an item's content (the embedding cache's and the router's key)."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class MediaItem:
    """One image as the router saw it: its bytes' hash and size, and what its header
    says (the format, the upright size, the grid of patches the processor makes of it)."""

    sha256: str
    size: int
    format: str  # an image's format (Pillow's name), a video's container (FFmpeg's)
    width: int
    height: int
    grid: tuple[int, int, int]
    kind: str = "image"  # or "video"

    @classmethod
    def parse(cls, value: Any, index: int) -> MediaItem:
        """An item of a media header, every field of its type; BadRequest otherwise."""
        if not isinstance(value, dict):
            raise BadRequest(f"item {index}: must be an object")
        fields = {"sha256": str, "size": int, "format": str, "width": int, "height": int}
        for name, expected in fields.items():
            if not _is(value.get(name), expected):
                raise BadRequest(f"item {index}: {name} must be a {expected.__name__}")
        grid = value.get("grid")
        if not (isinstance(grid, list) and len(grid) == 3 and all(_is(x, int) for x in grid)):
            raise BadRequest(f"item {index}: grid must be a list of three integers")
        kind = value.get("kind", "image")
        if kind not in MEDIA_KINDS:
            raise BadRequest(f"item {index}: kind must be one of {', '.join(MEDIA_KINDS)}")
        item = cls(
            value["sha256"], value["size"], value["format"], value["width"], value["height"],
            (grid[0], grid[1], grid[2]), kind,
        )  # fmt: skip
        if min(item.grid) < 1 or min(item.size, item.width, item.height) < 1:
            raise BadRequest(f"item {index}: sizes and grid must be positive")
        if len(item.sha256) != 64:
            raise BadRequest(f"item {index}: sha256 must be 64 hex digits")
        return item

    @property
    def frame_grids(self) -> list[tuple[int, int, int]]:
        """Its grid as the language side sees it: a video's temporal patches are images
        of [1, h, w] (servers/prompt.py says why)."""
        t, h, w = self.grid
        return [(1, h, w)] * t if self.kind == "video" else [self.grid]

    def identity(self) -> str:
        """Everything the item's description says, canonically: what its rows are cached
        under (with the settings and the contract)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))


def _is(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def encode_media(room: str, items: list[tuple[MediaItem, bytes]]) -> bytes:
    header = json.dumps(
        {"room": room, "items": [asdict(item) for item, _ in items]}, separators=(",", ":")
    ).encode()
    return b"".join([_LENGTH.pack(len(header)), header, *(data for _, data in items)])


def decode_media(body: bytes) -> tuple[Any, list[tuple[MediaItem, memoryview]]]:
    """(room as sent, [(item, its bytes)]) of an encode request; BadRequest for a body
    that is not one, or whose bytes are not the ones its header describes (their sizes
    and hashes: what is cached under a hash is what has it)."""
    view = memoryview(body)
    if len(view) < _LENGTH.size:
        raise BadRequest("the body is too short to be a media request")
    (length,) = _LENGTH.unpack_from(view)
    if length > MAX_HEADER_BYTES or _LENGTH.size + length > len(view):
        raise BadRequest(f"a media header of {length} bytes does not fit the body")
    try:
        header = json.loads(bytes(view[_LENGTH.size : _LENGTH.size + length]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the media header is not JSON: {e}") from e
    if not isinstance(header, dict) or not isinstance(header.get("items"), list):
        raise BadRequest("the media header must be an object with a list of items")
    if not header["items"]:
        raise BadRequest("a media request needs at least one item")
    items = [MediaItem.parse(value, i + 1) for i, value in enumerate(header["items"])]
    offset = _LENGTH.size + length
    if offset + sum(item.size for item in items) != len(view):
        raise BadRequest("the items' sizes do not add up to the body")
    out = []
    for i, item in enumerate(items):
        data = view[offset : offset + item.size]
        offset += item.size
        if content_hash(data) != item.sha256:
            raise BadRequest(f"item {i + 1}: its bytes do not have the sha256 its header says")
        out.append((item, data))
    return header.get("room"), out


def check_grid(value: Any) -> list[tuple[int, int, int]] | None:
    """image_grid_thw as sent: None, or [t, h, w] of positive integers per image."""
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(
            isinstance(g, list)
            and len(g) == 3
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in g)
            for g in value
        )
    ):
        raise BadRequest("image_grid_thw must be a list of [t, h, w] positive integers")
    return [(g[0], g[1], g[2]) for g in value]
