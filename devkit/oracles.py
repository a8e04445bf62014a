"""What the undivided transformers model makes of a chat: the answers the disaggregated
stack must equal (test oracles, never product code)."""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from deepstack_runtime.backends.reference import load_model
from deepstack_runtime.errors import InputError


@dataclass
class Prompt:
    """A tokenized chat with its images, ready for both sides."""

    input_ids: torch.Tensor  # [L] int64, image pad tokens expanded
    pixel_values: torch.Tensor | None  # [patches, C*T*P*P]
    image_grid_thw: torch.Tensor | None  # [images, 3] int64


def decode_image(data: bytes, max_pixels: int | None = None) -> Any:
    """PNG/JPEG/... bytes -> RGB PIL image; InputError if it is not an image, or if it
    has more than `max_pixels` pixels (known from its header: nothing is decoded then)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise InputError(
                f"the image is {width}x{height} = {width * height} pixels; "
                f"the limit is {max_pixels}"
            )
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"the image could not be decoded: {e}") from e
    return image.convert("RGB")


class ReferencePreprocessor:
    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoConfig, AutoTokenizer
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        self.image_processor: Any = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        self.image_token_id = int(config.image_token_id)
        self.merge = int(self.image_processor.merge_size)
        self.image_pad = str(self.tokenizer.convert_ids_to_tokens(self.image_token_id))
        self.eos_token_id = int(self.tokenizer.eos_token_id)

    def prepare(self, messages: list[dict[str, Any]], images: list[Any]) -> Prompt:
        """`messages`: OpenAI-style, with {"type": "image"} parts where images go, in the
        order of `images` (decoded PIL images)."""
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        pieces = text.split(self.image_pad)
        if len(pieces) - 1 != len(images):
            raise InputError(f"{len(pieces) - 1} image placeholders for {len(images)} images")
        pixel_values = grid = None
        if images:
            try:
                processed = self.image_processor(images=images, return_tensors="pt")
            except ValueError as e:  # for example an aspect ratio it does not take
                raise InputError(f"the image processor refused the image: {e}") from e
            pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"]
            counts = [int(g.prod()) // self.merge**2 for g in grid]
            text = pieces[0] + "".join(
                self.image_pad * n + p for n, p in zip(counts, pieces[1:], strict=True)
            )
        input_ids = self.tokenizer(text, return_tensors="pt")["input_ids"][0]
        return Prompt(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid)

    def decode(self, tokens: list[int]) -> str:
        text: str = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return text


def monolithic_logits(model_dir: str | Path, prompt: Prompt) -> torch.Tensor:
    """The undivided transformers model on the same prompt: what the split must equal."""
    model = load_model(model_dir)
    ids = prompt.input_ids.unsqueeze(0)
    kwargs: dict[str, Any] = {
        "input_ids": ids,
        "mm_token_type_ids": (ids == model.config.image_token_id).long(),
    }
    if prompt.pixel_values is not None:
        kwargs |= {"pixel_values": prompt.pixel_values, "image_grid_thw": prompt.image_grid_thw}
    with torch.no_grad():
        logits: torch.Tensor = model(**kwargs).logits[0]
    return logits


def monolithic_step_logits(
    model_dir: str | Path, prompt: Prompt, tokens: list[int]
) -> torch.Tensor:
    """The undivided model's logits [len(tokens), vocab] for `tokens` generated after
    `prompt`: row k is what token k is chosen from (the prompt and tokens[:k] before it),
    all in one forward over the prompt and tokens[:-1]."""
    sequence = torch.cat([prompt.input_ids, torch.tensor(tokens[:-1], dtype=torch.int64)])
    logits = monolithic_logits(model_dir, replace(prompt, input_ids=sequence))
    return logits[len(prompt.input_ids) - 1 :]


def monolithic_generate(model_dir: str | Path, prompt: Prompt, max_new_tokens: int) -> list[int]:
    """Greedy tokens of the undivided model (transformers' own `generate`) on `prompt`."""
    model = load_model(model_dir)
    ids = prompt.input_ids.unsqueeze(0)
    kwargs: dict[str, Any] = {"mm_token_type_ids": (ids == model.config.image_token_id).long()}
    if prompt.pixel_values is not None:
        kwargs |= {"pixel_values": prompt.pixel_values, "image_grid_thw": prompt.image_grid_thw}
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs
        )
    tokens: list[int] = out[0, ids.shape[1] :].tolist()
    return tokens


class MediaPreprocessor:
    """transformers' own preparation of a chat with images and videos: its
    Qwen3VLProcessor, its own video reader (PyAV, every frame) and its own frame sampling,
    nothing of ours."""

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import PreTrainedTokenizerFast
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
            Qwen3VLVideoProcessor,
        )

        self.tokenizer: Any = PreTrainedTokenizerFast.from_pretrained(model_dir)
        self.processor = Qwen3VLProcessor(  # type: ignore[no-untyped-call]
            image_processor=Qwen2VLImageProcessorPil.from_pretrained(model_dir),
            tokenizer=self.tokenizer,
            video_processor=Qwen3VLVideoProcessor.from_pretrained(model_dir),
            chat_template=self.tokenizer.chat_template,
        )

    def inputs(self, messages: list[dict[str, Any]], media: list[tuple[str, bytes]]) -> Any:
        """The model's inputs for `messages` (with {"type": "image"} / {"type": "video"}
        parts where `media`, pairs of kind and bytes, go)."""
        import tempfile

        from transformers.video_utils import load_video

        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        images = [decode_image(data) for kind, data in media if kind == "image"]
        videos, metadata = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for n, (kind, data) in enumerate(media):
                if kind == "video":
                    path = Path(tmp) / f"{n}.mp4"
                    path.write_bytes(data)
                    frames, meta = load_video(str(path), backend="pyav")  # type: ignore[arg-type]
                    videos.append(frames)
                    metadata.append(meta)
        inputs = self.processor(
            text=[text], images=images or None, videos=videos or None,
            video_metadata=metadata or None, do_sample_frames=True, return_metadata=True,
            return_tensors="pt",
        )  # fmt: skip
        inputs.pop("video_metadata", None)
        return inputs

    def decode(self, tokens: list[int]) -> str:
        text: str = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return text


def media_generate(model: Any, inputs: Any, max_new_tokens: int) -> list[int]:
    """Greedy tokens of the undivided `model` on prepared `inputs`."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    tokens: list[int] = out[0, inputs["input_ids"].shape[1] :].tolist()
    return tokens


def monolithic_media_generate(
    model_dir: str | Path,
    messages: list[dict[str, Any]],
    media: list[tuple[str, bytes]],
    max_new_tokens: int,
) -> list[int]:
    """Greedy tokens of the undivided model for a chat with images and videos, prepared
    by transformers alone (MediaPreprocessor)."""
    inputs = MediaPreprocessor(model_dir).inputs(messages, media)
    return media_generate(load_model(model_dir), inputs, max_new_tokens)


def split_media(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI messages with inline (data: URL) images and videos -> (the messages with
    {"type": "image"} / {"type": "video"} parts, [(kind, bytes)] in order)."""
    import base64

    plain, media = [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            plain.append(message)
            continue
        parts = []
        for part in content:
            if part["type"] in ("image_url", "video_url"):
                kind = part["type"].removesuffix("_url")
                url = part[part["type"]]["url"]
                media.append((kind, base64.b64decode(url.split(",", 1)[1])))
                parts.append({"type": kind})
            else:
                parts.append(part)
        plain.append({"role": message["role"], "content": parts})
    return plain, media
