"""Model builders, selected by name. Every builder takes the dataset's channels, image size and class count.

- ``cnn``, ``cnn-dropout``, ``cnn-batchnorm``: the seed's three candidates (conv32 3x3 -> maxpool -> dense64 ->
  dense10, the second with dropout, the third with batch norm).
- ``resnet``: a small ResNet (3 stages of one basic block, 64/128/256 channels, 1.2 M parameters), the strong
  net for >= 94% on Fashion-MNIST; ``resnet-small`` is the same at 32/64/128 channels (0.3 M), ~3.5x faster on
  CPU. Global average pooling makes both work for any input size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


def _seed_cnn(spec: ModelSpec, *, dropout: float = 0.0, batchnorm: bool = False) -> nn.Module:
    conv: list[nn.Module] = [nn.Conv2d(spec.in_channels, 32, 3)]
    if batchnorm:
        conv.append(nn.BatchNorm2d(32))
    conv += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    flat = 32 * ((spec.height - 2) // 2) * ((spec.width - 2) // 2)
    head: list[nn.Module] = [nn.Flatten()]
    if dropout:
        head.append(nn.Dropout(dropout))
    head += [nn.Linear(flat, 64)]
    if batchnorm:
        head.append(nn.BatchNorm1d(64))
    head += [nn.ReLU(inplace=True)]
    if dropout:
        head.append(nn.Dropout(dropout))
    head.append(nn.Linear(64, spec.num_classes))
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


def _resnet(spec: ModelSpec, widths: tuple[int, int, int] = (64, 128, 256)) -> nn.Module:
    a, b, c = widths
    return nn.Sequential(
        nn.Conv2d(spec.in_channels, a, 3, 1, 1, bias=False),
        nn.BatchNorm2d(a),
        nn.ReLU(inplace=True),
        _Block(a, a, 1),
        _Block(a, b, 2),
        _Block(b, c, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c, spec.num_classes),
    )


MODELS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "cnn": _seed_cnn,
    "cnn-dropout": lambda spec: _seed_cnn(spec, dropout=0.25),
    "cnn-batchnorm": lambda spec: _seed_cnn(spec, batchnorm=True),
    "resnet": _resnet,
    "resnet-small": lambda spec: _resnet(spec, widths=(32, 64, 128)),  # 4x fewer FLOPs: the CPU-friendly one
}


class UInt8Classifier(nn.Module):
    """What is exported: ``uint8`` N x H x W x C -> (logits, probabilities), normalising inside the graph.

    The same arithmetic as training's batches (``distml.train.batches.Batcher``), so a served model needs
    nothing but raw pixels.
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


def build_model(name: str, spec: ModelSpec) -> nn.Module:
    """Build a freshly initialised model (initialisation follows the caller's torch seed)."""
    if spec.height < 4 or spec.width < 4:
        raise UsageError(f"images of {spec.height}x{spec.width} are too small for {name}")
    return MODELS[check_model_name(name)](spec)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
