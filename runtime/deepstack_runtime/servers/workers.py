"""The encode and language servers: model + transfer endpoint + HTTP, the same protocol
on every backend.

encode    POST /v1/encode    {room, pixel_values: {dtype, shape, data(base64)}, image_grid_thw}
          encodes the images, holds the result for the language side of `room`, answers
          once the language side has it.
language  POST /v1/generate  {room, encoder, input_ids, image_grid_thw, sampling, n, stream}
          receives the room's embeddings from `encoder` (its bootstrap address) into this
          pod's buffers, generates `n` choices as `sampling` (SamplingParams) says:
          {steps: [{index, token, logprob?, top?}], prompt_tokens}, or with `stream` the
          same steps one JSON line each.

The language model is the backend's (`LanguageBackend`): the transformers text model
(`reference`) or SGLang's engine (`sglang`). The vision tower is the transformers one on
both, on the pod's device, in the transferred dtype.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
from collections.abc import AsyncGenerator, Awaitable, Sequence
from dataclasses import asdict
from typing import Any, Protocol, TypeVar

import torch
from aiohttp import web
from prometheus_client import Counter

from deepstack_runtime.backends.reference import ReferenceEncoder, ReferenceLanguageModel
from deepstack_runtime.buffers import DTYPES, BufferLayout, MultimodalDataBuffers, MultimodalItem
from deepstack_runtime.config import RuntimeConfig
from deepstack_runtime.errors import EngineFailure, FailureReason, InputError, TransferError
from deepstack_runtime.metrics import TransferMetrics
from deepstack_runtime.sampling import MAX_CHOICES, SamplingParams, Step
from deepstack_runtime.servers.common import (
    Admission,
    BadRequest,
    Busy,
    Listen,
    Server,
    busy,
    error,
    read_json,
    serve,
)
from deepstack_runtime.transfer.check import check_peer
from deepstack_runtime.transfer.mooncake import MooncakeTransport, buffer_device
from deepstack_runtime.transfer.protocol import check_room
from deepstack_runtime.transfer.receiver import EmbeddingReceiver
from deepstack_runtime.transfer.sender import EmbeddingSender
from deepstack_runtime.transfer.settings import TransferSettings

log = logging.getLogger(__name__)
# How often a language server that has not yet verified a transfer tries again.
CHECK_INTERVAL_SECONDS = 2.0
T = TypeVar("T")
MAX_BODY = 64 << 20
# Transfer failures that are the caller's own mistakes (400); most others may be retried.
_CLIENT_REASONS = {FailureReason.BAD_REQUEST, FailureReason.DUPLICATE_ROOM, FailureReason.OVERSIZE}


def transfer_settings(config: RuntimeConfig) -> TransferSettings:
    t = config.transfer
    return TransferSettings(
        default_tokens=t.default_allocation_tokens,
        handshake_timeout=t.handshake_timeout_seconds,
        transfer_timeout=t.transfer_timeout_seconds,
        resume_timeout=t.resume_timeout_seconds,
        write_timeout=t.write_timeout_seconds,
        max_rounds=t.resume_max_rounds,
        max_queued=t.max_queued_requests,
        checksum=t.checksum,
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
    dtype = next(k for k, v in DTYPES.items() if v == t.dtype)
    raw = (
        t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
    )
    return {"dtype": dtype, "shape": list(t.shape), "data": base64.b64encode(raw).decode()}


def decode_tensor(value: Any, what: str) -> torch.Tensor:
    try:
        dtype = DTYPES[value["dtype"]]
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
    message = f"transfer failed ({e.reason.value}): {e.message}"
    if e.reason is FailureReason.POOL_EXHAUSTED:
        return busy(message)  # full now, free again soon: retry later or elsewhere
    status = (
        400 if e.reason in _CLIENT_REASONS else 504 if e.reason is FailureReason.TIMEOUT else 502
    )
    return error(status, message, "transfer_error", reason=e.reason.value)


def _transport(config: RuntimeConfig, listen: Listen) -> MooncakeTransport:
    t = config.transfer
    return MooncakeTransport(
        listen.advertise_host,
        t.protocol,
        ",".join(t.rdma_devices),
        write_timeout=transfer_settings(config).write_seconds,
        ports=(t.mooncake_min_port, t.mooncake_max_port),
    )


def _buffers(config: RuntimeConfig, metrics: TransferMetrics) -> MultimodalDataBuffers:
    """The pool, in device memory where the Mooncake build can register it."""
    device = buffer_device()
    buffers = MultimodalDataBuffers(buffer_layout(config), device=device)
    memory = "host" if device == "cpu" else "device"
    metrics.set_buffer_memory(memory, device)
    log.info("buffers: %d MiB in %s memory (%s)", buffers.nbytes >> 20, memory, device)
    return buffers


async def run_encode(config: RuntimeConfig, listen: Listen) -> None:
    server = Server("encode")
    layout = buffer_layout(config)
    dtype = DTYPES[layout.dtype]
    device = encode_device()
    # On a GPU the tower computes in the transferred dtype (as SGLang's would); on a CPU
    # in float32, cast when stored (bfloat16 arithmetic is slow there).
    encoder = ReferenceEncoder(
        config.model.encoder_checkpoint,
        device=device,
        dtype=torch.float32 if device == "cpu" else dtype,
    )
    _check_checkpoint(encoder.hidden_size, encoder.num_deepstack, layout)
    metrics = TransferMetrics(server.registry)
    transport = _transport(config, listen)
    if transport.fallback:
        log.warning("transfer.protocol is %s, but %s", config.transfer.protocol, transport.fallback)
    sender = EmbeddingSender(
        _buffers(config, metrics),
        transport,
        transfer_settings(config),
        metrics,
        host=listen.host,
        port=listen.bootstrap_port,
    )
    await sender.start()
    bootstrap = f"{listen.advertise_host}:{sender.address.rsplit(':', 1)[1]}"
    contract = config.contract_hash()
    server.extra_health = lambda: {"bootstrap": bootstrap, "contract": contract}
    # One forward at a time; a bounded number of requests wait their turn.
    tower = Admission(
        "the vision tower",
        config.transfer.max_queued_requests,
        server.metrics.queued.labels(role=server.role),
    )

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
        try:
            tokens = encoder.num_tokens(grid)
        except ValueError as e:
            raise BadRequest(str(e)) from e
        submitted = False
        try:
            async with tower.turn():
                # The tower's rows go straight into the blocks they are sent from when it
                # computes in the pool's dtype (a GPU); else they are cast into them.
                reserved = await sender.reserve(room, tokens)
                try:
                    if reserved is not None and not encoder.writes_in_place(reserved.item):
                        metrics.scattered.inc()
                    out = None if reserved is None else reserved.item
                    item = await _finished(asyncio.to_thread(encoder.encode, pixels, grid, out))
                except BaseException:
                    if reserved is not None:
                        sender.release(reserved)
                    raise
            submitted = True  # from here on the room is this request's
            finished = await sender.submit(room, item, reserved)
            await finished
        except TransferError as e:
            return _transfer_error(e)
        except Busy as e:  # the room's receiver may be waiting already: tell it too
            await sender.refuse(room, TransferError(FailureReason.POOL_EXHAUSTED, str(e)))
            raise
        except asyncio.CancelledError:  # the requester went away
            if submitted:  # (an earlier room of the same id is another request's)
                sender.abort(room, "the encode request was abandoned")
            raise
        return web.json_response({"room": room, "tokens": item.num_tokens})

    app = server.app()
    app.router.add_post("/v1/encode", server.tracked("/v1/encode", encode))
    await serve(server, app, listen, on_stop=sender.stop)


async def _finished(work: Awaitable[T]) -> T:
    """`await work`, but when cancelled, only once a thread doing it has finished too:
    the vision tower writes into a reservation and holds the tower's turn until then."""
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


def _check_checkpoint(hidden_size: int, num_deepstack: int, layout: BufferLayout) -> None:
    if (hidden_size, num_deepstack) != (layout.hidden_size, layout.num_deepstack):
        raise SystemExit(
            f"the checkpoint has hidden size {hidden_size} and {num_deepstack} DeepStack "
            f"layers; the configuration says {layout.hidden_size} and {layout.num_deepstack}"
        )


def encode_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class LanguageBackend(Protocol):
    """What the language server needs of a language model."""

    image_token_id: int
    hidden_size: int
    num_deepstack: int
    merge_size: int  # visual tokens per image: t x h x w / merge_size**2
    vocab_size: int

    def stream(
        self,
        input_ids: list[int],
        item: MultimodalItem | None,
        image_grid_thw: torch.Tensor | None,
        params: SamplingParams,
    ) -> AsyncGenerator[Step, None]:
        """One choice's tokens as they come; InputError for a prompt or parameters the
        model cannot take. `item` may be views of the receive pool: read it before the
        first token, never after (the rows go back to the pool then)."""
        ...


class ReferenceLanguageBackend:
    """The transformers text model; one request at a time (it has no batching)."""

    def __init__(self, model_dir: str) -> None:
        self.model = ReferenceLanguageModel(model_dir)
        self.image_token_id = self.model.image_token_id
        text_config = self.model.model.config.text_config
        self.hidden_size = int(text_config.hidden_size)
        vision_config = self.model.model.config.vision_config
        self.num_deepstack = len(vision_config.deepstack_visual_indexes)
        self.merge_size = int(vision_config.spatial_merge_size)
        self.vocab_size = int(text_config.vocab_size)
        self._lock = asyncio.Lock()

    async def stream(
        self,
        input_ids: list[int],
        item: MultimodalItem | None,
        image_grid_thw: torch.Tensor | None,
        params: SamplingParams,
    ) -> AsyncGenerator[Step, None]:
        if item is not None:
            item.embeddings = item.embeddings.float()
            if item.deepstack is not None:
                item.deepstack = item.deepstack.float()
        ids = torch.tensor(input_ids, dtype=torch.int64)
        async with self._lock:
            steps = self.model.generate_iter(ids, item, image_grid_thw, params)
            while (step := await asyncio.to_thread(next, steps, None)) is not None:
                yield step

    async def logits(
        self, input_ids: list[int], item: MultimodalItem | None, grid: torch.Tensor | None
    ) -> list[float]:
        """The next-token logits of the prompt (for fidelity checks)."""
        ids = torch.tensor(input_ids, dtype=torch.int64)
        async with self._lock:
            logits = await asyncio.to_thread(self.model.logits, ids, item, grid)
        values: list[float] = logits[-1].tolist()
        return values


def language_backend(config: RuntimeConfig, extra_args: Sequence[str]) -> LanguageBackend:
    if config.backend == "sglang":
        from deepstack_runtime.backends.sglang import SGLangLanguageModel

        try:
            return SGLangLanguageModel(config, extra_args)
        except ValueError as e:  # extraArgs that set what the resource owns
            raise SystemExit(str(e)) from e
    if extra_args:
        raise SystemExit(
            f"the reference backend takes no extra arguments, got {' '.join(extra_args)}"
        )
    return ReferenceLanguageBackend(config.model.path)


async def run_language(
    config: RuntimeConfig,
    listen: Listen,
    extra_args: Sequence[str] = (),
    max_tokens_limit: int = 512,
) -> str:
    """Serve until stopped; returns why the engine failed, if it did ("" otherwise)."""
    server = Server("language")
    model = language_backend(config, extra_args)
    layout = buffer_layout(config)
    _check_checkpoint(model.hidden_size, model.num_deepstack, layout)
    metrics = TransferMetrics(server.registry)
    buffers = _buffers(config, metrics)
    transport = _transport(config, listen)
    if transport.fallback:
        log.warning("transfer.protocol is %s, but %s", config.transfer.protocol, transport.fallback)
    receiver = EmbeddingReceiver(buffers, transport, transfer_settings(config), metrics)
    receiver.start()
    attach = getattr(model, "attach", None)
    if attach is not None:  # SGLang: its result loop and failure handling on our loop
        attach(asyncio.get_running_loop())
    contract = config.contract_hash()
    transfer_check: dict[str, Any] = {}
    checking = asyncio.create_task(
        check_transfers(config, receiver, transport.protocol, metrics, transfer_check)
    )
    server.extra_health = lambda: {"contract": contract, "transfer_check": transfer_check}
    generated = Counter(
        "deepstack_generated_tokens",
        "Tokens the language model generated, every choice counted (a request stopped "
        "early, at a stop string or by a client that went away, stops counting).",
        registry=server.registry,
    )

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await read_json(request, MAX_BODY)
        ids = body.get("input_ids")
        if (
            not isinstance(ids, list)
            or not ids
            or not all(isinstance(i, int) and 0 <= i < model.vocab_size for i in ids)
        ):
            # An id outside the vocabulary would crash the engine, not just this request.
            raise BadRequest(
                f"input_ids must be a non-empty list of token ids below {model.vocab_size}"
            )
        try:
            params = SamplingParams.from_wire(body.get("sampling"))
        except InputError as e:
            raise BadRequest(str(e)) from e
        if params.max_tokens > max_tokens_limit:
            raise BadRequest(f"max_tokens must be an integer in [1, {max_tokens_limit}]")
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
            raise BadRequest(f"n must be an integer in [1, {MAX_CHOICES}]")
        debug_logits = bool(body.get("debug_logits"))
        if debug_logits and (
            body.get("stream") or n != 1 or not isinstance(model, ReferenceLanguageBackend)
        ):
            raise BadRequest("debug_logits needs the reference backend, n=1 and no stream")
        grid = _grid(body.get("image_grid_thw"))
        visual = sum(1 for i in ids if i == model.image_token_id)
        if grid is not None and int(grid.prod(dim=1).sum()) != visual * model.merge_size**2:
            raise BadRequest(
                f"image_grid_thw describes {int(grid.prod(dim=1).sum()) // model.merge_size**2} "
                f"visual tokens; input_ids hold {visual}"
            )
        async with contextlib.AsyncExitStack() as lease:
            item = None
            if visual:
                room, encoder = body.get("room"), body.get("encoder")
                if not isinstance(encoder, str) or grid is None:
                    raise BadRequest("a prompt with images needs room, encoder and image_grid_thw")
                try:
                    # Read where it landed: the backend copies the rows into its own input.
                    item = await lease.enter_async_context(
                        receiver.lease(str(room), encoder, visual)
                    )
                except TransferError as e:
                    return _transfer_error(e)
            # The received rows go back to the pool once every choice has read them
            # (debug_logits reads them again after the last token).
            steps = _choices(
                model, ids, item, grid, params, n, None if debug_logits else lease, generated
            )
            # Closed on every way out (a client that went away included): the reference
            # model's lock is released and SGLang aborts the request at once.
            async with contextlib.aclosing(steps):
                if body.get("stream"):
                    return await _stream(request, steps)
                try:
                    lines = [step.to_wire(index) async for index, step in steps]
                except InputError as e:
                    raise BadRequest(str(e)) from e
                except EngineFailure as e:
                    return error(503, str(e), "engine_error")
            answer: dict[str, Any] = {"steps": lines, "prompt_tokens": len(ids)}
            if debug_logits:
                assert isinstance(model, ReferenceLanguageBackend)
                answer["logits"] = await model.logits(ids, item, grid)
        return web.json_response(answer)

    app = server.app()
    app.router.add_post("/v1/generate", server.tracked("/v1/generate", generate))

    async def stop() -> None:
        checking.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await checking  # whatever ended it, the receiver still closes below
        await receiver.close()  # no block is left to a write still in flight
        engine_stop = getattr(model, "stop", None)
        if engine_stop is not None:
            await engine_stop()

    await serve(server, app, listen, on_stop=stop)
    return str(getattr(model, "failure", ""))


async def check_transfers(
    config: RuntimeConfig,
    receiver: EmbeddingReceiver,
    transport: str,
    metrics: TransferMetrics,
    report: dict[str, Any],
) -> None:
    """Until one check transfer from an encode pod has passed (transfer/check.py): find
    the encode pods behind their Service and try each, every CHECK_INTERVAL_SECONDS.
    `report` (shown on /health) holds the last result; `deepstack_transfer_verified`
    turns 1 on success, which the operator's readiness gate waits for."""
    service, port = config.endpoints.encode_service, config.transfer.bootstrap_port
    if not service:
        return
    loop = asyncio.get_running_loop()
    while True:
        try:
            infos = await loop.getaddrinfo(service, port, type=socket.SOCK_STREAM)
        except OSError as e:
            infos = []
            report.update(ok=False, error=f"no encode pod found behind {service}: {e}")
        for ip in sorted({str(info[4][0]) for info in infos}):
            try:
                result = await check_peer(receiver, f"{ip}:{port}", transport)
            except Exception as e:  # a bug must not end the checks in silence
                log.exception("transfer check with %s:%d", ip, port)
                report.clear()
                report.update(ok=False, peer=f"{ip}:{port}", error=repr(e))
                continue
            report.clear()
            report.update(asdict(result), ok=result.ok)
            if result.ok:
                metrics.verified.labels(transport=transport).set(1)
                log.info(
                    "transfer check: %d bytes from %s over %s in %.3f s",
                    result.nbytes, result.peer, transport, result.seconds,
                )  # fmt: skip
                return
            log.warning("transfer check with %s failed: %s", result.peer, result.error)
        await asyncio.sleep(CHECK_INTERVAL_SECONDS)


async def _choices(
    model: LanguageBackend,
    ids: list[int],
    item: MultimodalItem | None,
    grid: torch.Tensor | None,
    params: SamplingParams,
    n: int,
    lease: contextlib.AsyncExitStack | None,
    generated: Counter | None = None,
) -> AsyncGenerator[tuple[int, Step], None]:
    """The steps of `n` choices of one prompt, (choice index, step), as they come. The
    choices run side by side (SGLang batches them; the reference model takes them one
    after the other). `lease` (the received rows) is given back once every choice has
    produced its first token: each backend has read the rows into its own input by then
    (LanguageBackend.stream). Closing this generator stops every choice."""
    queue: asyncio.Queue[tuple[int, Step | BaseException | None]] = asyncio.Queue()

    async def run(index: int) -> None:
        tokens = model.stream(ids, item, grid, params.for_choice(index))
        try:
            async with contextlib.aclosing(tokens):
                async for step in tokens:
                    if generated is not None:
                        generated.inc()
                    queue.put_nowait((index, step))
            queue.put_nowait((index, None))
        except Exception as e:  # raised to the consumer, which stops the other choices
            queue.put_nowait((index, e))

    tasks = [asyncio.create_task(run(index)) for index in range(n)]
    waiting_first = set(range(n))
    running = n
    try:
        while running:
            index, got = await queue.get()
            if isinstance(got, BaseException):
                raise got
            if index in waiting_first:
                waiting_first.discard(index)
                if not waiting_first and lease is not None:
                    await lease.aclose()
            if got is None:
                running -= 1
            else:
                yield index, got
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _stream(
    request: web.Request, steps: AsyncGenerator[tuple[int, Step], None]
) -> web.StreamResponse:
    """One JSON line per step; a failure after the first byte ends the stream with an
    `error` line (the status is already sent)."""
    try:
        first = await anext(steps, None)
    except InputError as e:
        raise BadRequest(str(e)) from e
    except EngineFailure as e:
        return error(503, str(e), "engine_error")
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    try:
        if first is not None:
            await response.write(json.dumps(first[1].to_wire(first[0])).encode() + b"\n")
            async for index, step in steps:
                await response.write(json.dumps(step.to_wire(index)).encode() + b"\n")
    except (InputError, EngineFailure) as e:
        await response.write(json.dumps({"error": str(e)}).encode() + b"\n")
    await response.write_eof()
    return response
