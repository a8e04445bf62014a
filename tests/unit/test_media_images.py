"""Image headers read without decoding, and the encode side's decode within a pixel
budget, on real files made here by Pillow (and a few hand-built ones Pillow refuses to
write: a PNG declaring an absurd size, 16-bit colour). The decoded picture is what
transformers' image processor sees when handed the upright image."""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, WebPImagePlugin

from deepstack_runtime.errors import InputError
from deepstack_runtime.media import images
from deepstack_runtime.media.images import (
    MAX_IMAGE_SIDE,
    ImageFormat,
    ImageHeader,
    decode_image,
    probe_image,
)
from deepstack_runtime.media.vision import ImageGeometry, grid_thw

BUDGET = 16_777_216


def encode(image: Image.Image, image_format: str, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, image_format, **params)
    return out.getvalue()


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Incompressible pixels: a cut file loses pixel data, not padding."""
    bands = len(Image.new(mode, (1, 1)).getbands())
    data = random.Random(seed).randbytes(width * height * bands)
    return Image.frombytes(mode, (width, height), data)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, *, depth: int = 8, colour: int = 2, rows: bytes = b"") -> bytes:
    """A PNG with this IHDR; its pixel data is `rows` (filter bytes included), by default
    nearly none: the header may promise what the file does not hold."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows or b"\0"))
        + png_chunk(b"IEND", b"")
    )


def with_orientation(image: Image.Image, image_format: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, image_format, exif=exif)


def first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def animated(image_format: str) -> bytes:
    frames = [Image.new("RGB", (20, 10), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, image_format, save_all=True, append_images=frames[1:], duration=100)
    return out.getvalue()


def mpo() -> bytes:
    """A camera's multi-picture JPEG: the photo and a smaller second picture."""
    out = io.BytesIO()
    noise(64, 48).save(out, "MPO", save_all=True, append_images=[noise(32, 24, seed=1)])
    return out.getvalue()


def cmyk_jpeg() -> bytes:
    return encode(noise(40, 30, "CMYK"), "JPEG", quality=95)


def transparent_gif() -> bytes:
    picture = noise(40, 30, "L").convert("P")
    return encode(picture, "GIF", transparency=7)


def grey16_png() -> bytes:
    values = [0x0000, 0x00FF, 0x0100, 0x12FF, 0x8000, 0xFFFF]
    rows = b"\0" + b"".join(struct.pack(">H", v) for v in values)
    return png(len(values), 1, depth=16, colour=0, rows=rows)


def rgb16_png() -> bytes:
    rows = b"".join(b"\0" + struct.pack(">HHH", 0x1234, 0xABCD, 0xFFFF) * 7 for _ in range(5))
    return png(7, 5, depth=16, colour=2, rows=rows)


# Every kind of still image the encode side takes: (bytes, the header they must give).
STILL: dict[str, tuple[Callable[[], bytes], ImageHeader]] = {
    "PNG": (lambda: encode(noise(300, 200), "PNG"), ImageHeader(ImageFormat.PNG, 300, 200)),
    "JPEG": (lambda: encode(noise(300, 200), "JPEG"), ImageHeader(ImageFormat.JPEG, 300, 200)),
    "WebP lossy": (
        lambda: encode(noise(300, 200), "WEBP"),
        ImageHeader(ImageFormat.WEBP, 300, 200),
    ),
    "WebP lossless with alpha": (
        lambda: encode(noise(30, 20, "RGBA"), "WEBP", lossless=True),
        ImageHeader(ImageFormat.WEBP, 30, 20),
    ),
    "GIF": (
        lambda: encode(noise(300, 200).quantize(), "GIF"),
        ImageHeader(ImageFormat.GIF, 300, 200),
    ),
    "GIF with a transparent colour": (transparent_gif, ImageHeader(ImageFormat.GIF, 40, 30)),
    "16-bit grey PNG": (grey16_png, ImageHeader(ImageFormat.PNG, 6, 1)),
    "16-bit colour PNG": (rgb16_png, ImageHeader(ImageFormat.PNG, 7, 5)),
    "palette PNG": (
        lambda: encode(noise(50, 40).quantize(16), "PNG"),
        ImageHeader(ImageFormat.PNG, 50, 40),
    ),
    "RGBA PNG": (
        lambda: encode(noise(50, 40, "RGBA"), "PNG"),
        ImageHeader(ImageFormat.PNG, 50, 40),
    ),
    "grey+alpha PNG": (
        lambda: encode(noise(50, 40, "LA"), "PNG"),
        ImageHeader(ImageFormat.PNG, 50, 40),
    ),
    "1-bit PNG": (
        lambda: encode(noise(50, 40, "L").convert("1"), "PNG"),
        ImageHeader(ImageFormat.PNG, 50, 40),
    ),
    "grey JPEG": (
        lambda: encode(noise(50, 40, "L"), "JPEG"),
        ImageHeader(ImageFormat.JPEG, 50, 40),
    ),
    "CMYK JPEG": (cmyk_jpeg, ImageHeader(ImageFormat.JPEG, 40, 30)),
    "multi-picture JPEG (MPO)": (mpo, ImageHeader(ImageFormat.JPEG, 64, 48)),
    "JPEG on its side (EXIF 6)": (
        lambda: with_orientation(noise(300, 200), "JPEG", 6),
        ImageHeader(ImageFormat.JPEG, 200, 300, orientation=6),
    ),
    "PNG on its side (eXIf 8)": (
        lambda: with_orientation(noise(30, 20), "PNG", 8),
        ImageHeader(ImageFormat.PNG, 20, 30, orientation=8),
    ),
    "WebP upside down (EXIF 3)": (
        lambda: with_orientation(noise(30, 20), "WEBP", 3),
        ImageHeader(ImageFormat.WEBP, 30, 20, orientation=3),
    ),
}


@contextmanager
def no_decoding() -> Iterator[None]:
    """Any pixel decoding inside fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pixels were decoded")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", refuse)
        patch.setattr(WebPImagePlugin.WebPImageFile, "load", refuse)
        patch.setattr(Image, "_getdecoder", refuse)
        yield


@pytest.mark.parametrize("kind", STILL)
def test_the_header_is_read_without_decoding(kind: str) -> None:
    make, header = STILL[kind]
    data = make()
    with no_decoding():
        assert probe_image(data) == header


@pytest.mark.parametrize("kind", STILL)
def test_the_decoded_picture_is_the_upright_rgb_one_of_the_header(kind: str) -> None:
    make, _ = STILL[kind]
    data = make()
    header = probe_image(data)
    picture = decode_image(data, header, BUDGET)
    assert picture.mode == "RGB"
    assert picture.size == (header.width, header.height)
    if kind != "16-bit grey PNG":  # the one deliberate difference, tested below
        assert np.array_equal(np.asarray(picture), processor_rgb(data))


def processor_rgb(data: bytes) -> Any:
    """What transformers' image processor converts the upright picture to (the oracle)."""
    from transformers.image_transforms import convert_to_rgb

    return convert_to_rgb(ImageOps.exif_transpose(Image.open(io.BytesIO(data))), return_numpy=True)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_shown_upright(orientation: int) -> None:
    data = with_orientation(noise(30, 20), "JPEG", orientation)
    header = probe_image(data)
    assert (header.width, header.height) == ((20, 30) if orientation >= 5 else (30, 20))
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(np.asarray(decode_image(data, header, BUDGET)), np.asarray(upright))


@pytest.mark.parametrize(
    "kind", ["JPEG on its side (EXIF 6)", "RGBA PNG", "GIF with a transparent colour"]
)
def test_the_processor_makes_the_same_pixels_and_grid_of_the_decoded_picture(kind: str) -> None:
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, min_pixels=256, max_pixels=65536
    )
    data = STILL[kind][0]()
    header = probe_image(data)
    ours = processor(images=[decode_image(data, header, BUDGET)], return_tensors="np")
    theirs = processor(
        images=[ImageOps.exif_transpose(Image.open(io.BytesIO(data)))], return_tensors="np"
    )
    assert np.array_equal(ours["pixel_values"], theirs["pixel_values"])
    geometry = ImageGeometry(8, 2, 2, 256, 65536)
    assert tuple(ours["image_grid_thw"][0]) == grid_thw(header.width, header.height, geometry)


def test_16_bit_grey_keeps_its_high_byte() -> None:
    """transformers' convert("RGB") clips 16-bit grey to white; the decode keeps the high
    byte, as Pillow does with 16-bit colour."""
    data = grey16_png()
    picture = decode_image(data, probe_image(data), BUDGET)
    assert [picture.getpixel((x, 0)) for x in range(6)] == [
        (v, v, v) for v in (0x00, 0x00, 0x01, 0x12, 0x80, 0xFF)
    ]
    colour = decode_image(rgb16_png(), probe_image(rgb16_png()), BUDGET)
    assert colour.getpixel((0, 0)) == (0x12, 0xAB, 0xFF)


def test_transparency_is_white() -> None:
    clear = encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG")
    assert decode_image(clear, probe_image(clear), BUDGET).getpixel((0, 0)) == (255, 255, 255)


# Bytes that are no image the encode side takes, and the reason given for each.
REFUSED: dict[str, tuple[Callable[[], bytes], str]] = {
    "nothing": (lambda: b"", r"empty \(0 bytes\)"),
    "text": (
        lambda: b"hello, this is not an image",
        r"\(27 bytes\) is not a PNG, JPEG, WebP or GIF",
    ),
    "random bytes": (
        lambda: random.Random(3).randbytes(1000),
        "is not a PNG, JPEG, WebP or GIF image",
    ),
    "a PNG signature only": (lambda: b"\x89PNG\r\n\x1a\n", "PNG image is truncated or corrupt"),
    "a PNG cut inside its header": (
        lambda: encode(noise(8, 8), "PNG")[:20],
        "PNG image is truncated",
    ),
    "a JPEG cut inside its header": (
        lambda: encode(noise(8, 8), "JPEG")[:8],
        "JPEG image is truncated",
    ),
    "a WebP cut in half": (
        lambda: first_half(encode(noise(64, 48), "WEBP")),
        "WebP image is truncated",
    ),
    "a GIF signature only": (lambda: b"GIF89a", "GIF image is truncated"),
    "a PNG with zero width": (lambda: png(0, 10), "PNG image is truncated or corrupt"),
    "a PNG with zero height": (lambda: png(10, 0), "PNG image is truncated or corrupt"),
    "BMP": (
        lambda: encode(noise(8, 8), "BMP"),
        "BMP is not a supported image format: send PNG, JPEG, WebP or GIF",
    ),
    "TIFF": (lambda: encode(noise(8, 8), "TIFF"), "TIFF is not a supported image format"),
    "AVIF": (lambda: b"\0\0\0\x1cftypavif" + bytes(64), "AVIF is not a supported image format"),
    "HEIC": (lambda: b"\0\0\0\x18ftypheic" + bytes(64), "HEIF is not a supported image format"),
    "PDF": (lambda: b"%PDF-1.7\n" + bytes(64), "PDF is not a supported image format"),
    "SVG": (
        lambda: b'<svg xmlns="http://www.w3.org/2000/svg"/>',
        "SVG is not a supported image format",
    ),
    "an animated GIF": (lambda: animated("GIF"), "GIF image is animated: send a single frame"),
    "an animated WebP": (lambda: animated("WEBP"), "WEBP image is animated"),
    "an animated PNG": (lambda: animated("PNG"), "PNG image is animated"),
    "a side over 65,535": (lambda: png(70_000, 10), r"70000x10: a side longer than 65,535 pixels"),
    "a bomb: 100000 x 100000": (
        lambda: png(100_000, 100_000),
        r"too large to open: .*10000000000 pixels",
    ),
    "a bomb: 50000 x 50000": (
        lambda: png(50_000, 50_000),
        r"too large to open: .*2500000000 pixels",
    ),
}


@pytest.mark.parametrize("kind", REFUSED)
def test_what_is_not_a_still_image_of_a_sensible_size_is_refused_with_a_reason(
    kind: str,
) -> None:
    make, reason = REFUSED[kind]
    data = make()
    with no_decoding(), pytest.raises(InputError, match=reason):
        probe_image(data)


def test_more_pixels_than_allowed_are_refused_from_the_header() -> None:
    data = encode(noise(300, 200), "PNG")
    promise = png(20_000, 3_000)  # 60 million pixels promised in a few bytes
    with no_decoding():
        with pytest.raises(InputError, match=r"300x200 = 60,000 pixels; the limit is 59,999"):
            probe_image(data, max_pixels=59_999)
        assert probe_image(data, max_pixels=60_000).pixels == 60_000
        assert len(promise) < 100
        assert probe_image(promise) == ImageHeader(ImageFormat.PNG, 20_000, 3_000)
        side = png(MAX_IMAGE_SIDE, 1000)
        assert probe_image(side).width == MAX_IMAGE_SIDE


def test_a_header_over_the_budget_is_refused_before_decoding() -> None:
    promise = png(20_000, 3_000)
    header = probe_image(promise)
    with (
        no_decoding(),
        pytest.raises(InputError, match=r"20000x3000 = 60,000,000 pixels; the limit is 16,777,216"),
    ):
        decode_image(promise, header, BUDGET)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "GIF"])
def test_a_truncated_file_is_refused_never_padded(image_format: str) -> None:
    source = noise(64, 48).quantize() if image_format == "GIF" else noise(64, 48)
    whole = encode(source, image_format)
    for cut in (len(whole) // 2, len(whole) - 60):
        data = whole[:cut]
        header = probe_image(data)  # the header is intact
        with pytest.raises(
            InputError, match=f"the {image_format} image could not be decoded: .*truncated"
        ):
            decode_image(data, header, BUDGET)
    assert decode_image(whole, probe_image(whole), BUDGET).size == (64, 48)


def test_a_header_that_promises_pixels_it_lacks_is_refused() -> None:
    promise = png(2_000, 1_000)
    with pytest.raises(InputError, match="could not be decoded"):
        decode_image(promise, probe_image(promise), BUDGET)


def test_pillow_told_to_pad_truncated_images_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    promise = png(2_000, 1_000)
    header = probe_image(promise)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(promise, header, BUDGET)


def test_bytes_that_are_not_the_probed_image_are_refused() -> None:
    first, second = encode(noise(30, 20), "PNG"), encode(noise(20, 30), "PNG")
    with pytest.raises(
        InputError, match="is a 20x30 PNG image, not the 30x20 PNG image probed before"
    ):
        decode_image(second, probe_image(first), BUDGET)
    jpeg = encode(noise(30, 20), "JPEG")
    with pytest.raises(InputError, match="is a 30x20 JPEG image, not the 30x20 PNG image probed"):
        decode_image(jpeg, probe_image(first), BUDGET)
    with pytest.raises(InputError, match="not a PNG, JPEG, WebP or GIF image"):
        decode_image(b"garbage" * 10, probe_image(first), BUDGET)
    rotated = with_orientation(noise(30, 20), "JPEG", 6)
    forged = ImageHeader(ImageFormat.JPEG, 30, 20)  # the stored size, orientation ignored
    with pytest.raises(
        InputError, match=r"is a 20x30 JPEG image \(EXIF orientation 6\), not the 30x20 JPEG"
    ):
        decode_image(rotated, forged, BUDGET)


def test_pillows_own_bomb_limit_still_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(noise(100, 100), "PNG")
    header = probe_image(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    with pytest.raises(InputError, match="too large to decode"):
        decode_image(data, header, BUDGET)


def test_a_decode_that_changes_the_size_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(noise(30, 20), "PNG")
    header = probe_image(data)
    monkeypatch.setattr(images, "_upright", lambda image, orientation: image.resize((29, 20)))
    with pytest.raises(InputError, match="decoded to 29x20, not the 30x20 of its header"):
        decode_image(data, header, BUDGET)


def test_the_budget_must_be_positive() -> None:
    data = encode(noise(3, 2), "PNG")
    with pytest.raises(ValueError, match="max_pixels must be positive"):
        decode_image(data, probe_image(data), 0)


@pytest.mark.parametrize("image_format", ["PNG", "WEBP"])
def test_a_malformed_exif_block_leaves_the_picture_as_stored(image_format: str) -> None:
    """Pillow's exif_transpose raises on it; a photo is not refused for its metadata."""
    exif = b"Exif\x00\x00II*\x00\x1f"  # a TIFF header cut short
    data = encode(noise(30, 20), image_format, exif=exif)
    with no_decoding():
        header = probe_image(data)
    assert header == ImageHeader(ImageFormat(image_format), 30, 20)
    picture = decode_image(data, header, BUDGET)
    assert np.array_equal(
        np.asarray(picture), np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    )


def test_the_budget_holds_when_pillows_own_limit_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Code that sets Image.MAX_IMAGE_PIXELS = None (common for large scans) does not open
    the door: the budget is checked from the header, before any decode."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    bomb = png(50_000, 50_000)
    with no_decoding():
        with pytest.raises(InputError, match="2,500,000,000 pixels; the limit is 16,777,216"):
            probe_image(bomb, max_pixels=BUDGET)
        header = ImageHeader(ImageFormat.PNG, 50_000, 50_000)
        with pytest.raises(InputError, match="the limit is 16,777,216"):
            decode_image(bomb, header, BUDGET)
        with pytest.raises(InputError, match=r"100000x100000: a side longer than 65,535"):
            probe_image(png(100_000, 100_000))
