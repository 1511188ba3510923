"""The data stage: dataset sources, the verified sharded store, and the reader API.

Typical use::

    from distml.data import open_dataset
    train = open_dataset("fashion-mnist").split("train")
    part = train.shard(rank, world_size)          # only this rank's shard files are opened
    images, labels = train.to_torch()             # the whole split as uint8 / int64 tensors

The names below are a convenience for users and scripts, loaded from their submodule on first use. Code inside
``distml`` imports the submodule itself (``from distml.data.reader import open_path``): then importing
``distml.data.reader`` loads only the reader, and a pipeline step's code version
(:mod:`distml.pipeline.codever`) covers only the modules the step really uses, not every dataset source.

The ingest function is ``from distml.data.ingest import ingest``: a package attribute named after a submodule
becomes that submodule once it is imported, so the package cannot also offer the function under that name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distml.data.ingest import IngestResult
    from distml.data.manifest import Manifest
    from distml.data.reader import Arrays, Dataset, Split, open_dataset, open_path
    from distml.data.store import DatasetStore

__all__ = [
    "Arrays",
    "Dataset",
    "DatasetStore",
    "IngestResult",
    "Manifest",
    "Split",
    "open_dataset",
    "open_path",
]
_FROM = {
    "IngestResult": "ingest",
    "Manifest": "manifest",
    "Arrays": "reader",
    "Dataset": "reader",
    "Split": "reader",
    "open_dataset": "reader",
    "open_path": "reader",
    "DatasetStore": "store",
}


def __getattr__(name: str) -> object:
    """A public name, imported from its submodule when first asked for."""
    if name not in _FROM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_FROM[name]}"), name)
