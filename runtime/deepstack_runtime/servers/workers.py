"""The encode and language servers (reference backend): model + transfer endpoint + HTTP.

encode    POST /v1/encode    {room, pixel_values: {dtype, shape, data(base64)}, image_grid_thw}
          encodes the images, holds the result for the language side of `room`, answers
          once the language side has it.
language  POST /v1/generate  {room, encoder, input_ids, image_grid_thw, max_tokens, stream}
          receives the room's embeddings from `encoder` (its bootstrap address),
          generates greedily; `stream` gives one JSON line per token.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from functools import partial
from typing import Any

import torch
from aiohttp import web

from deepstack_runtime.backends.reference import (
    InputError,
    ReferenceEncoder,
    ReferenceLanguageModel,
)
from deepstack_runtime.buffers import BufferLayout, MultimodalDataBuffers
from deepstack_runtime.config import RuntimeConfig
from deepstack_runtime.errors import FailureReason, TransferError
from deepstack_runtime.metrics import TransferMetrics
from deepstack_runtime.servers.common import BadRequest, Listen, Server, error, read_json, serve
from deepstack_runtime.transfer.mooncake import MooncakeTransport
from deepstack_runtime.transfer.protocol import check_room
from deepstack_runtime.transfer.receiver import EmbeddingReceiver
from deepstack_runtime.transfer.sender import EmbeddingSender
from deepstack_runtime.transfer.settings import TransferSettings

log = logging.getLogger(__name__)
MAX_BODY = 64 << 20
TENSOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Transfer failures the caller may retry elsewhere (502) versus its own mistakes (400).
_CLIENT_REASONS = {FailureReason.BAD_REQUEST, FailureReason.DUPLICATE_ROOM, FailureReason.OVERSIZE}


def transfer_settings(config: RuntimeConfig) -> TransferSettings:
    t = config.transfer
    return TransferSettings(
        default_tokens=t.default_allocation_tokens,
        handshake_timeout=t.handshake_timeout_seconds,
        transfer_timeout=t.transfer_timeout_seconds,
        resume_timeout=t.resume_timeout_seconds,
        max_rounds=t.resume_max_rounds,
    )


def buffer_layout(config: RuntimeConfig) -> BufferLayout:
    return BufferLayout(
        num_blocks=config.transfer.pool_blocks,
        block_tokens=config.transfer.block_tokens,
        hidden_size=config.deepstack.hidden_size,
        num_deepstack=config.deepstack.num_layers,
        dtype=config.deepstack.dtype,
    )


def encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    t = t.contiguous()
    dtype = next(k for k, v in TENSOR_DTYPES.items() if v == t.dtype)
    raw = (
        t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
    )
    return {"dtype": dtype, "shape": list(t.shape), "data": base64.b64encode(raw).decode()}


def decode_tensor(value: Any, what: str) -> torch.Tensor:
    try:
        dtype = TENSOR_DTYPES[value["dtype"]]
        shape = [int(x) for x in value["shape"]]
        raw = bytearray(base64.b64decode(value["data"], validate=True))
        tensor = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return tensor.reshape(shape)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise BadRequest(f"{what} is not a valid tensor: {e}") from e


def _grid(value: Any) -> torch.Tensor | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(
            isinstance(g, list) and len(g) == 3 and all(isinstance(x, int) and x > 0 for x in g)
            for g in value
        )
    ):
        raise BadRequest("image_grid_thw must be a list of [t, h, w] positive integers")
    return torch.tensor(value, dtype=torch.int64)


def _transfer_error(e: TransferError) -> web.Response:
    status = (
        400 if e.reason in _CLIENT_REASONS else 504 if e.reason is FailureReason.TIMEOUT else 502
    )
    return error(status, f"transfer failed ({e.reason.value}): {e.message}", "transfer_error")


def _check_backend(config: RuntimeConfig) -> None:
    if config.backend != "reference":
        raise SystemExit(
            f"backend {config.backend!r} is served by SGLang: use `deepstack-runtime sglang-launch`"
        )


async def run_encode(config: RuntimeConfig, listen: Listen) -> None:
    _check_backend(config)
    server = Server("encode")
    encoder = ReferenceEncoder(config.model.encoder_checkpoint)
    layout = buffer_layout(config)
    if (encoder.hidden_size, encoder.num_deepstack) != (layout.hidden_size, layout.num_deepstack):
        raise SystemExit(
            f"the checkpoint has hidden size {encoder.hidden_size} and {encoder.num_deepstack} "
            f"DeepStack layers; the configuration says {layout.hidden_size} and "
            f"{layout.num_deepstack}"
        )
    dtype = TENSOR_DTYPES[layout.dtype]
    sender = EmbeddingSender(
        MultimodalDataBuffers(layout),
        MooncakeTransport(
            listen.advertise_host, config.transfer.protocol, ",".join(config.transfer.rdma_devices)
        ),
        transfer_settings(config),
        TransferMetrics(server.registry),
        host=listen.host,
        port=listen.bootstrap_port,
    )
    await sender.start()
    bootstrap = f"{listen.advertise_host}:{sender.address.rsplit(':', 1)[1]}"
    server.extra_health = lambda: {"bootstrap": bootstrap}
    model_lock = asyncio.Lock()  # one forward at a time; requests queue here

    async def encode(request: web.Request) -> web.Response:
        body = await read_json(request, MAX_BODY)
        try:
            room = check_room(body.get("room"))
        except TransferError as e:
            raise BadRequest(e.message) from e
        pixels = decode_tensor(body.get("pixel_values"), "pixel_values")
        grid = _grid(body.get("image_grid_thw"))
        if grid is None or pixels.dim() != 2 or pixels.shape[0] != int(grid.prod(dim=1).sum()):
            raise BadRequest("pixel_values must have one row per patch of image_grid_thw")
        async with model_lock:
            item = await asyncio.to_thread(encoder.encode, pixels.float(), grid)
        item.embeddings = item.embeddings.to(dtype)
        if item.deepstack is not None:
            item.deepstack = item.deepstack.to(dtype)
        try:
            finished = await sender.submit(room, item)
            await finished
        except TransferError as e:
            return _transfer_error(e)
        return web.json_response({"room": room, "tokens": item.num_tokens})

    app = server.app()
    app.router.add_post("/v1/encode", server.tracked("/v1/encode", encode))
    await serve(server, app, listen, on_stop=sender.stop)


async def run_language(config: RuntimeConfig, listen: Listen, max_tokens_limit: int = 512) -> None:
    _check_backend(config)
    server = Server("language")
    model = ReferenceLanguageModel(config.model.path)
    layout = buffer_layout(config)
    buffers = MultimodalDataBuffers(layout)
    receiver = EmbeddingReceiver(
        buffers,
        MooncakeTransport(
            listen.advertise_host, config.transfer.protocol, ",".join(config.transfer.rdma_devices)
        ),
        transfer_settings(config),
        TransferMetrics(server.registry),
    )
    receiver.start()
    model_lock = asyncio.Lock()

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await read_json(request, MAX_BODY)
        ids = body.get("input_ids")
        if (
            not isinstance(ids, list)
            or not ids
            or not all(isinstance(i, int) and i >= 0 for i in ids)
        ):
            raise BadRequest("input_ids must be a non-empty list of token ids")
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_tokens_limit:
            raise BadRequest(f"max_tokens must be an integer in [1, {max_tokens_limit}]")
        grid = _grid(body.get("image_grid_thw"))
        input_ids = torch.tensor(ids, dtype=torch.int64)
        visual = int((input_ids == model.image_token_id).sum())
        item = None
        if visual:
            room, encoder = body.get("room"), body.get("encoder")
            if not isinstance(encoder, str) or grid is None:
                raise BadRequest("a prompt with images needs room, encoder and image_grid_thw")
            try:
                item = await receiver.receive(str(room), encoder, buffers.empty_item(visual))
            except TransferError as e:
                return _transfer_error(e)
            if item.deepstack is not None:
                item.deepstack = item.deepstack.float()
            item.embeddings = item.embeddings.float()
        ignore_eos = bool(body.get("ignore_eos", False))
        if body.get("stream"):
            return await _stream(
                request, model, model_lock, input_ids, item, grid, max_tokens, ignore_eos
            )
        async with model_lock:
            try:
                tokens = await asyncio.to_thread(
                    partial(model.generate, ignore_eos=ignore_eos),
                    input_ids,
                    item,
                    grid,
                    max_tokens,
                )
            except InputError as e:
                raise BadRequest(str(e)) from e
        answer: dict[str, Any] = {"tokens": tokens, "prompt_tokens": len(ids)}
        if body.get("debug_logits"):  # the next-token logits of the prompt, for checks
            async with model_lock:
                logits = await asyncio.to_thread(model.logits, input_ids, item, grid)
            answer["logits"] = logits[-1].tolist()
        return web.json_response(answer)

    app = server.app()
    app.router.add_post("/v1/generate", server.tracked("/v1/generate", generate))
    await serve(server, app, listen)


async def _stream(
    request: web.Request,
    model: ReferenceLanguageModel,
    lock: asyncio.Lock,
    input_ids: torch.Tensor,
    item: Any,
    grid: torch.Tensor | None,
    max_tokens: int,
    ignore_eos: bool,
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    async with lock:
        steps = model.generate_iter(input_ids, item, grid, max_tokens, ignore_eos=ignore_eos)
        while (token := await asyncio.to_thread(next, steps, None)) is not None:
            await response.write(json.dumps({"token": token}).encode() + b"\n")
    await response.write_eof()
    return response
