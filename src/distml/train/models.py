"""Model builders, selected by name. Every builder takes the dataset's channels, image size and class count.

- ``cnn``, ``cnn-dropout``, ``cnn-batchnorm``: the seed's three candidates (conv32 3x3 -> maxpool -> dense64 ->
  dense10, the second with dropout, the third with batch norm).
- ``resnet``: a small ResNet (3 stages of one basic block, 64/128/256 channels, 1.2 M parameters), the strong
  net for >= 94% on Fashion-MNIST; ``resnet-small`` is the same at 32/64/128 channels (0.3 M), ~3.5x faster on
  CPU. Global average pooling makes both work for any input size.
- ``resnet-fast``: a ResNet-9-style net built for CPU speed on small images (see :func:`_resnet_fast`); about
  half the compute of ``resnet-small`` per image.

Every builder honours ``width`` (a channel multiplier; 1.0 is the network as described, channels are rounded
to multiples of 8, which the CPU's vector units like) and ``dropout`` (None: the model's own, 0 for all but
``cnn-dropout``'s 0.25).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from distml.errors import UsageError
from distml.model_names import MODEL_NAMES, check_model_name


@dataclass(frozen=True)
class ModelSpec:
    in_channels: int
    height: int
    width: int
    num_classes: int


# A builder: (the data's shape, channel multiplier, dropout rate or None for the model's own) -> a fresh network.
Builder = Callable[[ModelSpec, float, float | None], nn.Module]


def _channels(base: int, width: float) -> int:
    """``base`` channels scaled by ``width``, rounded to a multiple of 8 (at least 8)."""
    return max(8, round(base * width / 8) * 8)


def _seed_cnn(spec: ModelSpec, width: float, dropout: float | None, *, batchnorm: bool = False) -> nn.Module:
    ch, hidden = _channels(32, width), _channels(64, width)
    conv: list[nn.Module] = [nn.Conv2d(spec.in_channels, ch, 3)]
    if batchnorm:
        conv.append(nn.BatchNorm2d(ch))
    conv += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    flat = ch * ((spec.height - 2) // 2) * ((spec.width - 2) // 2)
    head: list[nn.Module] = [nn.Flatten()]
    if dropout:
        head.append(nn.Dropout(dropout))
    head += [nn.Linear(flat, hidden)]
    if batchnorm:
        head.append(nn.BatchNorm1d(hidden))
    head += [nn.ReLU(inplace=True)]
    if dropout:
        head.append(nn.Dropout(dropout))
    head.append(nn.Linear(hidden, spec.num_classes))
    return nn.Sequential(*conv, *head)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


def _head(channels: int, num_classes: int, dropout: float | None) -> list[nn.Module]:
    """Global average pooling (any input size), optional dropout, the classifier."""
    drop: list[nn.Module] = [nn.Dropout(dropout)] if dropout else []
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), *drop, nn.Linear(channels, num_classes)]


def _resnet(
    spec: ModelSpec, width: float, dropout: float | None, base: tuple[int, int, int] = (64, 128, 256)
) -> nn.Module:
    a, b, c = (_channels(n, width) for n in base)
    return nn.Sequential(
        nn.Conv2d(spec.in_channels, a, 3, 1, 1, bias=False),
        nn.BatchNorm2d(a),
        nn.ReLU(inplace=True),
        _Block(a, a, 1),
        _Block(a, b, 2),
        _Block(b, c, 2),
        *_head(c, spec.num_classes, dropout),
    )


def _conv_bn(cin: int, cout: int, *, pool: bool = False) -> list[nn.Module]:
    """3x3 conv, then (optionally) 2x2 max pooling, batch norm and ReLU: pooling before BN is 4x less BN work."""
    return [
        nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
        *([nn.MaxPool2d(2)] if pool else []),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class _Residual(nn.Module):
    """x + two (conv, BN, ReLU) at the same width and size: depth without any change of shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(channels, channels), *_conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return x + out


def _resnet_fast(spec: ModelSpec, width: float, dropout: float | None) -> nn.Module:
    """A ResNet-9 (the DAWNBench CIFAR-10 net) cut down for 28x28 images on a CPU, 16/32/64/128 channels.

    Why it is fast: only the thin stem (16 channels) and one conv run at full resolution; each stage's first
    conv is followed by max pooling, so the residual pairs run at 14x14 and 3x3, and the widest layers see the
    fewest pixels. About 17 M multiply-adds per image (``resnet-small``: 36 M) for 0.41 M parameters.
    """
    if spec.height < 8 or spec.width < 8:  # three 2x2 poolings
        raise UsageError(f"images of {spec.height}x{spec.width} are too small for resnet-fast (8x8 at least)")
    c0, c1, c2, c3 = (_channels(n, width) for n in (16, 32, 64, 128))
    return nn.Sequential(
        *_conv_bn(spec.in_channels, c0),  # 28x28
        *_conv_bn(c0, c1, pool=True),  # -> 14x14
        _Residual(c1),
        *_conv_bn(c1, c2, pool=True),  # -> 7x7
        *_conv_bn(c2, c3, pool=True),  # -> 3x3
        _Residual(c3),
        *_head(c3, spec.num_classes, dropout),
    )


MODELS: dict[str, Builder] = {
    "cnn": lambda spec, width, dropout: _seed_cnn(spec, width, dropout),
    "cnn-dropout": lambda spec, width, dropout: _seed_cnn(spec, width, 0.25 if dropout is None else dropout),
    "cnn-batchnorm": lambda spec, width, dropout: _seed_cnn(spec, width, dropout, batchnorm=True),
    "resnet": _resnet,
    # 4x fewer FLOPs than resnet: the CPU-friendly one
    "resnet-small": lambda spec, width, dropout: _resnet(spec, width, dropout, base=(32, 64, 128)),
    "resnet-fast": _resnet_fast,
}


class FlipAverage(nn.Module):
    """Flip test-time augmentation around ``net``: the mean of the softmax of each image and of its mirror image.

    It returns the logarithm of that mean, a valid set of logits for it: ``softmax(FlipAverage(net)(x))`` is the
    mean of the two softmaxes, so cross-entropy, argmax and the exported graph's ``probabilities`` (a softmax of
    the logits) all see the averaged prediction and nothing is normalised twice. It has no parameters of its own
    (``net``'s state dict is what a checkpoint keeps); both views go through ``net`` as one batch of 2N.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        log_p = torch.log_softmax(self.net(torch.cat([x, x.flip(3)])).float(), dim=1)  # NCHW: dim 3 is the width
        # log((p + q) / 2), computed in log space so a confident class does not round to log(0)
        return torch.logsumexp(torch.stack([log_p[:n], log_p[n:]]), dim=0) - math.log(2.0)


def for_prediction(net: nn.Module, tta: Literal["none", "flip"]) -> nn.Module:
    """``net`` as a run with test-time augmentation ``tta`` ("none" or "flip") predicts: evaluation and export."""
    return FlipAverage(net) if tta == "flip" else net


class UInt8Classifier(nn.Module):
    """What is exported: ``uint8`` N x H x W x C -> (logits, probabilities), normalising inside the graph.

    The same arithmetic as training's batches (``distml.train.batches.Batcher``), so a served model needs
    nothing but raw pixels. ``net`` is what the run predicts with (:func:`for_prediction`): with flip
    test-time augmentation the logits are the log of the averaged probabilities.
    """

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        c = len(mean)
        self.mean: torch.Tensor
        self.inv_std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1) * 255.0))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images.permute(0, 3, 1, 2).float() - self.mean) * self.inv_std
        logits = self.net(x)
        return logits, torch.softmax(logits, dim=1)


assert tuple(MODELS) == MODEL_NAMES, "distml.model_names.MODEL_NAMES must list the builders of MODELS"


def build_model(name: str, spec: ModelSpec, *, width: float = 1.0, dropout: float | None = None) -> nn.Module:
    """Build a freshly initialised model (initialisation follows the caller's torch seed).

    ``width`` multiplies every layer's channels; ``dropout`` (None: the model's own) sets the dropout rate.
    """
    if spec.height < 4 or spec.width < 4:
        raise UsageError(f"images of {spec.height}x{spec.width} are too small for {name}")
    if width <= 0:
        raise UsageError(f"width {width} must be positive")
    if dropout is not None and not 0 <= dropout < 1:
        raise UsageError(f"dropout {dropout} must be in [0, 1)")
    return MODELS[check_model_name(name)](spec, width, dropout)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
