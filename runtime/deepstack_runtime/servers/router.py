"""The router: OpenAI-compatible chat completions with images, over one encode and one
language instance per request (least in-flight of the healthy ones), both legs at once."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from aiohttp import web
from prometheus_client import Counter

from deepstack_runtime.backends.reference import ReferencePreprocessor, decode_image
from deepstack_runtime.config import RuntimeConfig
from deepstack_runtime.errors import InputError
from deepstack_runtime.servers.auth import ApiKeys
from deepstack_runtime.servers.chat import ChatRequest, Choice, parse_chat_request, usage
from deepstack_runtime.servers.common import (
    BadRequest,
    Handler,
    Listen,
    Server,
    error,
    read_json,
    serve,
)
from deepstack_runtime.servers.images import Allowlist, ImageFetcher, ImageFetchError
from deepstack_runtime.servers.instances import (
    Fleet,
    Instance,
    Pair,
    Pool,
    Unavailable,
    probe_session,
)
from deepstack_runtime.servers.upstream import LegError, Upstream
from deepstack_runtime.servers.workers import MAX_BODY, encode_tensor

log = logging.getLogger(__name__)
ROLES = ("user", "system", "assistant")
# A request whose leg fails before any byte reached the client is tried again this many
# times, on other instances.
RETRIES = 1


# The RouterOptions a router's flags (and the resource's router.limits) may set.
ROUTER_LIMITS = (
    "max_images",
    "max_image_pixels",
    "max_visual_tokens",
    "max_prompt_tokens",
    "max_inflight",
    "instance_wait_seconds",
    "queue_wait_seconds",
)


@dataclass(frozen=True)
class RouterOptions:
    encode_urls: list[str]
    language_urls: list[str]
    max_prompt_tokens: int = 4096
    max_tokens_limit: int = 512
    allow_local_files: bool = False
    health_interval: float = 1.0
    instances_file: str = ""  # {"encode": [urls], "language": [urls]}
    # Bearer tokens a client must send on the OpenAI routes; none: no authentication.
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    # What one request may cost, checked before anything is decoded or encoded.
    max_images: int = 8
    max_image_pixels: int = 4096 * 4096
    max_visual_tokens: int = 16384
    # Hosts image URLs may name (router.imageUrlDomains); empty: no image is fetched.
    image_urls: Allowlist = field(default_factory=Allowlist)
    # Requests one router serves at once; beyond, 429 with Retry-After (before the body
    # is read).
    max_inflight: int = 256
    # How long a request waits for a healthy pair when there is none, before a 503.
    instance_wait_seconds: float = 5.0
    # How long a request waits for a pair with room when every one is busy (each pod
    # takes as many requests at once as its queue holds), before a 503.
    queue_wait_seconds: float = 30.0


async def _image_bytes(
    url: Any, options: RouterOptions, fetcher: ImageFetcher, index: int
) -> bytes:
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
    if parsed.scheme == "file" and options.allow_local_files:
        try:
            return Path(parsed.path).read_bytes()
        except OSError as e:
            raise BadRequest(f"image {index}: cannot read {parsed.path}: {e.strerror}") from e
    raise BadRequest(
        f"image {index}: only data: and http(s) URLs are accepted"
        + (" (and file: URLs)" if options.allow_local_files else "")
        + f"; got a {parsed.scheme or 'relative'} URL"
    )


def parse_messages(
    body: dict[str, Any], options: RouterOptions
) -> tuple[list[dict[str, Any]], list[Any]]:
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
    if count > options.max_images:  # before any image is read
        raise BadRequest(f"the request has {count} images; the limit is {options.max_images}")
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


async def load_images(urls: list[Any], options: RouterOptions, fetcher: ImageFetcher) -> list[Any]:
    """The images, read (remote ones at once) and decoded within the pixel limit."""
    data = await asyncio.gather(
        *(_image_bytes(url, options, fetcher, i + 1) for i, url in enumerate(urls))
    )
    images = []
    for i, image in enumerate(data):
        try:
            images.append(decode_image(image, options.max_image_pixels))
        except InputError as e:
            raise BadRequest(f"image {i + 1}: {e}") from e
    return images


async def run_router(config: RuntimeConfig, listen: Listen, options: RouterOptions) -> None:
    server = Server("router")
    contract = config.contract_hash()
    preprocessor = ReferencePreprocessor(config.model.path)
    pools = {
        "encode": Pool(
            "encode",
            options.encode_urls,
            config.endpoints.encode_service,
            config.http_port,
            options.instances_file,
        ),
        "language": Pool(
            "language",
            options.language_urls,
            config.endpoints.language_service,
            config.http_port,
            options.instances_file,
        ),
    }
    # Either side has answered, with its own error if need be, within a transfer timeout
    # (and a handshake) of being asked; a longer silence is a pod that stopped.
    transfer = config.transfer
    upstream = Upstream(
        server.registry,
        options.max_inflight,
        read_timeout=transfer.transfer_timeout_seconds + transfer.handshake_timeout_seconds,
    )
    probes = probe_session()
    fetcher = ImageFetcher(options.image_urls)

    fleet = Fleet(
        pools,
        contract,
        per_instance=transfer.max_queued_requests,
        instance_wait=options.instance_wait_seconds,
        queue_wait=options.queue_wait_seconds,
        health_interval=options.health_interval,
    )
    queued = server.metrics.queued.labels(role=server.role)
    queued.set_function(lambda: fleet.waiting)

    health_task = asyncio.create_task(fleet.run(probes, options.api_keys.refresh))
    retries = Counter(
        "deepstack_router_retries_total",
        "Requests tried again on another instance after a leg failed before any byte "
        "reached the client, by the role of the instance that failed.",
        ["role"],
        registry=server.registry,
    )
    for role in pools:
        retries.labels(role=role)

    async def ready(_: web.Request) -> web.Response:
        """Kubernetes' readiness: ready once this router has seen a pair of its own
        contract, and from then on (an outage later is answered with 503s and reasons,
        not hidden behind a Service without endpoints). A router made for a new contract
        so takes traffic only once a pair of that contract serves."""
        if not paired.is_set():
            ours = {
                role: [i for i in p.healthy() if i.contract == contract]
                for role, p in pools.items()
            }
            # No encode pod at all (an encode group held at zero): text only.
            encoders_expected = bool(pools["encode"].instances)
            if ours["language"] and (ours["encode"] or not encoders_expected):
                paired.set()
            else:
                return error(
                    503, f"no encode and language pair of contract {contract} yet", "unavailable"
                )
        return web.json_response({"status": "ready", "contract": contract})

    paired = asyncio.Event()
    server.extra_health = lambda: {
        role: sum(i.healthy for i in pool.instances.values()) for role, pool in pools.items()
    }

    async def generate_whole(
        language: Instance,
        encoder: Instance | None,
        payload: dict[str, Any],
        choices: list[Choice],
    ) -> None:
        """Every choice of a whole (non-streamed) answer. The language pod streams its
        steps even so: once every choice has finished (at a stop string included) the
        connection closes, which stops the pod's work."""
        r = await upstream.open_generation(language, payload, encoder)
        async with r:
            async for step in upstream.steps(language, r):
                choices[int(step["index"])].add(step, preprocessor.decode)
                if all(c.finish_reason is not None for c in choices):
                    break
        for choice in choices:
            choice.end()

    async def completions(request: web.Request) -> web.StreamResponse:
        if server.inflight > options.max_inflight:  # this one included
            return error(
                429,
                f"the router is at its limit of {options.max_inflight} requests in flight; "
                "retry shortly",
                "rate_limit_exceeded",
                headers={"Retry-After": str(fleet.retry_after())},
            )
        body = await read_json(request, MAX_BODY)
        if body.get("model") not in (None, config.model.served_model_name):
            return error(
                404,
                f"model {body.get('model')!r} is not served here; "
                f"use {config.model.served_model_name!r}",
                "not_found",
            )
        chat = parse_chat_request(body, options.max_tokens_limit)
        messages, urls = parse_messages(body, options)
        try:
            # A place on a pair first: the work below is spent only on the requests the
            # pods are ready to take (the others wait here in arrival order, or are told
            # when to come back).
            pair = await fleet.acquire(bool(urls))
        except Unavailable as e:
            return error(503, e.message, "unavailable", headers={"Retry-After": str(e.retry_after)})
        held: list[Pair] = [pair]
        try:
            return await serve_on(held, request, chat, messages, urls)
        finally:
            for pair in held:
                fleet.release(pair)

    async def serve_on(
        held: list[Pair],
        request: web.Request,
        chat: ChatRequest,
        messages: list[dict[str, Any]],
        urls: list[Any],
    ) -> web.StreamResponse:
        """A request's work and tries, on the pair in `held` (a retry swaps it for another;
        the caller gives back what `held` has at the end)."""
        images = await load_images(urls, options, fetcher)
        try:
            prompt = await asyncio.to_thread(preprocessor.prepare, messages, images)
        except InputError as e:
            raise BadRequest(str(e)) from e
        prompt_tokens = int(prompt.input_ids.shape[0])
        if prompt_tokens > options.max_prompt_tokens:
            raise BadRequest(
                f"the prompt has {prompt_tokens} tokens; the limit is {options.max_prompt_tokens}"
            )
        visual = int((prompt.input_ids == preprocessor.image_token_id).sum())
        if visual > options.max_visual_tokens:  # before any image is encoded
            raise BadRequest(
                f"the images make {visual} visual tokens; the limit is {options.max_visual_tokens}"
            )
        created = int(time.time())

        async def attempt(pair: Pair, last: bool) -> web.StreamResponse | LegError:
            """One try on `pair`: the answer, or (unless it is the `last` try) the leg
            failure that another pair may well not have, before any byte reached the
            client."""
            language, encoder = pair.language, pair.encoder
            room = uuid.uuid4().hex  # a fresh room for each try: the last one may linger
            generate_payload: dict[str, Any] = {
                "room": room,
                "encoder": encoder.bootstrap if encoder else "",
                "input_ids": prompt.input_ids.tolist(),
                "image_grid_thw": prompt.image_grid_thw.tolist()
                if prompt.image_grid_thw is not None
                else None,
                "sampling": chat.sampling.to_wire(),
                "n": chat.n,
            }
            legs: list[asyncio.Task[Any]] = []
            if encoder is not None:
                assert prompt.pixel_values is not None
                assert prompt.image_grid_thw is not None
                encode_payload = {
                    "room": room,
                    "pixel_values": encode_tensor(prompt.pixel_values.float()),
                    "image_grid_thw": prompt.image_grid_thw.tolist(),
                }
                legs.append(
                    asyncio.create_task(
                        upstream.call("encode", encoder, "/v1/encode", encode_payload)
                    )
                )
            completion_id = f"chatcmpl-{room}"
            choices = new_choices(chat)
            try:
                if chat.stream:
                    return await stream(
                        request, chat, language, encoder, generate_payload, legs, completion_id,
                        created, prompt_tokens,
                    )  # fmt: skip
                legs.insert(
                    0,
                    asyncio.create_task(
                        generate_whole(language, encoder, generate_payload, choices)
                    ),
                )
                # If either leg fails, the other is cancelled (the language side then
                # frees its blocks): one clear error, nothing waits for a timeout.
                done, pending = await asyncio.wait(legs, return_when=asyncio.FIRST_EXCEPTION)
                for task in pending:
                    if any(t.exception() for t in done):
                        task.cancel()
                await asyncio.gather(*legs)
            except asyncio.CancelledError:
                # The client went away: both legs stop, and with them the pods' work.
                for task in legs:
                    task.cancel()
                raise
            except LegError as e:
                for task in legs:
                    task.cancel()
                errors = [e, *_leg_errors(legs)]
                # Nothing reached the client yet: another pair may serve it, without the
                # instances to blame (a language pod that could not reach its encode pod
                # blames that one).
                retryable = e.status >= 500 and any(err.retryable for err in errors)
                if not retryable or last:
                    return _upstream_error(e.status, e.message, e.retry_after)
                log.info("retrying %s elsewhere: %s", completion_id, e.message)
                blamed_encoder = encoder is not None and e.blame == encoder.url
                retries.labels(role="encode" if blamed_encoder else "language").inc()
                e.avoid = frozenset(err.blame for err in errors)
                return e
            return web.json_response(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": config.model.served_model_name,
                    "choices": [choice.message(preprocessor.decode) for choice in choices],
                    "usage": usage(prompt_tokens, choices),
                }
            )

        avoid: frozenset[str] = frozenset()
        for tries_left in reversed(range(RETRIES + 1)):
            result = await attempt(held[0], last=tries_left == 0)
            if isinstance(result, web.StreamResponse):
                return result
            avoid = avoid | result.avoid
            fleet.release(held.pop())
            try:  # another pair at once, or the failure is the answer
                held.append(await fleet.acquire(bool(images), avoid, wait=False))
            except Unavailable:
                return _upstream_error(result.status, result.message, result.retry_after)
        raise AssertionError("the last try always answers")

    def new_choices(chat: ChatRequest) -> list[Choice]:
        return [
            Choice(i, chat.stop, preprocessor.eos_token_id, chat.sampling.ignore_eos)
            for i in range(chat.n)
        ]

    async def stream(
        request: web.Request,
        chat: ChatRequest,
        language: Instance,
        encoder: Instance | None,
        payload: dict[str, Any],
        legs: list[asyncio.Task[Any]],
        completion_id: str,
        created: int,
        prompt_tokens: int,
    ) -> web.StreamResponse:
        """Relay the choices as the language server produces them (server-sent events in
        the OpenAI streaming format). Once every choice has finished (a stop string
        included) the connection to the language pod closes, which stops its work. A
        failure after the first byte ends the stream with an error event and [DONE]."""
        response: web.StreamResponse | None = None

        async def fail_stream(failure: LegError) -> web.StreamResponse:
            """After the first byte the status is sent: an error event ends the stream."""
            for task in legs:
                task.cancel()
            assert response is not None
            event = {"message": failure.message, "type": "upstream_error", "code": failure.status}
            with contextlib.suppress(ConnectionError):
                await response.write(f"data: {json.dumps({'error': event})}\n\n".encode())
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
            return response

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            assert response is not None
            chunk = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": config.model.served_model_name,
                "choices": choices,
                **extra,
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        async def send_news(choice: Choice) -> None:
            """What `choice` has new: text, log probabilities, its finish reason."""
            text = choice.sendable()
            done = choice.finish_reason is not None
            logprobs = choice.logprobs(preprocessor.decode, unsent_only=True)
            if text or done or (logprobs and logprobs["content"]):
                delta = {"content": text} if text else {}
                await send(
                    [
                        {
                            "index": choice.index,
                            "delta": delta,
                            "logprobs": logprobs,
                            "finish_reason": choice.finish_reason if done else None,
                        }
                    ]
                )

        choices = new_choices(chat)
        try:
            r = await upstream.open_generation(language, payload, encoder)  # LegError: retry
            async with r:
                response = web.StreamResponse(
                    headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                )
                await response.prepare(request)
                for choice in choices:
                    role = {"role": "assistant", "content": ""}
                    await send([{"index": choice.index, "delta": role, "finish_reason": None}])
                async for step in upstream.steps(language, r):
                    choice = choices[int(step["index"])]
                    if choice.finish_reason is not None:
                        continue  # past its stop string
                    choice.add(step, preprocessor.decode)
                    await send_news(choice)
                    if all(c.finish_reason is not None for c in choices):
                        break  # leaving closes the connection: the pod stops generating
            for choice in choices:
                if choice.finish_reason is None:
                    choice.end()
                    await send_news(choice)
            if chat.include_usage:
                await send([], usage=usage(prompt_tokens, choices))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            await asyncio.gather(*legs, return_exceptions=True)
            return response
        except LegError as e:
            if response is not None and response.prepared:
                return await fail_stream(e)
            raise  # before the first byte: the caller may try another instance
        except (KeyError, ValueError, TypeError) as e:  # a step that is not ours
            failure = LegError(502, f"/v1/generate on {language.url}: bad step: {e!r}")
            if response is not None and response.prepared:
                return await fail_stream(failure)
            raise failure from e

    async def models(_: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": config.model.served_model_name, "object": "model"}]}
        )

    def guarded(handler: Handler) -> Handler:
        """The OpenAI routes, behind the API keys when there are any (probes are not)."""

        async def check(request: web.Request) -> web.StreamResponse:
            if not options.api_keys.allows(request.headers.get("Authorization")):
                return error(
                    401,
                    "a valid API key is required: send Authorization: Bearer <key>",
                    "invalid_request_error",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            return await handler(request)

        return check

    server.guard = guarded  # /metrics, when it is served on this port
    app = server.app()
    app.router.add_post(
        "/v1/chat/completions",
        guarded(server.tracked("/v1/chat/completions", completions)),
    )
    app.router.add_get("/v1/models", guarded(models))
    app.router.add_get("/ready", ready)

    async def stop() -> None:
        health_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await health_task
        await upstream.close()
        await probes.close()
        await fetcher.close()

    await serve(server, app, listen, on_stop=stop)


def _leg_errors(legs: list[asyncio.Task[Any]]) -> list[LegError]:
    """The LegErrors of the legs that ended with one."""
    errors = []
    for task in legs:
        if task.done() and not task.cancelled():
            failure = task.exception()
            if isinstance(failure, LegError):
                errors.append(failure)
    return errors


def _upstream_error(status: int, message: str, retry_after: str | None) -> web.Response:
    """An instance's error, as the client gets it; "busy, retry after" passes through."""
    status = _upstream_status(status)
    headers = {"Retry-After": retry_after} if status == 503 and retry_after else None
    return error(status, message, "upstream_error", headers=headers)


def _upstream_status(status: int) -> int:
    """What the client gets for an instance's error status: the caller's own mistakes (4xx)
    and "unavailable" or "timed out" as they are, any other failure as a bad gateway."""
    return status if status < 500 or status in (503, 504) else 502
