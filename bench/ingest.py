"""Benchmark the data stage on the real Fashion-MNIST copy: ingest, no-op re-ingest, shard read throughput.

Usage: python bench/ingest.py [--source DIR] [--repeats N] [--out bench/results/ingest.json]

Prints a table (min / median / max over the repeats) and writes the figures, with the machine, as JSON.
Targets (issue 3, on a 2-core machine): ingest <= 3 s, re-ingest <= 0.5 s, shard read >= 1 GB/s from page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from distml.data import DatasetStore, open_dataset
from distml.data.ingest import ingest
from distml.data.sources import FashionMnistSource
from distml.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "datasets" / "fashion-mnist"


def _timed(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ingest.json")
    args = parser.parse_args()
    if not (args.source / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"error: no Fashion-MNIST files in {args.source}; pass --source DIR")

    rows: list[dict[str, object]] = []

    def record(
        name: str, times: list[float], target: str, unit: str = "s", value: Callable[[float], float] | None = None
    ) -> None:
        vals = sorted(value(t) if value else t for t in times)
        rows.append(
            {"measure": name, "unit": unit, "min": vals[0], "median": statistics.median(vals), "max": vals[-1],
             "target": target, "runs": len(vals)}
        )  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="distml-bench-") as tmp:
        homes = iter(Path(tmp) / f"h{i}" for i in range(1000))

        def fresh_ingest() -> None:
            home = next(homes)
            src = FashionMnistSource(home / "downloads", location=str(args.source))
            ingest(src, store=DatasetStore(Workspace(home)))

        record("ingest (in-process, fresh workspace)", _timed(fresh_ingest, args.repeats), "<= 3 s")

        home = Path(tmp) / "main"
        src_args = ["--home", str(home), "data", "ingest", "fashion-mnist", "--source", str(args.source)]
        cli = [sys.executable, "-m", "distml", *src_args]
        subprocess.run(cli, check=True, capture_output=True)

        def reingest() -> None:
            src = FashionMnistSource(home / "downloads", location=str(args.source))
            assert ingest(src, store=DatasetStore(Workspace(home))).reused

        record("re-ingest, no-op (in-process)", _timed(reingest, args.repeats), "<= 0.5 s")
        record(
            "re-ingest, no-op (whole `distml` process)",
            _timed(lambda: subprocess.run(cli, check=True, capture_output=True), args.repeats),
            "-",
        )

        split = open_dataset("fashion-mnist", home=home).split("train")
        part = split.shard(0, 2)
        nbytes = part.images.nbytes + part.labels.nbytes

        def read_rank_shard() -> None:
            p = split.shard(0, 2)
            # Touch every byte (a memory-mapped view is lazy): sum as the cheapest full pass.
            int(np.asarray(p.images).sum(dtype=np.uint64)) + int(np.asarray(p.labels).sum())

        def copy_rank_shard() -> None:
            p = split.shard(0, 2)
            np.array(p.images, copy=True)
            np.array(p.labels, copy=True)

        read_rank_shard()  # warm the page cache
        gbps = lambda t: nbytes / t / 1e9  # noqa: E731
        record(
            "shard read: rank 0 of 2, train, into memory",
            _timed(copy_rank_shard, args.repeats * 4),
            ">= 1 GB/s",
            "GB/s",
            gbps,
        )
        record("shard read + sum over every byte", _timed(read_rank_shard, args.repeats * 4), "-", "GB/s", gbps)

        # The first read in a fresh process also pays for faulting in new memory: what a worker sees at start-up.
        cold_code = (
            "import sys, time, numpy as np; from distml.data import open_dataset; "
            "s = open_dataset('fashion-mnist', home=sys.argv[1]).split('train'); t = time.perf_counter(); "
            "p = s.shard(0, 2); np.array(p.images, copy=True); np.array(p.labels, copy=True); "
            "print(time.perf_counter() - t)"
        )
        cold = [
            float(subprocess.run([sys.executable, "-c", cold_code, str(home)], check=True, capture_output=True,
                                 text=True).stdout)
            for _ in range(args.repeats)
        ]  # fmt: skip
        record("shard read: same, first read in a fresh process", cold, ">= 1 GB/s", "GB/s", gbps)

        def whole_split_tensor() -> None:
            images, _labels = split.to_torch()
            assert images.shape[0] == 60000

        whole = split.info.num_samples * 28 * 28 + split.info.num_samples * 8
        whole_split_tensor()
        record("whole train split -> torch uint8 tensor", _timed(whole_split_tensor, args.repeats * 4), "-", "GB/s",
               lambda t: whole / t / 1e9)  # fmt: skip

    machine = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "rank_shard_bytes": nbytes,
    }
    print(f"\nFashion-MNIST data stage on {machine['cpu']} ({machine['cores']} cores), Python {machine['python']}\n")
    header = f"{'measure':<46} {'min':>9} {'median':>9} {'max':>9}  {'unit':<5} target"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['measure']:<46} {r['min']:>9.3f} {r['median']:>9.3f} {r['max']:>9.3f}  {r['unit']:<5} {r['target']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
