"""A smoke test of a server that just started: one real KServe V2 request, retried until the server answers.

``distml run --serve`` sends it once the server listens, with the first test image of the model's dataset, and
prints the answer: proof that the champion serves, not only that the port is open.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable

import numpy as np

from distml.card import INPUT_NAME, PROBABILITIES
from distml.registry.artifact import ModelArtifact
from distml.workspace import Workspace


def sample_image(workspace: Workspace, artifact: ModelArtifact) -> tuple[np.ndarray, int]:
    """The first test image of the dataset the model was trained on, and its label.

    A blank image (label -1) when that dataset is not in ``workspace``: it still proves the server answers.
    """
    # Here, not at the top: the serve package stays free of the data stage (and its sources) when imported.
    from distml.data.reader import open_path
    from distml.data.store import DatasetStore
    from distml.errors import DistmlError

    try:
        ds = open_path(DatasetStore(workspace).resolve(artifact.card.lineage.dataset_digest[:16]))
        arrays = (ds.splits.get("test") or ds.splits["train"]).arrays()
        return np.asarray(arrays.images[0]), int(arrays.labels[0])
    except (DistmlError, OSError, KeyError, IndexError):
        return np.zeros(artifact.image_shape, dtype=np.uint8), -1


def smoke_request(
    base_url: str, artifact: ModelArtifact, image: np.ndarray, label: int = -1, *, tries: int = 50, wait_s: float = 0.2
) -> str | None:
    """Send ``image`` to ``{base_url}/v2/models/NAME/infer``; the line to print, or None if no answer came.

    Connection errors are retried ``tries`` times ``wait_s`` apart: the server may still be starting.
    """
    tensor = {"name": INPUT_NAME, "shape": [1, *image.shape], "datatype": "UINT8", "data": image.reshape(-1).tolist()}
    request = urllib.request.Request(
        f"{base_url}/v2/models/{artifact.name}/infer",
        data=json.dumps({"id": "smoke-1", "inputs": [tensor]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    for _ in range(tries):
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                doc = json.loads(response.read())
            break
        except OSError:
            time.sleep(wait_s)
    else:
        return None
    probs = next((o["data"] for o in doc["outputs"] if o["name"] == PROBABILITIES), None) or []
    top = int(np.argmax(probs)) if probs else -1
    names = artifact.class_names
    truth = f" (label: {names[label]})" if 0 <= label < len(names) else ""
    predicted = names[top] if 0 <= top < len(names) else top
    return f"smoke prediction: test image 0 -> {predicted} p={max(probs) if probs else 0:.3f}{truth}"


def announce_and_smoke(
    workspace: Workspace, artifact: ModelArtifact, echo: Callable[[str], None], warn: Callable[[str], None]
) -> Callable[[str], None]:
    """An ``announce`` for :func:`distml.serve.server.serve`: ``echo`` each line, and once the server listens,
    smoke-test it from a background thread (the server must keep serving meanwhile) and ``echo`` the answer.
    """

    def smoke(base_url: str) -> None:
        line = smoke_request(base_url, artifact, *sample_image(workspace, artifact))
        if line is None:
            warn("smoke prediction: no answer from the server")
        else:
            echo(f"{line}; Ctrl-C stops the server")

    def announce(line: str) -> None:
        echo(line)
        if line.startswith("listening on "):
            threading.Thread(target=smoke, args=(line.split()[-1],), daemon=True).start()

    return announce
