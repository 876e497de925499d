"""Multi-step forecasting with a recurrent encoder: direct and recursive decoders, point and
probabilistic heads, backtesting against naive, seasonal-naive and seasonal ARIMA baselines.

Pipeline for the target (each step inverted on output, in reverse order):
``log`` (optional, positive series) -> differencing (optional, ``difference=(1, 12)`` models
:math:`(1-B)(1-B^{12}) y` like the airline model; forecasts are integrated back from the history)
-> scaler fit on the training rows only -> per-window offset
(``window_norm="last"`` / ``"mean"`` subtracts the last observed value / the mean of each lookback
window, so the network models changes and a trend outside the training range does not saturate it;
``"seasonal"`` makes the network predict the correction to the seasonal-naive forecast).

Decoders:
- ``direct``: the encoder reads the lookback window; a linear head maps its final state (and the
  known-future covariates of the horizon) to all H steps at once.
- ``recursive``: a one-step model, trained with teacher forcing on every position of
  lookback + horizon; at inference its own forecasts are fed back through the stateful ``step()``.
  Input at step t is ``[y_t, f_{t+1}]`` (target, known-future covariates of the next step).

Heads: ``point`` (MSE), ``gaussian`` (negative log-likelihood; interval mean +- z sigma) and
``quantile`` (pinball loss :math:`\\sum_q \\max(q e, (q-1) e)`, e = y - y_q; interval = outer quantiles).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.series import Scaler, Series, SeriesError, check_length, make_windows
from ..errors import TrainingError
from ..metrics.forecast import forecast_metrics
from ..train import TrainerConfig
from .base import fit, load_trained, load_weights, pyplot, sample_trainer, save_figure, save_model, save_trained
from .encoders import SeriesModelOptions, final_hidden

TASK = "forecast"


# ---- configuration -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ForecastModelConfig(SeriesModelOptions):
    """Model settings (``[model]`` in the TOML config).

    Args:
        cell, hidden, layers, dropout, ...: the recurrent encoder (see :class:`SeriesModelOptions`).
        decoder: "direct" (all H steps from the encoder state) or "recursive" (one step, fed back).
        head: "point", "gaussian" or "quantile".
        quantiles: the quantile levels of the quantile head (must include a level for the point forecast,
            the one nearest 0.5 is used).
        ensemble: train this many models (seeds seed, seed+1, ...) and average their outputs.
    """

    decoder: Literal["direct", "recursive"] = "direct"
    head: Literal["point", "gaussian", "quantile"] = "point"
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    ensemble: int = 1


@dataclass(frozen=True)
class ForecastDataConfig:
    """Data settings (``[data]``).

    Args:
        lookback: input window length L.
        horizon: forecast length H.
        stride: step between training windows.
        scaler: "standard", "minmax", "robust" or "none" (fit on training rows only).
        log: model log(y) (every target value must be > 0).
        window_norm: "none", "last", "mean" or "seasonal" (subtract each window's last observed target
            value, its mean over the lookback, or, for the horizon, the seasonal-naive forecast; direct
            decoder only).
        season: seasonal period for the seasonal-naive baseline, MASE and SARIMA (1 = none).
        difference: lags of the differences applied to the (log) target before scaling, in order; e.g.
            (1, 12) models :math:`(1-B)(1-B^{12}) y_t`. Costs sum(lags) rows at the start of the series.
            Intervals are integrated like the point forecast (a conservative band).
        interval: central coverage of the prediction interval (probabilistic heads).
        fill: missing-value policy (None = error, "ffill", "interpolate", "zero").
    """

    lookback: int = 24
    horizon: int = 12
    stride: int = 1
    scaler: Literal["standard", "minmax", "robust", "none"] = "standard"
    log: bool = False
    window_norm: Literal["none", "last", "mean", "seasonal"] = "none"
    season: int = 1
    difference: tuple[int, ...] = ()
    interval: float = 0.8
    fill: str | None = None


@dataclass(frozen=True)
class ForecastConfig:
    """Everything a forecasting run needs; saved resolved as ``config.toml`` in the run directory."""

    model: ForecastModelConfig = field(default_factory=ForecastModelConfig)
    data: ForecastDataConfig = field(default_factory=ForecastDataConfig)
    trainer: TrainerConfig = field(default_factory=lambda: sample_trainer(epochs=200, batch_size=16, lr=1e-3))


def check_config(cfg: ForecastConfig, series: Series | None = None) -> None:
    """Consistency checks that the types alone do not make (raise SeriesError naming the key)."""
    m, d = cfg.model, cfg.data
    if m.head == "quantile":
        if not m.quantiles or any(not 0 < q < 1 for q in m.quantiles) or len(set(m.quantiles)) != len(m.quantiles):
            raise SeriesError(f"model.quantiles: expected distinct levels in (0, 1), got {list(m.quantiles)}")
    if not 0 < d.interval < 1:
        raise SeriesError(f"data.interval: expected a coverage in (0, 1), got {d.interval}")
    if m.ensemble < 1:
        raise SeriesError(f"model.ensemble: expected an int >= 1, got {m.ensemble}")
    if d.season < 1:
        raise SeriesError(f"data.season: expected an int >= 1, got {d.season}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in d.difference):
        raise SeriesError(f"--difference: expected lags that are ints >= 1, e.g. 1,12; got {list(d.difference)}")
    if d.window_norm == "seasonal":
        if m.decoder != "direct":
            raise SeriesError("--window-norm seasonal: needs --decoder direct (the recursive decoder feeds its "
                              "outputs back with one offset for all steps)")
        if d.season < 2 or d.lookback < d.season:
            raise SeriesError(f"--window-norm seasonal: needs --season >= 2 and --lookback >= --season, got season "
                              f"{d.season}, lookback {d.lookback}")
    if series is not None:
        if m.decoder == "recursive" and series.past.shape[1]:
            raise SeriesError(f"--past-covariates {series.past_names}: a recursive decoder feeds its inputs back "
                              "step by step, so every input must be known in the future; use --decoder direct "
                              "or pass them as --future-covariates")
        if d.log and (series.target <= 0).any():
            raise SeriesError(f"--log: the target has values <= 0 (min {series.target.min():g}); log needs y > 0")


# ---- the model ---------------------------------------------------------------------------------
def _n_params(head: str, quantiles: tuple[float, ...]) -> int:
    return {"point": 1, "gaussian": 2}.get(head, len(quantiles))


class Forecaster(nn.Module):
    """Recurrent encoder + direct or recursive decoder + distribution head.

    Shapes: ``x`` (B, L, Ct + Cp + Cf), ``xf`` (B, H, Cf) -> parameters (B, H, Ct, K) with K = 1 (point),
    2 (Gaussian mean, raw scale) or the number of quantiles.
    """

    def __init__(self, n_target: int, n_past: int, n_future: int, horizon: int,
                 cfg: ForecastModelConfig) -> None:
        super().__init__()
        self.n_target, self.n_past, self.n_future, self.horizon = n_target, n_past, n_future, horizon
        self.decoder, self.head_kind = cfg.decoder, cfg.head
        self.K = _n_params(cfg.head, cfg.quantiles)
        if cfg.decoder == "direct":
            self.encoder = cfg.build_encoder(n_target + n_past + n_future)
            self.head = nn.Linear(cfg.hidden + horizon * n_future, horizon * n_target * self.K)
        else:
            self.encoder = cfg.build_encoder(n_target + n_future)
            self.head = nn.Linear(cfg.hidden, n_target * self.K)

    def point(self, params: Tensor) -> Tensor:
        """The point forecast from head parameters (..., K) -> (...)."""
        if self.head_kind == "quantile":
            return params.sort(-1).values[..., self.K // 2]
        return params[..., 0]

    def _recursive_inputs(self, x: Tensor, xf: Tensor) -> tuple[Tensor, Tensor]:
        """Lookback inputs ``[y_t, f_{t+1}]`` (B, L, Ct+Cf) and the future covariates used after it."""
        Ct = self.n_target
        f = torch.cat([x[..., Ct:], xf], dim=1)  # (B, L+H, Cf)
        return torch.cat([x[..., :Ct], f[:, 1:x.shape[1] + 1]], -1), f[:, x.shape[1] + 1:]

    def forward(self, x: Tensor, xf: Tensor) -> Tensor:
        B = x.shape[0]
        if self.decoder == "direct":
            _, state = self.encoder(x)
            z = torch.cat([final_hidden(state, 1), xf.reshape(B, -1)], -1)
            return self.head(z).view(B, self.horizon, self.n_target, self.K)
        inp, f_next = self._recursive_inputs(x, xf)
        out, state = self.encoder(inp)
        params = [self.head(out[:, -1]).view(B, self.n_target, self.K)]
        for j in range(self.horizon - 1):
            y_t = self.point(params[-1])
            o, state = self.encoder.step(torch.cat([y_t, f_next[:, j]], -1), state)
            params.append(self.head(o).view(B, self.n_target, self.K))
        return torch.stack(params, 1)

    def teacher_forced(self, x: Tensor, y: Tensor, xf: Tensor) -> tuple[Tensor, Tensor]:
        """Recursive decoder, training: one-step parameters at every position and their targets."""
        Ct = self.n_target
        seq_y = torch.cat([x[..., :Ct], y], 1)  # (B, L+H, Ct)
        f = torch.cat([x[..., Ct:], xf], 1)  # (B, L+H, Cf)
        inp = torch.cat([seq_y[:, :-1], f[:, 1:]], -1)
        out, _ = self.encoder(inp)
        B, T = inp.shape[:2]
        return self.head(out).view(B, T, Ct, self.K), seq_y[:, 1:]


def distribution_loss(params: Tensor, y: Tensor, head: str, quantiles: tuple[float, ...]) -> Tensor:
    """Mean loss of head parameters (..., K) against targets (...)."""
    if head == "point":
        return F.mse_loss(params[..., 0], y)
    if head == "gaussian":
        sigma = F.softplus(params[..., 1]) + 1e-3
        return F.gaussian_nll_loss(params[..., 0], y, sigma ** 2, full=True)
    q = torch.tensor(quantiles, dtype=params.dtype, device=params.device)
    e = y.unsqueeze(-1) - params
    return torch.maximum(q * e, (q - 1) * e).mean() * len(quantiles)


def point_and_interval(params: Tensor, head: str, quantiles: tuple[float, ...], coverage: float
                       ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(point, lower, upper) from head parameters (..., K); bounds are None for the point head."""
    if head == "point":
        return params[..., 0], None, None
    if head == "gaussian":
        z = statistics.NormalDist().inv_cdf(0.5 + coverage / 2)
        mu, sigma = params[..., 0], F.softplus(params[..., 1]) + 1e-3
        return mu, mu - z * sigma, mu + z * sigma
    order = sorted(range(len(quantiles)), key=lambda i: quantiles[i])
    p = params.sort(-1).values  # monotone quantiles
    mid = min(range(len(order)), key=lambda i: abs(quantiles[order[i]] - 0.5))
    return p[..., mid], p[..., 0], p[..., -1]


class ForecastTask:
    """The trainer's view of forecasting: ``loss(model, batch)`` on a batch of windows."""

    def __init__(self, head: str, quantiles: tuple[float, ...]) -> None:
        self.head, self.quantiles = head, quantiles

    def loss(self, model: Forecaster, batch: dict[str, Tensor]) -> Tensor:
        if model.decoder == "recursive":
            params, target = model.teacher_forced(batch["x"], batch["y"], batch["xf"])
        else:
            params, target = model(batch["x"], batch["xf"]), batch["y"]
        return distribution_loss(params, target, self.head, self.quantiles)


# ---- data preparation --------------------------------------------------------------------------
def _levels(y: np.ndarray, cfg: ForecastDataConfig) -> list[np.ndarray]:
    """The (log) target and each successive difference of it: [v_0, v_1, ..., v_K] for lags l_1..l_K,
    :math:`v_k[t] = v_{k-1}[t] - v_{k-1}[t - l_k]` (each one l_k rows shorter)."""
    v = [np.log(y) if cfg.log else np.asarray(y, dtype=np.float64)]
    for lag in cfg.difference:
        v.append(v[-1][lag:] - v[-1][:-lag])
    return v


def _after_differencing(arg: str, cfg: ForecastDataConfig) -> str:
    """``arg``, marked as counted after differencing when the config differences the target."""
    return f"{arg} (after differencing)" if cfg.difference else arg


class Transform:
    """Target and covariate transforms fit on training rows; saved in ``model.json``."""

    def __init__(self, cfg: ForecastDataConfig, y_scaler: Scaler, c_scaler: Scaler | None) -> None:
        self.cfg, self.y_scaler, self.c_scaler = cfg, y_scaler, c_scaler

    @property
    def lost_rows(self) -> int:
        """Rows at the start of a series that differencing consumes."""
        return sum(self.cfg.difference)

    @classmethod
    def fit(cls, series: Series, cfg: ForecastDataConfig) -> Transform:
        cov = np.concatenate([series.past, series.future], 1)[sum(cfg.difference):]
        with np.errstate(over="ignore", invalid="ignore"):  # (an overflowing difference is named below)
            levels = _levels(series.target, cfg)[-1]
        return cls(cfg, Scaler(cfg.scaler).fit(levels, series.target_names, _after_differencing("--csv", cfg)),
                   Scaler("standard").fit(cov, series.past_names + series.future_names, "--csv covariates")
                   if cov.shape[1] else None)

    def target(self, y: np.ndarray) -> np.ndarray:
        """(T, Ct) data -> (T - lost_rows, Ct) model space."""
        return self.y_scaler.transform(_levels(y, self.cfg)[-1])

    def inverse_target(self, z: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        """Model space (H, Ct) -> data units; with differencing, ``z`` are the forecasts of the steps right
        after ``history`` (T, Ct data), which they are integrated from."""
        cur = self.y_scaler.inverse(z)
        if not self.cfg.difference:
            return np.exp(cur) if self.cfg.log else cur
        if history is None:
            raise ValueError("inverse_target: differenced forecasts need the history they continue")
        levels = _levels(history, self.cfg)
        for k in reversed(range(len(self.cfg.difference))):  # v_k[t] = v_k[t - lag] + v_{k+1}[t]
            lag, buf = self.cfg.difference[k], list(levels[k])
            for step in cur:
                buf.append(buf[-lag] + step)
            cur = np.asarray(buf[len(levels[k]):])
        return np.exp(cur) if self.cfg.log else cur

    def covariates(self, c: np.ndarray) -> np.ndarray:
        return c if self.c_scaler is None else self.c_scaler.transform(c)

    def state(self) -> dict[str, Any]:
        return {"y": self.y_scaler.state(), "c": None if self.c_scaler is None else self.c_scaler.state()}

    @classmethod
    def from_state(cls, cfg: ForecastDataConfig, state: dict[str, Any]) -> Transform:
        return cls(cfg, Scaler.from_state(state["y"]), None if state["c"] is None else Scaler.from_state(state["c"]))


def _arrays(series: Series, tf: Transform) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    Cp = series.past.shape[1]
    cov = tf.covariates(np.concatenate([series.past, series.future], 1)[tf.lost_rows:])
    return tf.target(series.target), cov[:, :Cp], cov[:, Cp:]


def _offsets(x: np.ndarray, norm: str, horizon: int, season: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-window offsets of lookback targets (N, L, Ct): for the inputs (N, 1, Ct) and the horizon (N, H, Ct).

    ``last``: the last value for both; ``mean``: the lookback mean for both; ``seasonal``: the mean for
    the inputs and the seasonal-naive forecast :math:`x_{L-m+(h \bmod m)}` for the horizon, so the
    network learns a correction to the seasonal-naive forecast; ``none``: zeros.
    """
    N, L, Ct = x.shape
    if norm == "last":
        off = x[:, -1:].copy()
    elif norm in ("mean", "seasonal"):
        off = x.mean(1, keepdims=True)
    else:
        off = np.zeros((N, 1, Ct))
    if norm == "seasonal":
        return off, x[:, L - season + (np.arange(horizon) % season)]
    return off, np.repeat(off, horizon, axis=1)


def windows(series: Series, tf: Transform) -> dict[str, np.ndarray]:
    """Training windows in model space (float32), with the per-window offset already subtracted."""
    d = tf.cfg
    y, p, f = _arrays(series, tf)
    w = make_windows(y, d.lookback, d.horizon, p, f, d.stride)
    Ct = y.shape[1]
    x_off, y_off = _offsets(w["x"][..., :Ct], d.window_norm, d.horizon, d.season)
    w["x"][..., :Ct] -= x_off
    w["y"] -= y_off
    return {"x": w["x"].astype(np.float32), "y": w["y"].astype(np.float32), "xf": w["xf"].astype(np.float32)}


def _last_window(series: Series, tf: Transform, future_rows: Series | None) -> tuple[Tensor, Tensor, np.ndarray]:
    d = tf.cfg
    y, p, f = _arrays(series, tf)
    Ct = y.shape[1]
    x = np.concatenate([y, p, f], 1)[-d.lookback:].copy()
    x_off, y_off = _offsets(x[None, :, :Ct], d.window_norm, d.horizon, d.season)
    x[:, :Ct] -= x_off[0]
    if future_rows is not None and future_rows.future.shape[1]:
        xf = tf.covariates(np.concatenate([future_rows.past, future_rows.future], 1))[:, future_rows.past.shape[1]:]
    else:
        xf = np.zeros((d.horizon, f.shape[1]))
    return (torch.tensor(x[None], dtype=torch.float32), torch.tensor(xf[None], dtype=torch.float32), y_off[0])


# ---- training and prediction -------------------------------------------------------------------
def _fit_one(series: Series, cfg: ForecastConfig, tf: Transform, run_dir: Path | None, seed: int,
             quiet: bool, resume: bool = False) -> tuple[Forecaster, dict[str, Any]]:
    from ..train import replace_config

    d = cfg.data
    data = {k: torch.from_numpy(v) for k, v in windows(series, tf).items()}
    torch.manual_seed(seed)
    model = Forecaster(series.target.shape[1], series.past.shape[1], series.future.shape[1], d.horizon, cfg.model)
    tcfg = replace_config(cfg.trainer, seed=seed)
    result = fit(model, ForecastTask(cfg.model.head, cfg.model.quantiles), data, tcfg, run_dir,
                 full_config=cfg, resume=resume, quiet=quiet)
    return model, result


class ForecastModel:
    """A trained forecaster (an ensemble of one or more networks) with its transforms."""

    def __init__(self, cfg: ForecastConfig, tf: Transform, nets: list[Forecaster], meta: dict[str, Any]) -> None:
        self.cfg, self.tf, self.nets, self.meta = cfg, tf, nets, meta

    @torch.no_grad()
    def predict(self, history: Series, future_rows: Series | None = None) -> dict[str, np.ndarray]:
        """Forecast the H steps after the end of ``history``: ``point``, ``lo``, ``hi`` (H, Ct) in data units
        (``lo``/``hi`` absent for the point head)."""
        d, m = self.cfg.data, self.cfg.model
        check_length(len(history) - self.tf.lost_rows, d.lookback, 1, _after_differencing("history", d))
        if history.future.shape[1] and (future_rows is None or len(future_rows) < d.horizon):
            raise SeriesError(f"--csv: the model uses known-future covariates {history.future_names}; the file "
                              f"needs {d.horizon} extra rows after the last target value with those columns filled")
        x, xf, off = _last_window(history, self.tf, None if future_rows is None else future_rows.slice(0, d.horizon))
        outs = [point_and_interval(net(x, xf)[0], m.head, m.quantiles, d.interval) for net in self.nets]
        res = {}
        for i, key in enumerate(("point", "lo", "hi")):
            if outs[0][i] is None:
                continue
            z = torch.stack([o[i] for o in outs]).mean(0).double().numpy() + off  # (H, Ct)
            with np.errstate(over="ignore", invalid="ignore"):
                res[key] = self.tf.inverse_target(z, history.target)
            if not np.isfinite(res[key]).all():
                raise TrainingError(f"forecast: the {key} forecast overflows in data units (the model's output "
                                    f"is far outside the training range); check the series' scale")
        return res

    def save(self, run_dir: Path) -> None:
        for k, net in enumerate(self.nets):
            save_model(run_dir / (f"member{k}" if k else ""), net, {**self.meta, "member": k})
        save_trained(run_dir, self.nets[0], self.meta, self.cfg, transform=self.tf.state())

    @classmethod
    def load(cls, run_dir: str | Path) -> ForecastModel:
        run_dir = Path(run_dir)
        meta, cfg = load_trained(run_dir, TASK, ForecastConfig)
        tf = Transform.from_state(cfg.data, meta["transform"])
        nets = []
        for k in range(cfg.model.ensemble):
            net = Forecaster(len(meta["target"]), len(meta["past"]), len(meta["future"]), cfg.data.horizon,
                             cfg.model)
            nets.append(load_weights(run_dir / (f"member{k}" if k else ""), net))
        return cls(cfg, tf, nets, meta)


def train(series: Series, cfg: ForecastConfig, run_dir: str | Path, quiet: bool = True,
          resume: bool = False) -> ForecastModel:
    """Train (an ensemble of) forecasters on every row of ``series`` and save them in ``run_dir``;
    the trainer's final metrics are in ``model.meta["train"]``."""
    from ..train import save_config

    check_config(cfg, series)
    d = cfg.data
    check_length(len(series) - sum(d.difference), d.lookback, d.horizon, _after_differencing("--csv", d))
    run_dir = Path(run_dir)
    tf = Transform.fit(series, d)
    nets, results = [], []
    for k in range(cfg.model.ensemble):
        sub = run_dir / f"member{k}" if k else run_dir
        net, result = _fit_one(series, cfg, tf, sub, cfg.trainer.seed + k, quiet, resume)
        nets.append(net)
        results.append(result)
    meta = {"task": TASK, "target": series.target_names, "past": series.past_names, "future": series.future_names,
            "n_train": len(series), "train": {"train_loss": float(np.mean([r["train_loss"] for r in results])),
                                              "steps": int(sum(r["step"] for r in results)),
                                              "elapsed_s": round(sum(r["elapsed_s"] for r in results), 2)}}
    model = ForecastModel(cfg, tf, nets, meta)
    save_config(cfg, run_dir)
    model.save(run_dir)
    return model


# ---- baselines ---------------------------------------------------------------------------------
def naive(history: np.ndarray, horizon: int) -> np.ndarray:
    """Last value repeated: (T, C) -> (H, C)."""
    return np.repeat(history[-1:], horizon, axis=0)


def seasonal_naive(history: np.ndarray, horizon: int, season: int) -> np.ndarray:
    """The last full season repeated: :math:`\\hat y_{T+h} = y_{T+h-m\\lceil h/m \\rceil}`."""
    if len(history) < season:
        raise SeriesError(f"--season: {season} is longer than the history ({len(history)} rows)")
    idx = len(history) - season + (np.arange(horizon) % season)
    return history[idx]


def sarima(history: np.ndarray, horizon: int, season: int, log: bool = False,
           order: tuple[int, int, int] = (0, 1, 1), seasonal_order: tuple[int, int, int] = (0, 1, 1)) -> np.ndarray:
    """Seasonal ARIMA per target column with statsmodels (default: the Box-Jenkins airline model
    ARIMA(0,1,1)(0,1,1)_m); needs ``statsmodels`` (``rnnkit[datasets]``)."""
    import warnings

    try:
        from statsmodels.tsa.statespace.sarimax import SARIMAX
    except ImportError as e:
        raise SeriesError("--sarima needs statsmodels (pip install 'rnnkit[datasets]')") from e
    out = []
    for j in range(history.shape[1]):
        y = np.log(history[:, j]) if log else history[:, j]
        with warnings.catch_warnings():  # convergence chatter on short series is not an error here
            warnings.simplefilter("ignore")
            fit = SARIMAX(y, order=order, seasonal_order=(*seasonal_order, season) if season > 1 else (0, 0, 0, 0)
                          ).fit(disp=False)
            f = fit.forecast(horizon)
        out.append(np.exp(f) if log else f)
    return np.stack(out, 1)


# ---- backtest ----------------------------------------------------------------------------------
def backtest(series: Series, cfg: ForecastConfig, run_dir: str | Path, folds: int = 1, with_sarima: bool = False,
             quiet: bool = True) -> dict[str, Any]:
    """Expanding-window backtest: fold k trains on rows ``[0, T - (folds - k) H)`` and forecasts the next H.

    Returns metrics (sMAPE, MAPE, MASE, RMSE averaged over folds and target columns) of the model and of
    the naive, seasonal-naive (and SARIMA) baselines, plus every forecast for plotting.
    """
    check_config(cfg, series)
    if folds < 1:
        raise SeriesError(f"--folds: expected an int >= 1, got {folds}")
    d = cfg.data
    H, T = d.horizon, len(series)
    first = T - folds * H
    diff = f" - sum(difference) = {T} - {folds}*{H} - {sum(d.difference)}" if d.difference else \
        f" = {T} - {folds}*{H}"
    check_length(first - sum(d.difference), d.lookback, H,
                 f"--csv (first backtest fold{' after differencing' if d.difference else ''}, T - folds*H{diff})")
    run_dir = Path(run_dir)
    methods = ["model", "naive", "seasonal_naive"] + (["sarima"] if with_sarima else [])
    per: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    folds_out = []
    t0 = time.time()
    for k in range(folds):
        cut = first + k * H
        hist, fut = series.slice(0, cut), series.slice(cut, cut + H)
        model = train(hist, cfg, run_dir / f"fold{k}", quiet)
        pred = model.predict(hist, fut)
        fc = {"model": pred["point"], "naive": naive(hist.target, H),
              "seasonal_naive": seasonal_naive(hist.target, H, d.season)}
        if with_sarima:
            fc["sarima"] = sarima(hist.target, H, d.season, d.log)
        for m in methods:
            per[m].append({k2: float(np.mean([forecast_metrics(fut.target[:, j], fc[m][:, j], hist.target[:, j],
                                                               d.season)[k2] for j in range(fut.target.shape[1])]))
                           for k2 in ("smape", "mape", "mase", "rmse")})
        folds_out.append({"cut": cut, "actual": fut.target, "forecasts": fc, "lo": pred.get("lo"),
                          "hi": pred.get("hi"), "history": hist.target})
    metrics = {m: {k2: float(np.mean([f[k2] for f in per[m]])) for k2 in per[m][0]} for m in methods}
    metrics["folds"] = folds
    metrics["seconds"] = round(time.time() - t0, 1)
    plot_backtest(folds_out, series, run_dir / "backtest.png")
    return {"metrics": metrics, "folds": folds_out}


# ---- plots -------------------------------------------------------------------------------------
def plot_forecast(history: Series, pred: dict[str, np.ndarray], path: Path, actual: np.ndarray | None = None,
                  interval: float = 0.8) -> Path:
    """History, forecast and interval (first target column) as PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.5))
    T, H = len(history), len(pred["point"])
    ax.plot(np.arange(T), history.target[:, 0], color="k", lw=1, label="history")
    fx = np.arange(T, T + H)
    if actual is not None:
        ax.plot(fx, actual[:, 0], color="k", lw=1, ls="--", label="actual")
    ax.plot(fx, pred["point"][:, 0], color="C0", lw=1.5, label="forecast")
    if "lo" in pred:
        ax.fill_between(fx, pred["lo"][:, 0], pred["hi"][:, 0], color="C0", alpha=0.25,
                        label=f"{interval:.0%} interval")
    ax.set_title(history.target_names[0])
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def plot_backtest(folds: list[dict[str, Any]], series: Series, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(series.target[:, 0], color="k", lw=1, label="actual")
    for i, f in enumerate(folds):
        x = np.arange(f["cut"], f["cut"] + len(f["actual"]))
        for j, (name, fc) in enumerate(f["forecasts"].items()):
            ax.plot(x, fc[:, 0], color=f"C{j}", lw=1.2, label=name if i == 0 else None)
        if f["lo"] is not None:
            ax.fill_between(x, f["lo"][:, 0], f["hi"][:, 0], color="C0", alpha=0.2)
    ax.set_title(f"backtest: {series.target_names[0]}")
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def forecast_rows(model: ForecastModel, pred: dict[str, np.ndarray], future_time: np.ndarray | None
                  ) -> tuple[list[str], list[list[Any]]]:
    """CSV header and rows: one row per step with the point forecast and interval columns."""
    names = model.meta["target"]
    pct = round(model.cfg.data.interval * 100)
    header = ["step"] + (["time"] if future_time is not None else [])
    for n in names:
        header += [n] + ([f"{n}_lo{pct}", f"{n}_hi{pct}"] if "lo" in pred else [])
    rows = []
    for h in range(len(pred["point"])):
        row: list[Any] = [h + 1] + ([future_time[h]] if future_time is not None else [])
        for j in range(len(names)):
            row.append(float(pred["point"][h, j]))
            if "lo" in pred:
                row += [float(pred["lo"][h, j]), float(pred["hi"][h, j])]
        rows.append(row)
    return header, rows


def split_future_rows(series: Series) -> tuple[Series, Series | None]:
    """Split a file into history (rows up to the last observed target) and trailing rows whose target is
    empty (future covariates for the horizon)."""
    ok = ~np.isnan(series.target).any(1)
    if ok.all():
        return series, None
    last = int(np.nonzero(ok)[0].max()) + 1 if ok.any() else 0
    if not ok[:last].all():
        raise SeriesError("--csv: missing target values before the last observed one; use --fill")
    return series.slice(0, last), series.slice(last, len(series))

