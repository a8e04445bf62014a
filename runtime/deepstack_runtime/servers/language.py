"""The language server: a prompt's tokens in, and its image rows received from the encode
pod that holds them (over the transfer, into this pod's block pool); the choices' steps
out, streamed one JSON line each or whole (servers/wire.py). The language model is the
backend's (backends/base.py): the transformers text model or SGLang's engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncGenerator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from aiohttp import web
from prometheus_client import Counter

from deepstack_runtime.backends.base import LanguageBackend, language_backend
from deepstack_runtime.buffers import MultimodalItem
from deepstack_runtime.config import RuntimeConfig
from deepstack_runtime.errors import EngineFailure, InputError, TransferError
from deepstack_runtime.metrics import TransferMetrics
from deepstack_runtime.sampling import MAX_CHOICES, SamplingParams, Step
from deepstack_runtime.servers import endpoint
from deepstack_runtime.servers.common import BadRequest, Listen, Server, error, read_json, serve
from deepstack_runtime.servers.wire import MAX_BODY, check_grid
from deepstack_runtime.transfer.check import check_peer
from deepstack_runtime.transfer.receiver import EmbeddingReceiver

log = logging.getLogger(__name__)
# How often a language server that has not yet verified a transfer tries again.
CHECK_INTERVAL_SECONDS = 2.0


async def run_language(
    config: RuntimeConfig,
    listen: Listen,
    extra_args: Sequence[str] = (),
    max_tokens_limit: int = 512,
) -> str:
    """Serve until stopped; returns why the engine failed, if it did ("" otherwise)."""
    server = Server("language")
    model = language_backend(config, extra_args)
    layout = endpoint.buffer_layout(config)
    endpoint.check_checkpoint(model.hidden_size, model.num_deepstack, layout)
    metrics = TransferMetrics(server.registry)
    transport = endpoint.transport(config, listen)
    receiver = EmbeddingReceiver(
        endpoint.buffers(config, metrics), transport, endpoint.transfer_settings(config), metrics
    )
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
        grids = check_grid(body.get("image_grid_thw"))
        grid = None if grids is None else torch.tensor(grids, dtype=torch.int64)
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
                    return endpoint.transfer_error(e)
            # The received rows go back to the pool once every choice has read them.
            content = body.get("content")
            wanted = Generation(
                ids, item, grid, content if isinstance(content, str) else None, params, n
            )
            steps = _choices(model, wanted, lease, generated)
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
        return web.json_response({"steps": lines, "prompt_tokens": len(ids)})

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


@dataclass(frozen=True)
class Generation:
    """What one /v1/generate asks of the model: `n` choices of the prompt `ids` (with the
    received rows `item` of its images, their `grid` and `content` identity)."""

    ids: list[int]
    item: MultimodalItem | None
    grid: torch.Tensor | None
    content: str | None
    params: SamplingParams
    n: int


async def _choices(
    model: LanguageBackend,
    wanted: Generation,
    lease: contextlib.AsyncExitStack,
    generated: Counter | None = None,
) -> AsyncGenerator[tuple[int, Step], None]:
    """The steps of `n` choices of one prompt, (choice index, step), as they come. The
    choices run side by side (SGLang batches them; the reference model takes them one
    after the other). `lease` (the received rows) is given back once every choice has
    produced its first token: each backend has read the rows into its own input by then
    (LanguageBackend.stream). Closing this generator stops every choice."""
    queue: asyncio.Queue[tuple[int, Step | BaseException | None]] = asyncio.Queue()

    async def run(index: int) -> None:
        tokens = model.stream(
            wanted.ids,
            wanted.item,
            wanted.grid,
            wanted.params.for_choice(index),
            content=wanted.content,
        )
        try:
            async with contextlib.aclosing(tokens):
                async for step in tokens:
                    if generated is not None:
                        generated.inc()
                    queue.put_nowait((index, step))
            queue.put_nowait((index, None))
        except Exception as e:  # raised to the consumer, which stops the other choices
            queue.put_nowait((index, e))

    tasks = [asyncio.create_task(run(index)) for index in range(wanted.n)]
    waiting_first = set(range(wanted.n))
    running = wanted.n
    try:
        while running:
            index, got = await queue.get()
            if isinstance(got, BaseException):
                raise got
            if index in waiting_first:
                waiting_first.discard(index)
                if not waiting_first:
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
