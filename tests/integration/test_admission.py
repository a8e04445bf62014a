"""Bounded admission through real servers: a language pod lets `maxQueuedRequests`
requests wait for blocks and answers the next 503 with Retry-After at once, also
through the router; nothing is lost, and a freed pool serves again."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from deepstack_runtime.models.tiny import make_tiny_model
from devkit.cluster import wait_for
from devkit.metrics import sample
from devkit.oracles import ReferencePreprocessor
from devkit.runtime import ServerProcess, data_url, png, runtime_config, serving_stack

# 4 blocks of 4 tokens: one request of 16 visual tokens holds the whole pool.
TRANSFER = {"blockTokens": 4, "defaultAllocationTokens": 8, "poolBlocks": 4,
            "maxQueuedRequests": 1, "transferTimeoutSeconds": 60}  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("admission")
    model = make_tiny_model(root / "model", seed=0)
    config_file = root / "config.json"
    config_file.write_text(runtime_config(model, **TRANSFER).to_json())
    with serving_stack(config_file, root) as (encode, language, router):
        yield {"model": model, "encode": encode, "language": language, "router": router}


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    return sample(server.metrics(), name, **labels)


def open_request(
    server: ServerProcess, path: str, body: dict[str, Any]
) -> http.client.HTTPConnection:
    port = int(server.url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return connection


def blocks_free(server: ServerProcess) -> bool:
    return metric(server, "deepstack_buffer_blocks", state="used") == 0


def hang_up(connection: http.client.HTTPConnection) -> None:
    assert connection.sock is not None
    connection.sock.close()
    connection.close()


def test_a_full_queue_answers_503_with_retry_after_and_loses_nothing(
    stack: dict[str, Any],
) -> None:
    language, router = stack["language"], stack["router"]
    image_token = ReferencePreprocessor(stack["model"]).image_token_id
    with urllib.request.urlopen(stack["encode"].url + "/health", timeout=10) as r:
        encoder = json.loads(r.read())["bootstrap"]

    def generate(room: str, side: int) -> dict[str, Any]:
        tokens = side * side // 4  # merge 2x2
        return {"room": room, "encoder": encoder, "image_grid_thw": [[1, side, side]],
                "input_ids": [1, *[image_token] * tokens, 2],
                "sampling": {"max_tokens": 2}}  # fmt: skip

    # Admitted: holds the whole pool while it waits for an image nobody encodes.
    holder = open_request(language, "/v1/generate", generate("holds-the-pool", 8))
    wait_for(lambda: metric(language, "deepstack_buffer_blocks", state="used") > 0,
             timeout=30, interval=0.05, what="the first request admitted")  # fmt: skip
    # Waits for blocks: the queue (of one) is full now.
    waiter = open_request(language, "/v1/generate", generate("waits-for-blocks", 4))
    wait_for(lambda: metric(language, "deepstack_transfer_queued_requests") == 1,
             timeout=30, interval=0.05, what="the second request queued")  # fmt: skip

    # The next one is told at once, by the pod and through the router.
    refused = open_request(language, "/v1/generate", generate("refused", 4))
    response = refused.getresponse()
    body = json.loads(response.read())
    assert response.status == 503, body
    assert response.getheader("Retry-After") == "1"
    assert "already wait for blocks" in body["error"]["message"]
    content = [{"type": "image_url", "image_url": {"url": data_url(png(32, 32, (5, 5, 5)))}},
               {"type": "text", "text": "hi"}]  # fmt: skip
    chat = {"model": "tiny-qwen3-vl-moe", "max_tokens": 2,
            "messages": [{"role": "user", "content": content}]}  # fmt: skip
    request = urllib.request.Request(
        router.url + "/v1/chat/completions", json.dumps(chat).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as through_router:
        urllib.request.urlopen(request, timeout=60)
    assert through_router.value.code == 503
    assert through_router.value.headers["Retry-After"] == "1"
    assert "already wait for blocks" in json.loads(through_router.value.read())["error"]["message"]

    # The holder goes away: the waiter is admitted, and nobody waits any more.
    hang_up(holder)
    wait_for(lambda: metric(language, "deepstack_transfer_queued_requests") == 0,
             timeout=10, interval=0.05, what="the waiter admitted")  # fmt: skip
    hang_up(waiter)
    for server in (language, stack["encode"]):
        wait_for(partial(blocks_free, server), timeout=10, interval=0.05,
                 what=f"{server.role} blocks freed")  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as r:
        answer = json.loads(r.read())
    assert answer["usage"]["completion_tokens"] == 2
    assert metric(language, "deepstack_requests_total", role="language",
                  route="/v1/generate", code="503") == 2  # fmt: skip
