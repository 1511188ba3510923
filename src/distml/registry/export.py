"""Export a finished training run to a model artifact: ONNX with normalisation inside, checked against PyTorch.

The graph is the trained network behind a small wrapper: ``uint8`` N x H x W x C in, NCHW float normalised with
the dataset's own mean and std, then ``logits`` and their softmax ``probabilities`` (with ``[train] tta = "flip"``
the mean of the softmax of the image and of its mirror image, the logits their log). Before anything is written
in place, ONNX Runtime runs the graph on the first ``parity_images`` test images and compares with PyTorch: the
largest difference of a probability must be at most ``PARITY_MAX_ABS`` and every top-1 class must agree, or
the export fails and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distml import __version__
from distml.card import (
    CARD_FILE,
    CHECKPOINT_FILE,
    FORMAT,
    INPUT_NAME,
    ONNX_FILE,
    OUTPUT_NAMES,
    PARITY_MAX_ABS,
    PROBABILITIES,
    FileEntry,
    ImageInput,
    Lineage,
    Metrics,
    ModelCard,
    Normalisation,
    Parity,
    TensorSpec,
    ValidationSplit,
    model_name_for,
)
from distml.data.reader import open_path
from distml.errors import ModelError, NotFoundError, UsageError
from distml.files import sha256_file, write_atomic
from distml.registry.artifact import ModelArtifact, open_artifact
from distml.workspace import Workspace

if TYPE_CHECKING:
    from pydantic import JsonValue

    from distml.data.reader import Dataset
    from distml.train.job import Job
    from distml.train.models import UInt8Classifier

PARITY_IMAGES = 1000
OPSET = 18


def find_run(ref: str | Path, workspace: Workspace) -> Path:
    """A run folder from its name under ``<home>/runs`` or a path to it."""
    candidates = [Path(ref), workspace.home / "runs" / str(ref)]
    for path in candidates:
        if (path / "job.json").is_file():
            return path
    raise NotFoundError(f"no training run {str(ref)!r}", hint=f"see {workspace.home / 'runs'} or pass a run folder")


def export_run(
    run: Path, out: Path, *, parity_images: int = PARITY_IMAGES, name: str | None = None, keep_checkpoint: bool = True
) -> tuple[ModelArtifact, Parity]:
    """Export the run's final checkpoint to the artifact folder ``out`` (which must not exist yet)."""
    import torch

    from distml.train.checkpoint import load_latest
    from distml.train.job import Job
    from distml.train.models import ModelSpec, UInt8Classifier, build_model, for_prediction

    if out.exists():
        raise UsageError(f"{out} already exists", hint="choose a new --out folder")
    job = Job.read(run)
    result_file = run / "result.json"
    if not result_file.is_file():
        raise UsageError(f"run {run.name} has not finished (no result.json)", hint="finish or resume it first")
    loaded = load_latest(job.checkpoints, warn=lambda m: None)
    if loaded is None:
        raise ModelError(f"run {run.name} has no loadable checkpoint in {job.checkpoints}")
    ckpt_path, state = loaded
    dataset = open_path(job.dataset_path)
    if dataset.digest != job.dataset_digest:
        raise ModelError(
            f"run {run.name} was trained on {job.dataset_digest[:12]}, {job.dataset_path} now holds "
            f"{dataset.digest[:12]}"
        )
    h, w, c = dataset.image_shape
    torch.manual_seed(0)
    spec = ModelSpec(c, h, w, dataset.num_classes)
    net = build_model(job.config.model, spec, width=job.config.width, dropout=job.config.dropout)
    net.load_state_dict(state["model"])
    stats = dataset.manifest.stats
    # The run's test-time augmentation goes into the graph: serving, evaluation and the parity check below all
    # run the function the run's own val/test figures measured.
    wrapper = UInt8Classifier(for_prediction(net, job.config.tta), stats["mean"], stats["std"]).eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _export_onnx(wrapper, tmp / ONNX_FILE, (h, w, c))
        split = dataset.splits.get("test") or dataset.splits["train"]
        images = split.arrays().images
        parity = check_parity(wrapper, tmp / ONNX_FILE, images[:parity_images])
        if not parity.ok:
            raise ModelError(
                f"ONNX parity failed on {parity.images} images: max |p_onnx - p_torch| = "
                f"{parity.max_abs_diff_probabilities:.2e} (limit {PARITY_MAX_ABS:.0e}), top-1 agreement "
                f"{parity.top1_agreement:.2%} (needs 100%)",
                hint="nothing was written or registered",
            )
        if keep_checkpoint:
            shutil.copyfile(ckpt_path, tmp / CHECKPOINT_FILE)
        metrics = json.loads(result_file.read_text())
        card = _card(name or model_name_for(dataset.name), job, dataset, metrics, ckpt_path, parity, tmp)
        write_atomic(tmp / CARD_FILE, card.dumps().encode())
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_artifact(out), parity


def _export_onnx(wrapper: UInt8Classifier, path: Path, shape: tuple[int, int, int]) -> None:
    import torch

    # The exporter logs that torchvision's ops are skipped; we do not use torchvision.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    example = torch.zeros((2, *shape), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    chatter = io.StringIO()  # the exporter prints its progress; keep it for the error message only
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={INPUT_NAME: {0: batch}},
                opset_version=OPSET,
                external_data=False,
            )
            assert program is not None
            program.save(str(path))
    except Exception as exc:
        raise ModelError(f"ONNX export failed: {type(exc).__name__}: {exc}\n{chatter.getvalue()[-2000:]}") from None


def check_parity(wrapper: UInt8Classifier, onnx_path: Path, images: np.ndarray, batch: int = 256) -> Parity:
    """Run ONNX Runtime and PyTorch on the same uint8 images; compare probabilities and top-1 classes."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst, agree = 0.0, 0
    for start in range(0, len(images), batch):
        chunk = np.ascontiguousarray(images[start : start + batch])
        (p_onnx,) = session.run([PROBABILITIES], {INPUT_NAME: chunk})
        with torch.no_grad():
            _, p_torch = wrapper(torch.from_numpy(np.array(chunk)))  # a copy: the store's arrays are read-only
        p_ref = p_torch.numpy()
        worst = max(worst, float(np.abs(p_onnx - p_ref).max()))
        agree += int((p_onnx.argmax(1) == p_ref.argmax(1)).sum())
    return Parity(images=len(images), max_abs_diff_probabilities=worst, top1_agreement=agree / max(1, len(images)))


def _card(
    name: str, job: Job, dataset: Dataset, metrics: dict[str, JsonValue], ckpt: Path, parity: Parity, folder: Path
) -> ModelCard:
    h, w, c = dataset.image_shape
    k = dataset.num_classes
    files = {ONNX_FILE: FileEntry(sha256=sha256_file(folder / ONNX_FILE), bytes=(folder / ONNX_FILE).stat().st_size)}
    if (folder / CHECKPOINT_FILE).is_file():
        files[CHECKPOINT_FILE] = FileEntry(sha256=sha256_file(folder / CHECKPOINT_FILE))
    return ModelCard(
        format=FORMAT,
        name=name,
        version=None,  # set by the registry
        task="image-classification",
        class_names=list(dataset.manifest.class_names),
        input=ImageInput(name=INPUT_NAME, dtype="uint8", shape=[-1, h, w, c], layout="NHWC"),
        outputs=[TensorSpec(name=output, dtype="float32", shape=[-1, k]) for output in OUTPUT_NAMES],
        normalisation=Normalisation(mean=dataset.manifest.stats["mean"], std=dataset.manifest.stats["std"]),
        metrics=Metrics.model_validate({key: metrics.get(key) for key in Metrics.model_fields}),
        parity=parity,
        lineage=Lineage(
            dataset=dataset.name,
            dataset_digest=dataset.digest,
            training_run=job.run_dir.name,
            mlflow_run_id=job.mlflow_run_id,
            checkpoint=ckpt.name,
            world_size=job.world_size,
            config=job.config.model_dump(mode="json"),
            code_version=_code_version(),
            # The images the run held out (result.json's record): what its validation score rests on.
            validation=ValidationSplit.model_validate(metrics["validation"]) if metrics.get("validation") else None,
        ),
        files=files,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def _code_version() -> str:
    """distml's version, and the git commit when running from a checkout (with ``+dirty`` for local edits)."""
    import subprocess

    repo = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{commit[:12]}{'.dirty' if dirty else ''}" if commit else __version__
