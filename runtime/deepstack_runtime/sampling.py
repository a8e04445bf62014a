"""How the next token is chosen: the parameters one choice is generated with (the same on
every backend) and their wire form between the router and a language pod (the reference
backend's sampler, which needs torch, is backends/reference.py's Sampler).

The order is the one SGLang and vLLM use: presence and frequency penalties on the logits,
then temperature, then top-k, then top-p. Temperature 0 is greedy. A seed makes a
choice's tokens repeatable; without one every request draws fresh randomness. Log
probabilities are those of the penalised logits before temperature and truncation: what
the model says of the token, not how it was drawn.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, replace
from typing import Any

from deepstack_runtime.errors import InputError

# The most alternatives a token's log probabilities may list (OpenAI's own limit).
MAX_TOP_LOGPROBS = 20
# The most choices one request may ask for (`n`): each costs a whole generation.
MAX_CHOICES = 8
SEED_BITS = 63


@dataclass(frozen=True)
class SamplingParams:
    """One choice's sampling. The defaults are greedy: the runtime's own; the router
    applies the OpenAI API's defaults (temperature 1) before it sends a request."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        checks = (
            (self.max_tokens >= 1, "max_tokens must be at least 1"),
            (0.0 <= self.temperature <= 2.0, "temperature must be in [0, 2]"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be 0 (off) or positive"),
            (
                self.seed is None or 0 <= self.seed < 2**SEED_BITS,
                f"seed must be in [0, 2^{SEED_BITS})",
            ),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (
                0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]",
            ),
            (self.logprobs or not self.top_logprobs, "top_logprobs needs logprobs: true"),
        )
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    def for_choice(self, index: int) -> SamplingParams:
        """Choice `index` of a request for several: its own seed, so that the choices
        differ and each is still repeatable."""
        if self.seed is None or index == 0:
            return self
        return replace(self, seed=(self.seed + index) % 2**SEED_BITS)

    def drawn_seed(self) -> int:
        """The seed to sample with: the request's, or a fresh one."""
        return self.seed if self.seed is not None else secrets.randbits(SEED_BITS)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, value: Any) -> SamplingParams:
        """InputError for anything but an object of known fields of the right types."""
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise InputError("sampling must be an object")
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"sampling: unknown field {unknown[0]}")
        converted: dict[str, Any] = {}
        for name, given in value.items():
            if name == "seed" and given is None:
                continue
            kind = _WIRE_TYPES[name]
            is_number = isinstance(given, int | float) and not isinstance(given, bool)
            if kind is bool:
                ok = isinstance(given, bool)
            elif kind is int:
                ok = is_number and isinstance(given, int)
            else:
                ok = is_number
            if not ok:
                raise InputError(f"sampling.{name} must be of type {kind.__name__}")
            converted[name] = kind(given)
        return cls(**converted)


_WIRE_TYPES: dict[str, type] = {
    "max_tokens": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "seed": int,
    "presence_penalty": float,
    "frequency_penalty": float,
    "ignore_eos": bool,
    "logprobs": bool,
    "top_logprobs": int,
}


@dataclass(frozen=True)
class Step:
    """One generated token, with its log probability and the most likely alternatives
    (token id, log probability) when they were asked for."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()
    # On a choice's first step: prompt tokens the engine reused from its prefix cache.
    cached: int | None = None

    def to_wire(self, index: int) -> dict[str, Any]:
        line: dict[str, Any] = {"index": index, "token": self.token}
        if self.logprob is not None:
            line["logprob"] = self.logprob
            line["top"] = [list(pair) for pair in self.top]
        if self.cached is not None:
            line["cached"] = self.cached
        return line
