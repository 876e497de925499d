"""The classifier's automatic model choice (``model.kind = "auto"``): the plain recurrent classifier or
LSTM-FCN, by cross-validation on the training set within a time budget.

:func:`choose_model` scores each candidate with stratified k-fold cross-validation on the training data
(every fold trained for the same number of steps with the task's optimizer settings; once the time
budget is spent, a candidate keeps the folds it has, at least one), and picks the best mean accuracy
(ties, common on small folds: the lower mean validation cross-entropy). The record lists every
candidate's fold accuracies, mean validation cross-entropy and the time taken.

:func:`final_steps` sizes the winner's training on the whole set when the trainer keeps its default budget:
``auto.final_steps`` (or the default epochs, if they give more steps), fewer when the cross-validation's
pace says they would take longer than ``auto.final_minutes``, never fewer than ``auto.steps``; the learning
rate follows a cosine decay to zero over them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.series import SeriesError
from .base import fit

CANDIDATES = ("recurrent", "lstm_fcn")


@dataclass(frozen=True)
class AutoClassifySettings:
    """The automatic choice (``[auto]``).

    Args:
        candidates: model kinds compared ("recurrent", "lstm_fcn").
        folds: cross-validation folds (at most the size of the smallest class, at least 2).
        steps: optimizer steps of each cross-validation fit (and the fewest of the final training).
        minutes: time budget of the cross-validation; folds not reached are skipped (the record says so).
        final_steps: optimizer steps of the winner's training on the whole set (cosine learning-rate decay),
            when ``[trainer]`` keeps its default budget (:func:`final_steps`).
        final_minutes: time cap of that training: fewer steps when the winner's cross-validation pace says
            ``final_steps`` would take longer (the resolved count is saved in the run's config).
        ensemble: networks of the winner trained on the whole set (seeds ``trainer.seed``, +1, ...), their
            class probabilities averaged (``model.ensemble`` in the saved config); with the default budget,
            only as many as fit in ``final_minutes`` (:func:`ensemble_size`).
    """

    candidates: tuple[str, ...] = CANDIDATES
    folds: int = 3
    steps: int = 300
    minutes: float = 5.0
    final_steps: int = 1500
    final_minutes: float = 10.0
    ensemble: int = 3

    def __post_init__(self) -> None:
        if self.ensemble < 1:
            raise SeriesError(f"auto.ensemble: expected an int >= 1, got {self.ensemble!r}")


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


@torch.no_grad()
def _scores(net: nn.Module, data: dict[str, Tensor], batch: int = 256) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``net`` on ``data``."""
    net.eval()
    logits = torch.cat([net(data["x"][i:i + batch], data["lengths"][i:i + batch])
                        for i in range(0, len(data["y"]), batch)])
    return float((logits.argmax(-1) == data["y"]).float().mean()), float(F.cross_entropy(logits, data["y"]))


def choose_model(build: Callable[[str], nn.Module], task: Any, data: dict[str, Tensor], trainer_cfg: Any,
                 s: AutoClassifySettings) -> dict[str, Any]:
    """Cross-validate ``build(kind)`` for every candidate kind on ``data`` (``x``, ``lengths``, ``y``).

    Returns:
        ``{"chosen": kind, "why": ..., "folds": k, "candidates": {kind: {"fold_accuracy", "mean", "loss",
        "seconds", "seconds_per_step"}}}``.
    """
    bad = [c for c in s.candidates if c not in CANDIDATES]
    if bad or not s.candidates:
        raise SeriesError(f"auto.candidates: expected a non-empty subset of {CANDIDATES}, got {list(s.candidates)}")
    y = data["y"].numpy()
    k = int(max(2, min(s.folds, np.bincount(y).min())))
    folds = folds_of(y, k, trainer_cfg.seed)
    tcfg = replace(trainer_cfg, steps=s.steps, epochs=None, minutes=None, eval_every=0, metric="loss",
                   early_stopping=0, checkpoint_every=0, tensorboard=False)
    record: dict[str, Any] = {"folds": len(folds), "budget_minutes": s.minutes, "candidates": {}}
    t0 = time.time()
    for kind in s.candidates:
        t1, accs, losses = time.time(), [], []
        for f, va in enumerate(folds):
            if accs and time.time() - t0 > 60 * s.minutes:
                record.setdefault("skipped_folds", {})[kind] = len(folds) - f
                break
            tr = np.setdiff1d(np.arange(len(y)), va)
            torch.manual_seed(trainer_cfg.seed + f)
            net = build(kind)
            fit(net, task, {n: v[tr] for n, v in data.items()}, replace(tcfg, seed=trainer_cfg.seed + f), None)
            acc, loss = _scores(net, {n: v[va] for n, v in data.items()})
            accs.append(acc)
            losses.append(loss)
        seconds = time.time() - t1
        record["candidates"][kind] = {"fold_accuracy": [round(a, 4) for a in accs],
                                      "mean": round(float(np.mean(accs)), 4),
                                      "loss": round(float(np.mean(losses)), 4), "seconds": round(seconds, 1),
                                      "seconds_per_step": seconds / (len(accs) * s.steps)}
    cand = record["candidates"]
    record["chosen"] = max(s.candidates, key=lambda c: (cand[c]["mean"], -cand[c]["loss"]))
    record["why"] = (f"highest mean {len(folds)}-fold cross-validated accuracy on the training set (ties: lowest "
                     "mean validation cross-entropy)")
    return record


def ensemble_size(s: AutoClassifySettings, steps: int, seconds_per_step: float) -> int:
    """Networks of ``steps`` each that fit in ``auto.final_minutes`` at ``seconds_per_step``: up to
    ``auto.ensemble``, at least one (a network is never trained shorter to make room for another)."""
    fit = int(60 * s.final_minutes // max(steps * seconds_per_step, 1e-9))
    return max(1, min(s.ensemble, fit))


def final_steps(s: AutoClassifySettings, epoch_steps: int, seconds_per_step: float) -> tuple[int, str]:
    """Optimizer steps of the winner's training on the whole set, and why.

    ``max(auto.final_steps, epoch_steps)`` (``epoch_steps``: what the default epochs give on this set),
    cut to what fits in ``auto.final_minutes`` at ``seconds_per_step`` (the winner's cross-validation pace),
    at least ``auto.steps`` (one cross-validation fit).
    """
    for key in ("final_steps", "final_minutes"):
        v = getattr(s, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise SeriesError(f"auto.{key}: expected a number > 0, got {v!r}")
    want = max(int(s.final_steps), int(epoch_steps))
    fit_in = int(60 * s.final_minutes / max(seconds_per_step, 1e-9))
    n = max(min(want, fit_in), int(s.steps))
    if n == want:
        return n, f"{want} steps (max of auto.final_steps and the default epochs)"
    if n == fit_in:
        return n, (f"{n} of {want} steps fit in auto.final_minutes = {s.final_minutes:g} at "
                   f"{seconds_per_step:.3g} s/step (cross-validation pace)")
    return n, f"auto.steps = {n}: {want} steps would take longer than auto.final_minutes = {s.final_minutes:g}"
