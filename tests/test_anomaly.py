"""Anomaly detection: thresholds, metrics, streaming state, detectors end to end, CLI."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from rnnkit.cli.main import app
from rnnkit.data.series import SeriesError
from rnnkit.metrics import point_adjusted_prf, pointwise_prf, segments, ucr_hit
from rnnkit.tasks import anomaly as A
from rnnkit.train import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: 1 thread is faster and steadier


def test_segments_and_prf_by_hand():
    y = np.array([0, 1, 1, 1, 0, 0, 1, 1, 0, 0], bool)
    f = np.array([0, 0, 1, 0, 0, 1, 0, 0, 0, 0], bool)
    assert segments(y) == [(1, 3), (6, 7)]
    pw = pointwise_prf(y, f)
    assert pw["precision"] == pytest.approx(0.5) and pw["recall"] == pytest.approx(1 / 5)
    pa = point_adjusted_prf(y, f)  # the first segment counts as fully detected: tp 3, fp 1, fn 2
    assert pa["precision"] == pytest.approx(3 / 4) and pa["recall"] == pytest.approx(3 / 5)


def test_ucr_rule():
    labels = np.zeros(1000, bool)
    labels[500:510] = True
    s = np.zeros(1000)
    s[605] = 1.0
    assert ucr_hit(s, labels)["ucr_hit"]  # within 100 after the region's end
    s[605], s[350] = 0.0, 1.0
    assert not ucr_hit(s, labels)["ucr_hit"]
    with pytest.raises(SeriesError, match="no point is labelled"):
        ucr_hit(s, np.zeros(1000))


def test_dynamic_threshold_finds_a_burst_and_prunes_noise():
    rng = np.random.default_rng(0)
    s = np.abs(rng.normal(0, 1, 2000))
    s = A.ewma(s, 8)
    s[1200:1215] += 6.0
    flags, eps = A.dynamic_threshold(s)
    runs = segments(flags)
    assert len(runs) == 1 and 1195 <= runs[0][0] <= 1205 and 1205 <= runs[0][1] <= 1225
    assert eps[0] > s[~flags].max()
    quiet, _ = A.dynamic_threshold(A.ewma(np.abs(rng.normal(0, 1, 2000)), 8))
    assert quiet.sum() <= 5  # pure noise: pruning removes (nearly) everything


def test_ewma():
    np.testing.assert_allclose(A.ewma(np.array([1.0, 0.0, 0.0]), 3), [1.0, 0.5, 0.25])


def _signal(T=900, seed=0):
    t = np.arange(T)
    return np.sin(2 * np.pi * t / 25) + 0.05 * np.random.default_rng(seed).normal(size=T)


def _small_cfg(**kw):
    base = {"model.hidden": 16, "model.window": 32, "model.stride": 4, "trainer.steps": 120,
            "trainer.epochs": None, "trainer.optim.lr": 0.01}
    return load_config(A.AnomalyConfig, None, {**base, **kw})


def test_streaming_equals_one_shot_and_survives_save_load(tmp_path):
    det = A.train(_signal(400)[:, None], _small_cfg(**{"trainer.steps": 5}), None)
    x = _signal(300, seed=3)[:, None]
    whole = det.stream().update(x)
    s = det.stream()
    parts = [s.update(x[:100])]
    s.save(tmp_path / "state.safetensors")
    s2 = det.stream().load(tmp_path / "state.safetensors")
    parts += [s2.update(x[100:101]), s2.update(x[101:])]
    for key in ("raw", "score"):
        np.testing.assert_allclose(np.concatenate([p[key] for p in parts]), whole[key], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(det.raw_scores(x), whole["raw"], rtol=1e-5, atol=1e-6)


def test_prediction_detector_finds_injected_anomaly():
    det = A.train(_signal(500)[:, None], _small_cfg(), None)
    x = _signal(900, seed=1)
    x[600:606] += 2.5
    labels = np.zeros(900)
    labels[600:606] = 1
    s = det.score(x[:, None])
    r = A.evaluate(s, labels)
    assert r["ucr_hit"] and abs(r["top_index"] - 603) < 30
    assert r["adjusted_recall"] == 1.0


def test_reconstruction_detector_scores_every_point():
    det = A.train(_signal(400)[:, None], _small_cfg(**{"model.detector": "reconstruction", "trainer.steps": 10}),
                  None)
    s = det.score(_signal(250, seed=2)[:, None])
    assert s["score"].shape == (250,) and np.isfinite(s["score"]).all() and (s["raw"][16:] > 0).all()
    with pytest.raises(SeriesError, match="streaming needs a prediction detector"):
        det.stream()


def test_too_little_normal_data():
    with pytest.raises(SeriesError, match="too few"):
        A.train(_signal(60)[:, None], _small_cfg(), None)


def _csv(path, x, labels=None):
    with path.open("w") as f:
        f.write("t,value" + (",label" if labels is not None else "") + "\n")
        for i, v in enumerate(x):
            f.write(f"{i},{v:.5f}" + (f",{int(labels[i])}" if labels is not None else "") + "\n")
    return path


def test_cli_fit_score_stream(tmp_path):
    runner = CliRunner()
    normal = _csv(tmp_path / "normal.csv", _signal(400))
    run = tmp_path / "run"
    r = runner.invoke(app, ["anomaly", "fit", "--csv", str(normal), "--time", "t", "--hidden", "8", "--window", "32",
                            "--steps", "20", "--out", str(run), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    x = _signal(300, seed=4)
    x[200:204] += 3
    labels = np.zeros(300)
    labels[200:204] = 1
    test = _csv(tmp_path / "test.csv", x, labels)
    out = tmp_path / "scores.csv"
    r = runner.invoke(app, ["anomaly", "score", str(run), "--csv", str(test), "--time", "t", "--labels", "label",
                            "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert {"ucr_hit", "point_f1", "adjusted_f1"} <= set(res) and res["points"] == 300
    lines = out.read_text().splitlines()
    assert lines[0] == "index,time,value,score,raw_score,flag,label" and len(lines) == 301
    assert (tmp_path / "scores_intervals.csv").is_file() and (tmp_path / "scores.png").stat().st_size > 1000
    # streaming: two calls continue the index and the state
    for k in range(2):
        r = runner.invoke(app, ["anomaly", "score", str(run), "--csv", str(normal), "--stream", "--out",
                                str(tmp_path / f"s{k}.csv"), "--json"])
        assert r.exit_code == 0, r.output
    second = (tmp_path / "s1.csv").read_text().splitlines()
    assert second[1].startswith("400,")
    r = runner.invoke(app, ["anomaly", "score", str(run), "--csv", str(test), "--labels", "nope", "--out", str(out)])
    assert r.exit_code == 2 and "no column 'nope'" in r.stderr
