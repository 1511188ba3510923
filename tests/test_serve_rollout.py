"""Canary, shadow and automatic rollback.

In-process (the real app and ONNX models, called without a socket, where an HTTP round trip is not what is under
test): the canary's share of distinct keys is inside the 99% binomial interval of P, one route key stays on one
variant, the shadow's answers never reach a client and a shadow that falls behind is dropped, and a canary that
fails or is slow is rolled back within the window. Live: a real ``distml serve`` whose canary (a registry version
whose graph raises on every real image) is rolled back, the registry alias moved back and the rollback logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import run_cli
from rollout_support import metric, registry_home, steady_load, variant_folder, wait_for
from serve_support import MODEL, ServerProcess, asgi_post, reference_probabilities, request, sample_images

V1 = f"/v1/models/{MODEL}:predict"
Z99 = 2.5758  # the normal quantile of a two-sided 99% interval


# -- in-process helpers ------------------------------------------------------------------------------------------
class _Failing:
    """An ONNX Runtime session stand-in whose every run raises."""

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise RuntimeError("the canary's graph failed")


class _Slow:
    """A real session that takes ``delay_s`` longer per run."""

    def __init__(self, session: Any, delay_s: float) -> None:
        self.session, self.delay_s = session, delay_s

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        time.sleep(self.delay_s)
        return list(self.session.run(names, feeds))


def _real(model_dir: Path) -> Any:
    from distml.config import ServeConfig
    from distml.serve.model import load_configured

    return load_configured(model_dir, ServeConfig())


def _app(model_dir: Path, monkeypatch: pytest.MonkeyPatch, fakes: dict[str, Any] | None = None, **settings: Any) -> Any:
    """The real app on ``model_dir``; a canary or shadow named in ``fakes`` is that model instead of a loaded one."""
    from distml.config import ServeConfig
    from distml.serve import build_app
    from distml.serve.source import ModelSource

    if fakes:
        monkeypatch.setattr("distml.serve.follow.load_ref", lambda ref, config, workspace: fakes[ref])
    return build_app(ServeConfig(**settings), ModelSource(model_dir))


async def _call(
    app: Any, body: bytes, headers: dict[str, str] | None = None, path: str = V1
) -> tuple[int, dict[str, str], Any]:
    return await asgi_post(app, path, body, headers)


def _run(app: Any, work: Any) -> Any:
    async def main() -> Any:
        await app.startup()
        try:
            return await work()
        finally:
            await app.shutdown()

    return asyncio.run(main())


def _body(image: np.ndarray) -> bytes:
    return json.dumps({"instances": [image[..., 0].tolist()]}).encode()


def _inside_99(hits: int, n: int, percent: float) -> bool:
    p = percent / 100
    return abs(hits / n - p) <= Z99 * math.sqrt(p * (1 - p) / n)


# -- the split and stickiness -------------------------------------------------------------------------------------
@pytest.mark.parametrize("percent", [5.0, 10.0, 50.0])
def test_the_routers_canary_share_of_distinct_keys_is_inside_the_99_percent_binomial_interval(percent: float) -> None:
    from distml.serve.variants import Router, Variant

    stand_in = types.SimpleNamespace(version="1")  # the router reads nothing of the model but its version
    champion, canary = Variant("champion", stand_in, None), Variant("canary", stand_in, None)  # type: ignore[arg-type]
    router = Router(champion, canary, percent)
    rng = np.random.default_rng(0)
    keys = [rng.bytes(16).hex() for _ in range(5000)]  # distinct keys, as request ids or client ids are
    n = len(keys)
    hits = sum(router.pick(key) is canary for key in keys)
    assert _inside_99(hits, n, percent), (hits, n, percent)
    assert all(router.pick(key) is router.pick(key) for key in keys[:100])
    router.set_canary_percent(0)
    assert all(router.pick(key) is champion for key in keys)


def test_the_apps_split_by_request_id_is_inside_the_99_percent_binomial_interval(
    champion: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = dataclasses.replace(_real(champion[1]), version="2")
    app = _app(champion[1], monkeypatch, {"c": canary}, canary="c", canary_percent=20)
    body, n = _body(sample_images(1)[0]), 2000

    async def work() -> list[tuple[int, str]]:
        return [(s, h["x-model-version"]) for s, h, _ in [await _call(app, body) for _ in range(n)]]

    answers = _run(app, work)
    assert {status for status, _ in answers} == {200}
    hits = sum(version == "2" for _, version in answers)
    print(f"\ncanary 20%: {hits} of {n} requests ({hits / n:.1%})")
    assert _inside_99(hits, n, 20.0), hits
    text = app.metrics.render().decode()
    assert metric(text, 'distml_variant_requests_total{status="200",variant="canary",version="2"}') == hits
    assert metric(text, "distml_canary_percent") == 20.0


def test_one_route_key_stays_on_one_variant(champion: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    canary = dataclasses.replace(_real(champion[1]), version="2")
    app = _app(champion[1], monkeypatch, {"c": canary}, canary="c", canary_percent=50, route_header="X-User")
    body = _body(sample_images(1)[0])

    async def work() -> dict[str, set[str]]:
        seen: dict[str, set[str]] = {}
        for round_ in range(5):
            for client in range(40):
                _, headers, _ = await _call(
                    app, body, {"x-user": f"user-{client}", "x-request-id": f"{round_}-{client}"}
                )
                seen.setdefault(f"user-{client}", set()).add(headers["x-model-version"])
        return seen

    seen = _run(app, work)
    assert all(len(versions) == 1 for versions in seen.values()), seen
    assert {v for versions in seen.values() for v in versions} == {"1", "2"}  # both variants have clients


def test_a_version_retired_after_the_route_checked_it_is_a_404_not_a_500(
    champion: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hot swap can retire version 2 between REST's route check and admission: the client asked for a version
    # that is no longer served (404 naming what is), not a server fault.
    canary = dataclasses.replace(_real(champion[1]), version="2")
    app = _app(champion[1], monkeypatch, {"c": canary}, canary="c", canary_percent=50)
    image = sample_images(1)[0]
    doc = {
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, *image.shape], "data": image.ravel().tolist()}]
    }
    body, path = json.dumps(doc).encode(), f"/v2/models/{MODEL}/versions/2/infer"

    async def work() -> list[tuple[int, Any]]:
        status, headers, answer = await _call(app, body, path=path)
        assert (status, headers["x-model-version"]) == (200, "2"), answer
        served = app.router.champion  # the route's check still sees version 2 served; admission no longer does
        monkeypatch.setattr(app, "variant_for", lambda version: served)
        monkeypatch.setattr(app.fleet.router, "by_version", lambda version: None)
        status, _, answer = await _call(app, body, path=path)
        return [(status, answer)]

    [(status, answer)] = _run(app, work)
    assert status == 404, answer
    assert answer["error"] == f"model {MODEL!r} version '2' is not served here; this server serves {MODEL!r} " + (
        "version 1 and version 2"
    )


# -- shadow ---------------------------------------------------------------------------------------------------------
def test_shadow_answers_never_reach_the_client_and_its_agreement_is_recorded(
    champion: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shadow_dir = variant_folder(champion[1], tmp_path / "shadow", perturb=3)  # another model: answers differ
    app = _app(champion[1], monkeypatch, shadow=str(shadow_dir))
    images = sample_images(40, seed=11)

    async def work() -> list[Any]:
        answers = [await _call(app, _body(image)) for image in images]
        for _ in range(200):  # the shadow runs after the answers: wait for it, bounded
            if app.fleet.shadow.pending == 0 and app.fleet.shadow.agree + app.fleet.shadow.disagree == len(images):
                break
            await asyncio.sleep(0.01)
        return answers

    answers = _run(app, work)
    expected = reference_probabilities(champion[1], images)
    got = np.array([body["predictions"][0]["probabilities"] for _, _, body in answers])
    np.testing.assert_allclose(got, expected, atol=2e-6)  # the champion's answers, exactly
    assert {headers["x-model-version"] for _, headers, _ in answers} == {"1"}
    shadow = reference_probabilities(shadow_dir, images)
    disagree = int((shadow.argmax(1) != expected.argmax(1)).sum())
    assert disagree > 0  # the shadow is another model, so its answers reaching a client would have shown
    text = app.metrics.render().decode()
    assert metric(text, 'distml_shadow_requests_total{outcome="compared"}') == len(images)
    assert metric(text, 'distml_shadow_images_total{outcome="disagree"}') == disagree
    assert metric(text, 'distml_shadow_images_total{outcome="agree"}') == len(images) - disagree
    assert 'distml_variant_info{variant="shadow",version="1"} 1.0' in text


def test_a_shadow_that_falls_behind_is_dropped_and_never_delays_an_answer(
    champion: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _real(champion[1])
    slow = dataclasses.replace(real, session=_Slow(real.session, 1.0))
    app = _app(champion[1], monkeypatch, {"s": slow}, shadow="s", max_queue=2, max_queue_wait_ms=5000)
    body = _body(sample_images(1)[0])

    async def work() -> tuple[list[int], float]:
        started = time.perf_counter()
        answers = await asyncio.gather(*(_call(app, body) for _ in range(20)))
        return [status for status, _, _ in answers], time.perf_counter() - started

    statuses, elapsed = _run(app, work)
    assert statuses == [200] * 20
    assert elapsed < 0.8, elapsed  # one shadow run takes 1 s: no answer waited for one
    text = app.metrics.render().decode()
    assert metric(text, 'distml_shadow_requests_total{outcome="dropped"}') >= 18  # at most 2 waiting at once


# -- automatic rollback ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("champion_s", "canary_s", "floor_ms", "rolled_back"),
    [
        (0.0008, 0.0020, 10.0, False),  # 2.5x, but 1.2 ms: a scheduling hiccup, not a slower model
        (0.0008, 0.0020, 0.0, True),  # without the floor the same figures roll it back
        (0.0010, 0.0250, 10.0, True),  # 25x and 24 ms: slower
        (0.0300, 0.0450, 10.0, False),  # 15 ms slower but only 1.5x
    ],
)
def test_the_latency_rule_needs_both_the_ratio_and_the_floor(
    champion_s: float, canary_s: float, floor_ms: float, rolled_back: bool
) -> None:
    from distml.config import ServeConfig
    from distml.serve.rollout import Rollout
    from distml.serve.variants import Router

    champion, canary = types.SimpleNamespace(role="champion"), types.SimpleNamespace(role="canary")
    router = Router(champion, canary, 50)  # type: ignore[arg-type]
    verdicts: list[Any] = []
    config = ServeConfig(canary="c", rollback_min_requests=20, rollback_latency_floor_ms=floor_ms)
    rollout = Rollout(router, config, verdicts.append)
    for _ in range(40):
        rollout.record(champion, 200, champion_s)  # type: ignore[arg-type]
        rollout.record(canary, 200, canary_s)  # type: ignore[arg-type]
    assert (rollout.check() is not None) == rolled_back == bool(verdicts)
    assert router.canary_percent == (0 if rolled_back else 50)


def _until_rolled_back(app: Any, n: int) -> Any:
    body = _body(sample_images(1)[0])

    async def work() -> list[tuple[float, int, str]]:
        started, out = time.monotonic(), []
        for i in range(n):
            status, headers, _ = await _call(app, body, {"x-request-id": f"req-{i}"})
            out.append((time.monotonic() - started, status, headers["x-model-version"]))
        return out

    return _run(app, work)


@pytest.mark.parametrize("kind", ["failing", "slow"])
def test_a_failing_or_slow_canary_is_rolled_back_within_the_window(
    champion: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    real = _real(champion[1])
    session = _Failing() if kind == "failing" else _Slow(real.session, 0.02)
    canary = dataclasses.replace(real, version="2", session=session)
    window_s = 10.0
    settings = {"canary": "c", "canary_percent": 50, "rollback_window_s": window_s, "rollback_min_requests": 10}
    app = _app(champion[1], monkeypatch, {"c": canary}, **settings)
    answers = _until_rolled_back(app, 300)
    verdict = app.fleet.rollout.verdict
    assert verdict is not None, "no rollback"
    assert ("error rate 100.0%" if kind == "failing" else "p99 latency") in verdict.reason, verdict.reason
    on_canary = [(t, status) for t, status, version in answers if version == "2"]
    assert on_canary and on_canary[-1][0] - on_canary[0][0] < window_s  # judged within the window
    assert {status for _, status in on_canary} == ({500} if kind == "failing" else {200})
    last_canary = max(i for i, (_, _, version) in enumerate(answers) if version == "2")
    after = answers[last_canary + 1 :]
    assert len(after) >= 100 and {(status, version) for _, status, version in after} == {(200, "1")}
    text = app.metrics.render().decode()
    assert metric(text, "distml_rollbacks_total") == 1 and metric(text, "distml_canary_percent") == 0
    assert app.router.canary_percent == 0


# -- a live server -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rollout_home(champion: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with the champion (version 1) and a challenger (version 2, raises on every real image)."""
    root = tmp_path_factory.mktemp("rollout")
    versions = [variant_folder(champion[1], root / "v1"), variant_folder(champion[1], root / "v2", fail_on_ink=True)]
    home = registry_home(root, versions)
    from distml.registry import Registry
    from distml.workspace import Workspace

    Registry(Workspace(home)).client.set_registered_model_alias(MODEL, "challenger", "2")
    return home


@pytest.fixture
def canary_server(rollout_home: Path, tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    log_file = tmp_path / "requests.jsonl"
    rollout = [
        "--canary",
        f"models:/{MODEL}@challenger",
        "--canary-percent",
        "50",
        "--rollback-window-s",
        "20",
        "--rollback-min-requests",
        "10",
        "--rollback-alias",
        "challenger",
    ]
    proc = ServerProcess(
        [
            "--home",
            str(rollout_home),
            "serve",
            f"models:/{MODEL}@champion",
            "--port",
            "0",
            *rollout,
            "--log-file",
            str(log_file),
        ]
    )
    try:
        yield proc, log_file
    finally:
        assert proc.stop() == 0, proc.output


def test_a_live_canary_that_fails_is_rolled_back_and_its_alias_moved_back(
    canary_server: tuple[ServerProcess, Path], rollout_home: Path
) -> None:
    from distml.registry import Registry
    from distml.workspace import Workspace

    server, log_file = canary_server
    assert f"  canary: {MODEL} version 2 (models:/{MODEL}@challenger), 50% of requests" in server.output
    with steady_load(server.base, threads=2) as load:
        wait_for(lambda: "canary rollback:" in server.output, 30, "the rollback")
        mark = sum(len(t) for t in load.seen)
        wait_for(lambda: sum(len(t) for t in load.seen) >= mark + 40, 30, "requests after the rollback")
    assert load.errors == []
    for thread in load.seen:  # canary requests failed (500) until the rollback; from then on version 1 answers
        tail = thread[-10:]
        assert tail and set(tail) == {(200, "1")}, tail
    assert {status for t in load.seen for status, version in t if version == "2"} == {500}
    print(f"\ncanary rollback under load: {load.statuses} by version {load.versions()}")
    text = request(server.base, "GET", "/metrics").body.decode()
    assert metric(text, "distml_rollbacks_total") == 1 and metric(text, "distml_canary_percent") == 0
    registry = Registry(Workspace(rollout_home))
    wait_for(lambda: registry.lookup(f"models:/{MODEL}@challenger").version == "1", 30, "the alias to move back")
    line = next(x for x in server.lines if "canary rollback:" in x and "no longer answers" in x)
    assert "version 2" in line and "error rate" in line, line
    server.stop()
    events = [json.loads(line) for line in log_file.read_text().splitlines()]
    rollback = [e for e in events if e["type"] == "io.distml.serve.rollback"]
    assert len(rollback) == 1 and rollback[0]["data"]["canary_requests"] >= 10
    assert rollback[0]["data"]["version"] == "2" and rollback[0]["data"]["champion"] == "1"
    variants = {(e.get("variant"), e.get("modelversion")) for e in events if e["type"].endswith("response")}
    assert variants == {("canary", "2"), ("champion", "1")}


# -- bad input ---------------------------------------------------------------------------------------------------
def test_canary_mistakes_are_one_line_errors(champion: tuple[Path, Path], tmp_path: Path) -> None:
    home = champion[0]
    result = run_cli("--home", home, "serve", "--canary", f"models:/{MODEL}@nope", "--port", "0")
    assert result.code == 2 and "has no alias 'nope'" in result.err and len(result.err.strip().splitlines()) == 1
    other = variant_folder(champion[1], tmp_path / "other")
    card = json.loads((other / "model.json").read_text())
    card["input"]["shape"] = [-1, 32, 32, 1]
    (other / "model.json").write_text(json.dumps(card))
    result = run_cli("--home", home, "serve", "--canary", other, "--port", "0")
    assert result.code == 2 and "takes [32, 32, 1] images" in result.err and "must match" in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1
    result = run_cli("--home", home, "serve", "--canary-percent", "5", "--port", "0")
    assert result.code == 2 and "--canary-percent set without --canary" in result.err, result.err
    result = run_cli("--home", home, "serve", str(champion[1]), "--canary", str(champion[1]), "--rollback-alias", "x")
    assert result.code == 2 and "--rollback-alias moves a registry alias" in result.err, result.err
