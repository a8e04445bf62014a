"""Sampling through the router on the reference backend, with the official `openai` client:
each parameter against transformers' own sampler or an independent greedy loop over the
undivided model, and streaming with usage."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
import torch
from transformers import Qwen3VLMoeForConditionalGeneration

from devkit.oracles import ReferencePreprocessor
from devkit.runtime import (
    data_url,
    png,
    tiny_stack,
)

NAME = "tiny-qwen3-vl-moe"
PROMPT = "Tell me a story about a green field."
MESSAGES: list[Any] = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with tiny_stack(tmp_path_factory.mktemp("sampling")) as servers:
        router = servers["router"].url
        client = openai.OpenAI(base_url=f"{router}/v1", api_key="-", max_retries=0)
        yield {**servers, "client": client}


@pytest.fixture(scope="module")
def oracle(stack: dict[str, Any]) -> dict[str, Any]:
    """The undivided transformers model and the prompt's token ids."""
    model: Any = Qwen3VLMoeForConditionalGeneration.from_pretrained(
        stack["model"], dtype=torch.float32
    )
    model.eval()
    pre = ReferencePreprocessor(stack["model"])
    ids = pre.prepare(MESSAGES, []).input_ids.unsqueeze(0)
    return {"model": model, "ids": ids, "pre": pre}


def complete(stack: dict[str, Any], **params: Any) -> Any:
    extra = params.pop("extra_body", {})
    return stack["client"].chat.completions.create(
        model=NAME, messages=MESSAGES, extra_body=extra, **params
    )


def texts(reply: Any) -> list[str]:
    return [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)]


def test_seeded_sampling_is_transformers_sampling(
    stack: dict[str, Any], oracle: dict[str, Any]
) -> None:
    """Temperature, top-k and top-p with a seed draw exactly the tokens transformers'
    `generate(do_sample=True)` draws from the same seed."""
    params = {"temperature": 1.3, "top_p": 0.9, "top_k": 20}
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = oracle["model"].generate(
                input_ids=oracle["ids"], do_sample=True, max_new_tokens=10, **params
            )
        want = oracle["pre"].decode(out[0, oracle["ids"].shape[1] :].tolist())
        reply = complete(
            stack,
            max_tokens=10,
            seed=seed,
            temperature=params["temperature"],
            top_p=params["top_p"],
            extra_body={"top_k": params["top_k"], "ignore_eos": True},
        )
        assert texts(reply) == [want]


def test_the_same_seed_repeats_and_other_seeds_differ(stack: dict[str, Any]) -> None:
    def sample(seed: int | None) -> str:
        reply = complete(
            stack, max_tokens=12, temperature=1.5, seed=seed, extra_body={"ignore_eos": True}
        )
        return str(texts(reply)[0])

    first = sample(7)
    assert sample(7) == first
    seeded = {sample(seed) for seed in range(5)}
    assert len(seeded) >= 4, seeded
    unseeded = {sample(None) for _ in range(3)}
    assert len(unseeded) >= 2, unseeded  # no seed: fresh randomness each time


def test_n_choices_are_distinct_and_each_repeatable(stack: dict[str, Any]) -> None:
    def choices() -> list[str]:
        reply = complete(
            stack, n=3, max_tokens=10, temperature=1.5, seed=11, extra_body={"ignore_eos": True}
        )
        assert [c.index for c in reply.choices] == [0, 1, 2]
        assert reply.usage.completion_tokens == 30
        return texts(reply)

    first = choices()
    assert len(set(first)) == 3, first
    assert choices() == first
    greedy = complete(stack, n=2, max_tokens=8, temperature=0)
    assert texts(greedy)[0] == texts(greedy)[1]


def greedy_loop(oracle: dict[str, Any], steps: int, frequency: float, presence: float) -> str:
    """Greedy decoding with OpenAI's penalties, one full forward of the undivided model
    per token: an implementation independent of the runtime's."""
    ids = oracle["ids"]
    counts = torch.zeros(oracle["model"].config.text_config.vocab_size)
    tokens: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = oracle["model"](input_ids=ids).logits[0, -1]
        logits = logits - frequency * counts - presence * (counts > 0).float()
        token = int(logits.argmax())
        tokens.append(token)
        counts[token] += 1
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return str(oracle["pre"].decode(tokens))


@pytest.mark.parametrize(("frequency", "presence"), [(0.0, 0.0), (1.5, 0.0), (0.0, 1.5)])
def test_penalties_are_openai_penalties(
    stack: dict[str, Any], oracle: dict[str, Any], frequency: float, presence: float
) -> None:
    reply = complete(
        stack,
        max_tokens=12,
        temperature=0,
        frequency_penalty=frequency,
        presence_penalty=presence,
        extra_body={"ignore_eos": True},
    )
    assert texts(reply) == [greedy_loop(oracle, 12, frequency, presence)]


def test_penalties_change_a_repetitive_answer(stack: dict[str, Any]) -> None:
    """The penalty tests above would pass with penalties ignored if greedy never repeated
    a token: it does here, and the penalised answer differs."""
    plain = complete(stack, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    penalised = complete(
        stack, max_tokens=12, temperature=0, frequency_penalty=2.0, extra_body={"ignore_eos": True}
    )
    assert texts(plain) != texts(penalised)


def test_logprobs_are_the_models(stack: dict[str, Any], oracle: dict[str, Any]) -> None:
    reply = complete(stack, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    with torch.no_grad():
        want = torch.log_softmax(oracle["model"](input_ids=oracle["ids"]).logits[0, -1], dim=-1)
    values, ids = want.topk(3)
    first = content[0]
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
    assert [t.token for t in first.top_logprobs] == [oracle["pre"].decode([i]) for i in ids]
    for entry in content:  # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.token == entry.top_logprobs[0].token
        assert bytes(entry.bytes) == entry.token.encode()
    assert complete(stack, max_tokens=2).choices[0].logprobs is None


def test_stop_strings_end_the_answer_before_them(stack: dict[str, Any]) -> None:
    full = texts(complete(stack, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}))[0]
    assert len(full) > 8, full
    stop = full[5:8]
    cut = full.index(stop)
    reply = complete(
        stack,
        max_tokens=16,
        temperature=0,
        stop=["never-said", stop],
        extra_body={"ignore_eos": True},
    )
    assert texts(reply) == [full[:cut]]
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 16
    chunks = list(
        stack["client"].chat.completions.create(
            model=NAME, messages=MESSAGES, max_tokens=16, temperature=0, stop=stop, stream=True,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full[:cut]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_max_completion_tokens_and_finish_reason_length(stack: dict[str, Any]) -> None:
    reply = complete(stack, max_completion_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 5
    assert reply.choices[0].finish_reason == "length"


def test_streaming_with_usage_and_choices(stack: dict[str, Any]) -> None:
    image = {"type": "image_url", "image_url": {"url": data_url(png(64, 48, (10, 200, 30)))}}
    messages: list[Any] = [{"role": "user", "content": [image, {"type": "text", "text": "Hi"}]}]
    whole = stack["client"].chat.completions.create(
        model=NAME, messages=messages, max_tokens=8, temperature=0, n=2
    )
    chunks = list(
        stack["client"].chat.completions.create(
            model=NAME, messages=messages, max_tokens=8, temperature=0, n=2, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    streamed = ["", ""]
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts(whole)
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    plain = list(
        stack["client"].chat.completions.create(
            model=NAME, messages=MESSAGES, max_tokens=3, stream=True
        )
    )
    assert all(chunk.usage is None for chunk in plain)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": 2.5}, "temperature must be in [0, 2]"),
        ({"n": 9}, "n must be an integer in [1, 8]"),
        ({"logprobs": True, "top_logprobs": 25}, "top_logprobs must be in [0, 20]"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools is not supported"),
        ({"response_format": {"type": "json_object"}}, "response_format is not supported"),
    ],
)
def test_what_cannot_be_honoured_is_a_bad_request(
    stack: dict[str, Any], params: dict[str, Any], message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        complete(stack, max_tokens=2, **params)
    assert message in str(refused.value)
