"""Benchmark batch prediction: Fashion-MNIST's 60,000 train images, store -> ONNX Runtime -> Parquet.

Trains a seed ``cnn`` for one epoch (the weights do not change the speed), registers it as champion, then
measures, repeated and interleaved:

- ``predict()`` in-process, the whole path: memory-mapped shards, ONNX Runtime on all cores, Parquet rows;
- the whole ``distml predict models:/...@champion`` command (process start, MLflow lookup included);
- ONNX Runtime alone on the same images: 1 thread at batch 64 (the issue's reference point), and all cores
  at the batch ``predict`` uses.

Usage: python bench/predict.py [--repeats 5] [--out bench/results/predict.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from distml.config import TrainConfig
from distml.data import DatasetStore, open_dataset
from distml.data.ingest import ingest
from distml.data.sources import FashionMnistSource
from distml.registry import Registry, export_run, find_run, resolve_model
from distml.registry.predict import CHUNK, DEFAULT_BATCH, dataset_batches, predict
from distml.train import train
from distml.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "datasets" / "fashion-mnist"
MODEL = "models:/fashion-mnist-classifier@champion"


def ort_alone(session: Any, images: np.ndarray, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        session.run(None, {"images": images[i : i + batch]})
    return len(images) / (time.perf_counter() - start)


def _row(name: str, values: list[float], target: str) -> dict[str, Any]:
    return {"measure": name, "median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": len(values), "target": target}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "predict.json")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="distml-bench-predict-") as tmp:
        home = Path(tmp) / "home"
        ws = Workspace(home)
        ingest(FashionMnistSource(home / "downloads", location=str(args.source)), store=DatasetStore(ws))
        cfg = TrainConfig.model_validate({"model": "cnn", "workers": 1, "epochs": 1, "batch_size": 256})
        train(cfg, ws, "bench")
        artifact, _ = export_run(find_run("bench", ws), Path(tmp) / "exported")
        Registry(ws).register(artifact)
        model = resolve_model(MODEL, ws)
        arrays = open_dataset("fashion-mnist", home=home).split("train").arrays()
        images = np.ascontiguousarray(arrays.images)
        one_thread, all_cores = model.session(threads=1), model.session(threads=cores)
        e2e, cli, ort1, ortn = [], [], [], []
        for r in range(args.repeats):
            out = Path(tmp) / f"preds-{r}.parquet"
            result = predict(model, dataset_batches(arrays.images, arrays.labels, CHUNK), out, progress=False)
            e2e.append(result.images_per_s)
            start = time.perf_counter()
            cmd = [sys.executable, "-m", "distml", "--home", str(home), "predict", MODEL, "--dataset", "fashion-mnist",
                   "--split", "train", "--out", str(Path(tmp) / f"cli-{r}.parquet")]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True)
            cli.append(time.perf_counter() - start)
            ort1.append(ort_alone(one_thread, images, 64))
            ortn.append(ort_alone(all_cores, images, DEFAULT_BATCH))
            print(f"round {r + 1}: predict() {e2e[-1]:,.0f} img/s, command {cli[-1]:.2f} s, "
                  f"ORT 1 thread b64 {ort1[-1]:,.0f}, ORT {cores} threads b{DEFAULT_BATCH} {ortn[-1]:,.0f}",
                  flush=True)  # fmt: skip
        import pyarrow.parquet as pq

        table = pq.read_table(Path(tmp) / "preds-0.parquet")
        assert table.num_rows == 60_000, table.num_rows
        accuracy = result.accuracy
    rows = [
        _row("predict(): store -> ONNX Runtime -> Parquet, img/s", e2e, ">= 60,000"),
        _row("distml predict (whole command, 60k images), s", cli, "-"),
        _row("ONNX Runtime alone, 1 thread, batch 64, img/s", ort1, "reference (~130,000)"),
        _row(f"ONNX Runtime alone, {cores} threads, batch {DEFAULT_BATCH}, img/s", ortn, "-"),
    ]
    print(f"\nFashion-MNIST train split (60,000 images), seed cnn, {cores} cores; accuracy {accuracy:.2%}\n")
    print(f"{'measure':<56} {'median':>10} {'min':>10} {'max':>10}  target")
    for row in rows:
        print(f"{row['measure']:<56} {row['median']:>10,.2f} {row['min']:>10,.2f} {row['max']:>10,.2f}  "
              f"{row['target']}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cores": cores, "batch": DEFAULT_BATCH, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
