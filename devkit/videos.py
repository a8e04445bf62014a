"""Video clips for tests, written here with PyAV: real containers and codecs, small."""

from __future__ import annotations

import io
import os
import tempfile
from fractions import Fraction
from typing import Any

import av
import numpy as np


def clip(
    frames: int,
    fps: float,
    width: int,
    height: int,
    codec: str = "mpeg4",
    fmt: str = "mp4",
    seed: int = 0,
) -> bytes:
    """A clip of a square moving across a changing background (`seed` shifts its
    colours: another clip of the same size)."""
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream: Any = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            picture = np.zeros((height, width, 3), np.uint8)
            picture[..., 0] = (i * 9 + seed * 37) % 256
            picture[..., 2] = seed * 53 % 256
            x = i * 3 % max(1, width - 8)
            picture[: min(8, height), x : x + 8, 1] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def truncated_clip() -> bytes:
    """An MP4 with its index first (as streamed files are), cut in the middle of its
    frames: the container lists more frames than the file holds."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        with av.open(path, "w", format="mp4", options={"movflags": "faststart"}) as container:
            stream: Any = container.add_stream("mpeg4", rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            rng = np.random.default_rng(0)
            for _ in range(40):
                noise = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(noise, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        with open(path, "rb") as f:
            data = f.read()
    return data[: len(data) // 2]


def empty_clip() -> bytes:
    """An MP4 with a video stream and not one frame."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream: Any = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    return out.getvalue()


def unknown_codec_clip() -> bytes:
    """A Matroska clip whose codec ID names no codec FFmpeg knows (same length, so the
    file's structure is intact)."""
    data = clip(10, 10.0, 64, 48, codec="ffv1", fmt="matroska")
    assert data.count(b"V_FFV1") == 1
    return data.replace(b"V_FFV1", b"V_ZZZ1")
