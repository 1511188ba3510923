"""The data stage: dataset sources, the verified sharded store, and the reader API.

Typical use::

    from distml.data import open_dataset
    train = open_dataset("fashion-mnist").split("train")
    part = train.shard(rank, world_size)          # only this rank's shard files are opened
    images, labels = train.to_torch()             # the whole split as uint8 / int64 tensors
"""

from distml.data.ingest import IngestResult, ingest
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
    "ingest",
    "open_dataset",
    "open_path",
]
