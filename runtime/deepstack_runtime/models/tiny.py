"""A tiny Qwen3-VL-MoE checkpoint with random weights, written as a real local checkpoint
(config, safetensors, tokenizer, image and video processors) that loads offline with
from_pretrained.
For tests, demos and laptops: the architecture is the real one, only smaller."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Trains the byte-level BPE: the tokenizer is built here, never downloaded.
_CORPUS = [
    "Describe the image.",
    "What is in this picture? Answer in one sentence.",
    "A red square on a white background.",
    "The quick brown fox jumps over the lazy dog.",
    "user assistant system You are a helpful assistant.",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PATCH_SIZE = 8
MERGE_SIZE = 2
NUM_DEEPSTACK = 3
HIDDEN_SIZE = 64
# Qwen3-VL's published image processor: patch 16, merge 2, 65,536 to 16,777,216 pixels
# (the tiny one caps images at 65,536 pixels, which would hide what a large one costs).
PUBLISHED_PATCH_SIZE = 16
PUBLISHED_PIXELS = (65_536, 16_777_216)
# Its published video processor: 4,096 to 25,165,824 pixels over all sampled frames.
PUBLISHED_VIDEO_PIXELS = (4_096, 25_165_824)
# The tiny one's: sixteen of its largest images over all sampled frames.
VIDEO_FRAMES_BUDGET = 16


def make_tiny_model(
    directory: str | Path,
    seed: int = 0,
    num_deepstack: int = NUM_DEEPSTACK,
    *,
    published_image_processor: bool = False,
) -> Path:
    """Write the checkpoint into `directory` (created) and return it; `num_deepstack`
    vision layers feed the language model (at most the vision depth, 4). With
    `published_image_processor`, images are cut as the released Qwen3-VL models cut them
    (patches of 16, up to 16,777,216 pixels: a 2560x1440 screenshot is 3,600 visual
    tokens)."""
    patch = PUBLISHED_PATCH_SIZE if published_image_processor else PATCH_SIZE
    min_pixels, max_pixels = (
        PUBLISHED_PIXELS
        if published_image_processor
        else ((PATCH_SIZE * MERGE_SIZE) ** 2, (PATCH_SIZE * MERGE_SIZE * 16) ** 2)
    )
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
    )
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    tokenizer: Any = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids: dict[str, int] = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}
    config = Qwen3VLMoeConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": HIDDEN_SIZE,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            # 2 x 48 != 64: a gate_up_proj stored the wrong way round cannot load.
            "moe_intermediate_size": 48,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 1,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
            "tie_word_embeddings": False,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 4,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": patch,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": 2,
            "out_hidden_size": HIDDEN_SIZE,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": list(range(num_deepstack)),
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model: Any = Qwen3VLMoeForConditionalGeneration(config)
    model.eval()
    model.save_pretrained(out)
    _store_experts_in_hub_layout(out / "model.safetensors")
    tokenizer.save_pretrained(out)
    processor = Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )
    processor.save_pretrained(out)
    video_min, video_max = (
        PUBLISHED_VIDEO_PIXELS
        if published_image_processor
        else (min_pixels, max_pixels * VIDEO_FRAMES_BUDGET)
    )
    Qwen3VLVideoProcessor(
        patch_size=patch,
        merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        size={"shortest_edge": video_min, "longest_edge": video_max},
        cap_pixels_per_frame=False,  # said, as its default is changing upstream
    ).save_pretrained(out)
    (out / "deepstack.json").write_text(
        json.dumps({"hidden_size": HIDDEN_SIZE, "num_deepstack": num_deepstack, "seed": seed})
        + "\n"
    )
    # safetensors writes owner-only files; the runtime's pods read them as another user.
    for path in out.iterdir():
        path.chmod(0o644)
    return out


def _store_experts_in_hub_layout(path: Path) -> None:
    """Rewrite the MoE expert weights the way published Qwen3-VL-MoE checkpoints store them
    (`gate_up_proj` [E, hidden, 2 x I], `down_proj` [E, I, hidden]). transformers 5 saves
    its internal layout (the last two dimensions swapped), which SGLang's loader cannot
    read; transformers itself converts the published layout when it loads."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    for name, tensor in tensors.items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensors[name] = tensor.transpose(1, 2).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
