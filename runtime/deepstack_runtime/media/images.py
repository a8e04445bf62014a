"""Image bytes: the header (format, and the size the model sees) read without decoding a
pixel, for the router; and the decode an encode pod does within a pixel budget known up
front.

- Formats: PNG, JPEG, WebP and GIF, the ones the OpenAI API takes. Everything else
  (BMP, TIFF, HEIF/AVIF, ...) is refused with its name: each extra decoder is more
  attack surface on untrusted bytes, and a client of an OpenAI-style API does not send them.
- Animated images (GIF, WebP, APNG) are refused: the OpenAI API takes only non-animated
  GIFs, and silently keeping the first frame of a clip loses what the user sent. A JPEG's
  extra pictures (MPO, from cameras: previews, depth maps) are not animation: its primary
  picture is the image.
- The EXIF orientation is honoured, as transformers' own `load_image` does: a phone photo
  is seen upright, and the header's size is the upright one (width and height swapped for
  orientations 5-8), the size `decode_image` returns.
- RGB as transformers' image processor makes it from the upright picture: transparency
  composited onto white. One deliberate difference: 16-bit greyscale keeps its high byte
  (as Pillow does for 16-bit colour PNGs), where the processor's convert("RGB") would clip
  nearly every pixel to white.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from enum import StrEnum

from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from deepstack_runtime.errors import InputError


class ImageFormat(StrEnum):
    """The formats an encode pod decodes (values are Pillow's format names)."""

    PNG = "PNG"
    JPEG = "JPEG"
    WEBP = "WEBP"
    GIF = "GIF"


# No format these decode has a side longer than this (JPEG and GIF store 16-bit sizes,
# WebP 14-bit); a PNG that declares one is not a picture anyone means to send.
MAX_IMAGE_SIDE = 65_535

_ACCEPTED = "PNG, JPEG, WebP or GIF"
_ACCEPTED_NAMES = frozenset({"PNG", "JPEG", "WebP", "GIF"})  # as _claimed_format names them
_PILLOW_FORMATS = tuple(f.value for f in ImageFormat)
# What Pillow raises for malformed data while opening or decoding (its own Image.open
# treats the last four as "not this format").
_PILLOW_ERRORS = (OSError, ValueError, EOFError, SyntaxError, struct.error, IndexError, TypeError)

# EXIF orientation -> the transposition that shows the picture upright (the table of
# Pillow's ImageOps.exif_transpose, which transformers' load_image applies).
_UPRIGHT: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, as the model will see the image."""

    format: ImageFormat
    width: int  # upright: after the EXIF orientation, the size decode_image returns
    height: int
    orientation: int = 1  # EXIF orientation 1-8; 5-8 swap the stored width and height

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def __str__(self) -> str:
        turned = "" if self.orientation == 1 else f" (EXIF orientation {self.orientation})"
        return f"{self.width}x{self.height} {self.format.value} image{turned}"


def probe_image(data: bytes, *, max_pixels: int | None = None) -> ImageHeader:
    """The header of the image in `data`, read without decoding its pixels (a WebP file is
    parsed whole, a GIF up to its second frame). InputError, with a reason a person
    understands, for anything that is not a supported, still image of a sensible size:
    more than `max_pixels` pixels, when given, included."""
    if not data:
        raise InputError("the image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS) as image:
            return _read_header(image, max_pixels)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"the image is too large to open: {e}") from e
    except _PILLOW_ERRORS as e:
        raise InputError(_unreadable(data, e)) from e


def decode_image(data: bytes, header: ImageHeader, max_pixels: int) -> Image.Image:
    """The upright RGB picture of `data`, which `probe_image` described as `header`.
    Nothing is decoded unless the header is within `max_pixels`. InputError if the bytes
    are not what `header` describes, or are truncated or corrupt: never a partly decoded
    picture. RuntimeError if this process told Pillow to pad truncated images."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this process: Pillow would pad a "
            "truncated image with grey instead of failing; refusing to decode"
        )
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if header.pixels > max_pixels:
        raise InputError(_too_many_pixels(header.width, header.height, max_pixels))
    try:
        with Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS) as image:
            found = _read_header(image, max_pixels)
            if found != header:
                raise InputError(f"the image is a {found}, not the {header} probed before")
            image.load()
            picture = _to_rgb(_upright(image, header.orientation))
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"the image is too large to decode: {e}") from e
    except _PILLOW_ERRORS as e:
        if isinstance(e, UnidentifiedImageError):
            raise InputError(_unreadable(data, e)) from e
        raise InputError(f"the {header.format.value} image could not be decoded: {e}") from e
    if picture.size != (header.width, header.height):  # a plugin that resized: never trust it
        raise InputError(
            f"the image decoded to {picture.width}x{picture.height}, "
            f"not the {header.width}x{header.height} of its header"
        )
    return picture


def _read_header(image: Image.Image, max_pixels: int | None) -> ImageHeader:
    # Pillow opens a multi-picture JPEG (MPO) as its own format; its first picture is the photo.
    image_format = ImageFormat.JPEG if image.format == "MPO" else ImageFormat(str(image.format))
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InputError(f"the image is {width}x{height}: it has no pixels")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise InputError(
            f"the image is {width}x{height}: a side longer than {MAX_IMAGE_SIDE:,} pixels "
            "is not a picture the model can take"
        )
    if image_format is not ImageFormat.JPEG and getattr(image, "is_animated", False):
        raise InputError(
            f"the {image_format.value} image is animated: send a single frame "
            "(animated images are not supported)"
        )
    orientation = _orientation(image)
    if orientation >= 5:  # the picture stands on its side: upright, its sides swap
        width, height = height, width
    if max_pixels is not None and width * height > max_pixels:
        raise InputError(_too_many_pixels(width, height, max_pixels))
    return ImageHeader(image_format, width, height, orientation)


def _orientation(image: Image.Image) -> int:
    """The EXIF (or XMP) orientation in the header, 1 when there is none or it is not one
    of the eight; Pillow's exif_transpose reads the same tags."""
    try:
        # The base class's reader: the PNG plugin's own decodes the whole image to look
        # for an eXIf chunk after the pixel data (the PNG spec puts it before).
        value = Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    except (SyntaxError, struct.error, ValueError, OSError, KeyError, IndexError, TypeError):
        # A malformed EXIF block: the picture as stored, as without one (Pillow's
        # exif_transpose would raise, and a photo is not refused for its metadata).
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    method = _UPRIGHT.get(orientation)
    return image if method is None else image.transpose(method)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' image processor converts a picture (its convert_to_rgb):
    anything transparent is composited onto white."""
    if image.mode.startswith("I;16"):
        # The high byte of each 16-bit value (the processor would clip them all to 255).
        image = image.point(lambda value: value / 256).convert("L")
        image.info.pop("transparency", None)  # a 16-bit key matches no 8-bit value
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _too_many_pixels(width: int, height: int, max_pixels: int) -> str:
    return f"the image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}"


def _unreadable(data: bytes, error: Exception) -> str:
    """Why Pillow could not read these bytes, in words: what they claim to be decides."""
    claimed = _claimed_format(data)
    if claimed in _ACCEPTED_NAMES:
        # Pillow's "cannot identify image file <_io.BytesIO object at 0x...>" says nothing more.
        detail = "" if isinstance(error, UnidentifiedImageError) else f" ({error})"
        return f"the {claimed} image is truncated or corrupt: its header could not be read{detail}"
    if claimed is not None:
        return f"{claimed} is not a supported image format: send {_ACCEPTED}"
    return f"the data ({len(data):,} bytes) is not a {_ACCEPTED} image"


def _claimed_format(data: bytes) -> str | None:
    """The format named by the first bytes (for messages only: Pillow decides what is read)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    # "BM" and a known DIB header size: plain text starting with "BM" is no bitmap.
    if data[:2] == b"BM" and int.from_bytes(data[14:18], "little") in (
        12,
        40,
        52,
        56,
        64,
        108,
        124,
    ):
        return "BMP"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIF"
    if data.startswith(b"%PDF-"):
        return "PDF"
    if data[:4] == b"\x00\x00\x01\x00":
        return "ICO"
    if data.lstrip()[:5].lower() in (b"<svg ", b"<?xml"):
        return "SVG"
    return None
