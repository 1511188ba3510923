"""The validation split: which images of a dataset's train split are held out to choose between models.

Choosing a model by the accuracy it then reports (test accuracy) flatters it; distml chooses on a validation
split carved from train and keeps the test split for the report. The split is a pure function of
``(n, fraction, seed)``: training, a resumed run, evaluation of the exported model and every candidate of a search
recompute the same indices from the run's config, nothing is stored but the record :func:`validation_record`
makes. A leaf module (numpy and the standard library only).
"""

from __future__ import annotations

import hashlib
from typing import TypedDict

import numpy as np


class ValidationRecord(TypedDict):
    """What a run records about its validation split; ``indices_sha256`` tells two splits apart."""

    fraction: float
    seed: int
    images: int
    indices_sha256: str


def validation_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) of a train split of ``n`` images, each sorted ``int64``.

    ``round(n * fraction)`` images, the first of a permutation drawn from ``np.random.default_rng(seed)``, form
    the validation split; the rest stay for training. ``fraction`` 0 gives an empty validation split.
    """
    if n < 0 or not 0 <= fraction < 1:
        raise ValueError(f"need n >= 0 and 0 <= fraction < 1, not n={n}, fraction={fraction}")
    count = round(n * fraction)
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return np.sort(perm[count:]), np.sort(perm[:count])


def indices_sha256(indices: np.ndarray) -> str:
    """The sha256 of the indices as little-endian ``int64``: equal for equal splits, whatever made them."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()


def validation_record(n: int, fraction: float, seed: int) -> ValidationRecord:
    """The record of the validation split of ``n`` train images (as ``result.json`` and the model card hold it)."""
    _, val = validation_indices(n, fraction, seed)
    return {"fraction": float(fraction), "seed": int(seed), "images": len(val), "indices_sha256": indices_sha256(val)}
