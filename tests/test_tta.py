"""Flip test-time augmentation (``[train] tta = "flip"``): one function, in training's evaluation and the graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_mnist
from distml.config import TrainConfig
from distml.train.models import FlipAverage, ModelSpec, UInt8Classifier, build_model, for_prediction

FMNIST = ModelSpec(1, 28, 28, 10)


def _trained_like(name: str = "cnn-batchnorm") -> nn.Module:
    """A seeded model whose batch-norm statistics have moved off 0/1, as after training; in eval mode."""
    torch.manual_seed(0)
    net = build_model(name, FMNIST)
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(32, 1, 28, 28) * 2 + 0.5)
    return net.eval()


def test_flip_average_is_the_mean_of_the_softmax_of_the_image_and_its_mirror() -> None:
    net = _trained_like()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        logits = FlipAverage(net)(x)
        expected = (torch.softmax(net(x), 1) + torch.softmax(net(x.flip(3)), 1)) / 2
    assert logits.shape == (5, 10)
    # Its output is logits of the averaged prediction: their softmax is the mean, and they are log-probabilities.
    assert torch.allclose(torch.softmax(logits, 1), expected, atol=1e-6)
    assert torch.allclose(logits.exp().sum(1), torch.ones(5), atol=1e-5)
    assert not list(FlipAverage(net).parameters(recurse=False))  # nothing of its own to train or checkpoint
    assert FlipAverage(net).state_dict().keys() == {f"net.{k}" for k in net.state_dict()}
    assert for_prediction(net, "none") is net and isinstance(for_prediction(net, "flip"), FlipAverage)


def test_a_model_that_is_not_mirror_symmetric_predicts_differently_with_tta() -> None:
    net = _trained_like()
    x = torch.randn(4, 1, 28, 28)
    symmetric = (x + x.flip(3)) / 2  # an image equal to its mirror: tta cannot change its prediction
    with torch.no_grad():
        plain, flipped = torch.softmax(net(x), 1), torch.softmax(FlipAverage(net)(x), 1)
        assert (plain - flipped).abs().max() > 1e-3
        assert torch.allclose(
            torch.softmax(net(symmetric), 1), torch.softmax(FlipAverage(net)(symmetric), 1), atol=1e-6
        )


def test_the_exported_graph_with_tta_is_the_torch_wrapper(tmp_path: Path) -> None:
    import onnxruntime as ort

    from distml.card import INPUT_NAME, OUTPUT_NAMES
    from distml.registry.export import _export_onnx, check_parity

    net = _trained_like()
    wrapper = UInt8Classifier(for_prediction(net, "flip"), [0.286], [0.353]).eval()
    _export_onnx(wrapper, tmp_path / "model.onnx", (28, 28, 1))
    images = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    parity = check_parity(wrapper, tmp_path / "model.onnx", images)
    assert parity.ok and parity.images == 64 and parity.top1_agreement == 1.0
    # The graph's probabilities are the mean of the bare network's two softmaxes, computed here without the graph.
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, probs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
    plain = UInt8Classifier(net, [0.286], [0.353]).eval()
    with torch.no_grad():
        _, p = plain(torch.from_numpy(images))
        _, p_mirror = plain(torch.from_numpy(np.ascontiguousarray(images[:, :, ::-1])))
    expected = ((p + p_mirror) / 2).numpy()
    assert np.abs(probs - expected).max() < 1e-5
    assert np.abs(probs - p.numpy()).max() > 1e-3  # and not the plain prediction
    assert np.allclose(np.exp(logits), probs, atol=1e-5)  # the logits are the log of those probabilities


def test_tta_is_in_the_training_steps_key_and_a_checkpoint_without_it_resumes() -> None:
    from distml.pipeline.steps import train_params
    from distml.train.job import LATER_FIELDS

    assert train_params(TrainConfig())["tta"] == "none"
    assert train_params(TrainConfig(tta="flip")) != train_params(TrainConfig())
    assert LATER_FIELDS["tta"] == TrainConfig().tta  # an older checkpoint predicted without it


def test_a_run_with_tta_records_it_evaluates_and_exports_through_it(
    home: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from distml.data import DatasetStore
    from distml.data.ingest import ingest
    from distml.data.reader import open_dataset
    from distml.data.sources import FashionMnistSource
    from distml.registry.evaluate import evaluate as evaluate_graph
    from distml.registry.export import export_run
    from distml.train import train
    from distml.train.checkpoint import load_latest
    from distml.train.dist import DistContext
    from distml.train.evaluation import evaluate
    from distml.train.loop import _batchers
    from distml.workspace import Workspace

    files = make_mnist(tmp_path / "src", n_train=96, n_test=64)
    ingest(
        FashionMnistSource(home / "downloads", location=str(files.folder), spec=files.spec),
        store=DatasetStore(Workspace(home)),
        name="tiny",
    )
    cfg = TrainConfig(
        dataset="tiny", model="cnn-batchnorm", workers=1, epochs=1, batch_size=32, val_fraction=0.25, tta="flip"
    )
    result = train(cfg, Workspace(home), "tta")
    assert "24 validation images, flip test-time augmentation" in capfd.readouterr().out
    job = json.loads((result.run_dir / "job.json").read_text())
    saved = json.loads((result.run_dir / "result.json").read_text())
    (record,) = json.loads((result.run_dir / "history.json").read_text())
    assert job["config"]["tta"] == "flip" and saved["tta"] == "flip"

    # The recorded figures are the flip-averaged model's, not the bare model's.
    loaded = load_latest(result.run_dir / "checkpoints", warn=print)
    assert loaded is not None
    net = build_model("cnn-batchnorm", FMNIST)
    net.load_state_dict(loaded[1]["model"])
    cpu = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    _, val, test = _batchers(open_dataset("tiny", home=home), cfg, cpu)
    assert val is not None and test is not None
    no_autocast = torch.autocast("cpu", enabled=False)
    val_loss, val_acc = evaluate(FlipAverage(net), val, cpu, 1, no_autocast)
    test_loss, test_acc = evaluate(FlipAverage(net), test, cpu, 1, no_autocast)
    plain_val_loss, _ = evaluate(net, val, cpu, 1, no_autocast)
    assert record["val_loss"] == pytest.approx(val_loss, abs=1e-6) and record["val_accuracy"] == val_acc
    assert record["test_loss"] == pytest.approx(test_loss, abs=1e-6) and record["test_accuracy"] == test_acc
    assert plain_val_loss != pytest.approx(val_loss, abs=1e-4)  # which tells them apart

    # Its exported graph predicts the same way: the registry's ONNX evaluation reproduces the run's test figures.
    artifact, parity = export_run(result.run_dir, tmp_path / "model", keep_checkpoint=False)
    assert parity.ok and artifact.card.lineage.config["tta"] == "flip"
    arrays = open_dataset("tiny", home=home).split("test").arrays()
    ev = evaluate_graph(artifact, arrays.images, arrays.labels, tmp_path / "evaluation")
    assert ev.metrics["test_accuracy"] == saved["test_accuracy"]
    assert ev.metrics["test_loss"] == pytest.approx(saved["test_loss"], abs=1e-4)
    assert "flip test-time augmentation" in (tmp_path / "evaluation" / "evaluation.md").read_text()
