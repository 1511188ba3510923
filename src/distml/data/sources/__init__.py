"""Dataset sources: each turns raw files (local or downloaded) into arrays for the store.

One module per kind of source (:mod:`.fashion_mnist`, :mod:`.cifar10`, :mod:`.folder`) over the shared
:mod:`.base` protocol. The names below are loaded from their module on first use; code inside ``distml`` imports
the module itself, so that using one source neither loads nor (in a step's code version) depends on the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distml.data.sources.base import Log, Source, SourceData
    from distml.data.sources.cifar10 import Cifar10Source, Cifar10Spec
    from distml.data.sources.fashion_mnist import FashionMnistSource, IdxSpec, MnistLikeSpec
    from distml.data.sources.folder import FolderOptions, FolderSource

__all__ = [
    "Cifar10Source",
    "Cifar10Spec",
    "FashionMnistSource",
    "FolderOptions",
    "FolderSource",
    "IdxSpec",
    "Log",
    "MnistLikeSpec",
    "Source",
    "SourceData",
]
_FROM = {
    "Log": "base",
    "Source": "base",
    "SourceData": "base",
    "Cifar10Source": "cifar10",
    "Cifar10Spec": "cifar10",
    "FashionMnistSource": "fashion_mnist",
    "IdxSpec": "fashion_mnist",
    "MnistLikeSpec": "fashion_mnist",
    "FolderOptions": "folder",
    "FolderSource": "folder",
}


def __getattr__(name: str) -> object:
    """A public name, imported from its module when first asked for."""
    if name not in _FROM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_FROM[name]}"), name)
