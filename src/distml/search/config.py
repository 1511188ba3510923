"""``[search]`` in distml.toml: the space of training settings ``distml tune`` searches, and how it searches.

A leaf module (pydantic only): :mod:`distml.config` holds a :class:`SearchConfig` as its ``search`` section.
Each entry of ``space`` is a ``[train]`` setting and either a list of choices or a range::

    [search]
    trials = 16
    [search.space]
    model = ["resnet-small", "cnn-batchnorm"]
    lr = { low = 1e-3, high = 1e-2, log = true }
    batch_size = [64, 128]
    [[search.enqueue]]               # run first: a known good recipe (a partial set samples the rest)
    model = "resnet-small"
    lr = 3e-3
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from distml.errors import ConfigError

Choice = str | int | float | bool


class Range(BaseModel):
    """A numeric range: ``low`` to ``high`` (both included), on a log scale if ``log``, in steps of ``step``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float
    high: float
    log: bool = False
    step: float | None = Field(default=None, gt=0)


def _default_space() -> dict[str, list[Choice] | Range]:
    # Around the measured resnet-fast recipe (bench/recipe.py: AdamW lr 0.004, weight decay 0.05, batch 256, label
    # smoothing 0.1, crop+flip, width 1, flip test-time augmentation), which it contains; cnn-batchnorm is the
    # cheap alternative. AdamW's decay is multiplied by the lr, so useful values are ~0.01-0.1 (1e-5-1e-3 would do
    # nothing).
    return {
        "model": ["resnet-fast", "cnn-batchnorm"],
        "lr": Range(low=2e-3, high=8e-3, log=True),
        "weight_decay": Range(low=0.01, high=0.1, log=True),
        "batch_size": [128, 256],
        "label_smoothing": [0.0, 0.1],
        "augment": ["crop", "crop+flip"],
        "width": [0.75, 1.0, 1.5],
        "tta": ["flip", "none"],
    }


# The default search (no [search.space] given) is a preset sized for 2 CPU cores and half an hour: the recipe
# above runs first, for 14 epochs (94.5% test on Fashion-MNIST, ~19 min on 2 cores), and the rest of a 25-minute
# budget tries other settings, ASHA stopping the worse ones after an epoch. With a space of your own, none of this
# applies: trials run [train] epochs, nothing is enqueued and there is no budget unless you set them.
RECIPE: dict[str, Choice] = {
    "model": "resnet-fast",
    "lr": 0.004,
    "weight_decay": 0.05,
    "batch_size": 256,
    "label_smoothing": 0.1,
    "augment": "crop+flip",
    "width": 1.0,
    "tta": "flip",
}
PRESET: dict[str, object] = {"epochs": 14, "enqueue": [RECIPE], "budget_minutes": 25.0}


class SearchConfig(BaseModel):
    """How ``distml tune`` searches: the space, the trial count, concurrency, budget, sampler and pruner."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    space: dict[str, list[Choice] | Range] = Field(
        default_factory=_default_space, description="[train] settings to search: a list of choices or a range each"
    )
    trials: int = Field(default=16, ge=1, description="Trials in the study (more continues an existing study)")
    max_concurrent: int = Field(default=1, ge=1, description="Trials at once, within the cores")
    budget_minutes: float | None = Field(
        default=None, gt=0, description="No trial starts after this many minutes; trials still running then stop"
    )
    sampler: Literal["tpe", "random", "grid"] = Field(default="tpe", description="How the next trial is chosen")
    pruner: Literal["asha", "hyperband", "median", "none"] = Field(
        default="asha", description="Which trials stop early, judged on the validation metric each epoch"
    )
    seed: int = Field(default=0, description="Seeds the sampler (same seed, sequential trials: same study)")
    metric: Literal["val_accuracy", "val_loss"] = Field(default="val_accuracy", description="What the search optimises")
    epochs: int | None = Field(
        default=None,
        ge=1,
        description="Epochs of a trial that is not stopped early, the pruner's last rung; None: [train] epochs",
    )
    enqueue: list[dict[str, Choice]] = Field(
        default_factory=list,
        description="Trials to run first, e.g. a known good recipe: each a full or partial set of the space's "
        "parameters",
    )

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: object) -> object:
        """Without a space of its own, the default search's epochs, first trial and budget (see PRESET)."""
        if isinstance(data, dict) and "space" not in data:
            return {**PRESET, **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        # distml.search.space holds the checks (they build TrainConfigs); imported here, when a config is
        # validated, because distml.config imports this module before it defines TrainConfig.
        from distml.search.space import check_enqueued, check_space

        check_space(self.space)
        if self.epochs is not None and "epochs" in self.space:
            raise ConfigError(
                f"[search] epochs {self.epochs} (tune --epochs) is set, but epochs is also in [search.space]: "
                "each trial's epochs are sampled from the space",
                hint="drop one of them",
            )
        check_enqueued(self.space, self.enqueue)
        return self


def params_text(params: Mapping[str, Choice], sep: str = " ") -> str:
    """A trial's params as ``batch_size=64 lr=0.004 model=cnn`` (sorted, floats to 3 figures), for one line."""
    return sep.join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))
