"""Image loading, the same everywhere (training, ``extract_vis_emb.py``, retrieval, the app, a PIL
image handed to the model): decode, check, orient, convert to RGB.

Unusable images raise :class:`UnusableImage` with one of :data:`IMAGE_SKIP_REASONS`: the file
vanished (``missing_image``), cannot be opened (``unreadable_image``), is not an image
(``not_an_image``), fails to decode, e.g. truncated (``corrupt_image``), is a decompression bomb
(``too_large``), is degenerate (``too_small``, ``extreme_aspect``, see :class:`ImageChecks`), has a
colour mode that has no RGB conversion (``unsupported_mode``) or made the preprocessing fail
(``preprocess_error``).

Colour handling (:func:`to_rgb`): grayscale, palette, CMYK and YCbCr images are converted
to RGB; anything with transparency (RGBA, LA, PA, palette or L/RGB with a ``tRNS`` key) is
composited on white, because CLIP-style pipelines and web pages show transparent pixels on a
light background while a plain ``convert("RGB")`` exposes whatever colour the invisible pixels
happen to store (often black); 16-bit and 32-bit grayscale is rescaled to 8 bits rather than
clipped (a plain ``convert`` saturates 16-bit values to white). EXIF orientation is applied
first (:func:`prepare_image`): phones store photos sideways with an Orientation tag, browsers and
Gradio show them upright, and the same photo must get the same embedding through every door
(training, ``extract_vis_emb.py``, ``unimur.inference.session``, the app, a PIL image handed to the model).
open_clip and FROMAGe ignore the tag, so for such photos (only) features differ from theirs.
:data:`IMAGE_LOADER_VERSION` names these rules; the feature caches' keys include it.

Degenerate images, decided here: an image whose shorter side is below 8 px is skipped
(``too_small``). In web crawls these are tracking pixels, spacers and "image removed"
stubs rather than the photo the caption describes, and upsampling one to the encoder's
resolution gives a flat colour. Aspect ratios beyond 20:1 are skipped (``extreme_aspect``):
CLIP's resize-shorter-side-then-center-crop keeps under 5% of such a banner, and the
intermediate resize of a 1:10^5 strip would take gigabytes.
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

# Kinds of unusable images found when a sample is loaded. The order is part of the feature
# cache format (skip codes are 1 + position here): append new reasons, never reorder.
IMAGE_SKIP_REASONS = (
    "missing_image",
    "unreadable_image",
    "not_an_image",
    "corrupt_image",
    "too_large",
    "too_small",
    "extreme_aspect",
    "unsupported_mode",
    "preprocess_error",
)

# The image loading rules (load_rgb_image / prepare_image): part of every cache key of features
# computed from image files. 2: EXIF orientation applied.
IMAGE_LOADER_VERSION = 2


@dataclass(frozen=True)
class ImageChecks:
    """Limits beyond which an image is skipped rather than fed to the encoder.

    min_side: shorter side in pixels below which an image is ``too_small`` (see module doc).
    max_aspect: longer/shorter side ratio above which an image is ``extreme_aspect``.
    max_pixels: width*height above which an image is ``too_large`` (checked from the header,
        before decoding; PIL's own decompression-bomb limit by default).
    """

    min_side: int = 8
    max_aspect: float = 20.0
    max_pixels: int = 89_478_485


class UnusableImage(Exception):
    """An image that cannot be used; ``reason`` is one of IMAGE_SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def load_rgb_image(path: str | os.PathLike, checks: ImageChecks = ImageChecks()) -> Image.Image:
    """Open, check, fully decode and convert an image to RGB; raise UnusableImage otherwise."""
    try:
        with warnings.catch_warnings():
            # PIL only *warns* between MAX_IMAGE_PIXELS and twice that: make it an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(image_bytes_or_path(path))
    except FileNotFoundError as e:
        raise UnusableImage("missing_image", str(e)) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnusableImage("too_large", str(e)) from e
    except UnidentifiedImageError as e:
        raise UnusableImage("not_an_image", str(e)) from e
    except OSError as e:  # permissions, a directory, I/O errors
        raise UnusableImage("unreadable_image", str(e)) from e
    except Exception as e:  # PIL plugins raise SyntaxError, struct.error, ... on garbage headers
        raise UnusableImage("not_an_image", f"{type(e).__name__}: {e}") from e
    with img:
        _check_geometry(img.size, checks)
        try:
            img.load()  # decode now, so a truncated file fails here and not inside preprocess
        except Exception as e:  # OSError("image file is truncated"), SyntaxError, ValueError, ...
            raise UnusableImage("corrupt_image", f"{type(e).__name__}: {e}") from e
        return prepare_image(img)


def prepare_image(img: Image.Image) -> Image.Image:
    """A decoded image as the encoders see it, wherever it comes from: EXIF orientation
    applied, then :func:`to_rgb` (alpha composited on white). Returns a new image."""
    return to_rgb(_upright(img))


_ORIENTATION = 0x0112  # EXIF tag 274


def _upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF Orientation tag says (1 or absent: as stored)."""
    try:
        if img.getexif().get(_ORIENTATION, 1) in (1, None):
            return img
        return ImageOps.exif_transpose(img)
    except Exception as e:  # a malformed EXIF block: the pixels are still usable as stored
        logger.debug("EXIF orientation not applied (%s: %s)", type(e).__name__, e)
        return img


def image_bytes_or_path(path: str | os.PathLike):
    """A path, or for a tar member reference (``tar<NUL>offset<NUL>size``, see
    ``unimur.data.cc3m_sources.tar_member_ref``) its bytes: one seek + read, no tar parsing."""
    path = os.fspath(path)
    if "\0" not in path:
        return path
    tar, offset, size = path.split("\0")
    with open(tar, "rb") as f:
        f.seek(int(offset))
        return io.BytesIO(f.read(int(size)))  # a short read surfaces as a corrupt image


def _check_geometry(size: tuple[int, int], checks: ImageChecks) -> None:
    width, height = size
    if width * height > checks.max_pixels:
        raise UnusableImage("too_large", f"{width}x{height} pixels")
    if min(width, height) < checks.min_side:
        raise UnusableImage("too_small", f"{width}x{height} pixels")
    if max(width, height) > checks.max_aspect * min(width, height):
        raise UnusableImage("extreme_aspect", f"{width}x{height} pixels")


_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image to RGB (see module docstring for the rules)."""
    try:
        if img.mode == "RGB" and "transparency" not in img.info:
            return img.copy()  # a copy, so the caller may close the original file
        if _has_alpha(img):
            return _composite_on_white(img)
        if img.mode in _HIGH_BIT_DEPTH_MODES:
            return _high_bit_depth_to_rgb(img)
        return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, ...
    except (ValueError, OSError) as e:  # e.g. "conversion from LAB to RGB not supported"
        raise UnusableImage("unsupported_mode", f"mode {img.mode}: {e}") from e


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale -> 8-bit RGB by rescaling (convert() would clip).

    ``I;16*`` spans 0..65535. ``I`` and ``F`` carry no range: values already within 0..255 are
    kept, values within 0..65535 are treated as 16-bit, anything else is min-max stretched.
    """
    values = np.asarray(img).astype(np.float64)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (lo >= 0 and 255 < hi <= 65535):
        values = values / 257.0
    elif lo < 0 or hi > 65535:
        values = (values - lo) / max(hi - lo, 1e-12) * 255.0
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")
