"""Forecasting: metrics, baselines, model paths (direct / recursive through step()), heads, CLI."""

import json

import numpy as np
import pytest
import tomllib
import torch
from typer.testing import CliRunner

from rnnkit.cli.main import app
from rnnkit.data.series import Series, SeriesError, load_series
from rnnkit.metrics import mape, mase, rmse, smape
from rnnkit.tasks import forecast as F
from rnnkit.train import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: 1 thread is faster and steadier


def _sine(T=160, period=8, noise=0.0, seed=0):
    t = np.arange(T)
    rng = np.random.default_rng(seed)
    return 5 + np.sin(2 * np.pi * t / period) + 0.01 * t + noise * rng.normal(size=T)


def test_metrics_by_hand():
    y, f = np.array([1.0, 2.0]), np.array([2.0, 2.0])
    assert smape(y, f) == pytest.approx((2 * 1 / 3 + 0) / 2)
    assert mape(y, f) == pytest.approx(0.5)
    assert rmse(y, f) == pytest.approx(np.sqrt(0.5))
    assert mase(y, f, np.array([1.0, 2.0, 3.0]), 1) == pytest.approx(0.5)
    assert mase(y, f, np.array([1.0, 5.0, 1.0, 7.0]), 2) == pytest.approx(0.5 / 1.0)
    assert np.isnan(mase(y, f, np.array([3.0, 3.0, 3.0]), 1))  # zero in-sample scale


def test_baselines():
    h = np.arange(24.0)[:, None]
    np.testing.assert_array_equal(F.seasonal_naive(h, 15, 12)[:, 0], list(range(12, 24)) + [12, 13, 14])
    np.testing.assert_array_equal(F.naive(h, 3)[:, 0], [23, 23, 23])
    with pytest.raises(SeriesError, match="--season"):
        F.seasonal_naive(h[:5], 3, 12)


def test_airline_seasonal_naive_anchor():
    aeon = pytest.importorskip("aeon.datasets", reason="aeon (rnnkit[datasets]) not installed")
    y = aeon.load_airline()
    tr, te = y[:108, None], y[108:]
    f = F.seasonal_naive(tr, 36, 12)[:, 0]
    assert smape(te, f) == pytest.approx(0.1454, abs=5e-5)  # docs ANCHORS.md
    assert mape(te, f) == pytest.approx(0.1319, abs=5e-5)
    assert rmse(te, f) == pytest.approx(73.6, abs=0.05)


def test_quantile_loss_and_intervals():
    params = torch.tensor([[[0.0, 1.0, 2.0]]])  # quantiles 0.1, 0.5, 0.9
    y = torch.tensor([[3.0]])
    # errors y - q: 3, 2, 1 (all positive): pinball = q * e -> mean(0.3, 1.0, 0.9) * 3
    loss = F.distribution_loss(params, y, "quantile", (0.1, 0.5, 0.9))
    assert float(loss) == pytest.approx(0.3 + 1.0 + 0.9)
    p, lo, hi = F.point_and_interval(torch.tensor([[[2.0, 0.0, 1.0]]]), "quantile", (0.1, 0.5, 0.9), 0.8)
    assert (float(lo), float(p), float(hi)) == (0.0, 1.0, 2.0)  # crossing quantiles are sorted
    mu, lo, hi = F.point_and_interval(torch.tensor([[0.5, 0.0]]), "gaussian", (), 0.8)
    sigma = float(torch.nn.functional.softplus(torch.tensor(0.0))) + 1e-3
    assert float(hi - mu) == pytest.approx(1.2815516 * sigma, rel=1e-5)
    assert float(mu - lo) == pytest.approx(float(hi - mu))


@pytest.mark.parametrize("head", ["point", "gaussian", "quantile"])
def test_recursive_rollout_matches_teacher_forcing_on_its_own_outputs(head):
    """The step() rollout and the whole-sequence teacher-forced pass are the same network."""
    torch.manual_seed(0)
    cfg = F.ForecastModelConfig(hidden=8, decoder="recursive", head=head, cell="gru")
    net = F.Forecaster(2, 0, 1, horizon=5, cfg=cfg).eval()
    x, xf = torch.randn(3, 7, 3), torch.randn(3, 5, 1)
    with torch.no_grad():
        rolled = net(x, xf)  # (B, H, Ct, K)
        y_hat = net.point(rolled)
        tf, _ = net.teacher_forced(x, y_hat, xf)
    torch.testing.assert_close(tf[:, x.shape[1] - 1:], rolled, rtol=1e-5, atol=1e-6)


def test_direct_model_learns_sine_better_than_naive(tmp_path):
    s = load_series({"y": _sine(noise=0.05)})
    cfg = load_config(F.ForecastConfig, None, {"data.lookback": 16, "data.horizon": 4, "data.season": 8,
                                               "model.hidden": 16, "trainer.steps": 150, "trainer.epochs": None,
                                               "trainer.optim.lr": 0.01})
    res = F.backtest(s, cfg, tmp_path / "bt", folds=2)
    m = res["metrics"]
    assert m["model"]["rmse"] < 0.6 * m["naive"]["rmse"]
    assert (tmp_path / "bt" / "backtest.png").stat().st_size > 1000
    # the saved model reproduces its forecasts
    fold = F.ForecastModel.load(tmp_path / "bt" / "fold1")
    hist = s.slice(0, res["folds"][1]["cut"])
    np.testing.assert_allclose(fold.predict(hist)["point"], res["folds"][1]["forecasts"]["model"], rtol=1e-6)


def test_recursive_past_covariates_rejected():
    T = 50
    s = Series(np.arange(T, dtype=float)[:, None], ["y"], np.random.default_rng(0).normal(size=(T, 1)), ["p"])
    cfg = load_config(F.ForecastConfig, None, {"model.decoder": "recursive"})
    with pytest.raises(SeriesError, match="past-covariates.*recursive"):
        F.check_config(cfg, s)
    with pytest.raises(SeriesError, match="log needs y > 0"):
        F.check_config(load_config(F.ForecastConfig, None, {"data.log": True}),
                       Series(np.arange(-3.0, 3.0)[:, None], ["y"], np.zeros((6, 0))))


def _csv(path, T=120, future=False):
    y = _sine(T, period=12, noise=0.05)
    with path.open("w") as f:
        f.write("t,y,cal\n")
        for i in range(T):
            f.write(f"{i},{y[i]:.5f},{np.cos(2 * np.pi * i / 12):.5f}\n")
        if future:
            for i in range(T, T + 6):
                f.write(f"{i},,{np.cos(2 * np.pi * i / 12):.5f}\n")
    return path


def test_cli_train_predict_with_intervals_and_future_covariates(tmp_path):
    runner = CliRunner()
    data = _csv(tmp_path / "s.csv")
    run = tmp_path / "run"
    r = runner.invoke(app, ["forecast", "train", "--csv", str(data), "--target", "y", "--time", "t",
                            "--future-covariates", "cal", "--horizon", "6", "--lookback", "12", "--head", "quantile",
                            "--hidden", "8", "--steps", "20", "--out", str(run), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["steps"] == 20 and (run / "model.safetensors").is_file() and (run / "config.toml").is_file()
    # predict needs the future covariates of the next 6 steps
    r = runner.invoke(app, ["forecast", "predict", str(run), "--csv", str(data), "--out", str(tmp_path / "f.csv")])
    assert r.exit_code == 2 and "6 extra rows" in r.stderr
    fut = _csv(tmp_path / "s2.csv", future=True)
    r = runner.invoke(app, ["forecast", "predict", str(run), "--csv", str(fut), "--time", "t", "--out",
                            str(tmp_path / "f.csv"), "--json"])
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "f.csv").read_text().splitlines()
    assert lines[0] == "step,time,y,y_lo80,y_hi80" and len(lines) == 7
    rows = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    assert rows[:, 1].tolist() == list(range(120, 126))
    assert (rows[:, 3] <= rows[:, 2]).all() and (rows[:, 2] <= rows[:, 4]).all()


def test_cli_user_errors_exit_2(tmp_path):
    runner = CliRunner()
    p = tmp_path / "bad.csv"
    p.write_text("y,name\n" + "".join(f"{i},x{i}\n" for i in range(40)))
    r = runner.invoke(app, ["forecast", "train", "--csv", str(p), "--target", "name", "--horizon", "2",
                            "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "column 'name' is not numeric" in r.stderr and "Traceback" not in r.output
    r = runner.invoke(app, ["forecast", "train", "--csv", str(p), "--target", "y", "--horizon", "30",
                            "--lookback", "24", "--no-auto", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "shorter than lookback + horizon" in r.stderr
    r = runner.invoke(app, ["forecast", "train", "--csv", str(p), "--target", "y", "--horizon", "36",
                            "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "the largest horizon that works is 35" in r.stderr
    r = runner.invoke(app, ["forecast", "predict", str(tmp_path), "--csv", str(p), "--out", str(tmp_path / "f.csv")])
    assert r.exit_code == 2 and "model.json" in r.stderr


def test_load_series_matches_windows_in_model_space():
    s = load_series({"y": _sine(40)})
    cfg = F.ForecastDataConfig(lookback=5, horizon=3, window_norm="last", log=True)
    tf = F.Transform.fit(s, cfg)
    w = F.windows(s, tf)
    assert w["x"].shape == (33, 5, 1) and np.allclose(w["x"][:, -1, 0], 0)  # offset removed
    z = tf.target(s.target)
    np.testing.assert_allclose(w["y"][0, :, 0], (z[5:8, 0] - z[4, 0]).astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(tf.inverse_target(z), s.target)


def test_differencing_round_trip_and_windows():
    y = np.exp(_sine(80, period=12) / 3)  # positive, seasonal, trending
    s = load_series({"y": y})
    cfg = F.ForecastDataConfig(lookback=6, horizon=5, log=True, difference=(1, 12))
    tf = F.Transform.fit(s, cfg)
    z = tf.target(s.target)
    ly = np.log(y)
    dd = (ly[13:] - ly[12:-1]) - (ly[1:-12] - ly[:-13])  # (1-B)(1-B^12) log y
    assert z.shape == (80 - 13, 1) and tf.lost_rows == 13
    np.testing.assert_allclose(tf.y_scaler.inverse(z)[:, 0], dd, atol=1e-12)
    assert F.windows(s, tf)["x"].shape == (80 - 13 - 6 - 5 + 1, 6, 1)
    # the true future differences integrate back to the true future values
    T0 = 60
    np.testing.assert_allclose(tf.inverse_target(z[T0 - 13:T0 - 13 + 5], y[:T0, None])[:, 0], y[T0:T0 + 5],
                               rtol=1e-10)
    with pytest.raises(ValueError, match="need the history"):
        tf.inverse_target(z[:5])
    with pytest.raises(SeriesError, match="--difference: expected lags"):
        F.check_config(F.ForecastConfig(data=F.ForecastDataConfig(difference=(0,))))
    short = F.ForecastConfig(data=F.ForecastDataConfig(lookback=24, horizon=12, difference=(12,)))
    with pytest.raises(SeriesError, match="after differencing"):
        F.train(load_series({"y": y[:45]}), short, "unused")


def test_cli_difference_flag(tmp_path):
    data = _csv(tmp_path / "s.csv", T=60)
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["forecast", "train", "--csv", str(data), "--target", "y", "--horizon", "6",
                                 "--lookback", "12", "--difference", "1,12", "--decoder", "recursive", "--hidden", "8",
                                 "--steps", "10", "--out", str(run), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    assert F.ForecastModel.load(run).cfg.data.difference == (1, 12)
    rows = (run / "forecast.csv").read_text().splitlines()
    assert len(rows) == 7 and all(np.isfinite(float(v)) for v in rows[-1].split(",")[1:] if v)
    r = CliRunner().invoke(app, ["forecast", "train", "--csv", str(data), "--target", "y", "--difference", "1,x",
                                 "--out", str(tmp_path / "r2")])
    assert r.exit_code == 2 and "--difference: expected comma-separated integers" in r.stderr


def test_seasonal_offset_is_the_seasonal_naive_forecast():
    s = load_series({"y": _sine(60, period=6) + 10})
    cfg = F.ForecastDataConfig(lookback=12, horizon=8, window_norm="seasonal", season=6, scaler="none")
    w = F.windows(s, F.Transform.fit(s, cfg))
    y = s.target[:, 0]
    k = 3  # window starting at row 3: lookback rows 3..14, horizon rows 15..22
    naive = y[3 + 12 - 6 + np.arange(8) % 6]
    np.testing.assert_allclose(w["y"][k, :, 0], (y[15:23] - naive).astype(np.float32), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w["x"][k, :, 0], (y[3:15] - y[3:15].mean()).astype(np.float32), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(SeriesError, match="needs --decoder direct"):
        F.check_config(F.ForecastConfig(model=F.ForecastModelConfig(decoder="recursive"), data=cfg))
    with pytest.raises(SeriesError, match="lookback >= --season"):
        F.check_config(F.ForecastConfig(data=F.ForecastDataConfig(lookback=4, season=6, window_norm="seasonal")))


def test_sarima_airline_model():
    pytest.importorskip("statsmodels", reason="statsmodels (rnnkit[datasets]) not installed")
    aeon = pytest.importorskip("aeon.datasets", reason="aeon (rnnkit[datasets]) not installed")
    y = aeon.load_airline()
    f = F.sarima(y[:108, None], 36, 12, log=True)[:, 0]
    assert smape(y[108:], f) == pytest.approx(0.0774, abs=5e-4)


def test_cli_automatic_mode_records_its_choices_and_predicts(tmp_path):
    runner = CliRunner()
    p = tmp_path / "s.csv"
    y = 20 + _sine(48, period=6)
    p.write_text("month,y\n" + "".join(f"{2000 + i // 12}-{1 + i % 12:02d},{v:.4f}\n" for i, v in enumerate(y)))
    run = tmp_path / "run"
    tiny = ["--steps", "20", "--set", "auto.hidden=4", "--set", "auto.ensemble=1", "--set", "auto.eval_every=10"]
    r = runner.invoke(app, ["forecast", "train", "--csv", str(p), "--time", "month", "--horizon", "4", "--transform",
                            "d1", "--lookback", "4", *tiny, "--out", str(run), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["mode"] == "auto" and out["choices"]["season"]["value"] == 6
    (member,) = out["choices"]["chosen"]["members"]
    assert member.startswith("d1:4:") and len(out["choices"]["candidates"]) == 1
    assert tomllib.loads((run / "config.toml").read_text())["pipelines"] == [member]
    lines = (run / "forecast.csv").read_text().splitlines()
    assert lines[0] == "id,step,time,forecast" and lines[1].startswith("y,1,2004-01,") and len(lines) == 5
    r = runner.invoke(app, ["forecast", "predict", str(run), "--csv", str(p), "--out", str(tmp_path / "f.csv")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "f.csv").read_text() == (run / "forecast.csv").read_text()
    gap = tmp_path / "gap.csv"
    gap.write_text("\n".join(p.read_text().splitlines()[:10] + p.read_text().splitlines()[11:]) + "\n")
    r = runner.invoke(app, ["forecast", "train", "--csv", str(gap), "--time", "month", "--horizon", "4",
                            "--out", str(tmp_path / "r2")])
    assert r.exit_code == 2 and "1 missing time step(s) (first after row 8, line 10)" in r.stderr
    r = runner.invoke(app, ["forecast", "train", "--csv", str(p), "--horizon", "4", "--epochs", "3",
                            "--out", str(tmp_path / "r3")])
    assert r.exit_code == 2 and "--epochs: the automatic mode budgets optimizer steps" in r.stderr


def test_cli_automatic_mode_keeps_integer_times_and_a_constant_series(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("t,y\n" + "".join(f"{i},5\n" for i in range(30)))
    tiny = ["--steps", "20", "--set", "auto.hidden=4", "--set", "auto.eval_every=10", "--quiet"]
    r = CliRunner().invoke(app, ["forecast", "train", "--csv", str(p), "--time", "t", "--horizon", "3", *tiny,
                                 "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "run" / "forecast.csv").read_text().splitlines()
    assert [ln.rsplit(",", 1)[0] for ln in lines[1:]] == ["y,1,30", "y,2,31", "y,3,32"]
    np.testing.assert_allclose([float(ln.rsplit(",", 1)[1]) for ln in lines[1:]], 5.0, atol=1e-6)
