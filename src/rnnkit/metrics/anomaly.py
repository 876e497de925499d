"""Anomaly-detection scores: point-wise and point-adjusted precision / recall / F1, the UCR hit rule."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data.series import SeriesError


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


__all__ = ["segments", "pointwise_prf", "point_adjusted_prf", "ucr_hit"]
