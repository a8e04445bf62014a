"""Test support: what SGLang 0.5.23 needs of its `sgl_kernel` package to run on a CPU
without AMX, where no CPU build of that kernel can be installed (none is published).

SGLang imports a few Python names from `sgl_kernel` and looks up a few
`torch.ops.sgl_kernel.*` ops when its modules load; on a CPU without AMX every call to
them sits behind an AMX check, so none runs (traced in every SGLang process: text,
image and encoder disaggregation, float32 and bfloat16). Each one here raises a
RuntimeError naming itself, so a code path that does call one fails loudly instead of
computing something else. Put this directory first on PYTHONPATH of every SGLang
process (the engine's subprocesses inherit it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# Looked up by sglang.srt.models.qwen3_5 when the model registry imports it.
_LOOKED_UP_OPS = (
    "fused_sigmoid_mul_cpu",
    "fused_qk_gemma_rmsnorm_cpu",
    "fused_qk_gemma_rmsnorm_with_gate_cpu",
    "fused_qkvzba_split_reshape_cat_contiguous_cpu",
)
# Imported by name from sgl_kernel at module load.
_IMPORTED_NAMES = (
    "copy_all_layer_kv_cache_cpu",
    "assign_req_to_token_pool_cpu",
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
)


def _never(name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"sgl_kernel.{name} was called: the CPU test stand-in has no implementation of it"
        )

    call.__name__ = name
    return call


_library: Any = torch.library.Library("sgl_kernel", "DEF")  # type: ignore[no-untyped-call]
for _op in _LOOKED_UP_OPS:
    _library.define(f"{_op}(Tensor[] args) -> Tensor")
    _library.impl(_op, _never(_op), "CompositeExplicitAutograd")

globals().update({name: _never(name) for name in _IMPORTED_NAMES})
__all__ = list(_IMPORTED_NAMES)
