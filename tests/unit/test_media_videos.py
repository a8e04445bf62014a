"""A clip's sampled frames, grid, tokens and timestamps, computed from its container's
metadata alone, equal what transformers' own Qwen3-VL video processor and processor make
of it: for the published settings (patch 16, 4,096 to 25,165,824 pixels over all frames),
with and without the per-frame cap, and for the tiny checkpoint's. The container probe
reads real clips written here with PyAV and refuses what it must, with the reason."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from typing import Any

import av
import numpy as np
import pytest
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
    Qwen3VLVideoProcessor,
    smart_resize,
)
from transformers.video_utils import VideoMetadata

from deepstack_runtime.errors import InputError
from deepstack_runtime.media.videos import (
    VideoGeometry,
    VideoHeader,
    decode_frames,
    layout,
    probe_video,
    resized_size,
    sample_indices,
    timestamps,
)
from devkit.videos import clip, empty_clip, truncated_clip, unknown_codec_clip

PUBLISHED = {"patch_size": 16, "size": {"shortest_edge": 4096, "longest_edge": 25_165_824}}
TINY = {"patch_size": 8, "size": {"shortest_edge": 256, "longest_edge": 65_536 * 8}}
SETTINGS = {
    "published": PUBLISHED,
    "published-capped": {**PUBLISHED, "cap_pixels_per_frame": True},
    "tiny": TINY,
}


def processor(settings: dict[str, Any]) -> Qwen3VLVideoProcessor:
    # cap_pixels_per_frame given explicitly: its default is about to change upstream.
    return Qwen3VLVideoProcessor(**{"cap_pixels_per_frame": False, **settings})


def cases() -> Iterator[tuple[int, float, int, int]]:
    """(total frames, container fps, width, height): fixed edges, then random ones."""
    yield from [
        (95, 30.0, 1920, 1080), (3, 30.0, 640, 480), (4, 25.0, 640, 480), (5, 1.0, 320, 240),
        (2, 2.0, 64, 64), (9000, 30.0, 1280, 720), (100_000, 60.0, 3840, 2160),
        (61, 29.97, 1080, 1920), (30, 10.0, 16, 4000), (24, 24.0, 31, 31), (50, 2.0, 33, 100),
        (1537, 2.0, 852, 480), (768 * 2, 4.0, 640, 360),
    ]  # fmt: skip
    rng = random.Random(7)
    for _ in range(150):
        fps = rng.choice([1.0, 5.0, 12.5, 23.976, 24.0, 25.0, 29.97, 30.0, 60.0])
        yield (
            rng.randint(2, 4000), fps, rng.randint(16, 4000), rng.randint(16, 2200),
        )  # fmt: skip


@pytest.mark.parametrize("name", SETTINGS)
def test_sampling_grid_and_timestamps_equal_transformers(name: str) -> None:
    ours = VideoGeometry.from_config(SETTINGS[name])
    theirs = processor(SETTINGS[name])
    factor = theirs.patch_size * theirs.merge_size
    checked = 0
    for frames, fps, width, height in cases():
        if max(width, height) / min(width, height) > 200:
            continue
        expected = theirs.sample_frames(VideoMetadata(total_num_frames=frames, fps=fps))
        indices = sample_indices(frames, fps, ours)
        assert indices == expected.tolist(), (frames, fps)
        n = len(indices)
        if n < 2:
            continue
        max_pixels = theirs.size["longest_edge"]
        if SETTINGS[name].get("cap_pixels_per_frame"):
            per_frame = max(
                min(theirs.max_video_tokens * factor * factor, max_pixels // n),
                int(theirs.size["shortest_edge"] * 1.05),
            )
            max_pixels = per_frame * n
        expected_size = smart_resize(
            num_frames=n, height=height, width=width, factor=factor, temporal_factor=2,
            min_pixels=theirs.size["shortest_edge"], max_pixels=max_pixels,
        )  # fmt: skip
        assert resized_size(n, width, height, ours) == expected_size, (n, width, height)
        stamps = Qwen3VLProcessor._calculate_timestamps(None, indices, fps, 2)  # type: ignore[arg-type]
        assert timestamps(indices, fps, 2) == stamps
        checked += 1
    assert checked > 120


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize(
    ("frames", "fps", "width", "height"),
    [(30, 10.0, 64, 48), (95, 30.0, 160, 90), (7, 24.0, 32, 32), (11, 2.0, 200, 120)],
)
def test_grid_equals_the_processor_output_on_decoded_frames(
    name: str, frames: int, fps: float, width: int, height: int
) -> None:
    """The whole processor on the frames decode_frames returns: the grid, and a pixel
    count that matches the tokens."""
    data = clip(frames, fps, width, height)
    header = probe_video(data)
    assert (header.frames, header.width, header.height) == (frames, width, height)
    assert header.fps == pytest.approx(fps)
    ours = layout(header, VideoGeometry.from_config(SETTINGS[name]))
    decoded = decode_frames(data, header, ours.indices)
    assert decoded.shape == (len(ours.indices), height, width, 3)
    metadata = VideoMetadata(
        total_num_frames=header.frames, fps=header.fps, width=width, height=height,
        frames_indices=list(ours.indices),
    )  # fmt: skip
    out = processor(SETTINGS[name])(
        videos=[decoded], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt"
    )
    assert tuple(out["video_grid_thw"][0].tolist()) == ours.grid
    assert out["pixel_values_videos"].shape[0] == ours.tokens * 4


def test_decoded_frames_are_the_frames_at_those_indices() -> None:
    """Frame i decoded here is frame i of a full decode (transformers' own reader decodes
    every frame in order and keeps the sampled ones)."""
    data = clip(40, 10.0, 64, 48)
    header = probe_video(data)
    with av.open(io.BytesIO(data), "r") as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    picked = [0, 13, 26, 39]
    assert np.array_equal(decode_frames(data, header, picked), np.stack([every[i] for i in picked]))


def test_webm_is_read_like_mp4() -> None:
    header = probe_video(clip(20, 10.0, 64, 48, codec="libvpx-vp9", fmt="webm"))
    assert (header.container, header.codec, header.frames) == ("matroska", "vp9", 20)


def test_a_placeholder_is_the_processors_prompt_text() -> None:
    header = VideoHeader("mp4", "h264", 64, 48, 30, 10.0)
    ours = layout(header, VideoGeometry.from_config(TINY))
    text = ours.placeholder("<s>", "P", "</s>")
    assert text.startswith("<0.3 seconds><s>" + "P" * ours.tokens_per_frame + "</s><1.4 seconds>")
    assert text.count("P") == ours.tokens


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GIF89a" + bytes(100), "not a video in MP4/QuickTime or Matroska/WebM"),
        (b"#EXTM3U\n#EXTINF:1,\nhttp://127.0.0.1/x.ts\n", "not a video"),
        (b"\x00\x00\x00\x18ftypisom" + bytes(40), "cannot be read"),
        (truncated_clip(), "truncated: its container lists 40 frames"),
        (unknown_codec_clip(), "is not one the decoder has"),
        (empty_clip(), "no video stream with frames"),
    ],
    ids=["gif", "playlist", "empty-mp4", "truncated", "unknown-codec", "zero-frames"],
)
def test_refused_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(InputError, match=reason):
        probe_video(data)


def test_frame_size_and_rate_limits() -> None:
    with pytest.raises(InputError, match="limit is 3000 pixels a frame"):
        probe_video(clip(4, 10.0, 64, 48), max_pixels=3000)
    with pytest.raises(InputError, match="above 240 fps"):
        probe_video(clip(4, 1000.0, 64, 48))


def test_one_frame_is_too_few_for_the_processor() -> None:
    header = probe_video(clip(1, 10.0, 64, 48))
    with pytest.raises(InputError, match="1 frame to sample"):
        layout(header, VideoGeometry.from_config(TINY))


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"video_processor_type": "Qwen2VLVideoProcessor"}, "not one whose sampling"),
        ({"do_sample_frames": False}, "only sampling by fps"),
        ({"num_frames": 16}, "only sampling by fps"),
        ({"size": {"longest_edge": 10}}, "shortest_edge and longest_edge"),
        ({"fps": 0}, "fps must be a positive number"),
        ({"min_frames": 10, "max_frames": 4}, "min_frames is above max_frames"),
    ],
)
def test_settings_it_cannot_reproduce_are_refused(config: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        VideoGeometry.from_config(config)
