"""``distml predict --ray``: Ray Data over the store's shards, ONNX Runtime in actors, one Parquet dataset.

A real two-node Ray cluster on loopback (tests/ray_cluster.py), the command run as users run it (a subprocess with
the cluster's token in its environment), compared with the local command on the same model and split.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest

from conftest import make_mnist, run_cli
from distml.workspace import Workspace
from ray_cluster import LocalRayCluster, ray_cluster_starting  # noqa: F401  (the module-scoped fixture)


@pytest.fixture(scope="module")
def tiny(
    ray_cluster_starting: Future[LocalRayCluster],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path]:
    """(home, model folder): a 1,200-image test split over several shard files, and a 1-epoch seed cnn for it.

    The module's cluster starts meanwhile (asked for first, it starts in a thread).
    """
    from distml.config import TrainConfig
    from distml.data.ingest import ingest
    from distml.data.sources import FashionMnistSource
    from distml.data.store import DatasetStore
    from distml.registry.export import export_run, find_run
    from distml.train import train

    root = tmp_path_factory.mktemp("ray-predict")
    home = root / "home"
    files = make_mnist(root / "src", n_train=128, n_test=1200)
    source = FashionMnistSource(home / "downloads", location=str(files.folder), spec=files.spec)
    # 100 kB shards: the test split is 10 files, so read tasks' parts start and end inside files.
    ingest(source, store=DatasetStore(Workspace(home), shard_bytes=100_000), name="tiny")
    cfg = TrainConfig.model_validate(
        {"dataset": "tiny", "model": "cnn", "workers": 1, "epochs": 1, "batch_size": 64, "log_every_steps": 1000}
    )
    train(cfg, Workspace(home), "run0")
    artifact, _ = export_run(find_run("run0", Workspace(home)), root / "model", keep_checkpoint=False)
    return home, artifact.path


def _on_ray(cluster: LocalRayCluster, *args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "distml", *map(str, args), "--ray", cluster.address]
    return subprocess.run(cmd, env=cluster.client_env(), capture_output=True, text=True, timeout=180, check=False)


def test_predict_on_ray_writes_the_rows_of_the_local_command(
    tiny: tuple[Path, Path],
    ray_cluster_starting: Future[LocalRayCluster],  # noqa: F811
    tmp_path: Path,
) -> None:
    import pyarrow.parquet as pq

    ray_cluster = ray_cluster_starting.result(timeout=120)
    home, model = tiny
    local = run_cli("--home", home, "predict", model, "--dataset", "tiny", "--out", tmp_path / "local.parquet")
    assert local.code == 0, local.err
    # A previous prediction folder is there: it is replaced whole, its files do not mix with the new ones.
    out = tmp_path / "preds"
    out.mkdir()
    shutil.copy(tmp_path / "local.parquet", out / "part-000000099999.parquet")
    done = _on_ray(ray_cluster, "--home", home, "predict", model, "--dataset", "tiny", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "predicted 1,200 images" in done.stdout and "Traceback" not in done.stderr
    assert "2 actors x 1 thread(s) on 2 node(s), 4 read tasks" in done.stderr
    # The same accuracy line as the local command: the same predictions for the same labels.
    accuracy = local.out.split("accuracy ")[1].split(" ")[0]
    assert f"accuracy {accuracy}" in done.stdout
    # One Parquet dataset: a part file per read task, named by its first row; nothing left beside the folder.
    assert sorted(p.name for p in out.iterdir()) == [f"part-{i:012d}.parquet" for i in (0, 300, 600, 900)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.parquet", "preds"]
    # Read in file-name order, the local command's rows in its order: the same schema and values, bit for bit.
    expected = pq.read_table(tmp_path / "local.parquet")
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == expected.schema.remove_metadata()
    assert table.column("id").to_pylist() == list(range(1200))
    assert table.equals(expected)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--out", "p.csv", "--dataset", "tiny"], "--ray writes a Parquet dataset (a folder), not p.csv"),
        (["--out", "preds", "--images", "photos"], "--ray predicts a stored dataset (--dataset)"),
        (["--out", "taken", "--dataset", "tiny"], "exists and is not a prediction folder"),
        (["--out", "preds", "--dataset", "tiny", "--split", "valid"], "has no split 'valid'"),
        (["--out", "preds"], "give exactly one of --dataset and --images"),
    ],
)
def test_predict_on_ray_refuses_bad_input_before_it_connects(
    tiny: tuple[Path, Path], tmp_path: Path, args: list[str], needle: str
) -> None:
    """Each is refused with one line, before any connection: the address given does not even exist."""
    home, model = tiny
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    (tmp_path / "photos").mkdir()
    args = [str(tmp_path / a) if a in ("p.csv", "preds", "taken", "photos") else a for a in args]
    result = run_cli("--home", home, "predict", model, *args, "--ray", "127.0.0.1:1")
    assert result.code == 2, result.err
    assert needle in result.err and "Traceback" not in result.err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "preds").exists()


def test_predict_on_ray_verifies_the_model_as_locally(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """A model.onnx that is not the one its card records is refused on the driver, before anything is sent."""
    home, model = tiny
    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    with (broken / "model.onnx").open("ab") as f:
        f.write(b"\0")
    result = run_cli(
        "--home", home, "predict", broken, "--dataset", "tiny", "--out", tmp_path / "preds", "--ray", "127.0.0.1:1"
    )
    assert result.code == 1 and "model.onnx is corrupt" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "preds").exists()
