"""Video bytes: what the router needs from a clip without decoding a frame (container
metadata: codec, size, frame count, frame rate), which frames the checkpoint's video
processor samples and what grid of patches and tokens it makes of them, the timestamps
Qwen3-VL reads in the prompt; and the decode an encode pod does of the sampled frames.

Decoder: PyAV (FFmpeg's libraries in its wheel). It reads the container's metadata and
demuxes packets without decoding, decodes the sampled frames only as far as the last one,
and it is the backend transformers' own `load_video` uses by default, so a frame index
here is the frame index there.

- Containers: MP4/QuickTime and Matroska/WebM, named to FFmpeg explicitly from their
  magic bytes: FFmpeg's format probing would also open playlists and other formats that
  point at further files or URLs, which untrusted bytes must never reach.
- The frame count is the container's (as transformers reads it), else the number of the
  video stream's packets, demuxed (not decoded); a container that lists more frames than
  its packets hold is truncated and refused.
- Sampling, resize and timestamps are transformers' `Qwen3VLVideoProcessor` and
  `Qwen3VLProcessor` (transformers 5.2x), reproduced without numpy or torch:
  n = int(total / container fps * fps), clamped to [min_frames, max_frames] and to the
  total; indices = linspace(0, total - 1, n) rounded half to even; the pixel budget
  (`size`) is over all n frames (temporal_patch_size frames make one patch), optionally
  capped per frame; one timestamp per temporal patch, the mean of its first and last
  frames' times.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepstack_runtime.errors import InputError
from deepstack_runtime.media.vision import MAX_ASPECT_RATIO

PROCESSOR_CONFIG = "processor_config.json"
VIDEO_PREPROCESSOR_CONFIG = "video_preprocessor_config.json"
KNOWN_PROCESSORS = frozenset({"Qwen3VLVideoProcessor"})
# Qwen3VLVideoProcessor's class defaults (transformers 5.2x), which a checkpoint overrides.
DEFAULTS: dict[str, Any] = {
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768},
    "fps": 2,
    "min_frames": 4,
    "max_frames": 768,
    "cap_pixels_per_frame": False,
    "max_video_tokens": 768,
}
# A frame rate above this is not a camera's or a screen recording's; with it, a short clip
# could make an encode pod decode any number of frames.
MAX_FRAME_RATE = 240.0

# FFmpeg demuxer names by the magic bytes that identify them.
_CONTAINERS = {"mp4": "MP4/QuickTime", "matroska": "Matroska/WebM"}
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
_ACCEPTED = "MP4/QuickTime or Matroska/WebM"


@dataclass(frozen=True)
class VideoHeader:
    """What a clip's container says of its (first) video stream."""

    container: str  # FFmpeg's demuxer name: "mp4" or "matroska"
    codec: str
    width: int
    height: int
    frames: int  # the stream's packets: one frame each
    fps: float  # the container's average frame rate

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    def __str__(self) -> str:
        return (
            f"{self.width}x{self.height} {self.codec} video in {_CONTAINERS[self.container]}, "
            f"{self.frames} frames at {self.fps:g} fps"
        )


def probe_video(data: bytes | memoryview, *, max_pixels: int | None = None) -> VideoHeader:
    """The header of a clip, its packets demuxed but no frame decoded; InputError, with
    the reason, for bytes that are not a complete clip in an accepted container with a
    codec the decoder has, or whose frames have more than `max_pixels`."""
    import av

    container_name = _container(data)
    try:
        container = av.open(io.BytesIO(data), mode="r", format=container_name)
    except (av.FFmpegError, ValueError) as e:
        raise InputError(f"the {_CONTAINERS[container_name]} file cannot be read: {e}") from e
    with container:
        if not container.streams.video:
            raise InputError("the file has no video stream with frames")
        stream = container.streams.video[0]
        codec = stream.codec_context.name if stream.codec_context is not None else "unknown"
        try:
            av.Codec(codec, "r")
        except (av.FFmpegError, ValueError) as e:
            raise InputError(f"the video's codec ({codec}) is not one the decoder has") from e
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise InputError(f"the video's frames are {width}x{height}: they have no pixels")
        if max_pixels is not None and width * height > max_pixels:
            raise InputError(
                f"the video's frames are {width}x{height} ({width * height} pixels); the "
                f"limit is {max_pixels} pixels a frame"
            )
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if not 0 < fps <= MAX_FRAME_RATE:
            raise InputError(
                "the video's frame rate is unknown"
                if fps <= 0
                else f"the video's frame rate {fps:g} is above {MAX_FRAME_RATE:g} fps"
            )
        listed = stream.frames
        try:
            frames = sum(1 for packet in container.demux(stream) if packet.size)
        except (av.FFmpegError, ValueError) as e:
            raise InputError(f"the video is damaged or truncated: {e}") from e
    if frames == 0:
        raise InputError("the video stream has no frames")
    if listed and frames < listed:
        raise InputError(
            f"the video is truncated: its container lists {listed} frames, the file holds {frames}"
        )
    # The listed count where there is one, as transformers samples from it.
    return VideoHeader(container_name, codec, width, height, listed or frames, fps)


def decode_frames(data: bytes | memoryview, header: VideoHeader, indices: Sequence[int]) -> Any:
    """The frames at `indices` (ascending), RGB, as a uint8 array [n, height, width, 3];
    frames are decoded in order up to the last one wanted and no further. InputError for
    a clip that does not decode as its header said."""
    import av
    import numpy as np

    wanted = sorted(set(indices))
    if not wanted or wanted[0] < 0 or wanted[-1] >= header.frames:
        raise ValueError(f"frame indices {wanted[:3]}... are not within {header.frames} frames")
    picked: dict[int, Any] = {}
    try:
        with av.open(io.BytesIO(data), mode="r", format=header.container) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for index, frame in enumerate(container.decode(stream)):
                if (frame.width, frame.height) != (header.width, header.height):
                    raise InputError(
                        f"frame {index} is {frame.width}x{frame.height}, not the "
                        f"{header.width}x{header.height} the container says"
                    )
                if index in wanted:
                    picked[index] = frame.to_ndarray(format="rgb24")
                if index >= wanted[-1]:
                    break
    except (av.FFmpegError, ValueError) as e:
        raise InputError(f"the video does not decode: {e}") from e
    if len(picked) != len(wanted):
        raise InputError(
            f"the video decodes to fewer frames than the {header.frames} its packets hold"
        )
    return np.stack([picked[i] for i in indices])


@dataclass(frozen=True)
class VideoGeometry:
    """How the checkpoint's video processor samples a clip and cuts it into patches."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int  # size.shortest_edge: over all sampled frames
    max_pixels: int  # size.longest_edge: over all sampled frames
    fps: float  # frames sampled per second of video
    min_frames: int
    max_frames: int
    cap_pixels_per_frame: bool
    max_video_tokens: int

    def __post_init__(self) -> None:
        for name in (
            "patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels",
            "min_frames", "max_frames", "max_video_tokens",
        ):  # fmt: skip
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(
                    f"video geometry: {name} must be a positive integer, got {value!r}"
                )
        if not (isinstance(self.fps, int | float) and self.fps > 0):
            raise ValueError(f"video geometry: fps must be a positive number, got {self.fps!r}")
        if self.min_frames > self.max_frames:
            raise ValueError("video geometry: min_frames is above max_frames")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path) -> VideoGeometry | None:
        """The checkpoint's video processor settings (processor_config.json's
        "video_processor", else video_preprocessor_config.json); None when it has none
        (the model is then served without video). ValueError, naming the file, for
        settings whose sampling is not the one reproduced here."""
        path = Path(model_dir)
        for name, key in ((PROCESSOR_CONFIG, "video_processor"), (VIDEO_PREPROCESSOR_CONFIG, None)):
            file = path / name
            if not file.is_file():
                continue
            config = json.loads(file.read_text())
            if key is not None:
                if not isinstance(config, dict) or key not in config:
                    continue
                config = config[key]
            try:
                return cls.from_config(config)
            except ValueError as e:
                raise ValueError(f"{file}: {e}") from e
        return None

    @classmethod
    def from_config(cls, config: Any) -> VideoGeometry:
        if not isinstance(config, Mapping):
            raise ValueError("the video processor settings are not a JSON object")
        kind = config.get("video_processor_type")
        if kind is not None and kind not in KNOWN_PROCESSORS:
            raise ValueError(f"video processor {kind!r} is not one whose sampling is known here")
        if config.get("do_sample_frames", True) is not True or config.get("num_frames"):
            raise ValueError("only sampling by fps (do_sample_frames, no num_frames) is known here")
        if config.get("do_resize", True) is not True:
            raise ValueError("do_resize is off: frames would be used at their own size")
        settings = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
        size = settings["size"]
        if not isinstance(size, Mapping) or not {"shortest_edge", "longest_edge"} <= set(size):
            raise ValueError(f"size must have shortest_edge and longest_edge, got {size!r}")
        return cls(
            patch_size=settings["patch_size"],
            temporal_patch_size=settings["temporal_patch_size"],
            merge_size=settings["merge_size"],
            min_pixels=size["shortest_edge"],
            max_pixels=size["longest_edge"],
            fps=settings["fps"],
            min_frames=settings["min_frames"],
            max_frames=settings["max_frames"],
            cap_pixels_per_frame=bool(settings["cap_pixels_per_frame"]),
            max_video_tokens=settings["max_video_tokens"],
        )


@dataclass(frozen=True)
class VideoLayout:
    """What the processor makes of one clip: the frames it samples, its grid of patches,
    the tokens of each temporal patch and where each sits in time."""

    indices: tuple[int, ...]
    grid: tuple[int, int, int]  # (temporal patches, patch rows, patch columns)
    tokens_per_frame: int  # per temporal patch: one <|vision_start|>...<|vision_end|> run
    timestamps: tuple[float, ...]  # seconds, one per temporal patch

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.tokens_per_frame

    def placeholder(self, start: str, pad: str, end: str) -> str:
        """The prompt text Qwen3VLProcessor puts where the clip goes."""
        return "".join(
            f"<{t:.1f} seconds>{start}{pad * self.tokens_per_frame}{end}" for t in self.timestamps
        )


def sample_indices(frames: int, fps: float, geometry: VideoGeometry) -> list[int]:
    """The frames the processor samples from a clip of `frames` frames at `fps`."""
    n = int(frames / fps * geometry.fps)
    n = min(max(n, geometry.min_frames), geometry.max_frames, frames)
    if n == 1:
        return [0]
    step = (frames - 1) / (n - 1)  # numpy's linspace: i * step, its last exactly the end
    return [round(i * step) for i in range(n - 1)] + [frames - 1]


def resized_size(frames: int, width: int, height: int, geometry: VideoGeometry) -> tuple[int, int]:
    """(height, width) the processor resizes `frames` sampled frames of width x height
    to; InputError for a clip it refuses."""
    if frames < geometry.temporal_patch_size:
        raise InputError(
            f"the video gives {frames} frame to sample; the model's video processor needs "
            f"at least {geometry.temporal_patch_size}"
        )
    factor = geometry.factor
    max_pixels = geometry.max_pixels
    if geometry.cap_pixels_per_frame:
        per_frame = max(
            min(geometry.max_video_tokens * factor * factor, geometry.max_pixels // frames),
            int(geometry.min_pixels * 1.05),
        )
        max_pixels = per_frame * frames
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(
            f"the video's frames have an aspect ratio of {ratio:.1f}:1, above the "
            f"{MAX_ASPECT_RATIO}:1 the model's video processor takes"
        )
    new_height = round(height / factor) * factor
    new_width = round(width / factor) * factor
    temporal = round(frames / geometry.temporal_patch_size) * geometry.temporal_patch_size
    if temporal * new_height * new_width > max_pixels:
        scale = math.sqrt((frames * height * width) / max_pixels)
        new_height = max(factor, math.floor(height / scale / factor) * factor)
        new_width = max(factor, math.floor(width / scale / factor) * factor)
    elif temporal * new_height * new_width < geometry.min_pixels:
        scale = math.sqrt(geometry.min_pixels / (frames * height * width))
        new_height = math.ceil(height * scale / factor) * factor
        new_width = math.ceil(width * scale / factor) * factor
    return new_height, new_width


def timestamps(indices: Sequence[int], fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal patch: the mean of its first and last frames' times (the
    last frame repeated to fill the last patch)."""
    padded = list(indices)
    padded += [padded[-1]] * (-len(padded) % temporal_patch_size)
    times = [i / fps for i in padded]
    return [
        (times[i] + times[i + temporal_patch_size - 1]) / 2
        for i in range(0, len(times), temporal_patch_size)
    ]


def layout(header: VideoHeader, geometry: VideoGeometry) -> VideoLayout:
    """What the processor makes of the clip `header` describes; InputError for one it
    refuses."""
    indices = sample_indices(header.frames, header.fps, geometry)
    height, width = resized_size(len(indices), header.width, header.height, geometry)
    grid_t = -(-len(indices) // geometry.temporal_patch_size)
    grid = (grid_t, height // geometry.patch_size, width // geometry.patch_size)
    per_frame = grid[1] * grid[2] // geometry.merge_size**2
    return VideoLayout(
        tuple(indices), grid, per_frame,
        tuple(timestamps(indices, header.fps, geometry.temporal_patch_size)),
    )  # fmt: skip


def _container(data: bytes | memoryview) -> str:
    head = bytes(data[:12])
    if head[4:8] in _MP4_BOXES:
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    raise InputError(f"the file is not a video in {_ACCEPTED}")
