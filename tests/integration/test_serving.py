"""The runtime servers as real processes: encode -> Mooncake tcp -> language reproduces the
monolithic transformers model; the router answers OpenAI requests and refuses bad ones."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from PIL import Image

from deepstack_runtime.models.tiny import make_tiny_model
from deepstack_runtime.servers.wire import MEDIA_TYPE
from devkit.metrics import sample
from devkit.oracles import ReferencePreprocessor, monolithic_generate, monolithic_step_logits
from devkit.runtime import ServerProcess, get, media_body, png, post, runtime_config

# Blocks of 4 tokens and a first allocation of 8 tokens: a 64x48 image (12 visual tokens)
# needs a resume round; two images even more.
TRANSFER = {"blockTokens": 4, "defaultAllocationTokens": 8, "poolBlocks": 256}
MAX_TOKENS = 8
TOP_LOGPROBS = 20


CASES = {
    "one-image-fits": [png(32, 32, (200, 30, 30))],
    "one-image-resumes": [png(64, 48, (10, 200, 30))],
    "two-images": [png(64, 48, (0, 0, 250)), png(48, 32, (250, 250, 0))],
}


@pytest.fixture(scope="module", params=[0, 1, 2], ids=lambda s: f"seed{s}")
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    seed = request.param
    root = tmp_path_factory.mktemp(f"seed{seed}")
    model = make_tiny_model(root / "model", seed=seed)
    config_file = root / "config.json"
    config_file.write_text(runtime_config(model, **TRANSFER).to_json())
    with (
        ServerProcess("encode", config_file, root / "encode.log") as encode,
        ServerProcess("language", config_file, root / "language.log") as language,
    ):
        yield {
            "model": model,
            "config": config_file,
            "encode": encode,
            "language": language,
            "root": root,
        }


def bootstrap(encode: ServerProcess) -> str:
    status, body = get(f"{encode.url}/health")
    assert status == 200
    return str(json.loads(body)["bootstrap"])


@pytest.mark.parametrize("case", CASES)
def test_disaggregated_equals_monolithic(stack: dict[str, Any], case: str) -> None:
    pre = ReferencePreprocessor(stack["model"])
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in CASES[case]]
    content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": "Describe the image."})
    prompt = pre.prepare([{"role": "user", "content": content}], images)
    assert prompt.pixel_values is not None
    assert prompt.image_grid_thw is not None
    grid = prompt.image_grid_thw.tolist()
    room = f"fidelity-{case}"
    before = stack["language"].metrics()
    results: dict[str, Any] = {}

    def run_encode() -> None:
        body = media_body(stack["model"], room, CASES[case])
        results["encode"] = post(f"{stack['encode'].url}/v1/encode", body, content_type=MEDIA_TYPE)

    thread = threading.Thread(target=run_encode)
    thread.start()
    status, body = post(
        f"{stack['language'].url}/v1/generate",
        {
            "room": room,
            "encoder": bootstrap(stack["encode"]),
            "input_ids": prompt.input_ids.tolist(),
            "image_grid_thw": grid,
            "sampling": {"max_tokens": MAX_TOKENS, "logprobs": True, "top_logprobs": TOP_LOGPROBS},
        },
    )
    thread.join(60)
    assert status == 200, body
    assert results["encode"][0] == 200, results["encode"]
    tokens = [step["token"] for step in body["steps"]]
    assert tokens == monolithic_generate(stack["model"], prompt, MAX_TOKENS)
    # The numerics after the transfer: every step's likeliest tokens and their log
    # probabilities are the undivided model's (the whole vocabulary is compared in
    # process, on the same backend code: tests/unit/test_language_fidelity.py).
    want = torch.log_softmax(monolithic_step_logits(stack["model"], prompt, tokens), dim=-1)
    diff = 0.0
    for step, expected in zip(body["steps"], want, strict=True):
        ids = [token for token, _ in step["top"]]
        assert len(ids) == TOP_LOGPROBS
        # The likeliest ones (up to ties at the last place).
        assert float(expected[ids].min()) >= float(expected.topk(TOP_LOGPROBS).values[-1]) - 1e-5
        got = torch.tensor([step["logprob"], *(logprob for _, logprob in step["top"])])
        diff = max(diff, float((got - expected[[step["token"], *ids]]).abs().max()))
    print(f"{case}: max abs log-probability difference {diff:.3g}")
    assert diff <= 1e-5
    after = stack["language"].metrics()
    resumed = sample(after, "deepstack_transfer_resumptions_total") - sample(
        before, "deepstack_transfer_resumptions_total"
    )
    visual = int((prompt.input_ids == pre.image_token_id).sum())
    assert resumed == (1 if visual > TRANSFER["defaultAllocationTokens"] else 0)
    assert sample(after, "deepstack_buffer_blocks", state="used") == 0
    # No copy on either side: the tower (float32, as the pool) wrote its rows into the
    # blocks they were sent from, and the model read them where they landed (a resumed
    # sequence may span two runs of blocks, and is then copied out once).
    assert sample(stack["encode"].metrics(), "deepstack_transfer_scattered_total") == 0
    gathered = sample(after, "deepstack_transfer_gathered_total") - sample(
        before, "deepstack_transfer_gathered_total"
    )
    assert gathered <= resumed
