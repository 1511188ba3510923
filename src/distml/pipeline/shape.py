"""The pipeline's shape: which steps there are and what each needs, for a config, without running anything.

::

    ingest -> train[LABEL] x N (one per candidate) -> select -> register
    ingest -> search -> select [-> refit] -> register             (distml run --search [--refit])

Both executors read it: the local runner (:mod:`distml.pipeline.dag` gives each node its work) and ``distml k8s
render`` (:mod:`distml.k8s.workflow` turns each node into Argo tasks). A new step is added here, once, and both
must then say how to run it. This module is a leaf: it imports the config and the model names only (no torch,
no data sources, no ``distml.train``), so a render never loads the training code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from distml.config import DistmlConfig, TrainConfig
from distml.errors import UsageError
from distml.model_names import check_model_name

StepKind = Literal["ingest", "train", "search", "select", "refit", "register"]


@dataclass(frozen=True)
class Node:
    """One step of the pipeline: its name (``train[cnn]`` for a candidate), kind and the steps it needs."""

    name: str
    kind: StepKind
    needs: tuple[str, ...]
    label: str = ""  # a training step's candidate label ("" for the other kinds)


@dataclass(frozen=True)
class Shape:
    """The pipeline's DAG: its nodes in the order they are listed (every node after the nodes it needs)."""

    nodes: tuple[Node, ...]
    candidates: dict[str, TrainConfig]  # label -> config of each training node's candidate, in the nodes' order

    def of(self, kind: StepKind) -> list[Node]:
        """The nodes of one kind, in order (the training steps: one per candidate)."""
        return [n for n in self.nodes if n.kind == kind]

    def needs(self) -> dict[str, list[str]]:
        """Step name -> the names of the steps it needs (what the run record keeps as its ``dag``)."""
        return {n.name: list(n.needs) for n in self.nodes}


def train_name(label: str) -> str:
    """A candidate's training step name: ``train[cnn]``."""
    return f"train[{label}]"


def candidate_labels(configs: Sequence[TrainConfig]) -> list[str]:
    """A unique label per candidate: its model name, with -2, -3... for repeats (``cnn``, ``cnn-2``)."""
    if not configs:
        raise UsageError("no candidates given", hint="--candidates cnn,cnn-dropout or [[candidates]] in the config")
    labels: list[str] = []
    for cfg in configs:
        check_model_name(cfg.model)
        label = cfg.model
        n = 2
        while label in labels:
            label, n = f"{cfg.model}-{n}", n + 1
        labels.append(label)
    return labels


def candidate_configs(
    config: DistmlConfig, models: Sequence[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> list[TrainConfig]:
    """``[[candidates]]`` tables when the config has them (else one per model name), each over ``[train]``."""
    if models is None and config.candidates:
        tables: list[dict[str, Any]] = [dict(t) for t in config.candidates]
    else:
        tables = [{"model": m} for m in (models or config.pipeline.candidates)]
    return config.candidate_configs(tables, overrides)


def pipeline_shape(configs: Sequence[TrainConfig]) -> Shape:
    """The DAG over these candidates: ingest, then one training step each, then select and register."""
    labels = candidate_labels(configs)
    trains = [Node(train_name(label), "train", ("ingest",), label=label) for label in labels]
    nodes = (
        Node("ingest", "ingest", ()),
        *trains,
        Node("select", "select", tuple(t.name for t in trains)),
        Node("register", "register", ("select",)),
    )
    return Shape(nodes, dict(zip(labels, configs, strict=True)))


def search_shape(*, refit: bool = False) -> Shape:
    """The DAG of a search (``distml run --search``): one ``search`` step in place of the candidates' steps.

    ``select`` then chooses among the search's finished trials; with ``refit``, a ``refit`` step retrains the
    chosen trial's settings on all of train and ``register`` takes that model instead.
    """
    final = Node("refit", "refit", ("ingest", "select")) if refit else None
    nodes = (
        Node("ingest", "ingest", ()),
        Node("search", "search", ("ingest",)),
        Node("select", "select", ("search",)),
        *((final,) if final else ()),
        Node("register", "register", (final.name if final else "select",)),
    )
    return Shape(nodes, {})
