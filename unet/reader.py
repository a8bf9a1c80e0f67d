"""The one reader: a dataset file, an uploaded file or bytes -> an RGB uint8 slice, or a bool mask.

RGB means the file's own channel order, which the LGG dataset calls RGB: (pre-contrast, FLAIR, post-contrast).
Only PNG, JPEG, TIFF, BMP and WebP are decoded (Pillow is told so: an EPS named ``.png`` is never handed to
Ghostscript); OpenCV reads what Pillow cannot at full depth (16-bit colour, float colour TIFF). Grayscale is
repeated into three channels, transparency flattened onto black, EXIF orientation applied, and 16-bit or float
data rescaled by its own range in float32. Every failure is a `ReadError` whose one-line message names the file.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MAX_SIDE = 4096  # pixels per side; a larger image is refused from its header, before it is decoded
MAX_DECODED_BYTES = MAX_SIDE * MAX_SIDE * 3 * 4  # a float32 colour image at full size; float64 only below it
# OpenCV reads this once, before its first decode: it then refuses an image over MAX_SIDE x MAX_SIDE before
# allocating it, so a small compressed file cannot claim gigabytes.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_SIDE * MAX_SIDE))

import cv2  # after the pixel limit above
import numpy as np
from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")  # Pillow's names: the allow-list
SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*")
SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", *TIFF_SIGNATURES)  # how PNG, JPEG and TIFF files begin

# Pillow warns about damaged metadata (e.g. "Corrupt EXIF data"): a file either decodes or is refused in one line.
# A filter for the process, set once: catch_warnings is not thread-safe.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


class ReadError(ValueError):
    """A file that cannot be used as a slice or a mask; the message is one line and names the file."""


@dataclass
class Slice:
    image: np.ndarray  # HxWx3 uint8 in the file's order, (pre-contrast, FLAIR, post-contrast) for LGG
    notes: list[str] = field(default_factory=list)  # how the file was converted, for the page


def read_slice(source: str | Path | bytes, name: str | None = None) -> Slice:
    """An image file (path or bytes) -> `Slice`; ``name`` is what errors call it (default: the file's name)."""
    data, name = _bytes_of(source, name)
    if not data:
        raise ReadError(f"{name}: the file is empty")
    notes: list[str] = []
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            _refuse_oversize(name, *im.size)
            if im.mode in ("RGB", "RGBA") and ";16" in _rawmode(im):
                array = _opencv_decode(data, name, notes)  # Pillow would cut 16-bit colour to its high byte
            else:
                array = _pillow_pixels(im, notes)
    except ReadError:
        raise
    except Image.DecompressionBombError:
        raise ReadError(f"{name}: the image is too large to decode safely") from None
    except UnidentifiedImageError:
        if not data.startswith(TIFF_SIGNATURES):
            raise ReadError(f"{name}: not an image this app reads (PNG, JPEG, TIFF, BMP or WebP)") from None
        _refuse_wide_tiff(data, name)
        array = _opencv_decode(data, name, notes)  # e.g. a float colour TIFF
    except (OSError, ValueError, SyntaxError) as error:
        raise ReadError(f"{name}: the image is corrupt or truncated ({_first_line(error)})") from None
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1):
        notes.append(
            "grayscale image: repeated into the three channels the model reads "
            "(pre-contrast, FLAIR, post-contrast), so expect weaker results"
        )
    try:
        return Slice(to_rgb_uint8(array), notes)
    except ValueError as error:
        raise ReadError(f"{name}: {error}") from None


def read_image(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """`read_slice`'s pixels alone: HxWx3 uint8 RGB."""
    return read_slice(source, name).image


def read_mask(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """A mask file -> HxW bool; 0/255, 0/1 or 0 and any one value, gray or colour (alpha ignored)."""
    data, name = _bytes_of(source, name)
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            _refuse_oversize(name, *im.size)
            im = ImageOps.exif_transpose(im)  # as the image is turned, so must its mask be
            # Colour as it is: a gray conversion would weigh a pure red mask down to 76, under the cut.
            return binary_mask(np.asarray(im if im.mode in ("1", "L", "I;16", "I", "F") else im.convert("RGB")))
    except ReadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ReadError(f"{name}: the mask is not a readable image") from None


def binary_mask(mask: np.ndarray) -> np.ndarray:
    """A mask image, 0/255 or 0 and any other one value (0/1, 0/100), gray or colour (alpha ignored) -> HxW bool.

    Half of 255 separates a 0/255 mask saved lossily (JPEG) from its noise; a mask whose values all lie under it is
    read as zero against the rest.
    """
    gray = mask[..., :3].max(axis=2) if mask.ndim == 3 else mask
    return gray > (127 if gray.max() > 127 else 0)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Any decoded image array -> HxWx3 uint8 (the file's order).

    Grayscale is repeated into three channels, a fourth channel dropped, and 16-bit or float data rescaled by its
    own range (such files carry no fixed 0-255 scale), in float32: never a full-size float64 copy.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[2] in (3, 4):
        image = image[..., :3]
    elif image.ndim != 2:
        raise ValueError(f"expected a grayscale, RGB or RGBA image, got an array of shape {image.shape}")
    if image.dtype != np.uint8:
        image = _rescaled_uint8(image)  # before gray is repeated: a third of the work and of the memory
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image)


def _rescaled_uint8(image: np.ndarray) -> np.ndarray:
    """16-bit or float pixels -> uint8 by their own finite range (NaN and infinities count as 0), one band at a
    time in float32: a 4096 x 4096 float64 RGB image needs one 64 MB band beside it, not a float32 copy of all."""
    bands = [image] if image.ndim == 2 else [image[..., c] for c in range(image.shape[2])]

    def as_float32(band: np.ndarray) -> np.ndarray:
        values = band.astype(np.float32)
        return np.nan_to_num(values, copy=False, nan=0.0, posinf=0.0, neginf=0.0)

    ranges = [(float(v.min()), float(v.max())) for v in map(as_float32, bands)]
    low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
    out = np.zeros(image.shape, np.uint8)
    if not high > low:
        return out
    for c, band in enumerate(bands):
        values = as_float32(band)
        values -= low
        values *= 255.0 / (high - low)
        np.rint(values, out=values)
        if image.ndim == 2:
            out[...] = values
        else:
            out[..., c] = values
    return out


def _bytes_of(source: str | Path | bytes, name: str | None) -> tuple[bytes, str]:
    if isinstance(source, bytes):
        return source, name or "upload"
    path = Path(source)
    try:
        return path.read_bytes(), name or path.name
    except FileNotFoundError:
        raise ReadError(f"{name or path.name}: file not found") from None
    except OSError as error:
        raise ReadError(f"{name or path.name}: cannot be read ({error.strerror or type(error).__name__})") from None


def _pillow_pixels(im: Image.Image, notes: list[str]) -> np.ndarray:
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
        notes.append("transparency flattened onto black")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        notes.append(_rescaled_note(sixteen_bit=im.mode.startswith("I;16")))
    elif im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    return np.asarray(im)


def _opencv_decode(data: bytes, name: str, notes: list[str]) -> np.ndarray:
    """An image Pillow cannot read at full depth or at all, decoded by OpenCV in the file's order, transparency
    flattened onto black like Pillow's path; or ReadError."""
    try:
        with _opencv_silenced():
            array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:  # e.g. a header claiming more pixels than OPENCV_IO_MAX_IMAGE_PIXELS
        raise ReadError(f"{name}: the image is too large to decode safely") from None
    if array is None or array.ndim not in (2, 3):
        if data.startswith(SIGNATURES):  # the start of an image file whose rest is missing or damaged
            raise ReadError(f"{name}: the image is corrupt or truncated")
        raise ReadError(f"{name}: not an image this app reads (PNG, JPEG, TIFF, BMP or WebP)")
    _refuse_oversize(name, array.shape[1], array.shape[0])
    stored = array.dtype
    if array.ndim == 3 and array.shape[2] == 4:
        scale = np.float32(np.iinfo(stored).max if stored.kind in "ui" else 1.0)
        rgb = array[..., :3].astype(np.float32)
        rgb *= array[..., 3:] / scale  # in place: one float32 copy of the colours, not two
        array = rgb
        notes.append("transparency flattened onto black")
    if stored != np.uint8:
        notes.append(_rescaled_note(sixteen_bit=stored == np.uint16))
    return array[..., 2::-1] if array.ndim == 3 and array.shape[2] >= 3 else array  # BGR -> RGB


def _refuse_wide_tiff(data: bytes, name: str) -> None:
    """A TIFF whose pixels would take more than MAX_DECODED_BYTES, refused from its first directory: OpenCV decodes
    a TIFF through a buffer as large as the image, so a 4096 x 4096 float64 colour file would hold 800 MB."""
    try:
        tags = TiffImagePlugin.ImageFileDirectory_v2(ifh=data[:8])  # byte order and first directory's offset
        source = io.BytesIO(data)
        source.seek(tags.next)
        tags.load(source)
        width, height = int(tags.get(256, 0)), int(tags.get(257, 0))
        bits = tags.get(258, (1,))
        bits = max(bits) if isinstance(bits, tuple) else int(bits)
        samples = int(tags.get(277, 1))
    except (OSError, ValueError, SyntaxError, TypeError):
        return  # no readable directory: OpenCV refuses it in one line
    if not (width and height):
        return  # a directory cut short: OpenCV calls it corrupt or truncated
    _refuse_oversize(name, width, height)
    if width * height * samples * bits // 8 > MAX_DECODED_BYTES:
        raise ReadError(
            f"{name}: {width}x{height} pixels of {samples} x {bits}-bit samples take more than "
            f"{MAX_DECODED_BYTES // 2**20} MB to decode; save it at 32 bits or fewer"
        )


def _refuse_oversize(name: str, width: int, height: int) -> None:
    if width > MAX_SIDE or height > MAX_SIDE:
        raise ReadError(f"{name}: the image is {width}x{height} pixels; at most {MAX_SIDE}x{MAX_SIDE} is accepted")
    if width < 1 or height < 1:
        raise ReadError(f"{name}: the image has no pixels")


def _rawmode(im: Image.Image) -> str:
    args = im.tile[0].args if im.tile else ""
    return args if isinstance(args, str) else str(args[0]) if args else ""


def _rescaled_note(sixteen_bit: bool) -> str:
    return f"{'16-bit' if sixteen_bit else 'high bit-depth'} image: rescaled to 8 bits by its own intensity range"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def _opencv_silenced() -> Iterator[None]:
    """Without OpenCV's own log lines for a damaged file: the caller raises one line naming it."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)
