"""The reference backend's language side run in-process exactly as the language server runs
it (ReferenceLanguageBackend.stream, servers/language.py), with the logits each token was
chosen from recorded on the way: the product's own numerics, to compare with transformers'
monolithic model. The shipped server exposes no logits; they are taken here, from outside,
at the one place every step passes (the backend's Sampler)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from unittest import mock

import torch

from deepstack_runtime.backends import reference
from deepstack_runtime.backends.reference import ReferenceLanguageBackend
from deepstack_runtime.buffers import MultimodalItem
from deepstack_runtime.sampling import SamplingParams, Step


@dataclass
class LanguageRun:
    steps: list[Step] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # [vocab] per step

    @property
    def tokens(self) -> list[int]:
        return [step.token for step in self.steps]


@contextmanager
def recording_logits(into: list[torch.Tensor]) -> Iterator[None]:
    """While open, every Sampler the reference backend makes appends the logits it is
    given (a copy, in float32) to `into` before it chooses."""

    class Recording(reference.Sampler):
        def step(self, logits: torch.Tensor) -> Step:
            into.append(logits.detach().float().clone())
            return super().step(logits)

    with mock.patch.object(reference, "Sampler", Recording):
        yield


def run_language_side(
    backend: ReferenceLanguageBackend,
    input_ids: list[int],
    item: MultimodalItem | None,
    image_grid_thw: torch.Tensor | None,
    params: SamplingParams,
) -> LanguageRun:
    """One choice through `backend.stream`, the call the language server makes per
    choice: its steps and the logits of each."""
    run = LanguageRun()

    async def collect() -> None:
        async for step in backend.stream(input_ids, item, image_grid_thw, params):
            run.steps.append(step)

    with recording_logits(run.logits):
        asyncio.run(collect())
    assert len(run.logits) == len(run.steps), "a step was chosen without the Sampler"
    return run
