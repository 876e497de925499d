"""Shared parts of the time-series tasks: encoders and pooling, metrics, model files, plots.

Metrics follow the usual definitions (fractions, not percentages):

.. math::
    \\text{sMAPE} = \\frac{1}{n}\\sum \\frac{2|\\hat y - y|}{|\\hat y| + |y|},\\quad
    \\text{MAPE} = \\frac{1}{n}\\sum \\frac{|\\hat y - y|}{|y|},\\quad
    \\text{MASE} = \\frac{\\frac{1}{n}\\sum|\\hat y - y|}{\\frac{1}{T-m}\\sum_{t>m}|y_t - y_{t-m}|}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import build
from ..data.sequences import length_mask
from ..data.series import SeriesError

# ---- encoders and pooling ----------------------------------------------------------------------
POOLS = ("last", "mean", "attention")


@dataclass(frozen=True)
class EncoderConfig:
    """The recurrent encoder shared by every time-series model.

    Args:
        cell: a name from ``rnnkit.cells.REGISTRY`` (``rnnkit cells`` lists them).
        hidden: hidden units per layer and direction.
        layers: stacked layers.
        dropout: dropout between layers.
        bidirectional: read each sequence both ways (not for streaming / recursive models).
    """

    cell: str = "lstm"
    hidden: int = 64
    layers: int = 1
    dropout: float = 0.0
    bidirectional: bool = False

    def build(self, input_size: int) -> nn.Module:
        """A batch-first :class:`rnnkit.Recurrent` stack."""
        return build(self.cell, input_size, self.hidden, num_layers=self.layers, dropout=self.dropout,
                     bidirectional=self.bidirectional, batch_first=True)

    @property
    def out_size(self) -> int:
        return self.hidden * (2 if self.bidirectional else 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def final_hidden(state: Tensor | tuple[Tensor, Tensor], directions: int) -> Tensor:
    """The last layer's final h of every direction, (B, D*H), from a torch.nn-layout state."""
    h = state[0] if isinstance(state, tuple) else state  # (L*D, B, H)
    return torch.cat(list(h[-directions:]), dim=-1)


class Pool(nn.Module):
    """Many-to-one pooling over valid steps only.

    ``last``: the final state at each sequence's last valid step (both directions if bidirectional);
    ``mean``: the mean of the outputs over valid steps; ``attention``: :math:`\\sum_t a_t o_t` with
    :math:`a = \\mathrm{softmax}_t(v^\\top \\tanh(W o_t))`, padded steps given zero weight.
    """

    def __init__(self, mode: str, size: int, directions: int) -> None:
        super().__init__()
        if mode not in POOLS:
            raise SeriesError(f"--pool: expected one of {POOLS}, got {mode!r}")
        self.mode, self.directions = mode, directions
        if mode == "attention":
            self.proj = nn.Linear(size, size)
            self.score = nn.Linear(size, 1, bias=False)

    def forward(self, out: Tensor, state: Any, lengths: Tensor) -> Tensor:
        """``out`` (B, T, D*H) padded outputs, ``state`` the final state, ``lengths`` (B,) -> (B, D*H)."""
        if self.mode == "last":
            return final_hidden(state, self.directions)
        mask = length_mask(lengths.to(out.device), out.shape[1]).unsqueeze(-1)  # (B, T, 1)
        if self.mode == "mean":
            return (out * mask).sum(1) / lengths.to(out.device, out.dtype).unsqueeze(-1)
        e = self.score(torch.tanh(self.proj(out))).masked_fill(~mask, float("-inf"))  # (B, T, 1)
        return (torch.softmax(e, dim=1) * out).sum(1)


# ---- model files -------------------------------------------------------------------------------
MODEL_FILE, META_FILE = "model.safetensors", "model.json"


def save_model(run_dir: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (weights) and ``model.json`` (everything needed to rebuild and use it)."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = run_dir / (MODEL_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(run_dir / MODEL_FILE)
    (run_dir / META_FILE).write_text(json.dumps(meta, indent=1))
    return run_dir / MODEL_FILE


def load_meta(run_dir: str | Path, task: str) -> dict[str, Any]:
    """Read ``model.json`` of a run directory, checking that it was written by ``task``."""
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        raise SeriesError(f"RUN_DIR: {str(run_dir)!r} has no {META_FILE}; expected the --out directory of "
                          f"`rnnkit {task} train`/`fit`")
    meta = json.loads(path.read_text())
    if meta.get("task") != task:
        raise SeriesError(f"RUN_DIR: {str(run_dir)!r} holds a {meta.get('task')!r} model, expected {task!r}")
    return meta


def load_weights(run_dir: str | Path, model: nn.Module) -> nn.Module:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(Path(run_dir) / MODEL_FILE)))
    return model.eval()


# ---- forecasting metrics -----------------------------------------------------------------------
def smape(y: np.ndarray, f: np.ndarray) -> float:
    """Symmetric MAPE as a fraction in [0, 2]; terms where both are 0 count as 0."""
    y, f = np.asarray(y, float), np.asarray(f, float)
    den = np.abs(y) + np.abs(f)
    return float(np.mean(np.where(den > 0, 2 * np.abs(f - y) / np.where(den > 0, den, 1), 0.0)))


def mape(y: np.ndarray, f: np.ndarray) -> float:
    """Mean absolute percentage error (fraction) over the non-zero actuals; NaN if every actual is 0."""
    y, f = np.asarray(y, float), np.asarray(f, float)
    nz = y != 0
    return float(np.mean(np.abs(f[nz] - y[nz]) / np.abs(y[nz]))) if nz.any() else float("nan")


def rmse(y: np.ndarray, f: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(f, float) - np.asarray(y, float)) ** 2)))


def mase(y: np.ndarray, f: np.ndarray, insample: np.ndarray, m: int = 1) -> float:
    """MAE scaled by the in-sample MAE of the seasonal-naive (lag ``m``) forecast; NaN if that is 0."""
    insample = np.asarray(insample, float)
    if len(insample) <= m:
        return float("nan")
    scale = np.mean(np.abs(insample[m:] - insample[:-m]))
    return float(np.mean(np.abs(np.asarray(f, float) - np.asarray(y, float))) / scale) if scale > 0 else float("nan")


def forecast_metrics(y: np.ndarray, f: np.ndarray, insample: np.ndarray, m: int = 1) -> dict[str, float]:
    return {"smape": smape(y, f), "mape": mape(y, f), "mase": mase(y, f, insample, m), "rmse": rmse(y, f)}


# ---- classification metrics --------------------------------------------------------------------
def confusion_matrix(y: np.ndarray, p: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, K) counts, rows = true class, columns = predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y, int), np.asarray(p, int)), 1)
    return cm


def classification_metrics(y: np.ndarray, p: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean recall over present classes), macro F1 and the confusion matrix."""
    cm = confusion_matrix(y, p, n_classes)
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(1), cm.sum(0)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp),
                   where=(precision + recall) > 0)
    return {"accuracy": float(tp.sum() / max(cm.sum(), 1)),
            "balanced_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
            "macro_f1": float(f1[present | (predicted > 0)].mean()) if cm.sum() else float("nan"),
            "confusion_matrix": cm.tolist()}


# ---- anomaly metrics ---------------------------------------------------------------------------
def segments(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True as (start, end) with ``end`` inclusive."""
    m = np.concatenate([[False], np.asarray(mask, bool), [False]])
    d = np.diff(m.astype(np.int8))
    starts, ends = np.nonzero(d == 1)[0], np.nonzero(d == -1)[0] - 1
    return list(zip(starts.tolist(), ends.tolist()))


def _prf(tp: float, fp: float, fn: float) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def pointwise_prf(labels: np.ndarray, flags: np.ndarray) -> dict[str, float]:
    """Precision / recall / F1 counting every point."""
    y, f = np.asarray(labels, bool), np.asarray(flags, bool)
    return _prf(float((y & f).sum()), float((~y & f).sum()), float((y & ~f).sum()))


def point_adjusted_prf(labels: np.ndarray, flags: np.ndarray) -> dict[str, float]:
    """Point-adjusted P/R/F1 (Xu et al. 2018): a labelled segment with any flagged point counts as
    fully detected; points outside segments are scored as usual."""
    y, f = np.asarray(labels, bool), np.asarray(flags, bool).copy()
    for s, e in segments(y):
        if f[s:e + 1].any():
            f[s:e + 1] = True
    return pointwise_prf(y, f)


def ucr_hit(scores: np.ndarray, labels: np.ndarray, margin: int = 100) -> dict[str, Any]:
    """The UCR anomaly archive rule: a hit when the top-scored point lies within ``margin`` points of
    the labelled region (its first to last anomalous point)."""
    idx = np.nonzero(np.asarray(labels, bool))[0]
    if len(idx) == 0:
        raise SeriesError("--labels: no point is labelled anomalous; the UCR rule needs one labelled region")
    scores = np.nan_to_num(np.asarray(scores, float), nan=-np.inf)
    top = int(np.argmax(scores))
    lo, hi = int(idx.min()), int(idx.max())
    return {"ucr_hit": bool(lo - margin <= top <= hi + margin), "top_index": top, "label_start": lo,
            "label_end": hi}


# ---- small helpers -----------------------------------------------------------------------------
def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise SeriesError(f"--device: {device!r} is not a device name (expected cpu, cuda, cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SeriesError(f"--device: {device!r} requested but CUDA is not available")
    return dev


def parse_floats(text: str | Sequence[float] | None, arg: str, kind: type = float) -> tuple[Any, ...]:
    """``"0.1,0.5,0.9"`` -> (0.1, 0.5, 0.9) (``kind=int``: integers) with a clear error naming ``arg``."""
    if text is None:
        return ()
    if not isinstance(text, str):
        return tuple(kind(v) for v in text)
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        what = "integers" if kind is int else "numbers"
        raise SeriesError(f"{arg}: expected comma-separated {what}, got {text!r}") from e


# ---- training through the Trainer --------------------------------------------------------------
def fit(model: nn.Module, task: Any, data: dict[str, Tensor], trainer_cfg: Any, run_dir: str | Path | None, *,
        evaluate: Any = None, full_config: Any = None, resume: bool = False, quiet: bool = True) -> dict[str, Any]:
    """Train ``model`` with :class:`rnnkit.train.Trainer` on sample data, then restore the weights of the
    best evaluation (when ``evaluate`` is given) and return the trainer's final metrics; the model ends on
    the CPU in eval mode."""
    from ..train import Trainer
    from ..train.checkpoint import list_checkpoints, load_checkpoint

    trainer = Trainer(model, task, data, trainer_cfg, run_dir, evaluate=evaluate, full_config=full_config,
                      resume=resume, quiet=quiet)
    result = trainer.fit()
    if evaluate is not None and trainer.best_step is not None and trainer.best_step != trainer.step \
            and trainer.checkpoint_dir is not None:
        found = dict(list_checkpoints(trainer.checkpoint_dir)).get(trainer.best_step)
        if found is not None:
            ck = load_checkpoint(found)
            model.load_state_dict({k[len("model."):]: v for k, v in ck.tensors.items() if k.startswith("model.")})
            result["restored_step"] = trainer.best_step
    model.cpu().eval()
    return result
