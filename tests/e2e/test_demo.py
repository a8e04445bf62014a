"""End to end, as a new user runs it: `hack/demo.py up` (what `make demo` runs) from
`helm install` to an answer, then scaling the language group and losing a language pod
while requests run."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deepstack_operator.localpods import local_pod, start
from tests.support.cluster import Cluster, wait_for
from tests.support.demo import demo_up
from tests.support.metrics import sample, sample_or_zero
from tests.support.operator import get_json, wait_for_status
from tests.support.runtime import data_url, get, png, post

NAME = "tiny-qwen3-vl-moe"
IMAGE = png(64, 48, (20, 160, 220))


@pytest.fixture(scope="module")
def demo(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with demo_up(cluster, tmp_path_factory.mktemp("demo"), "reference") as values:
        yield values


def chat(max_tokens: int = 16, **extra: Any) -> dict[str, Any]:
    return {
        "model": NAME,
        "max_tokens": max_tokens,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
                    {"type": "text", "text": "Describe the image."},
                ],
            }
        ],
        **extra,
    }


def monolithic_answer(model_dir: str, max_tokens: int) -> str:
    """The undivided transformers model's answer to the same request."""
    import io

    from PIL import Image

    from deepstack_runtime.backends.reference import ReferencePreprocessor, monolithic_generate

    pre = ReferencePreprocessor(model_dir)
    content = [{"type": "image"}, {"type": "text", "text": "Describe the image."}]
    image = Image.open(io.BytesIO(IMAGE)).convert("RGB")
    prompt = pre.prepare([{"role": "user", "content": content}], [image])
    return pre.decode(monolithic_generate(model_dir, prompt, max_tokens))


def test_demo_answers_like_the_monolithic_model(cluster: Cluster, demo: dict[str, Any]) -> None:
    out = demo["output"]
    assert "answer:" in out
    assert re.search(rf"^{NAME}\s+Ready\s+1/1\s+1/1\s+reference", out, re.M), out
    assert re.search(r"transfer: aux \d+ B, deepstack [1-9]\d* B, embedding [1-9]\d* B", out), out
    status, body = post(f"{demo['ROUTER_URL']}/v1/chat/completions", chat())
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == monolithic_answer(demo["MODEL_DIR"], 16)
    cr = get_json(cluster, "-n", demo["namespace"], "get", "dsd", NAME)
    assert cr["status"]["phase"] == "Ready"
    encode_metrics = get(f"http://127.0.0.1:{demo['base'] + 1}/metrics")[1]
    assert sample(encode_metrics, "deepstack_transfer_bytes_total", payload="deepstack") > 0


def test_scaling_the_language_group_loses_no_request(
    cluster: Cluster, demo: dict[str, Any]
) -> None:
    namespace, state = demo["namespace"], Path(demo["state"])
    encode_pid = int((state / "encode.pid").read_text())
    results: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            results.append(post(f"{demo['ROUTER_URL']}/v1/chat/completions", chat(max_tokens=4))[0])

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        cluster.kubectl(
            "-n",
            namespace,
            "patch",
            "dsd",
            NAME,
            "--type=merge",
            "-p",
            '{"spec":{"language":{"replicas":2}}}',
        )
        status = wait_for_status(cluster, namespace, NAME, phase="Ready", observedGeneration=2)
        assert status["language"]["readyReplicas"] == 2
        # The new pod, from its rendered template, started beside the first one.
        sts = get_json(cluster, "-n", namespace, "get", "statefulset", f"{NAME}-language")
        port = demo["base"] + 3
        pod = local_pod(
            sts["spec"]["template"],
            pod_name=f"{NAME}-language-1",
            namespace=namespace,
            pod_ip="127.0.0.1",
            config_file=str(state / "etc-deepstack" / "config.json"),
            overrides=[
                *("--host", "127.0.0.1", "--advertise-host", "127.0.0.1"),
                *("--metrics-port", "0", "--port", str(port)),
            ],
        )
        process = start(pod, state / "language-1.log", detach=True)
        (state / "language-1.pid").write_text(str(process.pid))
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(url), timeout=120, what="language-1")
        instances = json.loads((state / "instances.json").read_text())
        instances["language"].append(url)
        (state / "instances.json").write_text(json.dumps(instances))
        wait_for(
            lambda: json.loads(get(f"{demo['ROUTER_URL']}/health")[1]).get("language") == 2,
            timeout=30,
            what="the router to use both language pods",
        )

        def served_by_new_pod() -> bool:
            text = get(f"{url}/metrics")[1]
            labels = {"role": "language", "route": "/v1/generate", "code": "200"}
            return sample_or_zero(text, "deepstack_requests_total", **labels) >= 2

        wait_for(served_by_new_pod, timeout=60, what="the new language pod to serve requests")
    finally:
        stop.set()
        sender.join(120)
    assert results
    assert set(results) == {200}, results  # none lost during the scale
    os.kill(encode_pid, 0)  # the encode side was not restarted
    assert int((state / "encode.pid").read_text()) == encode_pid


def _up(url: str) -> bool:
    try:
        return get(f"{url}/health")[0] == 200
    except OSError:
        return False


def test_killing_a_language_pod_mid_request_fails_clearly_and_frees_blocks(
    demo: dict[str, Any],
) -> None:
    state = Path(demo["state"])
    languages = {"language": demo["base"] + 2, "language-1": demo["base"] + 3}
    outcome: dict[str, Any] = {}

    def long_request() -> None:
        started = time.monotonic()
        outcome["result"] = post(
            f"{demo['ROUTER_URL']}/v1/chat/completions",
            chat(max_tokens=400, ignore_eos=True),
            timeout=120,
        )
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=long_request)
    thread.start()

    def busy() -> str | None:
        for name, port in languages.items():
            if (state / f"{name}.pid").exists() and _up(f"http://127.0.0.1:{port}"):
                text = get(f"http://127.0.0.1:{port}/metrics")[1]
                if sample(text, "deepstack_requests_inflight", role="language") >= 1:
                    return name
        return None

    victim = wait_for(busy, timeout=30, interval=0.05, what="a language pod serving the request")
    os.kill(int((state / f"{victim}.pid").read_text()), signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive(), "the request hung"
    status, body = outcome["result"]
    assert status == 502, body  # a clear error, not a hang or a half answer
    assert "/v1/generate" in body["error"]["message"]

    def encode_blocks_free() -> bool:
        text = get(f"http://127.0.0.1:{demo['base'] + 1}/metrics")[1]
        return sample(text, "deepstack_buffer_blocks", state="used") == 0

    wait_for(encode_blocks_free, timeout=60, what="the encode side to free its blocks")
    # The survivor still answers; the router stopped sending to the dead pod.
    wait_for(
        lambda: post(f"{demo['ROUTER_URL']}/v1/chat/completions", chat(max_tokens=4))[0] == 200,
        timeout=60,
        what="a request served by the surviving language pod",
    )
