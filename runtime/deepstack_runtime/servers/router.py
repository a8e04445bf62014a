"""The router: the OpenAI chat completions API over the encode and language pods. It reads
each image's header only (never a pixel), builds the prompt and checks every limit from
that, picks a pair by content (the encode pod that may hold the images' rows, the language
pod that may hold the conversation's prefix), and runs both legs at once (exchange.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import Counter

from deepstack_runtime.config import ROUTER_LIMIT_DEFAULTS, RuntimeConfig
from deepstack_runtime.routing import conversation_key
from deepstack_runtime.servers.auth import ApiKeys
from deepstack_runtime.servers.chat import parse_chat_request
from deepstack_runtime.servers.common import (
    BadRequest,
    Handler,
    Listen,
    Server,
    error,
    read_json,
    serve,
)
from deepstack_runtime.servers.exchange import Exchange, upstream_error
from deepstack_runtime.servers.images import Allowlist, ImageFetcher
from deepstack_runtime.servers.instances import (
    Fleet,
    Pair,
    Pool,
    RouteKeys,
    Unavailable,
    probe_session,
)
from deepstack_runtime.servers.prompt import PromptBuilder, VideoLimits, parse_messages, read_media
from deepstack_runtime.servers.upstream import Upstream
from deepstack_runtime.servers.wire import MAX_BODY, MAX_MEDIA_BYTES

log = logging.getLogger(__name__)
# A request whose leg fails before any byte reached the client is tried again this many
# times, on other instances.
RETRIES = 1


@dataclass(frozen=True)
class RouterOptions:
    encode_urls: list[str]
    language_urls: list[str]
    max_prompt_tokens: int = ROUTER_LIMIT_DEFAULTS["max_prompt_tokens"]
    max_tokens_limit: int = 512
    allow_local_files: bool = False
    health_interval: float = 1.0
    instances_file: str = ""  # {"encode": [urls], "language": [urls]}
    # Bearer tokens a client must send on the OpenAI routes; none: no authentication.
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    # What one request may cost, checked before anything is decoded or encoded; these
    # limits' defaults are config.ROUTER_LIMIT_TABLE's.
    max_images: int = ROUTER_LIMIT_DEFAULTS["max_images"]  # images and videos
    max_image_pixels: int = ROUTER_LIMIT_DEFAULTS["max_image_pixels"]  # of an image or frame
    # of one video: what its encode pod may decode
    max_video_seconds: float = ROUTER_LIMIT_DEFAULTS["max_video_seconds"]
    # sampled from one video (its processor's own maximum)
    max_video_frames: int = ROUTER_LIMIT_DEFAULTS["max_video_frames"]
    max_visual_tokens: int = ROUTER_LIMIT_DEFAULTS["max_visual_tokens"]
    # Hosts image URLs may name (router.mediaUrlDomains); empty: no image is fetched.
    image_urls: Allowlist = field(default_factory=Allowlist)
    # Requests one router serves at once; beyond, 429 with Retry-After (before the body
    # is read).
    max_inflight: int = ROUTER_LIMIT_DEFAULTS["max_inflight"]
    # How long a request waits for a healthy pair when there is none, before a 503.
    instance_wait_seconds: float = ROUTER_LIMIT_DEFAULTS["instance_wait_seconds"]
    # How long a request waits for a pair with room when every one is busy (each pod
    # takes as many requests at once as its queue holds), before a 503.
    queue_wait_seconds: float = ROUTER_LIMIT_DEFAULTS["queue_wait_seconds"]


async def run_router(config: RuntimeConfig, listen: Listen, options: RouterOptions) -> None:
    server = Server("router")
    contract = config.contract_hash()
    builder = PromptBuilder(config.model.path)
    endpoints = config.endpoints
    pools = {
        role: Pool(role, urls, service, config.http_port, options.instances_file)
        for role, urls, service in (
            ("encode", options.encode_urls, endpoints.encode_service),
            ("language", options.language_urls, endpoints.language_service),
        )
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
    server.metrics.queued.labels(role=server.role).set_function(lambda: fleet.waiting)
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
    exchange = Exchange(upstream, builder, config.model.served_model_name, retries)

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
        messages, refs = parse_messages(body, options.max_images)
        data = await read_media(refs, fetcher, options.allow_local_files)
        carried = sum(len(item) for item in data)
        if carried > MAX_MEDIA_BYTES:  # what one encode request may carry
            raise BadRequest(
                f"the images and videos are {carried} bytes together; the limit is "
                f"{MAX_MEDIA_BYTES}"
            )
        limits = VideoLimits(
            options.max_image_pixels, options.max_video_seconds, options.max_video_frames
        )
        # Off the event loop: hashing megabytes, reading containers and tokenizing take a
        # while.
        media = await asyncio.to_thread(
            lambda: [
                builder.video(item, i + 1, limits)
                if ref.kind == "video"
                else builder.image(item, i + 1, options.max_image_pixels)
                for i, (ref, item) in enumerate(zip(refs, data, strict=True))
            ]
        )
        visual = sum(item.tokens for item in media)
        if visual > options.max_visual_tokens:  # known from the headers: nothing decoded
            what = "images and videos" if any(r.kind == "video" for r in refs) else "images"
            raise BadRequest(
                f"the {what} make {visual} visual tokens; the limit is {options.max_visual_tokens}"
            )
        prompt = await asyncio.to_thread(builder.build, messages, media)
        if len(prompt.input_ids) > options.max_prompt_tokens:
            raise BadRequest(
                f"the prompt has {len(prompt.input_ids)} tokens; "
                f"the limit is {options.max_prompt_tokens}"
            )
        hashes = [item.sha256 for item in media]
        keys = RouteKeys(
            hashes,
            conversation_key(prompt.input_ids, builder.image_token_id, hashes),
        )
        try:
            # The pods are given only what they can take: the others wait here in arrival
            # order, or are told when to come back.
            pair = await fleet.acquire(bool(media), keys=keys)
        except Unavailable as e:
            return error(503, e.message, "unavailable", headers={"Retry-After": str(e.retry_after)})
        created = int(time.time())
        avoid: frozenset[str] = frozenset()
        held: Pair | None = pair
        try:
            for tries_left in reversed(range(RETRIES + 1)):
                result = await exchange.attempt(
                    request, chat, prompt, pair, created, last=tries_left == 0
                )
                if isinstance(result, web.StreamResponse):
                    return result
                avoid = avoid | result.avoid
                fleet.release(pair)
                held = None
                try:  # another pair at once, or the failure is the answer
                    pair = held = await fleet.acquire(bool(media), avoid, keys=keys, wait=False)
                except Unavailable:
                    return upstream_error(result)
            raise AssertionError("the last try always answers")
        finally:
            if held is not None:
                fleet.release(held)

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
