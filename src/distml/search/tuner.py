"""``distml tune``: an Optuna ask/tell loop whose trials are ordinary distml training runs.

Trial N of study S trains in ``<home>/runs/<S>-t<NNN>`` with ``[train]`` merged with its sampled params (and
``[search] epochs``, when set, as its epochs). Trials listed in ``[search] enqueue`` run first. The tuner reads
each running trial's ``history.json`` every ``poll_s``, reports the validation metric of every new epoch to
Optuna, and stops the trial's job when the pruner says so (PRUNED, with the epochs it used). A job that ends well
is COMPLETE with its last validation value; one that crashes is FAIL with the error from its log, and the study
goes on. At ``--budget-minutes`` no trial starts, and the running ones stop without being judged: they stay
resumable (STOPPED in ``tune show``), and the result says that the budget ended the study early.

Resuming: the study's lock proves that no other tuner runs it, so a trial the storage still calls RUNNING was
interrupted (the tuner was killed; its job died with it) or stopped by the budget. The next call starts that trial
again with the same params and the config its job ran with (``job.json``) in the same run folder, where training
resumes from its last checkpoint; it is neither lost nor counted twice. Each new trial's sampler is seeded by the
study's seed and the trial's number (:func:`~distml.search.study.make_sampler`), so the same seed with one trial at
a time gives the same params whether or not the study was interrupted.

With ``[cluster] engine = "ray"`` (``--ray ADDRESS``) the trials' workers run on the Ray cluster
(:class:`~distml.search.executor.RayExecutor`), as many trials at once as its CPUs hold; the study, its name, the
trials' run folders and MLflow runs are the same as on this host: the engine is not part of what a study is.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

from distml.config import DistmlConfig, TrainConfig
from distml.errors import ConfigError
from distml.search.loop import StudyLoop
from distml.search.result import StudyResult, TrialRecord, load_study_result
from distml.search.space import check_batches, grid_size, max_epochs, space_document, space_sha256
from distml.search.study import check_study_name, lock_study, open_study, refuse_leftovers, storage_path
from distml.search.trials import trial_run_dir
from distml.workspace import Workspace

if TYPE_CHECKING:
    from distml.search.executor import TrialExecutor


__all__ = ["StudyResult", "TrialRecord", "load_study_result", "trial_run_dir", "tune"]


def tune(
    config: DistmlConfig,
    workspace: Workspace,
    *,
    study: str,
    stream: TextIO | None = None,
    executor: TrialExecutor | None = None,
    poll_s: float = 1.0,
) -> StudyResult:
    """Run study ``study`` up to ``[search] trials`` trials (resuming an interrupted one first); its result.

    Raises UsageError/ConfigError before anything starts for bad settings, TrainingError when every trial
    failed or the budget ended before any trial finished an epoch.
    """
    stream = stream or sys.stdout  # looked up now: the CLI's stdout may be redirected
    config = with_search_epochs(config)
    search, base = config.search, config.train
    check_study_name(study)
    if base.val_fraction <= 0:
        raise ConfigError(
            "[train] val_fraction is 0: the search chooses on the validation split",
            hint="set val_fraction > 0 (e.g. 0.1)",
        )
    check_batches(config)
    digest, dataset_name = _dataset(base, workspace)
    total = search.trials
    if search.sampler == "grid" and total > grid_size(search.space):
        print(f"the grid has {grid_size(search.space)} points: running at most that many trials", file=stream)
        total = grid_size(search.space)
    document = space_document(search.space, search.metric, search.sampler, base)
    path = storage_path(workspace.home, study)
    lock = lock_study(workspace.home, study)
    try:
        if not path.exists():
            refuse_leftovers(workspace.home, study)
        opened = open_study(path, study, search, document, space_sha256(document), digest, max_epochs(config))
        loop = StudyLoop(
            config,
            workspace,
            opened,
            path,
            total,
            stream,
            executor or _executor(workspace, config),
            poll_s,
            dataset_name,
        )
        return loop.run()
    finally:
        lock.release()


def with_search_epochs(config: DistmlConfig) -> DistmlConfig:
    """``config`` with the ``[train]`` every trial starts from: ``[search] epochs`` (when set) as its epochs (the
    last rung), and the test split measured once, after a trial's last epoch: trials are compared on validation,
    so a per-epoch test pass would only cost time (~10 s of each resnet-fast epoch on 2 cores)."""
    update: dict[str, object] = {"eval_test": "end"}
    if config.search.epochs is not None:
        update["epochs"] = config.search.epochs
    return config.model_copy(update={"train": config.train.model_copy(update=update)})


def _executor(workspace: Workspace, config: DistmlConfig) -> TrialExecutor:
    """Where the trials run: ``[cluster]``'s Ray cluster (``--ray``), else this host."""
    if config.cluster.engine == "ray":
        from distml.search.executor import RayExecutor

        return RayExecutor(workspace, config.cluster)
    return _local_executor(workspace)


def _local_executor(workspace: Workspace) -> TrialExecutor:
    from distml.search.executor import LocalExecutor
    from distml.train.dist import gpu_count, usable_cores

    return LocalExecutor(workspace, usable_cores(), gpu_count())  # without an NVIDIA driver: no torch import


def _dataset(base: TrainConfig, workspace: Workspace) -> tuple[str, str]:
    from distml.data.reader import open_path
    from distml.data.store import DatasetStore

    dataset = open_path(DatasetStore(workspace).resolve(base.dataset))
    return dataset.digest, dataset.name
