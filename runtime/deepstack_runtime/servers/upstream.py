"""The router's calls to its instances: the legs of a request.

One connection pool for the legs, sized so that every request the router admits has its
connections (no request waits on another's), and none shared with the health probes
(`instances.probe_session`): a probe never queues behind requests. Timeouts bound each
step (connecting; the silence between two reads), never a whole generation. Every
failure is a LegError with a reason: counted by role and kind, and blamed on the
instance at fault (which leaves rotation after enough of them).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter

from deepstack_runtime.servers.instances import Instance

# A pod in the same cluster that has not accepted a connection by then is not serving.
CONNECT_TIMEOUT_SECONDS = 5
# Connections one request holds at once: its encode leg and its language leg.
LEGS_PER_REQUEST = 2
# Kinds of leg failure (a bounded label).
FAILURE_KINDS = ("unreachable", "timeout", "disconnected", "refused", "malformed")


class LegError(Exception):
    """One leg's failure: `url` the instance it failed on; `retryable` when another
    instance may well succeed (it could not be reached, went silent, or said busy or
    draining)."""

    def __init__(
        self,
        status: int,
        message: str,
        retry_after: str | None = None,
        url: str = "",
        *,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.url = url
        self.retryable = retryable
        self.blame = url  # the instance at fault
        self.reason = ""  # a transfer failure's reason, as the language pod said it
        self.avoid: frozenset[str] = frozenset()  # instances a retry must not use


# Transfer failures a language pod reports that are its encode peer's doing (it could
# not be reached, or went away mid-transfer): another encode pod may well serve.
PEER_FAILURES = {"connect_failed": True, "peer_lost": False}  # reason -> unreachable


class Upstream:
    """The legs' connection pool, timeouts and failure accounting."""

    def __init__(self, registry: CollectorRegistry, max_inflight: int, read_timeout: float):
        self.read_timeout = read_timeout
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=LEGS_PER_REQUEST * max_inflight),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=CONNECT_TIMEOUT_SECONDS, sock_read=read_timeout
            ),
        )
        self.failures = Counter(
            "deepstack_router_leg_failures",
            "Legs of requests that failed, by the role of the instance and the kind of "
            "failure (unreachable, timeout, disconnected, refused: an error status, "
            "malformed: an answer that is not ours).",
            ["role", "kind"],
            registry=registry,
        )
        for role in ("encode", "language"):
            for kind in FAILURE_KINDS:
                self.failures.labels(role=role, kind=kind)

    async def close(self) -> None:
        await self.session.close()

    async def call(
        self, role: str, instance: Instance, path: str, body: bytes, content_type: str
    ) -> dict[str, Any]:
        """One request to `instance`, its JSON answer; LegError otherwise."""
        headers = {"Content-Type": content_type}
        try:
            async with self.session.post(f"{instance.url}{path}", data=body, headers=headers) as r:
                if r.status != 200:
                    raise self._failed(role, "refused", await refusal(r, path, instance.url))
                try:
                    body = await r.json(content_type=None)
                except json.JSONDecodeError as e:
                    instance.failed()
                    raise self._failed(
                        role, "malformed",
                        LegError(502, f"{path} on {instance.url}: {e}", url=instance.url),
                    ) from e  # fmt: skip
                if not isinstance(body, dict):
                    raise self._failed(
                        role, "malformed",
                        LegError(502, f"{path} on {instance.url}: not an object", url=instance.url),
                    )  # fmt: skip
                instance.served()
                return body
        except aiohttp.ClientError as e:
            raise self._broken(role, instance, path, e) from e

    async def open_generation(
        self, language: Instance, payload: dict[str, Any], encoder: Instance | None
    ) -> aiohttp.ClientResponse:
        """Start `payload` on a language instance, streamed (so that closing the response
        stops the pod's work, at a stop string or when the client goes away); the caller
        reads it with `steps` and closes it. `encoder` is blamed where the language pod
        says the failure was its encode peer's."""
        path = "/v1/generate"
        try:
            r = await self.session.post(f"{language.url}{path}", json={**payload, "stream": True})
        except aiohttp.ClientError as e:
            raise self._broken("language", language, path, e) from e
        if r.status != 200:
            try:
                refused = blamed(await refusal(r, path, language.url), encoder)
            finally:
                r.release()
            raise self._failed("language", "refused", refused)
        return r

    async def steps(
        self, language: Instance, r: aiohttp.ClientResponse
    ) -> AsyncIterator[dict[str, Any]]:
        """The steps of a generation opened by `open_generation`, as they come; an error
        the pod reports mid-stream, a broken connection or a silent pod is a LegError."""
        path = "/v1/generate"
        try:
            async for line in r.content:
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                except json.JSONDecodeError as e:
                    raise self._failed(
                        "language", "malformed",
                        LegError(502, f"{path} on {language.url}: {e}", url=language.url),
                    ) from e  # fmt: skip
                if not isinstance(message, dict):
                    raise self._failed(
                        "language", "malformed",
                        LegError(502, f"{path} on {language.url}: not an object", url=language.url),
                    )  # fmt: skip
                if "error" in message:  # the language side failed mid-generation
                    raise self._failed(
                        "language", "refused",
                        LegError(
                            503, f"{path} on {language.url}: {message['error']}",
                            url=language.url, retryable=True,
                        ),
                    )  # fmt: skip
                yield message
        except aiohttp.ClientError as e:
            raise self._broken("language", language, path, e) from e
        language.served()

    def _failed(self, role: str, kind: str, error: LegError) -> LegError:
        self.failures.labels(role=role, kind=kind).inc()
        return error

    def _broken(self, role: str, instance: Instance, path: str, e: aiohttp.ClientError) -> LegError:
        """A connection that could not be made, broke, or went silent: the instance's
        failure (it leaves rotation at once when nothing listens), and another instance
        may well serve."""
        if isinstance(e, aiohttp.ServerTimeoutError):
            kind, status = "timeout", 504
            what = f"sent nothing for {self.read_timeout:g}s ({e})"
        elif isinstance(e, aiohttp.ClientConnectorError):
            kind, status, what = "unreachable", 502, f"could not be reached: {e}"
        else:
            kind, status, what = "disconnected", 502, f"failed: {e!r}"
        instance.failed(unreachable=kind == "unreachable")
        error = LegError(
            status, f"{path} on {instance.url} {what}", url=instance.url, retryable=True
        )
        return self._failed(role, kind, error)


def blamed(error: LegError, peer: Instance | None) -> LegError:
    """`error` from a language instance, with its encode `peer` to blame where the
    failure was the peer's (which then counts a failure)."""
    if peer is not None and error.reason in PEER_FAILURES:
        peer.failed(unreachable=PEER_FAILURES[error.reason])
        error.blame, error.retryable = peer.url, True
    return error


async def refusal(r: aiohttp.ClientResponse, path: str, url: str) -> LegError:
    """An instance's answer other than 200, as a LegError: a 503 (busy, draining) may
    be retried elsewhere."""
    try:
        body = await r.json(content_type=None)
    except (json.JSONDecodeError, aiohttp.ClientError, UnicodeDecodeError):
        body = None  # not an error body of ours: the status says enough
    error_part = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error_part, dict):
        error_part = {}
    refused = LegError(
        r.status,
        f"{path} on {url}: {error_part.get('message', r.reason)}",
        r.headers.get("Retry-After"),
        url,
        retryable=r.status == 503,
    )
    refused.reason = str(error_part.get("reason", ""))
    return refused
