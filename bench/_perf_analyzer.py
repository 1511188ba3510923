"""Triton's ``perf_analyzer`` (C++, Triton's own gRPC client) as bench/serve_peers.py's gRPC streaming load.

h2load (bench/_grpc_load.py) sends unary calls, one HTTP/2 request each; it cannot hold a gRPC stream open.
``perf_analyzer --streaming`` does: it sends ``ModelStreamInfer`` messages on long-lived bidirectional streams,
``--concurrency-range C`` keeping C requests in flight, as Triton's and KServe's users measure a server. It reads
the model's ``ModelMetadata`` and ``ModelConfig`` first (distml answers both) and sends the image given in
``--input-data`` (the same first Fashion-MNIST test image as every other column).

Where it comes from: Triton's ``tritonclient`` wheels up to 2.35 carried the binary (``bin/perf_analyzer``);
later ones moved it to Triton's SDK container, and the ``perf-analyzer`` name on PyPI is a placeholder. So the
first use downloads ``tritonclient==2.35.0`` (manylinux x86-64) and ``nvidia-cuda-runtime-cu12`` (the binary
links ``libcudart.so.12``; nothing here uses a GPU) with pip into bench/.cache/perf_analyzer and keeps the two
files it needs. It also links ``libb64.so.0d``: ``apt-get install libb64-0d`` (Debian/Ubuntu).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

HOME = Path(__file__).resolve().parent / ".cache" / "perf_analyzer"
BINARY, LIBS = HOME / "perf_analyzer", HOME / "lib"
WHEEL = "tritonclient==2.35.0"  # the last wheels that carry bin/perf_analyzer
CUDART = "nvidia-cuda-runtime-cu12"


def ensure() -> Path | None:
    """The perf_analyzer binary, fetched on first use; None (with a note on stderr) where it cannot run here."""
    if not BINARY.exists():
        try:
            _fetch()
        except (OSError, subprocess.SubprocessError, KeyError, IndexError) as exc:
            print(f"note: perf_analyzer is not available ({exc}); no gRPC streaming column", file=sys.stderr)
            return None
    done = subprocess.run([str(BINARY), "--version"], capture_output=True, text=True, env=env(), check=False)
    if "error while loading shared libraries" in done.stderr:
        hint = " (apt-get install libb64-0d)" if "libb64" in done.stderr else ""
        print(f"note: perf_analyzer cannot start: {done.stderr.strip()}{hint}", file=sys.stderr)
        return None
    return BINARY


def _fetch() -> None:
    """pip download the two wheels, unpack the binary and libcudart.so.12 into HOME."""
    with tempfile.TemporaryDirectory(prefix="distml-perf-analyzer-") as tmp:
        for spec in (WHEEL, CUDART):
            pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
            subprocess.run(
                [*pip, "--platform", "manylinux2014_x86_64", "--python-version", "3.11", "-d", tmp, spec],
                check=True,
                timeout=900,
            )
        LIBS.mkdir(parents=True, exist_ok=True)
        wheels = {path.name.split("-")[0]: path for path in Path(tmp).glob("*.whl")}
        with zipfile.ZipFile(wheels["tritonclient"]) as z:
            [member] = [n for n in z.namelist() if n.endswith("/bin/perf_analyzer")]
            _extract(z, member, BINARY)
        with zipfile.ZipFile(wheels["nvidia_cuda_runtime_cu12"]) as z:
            member = next(n for n in z.namelist() if re.search(r"/libcudart\.so\.12(\.|$)", n))
            _extract(z, member, LIBS / "libcudart.so.12")
        BINARY.chmod(0o755)


def _extract(z: zipfile.ZipFile, member: str, to: Path) -> None:
    part = to.with_suffix(".part")
    with z.open(member) as src, part.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    part.replace(to)  # never a half-written binary under the final name


def env() -> dict[str, str]:
    """The environment perf_analyzer runs in: its libraries on the loader's path."""
    return {**os.environ, "LD_LIBRARY_PATH": f"{LIBS}:{os.environ.get('LD_LIBRARY_PATH', '')}"}


def input_data(pixels: bytes, path: Path) -> Path:
    """perf_analyzer's ``--input-data`` file: the 28x28x1 UINT8 image (dims without the batch, as the model's
    configuration gives them)."""
    doc = {"data": [{"images": {"content": list(pixels), "shape": [28, 28, 1]}}]}
    path.write_text(json.dumps(doc))
    return path


def command(address: str, model: str, data: Path, conns: int, seconds: int, *, streaming: bool) -> list[str]:
    """perf_analyzer at ``conns`` requests in flight for about ``seconds`` (three windows, averaged)."""
    window_ms = max(500, seconds * 1000 // 3)
    return [
        str(BINARY),
        "-m",
        model,
        "-i",
        "grpc",
        "-u",
        address,
        *(["--streaming"] if streaming else []),
        f"--concurrency-range={conns}",
        f"--input-data={data}",
        "--measurement-mode=time_windows",
        f"--measurement-interval={window_ms}",
        "--stability-percentage=1000",  # stable at the first three windows: the rounds repeat, not perf_analyzer
        "--max-trials=6",
    ]


def parse(out: str) -> dict[str, Any]:
    """req/s, count and p50/p99 from perf_analyzer's report (the figures of its last concurrency)."""
    throughput = re.findall(r"Throughput: ([\d.]+) infer/sec", out)
    count = re.findall(r"Request count: (\d+)", out)
    p50 = re.findall(r"p50 latency: (\d+) usec", out)
    p99 = re.findall(r"p99 latency: (\d+) usec", out)
    if not throughput or not count:
        raise RuntimeError(f"cannot read perf_analyzer's output:\n{out[-3000:]}")
    failures = [line.strip() for line in out.splitlines() if "error" in line.lower()]
    errors = {"perf_analyzer": failures} if failures else {}
    return {
        "req_per_s": float(throughput[-1]),
        "requests": int(count[-1]),
        "succeeded": int(count[-1]),
        "p50_ms": int(p50[-1]) / 1e3 if p50 else None,
        "p99_ms": int(p99[-1]) / 1e3 if p99 else None,
        "errors": errors,
        "ok": not errors,
    }
