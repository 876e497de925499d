"""Classification scores from true and predicted class indices."""

from __future__ import annotations

from typing import Any

import numpy as np


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


__all__ = ["confusion_matrix", "classification_metrics"]
