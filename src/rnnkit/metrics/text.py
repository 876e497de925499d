"""Error rates of decoded strings against references (from ``jiwer``), and sequence accuracy.

CER and WER are edit distances (substitutions + deletions + insertions) over characters and over words,
summed over the set and divided by the references' total length; sequence accuracy is the fraction of
strings decoded exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import UserError


def text_metrics(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """``cer``, ``wer`` and ``seq_accuracy`` of ``hypotheses`` against non-empty ``references``."""
    try:
        import jiwer
    except ImportError as e:
        raise UserError("character / word error rates need jiwer (pip install 'rnnkit[datasets]')") from e
    refs, hyps = list(references), list(hypotheses)
    return {"cer": float(jiwer.cer(refs, hyps)), "wer": float(jiwer.wer(refs, hyps)),
            "seq_accuracy": sum(r == h for r, h in zip(refs, hyps)) / len(refs)}


__all__ = ["text_metrics"]
