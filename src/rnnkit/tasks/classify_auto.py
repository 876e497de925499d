"""The classifier's automatic model choice: the plain recurrent classifier or LSTM-FCN, by cross-validation
on the training set within a time budget.

:func:`auto_train` scores each candidate with stratified k-fold cross-validation on the training set
(each fold trained with the same step budget; when the time budget runs out, the folds done so far
count), picks the best mean accuracy (ties: the earlier candidate), and trains it on the whole training set.
The record lists every candidate's fold accuracies and the time they took.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.sequences import SequenceSet
from ..data.series import Scaler, SeriesError
from ..metrics import classification_metrics
from ..train import OptimConfig, TrainerConfig
from . import classify as C
from .base import fit
from .lstm_fcn import LSTMFCN, LSTMFCNConfig

CANDIDATES = ("recurrent", "lstm_fcn")


@dataclass(frozen=True)
class AutoClassifySettings:
    """Settings of the automatic classifier.

    Args:
        candidates: model families to compare ("recurrent", "lstm_fcn").
        folds: cross-validation folds on the training set (fewer when a class has fewer members).
        cv_steps: optimizer steps of each cross-validation fit (a ranking needs less training than the
            final model).
        steps: optimizer steps of the final fit on the whole training set.
        batch_size, lr: Adam settings shared by the candidates.
        minutes: time budget of the cross-validation (the final fit comes on top); folds not reached are
            skipped and the record says so.
        recurrent: the plain classifier's model settings; lstm_fcn: LSTM-FCN's.
    """

    candidates: tuple[str, ...] = CANDIDATES
    folds: int = 3
    cv_steps: int = 400
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    minutes: float = 5.0
    recurrent: C.ClassifyModelConfig = C.ClassifyModelConfig()
    lstm_fcn: LSTMFCNConfig = LSTMFCNConfig()


def build_net(kind: str, channels: int, n_classes: int, max_len: int, s: AutoClassifySettings) -> nn.Module:
    if kind == "recurrent":
        return C.SequenceClassifier(channels, n_classes, s.recurrent)
    if kind == "lstm_fcn":
        return LSTMFCN(channels, n_classes, s.lstm_fcn, max_len)
    raise SeriesError(f"--model: expected one of {CANDIDATES} or auto, got {kind!r}")


def _trainer(s: AutoClassifySettings, seed: int, steps: int) -> TrainerConfig:
    return TrainerConfig(seed=seed, steps=steps, batch_size=s.batch_size, clip_norm=1.0, tensorboard=False,
                         log_every=10_000, optim=OptimConfig(name="adam", lr=s.lr))


def train_net(net: nn.Module, data: dict[str, Tensor], s: AutoClassifySettings, seed: int, steps: int) -> nn.Module:
    torch.manual_seed(seed)
    fit(net, C.ClassifyTask(), data, _trainer(s, seed, steps), None)
    return net


@torch.no_grad()
def predict(net: nn.Module, x: Tensor, lengths: Tensor, batch: int = 256) -> np.ndarray:
    net.eval()
    return torch.cat([net(x[i:i + batch], lengths[i:i + batch]).argmax(-1) for i in range(0, len(x), batch)]).numpy()


def folds_of(y: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Stratified fold indices: each class's members dealt round-robin over k folds in a random order."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in range(k)]
    start = 0
    for c in np.unique(y):
        idx = rng.permutation(np.nonzero(y == c)[0])
        for j, i in enumerate(idx):
            out[(start + j) % k].append(int(i))
        start += len(idx)
    return [np.array(sorted(f), dtype=np.int64) for f in out if f]


class AutoClassifier:
    """The chosen network with its scaler, classes and the record of the choice."""

    def __init__(self, net: nn.Module, scaler: Scaler, classes: list[str], record: dict[str, Any]) -> None:
        self.net, self.scaler, self.classes, self.record = net, scaler, classes, record

    def evaluate(self, data: SequenceSet) -> dict[str, Any]:
        t = C.tensors(data, self.scaler, None)
        y = C.encode_labels(data.labels, self.classes, "--test")
        return classification_metrics(y, predict(self.net, t["x"], t["lengths"]), len(self.classes))


def auto_train(train_set: SequenceSet, settings: AutoClassifySettings | None = None, seed: int = 0,
               log_fn: Any = None) -> AutoClassifier:
    """Cross-validate the candidates on ``train_set``, then train the best on all of it."""
    s = settings or AutoClassifySettings()
    if train_set.labels is None:
        raise SeriesError("--train: the training set has no labels")
    classes = sorted({str(v) for v in train_set.labels}, key=C._label_key)
    if len(classes) < 2:
        raise SeriesError(f"--train: expected at least 2 classes, got {classes}")
    y = C.encode_labels(train_set.labels, classes, "--train")
    scaler = C.fit_scaler(train_set, "standard")
    data = {**C.tensors(train_set, scaler, None), "y": torch.from_numpy(y)}
    T, Cn, K = data["x"].shape[1], train_set.n_channels, len(classes)
    k = max(2, min(s.folds, int(np.bincount(y).min()) if np.bincount(y).min() >= 2 else 2))
    folds = folds_of(y, k, seed)
    record: dict[str, Any] = {"folds": len(folds), "budget_minutes": s.minutes, "candidates": {}}
    t0 = time.time()
    scores: dict[str, float] = {}
    for kind in s.candidates:
        accs = []
        for f, va in enumerate(folds):
            if time.time() - t0 > 60 * s.minutes and accs:
                break
            tr = np.setdiff1d(np.arange(len(y)), va)
            net = train_net(build_net(kind, Cn, K, T, s), {k2: v[tr] for k2, v in data.items()}, s, seed + f,
                            s.cv_steps)
            accs.append(float((predict(net, data["x"][va], data["lengths"][va]) == y[va]).mean()))
        scores[kind] = float(np.mean(accs))
        record["candidates"][kind] = {"fold_accuracy": [round(a, 4) for a in accs], "mean": round(scores[kind], 4),
                                      "seconds": round(time.time() - t0, 1)}
        if log_fn is not None:
            log_fn(f"{kind}: cross-validated accuracy {scores[kind]:.4f} over {len(accs)} fold(s)")
    best = max(s.candidates, key=lambda c: scores[c])
    record["chosen"] = best
    record["why"] = f"highest mean {len(folds)}-fold cross-validated accuracy on the training set"
    net = train_net(build_net(best, Cn, K, T, s), data, s, seed, s.steps)
    record["seconds"] = round(time.time() - t0, 1)
    return AutoClassifier(net, scaler, classes, record)



