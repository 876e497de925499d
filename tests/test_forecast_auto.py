"""The automatic forecaster: season detection, candidate lists, per-series scaling of the global model,
the validation record and the run directory."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from rnnkit.data.series import SeriesError
from rnnkit.tasks.forecast_auto import (
    AutoForecastConfig,
    AutoForecastModel,
    AutoSettings,
    Candidate,
    acf,
    auto_fit,
    detect_season,
    fit_global,
    lookback_candidates,
    member_name,
    parse_member,
    parse_transform,
    train_auto,
    transform_candidates,
    transform_name,
)
from rnnkit.train import load_config

TINY = AutoSettings(hidden=8, steps=30, eval_every=10, patience=2, ensemble=1, batch_size=16)


def _seasonal(n=72, m=6, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 50 + 0.3 * t + 5 * np.sin(2 * np.pi * t / m) + rng.normal(0, 0.5, n)


def test_acf_matches_numpy_correlation():
    x = np.random.default_rng(1).normal(size=50)
    r = acf(x, 3)
    xc = x - x.mean()
    assert r[0] == 1.0
    np.testing.assert_allclose(r[2], np.dot(xc[:-2], xc[2:]) / np.dot(xc, xc))


def test_detect_season_finds_the_period_and_records_the_evidence():
    m, info = detect_season(_seasonal(m=6))
    assert m == 6 and info["of"] == "first differences" and info["acf"] > info["threshold"]
    m, info = detect_season(np.random.default_rng(2).normal(size=80))
    assert m == 1 and "no autocorrelation peak" in info["reason"]
    assert detect_season(np.arange(5.0))[0] == 1


def test_transform_names_round_trip_and_candidates():
    for lg, d in transform_candidates(True, 12):
        assert parse_transform(transform_name(lg, d)) == (lg, d)
    assert transform_name(False, ()) == "none" and parse_transform("log+d1+d12") == (True, (1, 12))
    assert len(transform_candidates(True, 12)) == 8 and len(transform_candidates(False, 1)) == 2
    with pytest.raises(SeriesError, match="--transform"):
        parse_transform("sqrt")


def test_lookback_candidates_are_cut_to_the_series():
    assert lookback_candidates(100, 0, 12) == [12, 24]
    assert lookback_candidates(12, 1, 1) == [4, 7]  # room for 4 windows: 12 - 1 - 4 = 7
    assert lookback_candidates(5, 1, 1) == []


def test_global_model_scales_each_series_on_its_own():
    """Per-series scaling makes the forecast equivariant to a series' scale: f(c y) = c f(y)."""
    y = _seasonal()
    model, _ = fit_global([y, 100 * _seasonal(seed=3)], [Candidate(True, (1,), 6)], 4, TINY)
    np.testing.assert_allclose(model.predict(1000 * y), 1000 * model.predict(y), rtol=1e-5)
    model, _ = fit_global([y], [Candidate(False, (), 6)], 4, TINY)
    np.testing.assert_allclose(model.predict(3 * y), 3 * model.predict(y), rtol=1e-5)


def test_auto_fit_records_every_candidate_and_picks_the_best():
    model, rec = auto_fit([_seasonal()], 6, TINY, lookback=6)
    assert rec["season"]["value"] == 6 and rec["season"]["source"] == "detected"
    scores = [c["mase"] for c in rec["candidates"]]
    assert len(scores) == 8 and rec["chosen"]["val_mase"] == [min(scores)]
    (member,) = rec["chosen"]["members"]
    assert int(member.split(":")[2]) % TINY.eval_every == 0
    assert model.predict(_seasonal()).shape == (6,)


def test_the_final_model_averages_the_best_candidates():
    s = replace(TINY, ensemble=3)
    model, rec = auto_fit([_seasonal()], 6, s, lookback=6)
    ranked = sorted(rec["candidates"], key=lambda c: (c["mase"], c["smape"]))[:3]
    assert rec["chosen"]["members"] == [member_name(parse_transform_candidate(c), c["best_step"]) for c in ranked]
    assert [cfg.data.lookback for cfg, _ in model.members] == [6, 6, 6]
    assert len({(cfg.data.log, cfg.data.difference) for cfg, _ in model.members}) == 3
    # one candidate (the user's transform and window): its seeds
    model, rec = auto_fit([_seasonal()], 6, s, transform="d1", lookback=6)
    assert len(set(rec["chosen"]["members"])) == 1 and len(model.members) == 3
    assert not torch.equal(*(next(net.parameters()) for _, net in model.members[:2]))
    _, rec = auto_fit([_seasonal()], 6, replace(s, combine="seeds"), lookback=6)
    assert len(set(rec["chosen"]["members"])) == 1
    with pytest.raises(SeriesError, match="auto.combine: expected 'top' or 'seeds', got 'best'"):
        replace(s, combine="best")


def parse_transform_candidate(row):
    return Candidate(*parse_transform(row["transform"]), row["lookback"])


def test_user_choices_replace_the_automatic_ones():
    _, rec = auto_fit([_seasonal()], 6, TINY, season=3, transform="log+d1", lookback=5)
    assert rec["season"] == {"value": 3, "source": "user"} and rec["transform_source"] == "user"
    assert [(c["transform"], c["lookback"]) for c in rec["candidates"]] == [("log+d1", 5)]
    with pytest.raises(SeriesError, match="log needs every value > 0"):
        auto_fit([_seasonal() - 100], 6, TINY, transform="log")


def test_horizon_too_long_names_the_largest_that_works():
    with pytest.raises(SeriesError, match="the largest horizon that works is 15"):
        auto_fit([_seasonal(n=20)], 16, TINY)


def test_run_directory_round_trip(tmp_path):
    cfg = AutoForecastConfig(horizon=4, transform="d1", lookback=6, auto=TINY)
    y = _seasonal()
    model = train_auto([y], cfg, tmp_path)
    assert model.cfg.season == 6 and model.cfg.pipelines == tuple(model.record["chosen"]["members"])
    assert "season = 6" in (tmp_path / "config.toml").read_text()
    again = AutoForecastModel.load(tmp_path)
    np.testing.assert_allclose(again.predict(y), model.predict(y))
    assert again.record["chosen"]["members"][0].startswith("d1:6:")
    # the saved config trains the same members again, without the search
    cfg2 = load_config(AutoForecastConfig, tmp_path / "config.toml")
    assert cfg2 == model.cfg
    redo = train_auto([y], cfg2)
    assert "candidates" not in redo.record and redo.record["chosen"]["members"] == list(cfg2.pipelines)
    np.testing.assert_allclose(redo.predict(y), model.predict(y), rtol=1e-6)
    assert parse_member("log+d12:12:200") == (Candidate(True, (12,), 12), 200)
    for bad in ("d1:6", "d1:0:10", "d7x:6:10"):
        with pytest.raises(SeriesError, match="pipelines: expected entries TRANSFORM:LOOKBACK:STEPS|--transform"):
            parse_member(bad)
