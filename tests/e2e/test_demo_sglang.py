"""`make demo DEMO_BACKEND=sglang` end to end: the Helm-installed stack with SGLang's
engine in the language pod (on this CPU) answers through the router like SGLang's own
server and like transformers."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from devkit.cluster import Cluster
from devkit.metrics import sample
from devkit.oracles import ReferencePreprocessor, monolithic_generate
from devkit.runtime import data_url, get, png, post, sglang_server
from tests.support.demo import demo_up
from tests.support.operator import get_json, group_name

NAME = "tiny-qwen3-vl-moe"
IMAGE = png(64, 48, (20, 160, 220))


@pytest.fixture(scope="module")
def demo(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with demo_up(cluster, tmp_path_factory.mktemp("demo-sglang"), "sglang") as values:
        yield values


def chat(image: bytes) -> dict[str, Any]:
    content = [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": "Describe the image."},
    ]
    return {
        "model": NAME,
        "max_tokens": 16,
        "temperature": 0,  # greedy on both sides (the OpenAI default is 1.0)
        "messages": [{"role": "user", "content": content}],
    }


def test_sglang_demo_answers_like_sglang_and_transformers(
    cluster: Cluster, demo: dict[str, Any], tmp_path: Path
) -> None:
    out = demo["output"]
    assert re.search(rf"^{NAME}\s+Ready\s+1/1\s+1/1\s+sglang", out, re.M), out
    assert re.search(r"transfer: aux \d+ B, deepstack [1-9]\d* B, embedding [1-9]\d* B", out), out
    name = group_name(cluster, demo["namespace"], NAME, "language")
    language = get_json(cluster, "-n", demo["namespace"], "get", "statefulset", name)
    container = language["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["deepstack-runtime", "language"]
    assert "--attention-backend" in container["args"]  # language.extraArgs, passed to SGLang
    language_pid = int((Path(demo["state"]) / "language.pid").read_text())
    assert b".venv-sglang" in Path(f"/proc/{language_pid}/cmdline").read_bytes()

    status, ours = post(f"{demo['ROUTER_URL']}/v1/chat/completions", chat(IMAGE))
    assert status == 200, ours
    with sglang_server(Path(demo["MODEL_DIR"]), tmp_path / "sglang.log") as single:
        status, theirs = post(f"{single}/v1/chat/completions", chat(IMAGE))
    assert status == 200, theirs
    text = ours["choices"][0]["message"]["content"]
    assert text == theirs["choices"][0]["message"]["content"]
    pre = ReferencePreprocessor(demo["MODEL_DIR"])
    content = [{"type": "image"}, {"type": "text", "text": "Describe the image."}]
    prompt = pre.prepare(
        [{"role": "user", "content": content}], [Image.open(io.BytesIO(IMAGE)).convert("RGB")]
    )
    assert text == pre.decode(monolithic_generate(demo["MODEL_DIR"], prompt, 16))
    language_metrics = get(f"http://127.0.0.1:{demo['base'] + 2}/metrics")[1]
    assert sample(language_metrics, "deepstack_transfer_duration_seconds_count") >= 2
