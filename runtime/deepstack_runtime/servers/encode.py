"""The encode server: images in, as the client sent them (servers/wire.py); their rows
(the merged embedding and the K DeepStack features of every visual token) out, to the
language pod that asks for the request's room, over the transfer.

Each image's rows come from the embedding cache (embedding_cache.py), keyed by the
image's bytes, the processor's settings and the embedding contract; a miss decodes the
image, preprocesses it and runs the vision tower, one image at a time, for every request
that wants it at that moment. A hit does none of that, and its rows are the very bytes a
miss would have made.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import torch
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from transformers.video_utils import VideoMetadata

from deepstack_runtime.backends.reference import ReferenceEncoder
from deepstack_runtime.buffers import DTYPES, BufferLayout, MultimodalItem
from deepstack_runtime.config import RuntimeConfig
from deepstack_runtime.embedding_cache import (
    EmbeddingCache,
    EmbeddingCacheMetrics,
    cache_key,
    settings_fingerprint,
)
from deepstack_runtime.errors import FailureReason, InputError, TransferError
from deepstack_runtime.media.images import decode_image, probe_image
from deepstack_runtime.media.videos import VideoGeometry, decode_frames, probe_video
from deepstack_runtime.media.videos import layout as video_layout
from deepstack_runtime.metrics import TransferMetrics
from deepstack_runtime.servers import endpoint
from deepstack_runtime.servers.common import Admission, BadRequest, Busy, Listen, Server, serve
from deepstack_runtime.servers.wire import (
    MAX_BODY,
    MEDIA_KINDS,
    MEDIA_TYPE,
    MediaItem,
    decode_media,
)
from deepstack_runtime.transfer.protocol import check_room
from deepstack_runtime.transfer.sender import EmbeddingSender

log = logging.getLogger(__name__)
T = TypeVar("T")
# The most pixels an encode pod decodes in one image (router.limits.maxImagePixels may
# not be set higher): Pillow refuses more than about 179 M on its own.
MAX_DECODE_PIXELS = 1 << 28


class Vision:
    """One image's or video's rows from its bytes: decode within the pixel budget (a
    video's sampled frames only), the checkpoint's own image or video processor, the
    vision tower."""

    def __init__(self, config: RuntimeConfig, device: str, dtype: torch.dtype) -> None:
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        checkpoint = config.model.encoder_checkpoint
        self.processor = Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
        self.video_geometry = VideoGeometry.from_checkpoint(checkpoint)
        self.video_processor: Any = None
        if self.video_geometry is not None:
            self.video_processor = Qwen3VLVideoProcessor.from_pretrained(checkpoint)
        self.tower = ReferenceEncoder(checkpoint, device=device, dtype=dtype)
        # What changes an item's rows besides its bytes and the contract: how it is
        # preprocessed, and the arithmetic of the tower (its dtype on this device).
        compute = f"{device}/{dtype}"
        self.fingerprints = {
            "image": settings_fingerprint(
                {"processor": self.processor.to_dict(), "compute": compute}
            ),
            "video": settings_fingerprint(
                {
                    "video_processor": None
                    if self.video_processor is None
                    else self.video_processor.to_dict(),
                    "compute": compute,
                }
            ),
        }

    def tokens(self, grid: tuple[int, int, int]) -> int:
        """Visual tokens of an image's grid; BadRequest for one the tower cannot merge."""
        t, h, w = grid
        merge = self.tower.merge
        if h % merge or w % merge:
            raise BadRequest(f"grid {grid}: heights and widths must be multiples of {merge}")
        return t * h * w // merge**2

    def fill_and_positions(
        self, grids: list[tuple[int, int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A request's fill ids and M-RoPE grid positions: they follow from its grids."""
        positions = torch.cat([self._positions(grid) for grid in grids])
        fill = torch.full((positions.shape[0],), self.tower.image_token_id, dtype=torch.int64)
        return fill, positions

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one Vision per process
    def _positions(self, grid: tuple[int, int, int]) -> torch.Tensor:
        return self.tower.grid_positions(*grid)

    def rows(self, item: MediaItem, data: bytes) -> MultimodalItem:
        """The rows of one image or video (on a worker thread); InputError for bytes that
        are not what the router described."""
        if item.kind == "video":
            return self._video_rows(item, data)
        header = probe_image(data, max_pixels=MAX_DECODE_PIXELS)
        described = (item.format, item.width, item.height)
        if (header.format.value, header.width, header.height) != described:
            raise InputError(
                f"the image is a {header}, not the {item.width}x{item.height} "
                f"{item.format} image the router described"
            )
        image = decode_image(data, header, MAX_DECODE_PIXELS)
        try:
            processed = self.processor(images=[image], return_tensors="pt")
        except ValueError as e:  # an aspect ratio it does not take, say
            raise InputError(f"the image processor refused the image: {e}") from e
        grid = processed["image_grid_thw"]
        _same_grid(tuple(int(x) for x in grid[0]), item)
        return self.tower.encode(processed["pixel_values"], grid)

    def _video_rows(self, item: MediaItem, data: bytes) -> MultimodalItem:
        if self.video_geometry is None:
            raise InputError("this encode pod's checkpoint has no video processor settings")
        header = probe_video(data, max_pixels=MAX_DECODE_PIXELS)
        described = (item.format, item.width, item.height)
        if (header.container, header.width, header.height) != described:
            raise InputError(
                f"the video is a {header}, not the {item.width}x{item.height} {item.format} "
                "video the router described"
            )
        layout = video_layout(header, self.video_geometry)
        _same_grid(layout.grid, item)  # before any frame is decoded
        frames = decode_frames(data, header, layout.indices)
        metadata = VideoMetadata(
            total_num_frames=header.frames, fps=header.fps, width=header.width,
            height=header.height, frames_indices=list(layout.indices),
        )  # fmt: skip
        processed = self.video_processor(
            videos=[frames], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt"
        )
        grid = processed["video_grid_thw"]
        _same_grid(tuple(int(x) for x in grid[0]), item)
        return self.tower.encode(processed["pixel_values_videos"], grid)


def _same_grid(made: tuple[int, ...], item: MediaItem) -> None:
    if made != item.grid:
        raise InputError(
            f"this pod's {item.kind} processor makes a {made} grid of the {item.kind}; the "
            f"router counted {item.grid} (their settings differ)"
        )


class MediaMetrics:
    """What the encode pod serves, by modality (image, video)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.items = Counter(
            "deepstack_encode_items",
            "Images and videos served, their rows cached or computed, by modality.",
            ["modality"],
            registry=registry,
        )
        self.visual_tokens = Counter(
            "deepstack_encode_visual_tokens",
            "Visual tokens sent (rows, each with its DeepStack features), by modality.",
            ["modality"],
            registry=registry,
        )
        self.seconds = Histogram(
            "deepstack_encode_seconds",
            "Computing one item's rows on a cache miss (decode, preprocessing, tower), by "
            "modality.",
            ["modality"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        for kind in MEDIA_KINDS:
            for series in (self.items, self.visual_tokens, self.seconds):
                series.labels(modality=kind)


def cache_device(capacity: int) -> str:
    """Where the cache's rows live: device memory when a GPU has room for the whole
    budget twice over (the model needs the rest), host memory otherwise."""
    if capacity and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        if free >= 2 * capacity:
            return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


async def run_encode(config: RuntimeConfig, listen: Listen) -> None:
    server = Server("encode")
    layout = endpoint.buffer_layout(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # On a GPU the tower computes in the transferred dtype (as SGLang's would); on a CPU
    # in float32, cast when stored (bfloat16 arithmetic is slow there).
    vision = Vision(config, device, torch.float32 if device == "cpu" else DTYPES[layout.dtype])
    endpoint.check_checkpoint(vision.tower.hidden_size, vision.tower.num_deepstack, layout)
    metrics = TransferMetrics(server.registry)
    settings = endpoint.transfer_settings(config)
    sender = EmbeddingSender(
        endpoint.buffers(config, metrics),
        endpoint.transport(config, listen),
        settings,
        metrics,
        host=listen.host,
        port=listen.bootstrap_port,
    )
    await sender.start()
    capacity = config.encode_cache_bytes
    cache = EmbeddingCache(
        capacity, DTYPES[layout.dtype], cache_device(capacity),
        EmbeddingCacheMetrics(server.registry),
    )  # fmt: skip
    log.info("embedding cache: %d MiB on %s", capacity >> 20, cache.device)
    bootstrap = f"{listen.advertise_host}:{sender.address.rsplit(':', 1)[1]}"
    contract = config.contract_hash()
    server.extra_health = lambda: {"bootstrap": bootstrap, "contract": contract}
    # One image through the tower at a time; a bounded number wait their turn.
    tower = Admission(
        "the vision tower",
        config.transfer.max_queued_requests,
        server.metrics.queued.labels(role=server.role),
    )

    media = MediaMetrics(server.registry)

    async def compute(item: MediaItem, data: bytes) -> MultimodalItem:
        async with tower.turn():
            with media.seconds.labels(modality=item.kind).time():
                return await _finished(asyncio.to_thread(vision.rows, item, data))

    async def encode(request: web.Request) -> web.Response:
        if request.content_type != MEDIA_TYPE:
            raise BadRequest(f"the body must be {MEDIA_TYPE} (images as bytes)")
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(
                max_size=MAX_BODY, actual_size=request.content_length
            )
        body = await request.read()
        sent_room, items = await asyncio.to_thread(decode_media, body)  # hashes megabytes
        try:
            room = check_room(sent_room)
        except TransferError as e:
            raise BadRequest(e.message) from e
        counts = [vision.tokens(item.grid) for item, _ in items]
        submitted = False
        try:
            async with tower.admit():  # (refused at once when the pod is full)
                # Keyed by the whole description, not the hash alone: a hit is only ever for
                # a description a miss checked against the bytes.
                rows = await asyncio.gather(
                    *(
                        cache.get_or_compute(
                            cache_key(item.identity(), vision.fingerprints[item.kind], contract),
                            lambda item=item, data=data: compute(item, bytes(data)),  # type: ignore[misc]
                        )
                        for item, data in items
                    )
                )
                for n, (image_rows, count) in enumerate(zip(rows, counts, strict=True)):
                    if image_rows.num_tokens != count:
                        raise InputError(
                            f"item {n + 1} makes {image_rows.num_tokens} visual tokens; its "
                            f"description says {count}"
                        )
                for (item, _), count in zip(items, counts, strict=True):
                    media.items.labels(modality=item.kind).inc()
                    media.visual_tokens.labels(modality=item.kind).inc(count)
                total = sum(counts)
                fill, positions = vision.fill_and_positions(
                    [grid for item, _ in items for grid in item.frame_grids]
                )
                # Rows wait here while the pool is full of rows not yet taken (a language
                # pod behind): refused only if the pool stays full for a handshake timeout.
                await sender.wait_for_room(total, settings.handshake_timeout)
                reserved = await sender.reserve(room, total)
                try:
                    # The rows go where they are sent from; with no single run of blocks
                    # free, into rows of their own, scattered into blocks at submit.
                    target = reserved.item if reserved is not None else _rows_for(layout, total)
                    target.fill_ids.copy_(fill)
                    target.positions.copy_(positions)
                    offset = 0
                    for image_rows in rows:
                        image_rows.write_into(target, offset)
                        offset += image_rows.num_tokens
                except BaseException:
                    if reserved is not None:
                        sender.release(reserved)
                    raise
                submitted = True  # from here on the room is this request's
                finished = await sender.submit(room, target, reserved)
                await finished
        except InputError as e:
            await sender.refuse(room, TransferError(FailureReason.BAD_REQUEST, str(e)))
            raise BadRequest(str(e)) from e
        except TransferError as e:
            return endpoint.transfer_error(e)
        except Busy as e:  # the room's receiver may be waiting already: tell it too
            await sender.refuse(room, TransferError(FailureReason.POOL_EXHAUSTED, str(e)))
            raise
        except asyncio.CancelledError:  # the requester went away
            if submitted:  # (an earlier room of the same id is another request's)
                sender.abort(room, "the encode request was abandoned")
            raise
        except Exception as e:  # a fault here (out of memory, say): the receiver learns it
            if not submitted:
                await sender.refuse(
                    room,
                    TransferError(FailureReason.TRANSFER_ERROR, f"the encode pod failed: {e!r}"),
                )
            raise
        return web.json_response({"room": room, "tokens": total})

    async def stop() -> None:
        await sender.stop()
        await cache.aclose()

    app = server.app()
    app.router.add_post("/v1/encode", server.tracked("/v1/encode", encode))
    await serve(server, app, listen, on_stop=stop)


def _rows_for(layout: BufferLayout, tokens: int) -> MultimodalItem:
    dtype = DTYPES[layout.dtype]
    k, hidden = layout.num_deepstack, layout.hidden_size
    return MultimodalItem(
        torch.empty(tokens, hidden, dtype=dtype),
        torch.empty(tokens, k, hidden, dtype=dtype) if k else None,
        torch.empty(tokens, dtype=torch.int64),
        torch.empty(tokens, 3, dtype=torch.int64),
    )


async def _finished(work: Awaitable[T]) -> T:
    """`await work`, but when cancelled, only once a thread doing it has finished too: the
    tower's turn is held until then (two images through one tower at once would compete
    for its memory)."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True  # wait for the thread, then give up
    if cancelled:
        raise asyncio.CancelledError
    return result
