"""Export to ONNX with parity, the MLflow model registry and its champion alias: real runs, real MLflow (SQLite)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import make_mnist, run_cli
from distml.config import TrainConfig
from distml.data import DatasetStore, ingest, open_dataset
from distml.data.sources import FashionMnistSource
from distml.errors import ModelError, NotFoundError, RegistryError, UsageError
from distml.registry import CHAMPION, Registry, export_run, find_run, open_artifact, resolve_model
from distml.registry import export as export_module
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


@pytest.fixture
def home(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained workspace: registry tests change the MLflow store."""
    copy = tmp_path / "home"
    shutil.copytree(trained, copy)
    return copy


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
    assert len(card["class_names"]) == 10 and card["metrics"]["test_accuracy"] is not None
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
    assert v1.card["version"] == "1" and v2.card["version"] == "2"
    assert v1.card["lineage"]["training_run"] == "run0" and v2.card["lineage"]["training_run"] == "run1"
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


def test_failed_parity_registers_nothing_and_leaves_the_champion(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_cli("--home", home, "models", "register", "run0").code == 0
    monkeypatch.setattr(export_module, "PARITY_MAX_ABS", -1.0)  # no real export can meet this limit
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
    from distml.data._files import sha256_file

    card["files"]["model.onnx"]["sha256"] = sha256_file(onnx_file)
    (tmp_path / "model" / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="cannot be loaded by ONNX Runtime"):
        open_artifact(tmp_path / "model").session()


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
    run_id = model.card["lineage"]["mlflow_run_id"]
    logged = registry.client.get_run(run_id).data.metrics
    assert logged["eval.test_accuracy"] == pytest.approx(report["metrics"]["test_accuracy"])
    assert {a.path for a in registry.client.list_artifacts(run_id, "evaluation")} >= {
        "evaluation/evaluation.md", "evaluation/confusion_matrix.png"}  # fmt: skip


def test_select_picks_the_best_by_the_declared_metric_and_registers_it(home: Path) -> None:
    result = run_cli("--home", home, "select", "run*", "--register")
    assert result.code == 0, result.err
    acc = {r: json.loads((home / "runs" / r / "evaluation" / "evaluation.json").read_text())["metrics"]
           ["test_accuracy"] for r in ("run0", "run1")}  # fmt: skip
    best = max(sorted(acc), key=lambda r: acc[r])  # ties: equal parameters and close latency; name order decides
    winner_line = next(line for line in result.out.splitlines() if line.endswith("winner"))
    if acc["run0"] != acc["run1"]:
        assert winner_line.startswith(best)
    winner = winner_line.split()[0]
    assert f"selected {winner} by test_accuracy (max)" in result.out
    registry = Registry(Workspace(home))
    champion = registry.lookup(f"models:/{NAME}@champion")
    assert champion.tags["distml.training_run"] == winner
    run_id = open_artifact(home / "runs" / winner / "model").card["lineage"]["mlflow_run_id"]
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
        (["ghost"], "no training run 'ghost'"),
        (["nomatch-*"], "no training run matches 'nomatch-*'"),
    ],
)
def test_select_bad_input(home: Path, args: list[str], needle: str) -> None:
    result = run_cli("--home", home, "select", *args)
    assert result.code == 2, result.err
    assert needle in result.err and "Traceback" not in result.err
