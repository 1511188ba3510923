"""distml: end-to-end distributed image classification.

The package is laid out by pipeline stage: :mod:`distml.data` (ingest and the dataset store) is the first;
training, registry, serving, pipeline and Kubernetes stages arrive as their own subpackages. The CLI in
:mod:`distml.cli` is a thin layer over them.
"""

from distml.errors import DistmlError

__version__ = "0.1.0"

__all__ = ["DistmlError", "__version__"]
