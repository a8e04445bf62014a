"""The language side's numerics against transformers' undivided model, the whole vocabulary
at every step: the reference backend run in-process as the language server runs it
(tests/support/language_step.py), on the rows the real encode side (ReferenceEncoder, the
encode server's tower) made of the images. Through the real servers and the transfer,
tests/integration/test_serving.py compares the greedy tokens and each step's likeliest
log probabilities."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from deepstack_runtime.backends.reference import ReferenceEncoder, ReferenceLanguageBackend
from deepstack_runtime.buffers import MultimodalItem
from deepstack_runtime.models.tiny import make_tiny_model
from deepstack_runtime.sampling import SamplingParams
from devkit.oracles import (
    Prompt,
    ReferencePreprocessor,
    monolithic_generate,
    monolithic_step_logits,
)
from devkit.runtime import png
from tests.support.language_step import LanguageRun, run_language_side

CASES = {
    "text-only": [],
    "one-image": [png(32, 32, (200, 30, 30))],
    "one-wide-image": [png(64, 48, (10, 200, 30))],
    "two-images": [png(64, 48, (0, 0, 250)), png(48, 32, (250, 250, 0))],
}
MAX_TOKENS = 8
# float32 on both sides; the split and the KV cache leave differences of about 2e-7.
TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=[0, 1, 2], ids=lambda s: f"seed{s}")
def sides(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    model = make_tiny_model(tmp_path_factory.mktemp("model") / "model", seed=request.param)
    return {
        "model": model,
        "pre": ReferencePreprocessor(model),
        "encoder": ReferenceEncoder(model),
        "language": ReferenceLanguageBackend(str(model)),
    }


def prepare(sides: dict[str, Any], case: str) -> tuple[Prompt, MultimodalItem | None]:
    """The prompt of `case` and the encode side's item of its images (None without)."""
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in CASES[case]]
    content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": "Describe the image."})
    prompt = sides["pre"].prepare([{"role": "user", "content": content}], images)
    item = None
    if prompt.pixel_values is not None and prompt.image_grid_thw is not None:
        item = sides["encoder"].encode(prompt.pixel_values, prompt.image_grid_thw)
    return prompt, item


def language_run(
    sides: dict[str, Any], prompt: Prompt, item: MultimodalItem | None, max_tokens: int
) -> LanguageRun:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return run_language_side(
        sides["language"], prompt.input_ids.tolist(), item, prompt.image_grid_thw, params
    )


def max_difference(model: Path, prompt: Prompt, run: LanguageRun) -> float:
    want = monolithic_step_logits(model, prompt, run.tokens)
    return float((torch.stack(run.logits) - want).abs().max())


@pytest.mark.parametrize("case", CASES)
def test_every_step_has_the_monolithic_models_logits(sides: dict[str, Any], case: str) -> None:
    prompt, item = prepare(sides, case)
    run = language_run(sides, prompt, item, MAX_TOKENS)
    assert len(run.logits) == MAX_TOKENS
    diff = max_difference(sides["model"], prompt, run)
    print(f"{case}: max abs logit difference {diff:.3g}")
    assert diff <= TOLERANCE
    # And the tokens are transformers' own greedy `generate` (which stops at EOS).
    greedy = monolithic_generate(sides["model"], prompt, MAX_TOKENS)
    assert run.tokens[: len(greedy)] == greedy


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda item: dataclasses.replace(item, deepstack=None), id="no-deepstack"),
        pytest.param(
            lambda item: dataclasses.replace(item, embeddings=item.embeddings * (1 + 1e-3)),
            id="rows-off-by-1e-3",
        ),
    ],
)
def test_the_comparison_sees_damaged_rows(sides: dict[str, Any], damage: Any) -> None:
    """The check above is not vacuous: rows that lost their DeepStack features, or that
    are off by a part in a thousand, give other logits."""
    prompt, item = prepare(sides, "one-wide-image")
    assert item is not None
    run = language_run(sides, prompt, damage(item), 1)
    assert max_difference(sides["model"], prompt, run) > TOLERANCE
