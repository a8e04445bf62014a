"""The sglang backend's pure parts: SGLang's command line from the resource, and the fused
rows SGLang's Qwen3-VL models take."""

from __future__ import annotations

import pytest
import torch

from deepstack_runtime.backends.sglang import fused_rows, server_argv
from deepstack_runtime.buffers import BufferLayout, MultimodalDataBuffers, MultimodalItem
from deepstack_runtime.config import RuntimeConfig
from devkit.specs import example


def config() -> RuntimeConfig:
    cr = example("qwen3-vl-moe-rdma")
    return RuntimeConfig.from_spec("qwen3-vl-moe", "prod", cr["spec"])


def test_the_resource_decides_model_name_and_tensor_parallelism() -> None:
    argv = server_argv(config(), ["--mem-fraction-static", "0.85"])
    assert argv == [
        "--model-path", "/models/Qwen3-VL-30B-A3B-Instruct",
        "--served-model-name", "qwen3-vl",
        "--tp-size", "4",
        "--mem-fraction-static", "0.85",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("arg", "owner"),
    [
        ("--tp-size", "language.tensorParallelSize"),
        ("--model-path=/other", "model.path"),
        ("--port", "the pod"),
    ],
)
def test_extra_args_may_not_set_what_the_resource_owns(arg: str, owner: str) -> None:
    with pytest.raises(ValueError, match=f"may not set {arg.split('=')[0]}: it comes from {owner}"):
        server_argv(config(), [arg, "2"])


def test_fused_rows_are_the_buffers_token_records() -> None:
    """Each fused row is [embedding | DeepStack 0 | ... | K-1], the order in which a
    token record of the buffers holds them (and SGLang's vision tower emits them)."""
    t, h, k = 5, 8, 3
    item = MultimodalItem(
        embeddings=torch.randn(t, h),
        deepstack=torch.randn(t, k, h),
        fill_ids=torch.zeros(t, dtype=torch.int64),
        positions=torch.zeros(t, 3, dtype=torch.int64),
    )
    fused = fused_rows(item)
    assert fused.shape == (t, h * (1 + k))
    buffers = MultimodalDataBuffers(BufferLayout(2, 4, h, k, "float32"))
    buffers.scatter([0, 1], item)
    stored = buffers.arena[:t, 32 : 32 + 4 * h * 4].contiguous().view(torch.float32)
    assert torch.equal(stored, fused)
    assert torch.equal(fused_rows(item)[:, h : 2 * h], item.deepstack[:, 0])  # type: ignore[index]


def test_the_crd_refuses_the_same_flags() -> None:
    """The API server's rule and the runtime's list stay one list."""
    import re

    from deepstack_runtime.backends.sglang import OWNED_ARGUMENTS
    from devkit.crd import CRD_FILE

    rule = re.search(r"!a\.matches\('(.+?)'\)", CRD_FILE.read_text())
    assert rule is not None
    pattern = re.compile(rule.group(1))
    for flag in OWNED_ARGUMENTS:
        assert pattern.match(flag), flag
        assert pattern.match(f"{flag}=x"), flag
    assert not pattern.match("--mem-fraction-static")
    assert not pattern.match("--model-loader-extra-config")
