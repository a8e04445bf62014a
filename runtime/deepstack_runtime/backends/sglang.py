"""The `sglang` backend, language side: SGLang's in-process engine (`sglang.Engine`) fed
the embeddings and DeepStack rows that arrived in this pod's Mooncake buffers, as one
precomputed multimodal embedding per request.

SGLang's Qwen3-VL models take a fused row per visual token, `[embedding | DeepStack 0 |
... | DeepStack K-1]` (hidden x (1 + K)), split it themselves and add feature i after
decoder layer i; chunked prefill slices whole rows, so every chunk keeps its own
DeepStack rows. SGLang computes the M-RoPE positions from the prompt and the image grid.

SGLang is imported only when an engine starts: the rest of the runtime, and the tests
that do not run SGLang, never need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import uuid
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import torch

from deepstack_runtime.buffers import MultimodalItem
from deepstack_runtime.config import RuntimeConfig
from deepstack_runtime.errors import EngineFailure, InputError
from deepstack_runtime.sampling import SamplingParams, Step

log = logging.getLogger(__name__)

# Server arguments that the resource decides, or that would change what the runtime reads
# back from the engine; extraArgs may not set them (nothing the API accepted may be
# silently overridden). The CRD's CEL rule refuses the same list.
OWNED_ARGUMENTS = {
    "--model-path": "model.path",
    "--model": "model.path",
    "--tp-size": "language.tensorParallelSize",
    "--tensor-parallel-size": "language.tensorParallelSize",
    "--served-model-name": "model.servedModelName",
    "--host": "the pod",
    "--port": "the pod",
    "--config": "the resource (a file could set any of these)",
    "--skip-tokenizer-init": "the runtime",
    "--incremental-streaming-output": "the runtime",
}


def check_extra_args(extra_args: Sequence[str]) -> None:
    for arg in extra_args:
        flag = arg.split("=", 1)[0]
        if flag in OWNED_ARGUMENTS:
            raise ValueError(
                f"language.extraArgs may not set {flag}: it comes from {OWNED_ARGUMENTS[flag]}"
            )


def server_argv(config: RuntimeConfig, extra_args: Sequence[str]) -> list[str]:
    """SGLang's command line for this language pod (pure): the resource's settings, then
    the user's extraArgs."""
    check_extra_args(extra_args)
    return [
        "--model-path", config.model.path,
        "--served-model-name", config.model.served_model_name,
        "--tp-size", str(config.language_tensor_parallel_size),
        *extra_args,
    ]  # fmt: skip


def check_parsed(config: RuntimeConfig, parsed: Any) -> None:
    """What SGLang parsed must still be what the resource says (argparse also takes
    abbreviations of the flags above, such as --tp-s)."""
    wanted = {
        "model_path": config.model.path,
        "served_model_name": config.model.served_model_name,
        "tp_size": config.language_tensor_parallel_size,
        "skip_tokenizer_init": False,
        "incremental_streaming_output": False,
    }
    for name, value in wanted.items():
        if getattr(parsed, name, value) != value:
            raise ValueError(
                f"language.extraArgs changed SGLang's {name} to {getattr(parsed, name)!r}; "
                f"the resource sets {value!r}"
            )


def fused_rows(item: MultimodalItem) -> torch.Tensor:
    """[T, hidden * (1 + K)]: each token's embedding followed by its K DeepStack rows."""
    rows = [item.embeddings]
    if item.deepstack is not None:
        rows.append(item.deepstack.reshape(item.num_tokens, -1))
    return torch.cat(rows, dim=1)


class SGLangLanguageModel:
    """One `sglang.Engine` per pod; requests stream tokens from it.

    When one of the engine's processes dies, SGLang's own handling kills this whole
    process at once and every request in flight is cut off without a word. Instead, the
    requests in flight fail with a reason, the server drains and exits non-zero, and the
    pod restarts with a fresh engine (`failure` says why)."""

    def __init__(self, config: RuntimeConfig, extra_args: Sequence[str]) -> None:
        from sglang.srt.entrypoints.engine import Engine
        from sglang.srt.server_args import prepare_server_args

        # Log probabilities of the model's own distribution (before temperature and
        # truncation), as the reference backend reports them; read by SGLang's
        # scheduler process, which starts below and inherits it.
        os.environ["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"
        argv = server_argv(config, extra_args)
        server_args = prepare_server_args(argv)
        check_parsed(config, server_args)
        log.info("starting the SGLang engine: %s", " ".join(argv))
        self._engine: Any = Engine(server_args=server_args)
        hf_config = self._engine.tokenizer_manager.model_config.hf_config
        self.image_token_id = int(hf_config.image_token_id)
        text_config = getattr(hf_config, "text_config", hf_config)
        self.hidden_size = int(text_config.hidden_size)
        vision = getattr(hf_config, "vision_config", None)
        self.num_deepstack = len(getattr(vision, "deepstack_visual_indexes", None) or [])
        self.merge_size = int(getattr(vision, "spatial_merge_size", 1))
        self.vocab_size = int(text_config.vocab_size)
        self.seeded = bool(getattr(server_args, "enable_deterministic_inference", False))

        self.failure = ""
        self._stopped: asyncio.Future[None] | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run SGLang's result loop on `loop` from now on. Call before the server installs
        its SIGTERM handler: SGLang installs its own on first use, which would replace it."""
        self._engine.tokenizer_manager.auto_create_handle_loop()
        self._stopped = loop.create_future()
        # SGLang's children and watchdog signal a failure with SIGQUIT.
        loop.add_signal_handler(signal.SIGQUIT, self._engine_died)

    def _engine_died(self) -> None:
        if self.failure:
            return
        self.failure = "the SGLang engine stopped: one of its processes exited"
        log.error("%s; failing the requests in flight and shutting down", self.failure)
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)
        os.kill(os.getpid(), signal.SIGTERM)  # drain, stop, exit non-zero (see cli)

    async def stream(
        self,
        input_ids: list[int],
        item: MultimodalItem | None,
        image_grid_thw: torch.Tensor | None,
        params: SamplingParams,
        *,
        content: str | None = None,
    ) -> AsyncGenerator[Step, None]:
        """One choice's tokens, one at a time, as SGLang produces them, sampled by
        SGLang's own sampler. Closing the iterator early aborts the request inside SGLang.
        The first step says how many prompt tokens SGLang's prefix cache held."""
        sampling = self.sampling_params(params)
        image_data = None
        if item is not None:
            if image_grid_thw is None:
                raise EngineFailure("image rows arrived without an image grid")
            # A processor output that carries `precomputed_embeddings`: SGLang 0.5.23
            # puts a "precomputed_embedding" item's tensor where pixel values go and runs
            # its vision tower on it (nothing reads that format back).
            rows: dict[str, Any] = {
                "format": "processor_output",
                "modality": "IMAGE",
                "precomputed_embeddings": fused_rows(item),
                "image_grid_thw": image_grid_thw,
            }
            if content is not None:
                # SGLang keys its prefix cache on the item's hash (the image tokens'
                # pad values): our hash of the images' bytes, instead of SGLang's own
                # hash of the rows, which would read every row of every request.
                rows["hash"] = content_hash_value(content)
            image_data = [rows]
        if self.failure:
            raise EngineFailure(self.failure)
        assert self._stopped is not None, "attach() the engine to the event loop first"
        rid = uuid.uuid4().hex
        sent = 0
        finished = False
        chunks: Any = None
        step: asyncio.Future[Any] | None = None
        try:
            chunks = await self._engine.async_generate(
                input_ids=input_ids,
                image_data=image_data,
                sampling_params=sampling,
                return_logprob=params.logprobs,
                top_logprobs_num=params.top_logprobs,
                stream=True,
                rid=rid,
            )
            iterator = chunks.__aiter__()
            while True:
                step = asyncio.ensure_future(iterator.__anext__())
                await asyncio.wait({step, self._stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    raise EngineFailure(self.failure)
                try:
                    chunk = step.result()
                except StopAsyncIteration:
                    break
                # Copies: SGLang may append to its lists while we yield.
                new = list(chunk.get("output_ids") or [])[sent:]
                meta = chunk.get("meta_info") or {}
                logprobs = list(meta.get("output_token_logprobs") or [])[sent:]
                tops = list(meta.get("output_top_logprobs") or [])[sent:]
                for i, token in enumerate(new):
                    step_out = _step(int(token), params, logprobs[i : i + 1], tops[i : i + 1])
                    if sent + i == 0:
                        cached = int(meta.get("cached_tokens") or 0)
                        step_out = dataclasses.replace(step_out, cached=cached)
                    yield step_out
                sent += len(new)
                reason = meta.get("finish_reason") or {}
                if reason.get("type") == "abort":
                    message = f"SGLang aborted the request: {reason.get('message')}"
                    if reason.get("status_code") == 400:
                        raise InputError(message)
                    raise EngineFailure(message)
            finished = True
        except ValueError as e:  # SGLang's own validation (a prompt too long, ...)
            raise InputError(f"SGLang refused the request: {e}") from e
        finally:
            if step is not None and not step.done():
                step.cancel()
            if not finished and not self.failure:
                self._engine.tokenizer_manager.abort_request(rid)
            if chunks is not None and hasattr(chunks, "aclose"):
                with contextlib.suppress(Exception):  # it may be closed or mid-step
                    await chunks.aclose()

    def sampling_params(self, params: SamplingParams) -> dict[str, Any]:
        """SGLang's sampling parameters for `params`. SGLang honours a seed only with
        --enable-deterministic-inference (which needs a GPU attention backend); without
        it a seeded request is refused rather than answered unrepeatably."""
        sampling: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k or -1,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "ignore_eos": params.ignore_eos,
        }
        if self.seeded:
            sampling["sampling_seed"] = params.drawn_seed()
        elif params.seed is not None and not params.greedy:
            raise InputError(
                "seed: this deployment's SGLang engine samples without seeds; add "
                "--enable-deterministic-inference to language.extraArgs to honour them"
            )
        return sampling

    async def stop(self) -> None:
        await asyncio.to_thread(self._engine.shutdown)


def content_hash_value(content: str) -> int:
    """The 64-bit item hash SGLang takes, from our hex content hash."""
    return int(content[:16], 16)


def _step(token: int, params: SamplingParams, logprob: list[Any], top: list[Any]) -> Step:
    """A Step from SGLang's output: its log probabilities are (logprob, token id, text)."""
    if not params.logprobs or not logprob:
        return Step(token)
    alternatives = tuple((int(t[1]), float(t[0])) for t in (top[0] if top else None) or ())
    return Step(token, float(logprob[0][0]), alternatives)
