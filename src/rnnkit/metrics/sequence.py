"""Sequence-output scores: exact match, token error rate (rapidfuzz edit distance), BLEU and chrF (sacrebleu).

.. math::
    \\text{TER} = \\frac{\\sum_i \\mathrm{lev}(r_i, h_i)}{\\sum_i |r_i|}, \\quad
    \\text{sequence error rate} = 1 - \\frac{|\\{i : h_i = r_i\\}|}{N}

with :math:`\\mathrm{lev}` the Levenshtein distance over tokens (substitutions, insertions, deletions). For
grapheme-to-phoneme conversion these are the phoneme error rate (PER) and the word error rate (WER).
"""

from __future__ import annotations

from collections.abc import Sequence


def sequence_metrics(refs: Sequence[Sequence[str]], hyps: Sequence[Sequence[str]]) -> dict[str, float]:
    """``exact_match``, ``sequence_error_rate`` and ``token_error_rate`` of token sequences."""
    from rapidfuzz.distance import Levenshtein

    if len(refs) != len(hyps) or not refs:
        raise ValueError(f"sequence_metrics: expected equally many references and hypotheses (>= 1), got "
                         f"{len(refs)} and {len(hyps)}")
    exact = sum(list(r) == list(h) for r, h in zip(refs, hyps)) / len(refs)
    edits = sum(Levenshtein.distance(list(r), list(h)) for r, h in zip(refs, hyps))
    n_ref = sum(len(r) for r in refs)
    return {"exact_match": exact, "sequence_error_rate": 1.0 - exact, "token_error_rate": edits / max(n_ref, 1)}


def translation_metrics(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
    """Corpus ``bleu`` and ``chrf`` (0-100) of detokenised strings, sacrebleu's default settings."""
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score,
            "chrf": sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score}


__all__ = ["sequence_metrics", "translation_metrics"]
