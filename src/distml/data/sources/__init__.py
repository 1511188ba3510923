"""Dataset sources: each turns raw files (local or downloaded) into arrays for the store."""

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
