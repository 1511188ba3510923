"""The model zoo's knobs: resnet-fast's shape and size, width and dropout honoured, export parity for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distml.errors import UsageError
from distml.model_names import MODEL_NAMES
from distml.train.models import MODELS, ModelSpec, UInt8Classifier, build_model, count_parameters

FMNIST = ModelSpec(1, 28, 28, 10)


def _dropouts(model: nn.Module) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, nn.Dropout)]


def test_resnet_fast_is_registered_and_classifies_small_images() -> None:
    assert "resnet-fast" in MODEL_NAMES and "resnet-fast" in MODELS
    model = build_model("resnet-fast", FMNIST).eval()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    rgb = build_model("resnet-fast", ModelSpec(3, 32, 32, 100)).eval()
    assert rgb(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_resnet_fast_is_smaller_per_image_than_resnet_small() -> None:
    # Multiply-adds of the convolutions per 28x28 image: the reason the model exists.
    def conv_macs(model: nn.Module) -> int:
        total = 0

        def hook(module: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            nonlocal total
            assert isinstance(module, nn.Conv2d)
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += out.shape[1] * out.shape[2] * out.shape[3] * k

        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
        model.eval()(torch.zeros(1, 1, 28, 28))
        for h in handles:
            h.remove()
        return total

    fast, small = conv_macs(build_model("resnet-fast", FMNIST)), conv_macs(build_model("resnet-small", FMNIST))
    assert fast < 0.6 * small, (fast, small)
    assert count_parameters(build_model("resnet-fast", FMNIST)) == 412_666


def test_images_too_small_for_three_poolings_are_a_usage_error() -> None:
    with pytest.raises(UsageError, match="too small for resnet-fast"):
        build_model("resnet-fast", ModelSpec(1, 6, 6, 10))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_width_scales_every_model(name: str) -> None:
    sizes = [count_parameters(build_model(name, FMNIST, width=w)) for w in (0.5, 1.0, 2.0)]
    assert sizes[0] < sizes[1] < sizes[2], sizes
    assert count_parameters(build_model(name, FMNIST)) == sizes[1]  # 1.0 is the default


def test_width_rounds_channels_to_multiples_of_eight() -> None:
    model = build_model("resnet-fast", FMNIST, width=0.7)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    assert convs[0].out_channels == 8 and convs[-1].out_channels == 88  # 16 * 0.7 = 11.2 -> 8; 128 * 0.7 = 89.6 -> 88


@pytest.mark.parametrize("name", ["cnn", "cnn-batchnorm", "resnet", "resnet-small", "resnet-fast"])
def test_dropout_is_honoured_and_off_by_default(name: str) -> None:
    assert _dropouts(build_model(name, FMNIST)) == []
    assert set(_dropouts(build_model(name, FMNIST, dropout=0.3))) == {0.3}


def test_cnn_dropout_keeps_its_own_rate_unless_told() -> None:
    assert set(_dropouts(build_model("cnn-dropout", FMNIST))) == {0.25}
    assert set(_dropouts(build_model("cnn-dropout", FMNIST, dropout=0.1))) == {0.1}
    assert _dropouts(build_model("cnn-dropout", FMNIST, dropout=0.0)) == []


def test_dropout_changes_training_outputs_only() -> None:
    torch.manual_seed(0)
    model = build_model("resnet-fast", FMNIST, dropout=0.5)
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x), model(x))  # no dropout in evaluation
    model.train()
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(first, model(x))


@pytest.mark.parametrize(("width", "dropout"), [(-1.0, None), (1.0, 1.0), (1.0, -0.1)])
def test_bad_width_or_dropout_is_a_usage_error(width: float, dropout: float | None) -> None:
    with pytest.raises(UsageError):
        build_model("resnet-fast", FMNIST, width=width, dropout=dropout)


def test_resnet_fast_exports_to_onnx_with_parity(tmp_path: Path) -> None:
    from distml.registry.export import _export_onnx, check_parity

    torch.manual_seed(0)
    net = build_model("resnet-fast", FMNIST, width=0.5, dropout=0.2)
    net.train()
    with torch.no_grad():  # batch-norm statistics away from their initial 0/1, as after training
        for _ in range(3):
            net(torch.randn(32, 1, 28, 28) * 2 + 0.5)
    wrapper = UInt8Classifier(net, [0.286], [0.353]).eval()
    _export_onnx(wrapper, tmp_path / "model.onnx", (28, 28, 1))
    images = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    parity = check_parity(wrapper, tmp_path / "model.onnx", images)
    assert parity.ok and parity.images == 64 and parity.top1_agreement == 1.0
