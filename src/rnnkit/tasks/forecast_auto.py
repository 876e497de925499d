"""Automatic forecasting choices, made on a validation tail of the training series and recorded.

Given one or many series and a horizon H, :func:`auto_fit`:

1. takes the season length m from the user, or detects it (:func:`detect_season`: the highest
   significant local peak of the autocorrelation of the first differences, or of the level when that
   has no peak);
2. lists candidate pipelines: the transform (none, ``log`` for positive data, first difference ``d1``,
   seasonal difference ``dm``, and their combinations; :func:`transform_candidates`) times the input
   window L (m and 2m for seasonal data, 4 and 8 otherwise, cut so that the shortest usable training
   part still gives windows; :func:`lookback_candidates`);
3. fits each candidate on every series minus its last V = H rows and scores the forecast of those rows
   (mean MASE over series, lag m, ties broken by sMAPE), every 50 training steps, keeping the best score
   and its step count (early stopping);
4. refits the three best candidates on the whole series, each for its best step count, and returns them
   with the table of candidates and their validation scores: the forecast is the mean of the three
   (a combination of the best pipelines is a safer bet than the single best, whose lead on one short
   validation tail is often noise; ``combine = "seeds"`` trains the best one three times instead).

The model is one network for all series (a global model, DeepAR-style without the likelihood): a
one-step recursive LSTM trained with teacher forcing on windows of every series, each series in its
own scaled units (its own :class:`~rnnkit.tasks.forecast.Transform`: the transform above, then a
standard scaler fit on that series); windows are measured from their last value (``window_norm``
``last``) unless the transform takes a first difference. Forecasts are rolled out H steps and mapped
back to each series' units.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.panel import check_horizon
from ..data.series import Series, SeriesError
from ..metrics import mase, smape
from ..train import OptimConfig, TrainerConfig
from . import forecast as F
from .base import META_FILE, fit, load_meta, load_weights, save_model

TASK = F.TASK

#: rows the longest series must keep before the validation tail: one input step and four one-step windows
MIN_HISTORY = 5


# ---- season length -----------------------------------------------------------------------------
def acf(x: np.ndarray, max_lag: int) -> np.ndarray:
    """Sample autocorrelation :math:`r_k = \\sum_t (x_t - \\bar x)(x_{t+k} - \\bar x) / \\sum_t (x_t - \\bar x)^2`
    for k = 0..max_lag."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    den = float(np.dot(x, x))
    if den <= 0:
        return np.concatenate([[1.0], np.zeros(max_lag)])
    return np.array([1.0] + [float(np.dot(x[:-k], x[k:])) / den for k in range(1, max_lag + 1)])


def detect_season(y: np.ndarray, max_season: int | None = None) -> tuple[int, dict[str, Any]]:
    """The season length of a series: the first local ACF peak (lag >= 2) that exceeds both the 95%
    white-noise band :math:`1.96/\\sqrt{n}` and 0.3, searched up to n/3 (two seasons fit with room to spare).
    The first peak, not the highest: multiples of the season peak too, often higher on short series.

    The ACF is taken of the first differences (a trend would otherwise hide the seasonal peak), and of the
    level when the differences show none. Returns (1, ...) when no lag qualifies. The second value
    records the evidence: the series used, the peak and the threshold.
    """
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    top = min(n // 3, max_season or n)
    info: dict[str, Any] = {"method": "acf", "max_lag": int(top)}
    if top < 2:
        return 1, {**info, "reason": f"series too short ({n} rows) to hold two seasons"}
    thr = 0.3
    for name, x in (("first differences", np.diff(y)), ("level", y)):
        r = np.append(acf(x, top), -np.inf)  # a peak at the last lag counts when it rises into it
        thr = max(1.96 / np.sqrt(len(x)), 0.3)
        peaks = [k for k in range(2, top + 1) if r[k] > r[k - 1] and r[k] >= r[k + 1] and r[k] > thr]
        if peaks:
            k = peaks[0]
            return int(k), {**info, "of": name, "lag": int(k), "acf": round(float(r[k]), 4),
                            "threshold": round(float(thr), 4)}
    return 1, {**info, "reason": "no autocorrelation peak above the threshold", "threshold": round(float(thr), 4)}


# ---- candidates --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """One pipeline: ``log`` then differences at ``difference`` lags, input window ``lookback``."""

    log: bool
    difference: tuple[int, ...]
    lookback: int

    @property
    def transform(self) -> str:
        return transform_name(self.log, self.difference)


def transform_name(log: bool, difference: Sequence[int]) -> str:
    """``(True, (1, 12))`` -> ``"log+d1+d12"``; ``(False, ())`` -> ``"none"``."""
    parts = (["log"] if log else []) + [f"d{k}" for k in difference]
    return "+".join(parts) or "none"


def parse_transform(text: str) -> tuple[bool, tuple[int, ...]]:
    """``"log+d1+d12"`` -> (True, (1, 12)); ``"none"`` -> (False, ()); the inverse of :func:`transform_name`."""
    log, diffs = False, []
    for p in (t.strip().lower() for t in text.split("+")):
        if p == "log" and not log:
            log = True
        elif p.startswith("d") and p[1:].isdigit() and int(p[1:]) >= 1:
            diffs.append(int(p[1:]))
        elif p != "none" or text.strip().lower() != "none":
            raise SeriesError(f"--transform: expected 'auto', 'none' or parts like log, d1, d12 joined by '+' "
                              f"(e.g. log+d12), got {text!r}")
    return log, tuple(diffs)


def transform_candidates(positive: bool, season: int) -> list[tuple[bool, tuple[int, ...]]]:
    """none / log (positive data only) times no difference, d1, dm, d1+dm (m > 1 only)."""
    diffs: list[tuple[int, ...]] = [(), (1,)] + ([(season,), (1, season)] if season > 1 else [])
    return [(lg, d) for lg, d in itertools.product([False, True] if positive else [False], diffs)]


def lookback_candidates(n_fit: int, lost: int, season: int, min_windows: int = 4) -> list[int]:
    """Input windows for a training part of ``n_fit`` rows that loses ``lost`` rows to differencing: m and 2m
    (seasonal) or 4 and 8, each cut to leave ``min_windows`` one-step windows; [] when none fits."""
    room = n_fit - lost - min_windows  # a window of L inputs + 1 target, min_windows of them
    wanted = [season, 2 * season] if season > 1 else [4, 8]
    out = sorted({min(L, room) for L in wanted if min(L, room) >= 1})
    return out


# ---- the global model --------------------------------------------------------------------------
@dataclass(frozen=True)
class AutoSettings:
    """What the automatic forecaster does not choose (``[auto]`` once wired into a config).

    Args:
        cell, hidden: the recurrent network.
        steps, batch_size, lr: training budget and optimiser of every fit.
        eval_every, patience: a selection fit scores its validation forecast every ``eval_every`` steps and
            stops after ``patience`` scores without improvement; the final fit of a candidate trains for
            the number of steps of its best score.
        ensemble: networks averaged in the final model; the selection fits use one each.
        combine: what those networks are: "top", the ``ensemble`` best candidates (repeated with new seeds
            when there are fewer); "seeds", the best candidate with ``ensemble`` seeds.
        val_horizon: rows held out for the selection (None = the horizon).
        device: where the networks train ("cpu": networks this small run fastest there).
    """

    cell: str = "lstm"
    hidden: int = 32
    steps: int = 1000
    eval_every: int = 50
    patience: int = 6
    batch_size: int = 32
    lr: float = 5e-3
    ensemble: int = 3
    combine: str = "top"
    val_horizon: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.combine not in ("top", "seeds"):
            raise SeriesError(f"auto.combine: expected 'top' or 'seeds', got {self.combine!r}")
        if self.ensemble < 1:
            raise SeriesError(f"auto.ensemble: expected an int >= 1, got {self.ensemble}")


def _configs(c: Candidate, horizon: int, s: AutoSettings, seed: int) -> F.ForecastConfig:
    # windows are read relative to their last value (an untrained network then forecasts persistence of
    # the level, or of the seasonal change), except after a first difference: a persisting last change
    # integrates into a runaway trend, so there the offset is zero (the mean change)
    return F.ForecastConfig(
        model=F.ForecastModelConfig(cell=s.cell, hidden=s.hidden, decoder="recursive"),
        data=F.ForecastDataConfig(lookback=c.lookback, horizon=horizon, log=c.log, difference=c.difference,
                                  window_norm="none" if 1 in c.difference else "last", scaler="standard"),
        trainer=TrainerConfig(seed=seed, steps=s.steps, batch_size=s.batch_size, clip_norm=1.0, tensorboard=False,
                              log_every=10_000, optim=OptimConfig(name="adam", lr=s.lr), device=s.device))


class GlobalForecaster:
    """Networks shared by several series, each series with its own transform; the forecast is the mean of
    the members' forecasts (members may use different pipelines)."""

    def __init__(self, members: list[tuple[F.ForecastConfig, F.Forecaster]]) -> None:
        self.members = members

    @torch.no_grad()
    def predict(self, history: np.ndarray) -> np.ndarray:
        """The H values after ``history`` (T,) in its units (each member's transform is fit on it).

        In model space a forecast is kept within the history's range widened by that range on both sides,
        so that a recursive rollout that drifts cannot explode when integrated and exponentiated back."""
        series = Series(np.asarray(history, dtype=np.float64)[:, None], ["y"], np.zeros((len(history), 0)))
        out = []
        for cfg, net in self.members:
            tf = F.Transform.fit(series, cfg.data)
            x, xf, off = F._last_window(series, tf, None)
            z = net(x, xf)[0, :, :, 0].double().numpy() + off
            seen = tf.target(series.target)
            lo, hi = seen.min(0), seen.max(0)
            out.append(tf.inverse_target(np.clip(z, lo - (hi - lo), hi + (hi - lo)), series.target)[:, 0])
        return np.mean(out, 0)


def _training_windows(ys: Sequence[np.ndarray], cfg: F.ForecastConfig) -> dict[str, torch.Tensor]:
    """One-step windows (L inputs, 1 target) of every series long enough, each series in its own units."""
    d1 = replace(cfg.data, horizon=1)
    parts: dict[str, list[np.ndarray]] = {"x": [], "y": [], "xf": []}
    for y in ys:
        if len(y) - sum(d1.difference) < d1.lookback + 1:
            continue
        series = Series(np.asarray(y, dtype=np.float64)[:, None], ["y"], np.zeros((len(y), 0)))
        w = F.windows(series, F.Transform.fit(series, d1))
        for k in parts:
            parts[k].append(w[k])
    if not parts["x"]:
        raise SeriesError(f"--lookback: {cfg.data.lookback} leaves no training window in any series")
    return {k: torch.from_numpy(np.concatenate(v)) for k, v in parts.items()}


def fit_global(ys: Sequence[np.ndarray], cands: Sequence[Candidate], horizon: int, s: AutoSettings,
               seed: int = 0, steps: Sequence[int] | None = None,
               validation: tuple[Sequence[np.ndarray], int] | None = None) -> tuple[GlobalForecaster, list[dict]]:
    """Train one network per entry of ``cands`` (seeds seed, seed+1, ...) on the windows of all series;
    the forecast averages them.

    Args:
        steps: optimizer steps per network (default ``s.steps``).
        validation: (the values that follow each series of ``ys``, season): then every ``s.eval_every``
            steps the rollout is scored (mean MASE), training stops after ``s.patience`` evaluations
            without improvement, and each network keeps its best weights.

    Returns:
        The model, and per network the best validation MASE and the step it was reached at.
    """
    members, info = [], []
    for k, c in enumerate(cands):
        cfg = _configs(c, horizon, s, seed + k)
        tcfg = cfg.trainer if steps is None else replace(cfg.trainer, steps=max(1, int(steps[k])))
        data = _training_windows(ys, cfg)
        torch.manual_seed(seed + k)
        net = F.Forecaster(1, 0, 0, horizon, cfg.model)
        best: dict[str, Any] = {"mase": float("inf"), "step": tcfg.steps, "state": None}
        evaluate = None
        if validation is not None:
            tails, season = validation
            calls = [0]

            def evaluate(model: torch.nn.Module, cfg=cfg, tails=tails, season=season, best=best, calls=calls,
                         last=tcfg.steps):
                calls[0] += 1
                one = GlobalForecaster([(cfg, model)])
                sc = _score(tails, [one.predict(y) for y in ys], ys, season)
                # MASE is undefined where the in-sample naive forecast is exact (a constant series): sMAPE then
                v = sc["mase"] if np.isfinite(sc["mase"]) else sc["smape"]
                if np.isfinite(v) and v < best["mase"]:
                    best.update(mase=v, step=min(calls[0] * s.eval_every, last),
                                state={n: t.detach().clone() for n, t in model.state_dict().items()})
                return {"val_mase": v if np.isfinite(v) else 1e30}

            tcfg = replace(tcfg, eval_every=s.eval_every, metric="val_mase", metric_mode="min",
                           early_stopping=s.patience)
        fit(net, F.ForecastTask("point", cfg.model.quantiles), data, tcfg, None, evaluate=evaluate)
        if best["state"] is not None:
            net.load_state_dict(best["state"])
        members.append((cfg, net))
        info.append({"mase": best["mase"], "step": best["step"]})
    return GlobalForecaster(members), info


# ---- selection ---------------------------------------------------------------------------------
def _score(actual: Sequence[np.ndarray], pred: Sequence[np.ndarray], insample: Sequence[np.ndarray],
           season: int) -> dict[str, float]:
    m = [mase(a, p, h, season if len(h) > season else 1) for a, p, h in zip(actual, pred, insample)]
    m = [v for v in m if np.isfinite(v)]
    return {"mase": float(np.mean(m)) if m else float("nan"),
            "smape": float(np.mean([smape(a, p) for a, p in zip(actual, pred)]))}


def _checked(ys: Sequence[np.ndarray], horizon: int) -> list[np.ndarray]:
    """The series as float64 vectors: finite, and one of them long enough for ``horizon``."""
    ys = [np.asarray(y, dtype=np.float64).ravel() for y in ys]
    for i, y in enumerate(ys):
        if not np.isfinite(y).all():
            raise SeriesError(f"series {i}: has missing or infinite values; fill them first (--fill)")
    check_horizon([max(len(y) for y in ys)], horizon, MIN_HISTORY)
    return ys


def auto_fit(ys: Sequence[np.ndarray], horizon: int, settings: AutoSettings | None = None, *,
             season: int | None = None, transform: str | None = None, lookback: int | None = None,
             seed: int = 0, log_fn: Any = None) -> tuple[GlobalForecaster, dict[str, Any]]:
    """Choose season, transform and input window on a validation tail, then fit the winner on everything.

    Args:
        ys: the training series (each (T_i,)).
        horizon: H, the steps to forecast.
        season, transform, lookback: user choices that replace the automatic ones (None = choose).
        seed: the first seed.
        log_fn: called with a progress line per candidate (e.g. ``print``).

    Returns:
        (the fitted model, the record: season and its evidence, every candidate with its validation MASE /
        sMAPE, the chosen one, the validation length and the time spent).
    """
    s = settings or AutoSettings()
    ys = _checked(ys, horizon)
    V = s.val_horizon or horizon
    t0 = time.time()
    record: dict[str, Any] = {"horizon": horizon, "val_horizon": V, "series": len(ys)}
    if season is None:  # a panel shares one frequency: the most common detection among its series wins
        found = [detect_season(y[:-V]) for y in ys if len(y) - V >= 6] or [detect_season(max(ys, key=len))]
        values = [m for m, _ in found]
        season = max(sorted(set(values)), key=values.count)
        evidence = next(e for m, e in found if m == season)
        record["season"] = {"value": season, "source": "detected", **evidence}
        if len(found) > 1:
            record["season"]["votes"] = {str(m): values.count(m) for m in sorted(set(values))}
    else:
        if isinstance(season, bool) or not isinstance(season, int) or season < 1:
            raise SeriesError(f"--season: expected an int >= 1, got {season!r}")
        record["season"] = {"value": season, "source": "user"}
    fit_parts = [y[:-V] for y in ys if len(y) - V >= MIN_HISTORY]
    tails = [y[-V:] for y in ys if len(y) - V >= MIN_HISTORY]
    positive = all((y > 0).all() for y in ys)
    if transform is None or transform == "auto":
        transforms = transform_candidates(positive, season)
        record["transform_source"] = "validation"
    else:
        lg, diffs = parse_transform(transform)
        if lg and not positive:
            raise SeriesError(f"--transform {transform}: log needs every value > 0")
        transforms = [(lg, diffs)]
        record["transform_source"] = "user"
    n_fit_max = max(len(y) for y in fit_parts)
    n_fit_min = min(len(y) for y in fit_parts)
    cands = []
    for lg, diffs in transforms:
        lost = sum(diffs)
        if n_fit_min - lost < 1:  # nothing left to forecast from in the shortest series
            continue
        Ls = [lookback] if lookback else lookback_candidates(n_fit_max, lost, season)
        cands += [Candidate(lg, diffs, L) for L in Ls]
    if not cands:  # only a user transform can get here: "none" always fits MIN_HISTORY rows
        raise SeriesError(f"--transform {transform}: loses {sum(transforms[0][1])} rows to differencing, too many "
                          f"for {n_fit_min} training rows before the validation tail of {V}; use a shorter "
                          "horizon or a transform with fewer differences")
    table = []
    for c in cands:
        t1 = time.time()
        model, info = fit_global(fit_parts, [c], V, s, seed, validation=(tails, season))
        pred = [model.predict(h) for h in fit_parts]
        row = {"transform": c.transform, "lookback": c.lookback, **_score(tails, pred, fit_parts, season),
               "best_step": info[0]["step"], "seconds": round(time.time() - t1, 1)}
        table.append(row)
        if log_fn is not None:
            log_fn(f"candidate {c.transform:<14} L={c.lookback:<3} val MASE {row['mase']:.4f} sMAPE {row['smape']:.4f}")
    order = sorted(range(len(cands)), key=lambda i: (np.nan_to_num(table[i]["mase"], nan=np.inf), table[i]["smape"]))
    picks = [order[k % len(order)] if s.combine == "top" else order[0] for k in range(s.ensemble)]
    record["candidates"] = table
    record["chosen"] = {"season": season, "members": [member_name(cands[i], table[i]["best_step"]) for i in picks],
                        "val_mase": [table[i]["mase"] for i in picks],
                        "why": (f"the {len(set(picks))} lowest validation MASE of {len(cands)} candidates on the "
                                f"last {V} rows" if s.combine == "top" else
                                f"the lowest validation MASE of {len(cands)} candidates on the last {V} rows, "
                                f"{s.ensemble} seeds")}
    model, _ = fit_global(ys, [cands[i] for i in picks], horizon, s, seed, steps=[table[i]["best_step"] for i in picks])
    record["seconds"] = round(time.time() - t0, 1)
    return model, record


def member_name(c: Candidate, steps: int) -> str:
    """A member of the final model as written in ``pipelines``: ``TRANSFORM:LOOKBACK:STEPS``."""
    return f"{c.transform}:{c.lookback}:{steps}"


def parse_member(text: str) -> tuple[Candidate, int]:
    """``"log+d12:12:200"`` -> (Candidate(True, (12,), 12), 200); the inverse of :func:`member_name`."""
    parts = str(text).split(":")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts[1:]):
        raise SeriesError(f"pipelines: expected entries TRANSFORM:LOOKBACK:STEPS (e.g. 'log+d12:12:200'), got "
                          f"{text!r}")
    log, diffs = parse_transform(parts[0])
    return Candidate(log, diffs, int(parts[1])), int(parts[2])


# ---- runs: config, save / load -----------------------------------------------------------------
@dataclass(frozen=True)
class AutoForecastConfig:
    """``rnnkit forecast train`` in its automatic mode; saved resolved (the choices filled in) as
    ``config.toml``, so training again from that file repeats the chosen pipelines without the search.

    Args:
        horizon: steps to forecast.
        season: season length m (None = detect it).
        transform: "auto" (choose on the validation tail) or a pipeline such as ``log+d12``.
        lookback: input window L (None = choose).
        seed: first seed of the networks.
        pipelines: the members of the final model, ``TRANSFORM:LOOKBACK:STEPS`` each (e.g.
            ``log+d12:12:200``); given, they are trained without a search (() = search).
        auto: what the automatic mode does not choose (:class:`AutoSettings`).
    """

    horizon: int = 12
    season: int | None = None
    transform: str = "auto"
    lookback: int | None = None
    seed: int = 0
    pipelines: tuple[str, ...] = ()
    auto: AutoSettings = field(default_factory=AutoSettings)


class AutoForecastModel:
    """A fitted automatic forecaster with the config that rebuilds it and the record of its choices."""

    def __init__(self, cfg: AutoForecastConfig, model: GlobalForecaster, record: dict[str, Any]) -> None:
        self.cfg, self.model, self.record = cfg, model, record

    def predict(self, history: np.ndarray) -> np.ndarray:
        return self.model.predict(history)

    def save(self, run_dir: str | Path, extra_meta: dict[str, Any] | None = None) -> None:
        from ..train import config_to_dict, save_config

        run_dir = Path(run_dir)
        for k, (cfg, net) in enumerate(self.model.members):
            save_model(run_dir / f"member{k}", net, {"task": TASK, "config": config_to_dict(cfg)})
        meta = {"task": TASK, "mode": "auto", "members": len(self.model.members),
                "config": config_to_dict(self.cfg), "choices": self.record, **(extra_meta or {})}
        (run_dir / META_FILE).write_text(json.dumps(meta, indent=1, default=float))
        save_config(self.cfg, run_dir)

    @classmethod
    def load(cls, run_dir: str | Path) -> AutoForecastModel:
        from ..train import config_from_dict

        run_dir = Path(run_dir)
        meta = load_meta(run_dir, TASK)
        members = []
        for k in range(meta["members"]):
            sub = load_meta(run_dir / f"member{k}", TASK)
            cfg = config_from_dict(F.ForecastConfig, sub["config"])
            members.append((cfg, load_weights(run_dir / f"member{k}", F.Forecaster(1, 0, 0, cfg.data.horizon,
                                                                                   cfg.model))))
        return cls(config_from_dict(AutoForecastConfig, meta["config"]), GlobalForecaster(members), meta["choices"])


def train_auto(ys: Sequence[np.ndarray], cfg: AutoForecastConfig, run_dir: str | Path | None = None,
               log_fn: Any = None) -> AutoForecastModel:
    """:func:`auto_fit` with the choices of ``cfg`` (or, when ``cfg.pipelines`` names them, those members
    trained without a search); returns the model with ``cfg`` resolved (season and pipelines filled in)
    and saves it in ``run_dir`` when given."""
    if cfg.pipelines:
        members = [parse_member(p) for p in cfg.pipelines]
        ys = _checked(ys, cfg.horizon)
        t0 = time.time()
        model, _ = fit_global(ys, [c for c, _ in members], cfg.horizon, cfg.auto, cfg.seed,
                              steps=[n for _, n in members])
        record = {"horizon": cfg.horizon, "series": len(ys), "season": {"value": cfg.season, "source": "config"},
                  "chosen": {"season": cfg.season, "members": list(cfg.pipelines), "why": "given (pipelines)"},
                  "seconds": round(time.time() - t0, 1)}
        out = AutoForecastModel(cfg, model, record)
    else:
        model, record = auto_fit(ys, cfg.horizon, cfg.auto, season=cfg.season, transform=cfg.transform,
                                 lookback=cfg.lookback, seed=cfg.seed, log_fn=log_fn)
        ch = record["chosen"]
        out = AutoForecastModel(replace(cfg, season=ch["season"], pipelines=tuple(ch["members"])), model, record)
    if run_dir is not None:
        out.save(run_dir)
    return out
