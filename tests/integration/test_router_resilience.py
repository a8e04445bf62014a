"""The router under many requests, silent pods and stop strings, with real encode and
language processes: no request waits on another's connection, a probe never waits behind
requests, a pod that goes silent is a 504 (or an error event) with a reason, and a stop
string stops the language pod's work."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devkit.cluster import wait_for
from devkit.metrics import sample, sample_or_zero
from devkit.runtime import ServerProcess, data_url, free_port, get, png, post, tiny_stack

# Pods that let 256 requests wait: the router may send them that many at once.
TRANSFER: dict[str, Any] = {
    "blockTokens": 4,
    "defaultAllocationTokens": 8,
    "poolBlocks": 256,
    "maxQueuedRequests": 256,
}


def text_chat(**extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny-qwen3-vl-moe",
        "temperature": 0,
        "messages": [{"role": "user", "content": "Tell me a story."}],
        **extra,
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with tiny_stack(tmp_path_factory.mktemp("resilience"), **TRANSFER) as servers:
        yield servers


def generated(language: ServerProcess) -> float:
    return sample(language.metrics(), "deepstack_generated_tokens_total")


def test_many_requests_in_flight_neither_wait_on_each_other_nor_starve_the_probes(
    stack: dict[str, Any],
) -> None:
    """130 long generations at once (more than aiohttp's default pool of 100 connections):
    every one reaches the language pod, and for longer than three probe timeouts the
    router keeps the busy pod in rotation (its probes have connections of their own)."""
    router, language = stack["router"], stack["language"]
    count = 130

    async def scenario() -> None:
        # The clients' own pool is unbounded: only the router's may hold requests back.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
            body = text_chat(max_tokens=512, ignore_eos=True)
            requests = [
                asyncio.create_task(client.post(f"{router.url}/v1/chat/completions", json=body))
                for _ in range(count)
            ]
            try:
                deadline = time.monotonic() + 60
                while (
                    sample(language.metrics(), "deepstack_requests_inflight", role="language")
                    < count
                ):
                    assert time.monotonic() < deadline, "not every request reached the pod"
                    await asyncio.sleep(0.5)
                window = time.monotonic() + 20  # three probe timeouts (5 s) and more
                while time.monotonic() < window:
                    health = json.loads(get(f"{router.url}/health")[1])
                    assert health["language"] == 1, health
                    await asyncio.sleep(0.5)
            finally:
                for task in requests:  # the clients go away: the pods stop their work
                    task.cancel()
                await asyncio.gather(*requests, return_exceptions=True)

    asyncio.run(scenario())
    wait_for(
        lambda: sample(language.metrics(), "deepstack_requests_inflight", role="language") == 0,
        timeout=60,
        what="the abandoned requests to stop on the language pod",
    )


def test_a_stop_string_stops_the_language_pod_of_a_whole_request(stack: dict[str, Any]) -> None:
    """A non-streamed request with a stop string ends at the match, and the pod stops
    generating there instead of running to max_tokens."""
    url = f"{stack['router'].url}/v1/chat/completions"
    status, body = post(url, text_chat(max_tokens=12, ignore_eos=True))
    assert status == 200, body
    text = body["choices"][0]["message"]["content"]
    stop = next(text[i : i + 2] for i in range(2, len(text) - 1) if text[i : i + 2].strip())
    before = generated(stack["language"])
    status, body = post(url, text_chat(max_tokens=400, ignore_eos=True, stop=[stop]))
    assert status == 200, body
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == text[: text.index(stop)]
    # The pod went on for at most a few tokens after the match, never to 400.
    assert generated(stack["language"]) - before < 40


def test_metrics_are_on_the_metrics_port_and_behind_the_keys_on_the_api_port(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    instances = ["--encode-url", stack["encode"].url, "--language-url", stack["language"].url]
    metrics_port = free_port()
    with ServerProcess(
        "router", stack["config"], tmp_path / "router-metrics.log", *instances,
        "--metrics-port", str(metrics_port),
    ) as router:  # fmt: skip
        assert get(f"{router.url}/metrics")[0] == 404  # not on the API port
        status, text = get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200
        assert "deepstack_router_leg_failures_total" in text
    keys = tmp_path / "keys"
    keys.write_text("the-key\n")
    with ServerProcess(
        "router", stack["config"], tmp_path / "router-metrics-keys.log", *instances,
        "--api-keys-file", str(keys),
    ) as router:  # fmt: skip
        assert get(f"{router.url}/metrics")[0] == 401  # on the API port: only with a key
        status, text = get(f"{router.url}/metrics", {"Authorization": "Bearer the-key"})
        assert status == 200
        assert "deepstack_requests_total" in text


@pytest.fixture
def quick(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A stack whose pods must answer within 5 s (transfer 3 s + handshake 2 s)."""
    with tiny_stack(
        tmp_path, **{**TRANSFER, "transferTimeoutSeconds": 3, "handshakeTimeoutSeconds": 2}
    ) as servers:
        yield servers


def test_a_language_pod_that_goes_silent_is_a_504_and_an_error_event(
    quick: dict[str, Any],
) -> None:
    router, language = quick["router"], quick["language"]
    url = f"{router.url}/v1/chat/completions"
    assert post(url, text_chat(max_tokens=4))[0] == 200
    os.kill(language.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        status, body = post(url, text_chat(max_tokens=4), timeout=30)
        assert status == 504, body
        assert "sent nothing for 5s" in body["error"]["message"], body
        assert time.monotonic() - started < 20
    finally:
        os.kill(language.process.pid, signal.SIGCONT)

    async def stream() -> list[str]:
        """A stream whose pod stops after its first tokens: what the client reads."""
        events: list[str] = []
        body = text_chat(max_tokens=512, ignore_eos=True, stream=True)
        timeout = aiohttp.ClientTimeout(total=30)
        async with (
            aiohttp.ClientSession(timeout=timeout) as client,
            client.post(url, json=body) as r,
        ):
            assert r.status == 200
            async for line in r.content:
                if not line.strip():
                    continue
                events.append(line.decode().strip())
                if len(events) == 3:
                    os.kill(language.process.pid, signal.SIGSTOP)
        return events

    try:
        events = asyncio.run(stream())
    finally:
        os.kill(language.process.pid, signal.SIGCONT)
    assert events[-1] == "data: [DONE]"
    failure = json.loads(events[-2].removeprefix("data: "))["error"]
    assert failure["code"] == 504
    assert "sent nothing for 5s" in failure["message"]
    metrics = router.metrics()
    assert (
        sample(metrics, "deepstack_router_leg_failures_total", role="language", kind="timeout") == 2
    )


def image_chat(**extra: Any) -> dict[str, Any]:
    content = [
        {"type": "image_url", "image_url": {"url": data_url(png(64, 48, (10, 200, 30)))}},
        {"type": "text", "text": "Describe the image."},
    ]
    return {**text_chat(**extra), "messages": [{"role": "user", "content": content}]}


async def send_all(url: str, bodies: list[dict[str, Any]], watch: Any = None) -> list[Any]:
    """POST the bodies one after another (50 ms apart), all in flight together; calls
    `watch()` every 100 ms until all are answered: [(status, headers, body)]."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:

        async def one(body: dict[str, Any]) -> tuple[int, Any, Any]:
            async with client.post(url, json=body) as r:
                return r.status, r.headers, await r.json(content_type=None)

        tasks = []
        for body in bodies:
            tasks.append(asyncio.create_task(one(body)))
            await asyncio.sleep(0.05)
        while not all(t.done() for t in tasks):
            if watch is not None:
                watch()
            await asyncio.sleep(0.1)
        return [t.result() for t in tasks]


def test_the_router_gives_each_pod_no_more_than_its_queue_holds(tmp_path: Path) -> None:
    """Pods that let 2 requests wait: 12 image requests at once all succeed, the router
    holding the others back in arrival order (never more than 2 on a pod, so no pod
    refuses one after the vision tower ran)."""
    transfer = {**TRANSFER, "maxQueuedRequests": 2}
    with tiny_stack(tmp_path, "--queue-wait-seconds", "120", **transfer) as stack:
        router, language = stack["router"], stack["language"]
        seen: list[float] = []

        def watch() -> None:
            text = language.metrics()
            seen.append(sample(text, "deepstack_requests_inflight", role="language"))

        bodies = [image_chat(max_tokens=48, ignore_eos=True) for _ in range(12)]
        results = asyncio.run(send_all(f"{router.url}/v1/chat/completions", bodies, watch))
        assert [status for status, _, _ in results] == [200] * 12, results
        assert max(seen) == 2, seen
        for server in (language, stack["encode"]):
            refused = sample_or_zero(
                server.metrics(), "deepstack_requests_total", role=server.role,
                route="/v1/generate" if server.role == "language" else "/v1/encode", code="503",
            )  # fmt: skip
            assert refused == 0


def test_a_request_that_waits_too_long_for_room_is_a_503_with_retry_after(
    tmp_path: Path,
) -> None:
    transfer = {**TRANSFER, "maxQueuedRequests": 1}
    with tiny_stack(tmp_path, "--queue-wait-seconds", "1", **transfer) as stack:
        url = f"{stack['router'].url}/v1/chat/completions"
        bodies = [text_chat(max_tokens=256, ignore_eos=True) for _ in range(4)]
        results = asyncio.run(send_all(url, bodies))
        statuses = [status for status, _, _ in results]
        assert statuses[0] == 200
        busy = [(headers, body) for status, headers, body in results if status == 503]
        assert busy, statuses
        for headers, body in busy:
            assert int(headers["Retry-After"]) >= 1
            assert "is busy (1 x 1 requests)" in body["error"]["message"]
