"""The model card (``model.json``): the typed contract between export, the registry, evaluation and serving.

A model artifact is a folder with ``model.onnx`` and ``model.json``. The graph takes one input, :data:`INPUT_NAME`
(raw ``uint8`` images N x H x W x C, dynamic N), and returns :data:`LOGITS` and :data:`PROBABILITIES`
(N x classes, float32); those names are defined here and nowhere else. The card says what the graph expects and
where it came from: class names, the input spec, validation and test metrics, the parity check it passed, its
lineage (with the validation split it was chosen on) and the sha256 of its files.

The card is written as indented JSON with its keys in the order of the fields below; that layout, and the digest
the registry records (:meth:`ModelCard.digest`), are what cards already written look like, so they keep reading
and verifying. This module is a leaf (pydantic and the standard library): the server reads cards without loading
the training or registry stages.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    JsonValue,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from distml.errors import ModelError, NotFoundError

ONNX_FILE = "model.onnx"
CARD_FILE = "model.json"
CHECKPOINT_FILE = "checkpoint.pt"
FORMAT: Final = 1  # the card layout this distml reads and writes
INPUT_NAME = "images"  # the graph's one input
LOGITS = "logits"
PROBABILITIES = "probabilities"  # what prediction, evaluation and serving run the graph for
OUTPUT_NAMES = (LOGITS, PROBABILITIES)  # the graph's outputs, in order
# The parity rule: ONNX Runtime's probabilities within this of PyTorch's, and every top-1 class the same.
PARITY_MAX_ABS = 1e-4


def model_name_for(dataset_name: str) -> str:
    """The registered model of a dataset task: ``fashion-mnist`` -> ``fashion-mnist-classifier``."""
    return f"{dataset_name}-classifier"


class _Part(BaseModel):
    """A part of the card: immutable, and no field the format does not define."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorSpec(_Part):
    name: str
    dtype: str
    shape: list[int]  # -1: any size (the batch)


class ImageInput(TensorSpec):
    layout: Literal["NHWC"]


class Normalisation(_Part):
    """Per-channel mean and std of the training split (pixels scaled to [0, 1]), applied inside the graph."""

    mean: list[float]
    std: list[float]


def _without(data: dict[str, object], keys: tuple[str, ...]) -> dict[str, object]:
    """``data`` less those of ``keys`` that are None: a card written before they existed keeps its bytes."""
    for key in keys:
        if data.get(key, 0) is None:
            del data[key]
    return data


class Metrics(_Part):
    """The training run's final metrics (None when the run did not measure one).

    The validation numbers are what a model was chosen on; the test numbers are reported, never used to choose.
    """

    test_accuracy: float | None
    test_loss: float | None
    epochs: int | None
    parameters: int | None
    val_accuracy: float | None = None  # on lineage.validation; None: no validation split (or an older card)
    val_loss: float | None = None

    @model_serializer(mode="wrap")
    def _without_unmeasured(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        return _without(handler(self), ("val_accuracy", "val_loss"))


class Parity(_Part):
    """How closely ONNX Runtime reproduced PyTorch on the export's check images."""

    images: int
    max_abs_diff_probabilities: float
    top1_agreement: float
    limit: float = PARITY_MAX_ABS  # the limit in force at export, for the record (the rule is the constant)

    @property
    def ok(self) -> bool:
        """The parity rule, whatever limit the card itself records."""
        return self.max_abs_diff_probabilities <= PARITY_MAX_ABS and self.top1_agreement == 1.0

    def describe(self) -> str:
        return (
            f"{self.images} images, max |p_onnx - p_torch| {self.max_abs_diff_probabilities:.2e}, "
            f"top-1 agreement {self.top1_agreement:.2%}"
        )


class ValidationSplit(_Part):
    """The train images a run held out for validation: :func:`distml.data.split.validation_record`."""

    fraction: float
    seed: int
    images: int
    indices_sha256: str  # equal for equal splits: models are only compared on the same one


class Lineage(_Part):
    dataset: str
    dataset_digest: str
    training_run: str
    mlflow_run_id: str | None  # None: the training run was not tracked
    checkpoint: str
    world_size: int
    config: dict[str, JsonValue]  # the training config as resolved (TrainConfig, dumped)
    code_version: str
    validation: ValidationSplit | None = None  # None: a card from before validation splits

    @model_serializer(mode="wrap")
    def _without_unknown_split(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        return _without(handler(self), ("validation",))


class FileEntry(_Part):
    sha256: str
    bytes: int | None = None  # recorded for the graph, not for the checkpoint

    @model_serializer(mode="wrap")
    def _without_unknown_size(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        # Written as before: an entry without a size has no "bytes" key (not "bytes": null).
        data: dict[str, object] = handler(self)
        if self.bytes is None:
            data.pop("bytes", None)
        return data


class ModelCard(_Part):
    """``model.json``. Read with :meth:`read`, written with :meth:`dumps`."""

    format: Literal[1]
    name: str
    version: str | None  # set by the registry when it stores a copy; None in an exported folder
    task: Literal["image-classification"]
    class_names: list[str]
    input: ImageInput
    outputs: list[TensorSpec]
    normalisation: Normalisation
    metrics: Metrics
    parity: Parity
    lineage: Lineage
    files: dict[str, FileEntry]
    created: str  # UTC, ISO 8601

    @model_validator(mode="after")
    def _lists_the_graph(self) -> ModelCard:
        if ONNX_FILE not in self.files:
            raise ValueError(f"files lists no {ONNX_FILE}")
        return self

    @property
    def onnx_sha256(self) -> str:
        """The sha256 of ``model.onnx`` this card vouches for."""
        return self.files[ONNX_FILE].sha256

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one input image."""
        h, w, c = self.input.shape[1:]
        return h, w, c

    @classmethod
    def read(cls, path: Path) -> ModelCard:
        """The card in ``path``; a missing, unreadable or invalid card is a one-line error (:mod:`distml.errors`)."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise NotFoundError(f"{path} does not exist", hint="a model artifact folder holds model.json") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"{path} cannot be read: {exc}") from None
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise ModelError(f"{path} is not a valid model card (JSONDecodeError: {exc})") from None
        if isinstance(document, dict) and document.get("format") != FORMAT:
            raise ModelError(f"{path} has format {document.get('format')!r}; this distml reads format {FORMAT}")
        try:
            return cls.model_validate(document)
        except ValidationError as exc:
            raise ModelError(f"{path} is not a valid model card ({_first_problem(exc)})") from None

    def dumps(self) -> str:
        """The card as ``model.json`` holds it: indented JSON, keys in field order, a final newline."""
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"

    def digest(self) -> str:
        """The sha256 the registry records for the card: canonical JSON without ``version`` (the registry's own)."""
        content = {key: value for key, value in self.model_dump(mode="json").items() if key != "version"}
        return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _first_problem(exc: ValidationError) -> str:
    """Pydantic's first error on one line (``lineage.dataset: Field required``), and how many more there are."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "the card"
    more = f"; and {len(errors) - 1} more" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"
