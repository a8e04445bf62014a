"""The router's visual-token count from an image's size alone equals what transformers'
own image processor makes of the image, for the tiny checkpoint's settings and for the
published Qwen3-VL settings (patch 16, merge 2, up to 16,777,216 pixels), which the tiny
one (65,536 pixels at most) would hide overflows under.

tests/fixtures/qwen3-vl-30b-a3b-instruct/preprocessor_config.json is the Qwen3-VL
family's published file (390 bytes; the same file in Qwen/Qwen3-VL-2B-Instruct, 4B, 8B,
32B and in the 30B-A3B copies on the Hugging Face hub), kept byte for byte.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from deepstack_runtime.errors import InputError
from deepstack_runtime.media.vision import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MERGE_SIZE,
    DEFAULT_MIN_PIXELS,
    DEFAULT_PATCH_SIZE,
    DEFAULT_TEMPORAL_PATCH_SIZE,
    ImageGeometry,
    grid_thw,
    resized_size,
    visual_tokens,
)
from deepstack_runtime.models.tiny import make_tiny_model

PRODUCTION = Path(__file__).resolve().parents[1] / "fixtures" / "qwen3-vl-30b-a3b-instruct"
PRODUCTION_GEOMETRY = ImageGeometry(
    patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=65_536, max_pixels=16_777_216
)
TINY_GEOMETRY = ImageGeometry(
    patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=256, max_pixels=65_536
)

# Sizes where a near miss of the rule would show, per checkpoint: the pixel range's edges,
# halves that Python's round() sends to the even side (272 = 8.5 x 32, 40 = 2.5 x 16), the
# aspect-ratio limit from both sides, one-pixel sides, and the sizes the issue names.
COMMON_EDGES = [
    (1, 1), (1, 2), (2, 1), (1, 200), (200, 1), (1, 201), (201, 1),
    (4000, 20), (20, 4000), (4001, 20), (20, 4001), (4000, 40), (40, 4000),
    (2560, 1440), (1440, 2560), (1920, 1080), (1280, 720), (640, 480), (1024, 1024),
    (3000, 15), (15, 3000), (6000, 30), (7, 1400), (1400, 7),
]  # fmt: skip
EDGES = {
    "tiny": [
        *COMMON_EDGES,
        (16, 16), (15, 16), (16, 15), (8, 8), (7, 7), (9, 9), (24, 24), (40, 40), (56, 56),
        (256, 256), (257, 256), (256, 257), (264, 264), (272, 272), (255, 257), (300, 219),
        (512, 128), (1024, 64), (4096, 16), (16, 4096), (200, 328), (263, 249),
    ],
    "production": [
        *COMMON_EDGES,
        (256, 256), (255, 256), (240, 272), (272, 272), (336, 336), (1104, 1104), (80, 80),
        (65535, 328), (12000, 60), (100, 100), (31, 31),
    ],
}  # fmt: skip
# More edges of the production range, checked against the processor's resize rule only: a
# synthetic image of each takes the whole processor seconds.
LARGE_EDGES = [
    (4096, 4096), (4097, 4096), (4096, 4097), (4096, 4112), (4112, 4112), (5000, 3000),
    (8192, 2048), (16384, 1024), (328, 65535), (65535, 65535), (65535, 65534), (46341, 46341),
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module", params=["tiny", "production"])
def checkpoint(request: pytest.FixtureRequest, tiny_checkpoint: Path) -> tuple[str, Path]:
    name: str = request.param
    return name, tiny_checkpoint if name == "tiny" else PRODUCTION


def processor_of(model_dir: Path) -> Any:
    """The oracle: the image processor the reference backend loads."""
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(model_dir)


def processor_grid(processor: Any, width: int, height: int) -> tuple[int, int, int] | str:
    """The processor's grid for a synthetic width x height image, or its refusal."""
    try:
        out = processor(images=[Image.new("RGB", (width, height), (90, 30, 200))])
    except ValueError as e:
        return str(e)
    t, h, w = (int(v) for v in out["image_grid_thw"][0])
    return t, h, w


def ours(width: int, height: int, geometry: ImageGeometry) -> tuple[int, int, int] | str:
    try:
        return grid_thw(width, height, geometry)
    except InputError as e:
        return str(e)


def random_sizes(seed: int, count: int, max_area: float, max_ratio: float) -> list[tuple[int, int]]:
    """Sizes with log-uniform areas and aspect ratios (a few past the 200:1 limit)."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(count):
        area = math.exp(rng.uniform(0, math.log(max_area)))
        ratio = math.exp(rng.uniform(-math.log(max_ratio), math.log(max_ratio)))
        sizes.append(
            (max(1, round(math.sqrt(area * ratio))), max(1, round(math.sqrt(area / ratio))))
        )
    return sizes


def test_the_settings_are_the_ones_the_processor_loads(checkpoint: tuple[str, Path]) -> None:
    name, model_dir = checkpoint
    geometry = ImageGeometry.from_checkpoint(model_dir)
    processor = processor_of(model_dir)
    assert geometry == ImageGeometry(
        patch_size=processor.patch_size,
        merge_size=processor.merge_size,
        temporal_patch_size=processor.temporal_patch_size,
        min_pixels=processor.size.shortest_edge,
        max_pixels=processor.size.longest_edge,
    )
    assert geometry == {"tiny": TINY_GEOMETRY, "production": PRODUCTION_GEOMETRY}[name]


def test_grids_equal_the_processors_on_real_images(checkpoint: tuple[str, Path]) -> None:
    """The whole processor (resize, patchify) on a synthetic image of each size: 220 random
    sizes and aspect ratios up to 250:1 (some refused), plus the edges."""
    name, model_dir = checkpoint
    geometry = ImageGeometry.from_checkpoint(model_dir)
    processor = processor_of(model_dir)
    sizes = EDGES[name] + random_sizes(seed=21, count=220, max_area=2.5e6, max_ratio=250)
    mismatches, refused = [], 0
    for width, height in sizes:
        expected, got = processor_grid(processor, width, height), ours(width, height, geometry)
        if isinstance(expected, str):
            refused += 1
            # Refused by both, for the same reason.
            assert "aspect ratio must be smaller than 200" in expected
            assert isinstance(got, str)
            assert "aspect ratio" in got
            assert "above 200:1" in got
        elif got != expected:
            mismatches.append(((width, height), got, expected))
        else:
            assert visual_tokens(width, height, geometry) == math.prod(expected) // 4
    assert mismatches == []
    assert 8 <= refused < len(sizes) // 4  # both sides of the limit were exercised


def test_resized_sides_equal_the_processors_over_many_sizes(
    checkpoint: tuple[str, Path],
) -> None:
    """The processor's own resize rule with its loaded settings (no pixels: cheap), over
    5,000 sizes up to 65,535 pixels a side, both ways round."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    _, model_dir = checkpoint
    geometry = ImageGeometry.from_checkpoint(model_dir)
    processor = processor_of(model_dir)
    factor = processor.patch_size * processor.merge_size
    sizes = COMMON_EDGES + EDGES["tiny"] + EDGES["production"] + LARGE_EDGES
    sizes += random_sizes(seed=7, count=5000, max_area=65535.0 * 4096, max_ratio=260)
    for width, height in sizes:
        if max(width, height) > 65535:
            continue
        try:
            expected: Any = smart_resize(
                height,
                width,
                factor=factor,
                min_pixels=processor.size.shortest_edge,
                max_pixels=processor.size.longest_edge,
            )
            patches = processor.get_number_of_image_patches(height, width)
        except ValueError:
            expected = patches = None
        try:
            got: Any = resized_size(width, height, geometry)
        except InputError:
            got = None
        assert got == expected, (width, height)
        if got is not None:
            _, h, w = grid_thw(width, height, geometry)
            assert h * w == patches


def test_a_1440p_screenshot_is_3600_tokens_in_production() -> None:
    geometry = ImageGeometry.from_checkpoint(PRODUCTION)
    assert resized_size(2560, 1440, geometry) == (1440, 2560)
    assert grid_thw(2560, 1440, geometry) == (1, 90, 160)
    assert visual_tokens(2560, 1440, geometry) == 3600
    # One visual token is 32 x 32 pixels; the largest image is 16,384 tokens.
    assert visual_tokens(4096, 4096, geometry) == 16_384
    assert visual_tokens(10_000, 10_000, geometry) == 16_384


@pytest.mark.parametrize(
    ("geometry", "width", "height", "resized"),
    [
        # round() halves go to the even multiple: 40 / 16 = 2.5 -> 2, 272 / 32 = 8.5 -> 8.
        (TINY_GEOMETRY, 40, 40, (32, 32)),
        (TINY_GEOMETRY, 24, 24, (32, 32)),
        (PRODUCTION_GEOMETRY, 272, 272, (256, 256)),
        (PRODUCTION_GEOMETRY, 336, 336, (320, 320)),
        # Exactly the pixel range's ends are kept.
        (TINY_GEOMETRY, 16, 16, (16, 16)),
        (TINY_GEOMETRY, 256, 256, (256, 256)),
        (PRODUCTION_GEOMETRY, 256, 256, (256, 256)),
        (PRODUCTION_GEOMETRY, 4096, 4096, (4096, 4096)),
        # Below the range: scaled up and ceiled (8 / 16 rounds to 0 first).
        (TINY_GEOMETRY, 8, 8, (16, 16)),
        (PRODUCTION_GEOMETRY, 100, 100, (256, 256)),
        (TINY_GEOMETRY, 1, 200, (240, 16)),
        # Above it: scaled down and floored, never below one factor a side.
        (TINY_GEOMETRY, 272, 272, (256, 256)),
        (PRODUCTION_GEOMETRY, 4112, 4112, (4096, 4096)),
        (PRODUCTION_GEOMETRY, 65535, 328, (288, 57888)),
        (TINY_GEOMETRY, 4000, 20, (16, 4000)),
    ],
)
def test_resize_rule(
    geometry: ImageGeometry, width: int, height: int, resized: tuple[int, int]
) -> None:
    assert resized_size(width, height, geometry) == resized


@pytest.mark.parametrize(("width", "height"), [(4001, 20), (20, 4001), (201, 1), (65535, 300)])
def test_an_aspect_ratio_above_200_is_refused_with_its_numbers(width: int, height: int) -> None:
    with pytest.raises(InputError, match=rf"{width}x{height}: its aspect ratio .* above 200:1"):
        visual_tokens(width, height, PRODUCTION_GEOMETRY)


@pytest.mark.parametrize(("width", "height"), [(0, 10), (10, 0), (-5, 10)])
def test_an_image_without_pixels_is_refused(width: int, height: int) -> None:
    with pytest.raises(InputError, match="no pixels"):
        resized_size(width, height, TINY_GEOMETRY)


# Settings files and what the processor makes of them: (patch, merge, temporal, min, max).
PUBLISHED_SIZE = {"shortest_edge": 65536, "longest_edge": 16777216}
VALID_CONFIGS: dict[str, tuple[dict[str, Any], tuple[int, int, int, int, int]]] = {
    "size form": ({"size": PUBLISHED_SIZE, "patch_size": 16}, (16, 2, 2, 65536, 16777216)),
    "older keys": ({"min_pixels": 1000, "max_pixels": 50000}, (14, 2, 2, 1000, 50000)),
    "older keys win over size": (
        {"size": PUBLISHED_SIZE, "min_pixels": 1000, "max_pixels": 50000},
        (14, 2, 2, 1000, 50000),
    ),
    "one older key wins, the other from size": (
        {"size": PUBLISHED_SIZE, "max_pixels": 5_000_000},
        (14, 2, 2, 65536, 5_000_000),
    ),
    "null older keys are unset": (
        {"size": PUBLISHED_SIZE, "min_pixels": None, "max_pixels": None},
        (14, 2, 2, 65536, 16777216),
    ),
    "nothing: the defaults": ({}, (14, 2, 2, 3136, 1003520)),
    "null size: the default range": ({"size": None, "min_pixels": 100}, (14, 2, 2, 100, 1003520)),
    "older keys inside size, replaced by top-level ones": (
        {"size": {"min_pixels": 1, "max_pixels": 2}, "min_pixels": 1000, "max_pixels": 50000},
        (14, 2, 2, 1000, 50000),
    ),
    "all set": (
        {"size": PUBLISHED_SIZE, "patch_size": 8, "merge_size": 4, "temporal_patch_size": 1},
        (8, 4, 1, 65536, 16777216),
    ),
}


def write_config(directory: Path, config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("case", VALID_CONFIGS)
def test_settings_are_read_as_the_processor_reads_them(case: str, tmp_path: Path) -> None:
    config, expected = VALID_CONFIGS[case]
    assert ImageGeometry.from_config(config) == ImageGeometry(*expected)
    processor = processor_of(write_config(tmp_path, config))
    assert (
        processor.patch_size,
        processor.merge_size,
        processor.temporal_patch_size,
        processor.size.shortest_edge,
        processor.size.longest_edge,
    ) == expected
    assert ImageGeometry.from_checkpoint(tmp_path) == ImageGeometry(*expected)


def test_the_defaults_are_the_processors() -> None:
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    processor_defaults = (
        Qwen2VLImageProcessorPil.patch_size,
        Qwen2VLImageProcessorPil.merge_size,
        Qwen2VLImageProcessorPil.temporal_patch_size,
    )
    assert processor_defaults == (
        DEFAULT_PATCH_SIZE,
        DEFAULT_MERGE_SIZE,
        DEFAULT_TEMPORAL_PATCH_SIZE,
    )
    assert Qwen2VLImageProcessorPil.size == {
        "shortest_edge": DEFAULT_MIN_PIXELS,
        "longest_edge": DEFAULT_MAX_PIXELS,
    }


# Settings the processor cannot resize an image with: refused when loaded, not at the
# first request. The processor itself fails on an image with each of these.
UNUSABLE_CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "size holds only the older keys": (
        {"size": {"min_pixels": 3136, "max_pixels": 100000}},
        "no pixel range",
    ),
    "size has one edge": ({"size": {"shortest_edge": 1000}}, "no pixel range"),
    "a zero edge": ({"size": {"shortest_edge": 0, "longest_edge": 100000}}, "min_pixels"),
    "resizing off": ({"do_resize": False}, "do_resize"),
    "a null patch size": ({"patch_size": None}, "patch_size"),
}


@pytest.mark.parametrize("case", UNUSABLE_CONFIGS)
def test_unusable_settings_are_refused(case: str, tmp_path: Path) -> None:
    config, reason = UNUSABLE_CONFIGS[case]
    with pytest.raises(ValueError, match=reason):
        ImageGeometry.from_config(config)
    with pytest.raises(ValueError, match=rf"preprocessor_config.json: .*{reason}"):
        ImageGeometry.from_checkpoint(write_config(tmp_path, config))
    processor = processor_of(tmp_path)
    with pytest.raises((ValueError, TypeError)):
        processor(images=[Image.new("RGB", (100, 100))])


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        # The processor takes these, but they are mistakes a deployment should hear of.
        ({"min_pixels": 100000, "max_pixels": 5000}, "min_pixels 100000 is above max_pixels"),
        ({"image_processor_type": "CLIPImageProcessor"}, "'CLIPImageProcessor' is not one"),
        ({"size": [224, 224]}, "size must be an object"),
        ({"patch_size": 16.0}, "patch_size must be a positive integer"),
        ({"merge_size": True}, "merge_size must be a positive integer"),
    ],
)
def test_settings_that_are_mistakes_are_refused(config: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        ImageGeometry.from_config(config)


def test_a_nested_processor_config_wins_as_in_transformers(tmp_path: Path) -> None:
    write_config(tmp_path, {"size": PUBLISHED_SIZE, "patch_size": 16})
    nested = {"image_processor": {"min_pixels": 1000, "max_pixels": 50000, "patch_size": 8}}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    expected = ImageGeometry(8, 2, 2, 1000, 50000)
    assert ImageGeometry.from_checkpoint(tmp_path) == expected
    processor = processor_of(tmp_path)
    assert (processor.patch_size, processor.size.shortest_edge) == (8, 1000)
    # Without an image processor inside it, processor_config.json is not the one read.
    (tmp_path / "processor_config.json").write_text(json.dumps({"chat_template": "x"}))
    assert ImageGeometry.from_checkpoint(tmp_path) == ImageGeometry(16, 2, 2, 65536, 16777216)


def test_a_checkpoint_without_settings_or_with_broken_ones_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"preprocessor_config\.json"):
        ImageGeometry.from_checkpoint(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"preprocessor_config.json: not JSON"):
        ImageGeometry.from_checkpoint(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("[]")
    with pytest.raises(ValueError, match="not a JSON object"):
        ImageGeometry.from_checkpoint(tmp_path)


def test_qwen3_vl_checkpoints_load_this_processor(checkpoint: tuple[str, Path]) -> None:
    """What transformers picks for these checkpoints (AutoImageProcessor: the PIL class
    without torchvision, the torchvision class with it) resizes as computed here."""
    from transformers import AutoImageProcessor

    _, model_dir = checkpoint
    processor = AutoImageProcessor.from_pretrained(model_dir)
    assert type(processor).__name__ in {"Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil"}
    geometry = ImageGeometry.from_checkpoint(model_dir)
    for width, height in [(2560, 1440), (333, 777), (4000, 40)]:
        out = processor(images=[Image.new("RGB", (width, height))], return_tensors="np")
        assert tuple(int(v) for v in out["image_grid_thw"][0]) == grid_thw(width, height, geometry)


NO_TORCH = textwrap.dedent(
    """
    import importlib.abc, io, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} may not be imported here")
            return None

    sys.meta_path.insert(0, Refuse())
    from PIL import Image
    from deepstack_runtime.media.images import decode_image, probe_image
    from deepstack_runtime.media.vision import ImageGeometry, visual_tokens

    buffer = io.BytesIO()
    Image.new("RGB", (2560, 1440), (1, 2, 3)).save(buffer, "PNG")
    header = probe_image(buffer.getvalue())
    geometry = ImageGeometry.from_checkpoint(sys.argv[1])
    picture = decode_image(buffer.getvalue(), header, 16_777_216)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    print(header.width, header.height, visual_tokens(header.width, header.height, geometry),
          picture.size, loaded)
    """
)


def test_the_media_modules_import_no_torch() -> None:
    """The router's path (probe, geometry, token count) and the decode run in a process
    where torch and transformers cannot be imported."""
    out = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(PRODUCTION)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2560", "1440", "3600", "(2560,", "1440)", "[]"]
