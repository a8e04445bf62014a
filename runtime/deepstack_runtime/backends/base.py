"""What the language server needs of a language model, and which one a pod runs."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Protocol

import torch

from deepstack_runtime.buffers import MultimodalItem
from deepstack_runtime.config import RuntimeConfig
from deepstack_runtime.sampling import SamplingParams, Step


class LanguageBackend(Protocol):
    """A language model behind the language server."""

    image_token_id: int
    hidden_size: int
    num_deepstack: int
    merge_size: int  # visual tokens per image: t x h x w / merge_size**2
    vocab_size: int

    def stream(
        self,
        input_ids: list[int],
        item: MultimodalItem | None,
        image_grid_thw: torch.Tensor | None,
        params: SamplingParams,
        *,
        content: str | None = None,
    ) -> AsyncGenerator[Step, None]:
        """One choice's tokens as they come (the first step says how many prompt tokens
        the engine reused from its cache, where it has one); InputError for a prompt or
        parameters the model cannot take. `item` may be views of the receive pool: read
        it before the first token, never after (the rows go back to the pool then).
        `content` names the images' content (their bytes' hashes, servers/wire.py): an
        engine with a prefix cache keys the rows by it instead of hashing them."""
        ...


def language_backend(config: RuntimeConfig, extra_args: Sequence[str]) -> LanguageBackend:
    if config.backend == "sglang":
        from deepstack_runtime.backends.sglang import SGLangLanguageModel

        try:
            return SGLangLanguageModel(config, extra_args)
        except ValueError as e:  # extraArgs that set what the resource owns
            raise SystemExit(str(e)) from e
    if extra_args:
        raise SystemExit(
            f"the reference backend takes no extra arguments, got {' '.join(extra_args)}"
        )
    from deepstack_runtime.backends.reference import ReferenceLanguageBackend

    return ReferenceLanguageBackend(config.model.path)
