"""Export to ONNX with parity, the MLflow model registry and its champion alias: real runs, real MLflow (SQLite)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from conftest import make_mnist, run_cli
from distml import card as card_module
from distml.config import TrainConfig
from distml.data import DatasetStore, open_dataset
from distml.data.ingest import ingest
from distml.data.sources import FashionMnistSource
from distml.errors import ModelError, NotFoundError, RegistryError, UsageError
from distml.files import sha256_file
from distml.registry import CHAMPION, Registry, export_run, find_run, open_artifact, resolve_model
from distml.train import train
from distml.workspace import Workspace

NAME = "tiny-classifier"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with a small dataset and two finished runs (seeds 0 and 1), trained once for the module."""
    root = tmp_path_factory.mktemp("registry")
    home = root / "home"
    files = make_mnist(root / "src", n_train=256, n_test=1200)
    src = FashionMnistSource(home / "downloads", location=str(files.folder), spec=files.spec)
    ingest(src, store=DatasetStore(Workspace(home)), name="tiny")
    for seed in (0, 1):
        cfg = TrainConfig.model_validate({"dataset": "tiny", "model": "cnn-batchnorm", "workers": 1, "epochs": 1,
                                          "batch_size": 32, "seed": seed, "log_every_steps": 1000})  # fmt: skip
        train(cfg, Workspace(home), f"run{seed}")
    return home


def _copy_home(src: Path, copy: Path) -> Path:
    """A private copy of a workspace whose MLflow runs keep their artifacts in the copy's own store."""
    shutil.copytree(src, copy)
    # MLflow records absolute artifact locations; point the copy's runs at the copy's own artifact store, so a
    # test that changes stored artifacts (or registers into them) leaves the other tests' store alone.
    old, new = src.resolve().as_uri(), copy.resolve().as_uri()
    with contextlib.closing(sqlite3.connect(copy / "mlflow.db")) as db, db:
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
        db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
    # MLflow caches each run's artifact location in the process, by run id (the same ids in every copy).
    from mlflow.tracking._tracking_service import utils as mlflow_tracking_utils

    mlflow_tracking_utils._artifact_repos_cache.clear()
    return copy


@pytest.fixture
def home(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained workspace: registry tests change the MLflow store."""
    return _copy_home(trained, tmp_path / "home")


@pytest.fixture(scope="module")
def registered(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained workspace with run0 registered as version 1 (champion) and run1 as version 2 (not promoted)."""
    home = _copy_home(trained, tmp_path_factory.mktemp("registered") / "home")
    assert run_cli("--home", home, "models", "register", "run0").code == 0
    assert run_cli("--home", home, "models", "register", "run1", "--no-promote").code == 0
    return home


@pytest.fixture
def two_versions(registered: Path, tmp_path: Path) -> Path:
    """A private copy of ``registered``."""
    return _copy_home(registered, tmp_path / "home")


def test_export_writes_a_verified_onnx_artifact_that_matches_pytorch(home: Path, tmp_path: Path) -> None:
    artifact, parity = export_run(find_run("run0", Workspace(home)), tmp_path / "model")
    assert parity.images == 1000 and parity.ok
    assert parity.max_abs_diff_probabilities <= 1e-4 and parity.top1_agreement == 1.0
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    assert card["name"] == NAME and card["input"] == {"name": "images", "dtype": "uint8", "shape": [-1, 28, 28, 1],
                                                      "layout": "NHWC"}  # fmt: skip
    assert card["lineage"]["dataset_digest"] == open_dataset("tiny", home=home).digest
    assert card["lineage"]["training_run"] == "run0" and card["lineage"]["mlflow_run_id"]
    assert card["lineage"]["config"]["model"] == "cnn-batchnorm"
    assert card["lineage"]["code_version"].startswith("0.")  # the package version (+ the git commit in a checkout)
    result = json.loads((home / "runs" / "run0" / "result.json").read_text())
    assert card["lineage"]["validation"] == result["validation"] and result["validation"]["images"] > 0
    assert len(card["class_names"]) == 10 and card["metrics"]["test_accuracy"] is not None
    # Written as before the card was typed: the fields in this order, indented JSON, a final newline.
    fields = "format name version task class_names input outputs normalisation metrics parity lineage files created"
    assert list(card) == fields.split()
    assert (tmp_path / "model" / "model.json").read_text() == json.dumps(card, indent=2) + "\n"
    assert card["version"] is None and card["parity"]["limit"] == 1e-4
    assert set(card["files"]) == {"model.onnx", "checkpoint.pt"}
    assert (tmp_path / "model" / "checkpoint.pt").is_file()
    # Raw uint8 pixels in, any batch size: probabilities sum to one.
    session = ort.InferenceSession(str(artifact.onnx_path), providers=["CPUExecutionProvider"])
    for n in (1, 7, 64):
        images = np.random.default_rng(n).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
        logits, probs = session.run(None, {"images": images})
        assert logits.shape == probs.shape == (n, 10)
        assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_register_promote_and_rollback_move_the_champion(home: Path) -> None:
    ws = Workspace(home)
    first = run_cli("--home", home, "models", "register", "run0")
    assert first.code == 0, first.err
    assert "parity ok: 1000 images" in first.out and f"registered {NAME} version 1 (champion)" in first.out
    second = run_cli("--home", home, "models", "register", "run1")
    assert second.code == 0, second.err
    registry = Registry(ws)
    # What MLflow's own client says.
    assert str(registry.client.get_model_version_by_alias(NAME, CHAMPION).version) == "2"
    assert str(registry.client.get_model_version_by_alias(NAME, "previous").version) == "1"
    assert registry.lookup(f"models:/{NAME}@champion").tags["distml.training_run"] == "run1"
    # Both versions stay resolvable, each to its own verified artifact.
    v1, v2 = resolve_model(f"models:/{NAME}/1", ws), resolve_model(f"models:/{NAME}@champion", ws)
    assert v1.card.version == "1" and v2.card.version == "2"
    assert v1.card.lineage.training_run == "run0" and v2.card.lineage.training_run == "run1"
    back = run_cli("--home", home, "models", "rollback", NAME)
    assert back.code == 0 and "rolled back to version 1" in back.out
    assert registry.lookup(f"models:/{NAME}@champion").version == "1"
    again = run_cli("--home", home, "models", "rollback", NAME)
    assert again.code == 2 and "no earlier champion" in again.err
    promoted = run_cli("--home", home, "models", "promote", NAME, "2")
    assert promoted.code == 0 and registry.lookup(f"models:/{NAME}@champion").version == "2"
    listed = run_cli("--home", home, "models", "list")
    assert NAME in listed.out and listed.out.splitlines()[1].split()[1:3] == ["2", "2"]
    shown = run_cli("--home", home, "models", "show", f"{NAME}@champion")
    assert shown.code == 0 and "version 2 (champion)" in shown.out and "top-1 agreement 100.00%" in shown.out
    assert "metrics    val accuracy " in shown.out and "(what selection uses), test accuracy " in shown.out


def test_failed_parity_registers_nothing_and_leaves_the_champion(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_cli("--home", home, "models", "register", "run0").code == 0
    monkeypatch.setattr(card_module, "PARITY_MAX_ABS", -1.0)  # no real export can meet this limit
    result = run_cli("--home", home, "models", "register", "run1")
    assert result.code == 1 and "ONNX parity failed on 1000 images" in result.err
    assert "nothing was written or registered" in result.err
    registry = Registry(Workspace(home))
    assert [v.version for v in registry.versions(NAME)] == ["1"]
    assert registry.lookup(f"models:/{NAME}@champion").version == "1"
    out = home / "exported"
    failed = run_cli("--home", home, "models", "export", "run1", "--out", out)
    assert failed.code == 1 and not out.exists()
    assert not [p for p in home.iterdir() if p.name.startswith(".exported")]  # no temp folder left


@pytest.mark.parametrize(
    ("ref", "needle"),
    [
        (f"models:/{NAME}@staging", "has no alias 'staging'"),
        (f"models:/{NAME}/9", "has no version 9"),
        ("models:/nope@champion", "no registered model 'nope'"),
        ("models:/bad ref", "is not a model reference"),
    ],
)
def test_unknown_alias_version_or_model_is_a_clear_error(home: Path, ref: str, needle: str) -> None:
    assert run_cli("--home", home, "models", "register", "run0").code == 0
    with pytest.raises(NotFoundError, match=needle.replace("(", r"\(")):
        resolve_model(ref, Workspace(home))
    result = run_cli("--home", home, "models", "show", ref)
    assert result.code == 2 and needle in result.err and "Traceback" not in result.err


def test_corrupt_or_truncated_onnx_is_refused(home: Path, tmp_path: Path) -> None:
    artifact, _ = export_run(find_run("run0", Workspace(home)), tmp_path / "model")
    onnx_file = artifact.onnx_path
    data = onnx_file.read_bytes()
    onnx_file.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ModelError, match="is corrupt"):
        open_artifact(tmp_path / "model")
    # Garbage whose hash is recorded (a card rewritten to match): ONNX Runtime's refusal becomes a clear error.
    onnx_file.write_bytes(b"not an onnx graph")
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    from distml.files import sha256_file

    card["files"]["model.onnx"]["sha256"] = sha256_file(onnx_file)
    (tmp_path / "model" / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="cannot be loaded by ONNX Runtime"):
        open_artifact(tmp_path / "model").session()


# A card as export wrote it before the card was typed (from a real registered version; class list and config cut
# short), and the digest the registry recorded for it then: reading and writing it back must keep both.
_CARD_BEFORE = {
    "format": 1, "name": "tiny-classifier", "version": "1", "task": "image-classification",
    "class_names": ["class0", "class1", "class2"],
    "input": {"name": "images", "dtype": "uint8", "shape": [-1, 28, 28, 1], "layout": "NHWC"},
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 3]},
                {"name": "probabilities", "dtype": "float32", "shape": [-1, 3]}],
    "normalisation": {"mean": [0.498535], "std": [0.289996]},
    "metrics": {"test_accuracy": 0.09166666666666666, "test_loss": 2.3792017110188803, "epochs": 1,
                "parameters": 347338},
    "parity": {"images": 1000, "max_abs_diff_probabilities": 1.1920928955078125e-07, "top1_agreement": 1.0,
               "limit": 0.0001},
    "lineage": {"dataset": "tiny", "dataset_digest": "92632ed1ea70e50ebc812bea5953bcc16575df7da59049734d2fbb409fd729eb",
                "training_run": "run0", "mlflow_run_id": "fe58f3a45fab423b9f08b482597d7883",
                "checkpoint": "ckpt-000001-000000008.pt", "world_size": 1,
                "config": {"dataset": "tiny", "model": "cnn-batchnorm", "epochs": 1, "lr": 0.002, "warmup_epochs": 0.0,
                           "allow_oversubscribe": False},
                "code_version": "0.1.0+gf36931ffd997.dirty"},
    "files": {"model.onnx": {"sha256": "eb5d39a6f12c731f91f7367d684b495d81ee1459da4aec443a3836699076c934",
                             "bytes": 1403103},
              "checkpoint.pt": {"sha256": "f937d10c05d84063eb5d496866e020e8868651a8295973e448d75f6ac912d612"}},
    "created": "2026-11-29T23:02:40Z",
}  # fmt: skip
_CARD_BEFORE_DIGEST = "663e00e69f8b88867e8a3478f9687c8bf68575b26b488e5ca02dffd9e83bb9c6"


def test_a_card_written_before_reads_back_and_writes_the_same_bytes_and_digest(tmp_path: Path) -> None:
    from distml.card import ModelCard

    written = json.dumps(_CARD_BEFORE, indent=2) + "\n"  # exactly how export wrote model.json
    (tmp_path / "model.json").write_text(written)
    card = ModelCard.read(tmp_path / "model.json")
    assert card.dumps() == written
    assert card.digest() == _CARD_BEFORE_DIGEST  # what existing versions' distml.card_sha256 tags hold
    assert card.model_copy(update={"version": "7"}).digest() == _CARD_BEFORE_DIGEST  # the registry's own field
    assert card.onnx_sha256 == _CARD_BEFORE["files"]["model.onnx"]["sha256"]  # type: ignore[index]
    assert card.image_shape == (28, 28, 1) and card.parity.ok and card.lineage.config["model"] == "cnn-batchnorm"
    assert "bytes" not in json.loads(card.dumps())["files"]["checkpoint.pt"]  # absent, not null


def _card_with(change: Any) -> dict[str, Any]:
    card = json.loads(json.dumps(_CARD_BEFORE))
    change(card)
    return card


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        (None, NotFoundError, "model.json does not exist"),
        ("{not json", ModelError, r"model.json is not a valid model card \(JSONDecodeError: "),
        (json.dumps(_card_with(lambda c: c.update(format=2))), ModelError, "has format 2; this distml reads format 1"),
        (json.dumps(_card_with(lambda c: c["lineage"].pop("dataset"))), ModelError,
         r"not a valid model card \(lineage.dataset: Field required\)"),
        (json.dumps(_card_with(lambda c: c["files"].pop("model.onnx"))), ModelError, "files lists no model.onnx"),
        (json.dumps(_card_with(lambda c: c.update(extra=1, task="detection"))), ModelError,
         r"task: Input should be 'image-classification'; and 1 more\)"),
        ("[1, 2]", ModelError, "the card: Input should be a valid dictionary"),
    ],
)  # fmt: skip
def test_a_missing_or_bad_card_is_one_line_naming_the_problem(
    tmp_path: Path, text: str | None, error: type[Exception], message: str
) -> None:
    from distml.card import ModelCard

    if text is not None:
        (tmp_path / "model.json").write_text(text)
    with pytest.raises(error, match=message) as caught:
        ModelCard.read(tmp_path / "model.json")
    assert "\n" not in str(caught.value)
    if text is not None:  # and opening the folder as an artifact says the same
        (tmp_path / "model.onnx").write_bytes(b"graph")
        with pytest.raises(error, match=message):
            open_artifact(tmp_path)


def test_the_artifact_reader_is_a_leaf() -> None:
    """What the server imports to read a model loads the card and file helpers, not the other stages."""
    code = (
        "import sys, distml.registry.artifact; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('distml', 'torch', 'mlflow', 'onnxruntime', 'onnx', 'yaml', 'matplotlib'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    allowed = {"distml", "distml.card", "distml.errors", "distml.files", "distml.workspace", "distml.registry"}
    allowed.add("distml.registry.artifact")
    assert set(loaded) <= allowed, sorted(set(loaded) - allowed)


def test_bad_runs_and_folders(home: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no training run 'ghost'"):
        find_run("ghost", Workspace(home))
    (home / "runs" / "run0" / "result.json").unlink()
    with pytest.raises(UsageError, match="has not finished"):
        export_run(find_run("run0", Workspace(home)), tmp_path / "m")
    (tmp_path / "exists").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        export_run(find_run("run1", Workspace(home)), tmp_path / "exists")
    with pytest.raises(NotFoundError, match="is not a model artifact"):
        resolve_model(tmp_path / "exists", Workspace(home))
    listed = run_cli("--home", home, "models", "list")
    assert listed.code == 0 and "no registered models yet" in listed.out
    registry = Registry(Workspace(home))
    registry.client.create_registered_model("empty-classifier")
    with pytest.raises(RegistryError, match="no champion to roll back"):
        registry.rollback("empty-classifier")


# -- batch prediction -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_predict_a_dataset_split_matches_onnx_runtime(home: Path, tmp_path: Path, suffix: str) -> None:
    assert run_cli("--home", home, "models", "register", "run0").code == 0
    out = tmp_path / f"preds{suffix}"
    result = run_cli("--home", home, "predict", f"models:/{NAME}@champion", "--dataset", "tiny", "--batch-size",
                     "500", "--out", out)  # fmt: skip
    assert result.code == 0, result.err
    assert "predicted 1,200 images" in result.out and "accuracy" in result.out
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(out).to_pylist()
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        import csv

        rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1200 and {"id", "prediction", "class_name", "probability", "label"} <= set(rows[0])
    # The same answers as ONNX Runtime run directly on the stored pixels.
    arrays = open_dataset("tiny", home=home).split("test").arrays()
    model = resolve_model(f"models:/{NAME}@champion", Workspace(home))
    _, probs = model.session().run(None, {"images": np.ascontiguousarray(arrays.images)})
    assert [int(r["prediction"]) for r in rows] == probs.argmax(1).tolist()
    assert [int(r["label"]) for r in rows] == arrays.labels.tolist()
    assert rows[5]["class_name"] == model.class_names[int(rows[5]["prediction"])]
    accuracy = float((probs.argmax(1) == arrays.labels).mean())
    assert f"accuracy {accuracy:.2%}" in result.out
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_predict_an_image_folder_with_a_non_image(home: Path, tmp_path: Path) -> None:
    from conftest import make_image_folder

    assert run_cli("--home", home, "models", "register", "run0").code == 0
    folder = make_image_folder(tmp_path / "photos", per_class=3)  # RGB, various sizes: converted to 28x28 L
    (folder / "cat" / "notes.txt").write_text("not an image")
    out = tmp_path / "preds.jsonl"
    ref = f"models:/{NAME}/1"
    failed = run_cli("--home", home, "predict", ref, "--images", folder, "--out", out)
    assert failed.code == 1 and "notes.txt: not a PNG or JPEG file" in failed.err and not out.exists()
    skipped = run_cli("--home", home, "predict", ref, "--images", folder, "--out", out, "--on-bad-file", "skip")
    assert skipped.code == 0, skipped.err
    assert "predicted 9 images" in skipped.out and "skipped:" in skipped.err and "notes.txt" in skipped.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows][:3] == ["cat/img000.jpg", "cat/img001.png", "cat/img002.jpg"]
    assert "label" not in rows[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--out", "p.txt", "--dataset", "tiny"], "cannot write p.txt"),
        (["--out", "p.csv"], "give exactly one of --dataset and --images"),
        (["--out", "p.csv", "--dataset", "tiny", "--split", "valid"], "has no split 'valid'"),
        (["--out", "p.csv", "--images", "/nonexistent-folder"], "is not a folder of images"),
    ],
)
def test_predict_bad_input(home: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    assert run_cli("--home", home, "models", "register", "run0").code == 0
    args = [str(tmp_path / a) if a.startswith("p.") else a for a in args]
    result = run_cli("--home", home, "predict", f"models:/{NAME}@champion", *args)
    assert result.code == 2, result.err
    assert needle in result.err and "Traceback" not in result.err


# -- evaluation and selection ------------------------------------------------------------------------------------


def test_evaluate_a_run_writes_the_report_and_logs_to_mlflow(home: Path) -> None:
    result = run_cli("--home", home, "evaluate", "run0")
    assert result.code == 0, result.err
    folder = home / "runs" / "run0" / "evaluation"
    for name in ("evaluation.md", "evaluation.json", "confusion_matrix.png", "per_class.png"):
        assert (folder / name).is_file(), name
    assert (folder / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((folder / "evaluation.json").read_text())
    # Recomputed independently from ONNX Runtime's answers on the stored test split.
    arrays = open_dataset("tiny", home=home).split("test").arrays()
    model = open_artifact(home / "runs" / "run0" / "model")
    _, probs = model.session().run(None, {"images": np.ascontiguousarray(arrays.images)})
    pred = probs.argmax(1)
    assert report["metrics"]["test_accuracy"] == pytest.approx(float((pred == arrays.labels).mean()))
    confusion = np.array(report["confusion"])
    assert confusion.sum() == 1200 and np.trace(confusion) == int((pred == arrays.labels).sum())
    c = 3
    assert report["per_class"][c]["recall"] == pytest.approx(confusion[c, c] / max(1, confusion[c].sum()))
    assert report["metrics"]["latency_b1_ms"] > 0 and report["metrics"]["latency_b64_ms"] > 0
    assert f"accuracy {report['metrics']['test_accuracy']:.2%}" in result.out
    registry = Registry(Workspace(home))
    run_id = model.card.lineage.mlflow_run_id
    logged = registry.client.get_run(run_id).data.metrics
    assert logged["eval.test_accuracy"] == pytest.approx(report["metrics"]["test_accuracy"])
    assert {a.path for a in registry.client.list_artifacts(run_id, "evaluation")} >= {
        "evaluation/evaluation.md", "evaluation/confusion_matrix.png"}  # fmt: skip


def test_select_picks_the_best_by_the_declared_metric_and_registers_it(home: Path) -> None:
    result = run_cli("--home", home, "select", "run*", "--register")
    assert result.code == 0, result.err
    # Chosen on validation (the default metric), not on the test accuracy the model then reports.
    acc = {r: json.loads((home / "runs" / r / "evaluation" / "evaluation.json").read_text())["metrics"]
           ["val_accuracy"] for r in ("run0", "run1")}  # fmt: skip
    best = max(sorted(acc), key=lambda r: acc[r])  # ties: equal parameters and close latency; name order decides
    winner_line = next(line for line in result.out.splitlines() if line.endswith("winner"))
    if acc["run0"] != acc["run1"]:
        assert winner_line.startswith(best)
    winner = winner_line.split()[0]
    assert f"selected {winner} by val_accuracy (max); its test accuracy " in result.out
    assert "TEST ACC*" in result.out and "* test accuracy: measured and shown, not used for the choice" in result.out
    registry = Registry(Workspace(home))
    champion = registry.lookup(f"models:/{NAME}@champion")
    assert champion.tags["distml.training_run"] == winner
    run_id = open_artifact(home / "runs" / winner / "model").card.lineage.mlflow_run_id
    assert registry.client.get_run(run_id).data.tags["distml.selection"].startswith("winner")
    assert list((home / "selections").glob("selection-*.md"))
    # The opposite direction on the same metric picks the other run (unless they tie).
    worst = run_cli("--home", home, "select", "run0", "run1", "--direction", "min")
    if acc["run0"] != acc["run1"]:
        assert next(ln for ln in worst.out.splitlines() if ln.endswith("winner")).split()[0] != winner


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run0", "--max-params", "1"], "no candidate meets the constraints"),
        (["run0", "--metric", "speed"], "unknown metric 'speed'"),
        (["run0", "--metric", "test_accuracy"], "test metrics only report, the choice is made on validation"),
        (["run0", "--metric", "macro_f1"], "(use val_accuracy)"),
        (["ghost"], "no training run 'ghost'"),
        (["nomatch-*"], "no training run matches 'nomatch-*'"),
    ],
)
def test_select_bad_input(home: Path, args: list[str], needle: str) -> None:
    result = run_cli("--home", home, "select", *args)
    assert result.code == 2, result.err
    assert needle in result.err and "Traceback" not in result.err


def _candidate(run: str, val: float, test: float, split: str = "a" * 64) -> dict[str, Any]:
    return {"run": run, "val_accuracy": val, "val_loss": 1 - val, "test_accuracy": test, "macro_f1": test,
            "parameters": 1000.0, "latency_b1_ms": 1.0,
            "validation": {"fraction": 0.1, "seed": 0, "images": 26, "indices_sha256": split}}  # fmt: skip


def test_select_ranks_on_validation_even_when_test_would_choose_another() -> None:
    from distml.registry.selection import select, selection_table

    # b has the better test accuracy; a the better validation accuracy: a is chosen, by default and explicitly.
    candidates = [_candidate("b", val=0.80, test=0.95), _candidate("a", val=0.90, test=0.50)]
    assert select(candidates).winner["run"] == "a"
    assert select(candidates, metric="val_loss", direction="min").winner["run"] == "a"
    table = selection_table(select(candidates))
    assert table[0].split() == ["RUN", "VAL", "ACC", "TEST", "ACC*", "PARAMS", "B1", "MS", "DECISION"]
    assert table[1].split()[:3] == ["a", "90.00%", "50.00%"] and table[1].endswith("winner")
    assert table[-1] == "* test accuracy: measured and shown, not used for the choice (chosen on val_accuracy, max)"


def test_select_breaks_ties_by_size_settings_and_name_never_by_measured_latency() -> None:
    from distml.registry.selection import select

    def tied(run: str, latency: float, **extra: Any) -> dict[str, Any]:
        return {**_candidate(run, val=0.9, test=0.9), "latency_b1_ms": latency, **extra}

    # Equal validation accuracy and size: the name decides, whichever run happened to be timed faster.
    assert select([tied("b", latency=0.5), tied("a", latency=9.0)]).winner["run"] == "a"
    assert select([tied("a", latency=9.0), tied("b", latency=0.5)]).winner["run"] == "a"
    # Settings (canonical JSON: key order and spacing do not matter) come before the name.
    slow = tied("z", latency=9.0, settings={"model": "cnn", "lr": 0.001})
    fast = tied("a", latency=0.5, settings={"lr": 0.002, "model": "cnn"})
    assert select([fast, slow]).winner["run"] == "z" and select([slow, fast]).winner["run"] == "z"
    # A smaller model still wins a tie on the metric; a better metric still wins over everything else.
    small = {**tied("y", latency=9.0), "parameters": 10.0}
    assert select([tied("a", latency=0.5), small]).winner["run"] == "y"
    assert select([small, {**tied("x", latency=9.0), "val_accuracy": 0.91}]).winner["run"] == "x"


def test_select_refuses_test_metrics_runs_without_validation_and_different_splits() -> None:
    from distml.config import load_config
    from distml.errors import ConfigError
    from distml.registry.selection import select

    two = [_candidate("a", 0.9, 0.5), _candidate("b", 0.8, 0.95)]
    for metric in ("test_accuracy", "test_loss", "macro_f1"):
        with pytest.raises(UsageError, match=f"metric '{metric}' is measured on the test split: test metrics only"):
            select(two, metric=metric)
        with pytest.raises(ConfigError, match="test metrics only report, the choice is made on validation"):
            load_config(overrides={"pipeline.metric": metric})
    assert load_config().pipeline.metric == "val_accuracy"
    other = [_candidate("a", 0.9, 0.5), _candidate("c", 0.99, 0.99, split="b" * 64)]
    with pytest.raises(UsageError, match=r"held out different validation images.*split aaaaaaaaaaaa: a; split bbbb"):
        select(other)
    unvalidated = [{k: v for k, v in c.items() if not k.startswith("val_")} | {"validation": None} for c in two]
    with pytest.raises(UsageError, match="a, b measured no val_accuracy: no validation split"):
        select(unvalidated)
    assert select(unvalidated, metric="latency_b1_ms", direction="min").winner["run"] == "a"  # no quality metric


def test_evaluation_measures_the_runs_own_validation_split(home: Path) -> None:
    from distml.data.split import validation_indices

    result = run_cli("--home", home, "evaluate", "run1")
    assert result.code == 0, result.err
    report = json.loads((home / "runs" / "run1" / "evaluation" / "evaluation.json").read_text())
    recorded = json.loads((home / "runs" / "run1" / "result.json").read_text())
    assert report["validation"] == recorded["validation"] and recorded["validation"]["images"] == 26
    # Recomputed independently: ONNX Runtime on the train images the run held out (default val_fraction 0.1).
    train_split = open_dataset("tiny", home=home).split("train").arrays()
    _, val_idx = validation_indices(256, 0.1, 0)
    model = open_artifact(home / "runs" / "run1" / "model")
    _, probs = model.session().run(None, {"images": np.ascontiguousarray(train_split.images[val_idx])})
    assert report["metrics"]["val_accuracy"] == pytest.approx(float((probs.argmax(1) == train_split.labels[val_idx])
                                                                    .mean()))  # fmt: skip
    assert report["metrics"]["val_images"] == 26 and report["metrics"]["images"] == 1200
    assert f"validation accuracy {report['metrics']['val_accuracy']:.2%}" in result.out
    # The card carries the run's validation accuracy next to its test accuracy.
    assert model.card.metrics.val_accuracy == recorded["val_accuracy"]


def test_select_refuses_runs_that_held_out_different_validation_images(home: Path) -> None:
    cfg = TrainConfig.model_validate({"dataset": "tiny", "model": "cnn-batchnorm", "workers": 1, "epochs": 1,
                                      "batch_size": 32, "val_seed": 1, "log_every_steps": 1000})  # fmt: skip
    train(cfg, Workspace(home), "other-split")
    result = run_cli("--home", home, "select", "run0", "other-split")
    assert result.code == 2, result.err
    assert result.err.strip().splitlines()[-1].startswith("error: the runs held out different validation images")
    assert "Traceback" not in result.err


# -- what serve loads from the registry; moving the champion; fetching between processes ---------------------------


def _stored_folder(registry: Registry, version: str) -> Path:
    """Where the registry's artifact store (the workspace's file store) keeps a version's files."""
    from urllib.parse import urlparse

    mv = registry.client.get_model_version(NAME, version)
    root = urlparse(registry.client.get_run(mv.run_id).info.artifact_uri).path
    return Path(root) / mv.source.removeprefix(f"runs:/{mv.run_id}/")


def _serve(*args: str | Path, wait_s: float = 120) -> tuple[int, bool, str]:
    """Run the real CLI, ``distml ARGS`` (a serve command): (exit code, whether it started listening, stderr).

    A server that starts is stopped at once with SIGTERM, by its pid: these tests are about refusals.
    """
    cmd = [sys.executable, "-m", "distml", *map(str, args), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    started = threading.Event()
    err: list[str] = []

    def pump_out() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("listening on ") and not started.is_set():
                started.set()
                proc.send_signal(signal.SIGTERM)

    def pump_err() -> None:
        assert proc.stderr is not None
        err.append(proc.stderr.read())

    threads = [threading.Thread(target=pump_out, daemon=True), threading.Thread(target=pump_err, daemon=True)]
    for t in threads:
        t.start()
    try:
        code = proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait(10)
    for t in threads:
        t.join(10)
    return code, started.is_set(), "".join(err)


def test_serve_refuses_a_champion_whose_stored_artifact_was_changed(two_versions: Path, tmp_path: Path) -> None:
    """Someone with write access to MLflow's artifact store swaps the champion's graph and fixes up its card."""
    home = two_versions
    registry = Registry(Workspace(home))
    stored, stored2 = _stored_folder(registry, "1"), _stored_folder(registry, "2")
    shutil.copyfile(stored2 / "model.onnx", stored / "model.onnx")  # a valid graph, only not the registered one
    card = json.loads((stored / "model.json").read_text())
    card["files"]["model.onnx"]["sha256"] = sha256_file(stored / "model.onnx")
    (stored / "model.json").write_text(json.dumps(card))
    open_artifact(stored)  # the folder-local check alone is satisfied
    config = tmp_path / "distml.toml"
    config.write_text('[train]\ndataset = "tiny"\n')  # the default model is then tiny-classifier@champion
    refs: list[list[str | Path]] = [["--config", config, "--home", home, "serve"],
                                    ["--home", home, "serve", f"models:/{NAME}@champion"],
                                    ["--home", home, "serve", f"models:/{NAME}/1"]]  # fmt: skip
    for args in refs:
        code, started, err = _serve(*args)
        assert (code, started) == (1, False), err
        assert len(err.strip().splitlines()) == 1, err
        assert f"{NAME} version 1: model.onnx in the registry's artifact store has sha256" in err, err
        assert "refusing to load it" in err
    assert not (home / "models" / NAME / "1").exists()  # the altered copy was never cached
    # The untouched version still serves: the check refuses what changed, not everything.
    code, started, err = _serve("--home", home, "serve", f"models:/{NAME}/2")
    assert started, err
    # A changed card (other class names, the same graph) is refused too: the card's hash is recorded as well.
    card2 = json.loads((stored2 / "model.json").read_text())
    card2["class_names"][0] = "renamed"
    (stored2 / "model.json").write_text(json.dumps(card2))
    shutil.rmtree(home / "models" / NAME / "2")  # the copy cached by the serve above
    with pytest.raises(ModelError, match=f"{NAME} version 2: model.json in the registry's artifact store is not"):
        resolve_model(f"models:/{NAME}/2", Workspace(home))


def test_a_changed_local_copy_is_replaced_by_the_registered_one(two_versions: Path) -> None:
    ws = Workspace(two_versions)
    first = resolve_model(f"models:/{NAME}/1", ws)  # downloaded into <home>/models/NAME/1
    registered = Registry(ws).version(NAME, "1").tags["distml.onnx_sha256"]
    other = resolve_model(f"models:/{NAME}/2", ws)
    shutil.copyfile(other.onnx_path, first.onnx_path)  # the cached copy now holds another graph...
    card = json.loads((first.path / "model.json").read_text())
    card["files"]["model.onnx"]["sha256"] = sha256_file(first.onnx_path)  # ...that its own card vouches for
    (first.path / "model.json").write_text(json.dumps(card))
    again = resolve_model(f"models:/{NAME}/1", ws)
    assert again.path == first.path and sha256_file(again.onnx_path) == registered
    assert again.card.onnx_sha256 == registered
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".")]  # no temp or stale folder left


def _with_failed_parity(home: Path, tmp_path: Path, **parity: float) -> Path:
    """An artifact of run0 whose card records a failed parity check (a graph of its own, so its own sha256)."""
    import onnx

    folder = tmp_path / "failed-parity"
    artifact, _ = export_run(find_run("run0", Workspace(home)), folder)
    graph = onnx.load(str(artifact.onnx_path))
    graph.doc_string = "a copy with a parity check that failed"
    onnx.save(graph, str(artifact.onnx_path))
    card = json.loads((folder / "model.json").read_text())
    card["files"]["model.onnx"]["sha256"] = sha256_file(artifact.onnx_path)
    card["parity"].update(parity)
    (folder / "model.json").write_text(json.dumps(card))
    return folder


def test_a_version_that_failed_parity_is_never_served_nor_made_champion(two_versions: Path, tmp_path: Path) -> None:
    from distml.pipeline.steps import register_step

    home = two_versions
    ws = Workspace(home)
    registry = Registry(ws)
    # Top-1 agreement below 100%: registered (to keep the record), tagged failed, never loaded.
    version = registry.register(open_artifact(_with_failed_parity(home, tmp_path, top1_agreement=0.99)), promote=False)
    assert version.version == "3" and version.tags["distml.parity"] == "failed"
    code, started, err = _serve("--home", home, "serve", f"models:/{NAME}/3")
    assert (code, started) == (1, False), err
    assert len(err.strip().splitlines()) == 1 and f"{NAME} version 3 did not pass the ONNX parity check" in err, err
    # The pipeline's register step finds the version by its sha256 and promotes it: refused.
    with pytest.raises(RegistryError, match=f"{NAME} version 3 did not pass the ONNX parity check"):
        register_step(ws, tmp_path / "failed-parity")
    # Probabilities off by more than the limit (every top-1 agreeing) is a failed check too.
    shutil.rmtree(tmp_path / "failed-parity")
    off = open_artifact(_with_failed_parity(home, tmp_path, max_abs_diff_probabilities=0.5))
    with pytest.raises(RegistryError, match=f"{NAME} version 4 did not pass"):
        registry.register(off)
    assert registry.lookup(f"models:/{NAME}@champion").version == "1"
    # Rolling back onto a version whose parity tag is not 'passed' is refused like promoting it.
    assert run_cli("--home", home, "models", "promote", NAME, "2").code == 0
    registry.client.set_model_version_tag(NAME, "1", "distml.parity", "failed")
    back = run_cli("--home", home, "models", "rollback", NAME)
    assert back.code == 2 and "cannot roll back" in back.err and f"{NAME} version 1 did not pass" in back.err
    assert registry.lookup(f"models:/{NAME}@champion").version == "2"


class _Crash(BaseException):
    """Stands for the process dying: nothing after it runs."""


def test_a_promote_cut_short_between_its_alias_writes_leaves_a_consistent_pair(
    two_versions: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = Workspace(two_versions)
    registry = Registry(ws)
    real = registry.client.set_registered_model_alias
    calls: list[str] = []

    def dies_at_the_second_alias_write(name: str, alias: str, version: str) -> None:
        calls.append(alias)
        if len(calls) == 2:
            raise _Crash
        real(name, alias, version)

    monkeypatch.setattr(registry.client, "set_registered_model_alias", dies_at_the_second_alias_write)
    with pytest.raises(_Crash):
        registry.promote(NAME, "2")  # champion 1 -> 2; previous -> 1
    assert len(calls) == 2  # one alias written, the process gone before the other
    # Another process (a client of its own) sees one consistent pair, and serves that champion.
    reader = Registry(ws)
    pair = (reader.lookup(f"models:/{NAME}@champion").version, reader.lookup(f"models:/{NAME}@previous").version)
    assert pair == ("2", "1")
    assert resolve_model(f"models:/{NAME}@champion", ws).card.version == "2"
    shown = run_cli("--home", two_versions, "models", "show", NAME)
    assert [line.split()[:2] for line in shown.out.splitlines()[1:]] == [["1", "previous"], ["2", "champion"]]
    # Running the promote again finishes the move in MLflow itself, and the champion history is whole.
    assert run_cli("--home", two_versions, "models", "promote", NAME, "2").code == 0
    client = Registry(ws).client
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == "2"
    assert str(client.get_model_version_by_alias(NAME, "previous").version) == "1"
    assert "distml.champion_move" not in client.get_registered_model(NAME).tags
    back = run_cli("--home", two_versions, "models", "rollback", NAME)
    assert back.code == 0 and "rolled back to version 1" in back.out


_FETCHER = """
import json, os, sys
from pathlib import Path
from distml.registry import resolve_model
from distml.workspace import Workspace

root, rounds = Path(sys.argv[1]), int(sys.argv[2])
report = []
for r in range(rounds):
    print("ready", flush=True)
    sys.stdin.readline()  # the parent releases both processes at once
    try:
        artifact = resolve_model("models:/tiny-classifier/1", Workspace(root / f"cache{r}"))
        report.append({"folder": os.stat(artifact.path).st_ino})
    except BaseException as exc:
        report.append({"error": f"{type(exc).__name__}: {exc}"})
print("done " + json.dumps(report), flush=True)
"""


def test_two_processes_fetching_the_same_version_at_once(two_versions: Path, tmp_path: Path) -> None:
    """Each round, two real processes resolve the same version into the same new local folder at the same moment.

    Both get a verified copy, and it is the same folder: the process that finishes second keeps the first one's
    copy rather than deleting it (and putting its own in its place) while the first may already be reading it.
    """
    rounds = 6
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{two_versions / 'mlflow.db'}")
    procs = [subprocess.Popen([sys.executable, "-c", _FETCHER, str(tmp_path), str(rounds)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]  # fmt: skip
    reports: list[Any] = []
    try:
        for _ in range(rounds):
            for p in procs:
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
        for p in procs:
            assert p.stdout is not None
            reports.append(json.loads(p.stdout.readline().removeprefix("done ")))
            assert p.wait(60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    registered = Registry(Workspace(two_versions)).version(NAME, "1").tags["distml.onnx_sha256"]
    for r in range(rounds):
        folder = tmp_path / f"cache{r}" / "models" / NAME
        assert [p.name for p in folder.iterdir()] == ["1"]  # one copy, no temp folder left behind
        assert sha256_file(folder / "1" / "model.onnx") == registered
        assert json.loads((folder / "1" / "model.json").read_text())["version"] == "1"
        final = os.stat(folder / "1").st_ino
        assert [report[r] for report in reports] == [{"folder": final}] * 2, f"round {r}"


@pytest.mark.parametrize(
    "args",
    [
        ["models", "show", "models:/" + "a" * 5000 + "@champion"],
        ["models", "show", "x" * 5000],
        ["models", "promote", NAME, "9" * 5000],
        ["predict", "models:/" + "b" * 5000, "--dataset", "tiny", "--out", "p.csv"],
    ],
)
def test_errors_do_not_echo_long_references_in_full(two_versions: Path, args: list[str]) -> None:
    result = run_cli("--home", two_versions, *args)
    assert result.code == 2, result.err
    assert len(result.err.strip().splitlines()) == 1 and len(result.err) < 400, result.err[:400]
