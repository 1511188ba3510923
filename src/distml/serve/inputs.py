"""What both protocols hand to the server: a batch of images, either still encoded or already pixels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from distml.errors import RequestError
from distml.serve.codec import InputSpec, decode_image

# Decoding this many encoded bytes or more goes to a worker thread: below it, the hop costs more than it frees.
OFFLOAD_BYTES = 64 << 10


@dataclass(frozen=True)
class Inputs:
    """``encoded`` image files, or ``pixels`` as ``uint8`` N x H x W x C; exactly one is set."""

    encoded: list[bytes] | None = None
    pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.encoded) if self.encoded is not None else len(self.pixels)  # type: ignore[arg-type]

    @property
    def worth_offloading(self) -> bool:
        return self.encoded is not None and sum(map(len, self.encoded)) >= OFFLOAD_BYTES

    def decode(self, spec: InputSpec, where: str) -> np.ndarray:
        """The images as one ``uint8`` N x H x W x C array (decoding encoded ones)."""
        if self.pixels is not None:
            return np.ascontiguousarray(self.pixels)
        assert self.encoded is not None
        out = np.empty((len(self.encoded), *spec.shape), dtype=np.uint8)
        for i, data in enumerate(self.encoded):
            out[i] = decode_image(data, spec, f"{where}[{i}]")
        return out


def load_json(body: bytes) -> Any:
    """Parse a JSON body; a 400 that quotes the parser's complaint when it is not JSON."""
    if not body:
        raise RequestError("the body is empty; send a JSON document")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"the body is not valid JSON: {exc}") from None
