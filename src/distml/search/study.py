"""A study's storage and its lock: ``<home>/studies/<S>.db`` (Optuna's SQLite storage) and ``<S>.lock``.

The database is Optuna's own RDB schema, so ``optuna-dashboard sqlite:///<home>/studies/<S>.db`` opens it. The
study records what its trials depend on (``space_sha256`` and the document it hashes); a command with another
space is refused rather than mixing trials that are not comparable. One tuner at a time holds the lock, which is
also what lets the next one treat a trial left RUNNING as interrupted (see :mod:`distml.search.tuner`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from distml.errors import ConfigError, UsageError, WorkspaceError
from distml.search.config import SearchConfig
from distml.search.space import differences, grid

if TYPE_CHECKING:
    import optuna

    from distml.train.runlock import FileLock

Direction = Literal["maximize", "minimize"]
DIRECTIONS: dict[str, Direction] = {"val_accuracy": "maximize", "val_loss": "minimize"}


def studies_dir(home: Path) -> Path:
    return home / "studies"


def storage_path(home: Path, study: str) -> Path:
    return studies_dir(home) / f"{study}.db"


def storage_url(path: Path) -> str:
    """The SQLAlchemy URL of a study file, as Optuna and optuna-dashboard take it."""
    return f"sqlite:///{path.resolve()}"


def check_study_name(name: str) -> str:
    """Study names become file and run-folder names: letters, digits, '-', '_' and '.'."""
    if not name or name.startswith(".") or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UsageError(f"study name {name!r} is not allowed", hint="use letters, digits, '-', '_' and '.'")
    return name


def default_study_name(dataset: str) -> str:
    """``<dataset>-search``, the study of ``distml tune`` without ``--study``; a UsageError if that is no study name."""
    name = f"{dataset}-search"
    try:
        return check_study_name(name)
    except UsageError as exc:
        raise UsageError(
            f"the default study name {name!r} (from the dataset's name) is not allowed: {exc.hint}",
            hint="pass --study NAME",
        ) from None


def lock_study(home: Path, study: str) -> FileLock:
    """Lock study ``study`` for this process, held for the tuner's life (the kernel drops it if the tuner dies).

    Raises UsageError naming the process that tunes it.
    """
    from distml.train.runlock import LockHeld, lock_exclusive

    folder = studies_dir(home)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkspaceError(f"cannot create the study lock in {folder}: {exc.strerror}") from None
    try:
        return lock_exclusive(folder / f"{study}.lock", str(os.getpid()))
    except LockHeld as held:
        who = f"process {held.holder}" if held.holder.isdigit() else "another process"
        raise UsageError(
            f"study {study} is being tuned by another distml tune ({who})",
            hint="wait for it to finish or stop it, or use another --study",
        ) from None


def leftovers(home: Path, study: str) -> list[Path]:
    """What a study leaves beside its storage: its trials' run folders, ``<S>.mlflow.json`` and ``<S>-report/``."""
    from distml.search.trials import trial_runs

    studies = studies_dir(home)
    others = [studies / f"{study}.mlflow.json", studies / f"{study}-report"]
    return trial_runs(home, study) + [p for p in others if p.exists()]


def refuse_leftovers(home: Path, study: str) -> None:
    """A new study must not run in an earlier study's trial folders (it would resume them, or fail in them)."""
    found = leftovers(home, study)
    if not found:
        return
    runs = [p for p in found if p.parent.name == "runs"]
    named = [str(p.relative_to(home)) for p in found if p not in runs]
    if runs:
        more = f" (and {len(runs) - 1} more trial run(s))" if len(runs) > 1 else ""
        named.insert(0, f"{runs[0].relative_to(home)}{more}")
    raise UsageError(
        f"study {study} is new (no {storage_path(home, study).name}), but an earlier study {study} left "
        f"{', '.join(named)} in {home}",
        hint=f"distml tune --study {study} --restart deletes them and starts it anew",
    )


def start_over(home: Path, study: str, log: Callable[[str], None]) -> None:
    """Delete study ``study``: its storage and :func:`leftovers`, under its lock (refused while a tuner runs it)."""
    lock = lock_study(home, check_study_name(study))
    try:
        storage = storage_path(home, study)
        gone = [storage] if storage.exists() else []
        gone += leftovers(home, study)
        if not gone:
            return
        for path in gone:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        log(f"starting study {study} over: deleted {_names(gone)}")
    finally:
        lock.release()


def _names(paths: list[Path]) -> str:
    """``S.db, S.mlflow.json and 2 trial run(s)``: the files by name, the trial run folders as a count."""
    names = [p.name for p in paths if p.parent.name != "runs"]
    runs = len(paths) - len(names)
    if runs:
        names.append(f"{runs} trial run(s)")
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def make_sampler(search: SearchConfig, trial_number: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler of ``--sampler`` for trial ``trial_number``, seeded by ``--seed`` and ``trial_number``.

    A sampler per trial, seeded by its number: trial N's params depend on the seed and the trials before it
    only, so an interrupted and resumed study samples what an uninterrupted one would. The grid sampler is the
    exception: it shuffles the grid once by its seed and gives trial N the N-th point, so its seed stays fixed.
    """
    import optuna

    seed = search.seed if search.sampler == "grid" else trial_seed(search.seed, trial_number)
    if search.sampler == "grid":

        class Grid(optuna.samplers.GridSampler):
            def after_trial(self, *args: object, **kwargs: object) -> None:
                # Optuna's calls study.stop() once the grid is done, which only works inside study.optimize();
                # the tuner never asks for more trials than the grid has.
                pass

        return Grid(grid(search.space), seed=seed)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def trial_seed(seed: int, trial_number: int) -> int:
    """Trial ``trial_number``'s sampler seed: NumPy's SeedSequence of the pair, so that no two pairs share one.

    (``seed + number`` would give seed s's trial n the draws of seed s+1's trial n-1.)
    """
    import numpy as np

    return int(np.random.SeedSequence([seed % 2**64, trial_number]).generate_state(1)[0])


def make_pruner(search: SearchConfig, max_epochs: int) -> optuna.pruners.BasePruner:
    """The pruner of ``--pruner``; its unit is the epoch, and no trial is judged before its first one."""
    import optuna

    if search.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, max_epochs))
    if search.pruner == "median":
        # Optuna's default waits for 5 finished trials; small studies would then prune nothing.
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def open_study(
    path: Path,
    name: str,
    search: SearchConfig,
    document: dict[str, object],
    sha: str,
    dataset_digest: str,
    max_epochs: int,
) -> optuna.Study:
    """Create the study, or load it and refuse it when it was made for another space or dataset."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the tuner prints its own progress
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(storage_url(path))
    direction = DIRECTIONS[search.metric]
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction=direction,
        sampler=make_sampler(search),
        pruner=make_pruner(search, max_epochs),
        load_if_exists=True,
    )
    attrs = study.user_attrs
    if not attrs:
        study.set_user_attr("space_sha256", sha)
        study.set_user_attr("space", document)
        study.set_user_attr("metric", search.metric)
        study.set_user_attr("direction", direction)
        study.set_user_attr("dataset_digest", dataset_digest)
        return study
    if attrs.get("space_sha256") != sha:
        old = attrs.get("space")
        changed = differences(old, document) if isinstance(old, dict) else []
        what = f" (differs in {', '.join(changed)})" if changed else ""
        raise ConfigError(
            f"study {name} in {path} was made for another search space or [train] settings{what}",
            hint=_start_over_hint(name, path),
        )
    if attrs.get("dataset_digest") != dataset_digest:
        raise ConfigError(
            f"study {name} was made on dataset {str(attrs.get('dataset_digest'))[:12]}, this one is "
            f"{dataset_digest[:12]} (the dataset changed since)",
            hint=_start_over_hint(name, path),
        )
    return study


def _start_over_hint(name: str, path: Path) -> str:
    return f"use --study NEW for a new study, or distml tune --study {name} --restart to start it over (deletes {path})"
