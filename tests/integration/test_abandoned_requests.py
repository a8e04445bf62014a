"""A request whose client goes away stops at once: its transfer is aborted on both sides,
its blocks are free within a second, and nothing goes on generating for nobody."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from deepstack_runtime.models.tiny import make_tiny_model
from deepstack_runtime.servers.wire import MEDIA_TYPE
from devkit.cluster import wait_for
from devkit.metrics import sample
from devkit.oracles import ReferencePreprocessor
from devkit.runtime import (
    ServerProcess,
    data_url,
    media_body,
    png,
    runtime_config,
    serving_stack,
)

GRID = [[1, 4, 4]]  # 16 patches of 8x8 pixels: 4 visual tokens


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("abandoned")
    model = make_tiny_model(root / "model", seed=0)
    config_file = root / "config.json"
    config_file.write_text(
        runtime_config(model, blockTokens=4, defaultAllocationTokens=8).to_json()
    )
    with serving_stack(config_file, root) as (encode, language, router):
        yield {"model": model, "encode": encode, "language": language, "router": router}


def used(server: ServerProcess) -> float:
    return sample(server.metrics(), "deepstack_buffer_blocks", state="used")


def abandon(
    server: ServerProcess, path: str, body: dict[str, Any] | bytes, busy: Callable[[], bool]
) -> float:
    """Send `body`, wait until the server is busy with it, hang up; return when we did."""
    port = int(server.url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    if isinstance(body, bytes):
        connection.request("POST", path, body, {"Content-Type": MEDIA_TYPE})
    else:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    wait_for(busy, timeout=30, interval=0.05, what=f"{server.role} busy with the request")
    assert connection.sock is not None
    connection.sock.close()
    connection.close()
    return time.monotonic()


def freed_within(server: ServerProcess, since: float, seconds: float) -> None:
    wait_for(
        lambda: used(server) == 0, timeout=10, interval=0.02, what=f"{server.role} blocks freed"
    )
    assert time.monotonic() - since <= seconds, f"{server.role}: {time.monotonic() - since:.2f}s"


def test_abandoned_receive_frees_the_language_blocks(stack: dict[str, Any]) -> None:
    """The language side waits for an encoder that has not encoded yet, holding its first
    allocation; its client hangs up."""
    image_token = ReferencePreprocessor(stack["model"]).image_token_id
    encoder = json.loads(http_get(stack["encode"].url + "/health"))["bootstrap"]
    body = {"room": "abandoned-receive", "encoder": encoder, "image_grid_thw": GRID,
            "input_ids": [1, 2, *[image_token] * 4, 3], "sampling": {"max_tokens": 4}}  # fmt: skip
    hung_up = abandon(stack["language"], "/v1/generate", body, lambda: used(stack["language"]) > 0)
    freed_within(stack["language"], hung_up, 1.0)


def test_abandoned_encode_frees_the_encoder_blocks(stack: dict[str, Any]) -> None:
    """The encoder holds an item for a receiver that never comes; its client hangs up."""
    body = media_body(stack["model"], "abandoned-encode", [png(32, 32, (1, 2, 3))])
    hung_up = abandon(stack["encode"], "/v1/encode", body, lambda: used(stack["encode"]) > 0)
    freed_within(stack["encode"], hung_up, 1.0)


@pytest.mark.parametrize(
    "params", [{"stream": True}, {"stream": False}, {"stream": False, "n": 2}],
    ids=["stream", "whole", "two-choices"],
)  # fmt: skip
def test_an_abandoned_chat_stops_generating(stack: dict[str, Any], params: dict[str, Any]) -> None:
    body = {"model": "tiny-qwen3-vl-moe", "max_tokens": 512, "ignore_eos": True, **params,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(png(64, 48, (9, 9, 9)))}},
                {"type": "text", "text": "Describe the image."}]}]}  # fmt: skip

    def generating() -> bool:
        text = stack["language"].metrics()
        return sample(text, "deepstack_requests_inflight", role="language") == 1

    hung_up = abandon(stack["router"], "/v1/chat/completions", body, generating)
    wait_for(lambda: not generating(), timeout=10, interval=0.02, what="generation stopped")
    assert time.monotonic() - hung_up <= 1.0
    for server in ("encode", "language"):
        freed_within(stack[server], hung_up, 1.0)


def http_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())
