"""The `reference` backend: the transformers implementation of Qwen3-VL-MoE, split in two.

  encode    ReferenceEncoder: the vision tower -> merged embeddings + K DeepStack features
  language  ReferenceLanguageModel: token embeddings with the visual rows put in, M-RoPE
            positions, DeepStack added after decoder layers 0..K-1, Sampler;
            ReferenceLanguageBackend, the language server's backend around it

Split this way it reproduces the monolithic model exactly (see the fidelity tests).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from deepstack_runtime.buffers import MultimodalItem, copy_item, settle
from deepstack_runtime.errors import InputError
from deepstack_runtime.sampling import SamplingParams, Step


def load_model(model_dir: str | Path) -> Any:
    from transformers import Qwen3VLMoeForConditionalGeneration

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (config.json missing)")
    model: Any = Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def load_vision_tower(model_dir: str | Path, device: str, dtype: torch.dtype) -> Any:
    """Only the vision tower of a checkpoint (its `model.visual.*` weights): an encode pod
    never holds the language model's weights."""
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (config.json missing)")
    config = AutoConfig.from_pretrained(path)
    # The attention implementation picked as for the whole model (from_pretrained).
    visual: Any = Qwen3VLMoeVisionModel._from_config(  # type: ignore[no-untyped-call]
        config.vision_config, dtype=dtype
    )
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safetensors handle is not a dict
                for prefix in ("model.visual.", "visual."):
                    if key.startswith(prefix):
                        state[key[len(prefix) :]] = f.get_tensor(key)
    visual.load_state_dict(state, strict=True)
    return visual.to(device).eval()


class _OutputInPlace(torch.nn.Module):
    """A merger's last linear layer that can write its rows straight into given memory
    (row-strided views of a transfer pool: `torch.addmm` writes strided rows directly)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.target: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.target is None:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        if self.bias is None:
            return torch.mm(x, self.weight.t(), out=self.target)
        return torch.addmm(self.bias, x, self.weight.t(), out=self.target)


class ReferenceEncoder:
    """The transformers vision tower of Qwen3-VL-MoE, on `device` in `dtype`."""

    def __init__(
        self, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        self.visual = load_vision_tower(model_dir, device, dtype)
        self.device, self.dtype = device, dtype
        self.image_token_id = int(config.image_token_id)
        self.merge = int(config.vision_config.spatial_merge_size)
        self.hidden_size = int(config.text_config.hidden_size)
        self.num_deepstack = len(config.vision_config.deepstack_visual_indexes)
        # The last layers of the main merger and of the K DeepStack mergers, in that order.
        self._outputs = []
        for merger in [self.visual.merger, *self.visual.deepstack_merger_list]:
            merger.linear_fc2 = _OutputInPlace(merger.linear_fc2)
            self._outputs.append(merger.linear_fc2)

    def num_tokens(self, image_grid_thw: torch.Tensor) -> int:
        """Visual tokens the tower makes of these images; ValueError for a grid it cannot
        merge."""
        if bool((image_grid_thw[:, 1:] % self.merge).any()):
            raise ValueError(
                f"image_grid_thw heights and widths must be multiples of the merge size "
                f"{self.merge}"
            )
        return int(image_grid_thw.prod(dim=1).sum()) // self.merge**2

    def writes_in_place(self, out: MultimodalItem) -> bool:
        """Whether `encode` can put its rows straight into `out` (same dtype and device:
        a GPU computing in the pool's dtype), with no copy."""
        rows = out.embeddings
        return rows.dtype == self.dtype and rows.device == torch.empty(0, device=self.device).device

    @torch.no_grad()
    def encode(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        out: MultimodalItem | None = None,
    ) -> MultimodalItem:
        """The item of these images: written into `out` (for example views of the
        encoder's transfer pool) when given, else into new tensors. With
        `writes_in_place(out)` the mergers' last layers write their rows there directly;
        otherwise the rows are cast and copied into it."""
        positions = torch.cat(
            [self.grid_positions(int(t), int(h), int(w)) for t, h, w in image_grid_thw.tolist()]
        )
        if out is not None and out.num_tokens != self.num_tokens(image_grid_thw):
            raise ValueError(f"out holds {out.num_tokens} tokens, not the images' tokens")
        in_place = out is not None and self.writes_in_place(out)
        if in_place:
            assert out is not None
            features = () if out.deepstack is None else out.deepstack.unbind(dim=1)
            targets = [out.embeddings, *features]
            for layer, target in zip(self._outputs, targets, strict=True):
                layer.target = target
        try:
            result = self.visual(
                pixel_values.to(self.device, self.dtype), grid_thw=image_grid_thw.to(self.device)
            )
        finally:
            for layer in self._outputs:
                layer.target = None
        if in_place:
            assert out is not None
            out.fill_ids.fill_(self.image_token_id)
            out.positions.copy_(positions)
            settle(out.embeddings)
            return out
        embeddings = result.pooler_output.contiguous()
        deepstack = torch.stack(list(result.deepstack_features), dim=1).contiguous()
        fill = torch.full((embeddings.shape[0],), self.image_token_id, dtype=torch.int64)
        item = MultimodalItem(embeddings, deepstack, fill, positions)
        if out is None:
            return item
        copy_item(item, out)
        settle(out.embeddings)
        return out

    def grid_positions(self, t: int, h: int, w: int) -> torch.Tensor:
        """(t, h, w) of every merged visual token of one image, in sequence order."""
        gt, gh, gw = torch.meshgrid(
            torch.arange(t),
            torch.arange(h // self.merge),
            torch.arange(w // self.merge),
            indexing="ij",
        )
        return torch.stack([gt.flatten(), gh.flatten(), gw.flatten()], dim=1).to(torch.int64)


class ReferenceLanguageModel:
    def __init__(self, model_dir: str | Path) -> None:
        self.model = load_model(model_dir)
        self.model.model.visual = None  # the encode side has it; free the memory
        self.image_token_id = int(self.model.config.image_token_id)
        self.eos_token_id = int(self.model.config.text_config.eos_token_id)

    def _prefill(
        self,
        input_ids: torch.Tensor,
        item: MultimodalItem | None,
        image_grid_thw: torch.Tensor | None,
        *,
        use_cache: bool,
    ) -> tuple[torch.Tensor, Any, int]:
        """One forward over the prompt: (logits [L, vocab], the KV cache, the M-RoPE
        position of the next token)."""
        ids = input_ids.unsqueeze(0)
        inner = self.model.model
        embeds = inner.get_input_embeddings()(ids)
        mask = ids == self.image_token_id
        visual = int(mask.sum())
        kwargs: dict[str, Any] = {}
        if visual:
            if item is None or item.num_tokens != visual:
                got = 0 if item is None else item.num_tokens
                raise InputError(
                    f"the prompt has {visual} image tokens but {got} embeddings arrived"
                )
            embeds = embeds.masked_scatter(
                mask.unsqueeze(-1).expand_as(embeds), item.embeddings.to(embeds.dtype)
            )
            if item.deepstack is not None:
                kwargs["visual_pos_masks"] = mask
                kwargs["deepstack_visual_embeds"] = [
                    item.deepstack[:, i].to(embeds.dtype) for i in range(item.deepstack.shape[1])
                ]
        position_ids = inner.compute_3d_position_ids(
            input_ids=ids,
            inputs_embeds=embeds,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mask.long(),
        )
        if position_ids is None:  # text only: plain positions on all three axes
            position_ids = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
        hidden = inner.language_model(
            inputs_embeds=embeds, position_ids=position_ids, use_cache=use_cache, **kwargs
        )
        logits: torch.Tensor = self.model.lm_head(hidden.last_hidden_state)[0]
        # Text after the prompt continues from the largest position, on all three axes.
        return logits, _cache_of(hidden), int(position_ids.max()) + 1

    def generate(
        self,
        input_ids: torch.Tensor,
        item: MultimodalItem | None,
        image_grid_thw: torch.Tensor | None,
        params: SamplingParams,
    ) -> list[int]:
        return [step.token for step in self.generate_iter(input_ids, item, image_grid_thw, params)]

    def generate_iter(
        self,
        input_ids: torch.Tensor,
        item: MultimodalItem | None,
        image_grid_thw: torch.Tensor | None,
        params: SamplingParams,
    ) -> Iterator[Step]:
        """Decoding with a KV cache, one token at a time: the prompt once (visual rows
        and DeepStack included), then one step per token, each chosen by `params`."""
        sampler = Sampler(params, int(self.model.config.text_config.vocab_size))
        with torch.no_grad():
            logits, cache, position = self._prefill(input_ids, item, image_grid_thw, use_cache=True)
            step = sampler.step(logits[-1])
        yield step
        inner = self.model.model
        for _ in range(params.max_tokens - 1):
            if step.token == self.eos_token_id and not params.ignore_eos:
                return
            with torch.no_grad():
                embeds = inner.get_input_embeddings()(torch.tensor([[step.token]]))
                positions = torch.full((3, 1, 1), position, dtype=torch.int64)
                hidden = inner.language_model(
                    inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True
                )
                cache = _cache_of(hidden)
                step = sampler.step(self.model.lm_head(hidden.last_hidden_state)[0, -1])
            position += 1
            yield step


def _cache_of(output: Any) -> Any:
    """The KV cache of a model output (its attribute was renamed across transformers 5.x)."""
    for name in ("cache", "past_key_values"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    return None


class ReferenceLanguageBackend:
    """The transformers text model; one request at a time (it has no batching)."""

    def __init__(self, model_dir: str) -> None:
        self.model = ReferenceLanguageModel(model_dir)
        self.image_token_id = self.model.image_token_id
        text_config = self.model.model.config.text_config
        self.hidden_size = int(text_config.hidden_size)
        vision_config = self.model.model.config.vision_config
        self.num_deepstack = len(vision_config.deepstack_visual_indexes)
        self.merge_size = int(vision_config.spatial_merge_size)
        self.vocab_size = int(text_config.vocab_size)
        self._lock = asyncio.Lock()

    async def stream(
        self,
        input_ids: list[int],
        item: MultimodalItem | None,
        image_grid_thw: torch.Tensor | None,
        params: SamplingParams,
        *,
        content: str | None = None,  # no prefix cache here: nothing is reused
    ) -> AsyncGenerator[Step, None]:
        if item is not None:
            item.embeddings = item.embeddings.float()
            if item.deepstack is not None:
                item.deepstack = item.deepstack.float()
        ids = torch.tensor(input_ids, dtype=torch.int64)
        async with self._lock:
            steps = self.model.generate_iter(ids, item, image_grid_thw, params)
            while (step := await asyncio.to_thread(next, steps, None)) is not None:
                yield step


class Sampler:
    """The reference backend's choice of each next token for one sequence (it keeps the
    counts the penalties need and the seeded generator)."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        self.params = params
        self._counts = torch.zeros(vocab_size)
        self._generator = torch.Generator().manual_seed(params.drawn_seed())
        self._warpers = [
            *([TopKLogitsWarper(params.top_k)] if params.top_k else []),
            *([TopPLogitsWarper(params.top_p)] if params.top_p < 1.0 else []),
        ]

    def step(self, logits: torch.Tensor) -> Step:
        """The next token from the model's logits [vocab] for this position."""
        scores = logits.float()
        if self.params.penalised:
            scores = (
                scores
                - self.params.frequency_penalty * self._counts
                - self.params.presence_penalty * (self._counts > 0).float()
            )
        if self.params.greedy:
            token = int(scores.argmax())
        else:
            warped = (scores / self.params.temperature).unsqueeze(0)
            for warper in self._warpers:
                warped = warper(torch.empty(1, 0, dtype=torch.long), warped)
            probs = torch.softmax(warped, dim=-1)[0]
            token = int(torch.multinomial(probs, 1, generator=self._generator))
        self._counts[token] += 1
        if not self.params.logprobs:
            return Step(token)
        logprobs = torch.log_softmax(scores, dim=-1)
        top: tuple[tuple[int, float], ...] = ()
        if self.params.top_logprobs:
            values, ids = logprobs.topk(self.params.top_logprobs)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        return Step(token, float(logprobs[token]), top)
