"""What both protocols hand to the server: a batch of images, either still encoded or already pixels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from distml.errors import PayloadTooLargeError, RequestError
from distml.serve.codec import InputSpec, declared_pixels, decode_images

# Decoding this many encoded bytes or more goes to a worker thread: below it, the hop costs more than it frees.
OFFLOAD_BYTES = 64 << 10
# ...and so does decoding this many pixels (a 512 x 512 image, a few ms): a 16 KB PNG can hold 16 million.
OFFLOAD_PIXELS = 512 * 512
# Commas a request may hold beyond its pixel values: object members, shape, outputs, a client's parameters.
JSON_SLACK = 4096


@dataclass(frozen=True)
class Inputs:
    """``encoded`` image files, or ``pixels`` as ``uint8`` N x H x W x C; exactly one is set."""

    encoded: list[bytes] | None = None
    pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.encoded) if self.encoded is not None else len(self.pixels)  # type: ignore[arg-type]

    @property
    def worth_offloading(self) -> bool:
        """Whether decoding is costly enough for a worker thread: by bytes, or by the pixels PNG/JPEG headers
        declare (read by hand, microseconds); an image whose size cannot be told that way counts as costly."""
        if self.encoded is None:
            return False
        if sum(map(len, self.encoded)) >= OFFLOAD_BYTES:
            return True
        pixels = 0
        for data in self.encoded:
            declared = declared_pixels(data)
            if declared is None:
                return True
            pixels += declared
        return pixels >= OFFLOAD_PIXELS

    def decode(self, spec: InputSpec, where: str) -> np.ndarray:
        """The images as one ``uint8`` N x H x W x C array (decoding encoded ones within ``spec``'s pixel budget
        and decode deadline; see :func:`~distml.serve.codec.decode_images`). Thread-safe."""
        if self.pixels is not None:
            return np.ascontiguousarray(self.pixels)
        assert self.encoded is not None
        return decode_images(self.encoded, spec, where)


def load_json(body: bytes, spec: InputSpec | None = None, max_instances: int | None = None) -> Any:
    """Parse a JSON body; a 400 that quotes the parser's complaint when it is not JSON.

    With ``spec`` and ``max_instances``, a body with more commas than any valid request to that model can hold
    (``max_instances`` images of pixel values, plus :data:`JSON_SLACK`) is refused (413) before it is parsed: a
    16 MiB array of numbers costs ~1 s and ~200 MiB as Python objects and NumPy arrays, its commas ~10 ms.
    Base64 has no commas, so encoded images never count against this.
    """
    if not body:
        raise RequestError("the body is empty; send a JSON document")
    if spec is not None and max_instances is not None:
        limit = max_instances * spec.values_per_image + JSON_SLACK
        commas = body.count(b",")
        if commas > limit:
            raise PayloadTooLargeError(
                f"the body holds {commas:,} commas: more values than {max_instances:,} images of "
                f"{spec.describe()} pixels need (at most {limit:,}); send at most {max_instances:,} images"
            )
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"the body is not valid JSON: {exc}") from None
