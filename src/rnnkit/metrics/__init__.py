"""Task metrics: forecast errors, classification scores, anomaly-detection scores, language-model scores,
error rates of decoded text, sequence-output scores (exact match, token error rate, BLEU, chrF)."""

from .anomaly import point_adjusted_prf, pointwise_prf, segments, ucr_hit
from .classification import classification_metrics, confusion_matrix
from .forecast import forecast_metrics, mape, mase, rmse, smape
from .lm import LN2, lm_metrics
from .sequence import sequence_metrics, translation_metrics
from .text import text_metrics

__all__ = ["smape", "mape", "rmse", "mase", "forecast_metrics", "confusion_matrix", "classification_metrics",
           "segments", "pointwise_prf", "point_adjusted_prf", "ucr_hit", "LN2", "lm_metrics", "text_metrics",
           "sequence_metrics", "translation_metrics"]
