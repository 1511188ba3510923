"""Turning what clients send into the model's input: encoded images and pixel arrays -> ``uint8`` H x W x C.

Both protocols come through here, so V1 and V2 accept the same things with the same limits and the same
messages:

- **Encoded images** (PNG or JPEG bytes). The header is read first, so a 10,000 x 10,000 image or a
  decompression bomb is refused before a pixel is decoded. The image is converted to the model's channels
  (grayscale ``L`` or ``RGB``) and resized (bilinear) to the model's H x W when it differs.
- **Pixel arrays** must already be the model's H x W (x C; C may be left out for 1-channel models). Integers are
  ``uint8`` pixels (0..255); floats are intensities in [0, 1], scaled by 255 and rounded. Anything else (other
  shapes, out-of-range values, NaN, booleans, strings) is a 400 that says which instance and what was expected.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from distml.errors import PayloadTooLargeError, RequestError

FORMATS = ("PNG", "JPEG")


@dataclass(frozen=True)
class InputSpec:
    """What the model takes, and the limits on what clients may send to make it."""

    height: int
    width: int
    channels: int
    max_image_side: int = 4096
    max_image_pixels: int = 4096 * 4096

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, self.channels

    def describe(self) -> str:
        return f"{self.height}x{self.width}x{self.channels}"


def b64decode(text: Any, where: str) -> bytes:
    """Strict base64 (standard alphabet, padding optional): a 400 naming ``where`` on anything else."""
    if not isinstance(text, str | bytes):
        raise RequestError(f"{where}: expected a base64 string, got {type(text).__name__}")
    if isinstance(text, str):
        try:
            text = text.encode("ascii")
        except UnicodeEncodeError:
            raise RequestError(f"{where}: is not base64 (non-ASCII characters)") from None
    text = text.strip()
    if len(text) % 4:
        text += b"=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: is not valid base64") from None


def decode_image(data: bytes, spec: InputSpec, where: str) -> np.ndarray:
    """PNG/JPEG bytes -> ``uint8`` H x W x C at the model's size, with the pixel limits checked before decoding."""
    if not data:
        raise RequestError(f"{where}: the image is empty")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns (or raises) on its global limit; ours below is stricter and per server.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise RequestError(f"{where}: is not a PNG or JPEG image") from None
    except Image.DecompressionBombError as exc:  # a header far beyond even Pillow's own limit
        raise PayloadTooLargeError(f"{where}: the image is a decompression bomb ({_short(exc)})") from None
    with image:
        if image.format not in FORMATS:
            raise RequestError(f"{where}: is a {image.format} image; send PNG or JPEG")
        width, height = image.size
        if max(width, height) > spec.max_image_side or width * height > spec.max_image_pixels:
            raise PayloadTooLargeError(
                f"{where}: the image is {width}x{height} pixels; the limit is {spec.max_image_side} on a side "
                f"and {spec.max_image_pixels:,} in all"
            )
        mode = "L" if spec.channels == 1 else "RGB"
        try:
            if image.format == "JPEG":
                image.draft(mode, (spec.width, spec.height))  # let libjpeg scale down while decoding
            converted = image.convert(mode)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise RequestError(f"{where}: the image cannot be decoded ({_short(exc)})") from None
    if converted.size != (spec.width, spec.height):
        converted = converted.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    return np.asarray(converted, dtype=np.uint8).reshape(spec.shape)


def pixels_to_uint8(array: np.ndarray, where: str) -> np.ndarray:
    """An integer (0..255) or float ([0, 1]) array -> ``uint8``; a 400 naming ``where`` for anything else."""
    kind = array.dtype.kind
    if kind in "iu":
        if array.size and (array.min() < 0 or array.max() > 255):
            raise RequestError(f"{where}: integer pixels must be in 0..255 (got {array.min()}..{array.max()})")
        return array.astype(np.uint8, copy=False)
    if kind == "f":
        if array.size:
            low, high = float(array.min()), float(array.max())
            if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 1:
                raise RequestError(
                    f"{where}: float pixels must be intensities in [0, 1] (got {low:g}..{high:g}); "
                    "send integers for 0..255"
                )
        return np.rint(array * 255.0).astype(np.uint8)
    raise RequestError(f"{where}: pixels must be numbers, got {_kind_name(array)}")


def pixel_instances(instances: Sequence[Any], spec: InputSpec, where: str) -> np.ndarray:
    """Nested lists of pixels, one per instance -> ``uint8`` N x H x W x C."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # ragged input: numpy warns on some versions, raises on others
            array = np.asarray(instances)
    except (ValueError, TypeError, OverflowError, np.exceptions.VisibleDeprecationWarning):
        raise RequestError(f"{where}: pixel arrays must be rectangular, each {_shape_words(spec)}") from None
    if array.ndim == 3 and spec.channels == 1:
        array = array[..., np.newaxis]
    if array.shape[1:] != spec.shape:
        got = "x".join(str(d) for d in array.shape[1:]) or "a scalar"
        raise RequestError(f"{where}: each pixel array must be {_shape_words(spec)}, got {got}")
    return pixels_to_uint8(array, where)


def _shape_words(spec: InputSpec) -> str:
    hw = f"{spec.height}x{spec.width}"
    return f"{hw} or {hw}x1" if spec.channels == 1 else f"{hw}x{spec.channels}"


def _kind_name(array: np.ndarray) -> str:
    return {"b": "booleans", "U": "strings", "S": "bytes", "O": "mixed values"}.get(array.dtype.kind, str(array.dtype))


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
