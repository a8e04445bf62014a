"""A chat's prompt, as the router builds it without decoding a pixel: the messages'
text through the model's chat template and tokenizer, each image's visual tokens counted
from its header with the checkpoint's own resize rule (media/vision.py), every limit
checked from those numbers. It needs no torch: transformers serves tokenizers without it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from deepstack_runtime.errors import InputError
from deepstack_runtime.media.images import ImageHeader, probe_image
from deepstack_runtime.media.vision import ImageGeometry, grid_thw, visual_tokens
from deepstack_runtime.servers.common import BadRequest
from deepstack_runtime.servers.images import ImageFetcher, ImageFetchError
from deepstack_runtime.servers.wire import MediaItem, content_hash

ROLES = ("user", "system", "assistant")


@dataclass(frozen=True)
class PromptImage:
    """One image of a prompt: its bytes as they came, what its header says, the grid of
    patches (and so the visual tokens) the processor will make of it."""

    data: bytes
    header: ImageHeader
    grid: tuple[int, int, int]
    tokens: int
    sha256: str

    def media_item(self) -> MediaItem:
        h = self.header
        return MediaItem(self.sha256, len(self.data), h.format.value, h.width, h.height, self.grid)


@dataclass(frozen=True)
class Prompt:
    input_ids: list[int]  # image pad tokens expanded
    images: list[PromptImage]

    @property
    def visual_tokens(self) -> int:
        return sum(image.tokens for image in self.images)

    @property
    def image_grid_thw(self) -> list[list[int]] | None:
        return [list(image.grid) for image in self.images] or None

    @property
    def content(self) -> str | None:
        """The name of the images' content, in order (None without images)."""
        if not self.images:
            return None
        return content_hash("\n".join(image.sha256 for image in self.images).encode())


class PromptBuilder:
    """The chat template, tokenizer and image geometry of one checkpoint."""

    def __init__(self, model_dir: str | Path) -> None:
        # The fast tokenizer class itself: AutoTokenizer reads the model's configuration
        # through transformers' model code, which imports torch where it is installed
        # (as in the runtime image), and the router would carry it (600 MB).
        from transformers import PreTrainedTokenizerFast

        self.tokenizer: Any = PreTrainedTokenizerFast.from_pretrained(model_dir)
        self.geometry = ImageGeometry.from_checkpoint(model_dir)
        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.image_token_id = int(config["image_token_id"])
        self.image_pad = str(self.tokenizer.convert_ids_to_tokens(self.image_token_id))
        self.eos_token_id = int(self.tokenizer.eos_token_id)

    def image(self, data: bytes, index: int, max_pixels: int) -> PromptImage:
        """Image `index` (from 1) of a request, known from its header alone; BadRequest
        for one that is not a supported still image within `max_pixels`."""
        try:
            header = probe_image(data, max_pixels=max_pixels)
            grid = grid_thw(header.width, header.height, self.geometry)
            tokens = visual_tokens(header.width, header.height, self.geometry)
        except InputError as e:
            raise BadRequest(f"image {index}: {e}") from e
        return PromptImage(data, header, grid, tokens, content_hash(data))

    def build(self, messages: list[dict[str, Any]], images: list[PromptImage]) -> Prompt:
        """`messages`: OpenAI-style, with {"type": "image"} parts where `images` go."""
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        pieces = text.split(self.image_pad)
        if len(pieces) - 1 != len(images):
            raise BadRequest(f"{len(pieces) - 1} image placeholders for {len(images)} images")
        text = pieces[0] + "".join(
            self.image_pad * image.tokens + piece
            for image, piece in zip(images, pieces[1:], strict=True)
        )
        input_ids: list[int] = self.tokenizer(text)["input_ids"]
        return Prompt(input_ids, images)

    def decode(self, tokens: list[int]) -> str:
        text: str = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return text


def parse_messages(body: dict[str, Any], max_images: int) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI messages -> (messages with {"type": "image"} parts, the images' URLs)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    count = sum(
        1
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") == "image_url"
    )
    if count > max_images:  # before any image is read
        raise BadRequest(f"the request has {count} images; the limit is {max_images}")
    out: list[dict[str, Any]] = []
    urls: list[Any] = []
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRequest(f"messages[{n}] needs a role of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list) or not content:
            raise BadRequest(f"messages[{n}].content must be a string or a non-empty list of parts")
        parts: list[dict[str, Any]] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                urls.append(part["image_url"].get("url"))
                parts.append({"type": "image"})
            else:
                raise BadRequest(
                    f"messages[{n}]: unsupported content part {kind!r}; use text or image_url"
                )
        out.append({"role": message["role"], "content": parts})
    return out, urls


async def read_images(urls: list[Any], fetcher: ImageFetcher, local_files: bool) -> list[bytes]:
    """The images' bytes (remote ones fetched at once)."""
    return list(
        await asyncio.gather(
            *(_image_bytes(url, fetcher, local_files, i + 1) for i, url in enumerate(urls))
        )
    )


async def _image_bytes(url: Any, fetcher: ImageFetcher, local_files: bool, index: int) -> bytes:
    if not isinstance(url, str):
        raise BadRequest(f"image {index}: image_url.url must be a string")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64") or not payload:
            raise BadRequest(f"image {index}: only base64 data: URLs are supported")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadRequest(f"image {index}: the base64 data is malformed: {e}") from e
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        try:
            return await fetcher.fetch(url)
        except ImageFetchError as e:
            raise BadRequest(f"image {index}: {url[:200]}: {e}") from e
    if parsed.scheme == "file" and local_files:
        try:
            return Path(parsed.path).read_bytes()
        except OSError as e:
            raise BadRequest(f"image {index}: cannot read {parsed.path}: {e.strerror}") from e
    raise BadRequest(
        f"image {index}: only data: and http(s) URLs are accepted"
        + (" (and file: URLs)" if local_files else "")
        + f"; got a {parsed.scheme or 'relative'} URL"
    )
