"""What every runtime server shares: /health, /metrics, request accounting, draining.

A server counts its in-flight requests; on SIGTERM it stops taking new ones (503, and
/health turns unhealthy so the router and Kubernetes stop sending), waits for the
in-flight ones to finish (up to a deadline), then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    Summary,
)
from prometheus_client.exposition import generate_latest

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry, role: str) -> None:
        self.role = role
        self.requests = Counter(
            "deepstack_requests",
            "Requests served, by role, route and HTTP status code.",
            ["role", "route", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "deepstack_request_duration_seconds",
            "Time to answer a request, by role and route.",
            ["role", "route"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=registry,
        )
        self.inflight = Gauge(
            "deepstack_requests_inflight",
            "Requests being served, by role.",
            ["role"],
            registry=registry,
        )
        self.inflight.labels(role=role)
        self.size = Summary(
            "deepstack_request_size_bytes",
            "Bytes of the requests' bodies, by role and route (what an image costs on the "
            "wire: its file, not its pixels).",
            ["role", "route"],
            registry=registry,
        )
        self.queued = Gauge(
            "deepstack_requests_queued",
            "Requests waiting for their turn at the model, by role.",
            ["role"],
            registry=registry,
        )
        self.queued.labels(role=role)


# What a client told "busy" is asked to wait before it retries (seconds).
RETRY_AFTER_SECONDS = 1


def error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
    reason: str = "",
) -> web.Response:
    """An OpenAI-style error body with a reason a person can act on (and, for a
    transfer failure, its `reason` for the router)."""
    body: dict[str, Any] = {"message": message, "type": kind, "code": status}
    if reason:
        body["reason"] = reason
    return web.json_response(
        {"error": body},
        status=status,
        headers=headers,
    )


def busy(message: str) -> web.Response:
    """503 with Retry-After: the server is full now, not broken."""
    return error(503, message, "overloaded", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


async def read_json(request: web.Request, limit: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise BadRequest("the body's JSON is nested too deeply") from e
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


@dataclass(frozen=True)
class Listen:
    host: str
    port: int
    metrics_port: int
    bootstrap_port: int
    advertise_host: str
    drain_timeout: float = 60.0


class BadRequest(Exception):
    """Raised by handlers: answered 400 with the message."""


class Busy(Exception):
    """Raised by handlers: answered 503 with Retry-After and the message."""


class Admission:
    """Requests through one resource (a model) that computes one thing at a time: at
    most `max_waiting` requests are admitted at once, and the next is refused at once
    (Busy) rather than queued without bound. An admitted request is never refused
    afterwards, however many turns (its images) it then takes, in arrival order."""

    def __init__(self, what: str, max_waiting: int, queued: Gauge | None = None) -> None:
        self.what = what
        self.max_waiting = max_waiting
        self.waiting = 0
        self._lock = asyncio.Lock()
        self._queued = queued

    def _count(self, change: int) -> None:
        self.waiting += change
        if self._queued is not None:
            self._queued.set(self.waiting)

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        if self.waiting >= self.max_waiting:
            raise Busy(f"{self.waiting} requests already wait for {self.what}; retry later")
        self._count(+1)
        try:
            yield
        finally:
            self._count(-1)

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """The resource, for one computation of an admitted request."""
        async with self._lock:
            yield


@dataclass
class Server:
    role: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    draining: bool = False
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    extra_health: Callable[[], dict[str, Any]] = dict
    # What /metrics goes through when it is served on the API port (the router's API
    # keys); on its own metrics port it is served as is.
    guard: Callable[[Handler], Handler] = field(default=lambda handler: handler)

    def __post_init__(self) -> None:
        self.metrics = ServingMetrics(self.registry, self.role)
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds, ...
        ProcessCollector(registry=self.registry)
        self.idle.set()

    def tracked(self, route: str, handler: Handler) -> Handler:
        """Count, time and drain-gate a handler; turn BadRequest into a 400."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            if self.draining:
                response: web.StreamResponse = error(
                    503, f"the {self.role} server is shutting down", "unavailable"
                )
                self.metrics.requests.labels(self.role, route, "503").inc()
                return response
            if request.content_length is not None:
                self.metrics.size.labels(self.role, route).observe(request.content_length)
            self.inflight += 1
            self.idle.clear()
            self.metrics.inflight.labels(role=self.role).inc()
            started = time.monotonic()
            try:
                try:
                    response = await handler(request)
                except BadRequest as e:
                    response = error(400, str(e))
                except Busy as e:
                    response = busy(str(e))
                except web.HTTPException as e:
                    response = error(e.status, e.reason)
                except Exception as e:  # counted, and answered in the API's form
                    log.exception("%s %s failed", request.method, route)
                    response = error(500, f"internal error: {type(e).__name__}", "server_error")
            finally:
                self.inflight -= 1
                self.metrics.inflight.labels(role=self.role).dec()
                if self.inflight == 0:
                    self.idle.set()
            self.metrics.duration.labels(self.role, route).observe(time.monotonic() - started)
            self.metrics.requests.labels(self.role, route, str(response.status)).inc()
            return response

        return wrapped

    def app(self) -> web.Application:
        """The API port's application; serve() adds /metrics to it only when there is no
        metrics port of its own."""
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/health", self._health)
        return app

    def metrics_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _health(self, _: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining", "role": self.role}, status=503)
        return web.json_response({"status": "ok", "role": self.role, **self.extra_health()})

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


async def serve(
    server: Server,
    app: web.Application,
    listen: Listen,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT, then drain and stop."""
    # A client that goes away cancels its handler: its transfer is aborted and its blocks
    # freed at once, instead of when a timeout runs out.
    host, port, metrics_port = listen.host, listen.port, listen.metrics_port
    separate_metrics = bool(metrics_port) and metrics_port != port
    if not separate_metrics:
        app.router.add_get("/metrics", server.guard(server._metrics))
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    metrics_runner = None
    if separate_metrics:
        metrics_runner = web.AppRunner(server.metrics_app(), access_log=None)
        await metrics_runner.setup()
        await web.TCPSite(metrics_runner, host, metrics_port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("%s server on %s:%d (metrics %s)", server.role, host, port, metrics_port or port)
    print(f"READY {server.role} {host}:{port}", flush=True)
    await stop.wait()
    server.draining = True
    log.info("draining %d in-flight requests", server.inflight)
    try:
        await asyncio.wait_for(server.idle.wait(), listen.drain_timeout)
    except TimeoutError:
        log.warning(
            "%d requests still in flight after %gs; stopping anyway",
            server.inflight,
            listen.drain_timeout,
        )
    if on_stop is not None:
        await on_stop()
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
