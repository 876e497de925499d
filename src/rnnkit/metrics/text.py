"""Error rates of decoded strings against references, and sequence accuracy.

CER and WER are the token error rate of :func:`~rnnkit.metrics.sequence.sequence_metrics` (Levenshtein
distance from ``rapidfuzz``, summed over the set and divided by the references' total length) over characters
and over whitespace-separated words; sequence accuracy is the fraction of strings decoded exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from .sequence import sequence_metrics


def text_metrics(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """``cer``, ``wer`` and ``seq_accuracy`` of ``hypotheses`` against non-empty ``references``."""
    refs, hyps = list(references), list(hypotheses)
    chars = sequence_metrics([list(r) for r in refs], [list(h) for h in hyps])
    words = sequence_metrics([r.split() for r in refs], [h.split() for h in hyps])
    return {"cer": chars["token_error_rate"], "wer": words["token_error_rate"],
            "seq_accuracy": chars["exact_match"]}


__all__ = ["text_metrics"]
