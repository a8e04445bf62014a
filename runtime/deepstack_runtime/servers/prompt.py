"""A chat's prompt, as the router builds it without decoding a pixel: the messages'
text through the model's chat template and tokenizer, each image's visual tokens counted
from its header with the checkpoint's own resize rule (media/vision.py), each video's from
its container's metadata with the checkpoint's video processor settings (media/videos.py),
every limit checked from those numbers. It needs no torch: transformers serves tokenizers
without it.

A video reaches the language side as its temporal patches, each an image of grid
[1, h, w] behind its timestamp: Qwen3-VL embeds and positions a video's frames exactly as
it would such images (its M-RoPE splits a video grid [t, h, w] into t of them), so the
language pods, on either backend, need no path of their own for video.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from deepstack_runtime.errors import InputError
from deepstack_runtime.media.images import ImageHeader, probe_image
from deepstack_runtime.media.videos import VideoGeometry, VideoHeader, VideoLayout, probe_video
from deepstack_runtime.media.videos import layout as video_layout
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
class PromptVideo:
    """One video of a prompt: its bytes as they came, what its container says, the
    frames the processor samples and the grid it makes of them."""

    data: bytes
    header: VideoHeader
    layout: VideoLayout
    sha256: str

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.layout.grid

    @property
    def tokens(self) -> int:
        return self.layout.tokens

    def media_item(self) -> MediaItem:
        h = self.header
        return MediaItem(
            self.sha256, len(self.data), h.container, h.width, h.height, self.grid, kind="video"
        )


Media = PromptImage | PromptVideo


@dataclass(frozen=True)
class Prompt:
    input_ids: list[int]  # visual pad tokens expanded
    media: list[Media]

    @property
    def visual_tokens(self) -> int:
        return sum(item.tokens for item in self.media)

    @property
    def image_grid_thw(self) -> list[list[int]] | None:
        """The language side's grids, one per run of visual tokens, in prompt order."""
        return [list(g) for item in self.media for g in item.media_item().frame_grids] or None

    @property
    def content(self) -> str | None:
        """The name of the media's content, in order (None without any)."""
        if not self.media:
            return None
        return content_hash("\n".join(item.sha256 for item in self.media).encode())


@dataclass(frozen=True)
class VideoLimits:
    """What one video may cost (router.limits)."""

    max_pixels: int  # of a frame
    max_seconds: float
    max_frames: int  # sampled


class PromptBuilder:
    """The chat template, tokenizer and image geometry of one checkpoint."""

    def __init__(self, model_dir: str | Path) -> None:
        # The fast tokenizer class itself: AutoTokenizer reads the model's configuration
        # through transformers' model code, which imports torch where it is installed
        # (as in the runtime image), and the router would carry it (600 MB).
        from transformers import PreTrainedTokenizerFast

        self.tokenizer: Any = PreTrainedTokenizerFast.from_pretrained(model_dir)
        self.geometry = ImageGeometry.from_checkpoint(model_dir)
        # None: the checkpoint has no video processor settings, and video is refused.
        self.video_geometry = VideoGeometry.from_checkpoint(model_dir)
        config = json.loads((Path(model_dir) / "config.json").read_text())
        token = self.tokenizer.convert_ids_to_tokens
        self.image_token_id = int(config["image_token_id"])
        self.image_pad = str(token(self.image_token_id))
        self.vision_start = str(token(int(config["vision_start_token_id"])))
        self.vision_end = str(token(int(config["vision_end_token_id"])))
        # Where the chat template puts a video: the processor replaces all three tokens.
        self.video_wrapper = (
            self.vision_start + str(token(int(config["video_token_id"]))) + self.vision_end
        )
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

    def video(self, data: bytes, index: int, limits: VideoLimits) -> PromptVideo:
        """Video `index` (from 1) of a request, known from its container's metadata alone;
        BadRequest for one that is not a supported clip within `limits`."""
        if self.video_geometry is None:
            raise BadRequest(
                f"video {index}: this model's checkpoint has no video processor settings; "
                "it is served without video"
            )
        try:
            header = probe_video(data, max_pixels=limits.max_pixels)
            if header.seconds > limits.max_seconds:
                raise InputError(
                    f"the video is {header.seconds:.1f} s long; the limit is "
                    f"{limits.max_seconds:g} s"
                )
            layout = video_layout(header, self.video_geometry)
        except InputError as e:
            raise BadRequest(f"video {index}: {e}") from e
        if len(layout.indices) > limits.max_frames:
            raise BadRequest(
                f"video {index}: {len(layout.indices)} frames would be sampled; the limit "
                f"is {limits.max_frames}"
            )
        return PromptVideo(data, header, layout, content_hash(data))

    def build(self, messages: list[dict[str, Any]], media: list[Media]) -> Prompt:
        """`messages`: OpenAI-style, with {"type": "image"} and {"type": "video"} parts
        where `media` go, in order."""
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        placeholders = re.compile(f"{re.escape(self.video_wrapper)}|{re.escape(self.image_pad)}")
        found = placeholders.findall(text)
        kinds = ["video" if p == self.video_wrapper else "image" for p in found]
        wanted = ["video" if isinstance(item, PromptVideo) else "image" for item in media]
        if kinds != wanted:
            raise BadRequest(
                f"the chat template placed {kinds.count('image')} images and "
                f"{kinds.count('video')} videos for {wanted.count('image')} and "
                f"{wanted.count('video')}"
            )
        pieces = placeholders.split(text)
        text = pieces[0] + "".join(
            self._placeholder(item) + piece for item, piece in zip(media, pieces[1:], strict=True)
        )
        input_ids: list[int] = self.tokenizer(text)["input_ids"]
        return Prompt(input_ids, media)

    def _placeholder(self, item: Media) -> str:
        if isinstance(item, PromptImage):
            return self.image_pad * item.tokens
        # Each temporal patch behind its timestamp, its tokens the image pad (see above).
        return item.layout.placeholder(self.vision_start, self.image_pad, self.vision_end)

    def decode(self, tokens: list[int]) -> str:
        text: str = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return text


@dataclass(frozen=True)
class MediaRef:
    """Where an image or a video of a request is (a data:, http(s) or file: URL)."""

    kind: str  # "image" or "video"
    url: Any

    def name(self, index: int) -> str:
        return f"{self.kind} {index}"


# OpenAI content part types -> (the part the chat template takes, its kind).
_MEDIA_PARTS = {"image_url": "image", "video_url": "video"}


def parse_messages(
    body: dict[str, Any], max_images: int
) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    """OpenAI messages -> (messages with {"type": "image"} and {"type": "video"} parts,
    where the media are). `max_images` bounds images and videos together."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    kinds = [
        _MEDIA_PARTS[part["type"]]
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") in _MEDIA_PARTS
    ]
    if len(kinds) > max_images:  # before any is read
        what = "images and videos" if "video" in kinds else "images"
        raise BadRequest(f"the request has {len(kinds)} {what}; the limit is {max_images}")
    out: list[dict[str, Any]] = []
    refs: list[MediaRef] = []
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
            elif kind in _MEDIA_PARTS and isinstance(part.get(kind), dict):
                refs.append(MediaRef(_MEDIA_PARTS[kind], part[kind].get("url")))
                parts.append({"type": _MEDIA_PARTS[kind]})
            else:
                raise BadRequest(
                    f"messages[{n}]: unsupported content part {kind!r}; "
                    "use text, image_url or video_url"
                )
        out.append({"role": message["role"], "content": parts})
    return out, refs


async def read_media(refs: list[MediaRef], fetcher: ImageFetcher, local_files: bool) -> list[bytes]:
    """The media's bytes (remote ones fetched at once)."""
    return list(
        await asyncio.gather(
            *(_media_bytes(ref, fetcher, local_files, i + 1) for i, ref in enumerate(refs))
        )
    )


async def _media_bytes(
    ref: MediaRef, fetcher: ImageFetcher, local_files: bool, index: int
) -> bytes:
    url, name = ref.url, ref.name(index)
    if not isinstance(url, str):
        raise BadRequest(f"{name}: {ref.kind}_url.url must be a string")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64") or not payload:
            raise BadRequest(f"{name}: only base64 data: URLs are supported")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadRequest(f"{name}: the base64 data is malformed: {e}") from e
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        try:
            return await fetcher.fetch(url)
        except ImageFetchError as e:
            raise BadRequest(f"{name}: {url[:200]}: {e}") from e
    if parsed.scheme == "file" and local_files:
        try:
            return Path(parsed.path).read_bytes()
        except OSError as e:
            raise BadRequest(f"{name}: cannot read {parsed.path}: {e.strerror}") from e
    raise BadRequest(
        f"{name}: only data: and http(s) URLs are accepted"
        + (" (and file: URLs)" if local_files else "")
        + f"; got a {parsed.scheme or 'relative'} URL"
    )
