"""Hot swap: a real ``distml serve models:/NAME@champion`` on 127.0.0.1 follows the alias in a real MLflow registry
(its own SQLite store) while client threads keep it busy.

Promote, then roll back: every request is answered 200, each client sees version 1, then 2, then 1 again, and the
swaps show in ``/metrics``; a version whose stored files were changed after registration is refused (a log line,
a metric) and the current champion keeps serving.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from distml.registry import Registry

from rollout_support import metric, registry_home, steady_load, stored_folder, variant_folder, wait_for
from serve_support import MODEL, ServerProcess, post_json, request, sample_images

FOLLOW_S = 0.2


@pytest.fixture(scope="module")
def home(champion: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("swap")
    v1 = variant_folder(champion[1], root / "v1")
    v2 = variant_folder(champion[1], root / "v2", perturb=1)
    v3 = variant_folder(champion[1], root / "v3", perturb=2)
    return registry_home(root, [v1, v2, v3])


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[ServerProcess]:
    ref = f"models:/{MODEL}@champion"
    proc = ServerProcess(["--home", str(home), "serve", ref, "--port", "0", "--follow-s", str(FOLLOW_S)])
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.output


def _registry(home: Path) -> Registry:
    from distml.registry import Registry
    from distml.workspace import Workspace

    return Registry(Workspace(home))


def _answered(load_seen: list[list[tuple[int, str]]]) -> int:
    return sum(len(thread) for thread in load_seen)


def test_promote_then_roll_back_under_load_swaps_with_no_failed_request(server: ServerProcess, home: Path) -> None:
    registry = _registry(home)
    assert "follows models:/" in server.output
    with steady_load(server.base, threads=3) as load:
        wait_for(lambda: _answered(load.seen) >= 60, 30, "the load to start")
        registry.promote(MODEL, "2")
        wait_for(lambda: load.latest() == {"2"}, 30, "every client to get version 2")
        mark = _answered(load.seen)
        wait_for(lambda: _answered(load.seen) >= mark + 60, 30, "requests on version 2")
        reply = post_json(server.base, f"/v2/models/{MODEL}/infer", _v2_doc())
        assert reply.status == 200 and reply.json()["model_version"] == "2" and reply.headers["x-model-version"] == "2"
        assert request(server.base, "GET", f"/v2/models/{MODEL}").json()["versions"] == ["2"]
        registry.rollback(MODEL)
        wait_for(lambda: load.latest() == {"1"}, 30, "every client to get version 1 again")
        mark = _answered(load.seen)
        wait_for(lambda: _answered(load.seen) >= mark + 60, 30, "requests on version 1")
    assert load.errors == [] and load.statuses == {200: _answered(load.seen)}, (load.errors, load.statuses)
    for thread in load.seen:  # one client's requests are sequential: its versions flip exactly at the swaps
        runs = [version for i, (_, version) in enumerate(thread) if i == 0 or thread[i - 1][1] != version]
        assert runs == ["1", "2", "1"], runs
    print(f"\nhot swap under load: {load.statuses} by version {load.versions()}")
    text = request(server.base, "GET", "/metrics").body.decode()
    assert metric(text, 'distml_swaps_total{outcome="swapped"}') == 2
    assert f'distml_model_info{{model="{MODEL}",platform="onnxruntime",version="1"}} 1.0' in text
    assert 'version="2"} 1.0' not in text  # the old series goes with the old champion
    assert metric(text, 'distml_variant_requests_total{status="200",variant="champion",version="2"}') >= 60
    assert "hot swap: fashion-mnist-classifier version 2 now serves (was version 1)" in server.output


def test_a_version_changed_after_registration_is_refused_and_the_champion_keeps_serving(
    server: ServerProcess, home: Path
) -> None:
    registry = _registry(home)
    stored, other = stored_folder(home, "3"), stored_folder(home, "2")
    shutil.copyfile(other / "model.onnx", stored / "model.onnx")  # a valid graph, only not the one registered
    card = json.loads((stored / "model.json").read_text())
    card["files"]["model.onnx"] = json.loads((other / "model.json").read_text())["files"]["model.onnx"]
    (stored / "model.json").write_text(json.dumps(card))  # the folder vouches for itself: only the registry knows
    try:
        with steady_load(server.base, threads=2) as load:
            wait_for(lambda: _answered(load.seen) >= 30, 30, "the load to start")
            registry.promote(MODEL, "3")
            wait_for(lambda: "version 3 refused" in server.output, 30, "the refusal")
            mark = _answered(load.seen)
            wait_for(lambda: _answered(load.seen) >= mark + 30, 30, "requests after the refusal")
        assert load.errors == [] and set(load.statuses) == {200} and load.versions().keys() == {"1"}
        text = request(server.base, "GET", "/metrics").body.decode()
        assert metric(text, 'distml_swaps_total{outcome="refused"}') == 1
        line = next(x for x in server.lines if "version 3 refused" in x)
        assert "version 1 keeps serving" in line and "the registry recorded" in line, line
        assert post_json(server.base, f"/v1/models/{MODEL}:predict", _v1_doc()).headers["x-model-version"] == "1"
    finally:
        registry.rollback(MODEL)  # back to version 1 for whatever runs next on this registry


def _v1_doc() -> dict[str, object]:
    return {"instances": [sample_images(1)[0, ..., 0].tolist()]}


def _v2_doc() -> dict[str, object]:
    images = sample_images(1)
    tensor = {"name": "images", "datatype": "UINT8", "shape": list(images.shape), "data": images.ravel().tolist()}
    return {"inputs": [tensor]}
