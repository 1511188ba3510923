"""Turning what clients send into the model's input: encoded images and pixel arrays -> ``uint8`` H x W x C.

Both protocols come through here, so V1 and V2 accept the same things with the same limits and the same
messages:

- **Encoded images** (PNG or JPEG bytes; only Pillow's PNG and JPEG parsers ever see the untrusted bytes). Every
  image's header is read first, so a 10,000 x 10,000 image, a decompression bomb, or a request whose images add
  up to more than ``max_request_pixels`` is refused before a pixel is decoded. Decoding stops with a 503 when it
  runs past ``decode_timeout_s`` (checked between images; one image is bounded by the per-image pixel caps). The
  image is converted to the model's channels (grayscale ``L`` or ``RGB``) and resized (bilinear) to the model's
  H x W when it differs.
- **Pixel arrays** must already be the model's H x W (x C; C may be left out for 1-channel models). Integers are
  ``uint8`` pixels (0..255); floats are intensities in [0, 1], scaled by 255 and rounded. Anything else (other
  shapes, out-of-range values, NaN, booleans, strings) is a 400 that says which instance and what was expected.

Everything here is a pure function of its arguments (no shared state, no ``warnings.catch_warnings``, which is
not thread-safe), so the server may parse and decode on worker threads.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import time
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from distml.errors import OverloadedError, PayloadTooLargeError, RequestError

FORMATS = ("PNG", "JPEG")
# Same defaults as ServeConfig (tests/test_serve_units.py checks they agree); the server passes its own values.
MAX_REQUEST_PIXELS = 2 * 4096 * 4096
DECODE_TIMEOUT_S = 5.0
MAX_RESPONSE_BYTES = 64 << 20
# Other formats, recognised by their magic bytes only, so the error can say what was sent without a parser
# for it ever running on the client's bytes.
_MAGIC = ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}

# Pillow warns (and past twice its global limit raises) on images over its MAX_IMAGE_PIXELS; the per-server caps
# below are stricter, so the warning is only noise. Set once here: catch_warnings() per call would race between
# the threads that decode, and a leaked filter is process-wide.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class InputSpec:
    """What the model takes, and the limits on what clients may send to make it."""

    height: int
    width: int
    channels: int
    max_image_side: int = 4096
    max_image_pixels: int = 4096 * 4096
    max_request_pixels: int = MAX_REQUEST_PIXELS  # width x height summed over one request's encoded images
    decode_timeout_s: float = DECODE_TIMEOUT_S  # longest one request's images may take to decode (503 past it)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, self.channels

    @property
    def values_per_image(self) -> int:
        return self.height * self.width * self.channels

    def describe(self) -> str:
        return f"{self.height}x{self.width}x{self.channels}"


class ResponseTooLargeError(RequestError):
    """The answer would be over the server's response-size limit (500).

    A 500 because the request is valid: with each output asked for at most once, the answer grows with the
    number of images, which the server's own ``max_instances`` allows; an answer over ``max_response_bytes``
    means those two limits disagree (a server setting), not that the client did wrong. The message still says
    how to get an answer: fewer images per request.
    """

    status = 500


def check_response_size(size: int, max_bytes: int, images: int) -> None:
    """Raise :class:`ResponseTooLargeError` when a response of ``size`` bytes (for ``images`` images) is too big."""
    if size > max_bytes:
        raise ResponseTooLargeError(
            f"the response for {images:,} images would be {size:,} bytes or more; this server answers at most "
            f"{max_bytes:,} bytes (serve.max_response_bytes): send fewer images per request"
        )


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


def open_image(data: bytes, spec: InputSpec, where: str) -> ImageFile.ImageFile:
    """Read only the header of PNG/JPEG ``data``: the image, not yet decoded, within the per-image pixel caps."""
    if not data:
        raise RequestError(f"{where}: the image is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        other = next((name for magic, name in _MAGIC if data.startswith(magic)), None)
        if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
            other = "WEBP"
        if other is not None:
            raise RequestError(f"{where}: is a {other} image; send PNG or JPEG") from None
        raise RequestError(f"{where}: is not a PNG or JPEG image") from None
    except Image.DecompressionBombError as exc:  # a header far beyond even Pillow's own limit
        raise PayloadTooLargeError(f"{where}: the image is a decompression bomb ({_short(exc)})") from None
    except (OSError, ValueError, SyntaxError, struct.error) as exc:  # a PNG/JPEG header that does not parse
        raise RequestError(f"{where}: the image cannot be decoded ({_short(exc)})") from None
    width, height = image.size
    if max(width, height) > spec.max_image_side or width * height > spec.max_image_pixels:
        image.close()
        raise PayloadTooLargeError(
            f"{where}: the image is {width}x{height} pixels; the limit is {spec.max_image_side} on a side "
            f"and {spec.max_image_pixels:,} in all"
        )
    return image


def decode_opened(image: ImageFile.ImageFile, spec: InputSpec, where: str) -> np.ndarray:
    """An image from :func:`open_image` -> ``uint8`` H x W x C at the model's size."""
    mode = "L" if spec.channels == 1 else "RGB"
    try:
        if image.format == "JPEG":
            image.draft(mode, (spec.width, spec.height))  # let libjpeg scale down while decoding
        converted = image.convert(mode)
    except (OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError) as exc:
        raise RequestError(f"{where}: the image cannot be decoded ({_short(exc)})") from None
    if converted.size != (spec.width, spec.height):
        converted = converted.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    return np.asarray(converted, dtype=np.uint8).reshape(spec.shape)


def decode_image(data: bytes, spec: InputSpec, where: str) -> np.ndarray:
    """PNG/JPEG bytes -> ``uint8`` H x W x C at the model's size, with the pixel limits checked before decoding."""
    with open_image(data, spec, where) as image:
        return decode_opened(image, spec, where)


def decode_images(encoded: Sequence[bytes], spec: InputSpec, where: str) -> np.ndarray:
    """Encoded images -> ``uint8`` N x H x W x C, within the request's pixel budget and decode deadline.

    Every header is read (and every per-image cap checked) before any image is decoded, and the sum of their
    width x height must be within ``spec.max_request_pixels`` (413): decode CPU follows the pixels, not the
    body, and a 16 KB PNG can hold 16 million of them. The deadline (``spec.decode_timeout_s``) is checked
    between images; past it the request is a 503 with ``Retry-After``.
    """
    started = time.monotonic()
    out = np.empty((len(encoded), *spec.shape), dtype=np.uint8)
    with ExitStack() as stack:
        images = [stack.enter_context(open_image(data, spec, f"{where}[{i}]")) for i, data in enumerate(encoded)]
        total = sum(image.size[0] * image.size[1] for image in images)
        if total > spec.max_request_pixels:
            raise PayloadTooLargeError(
                f"{where}: the request's {len(images):,} images are {total:,} pixels in all (width x height, "
                f"from their headers); the limit is {spec.max_request_pixels:,} per request: send fewer or "
                "smaller images"
            )
        for i, image in enumerate(images):
            if i and time.monotonic() - started > spec.decode_timeout_s:
                raise OverloadedError(
                    f"{where}: decoding took over {spec.decode_timeout_s:g} s and was stopped after {i} of "
                    f"{len(images)} images; the server is busy: retry later, or send fewer or smaller images"
                )
            out[i] = decode_opened(image, spec, f"{where}[{i}]")
    return out


def declared_pixels(data: bytes) -> int | None:
    """Width x height from a PNG or baseline/progressive JPEG header, by hand and in microseconds (no Pillow);
    ``None`` when it cannot tell. Used only to decide where to decode, never to accept an image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack_from(">II", data, 16)
        return int(width) * int(height)
    if data.startswith(b"\xff\xd8"):
        at = 2
        for _ in range(64):  # markers before the frame header; a file with more is treated as unknown
            if at + 9 > len(data) or data[at] != 0xFF:
                return None
            marker = data[at + 1]
            if marker in _JPEG_SOF:
                height, width = struct.unpack_from(">HH", data, at + 5)
                return int(width) * int(height)
            if marker == 0xFF:  # fill byte
                at += 1
            elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
                at += 2
            else:
                at += 2 + struct.unpack_from(">H", data, at + 2)[0]
    return None


def pixels_to_uint8(array: np.ndarray, where: str) -> np.ndarray:
    """An integer (0..255) or float ([0, 1]) array -> ``uint8``; a 400 naming ``where`` for anything else."""
    if array.dtype == np.uint8:  # raw UINT8 (gRPC, the binary extension): in range by type, nothing to check
        return array
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


def nesting(data: list[Any], max_depth: int, where: str, allowed: str) -> tuple[int, ...]:
    """The shape ``data`` claims along its first elements (``[[1, 2], ...]`` -> ``(n, 2)``), walked without
    recursion and refused (400) past ``max_depth`` levels: how deep and how big a nested list is, known before
    NumPy is asked to build anything from it."""
    dims: list[int] = []
    node: Any = data
    while isinstance(node, list):
        if len(dims) == max_depth:
            raise RequestError(f"{where}: is nested more than {max_depth} lists deep; {allowed}")
        dims.append(len(node))
        if not node:
            break
        node = node[0]
    return tuple(dims)


def pixel_instances(instances: Sequence[Any], spec: InputSpec, where: str) -> np.ndarray:
    """Nested lists of pixels, one per instance -> ``uint8`` N x H x W x C."""
    nesting(list(instances[:1]), 4, where, f"each pixel array must be {_shape_words(spec)}")
    try:
        array = np.asarray(instances)  # ragged input raises ValueError on every NumPy the project allows (>= 1.24)
    except (ValueError, TypeError, OverflowError):
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
