"""The sglang backend end to end on this CPU: router -> encode server (vision tower) ->
Mooncake tcp -> language server -> SGLang's engine, against SGLang's own single server
and against transformers. SGLang 0.5.23 really runs (hack/sglang-env.sh), with the
kernel-package stand-in of devkit/sglang_cpu."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from PIL import Image

from deepstack_runtime.backends.reference import ReferenceEncoder
from deepstack_runtime.backends.sglang import fused_rows
from deepstack_runtime.models.tiny import make_tiny_model
from devkit.cluster import REPO, wait_for
from devkit.metrics import sample
from devkit.oracles import ReferencePreprocessor, monolithic_generate
from devkit.runtime import (
    data_url,
    get,
    png,
    post,
    serving_stack,
    sglang_config,
    sglang_server,
)
from devkit.sglang_on_cpu import SGLANG_ENV, SGLANG_PYTHON

# Blocks of 4 tokens, 8 preallocated, a pool of 64 blocks (256 tokens).
TRANSFER = {"blockTokens": 4, "defaultAllocationTokens": 8, "poolBlocks": 64}
MAX_TOKENS = 8
CASES = {
    "text": [],
    "one-image-fits": [png(32, 32, (200, 30, 30))],  # 4 visual tokens
    "one-image-resumes": [png(64, 48, (10, 200, 30))],  # 12
    "two-images": [png(64, 48, (0, 0, 250)), png(48, 32, (250, 250, 0))],  # 12 + 6
}


def chat(images: list[bytes], max_tokens: int = MAX_TOKENS, **extra: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": data_url(b)}} for b in images
    ]
    content.append({"type": "text", "text": "Describe the image."})
    return {
        "model": "tiny-qwen3-vl-moe",
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("sglang")
    model = make_tiny_model(root / "model", seed=0)
    config_file = root / "config.json"
    config_file.write_text(sglang_config(model, **TRANSFER).to_json())
    with (
        serving_stack(config_file, root, backend="sglang") as (encode, language, router),
        sglang_server(model, root / "sglang.log") as single,
    ):
        yield {
            "model": model,
            "root": root,
            "encode": encode,
            "language": language,
            "router": router,
            "single": single,
        }


def answer(url: str, body: dict[str, Any]) -> dict[str, Any]:
    status, reply = post(f"{url}/v1/chat/completions", body)
    assert status == 200, reply
    assert isinstance(reply, dict)
    return reply


@pytest.mark.parametrize("case", CASES)
def test_answer_equals_sglangs_own_server(stack: dict[str, Any], case: str) -> None:
    before = stack["language"].metrics()
    ours = answer(stack["router"].url, chat(CASES[case]))
    theirs = answer(stack["single"], chat(CASES[case]))
    print(f"{case}: {ours['choices'][0]['message']['content']!r}")
    assert ours["choices"][0]["message"]["content"] == theirs["choices"][0]["message"]["content"]
    assert ours["usage"]["prompt_tokens"] == theirs["usage"]["prompt_tokens"]
    assert ours["usage"]["completion_tokens"] == theirs["usage"]["completion_tokens"]
    after = stack["language"].metrics()
    visual = sum(int(torch.tensor(Image.open(io.BytesIO(b)).size).prod()) for b in CASES[case])
    visual //= 16 * 16  # merged 8-pixel patches, 2 x 2 per token
    resumed = sample(after, "deepstack_transfer_resumptions_total") - sample(
        before, "deepstack_transfer_resumptions_total"
    )
    assert resumed == (1 if visual > TRANSFER["defaultAllocationTokens"] else 0)
    if visual:
        deepstack = sample(after, "deepstack_transfer_bytes_total", payload="deepstack")
        assert sample(stack["encode"].metrics(), "deepstack_transfer_bytes_total",
                      payload="deepstack") > 0  # fmt: skip
        assert deepstack == 0  # bytes are counted by the writer, the encode side
    for server in ("encode", "language"):
        assert sample(stack[server].metrics(), "deepstack_buffer_blocks", state="used") == 0
    assert sample(after, "deepstack_buffer_memory_info", memory="host", device="cpu") == 1


@pytest.mark.parametrize("case", ["text", "one-image-resumes", "two-images"])
def test_answer_equals_transformers(stack: dict[str, Any], case: str) -> None:
    """With this checkpoint SGLang's answers equal transformers' on images too: the
    difference seen before came from a transformers comparison that called generate()
    without mm_token_type_ids (image tokens then get 1-D text positions)."""
    pre = ReferencePreprocessor(stack["model"])
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in CASES[case]]
    content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": "Describe the image."})
    prompt = pre.prepare([{"role": "user", "content": content}], images)
    want = pre.decode(monolithic_generate(stack["model"], prompt, MAX_TOKENS))
    assert answer(stack["router"].url, chat(CASES[case]))["choices"][0]["message"]["content"] == (
        want
    )


@pytest.mark.parametrize("with_image", [False, True], ids=["video", "image-and-video"])
def test_a_video_answers_like_transformers(stack: dict[str, Any], with_image: bool) -> None:
    """A video's temporal patches reach SGLang as images of [1, h, w] behind their
    timestamps, positioned and embedded as Qwen3-VL positions a video's. The reference is
    transformers' own pipeline (its PyAV reader, its sampling): SGLang's own server
    samples and resizes a video its own way (qwen-vl-utils' rule, bilinear), not as the
    checkpoint's video processor does, so its answer is not the model's."""
    from transformers import PreTrainedTokenizerFast

    from devkit.oracles import monolithic_media_generate
    from devkit.videos import clip

    video = clip(20, 10.0, 64, 48)  # 4 sampled frames: 2 temporal patches, 24 tokens
    image = CASES["one-image-fits"][0]
    media = [("image", image)] if with_image else []
    media.append(("video", video))
    content: list[dict[str, Any]] = [
        {"type": f"{kind}_url",
         f"{kind}_url": {"url": data_url(data, "video/mp4" if kind == "video" else "image/png")}}
        for kind, data in media
    ]  # fmt: skip
    content.append({"type": "text", "text": "What happens?"})
    body = {
        "model": "tiny-qwen3-vl-moe", "max_tokens": MAX_TOKENS, "temperature": 0,
        "messages": [{"role": "user", "content": content}],
    }  # fmt: skip
    plain = [{"type": kind} for kind, _ in media] + [{"type": "text", "text": "What happens?"}]
    tokens = monolithic_media_generate(
        stack["model"], [{"role": "user", "content": plain}], media, MAX_TOKENS
    )
    want = PreTrainedTokenizerFast.from_pretrained(stack["model"]).decode(
        tokens, skip_special_tokens=True
    )
    assert answer(stack["router"].url, body)["choices"][0]["message"]["content"] == want


def test_streaming_answer_equals_the_whole_one(stack: dict[str, Any]) -> None:
    whole = answer(stack["router"].url, chat(CASES["two-images"]))
    body = json.dumps(chat(CASES["two-images"], stream=True)).encode()
    request = urllib.request.Request(
        f"{stack['router'].url}/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    text = ""
    with urllib.request.urlopen(request, timeout=120) as r:
        for line in r:
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content", "")
    assert text == whole["choices"][0]["message"]["content"]


def test_encoder_output_equals_sglangs_vision_tower(stack: dict[str, Any], tmp_path: Path) -> None:
    """The encode server's vision tower (transformers) gives what SGLang's own Qwen3-VL
    vision tower gives for the same pixels: the fused [tokens, hidden x (1 + K)] rows."""
    pre = ReferencePreprocessor(stack["model"])
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in CASES["two-images"]]
    prompt = pre.prepare([{"role": "user", "content": [{"type": "image"}] * 2}], images)
    assert prompt.pixel_values is not None
    assert prompt.image_grid_thw is not None
    ours = ReferenceEncoder(stack["model"]).encode(prompt.pixel_values, prompt.image_grid_thw)
    fused = fused_rows(ours)
    inputs = tmp_path / "inputs.pt"
    torch.save({"pixels": prompt.pixel_values, "grid": prompt.image_grid_thw}, inputs)
    out = tmp_path / "sglang.pt"
    result = subprocess.run(
        [SGLANG_PYTHON, "-m", "tests.support.sglang_vision",
         str(stack["model"]), str(inputs), str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, **SGLANG_ENV},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    theirs = torch.load(out)
    assert theirs.shape == fused.shape
    diff = (theirs - fused).abs().max().item()
    print(f"max abs difference to SGLang's vision tower: {diff:.3g}")
    assert diff <= 1e-6  # float32 on both sides; measured 7.5e-8


def test_request_larger_than_the_pool_is_refused_and_frees_blocks(stack: dict[str, Any]) -> None:
    big = png(256, 256, (90, 90, 90))  # 256 visual tokens each; the pool holds 256
    status, body = post(f"{stack['router'].url}/v1/chat/completions", chat([big, big]))
    assert status == 400, body
    assert "oversize" in body["error"]["message"]
    for server in ("encode", "language"):

        def freed(server: str = server) -> bool:
            return sample(stack[server].metrics(), "deepstack_buffer_blocks", state="used") == 0

        wait_for(freed, timeout=10, what=f"{server} blocks freed")
    assert answer(stack["router"].url, chat(CASES["one-image-fits"]))["choices"]  # still serves


def test_image_the_processor_rejects_is_a_400(stack: dict[str, Any]) -> None:
    status, body = post(
        f"{stack['router'].url}/v1/chat/completions", chat([png(1000, 4, (1, 2, 3))])
    )
    assert status == 400, body
    assert "aspect ratio" in body["error"]["message"]


def clients(stack: dict[str, Any]) -> tuple[openai.OpenAI, openai.OpenAI]:
    """The openai client on our router, and on SGLang's own server."""
    return (
        openai.OpenAI(base_url=f"{stack['router'].url}/v1", api_key="-", max_retries=0),
        openai.OpenAI(base_url=f"{stack['single']}/v1", api_key="-", max_retries=0),
    )


TEXT: list[Any] = [{"role": "user", "content": "Tell me a story about a green field."}]


def complete(client: openai.OpenAI, **params: Any) -> Any:
    extra = {"ignore_eos": True, **params.pop("extra_body", {})}
    params.setdefault("max_tokens", 10)
    return client.chat.completions.create(
        model="tiny-qwen3-vl-moe", messages=TEXT, extra_body=extra, **params
    )


@pytest.mark.parametrize(
    "params",
    [
        {"frequency_penalty": 1.5},
        {"presence_penalty": 1.5},
        {"logprobs": True, "top_logprobs": 3},
    ],
    ids=["frequency", "presence", "logprobs"],
)
def test_sampling_parameters_mean_what_sglang_makes_of_them(
    stack: dict[str, Any], params: dict[str, Any]
) -> None:
    ours, theirs = (complete(c, temperature=0, **params) for c in clients(stack))
    plain = complete(clients(stack)[0], temperature=0)
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    if "logprobs" in params:
        mine, sglangs = ours.choices[0].logprobs.content, theirs.choices[0].logprobs.content
        assert [t.logprob for t in mine] == pytest.approx([t.logprob for t in sglangs], abs=1e-4)
        for a, b in zip(mine, sglangs, strict=True):
            assert [t.logprob for t in a.top_logprobs] == pytest.approx(
                [t.logprob for t in b.top_logprobs], abs=1e-4
            )
    else:  # the penalty took effect (the greedy answer repeats itself)
        assert ours.choices[0].message.content != plain.choices[0].message.content


def test_sampling_draws_and_truncation_reaches_sglang(stack: dict[str, Any]) -> None:
    router = clients(stack)[0]
    greedy = complete(router, temperature=0).choices[0].message.content
    drawn = {complete(router, temperature=1.5).choices[0].message.content for _ in range(3)}
    assert len(drawn) >= 2, drawn  # no seed: fresh randomness each time
    # Truncated to the most likely token, a hot sampler is greedy.
    assert complete(router, temperature=1.5, extra_body={"top_k": 1}).choices[
        0
    ].message.content == (greedy)
    assert complete(router, temperature=1.5, top_p=1e-6).choices[0].message.content == greedy
    two = complete(router, temperature=0, n=2)
    assert [c.message.content for c in two.choices] == [greedy, greedy]
    assert two.usage.completion_tokens == 20
    stop = greedy[4:7]
    stopped = complete(router, temperature=0, stop=stop).choices[0]
    assert (stopped.message.content, stopped.finish_reason) == (
        greedy[: greedy.index(stop)],
        "stop",
    )


def test_a_stop_string_stops_sglangs_generation_of_a_whole_answer(stack: dict[str, Any]) -> None:
    """Not streamed, a stop string still ends the engine's work at the match, long
    before max_tokens."""
    router = clients(stack)[0]
    greedy = complete(router, temperature=0).choices[0].message.content
    stop = next(greedy[i : i + 2] for i in range(2, len(greedy) - 1) if greedy[i : i + 2].strip())
    before = sample(stack["language"].metrics(), "deepstack_generated_tokens_total")
    stopped = complete(router, temperature=0, stop=stop, max_tokens=300).choices[0]
    assert (stopped.message.content, stopped.finish_reason) == (
        greedy[: greedy.index(stop)],
        "stop",
    )
    after = sample(stack["language"].metrics(), "deepstack_generated_tokens_total")
    assert after - before < 40


def test_follow_up_turns_reuse_sglangs_prefix_cache(stack: dict[str, Any]) -> None:
    """Four turns of one conversation, each resending its image: turns 2-4 find the earlier
    turns in SGLang's prefix cache (images included: SGLang keys them by our hash of the
    image's bytes), and every answer is SGLang's own server's."""
    image = png(64, 48, (120, 40, 200))
    messages: list[dict[str, Any]] = [chat([image])["messages"][0]]
    before = stack["encode"].metrics()
    earlier_prompt = 0  # tokens of the turn before's prompt
    for turn in range(4):
        body = {**chat([]), "messages": messages}
        ours = answer(stack["router"].url, body)
        theirs = answer(stack["single"], body)
        text = ours["choices"][0]["message"]["content"]
        assert text == theirs["choices"][0]["message"]["content"], turn
        cached = ours["usage"]["prompt_tokens_details"]["cached_tokens"]
        # The whole earlier prompt, its image tokens included, was found in the cache.
        assert cached >= earlier_prompt, (turn, cached, earlier_prompt)
        earlier_prompt = ours["usage"]["prompt_tokens"]
        messages = [*messages, {"role": "assistant", "content": text},
                    {"role": "user", "content": f"And then? {turn}"}]  # fmt: skip
    after = stack["encode"].metrics()
    misses = sample(after, "deepstack_embedding_cache_misses_total") - sample(
        before, "deepstack_embedding_cache_misses_total"
    )
    assert misses == 1  # the tower ran once for the four turns


def test_a_seed_sglang_would_ignore_is_refused_by_name(stack: dict[str, Any]) -> None:
    """SGLang honours seeds only with --enable-deterministic-inference, which needs a GPU
    attention backend: without it a seeded draw is refused, never answered unrepeatably."""
    router = clients(stack)[0]
    with pytest.raises(openai.BadRequestError) as refused:
        complete(router, temperature=1.0, seed=3)
    assert "--enable-deterministic-inference" in str(refused.value)
    greedy = complete(router, temperature=0, seed=3)  # greedy needs no seed
    assert greedy.choices[0].message.content


def scheduler_pids(pid: int) -> list[int]:
    """The SGLang scheduler processes under the language server (SGLang names its
    processes with setproctitle)."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            if b"scheduler" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
    return found


def test_engine_that_dies_mid_request(tmp_path: Path) -> None:
    """A scheduler killed while it generates: the stream ends with an error event that
    says why (a 503), the encode side's blocks are free, and the language server exits
    non-zero so that its pod restarts with a fresh engine (instead of SGLang killing it
    without a word)."""
    model = make_tiny_model(tmp_path / "model", seed=1)
    config_file = tmp_path / "config.json"
    config_file.write_text(sglang_config(model, **TRANSFER).to_json())
    with serving_stack(config_file, tmp_path, backend="sglang") as (encode, language, router):
        body = json.dumps(
            chat(CASES["one-image-resumes"], max_tokens=512, ignore_eos=True, stream=True)
        ).encode()
        request = urllib.request.Request(
            f"{router.url}/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        events: list[dict[str, Any]] = []
        with urllib.request.urlopen(request, timeout=120) as r:
            for line in r:
                if not line.startswith(b"data: {"):
                    continue
                events.append(json.loads(line[6:]))
                if len(events) == 3:  # tokens are coming: kill the engine mid-generation
                    victims = scheduler_pids(language.process.pid)
                    assert victims, "no SGLang scheduler process found"
                    for pid in victims:
                        os.kill(pid, signal.SIGKILL)
        error = events[-1]["error"]
        assert error["code"] == 503, events[-1]
        assert "SGLang engine stopped" in error["message"]
        assert language.process.wait(120) != 0
        assert "SGLang engine stopped" in language.logs()
        assert sample(encode.metrics(), "deepstack_buffer_blocks", state="used") == 0
        assert get(f"{encode.url}/health")[0] == 200
