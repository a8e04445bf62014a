"""The OpenAI chat completions API, apart from HTTP: what a request asks for (checked,
with a reason naming the parameter), and each choice's answer as the language pod's steps
arrive (stop strings, finish reasons, log probabilities, the text a stream may send)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deepstack_runtime.errors import InputError
from deepstack_runtime.sampling import MAX_CHOICES, SamplingParams
from deepstack_runtime.servers.common import BadRequest

# The OpenAI API's default where it differs from the runtime's (greedy). Its other
# default, max_tokens "as many as the model takes", is the server's limit here.
DEFAULT_TEMPERATURE = 1.0
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 256

# OpenAI parameters this server does not implement: a request that sets one is refused
# with its name rather than answered as if it had not been sent.
UNSUPPORTED_PARAMETERS = (
    "audio",
    "function_call",
    "functions",
    "logit_bias",
    "modalities",
    "parallel_tool_calls",
    "prediction",
    "response_format",
    "tool_choice",
    "tools",
    "web_search_options",
)


# Every other parameter: one this server knows nothing of (an OpenAI addition, another
# server's extension such as min_p) is refused too, as the OpenAI API refuses an
# unrecognized argument. `user` only names the end user; it changes no answer.
KNOWN_PARAMETERS = frozenset(
    {
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
        "top_k", "seed", "stop", "n", "logprobs", "top_logprobs", "presence_penalty",
        "frequency_penalty", "stream", "stream_options", "ignore_eos", "user",
    }
)  # fmt: skip


@dataclass(frozen=True)
class ChatRequest:
    """What one chat completion asks for, apart from its messages."""

    sampling: SamplingParams
    n: int = 1
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a number")
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer")
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or not 1 <= len(stops) <= MAX_STOP_STRINGS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stops)
    ):
        raise BadRequest(
            f"stop must be a string or a list of 1 to {MAX_STOP_STRINGS} non-empty strings "
            f"of at most {MAX_STOP_LENGTH} characters"
        )
    return tuple(stops)


def parse_chat_request(body: dict[str, Any], max_tokens_limit: int) -> ChatRequest:
    """The request's parameters, or BadRequest naming the first one that is wrong or
    that this server cannot honour (types here, ranges in SamplingParams)."""
    for name in UNSUPPORTED_PARAMETERS:
        if body.get(name) is not None:
            raise BadRequest(f"{name} is not supported by this server")
    unknown = sorted(str(name) for name in body if name not in KNOWN_PARAMETERS)
    if unknown:
        raise BadRequest(f"unrecognized request argument: {unknown[0]}")
    max_tokens = _integer(body, "max_completion_tokens", None)
    max_tokens = _integer(body, "max_tokens", max_tokens)
    if max_tokens is None:
        max_tokens = max_tokens_limit
    if not 1 <= max_tokens <= max_tokens_limit:
        raise BadRequest(f"max_tokens must be an integer in [1, {max_tokens_limit}]")
    n = _integer(body, "n", 1)
    if n is None or not 1 <= n <= MAX_CHOICES:
        raise BadRequest(f"n must be an integer in [1, {MAX_CHOICES}]")
    top_k = _integer(body, "top_k", 0) or 0
    if top_k < -1:  # -1, as vLLM and SGLang take it: off
        raise BadRequest("top_k must be -1 or 0 (off) or a positive integer")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise BadRequest("stream_options is an object, and only for stream: true")
    include_usage = _flag(options or {}, "include_usage")
    try:
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", DEFAULT_TEMPERATURE),
            top_p=_number(body, "top_p", 1.0),
            top_k=max(top_k, 0),
            seed=_integer(body, "seed", None),
            presence_penalty=_number(body, "presence_penalty", 0.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0),
            ignore_eos=_flag(body, "ignore_eos"),  # as in vLLM and SGLang
            logprobs=_flag(body, "logprobs"),
            top_logprobs=_integer(body, "top_logprobs", 0) or 0,
        )
    except InputError as e:
        raise BadRequest(str(e)) from e
    return ChatRequest(sampling, n, _stop(body.get("stop")), stream, include_usage)


Decode = Callable[[list[int]], str]


@dataclass
class Choice:
    """One choice's answer, built from the language pod's steps as they arrive.

    A stop string ends the choice where it begins (the string itself is not returned);
    the tokens after it are not counted. A stream may send `text` only up to what a stop
    string arriving later could still take back."""

    index: int
    stop: tuple[str, ...]
    eos_token_id: int
    ignore_eos: bool
    steps: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    sent: int = 0  # characters of `text` a stream has sent
    logprobs_sent: int = 0  # steps whose log probabilities a stream has sent
    cached_tokens: int = 0  # prompt tokens the engine reused (said by the first step)

    def add(self, step: dict[str, Any], decode: Decode) -> None:
        if self.finish_reason is not None:
            return
        if not self.steps:
            self.cached_tokens = int(step.get("cached", 0))
        self.steps.append(step)
        text = decode([s["token"] for s in self.steps])
        cuts = [
            i for i in (text.find(s, max(0, len(self.text) - len(s))) for s in self.stop) if i >= 0
        ]
        if cuts:
            self.text, self.finish_reason = text[: min(cuts)], "stop"
            return
        self.text = text
        if step["token"] == self.eos_token_id and not self.ignore_eos:
            self.finish_reason = "stop"

    def end(self) -> None:
        """The language pod finished this choice: at EOS or at max_tokens."""
        if self.finish_reason is None:
            self.finish_reason = "length"

    def sendable(self) -> str:
        """Text a stream may send now, and marks it sent."""
        end = len(self.text)
        if self.finish_reason is None:
            # Held back: what a stop string may still take, and an unfinished character.
            end -= max((len(s) - 1 for s in self.stop), default=0)
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.sent:
            return ""
        chunk = self.text[self.sent : end]
        self.sent = end
        return chunk

    def logprobs(self, decode: Decode, *, unsent_only: bool = False) -> dict[str, Any] | None:
        """OpenAI's `logprobs` object for the steps counted (a stream: those not yet
        sent), or None when the request did not ask for them."""
        if not self.steps or "logprob" not in self.steps[0]:
            return None
        start = self.logprobs_sent if unsent_only else 0
        self.logprobs_sent = len(self.steps)
        return {"content": [_logprob_entry(s, decode) for s in self.steps[start:]]}

    def message(self, decode: Decode) -> dict[str, Any]:
        return {
            "index": self.index,
            "message": {"role": "assistant", "content": self.text},
            "logprobs": self.logprobs(decode),
            "finish_reason": self.finish_reason,
        }


def _token(token: int, logprob: float, decode: Decode) -> dict[str, Any]:
    text = decode([token])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def _logprob_entry(step: dict[str, Any], decode: Decode) -> dict[str, Any]:
    entry = _token(step["token"], step["logprob"], decode)
    entry["top_logprobs"] = [_token(t, lp, decode) for t, lp in step.get("top", [])]
    return entry


def usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, Any]:
    """OpenAI's usage: the prompt's tokens counted once, of which the cached ones are
    those the engine reused for the first choice (0 where nothing was reused)."""
    completion = sum(len(c.steps) for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": choices[0].cached_tokens if choices else 0},
    }
