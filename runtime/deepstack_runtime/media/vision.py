"""The image processor's geometry without the processor: how many visual tokens an image
of a given size becomes, computed from its header and the checkpoint's own settings,
exactly as transformers' Qwen2-VL image processor (the one Qwen3-VL and Qwen3-VL-MoE
checkpoints use) resizes and patches it.

Settings (transformers 5, `Qwen2VLImageProcessor` and `Qwen2VLImageProcessorPil`):
- read from `processor_config.json`'s "image_processor" object when there is one, else
  from `preprocessor_config.json`;
- the pixel range is `size: {shortest_edge: min pixels, longest_edge: max pixels}`, or
  the older top-level `min_pixels` / `max_pixels`, which win over `size` when both are
  there; with neither, the processor's defaults;
- patch_size, merge_size, temporal_patch_size default to 14, 2, 2.

Resize ("smart resize"): each side rounded to a multiple of patch_size * merge_size
(round half to even: Python's round); if that exceeds max pixels, both sides scaled
down by sqrt(area / max) and floored to the multiple; if below min pixels, scaled up
and ceiled. An aspect ratio above 200:1 is refused. The grid is (1, height / patch,
width / patch) and each merge_size x merge_size block of patches is one token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepstack_runtime.errors import InputError

# The image processor's defaults in transformers 5 (Qwen2VLImageProcessor's class
# attributes), which a checkpoint's settings override.
DEFAULT_PATCH_SIZE = 14
DEFAULT_MERGE_SIZE = 2
DEFAULT_TEMPORAL_PATCH_SIZE = 2
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200  # the processor refuses a longer side more than 200x the shorter

PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# The image processors whose resize this module reproduces ("Fast" is the torchvision one
# under its transformers 4 name).
KNOWN_PROCESSORS = frozenset(
    {"Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil"}
)


@dataclass(frozen=True)
class ImageGeometry:
    """How the checkpoint's image processor cuts an image into patches and tokens."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int

    def __post_init__(self) -> None:
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(
                    f"image geometry: {name} must be a positive integer, got {value!r}"
                )
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"image geometry: min_pixels {self.min_pixels} is above "
                f"max_pixels {self.max_pixels}"
            )

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged token is factor x factor pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path) -> ImageGeometry:
        """The settings the checkpoint's image processor loads (see the module's docstring).
        FileNotFoundError without either file; ValueError, naming the file, for settings
        the processor could not resize an image with."""
        path = Path(model_dir)
        nested = path / PROCESSOR_CONFIG
        if nested.is_file():
            config = _read_json(nested)
            if "image_processor" in config:
                return cls._from_file(config["image_processor"], nested)
        flat = path / PREPROCESSOR_CONFIG
        if not flat.is_file():
            raise FileNotFoundError(
                f"no image processor settings in {path} ({PREPROCESSOR_CONFIG})"
            )
        return cls._from_file(_read_json(flat), flat)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ImageGeometry:
        """The geometry of an image processor config (the JSON object). ValueError for one
        that does not describe a Qwen2-VL-style resize."""
        kind = config.get("image_processor_type")
        if kind is not None and kind not in KNOWN_PROCESSORS:
            raise ValueError(f"image processor {kind!r} is not one whose resize is known here")
        if config.get("do_resize", True) is not True:
            raise ValueError("do_resize is off: images would be used at their own size")
        size = config.get("size")
        if size is None:
            size = {"shortest_edge": DEFAULT_MIN_PIXELS, "longest_edge": DEFAULT_MAX_PIXELS}
        elif not isinstance(size, Mapping):
            raise ValueError(f"size must be an object, got {size!r}")
        # The older keys, when set, replace the size's (as the processor's constructor does).
        min_pixels = config.get("min_pixels")
        max_pixels = config.get("max_pixels")
        min_pixels = size.get("shortest_edge") if min_pixels is None else min_pixels
        max_pixels = size.get("longest_edge") if max_pixels is None else max_pixels
        if min_pixels is None or max_pixels is None:
            raise ValueError(
                f"no pixel range: size {dict(size)} lacks shortest_edge/longest_edge and "
                "min_pixels/max_pixels are not set (the processor would refuse every image)"
            )
        return cls(
            patch_size=config.get("patch_size", DEFAULT_PATCH_SIZE),
            merge_size=config.get("merge_size", DEFAULT_MERGE_SIZE),
            temporal_patch_size=config.get("temporal_patch_size", DEFAULT_TEMPORAL_PATCH_SIZE),
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )

    @classmethod
    def _from_file(cls, config: Any, source: Path) -> ImageGeometry:
        if not isinstance(config, Mapping):
            raise ValueError(f"{source}: the image processor settings are not a JSON object")
        try:
            return cls.from_config(config)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e


def resized_size(width: int, height: int, geometry: ImageGeometry) -> tuple[int, int]:
    """(height, width) the processor resizes a width x height image to. InputError for a
    size it refuses (no pixels, or an aspect ratio above 200:1)."""
    if width <= 0 or height <= 0:
        raise InputError(f"the image is {width}x{height}: it has no pixels")
    # The same float operations in the same order as the processor, so that every
    # rounding lands where its does.
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(
            f"the image is {width}x{height}: its aspect ratio {ratio:.1f}:1 is above "
            f"{MAX_ASPECT_RATIO}:1, the most the model's image processor takes"
        )
    factor = geometry.factor
    new_height = round(height / factor) * factor
    new_width = round(width / factor) * factor
    if new_height * new_width > geometry.max_pixels:
        scale = math.sqrt((height * width) / geometry.max_pixels)
        new_height = max(factor, math.floor(height / scale / factor) * factor)
        new_width = max(factor, math.floor(width / scale / factor) * factor)
    elif new_height * new_width < geometry.min_pixels:
        scale = math.sqrt(geometry.min_pixels / (height * width))
        new_height = math.ceil(height * scale / factor) * factor
        new_width = math.ceil(width * scale / factor) * factor
    return new_height, new_width


def grid_thw(width: int, height: int, geometry: ImageGeometry) -> tuple[int, int, int]:
    """The processor's image_grid_thw row for one image: (1, patch rows, patch columns)."""
    new_height, new_width = resized_size(width, height, geometry)
    return 1, new_height // geometry.patch_size, new_width // geometry.patch_size


def visual_tokens(width: int, height: int, geometry: ImageGeometry) -> int:
    """The image pad tokens (and embedding rows) a width x height image becomes."""
    t, h, w = grid_thw(width, height, geometry)
    return t * h * w // geometry.merge_size**2


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
