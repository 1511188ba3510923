"""The search space: which ``[train]`` settings a study may vary, their checks, sampling, and fingerprint.

``[search] space`` maps a ``[train]`` field to a list of choices or a :class:`~distml.search.config.Range`. The
checks here run when the config is validated (so a typo fails before anything starts) and raise one-line
:class:`~distml.errors.ConfigError`\\ s that name the nearest valid name. Optuna is not imported here: the
caller of :func:`sample` hands in the trial.

This module imports :class:`~distml.config.TrainConfig` inside its functions: :mod:`distml.config` builds a
:class:`~distml.search.config.SearchConfig` (and so runs these checks) while it is still being imported.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING

from distml.errors import ConfigError
from distml.model_names import MODEL_NAMES
from distml.search.config import Choice, Range

if TYPE_CHECKING:
    import optuna

    from distml.config import DistmlConfig, TrainConfig

Space = Mapping[str, list[Choice] | Range]
Params = dict[str, Choice]

# [train] fields that say how or where a job runs, not what it learns: searching them makes no sense (workers,
# threads), or would compare trials on different validation images (val_fraction, val_seed), or is the data.
NOT_SEARCHABLE = frozenset(
    {
        "dataset",
        "workers",
        "seed",
        "val_fraction",
        "val_seed",
        "checkpoint_every_steps",
        "threads_per_worker",
        "eval_test",
        "allow_oversubscribe",
        "compile",
        "max_restarts",
        "bucket_cap_mb",
        "cpu_allreduce",
        "log_every_steps",
    }
)


def searchable_fields() -> list[str]:
    """The ``[train]`` fields a space may name, in the config's order."""
    from distml.config import TrainConfig

    return [name for name in TrainConfig.model_fields if name not in NOT_SEARCHABLE]


def check_space(space: Space) -> None:
    """Raise a ConfigError for the first problem of ``space``: unknown key or model, empty, inverted, wrong type."""
    from distml.config import TrainConfig

    if not space:
        raise ConfigError("[search] space is empty", hint="name at least one [train] setting, e.g. lr = [1e-3, 3e-3]")
    valid = searchable_fields()
    for key, entry in space.items():
        where = f"[search.space] {key}"
        if key not in valid:
            raise ConfigError(f"{where}: not a searchable [train] setting{_nearest(key, valid)}")
        kind = _field_kind(key)
        if isinstance(entry, Range):
            _check_range(where, key, entry, kind)
            for bound in (entry.low, entry.high):
                _check_value(TrainConfig, where, key, kind(bound) if kind is int else bound)
            continue
        if not entry:
            raise ConfigError(f"{where}: the list of choices is empty", hint="give at least one value")
        if len(set(map(_canonical_choice, entry))) != len(entry):
            raise ConfigError(f"{where}: a choice is listed twice in {entry!r}")
        for choice in entry:
            if key == "model" and choice not in MODEL_NAMES:
                raise ConfigError(f"{where}: unknown model {choice!r}{_nearest(str(choice), list(MODEL_NAMES))}")
            _check_value(TrainConfig, where, key, choice)


def check_enqueued(space: Space, enqueue: list[dict[str, Choice]]) -> None:
    """Raise a ConfigError for the first ``[[search.enqueue]]`` value that the space could not have sampled.

    Each entry names some of the space's keys; a value must be one of the listed choices, or inside the range
    (on its step, a whole number for a whole-number setting). Optuna would only warn and run it anyway.
    """
    for i, params in enumerate(enqueue):
        for key, value in params.items():
            where = f"[[search.enqueue]] {i + 1}: {key}"
            if key not in space:
                raise ConfigError(f"{where}: not a key of [search.space]{_nearest(key, list(space))}")
            entry = space[key]
            if isinstance(entry, Range):
                _check_in_range(where, key, value, entry)
            elif not any(_same_choice(value, c) for c in entry):
                raise ConfigError(f"{where}: {value!r} is not one of its choices {entry!r}")


def enqueued_params(space: Space, params: Mapping[str, Choice]) -> dict[str, Choice]:
    """An enqueued set as Optuna's distributions take it: a whole-number setting's value as an int."""
    return {k: int(v) if isinstance(space.get(k), Range) and _field_kind(k) is int else v for k, v in params.items()}


def _same_choice(a: Choice, b: Choice) -> bool:
    """Equal as the space means it: 1 and 1.0 are one number, True is not 1."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _check_in_range(where: str, key: str, value: Choice, entry: Range) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: {value!r} is not a number in its range")
    if not entry.low <= value <= entry.high:
        raise ConfigError(f"{where}: {value:g} is outside its range {entry.low:g} to {entry.high:g}")
    if _field_kind(key) is int and not float(value).is_integer():
        raise ConfigError(f"{where}: {key} is a whole number, not {value:g}")
    if entry.step is not None:
        steps = (value - entry.low) / entry.step
        if abs(steps - round(steps)) > 1e-9:
            raise ConfigError(f"{where}: {value:g} is not on the range's steps of {entry.step:g} from {entry.low:g}")


def _check_range(where: str, key: str, entry: Range, kind: type) -> None:
    if kind not in (int, float):
        raise ConfigError(f"{where}: a range needs a numeric setting; give a list of choices for {key}")
    if entry.low > entry.high:
        raise ConfigError(f"{where}: the range is inverted (low {entry.low:g} > high {entry.high:g})")
    if entry.log and entry.low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, not {entry.low:g}")
    if entry.log and entry.step is not None:
        raise ConfigError(f"{where}: a range is either log or stepped, not both")
    if kind is int and not all(float(v).is_integer() for v in (entry.low, entry.high, entry.step or 1)):
        raise ConfigError(f"{where}: {key} is a whole number, so low, high and step must be too")


def _check_value(model: type[TrainConfig], where: str, key: str, value: object) -> None:
    """Build a TrainConfig with ``key=value``: the field's own rules (type, bounds, choices) judge the value."""
    from pydantic import ValidationError

    if isinstance(value, bool) and _field_kind(key) is not bool:
        raise ConfigError(f"{where}: {value!r} is not a valid {key}")
    try:
        model.model_validate({key: value})
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"]
        raise ConfigError(f"{where}: {value!r} is not a valid {key}: {reason}") from None


def _field_kind(key: str) -> type:
    """The Python type of a [train] field (``float | None`` is float, a ``Literal`` of strings is str)."""
    from distml.config import TrainConfig

    annotation: object = TrainConfig.model_fields[key].annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return type(args[0])
    if args:  # X | None
        annotation = args[0]
    return annotation if isinstance(annotation, type) else str


def _nearest(name: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean {near[0]!r}?)" if near else f" (valid: {', '.join(valid)})"


def _canonical_choice(value: Choice) -> str:
    return json.dumps(value)


def sample(trial: optuna.Trial, space: Space) -> Params:
    """The trial's values for every key of ``space``: a categorical for choices, a float or int for a range."""
    params: Params = {}
    for key, entry in space.items():
        if isinstance(entry, Range):
            if _field_kind(key) is int:
                step = int(entry.step or 1)
                params[key] = trial.suggest_int(key, int(entry.low), int(entry.high), step=step, log=entry.log)
            else:
                params[key] = trial.suggest_float(key, entry.low, entry.high, step=entry.step, log=entry.log)
        else:
            choice = trial.suggest_categorical(key, list(entry))
            assert choice is not None  # the space's checks allow no None choice
            params[key] = choice
    return params


def grid(space: Space) -> dict[str, list[Choice]]:
    """The grid sampler's search space: every key must be a list of choices."""
    ranges = [key for key, entry in space.items() if isinstance(entry, Range)]
    if ranges:
        raise ConfigError(
            f"the grid sampler needs a list of choices for every setting; {', '.join(ranges)} is a range",
            hint="give choices (e.g. lr = [1e-3, 3e-3]) or use --sampler tpe or random",
        )
    return {key: list(entry) for key, entry in space.items() if not isinstance(entry, Range)}


def grid_size(space: Space) -> int:
    size = 1
    for choices in grid(space).values():
        size *= len(choices)
    return size


def space_document(space: Space, metric: str, sampler: str, base: TrainConfig) -> dict[str, object]:
    """What a study's trials depend on, besides the seed: the space, the metric, grid or not, and fixed [train].

    Two commands with the same document may continue one study; a different one is another study. The fixed
    ``[train]`` settings are those a trial would learn differently with (the searchable ones, and the data and
    its validation split), not how many workers or threads run it.
    """
    fixed = base.model_dump(mode="json")
    learned = {k: v for k, v in fixed.items() if k not in NOT_SEARCHABLE and k not in space}
    learned.update({k: fixed[k] for k in ("dataset", "seed", "val_fraction", "val_seed")})
    entries = {k: v.model_dump(mode="json") if isinstance(v, Range) else list(v) for k, v in sorted(space.items())}
    return {"space": entries, "metric": metric, "grid": sampler == "grid", "train": learned}


def space_sha256(document: Mapping[str, object]) -> str:
    """The canonical fingerprint of :func:`space_document` (sorted keys, no whitespace)."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def differences(old: Mapping[str, object], new: Mapping[str, object]) -> list[str]:
    """The dotted keys where two space documents differ (``space.lr``, ``train.epochs``), for the refusal."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += [f"{key}.{sub}" for sub in differences(a, b)]
        elif a != b:
            out.append(key)
    return out


def check_batches(config: DistmlConfig) -> None:
    """Every batch size choice must split over the workers (a range is checked per trial, as a failed trial)."""
    workers = config.train.workers
    choices = config.search.space.get("batch_size", [config.train.batch_size])
    for batch in choices if isinstance(choices, list) else []:
        if isinstance(batch, int) and batch % workers:
            raise ConfigError(
                f"[search.space] batch_size: {batch} does not divide by [train] workers {workers}",
                hint=f"the batch is global: use multiples of {workers}",
            )


def max_epochs(config: DistmlConfig) -> int:
    """The most epochs a trial may train (the pruners' largest resource)."""
    entry = config.search.space.get("epochs")
    if entry is None:
        return config.train.epochs
    if isinstance(entry, list):
        return max(int(e) for e in entry)
    return int(entry.high)
