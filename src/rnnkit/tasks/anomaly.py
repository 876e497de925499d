"""Anomaly detection in series: prediction-error and reconstruction-error detectors, static and dynamic
thresholds, streaming scoring.

Detectors (trained on normal behaviour only):

- ``prediction`` (Malhotra et al. 2015): a recurrent one-step predictor run statefully over the series;
  the error :math:`e_t = x_t - \\hat x_t` is modelled as Gaussian :math:`N(\\mu, \\Sigma)` fitted on held-out
  normal data and the raw score is the squared Mahalanobis distance
  :math:`(e_t-\\mu)^\\top \\Sigma^{-1} (e_t-\\mu)` (the negative log-likelihood up to constants).
- ``reconstruction`` (Malhotra et al. 2016, EncDec-AD): an LSTM encoder-decoder reconstructs windows of
  length W in reverse order (teacher-forced in training, fed its own outputs at inference); each point's
  error is averaged over the windows that cover it and scored like the prediction errors.

The score is the raw score smoothed by an exponentially weighted moving average (Hundman et al. 2018).
Thresholds: ``quantile`` (a quantile of the scores on held-out normal data) or ``dynamic`` (the
non-parametric threshold of Hundman et al. 2018 with pruning, see :func:`dynamic_threshold`).

Streaming: :class:`StreamScorer` scores new points of a prediction detector one chunk at a time, carrying
the recurrent state (and the pending prediction) between calls; :meth:`StreamScorer.save` stores it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.series import Scaler, SeriesError, sliding_windows
from ..metrics.anomaly import point_adjusted_prf, pointwise_prf, segments, ucr_hit
from ..train import TrainerConfig
from .base import fit, load_trained, load_weights, pyplot, sample_trainer, save_figure, save_trained
from .encoders import SequenceAutoencoder, SeriesModelOptions

TASK = "anomaly"
STREAM_FILE = "stream_state.safetensors"


@dataclass(frozen=True)
class AnomalyModelConfig(SeriesModelOptions):
    """Model settings (``[model]``).

    Args:
        detector: "prediction" (one-step prediction error) or "reconstruction" (encoder-decoder).
        cell, hidden, layers, dropout, ...: the recurrent layers (:class:`SeriesModelOptions`); the
            reconstruction detector builds its encoder and decoder alike.
        window: training chunk length (prediction) or window length W (reconstruction).
        stride: step between training windows (and between scored windows, reconstruction).
    """

    detector: Literal["prediction", "reconstruction"] = "prediction"
    hidden: int = 32
    window: int = 64
    stride: int = 8


@dataclass(frozen=True)
class AnomalyDataConfig:
    """Data and scoring settings (``[data]``).

    Args:
        scaler: scaling fit on the normal data.
        fill: missing-value policy.
        val_fraction: tail of the normal data held out to fit the error distribution and the static threshold.
        smoothing: EWMA span of the raw scores (1 = none).
        threshold: "quantile" or "dynamic".
        quantile: the static threshold's quantile of held-out normal scores.
        dynamic_window: points per window of the dynamic threshold (0 = the whole scored series).
        z_min, z_max: the range of z in epsilon = mu + z sigma searched by the dynamic threshold.
        prune: minimum relative drop p between consecutive anomalous maxima (Hundman et al.: 0.13).
        warmup: points at the start of a fresh (non-streaming) scoring that get score 0 while the state settles.
    """

    scaler: Literal["standard", "minmax", "robust", "none"] = "standard"
    fill: str | None = None
    val_fraction: float = 0.3
    smoothing: int = 16
    threshold: Literal["quantile", "dynamic"] = "dynamic"
    quantile: float = 0.999
    dynamic_window: int = 0
    z_min: float = 2.0
    z_max: float = 10.0
    prune: float = 0.13
    warmup: int = 16


@dataclass(frozen=True)
class AnomalyConfig:
    model: AnomalyModelConfig = field(default_factory=AnomalyModelConfig)
    data: AnomalyDataConfig = field(default_factory=AnomalyDataConfig)
    trainer: TrainerConfig = field(default_factory=lambda: sample_trainer(epochs=30, batch_size=32))


# ---- models ------------------------------------------------------------------------------------
class Predictor(nn.Module):
    """One-step predictor: (B, T, C) -> predictions of x_{t+1} (B, T, C) and the final state."""

    def __init__(self, channels: int, cfg: AnomalyModelConfig) -> None:
        super().__init__()
        self.encoder = cfg.build_encoder(channels)
        self.head = nn.Linear(cfg.hidden, channels)

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        out, state = self.encoder(x, state)
        return self.head(out), state


class PredictionTask:
    """MSE of one-step predictions over every position after a short burn-in."""

    def __init__(self, burn_in: int) -> None:
        self.burn_in = burn_in

    def loss(self, model: Predictor, batch: dict[str, Tensor]) -> Tensor:
        x = batch["x"]
        pred, _ = model(x[:, :-1])
        return F.mse_loss(pred[:, self.burn_in:], x[:, 1 + self.burn_in:])


class ReconstructionTask:
    def loss(self, model: SequenceAutoencoder, batch: dict[str, Tensor]) -> Tensor:
        return F.mse_loss(model(batch["x"], teacher_forcing=True), batch["x"])


# ---- scores and thresholds ---------------------------------------------------------------------
def ewma(x: np.ndarray, span: int) -> np.ndarray:
    """Exponentially weighted moving average with alpha = 2 / (span + 1) (span 1 = identity)."""
    if span <= 1:
        return np.asarray(x, float).copy()
    a = 2.0 / (span + 1)
    out = np.empty(len(x))
    acc = 0.0
    for i, v in enumerate(np.asarray(x, float)):
        acc = v if i == 0 else a * v + (1 - a) * acc
        out[i] = acc
    return out


def dynamic_threshold(scores: np.ndarray, z_min: float = 2.0, z_max: float = 10.0, prune: float = 0.13,
                      window: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Non-parametric dynamic threshold (Hundman et al. 2018) on smoothed scores.

    In each window: :math:`\\epsilon = \\mu + z\\sigma` with z in [z_min, z_max] maximising
    :math:`(\\Delta\\mu/\\mu + \\Delta\\sigma/\\sigma) / (|e_a| + |E_{seq}|^2)`, where Δ is the drop in mean
    and standard deviation when the points above ε are removed, e_a those points and E_seq their runs.
    Pruning: the runs' maxima sorted descending (plus the largest non-anomalous score) must each drop by
    at least ``prune`` to the next; runs after the last such drop are reclassified as normal.

    Returns:
        (flags (T,) bool, threshold (T,) the epsilon in force at each point).
    """
    s = np.asarray(scores, float)
    T = len(s)
    window = window or T
    flags, eps_all = np.zeros(T, bool), np.zeros(T)
    for a in range(0, T, window):
        e = s[a:a + window]
        mu, sd = e.mean(), e.std()
        best, eps = -np.inf, e.max() + 1.0
        if sd > 0:
            for z in np.arange(z_min, z_max + 1e-9, 0.5):
                cand = mu + z * sd
                below = e[e < cand]
                above = e > cand
                n_seq = len(segments(above))
                if not above.any() or len(below) == 0:
                    continue
                score = ((mu - below.mean()) / mu + (sd - below.std()) / sd) / (above.sum() + n_seq ** 2)
                if score > best:
                    best, eps = score, cand
        above = e > eps
        runs = segments(above)
        if runs:  # pruning
            maxima = np.array([e[i:j + 1].max() for i, j in runs])
            order = np.argsort(-maxima)
            rest = e[~above]
            seq = np.append(maxima[order], rest.max() if len(rest) else 0.0)
            drops = (seq[:-1] - seq[1:]) / np.where(seq[:-1] > 0, seq[:-1], 1)
            keep_n = int(np.nonzero(drops >= prune)[0].max()) + 1 if (drops >= prune).any() else 0
            keep = set(order[:keep_n].tolist())
            for k, (i, j) in enumerate(runs):
                if k not in keep:
                    above[i:j + 1] = False
        flags[a:a + window] = above
        eps_all[a:a + window] = eps
    return flags, eps_all


@dataclass
class ErrorModel:
    """Gaussian model of detector errors: mean (C,) and inverse covariance (C, C)."""

    mean: np.ndarray
    inv_cov: np.ndarray

    @classmethod
    def fit(cls, errors: np.ndarray) -> ErrorModel:
        e = np.asarray(errors, float).reshape(len(errors), -1)
        cov = np.atleast_2d(np.cov(e, rowvar=False)) + 1e-6 * np.eye(e.shape[1])
        return cls(e.mean(0), np.linalg.inv(cov))

    def score(self, errors: np.ndarray) -> np.ndarray:
        d = np.asarray(errors, float).reshape(len(errors), -1) - self.mean
        return np.einsum("tc,cd,td->t", d, self.inv_cov, d)

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "inv_cov": self.inv_cov.tolist()}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> ErrorModel:
        return cls(np.asarray(s["mean"], float), np.asarray(s["inv_cov"], float))


# ---- the detector ------------------------------------------------------------------------------
class Detector:
    """A trained detector: network, scaler, error model and threshold settings."""

    def __init__(self, cfg: AnomalyConfig, net: nn.Module, scaler: Scaler, errors: ErrorModel,
                 meta: dict[str, Any]) -> None:
        self.cfg, self.net, self.scaler, self.errors, self.meta = cfg, net, scaler, errors, meta

    # raw errors ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _errors(self, z: np.ndarray, state: Any = None, pending: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, Any, np.ndarray]:
        """Prediction errors of scaled values ``z`` (T, C) continuing from ``state`` / ``pending``.

        Returns (errors (T, C), valid (T,) bool, final state, prediction of the next point)."""
        x = torch.tensor(z[None], dtype=torch.float32)
        pred, state = self.net(x, state)
        pred = pred[0].double().numpy()  # pred[t] predicts z[t+1]
        prev = np.concatenate([pending[None] if pending is not None else np.zeros((1, z.shape[1])), pred[:-1]])
        valid = np.ones(len(z), bool)
        if pending is None:
            valid[0] = False
        return z - prev, valid, state, pred[-1]

    @torch.no_grad()
    def _recon_errors(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        W, s = self.cfg.model.window, self.cfg.model.stride
        if len(z) < W:
            raise SeriesError(f"--csv: {len(z)} rows, shorter than the reconstruction window {W}")
        starts = list(range(0, len(z) - W + 1, s))
        if starts[-1] != len(z) - W:
            starts.append(len(z) - W)  # cover the tail
        win = np.stack([z[a:a + W] for a in starts])
        rec = torch.cat([self.net(torch.tensor(win[i:i + 256], dtype=torch.float32))
                         for i in range(0, len(win), 256)]).double().numpy()
        err_sum, count = np.zeros_like(z), np.zeros(len(z))
        for a, e in zip(starts, np.abs(win - rec)):
            err_sum[a:a + W] += e
            count[a:a + W] += 1
        return err_sum / count[:, None], np.ones(len(z), bool)

    def raw_scores(self, values: np.ndarray) -> np.ndarray:
        """Mahalanobis scores (T,) of raw (T, C) values from a fresh state; the first ``warmup`` points get 0."""
        z = self.scaler.transform(values)
        if self.cfg.model.detector == "prediction":
            err, valid, _, _ = self._errors(z)
        else:
            err, valid = self._recon_errors(z)
        s = np.where(valid, self.errors.score(err), 0.0)
        s[: self.cfg.data.warmup] = 0.0
        return s

    def threshold(self, smoothed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(flags, threshold per point) with the configured method."""
        d = self.cfg.data
        if d.threshold == "quantile":
            thr = float(self.meta["static_threshold"])
            return smoothed > thr, np.full(len(smoothed), thr)
        return dynamic_threshold(smoothed, d.z_min, d.z_max, d.prune, d.dynamic_window)

    def score(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """``raw``, ``score`` (smoothed), ``flag`` and ``threshold`` for every point of (T, C) ``values``."""
        raw = self.raw_scores(values)
        sm = ewma(raw, self.cfg.data.smoothing)
        flags, thr = self.threshold(sm)
        return {"raw": raw, "score": sm, "flag": flags, "threshold": thr}

    def stream(self) -> StreamScorer:
        return StreamScorer(self)

    # files ---------------------------------------------------------------------------------------
    def save(self, run_dir: Path) -> None:
        save_trained(run_dir, self.net, self.meta, self.cfg, scaler=self.scaler.state(), errors=self.errors.state())

    @classmethod
    def load(cls, run_dir: str | Path) -> Detector:
        meta, cfg = load_trained(run_dir, TASK, AnomalyConfig)
        return cls.from_meta(meta, cfg, load_weights(run_dir, _network(meta["channels"], cfg.model)))

    @classmethod
    def from_meta(cls, meta: dict[str, Any], cfg: AnomalyConfig, net: Any) -> Detector:
        """A detector from its ``model.json`` entries and a network (or anything called like one, e.g. an
        exported graph's runner)."""
        return cls(cfg, net, Scaler.from_state(meta["scaler"]), ErrorModel.from_state(meta["errors"]), meta)


def _network(channels: int, cfg: AnomalyModelConfig) -> nn.Module:
    if cfg.detector == "prediction":
        return Predictor(channels, cfg)
    return SequenceAutoencoder(channels, cfg, start="state")


class StreamScorer:
    """Scores points as they arrive (prediction detector): the recurrent state, the pending prediction and
    the EWMA accumulator carry over between :meth:`update` calls and can be saved to / restored from disk.
    Chunked scoring gives the same scores as scoring the concatenation at once."""

    def __init__(self, det: Detector) -> None:
        if det.cfg.model.detector != "prediction":
            raise SeriesError("--stream: streaming needs a prediction detector (model.detector='prediction'); "
                              "the reconstruction detector scores whole windows")
        self.det = det
        self.state: Any = None
        self.pending: np.ndarray | None = None
        self.ewma: float | None = None
        self.seen = 0

    def update(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """Score new (n, C) raw values; ``flag`` uses the static threshold (quantile of normal scores)."""
        det = self.det
        z = det.scaler.transform(values)
        err, valid, self.state, self.pending = det._errors(z, self.state, self.pending)
        raw = np.where(valid, det.errors.score(err), 0.0)
        warm = max(0, det.cfg.data.warmup - self.seen)
        raw[:warm] = 0.0
        span = det.cfg.data.smoothing
        a = 1.0 if span <= 1 else 2.0 / (span + 1)
        sm = np.empty(len(raw))
        acc = self.ewma
        for i, v in enumerate(raw):
            acc = v if acc is None else a * v + (1 - a) * acc
            sm[i] = acc
        self.ewma = acc
        self.seen += len(values)
        thr = float(det.meta["static_threshold"])
        return {"raw": raw, "score": sm, "flag": sm > thr, "threshold": np.full(len(sm), thr)}

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        tensors: dict[str, Tensor] = {"seen": torch.tensor([self.seen])}
        if self.state is not None:
            parts = self.state if isinstance(self.state, tuple) else (self.state,)
            tensors.update({f"state{i}": p.contiguous() for i, p in enumerate(parts)})
            tensors["pending"] = torch.tensor(self.pending)
            tensors["ewma"] = torch.tensor([self.ewma], dtype=torch.float64)
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)
        return path

    def load(self, path: str | Path) -> StreamScorer:
        from safetensors.torch import load_file

        t = load_file(str(path))
        self.seen = int(t["seen"][0])
        if "state0" in t:
            parts = tuple(t[k] for k in sorted(k for k in t if k.startswith("state")))
            self.state = parts if len(parts) == 2 else parts[0]
            self.pending = t["pending"].numpy()
            self.ewma = float(t["ewma"][0])
        return self


# ---- training ----------------------------------------------------------------------------------
def train(values: np.ndarray, cfg: AnomalyConfig, run_dir: str | Path | None, *, resume: bool = False,
          quiet: bool = True) -> Detector:
    """Fit a detector on normal (T, C) ``values``: the network on the head, the error model and the static
    threshold on the held-out tail (``data.val_fraction``)."""
    m, d = cfg.model, cfg.data
    values = np.asarray(values, float).reshape(len(values), -1)
    if not 0 < d.val_fraction < 1:
        raise SeriesError(f"data.val_fraction: expected a fraction in (0, 1), got {d.val_fraction}")
    n_val = int(round(len(values) * d.val_fraction))
    n_fit = len(values) - n_val
    need = m.window + 1
    if n_fit < need or n_val < max(need, d.warmup + 2):
        raise SeriesError(f"--csv: {len(values)} normal rows are too few: the detector needs {need} rows for "
                          f"training windows and {max(need, d.warmup + 2)} held out (val_fraction "
                          f"{d.val_fraction}); use a longer series or a smaller --window")
    scaler = Scaler(d.scaler).fit(values[:n_fit], arg="--csv")
    z = scaler.transform(values).astype(np.float32)
    length = m.window + 1 if m.detector == "prediction" else m.window
    data = {"x": torch.from_numpy(sliding_windows(z[:n_fit], length, m.stride).copy())}
    torch.manual_seed(cfg.trainer.seed)
    net = _network(values.shape[1], m)
    task = PredictionTask(min(8, m.window // 4)) if m.detector == "prediction" else ReconstructionTask()
    result = fit(net, task, data, cfg.trainer, run_dir, full_config=cfg, resume=resume, quiet=quiet)
    meta = {"task": TASK, "channels": values.shape[1], "n_train": len(values),
            "train": {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}
    det = Detector(cfg, net, scaler, ErrorModel(np.zeros(values.shape[1]), np.eye(values.shape[1])), meta)
    # the error model from the held-out tail, scored in context (the state runs over the whole normal series)
    zz = scaler.transform(values)
    if m.detector == "prediction":
        err, _, _, _ = det._errors(zz)
    else:
        err, _ = det._recon_errors(zz)
    det.errors = ErrorModel.fit(err[n_fit:])
    val_scores = ewma(np.where(np.arange(len(zz)) >= d.warmup, det.errors.score(err), 0.0), d.smoothing)[n_fit:]
    det.meta["static_threshold"] = float(np.quantile(val_scores, d.quantile))
    if run_dir is not None:
        det.save(Path(run_dir))
    return det


# ---- evaluation and output ---------------------------------------------------------------------
def evaluate(scores: dict[str, np.ndarray], labels: np.ndarray, margin: int = 100) -> dict[str, Any]:
    """Point-wise and point-adjusted P/R/F1 of the flags, and the UCR rule on the smoothed score."""
    y = np.asarray(labels) > 0
    out: dict[str, Any] = {}
    out.update({f"point_{k}": v for k, v in pointwise_prf(y, scores["flag"]).items()})
    out.update({f"adjusted_{k}": v for k, v in point_adjusted_prf(y, scores["flag"]).items()})
    if y.any():
        out.update(ucr_hit(scores["score"], y, margin))
    return out


def intervals(scores: dict[str, np.ndarray]) -> list[tuple[int, int, float]]:
    """Flagged intervals (start, end inclusive, max score)."""
    return [(i, j, float(scores["score"][i:j + 1].max())) for i, j in segments(scores["flag"])]


def plot_scores(values: np.ndarray, scores: dict[str, np.ndarray], path: Path, labels: np.ndarray | None = None,
                title: str = "anomaly scores") -> Path:
    """Series (top) and smoothed score with threshold (bottom); flagged intervals red, labels green."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 5), sharex=True)
    t = np.arange(len(values))
    a1.plot(t, values[:, 0], color="k", lw=0.6)
    a2.plot(t, scores["score"], color="C0", lw=0.8, label="score")
    a2.plot(t, scores["threshold"], color="C3", lw=0.8, ls="--", label="threshold")
    for ax in (a1, a2):
        for i, j in segments(scores["flag"]):
            ax.axvspan(i, j + 1, color="red", alpha=0.25, lw=0)
        if labels is not None:
            for i, j in segments(np.asarray(labels) > 0):
                ax.axvspan(i, j + 1, color="green", alpha=0.25, lw=0)
    a2.set_yscale("symlog")
    a2.legend(loc="upper right", fontsize=8)
    a1.set_title(title)
    return save_figure(fig, path)
