"""The OpenAI request's parameters and each choice's answer (servers/chat.py), and the
sampling parameters' wire form (sampling.py): pure logic, table tests."""

from __future__ import annotations

import re
from typing import Any

import pytest

from deepstack_runtime.errors import InputError
from deepstack_runtime.sampling import SamplingParams
from deepstack_runtime.servers.chat import Choice, parse_chat_request
from deepstack_runtime.servers.common import BadRequest

EOS = 0


def decode(tokens: list[int]) -> str:
    """Token t is the letter chr(ord('a') + t - 1); EOS decodes to nothing."""
    return "".join(chr(ord("a") + t - 1) for t in tokens if t != EOS)


def feed(choice: Choice, tokens: list[int], streamed: list[str]) -> None:
    for token in tokens:
        choice.add({"token": token}, decode)
        streamed.append(choice.sendable())


@pytest.mark.parametrize(
    ("tokens", "stop", "text", "reason", "counted"),
    [
        ([1, 2, 3, 4], (), "abcd", "length", 4),
        ([1, 2, EOS], (), "ab", "stop", 3),
        ([1, 2, 3, 4, 5], ("cd",), "ab", "stop", 4),  # the stop string is not returned
        ([1, 2, 3, 4, 5], ("zz", "bc"), "a", "stop", 3),
        ([1, 2, 3, 4, 5], ("de", "bcd"), "a", "stop", 4),  # the earliest one wins
        ([3, 1, 3, 2], ("cb",), "ca", "stop", 4),  # "c" alone earlier is no match
    ],
)
def test_a_choice_ends_at_a_stop_string_or_eos(
    tokens: list[int], stop: tuple[str, ...], text: str, reason: str, counted: int
) -> None:
    choice = Choice(0, stop, EOS, ignore_eos=False)
    streamed: list[str] = []
    feed(choice, tokens, streamed)
    choice.end()
    streamed.append(choice.sendable())
    assert (choice.text, choice.finish_reason, len(choice.steps)) == (text, reason, counted)
    assert "".join(streamed) == text  # a stream never sends what a stop string takes back


def test_a_stream_holds_back_only_what_a_stop_string_could_take() -> None:
    choice = Choice(0, ("xyz",), EOS, ignore_eos=False)
    streamed: list[str] = []
    feed(choice, [1, 2, 3, 4], streamed)
    assert streamed == ["", "", "a", "b"]


def test_eos_is_a_token_like_any_other_when_ignored() -> None:
    choice = Choice(0, (), EOS, ignore_eos=True)
    feed(choice, [1, EOS, 2], [])
    choice.end()
    assert (choice.text, choice.finish_reason) == ("ab", "length")


def chat(**params: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], **params}


def test_openai_defaults() -> None:
    request = parse_chat_request(chat(), max_tokens_limit=512)
    assert request.sampling == SamplingParams(max_tokens=512, temperature=1.0)
    assert (request.n, request.stop, request.stream, request.include_usage) == (1, (), False, False)


def test_every_parameter_reaches_the_sampling() -> None:
    request = parse_chat_request(
        chat(max_completion_tokens=7, temperature=0.5, top_p=0.8, top_k=-1, seed=3, n=2,
             stop="x", presence_penalty=0.5, frequency_penalty=-0.5, logprobs=True,
             top_logprobs=2, ignore_eos=True, stream=True,
             stream_options={"include_usage": True}),
        max_tokens_limit=512,
    )  # fmt: skip
    assert request.sampling == SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.8, top_k=0, seed=3, presence_penalty=0.5,
        frequency_penalty=-0.5, ignore_eos=True, logprobs=True, top_logprobs=2,
    )  # fmt: skip
    assert (request.n, request.stop, request.include_usage) == (2, ("x",), True)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_tokens": 513}, "max_tokens must be an integer in [1, 512]"),
        ({"max_tokens": True}, "max_tokens must be an integer"),
        ({"temperature": float("inf")}, "temperature must be a number"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"seed": 2**63}, "seed must be in [0, 2^63)"),
        ({"n": 0}, "n must be an integer in [1, 8]"),
        ({"logprobs": "yes"}, "logprobs must be true or false"),
        ({"stop": [1]}, "stop must be a string or a list"),
        ({"stream": True, "stream_options": []}, "stream_options is an object"),
        ({"logit_bias": {"1": 5}}, "logit_bias is not supported"),
        ({"min_p": 0.1}, "unrecognized request argument: min_p"),
        ({"store": True}, "unrecognized request argument: store"),
    ],
)
def test_bad_parameters_are_named(params: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(message)):
        parse_chat_request(chat(**params), max_tokens_limit=512)


def test_the_wire_form_round_trips_and_is_strict() -> None:
    params = SamplingParams(max_tokens=3, temperature=0.7, seed=5, logprobs=True, top_logprobs=1)
    assert SamplingParams.from_wire(params.to_wire()) == params
    assert SamplingParams.from_wire(None) == SamplingParams()
    with pytest.raises(InputError, match="unknown field bogus"):
        SamplingParams.from_wire({"bogus": 1})
    with pytest.raises(InputError, match=r"sampling\.top_k must be of type int"):
        SamplingParams.from_wire({"top_k": 1.5})
    with pytest.raises(InputError, match=r"sampling\.ignore_eos must be of type bool"):
        SamplingParams.from_wire({"ignore_eos": 1})


def test_each_choice_has_its_own_seed() -> None:
    params = SamplingParams(temperature=1.0, seed=2**63 - 1)
    seeds = [params.for_choice(i).seed for i in range(3)]
    assert seeds == [2**63 - 1, 0, 1]
    assert SamplingParams(temperature=1.0).for_choice(2).seed is None
