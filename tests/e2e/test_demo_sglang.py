"""`make demo DEMO_BACKEND=sglang` end to end on the local cluster's real node: the
Helm-installed stack with SGLang's engine in the language pod (on this CPU), every pod a
container of the sglang backend's CPU test image. It answers through the router's Service
like SGLang's own single server and like transformers; its readiness gate opens through a
real transfer; it scales and loses its language pod under traffic."""

from __future__ import annotations

import io
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from devkit.cluster import Cluster
from devkit.metrics import sample
from devkit.oracles import ReferencePreprocessor, monolithic_generate
from devkit.runtime import post, sglang_server
from tests.support.demo import demo_up
from tests.support.e2e import (
    IMAGE,
    NAME,
    Traffic,
    chat,
    metrics,
    pod_named,
    pods,
    ready,
    restart_count,
    router_counts,
    scale_language,
    served,
    wait_until,
)
from tests.support.node import NODE_NAME, container_pid
from tests.support.operator import condition, dsd, get_json, group_name


@pytest.fixture(scope="module")
def demo(cluster: Cluster) -> Iterator[dict[str, Any]]:
    with demo_up(cluster, "sglang") as values:
        yield values


def text_chat() -> dict[str, Any]:
    return {
        "model": NAME,
        "max_tokens": 16,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Name three colours."}],
    }


def transformers_answer(model_dir: str, image: bytes | None, text: str) -> str:
    pre = ReferencePreprocessor(model_dir)
    if image is None:
        prompt = pre.prepare([{"role": "user", "content": text}], [])
    else:
        content = [{"type": "image"}, {"type": "text", "text": text}]
        prompt = pre.prepare(
            [{"role": "user", "content": content}], [Image.open(io.BytesIO(image)).convert("RGB")]
        )
    return pre.decode(monolithic_generate(model_dir, prompt, 16))


def test_sglang_pods_answer_like_sglang_and_transformers(
    cluster: Cluster, demo: dict[str, Any], tmp_path: Path
) -> None:
    out, namespace = demo["output"], demo["namespace"]
    assert re.search(rf"^{NAME}\s+Ready\s+1/1\s+1/1\s+sglang", out, re.M), out
    assert re.search(r"transfer: aux \d+ B, deepstack [1-9]\d* B, embedding [1-9]\d* B", out), out
    # Every role runs as a container on the real node, from the sglang test image.
    image = dsd(cluster, namespace, NAME)["spec"]["runtime"]["image"]
    assert image.startswith("localhost/deepstack-sglang-cpu-test:"), image
    for role in ("encode", "language", "router"):
        (pod,) = pods(cluster, namespace, role)
        assert pod["spec"]["nodeName"] == NODE_NAME, role
        assert ready(pod), role
        (status,) = pod["status"]["containerStatuses"]
        assert status["image"].endswith(image.removeprefix("localhost/")), status
    language = get_json(
        cluster,
        "-n",
        namespace,
        "get",
        "statefulset",
        group_name(cluster, namespace, NAME, "language"),
    )
    container = language["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["deepstack-runtime", "language"]
    assert "--attention-backend" in container["args"]  # language.extraArgs, passed to SGLang
    # SGLang's engine runs inside the language pod's container.
    (language_pod,) = pods(cluster, namespace, "language")
    cmdline = Path(f"/proc/{container_pid(language_pod)}/cmdline").read_bytes()
    assert b"deepstack-runtime\x00language" in cmdline, cmdline

    ours = {}
    for key, body in (("image", chat()), ("text", text_chat())):
        status, answer = post(f"{demo['ROUTER_URL']}/v1/chat/completions", body)
        assert status == 200, answer
        ours[key] = answer["choices"][0]["message"]["content"]
    with sglang_server(Path(demo["MODEL_DIR"]), tmp_path / "sglang.log") as single:
        theirs = {}
        for key, body in (("image", chat()), ("text", text_chat())):
            status, answer = post(f"{single}/v1/chat/completions", body)
            assert status == 200, answer
            theirs[key] = answer["choices"][0]["message"]["content"]
    assert ours == theirs
    assert ours["image"] == transformers_answer(demo["MODEL_DIR"], IMAGE, "Describe the image.")
    assert ours["text"] == transformers_answer(demo["MODEL_DIR"], None, "Name three colours.")
    assert sample(metrics(language_pod), "deepstack_transfer_duration_seconds_count") >= 2


def test_the_sglang_language_pod_turned_ready_through_a_real_transfer(
    cluster: Cluster, demo: dict[str, Any]
) -> None:
    namespace = demo["namespace"]
    dsd_status = dsd(cluster, namespace, NAME)["status"]
    assert condition(dsd_status, "TransferReady")["reason"] == "TransferVerified"
    assert dsd_status["language"]["transferVerified"] == 1
    (language,) = pods(cluster, namespace, "language")
    gate = condition(language["status"], "disagg.deepstack.dev/transfer-ready")
    assert gate["status"] == "True"
    assert "over tcp" in gate["message"]
    (encode,) = pods(cluster, namespace, "encode")
    assert sample(metrics(encode), "deepstack_transfer_bytes_total", payload="deepstack") > 0


def test_scaling_the_sglang_language_group_loses_no_request(
    cluster: Cluster, demo: dict[str, Any]
) -> None:
    namespace = demo["namespace"]
    with Traffic(demo["ROUTER_URL"]) as traffic:
        wait_until(lambda: traffic.results, "the first request of the traffic")
        status = scale_language(cluster, namespace, demo["ROUTER_URL"], 2)
        assert status["language"]["readyReplicas"] == 2
        new = pods(cluster, namespace, "language")[1]
        wait_until(lambda: served(new) >= 2, "the new language pod to serve requests")
    assert len(traffic.results) >= 3
    assert traffic.failures() == []


def test_killing_an_sglang_language_pod_fails_only_requests_in_flight(
    cluster: Cluster, demo: dict[str, Any]
) -> None:
    """SIGKILL of a language container (SGLang's engine with it): the kubelet restarts it,
    the engine starts again, the other pod serves meanwhile, and only requests in flight on
    the killed one fail, each with a reason."""
    namespace = demo["namespace"]
    scale_language(cluster, namespace, demo["ROUTER_URL"], 2)
    victim = pods(cluster, namespace, "language")[0]
    name = victim["metadata"]["name"]
    restarts = restart_count(victim)
    with Traffic(demo["ROUTER_URL"], max_tokens=16) as traffic:
        wait_until(lambda: len(traffic.results) >= 2, "requests before the kill")
        killed_at = time.monotonic()
        os.kill(container_pid(victim), signal.SIGKILL)
        wait_until(
            lambda: restart_count(pod_named(cluster, namespace, name)) > restarts,
            "the kubelet to restart the killed container",
        )
        wait_until(
            lambda: ready(pod_named(cluster, namespace, name)),
            "the restarted engine to be ready",
            timeout=400,
        )
        wait_until(
            lambda: router_counts(demo["ROUTER_URL"]).get("language") == 2,
            "the router to use the restarted pod again",
        )
        count = len(traffic.results)
        wait_until(lambda: len(traffic.results) >= count + 2, "answers after the restart")
    assert len(traffic.results) >= 6
    for (status, body), (start, end) in zip(traffic.results, traffic.spans, strict=True):
        if status == 200:
            continue
        # It was in flight when the engine was killed, and says why it failed.
        assert start <= killed_at <= end, (status, body, start, killed_at)
        assert status in (502, 503), (status, body)
        assert body["error"]["message"], body
    assert len(traffic.failures()) <= 1, traffic.failures()
