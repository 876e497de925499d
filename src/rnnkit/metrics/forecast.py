"""Point-forecast errors (fractions, not percentages).

.. math::
    \\text{sMAPE} = \\frac{1}{n}\\sum \\frac{2|\\hat y - y|}{|\\hat y| + |y|},\\quad
    \\text{MAPE} = \\frac{1}{n}\\sum \\frac{|\\hat y - y|}{|y|},\\quad
    \\text{MASE} = \\frac{\\frac{1}{n}\\sum|\\hat y - y|}{\\frac{1}{T-m}\\sum_{t>m}|y_t - y_{t-m}|}
"""

from __future__ import annotations

import numpy as np


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


__all__ = ["smape", "mape", "rmse", "mase", "forecast_metrics"]
