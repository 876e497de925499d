r"""Connectionist temporal classification (Graves et al. 2006): decoders and a character n-gram model.

A CTC output is a (T, K+1) matrix of per-step log probabilities over K symbols (indices 1..K) and the
blank (index 0). A path :math:`\pi` (one index per step) maps to a labelling :math:`\mathcal B(\pi)` by
merging repeats and then removing blanks; the probability of a labelling sums over its paths,

.. math:: p(l \mid x) = \sum_{\pi:\, \mathcal B(\pi) = l} \prod_t y^t_{\pi_t}.

* :func:`greedy_decode` — best path: :math:`\mathcal B(\arg\max_\pi p(\pi|x))`, the per-step argmax.
* :func:`prefix_beam_search` — keeps the ``beam`` most probable prefixes, each with its probability of
  ending in a blank and in a symbol, optionally adding :math:`\alpha \log p_{LM}(c \mid \text{prefix}) +
  \beta` per emitted symbol from a :class:`CharNGram`. The final candidates and the greedy labelling are
  rescored exactly (:func:`labelling_scores`), so the result never scores worse than best path.
* :func:`min_steps` — the fewest steps a labelling needs: one per symbol plus a blank between repeats.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

BLANK = 0
NEG_INF = -math.inf


def min_steps(label: Sequence[int]) -> int:
    """Steps CTC needs to emit ``label``: its length plus one blank between each pair of equal neighbours."""
    return len(label) + sum(1 for a, b in zip(label[:-1], label[1:]) if a == b)


def greedy_decode(log_probs: np.ndarray) -> tuple[int, ...]:
    """Best path of one (T, K+1) matrix: argmax per step, repeats merged, blanks removed."""
    best = np.asarray(log_probs).argmax(-1)
    out, prev = [], BLANK
    for k in best.tolist():
        if k != prev and k != BLANK:
            out.append(k)
        prev = k
    return tuple(out)


def labelling_scores(log_probs: np.ndarray, labellings: Sequence[Sequence[int]]) -> np.ndarray:
    """Exact :math:`\\log p(l|x)` of each labelling under one (T, K+1) matrix (the CTC forward algorithm);
    ``-inf`` for a labelling that needs more than T steps."""
    T = len(log_probs)
    n = len(labellings)
    lp = torch.as_tensor(np.asarray(log_probs), dtype=torch.float64).unsqueeze(1).expand(T, n, -1)
    S = max(1, max(len(s) for s in labellings))
    targets = torch.zeros(n, S, dtype=torch.long)
    for i, s in enumerate(labellings):
        targets[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
    nll = F.ctc_loss(lp, targets, torch.full((n,), T, dtype=torch.long),
                     torch.tensor([len(s) for s in labellings], dtype=torch.long), blank=BLANK, reduction="none",
                     zero_infinity=False)
    return (-nll).numpy()


class CharNGram:
    r"""A character n-gram model of label strings with Witten-Bell interpolation.

    .. math:: p(c \mid h) = \frac{N(h c) + U(h)\, p(c \mid h')}{N(h) + U(h)}

    where :math:`h'` drops the oldest symbol of the history :math:`h`, :math:`U(h)` counts the distinct
    symbols seen after :math:`h`, and the empty history backs off to the uniform distribution over the
    K symbols plus the end of a string. Symbols are 1..K; index 0 is the end of a string.

    Args:
        labels: the training labels as symbol-index sequences.
        n_symbols: K.
        order: n (1 = unigram).
    """

    END = 0
    _START = -1

    def __init__(self, labels: Sequence[Sequence[int]], n_symbols: int, order: int) -> None:
        if order < 1:
            raise ValueError(f"lm_order: expected an int >= 1, got {order}")
        self.order, self.n_symbols = order, n_symbols
        self.counts: dict[tuple[int, ...], dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for lab in labels:
            seq = [self._START] * (order - 1) + list(lab) + [self.END]
            for i in range(order - 1, len(seq)):
                for k in range(order):  # histories of length 0..n-1
                    self.counts[tuple(seq[i - k:i])][seq[i]] += 1
        self.totals = {h: sum(c.values()) for h, c in self.counts.items()}
        self.log_prob = lru_cache(maxsize=1 << 18)(self._log_prob)

    def _prob(self, history: tuple[int, ...], c: int) -> float:
        lower = 1.0 / (self.n_symbols + 1) if not history else self._prob(history[1:], c)
        counts = self.counts.get(history)
        if not counts:
            return lower
        u = len(counts)
        return (counts.get(c, 0) + u * lower) / (self.totals[history] + u)

    def _log_prob(self, prefix: tuple[int, ...], c: int) -> float:
        """:math:`\\log p(c \\mid \\text{prefix})` for a symbol or the end (``c = 0``)."""
        h = (tuple([self._START] * (self.order - 1)) + prefix)[len(prefix):] if self.order > 1 else ()
        return math.log(self._prob(h, c))

    def score(self, labelling: Sequence[int]) -> float:
        """:math:`\\log p` of a whole string, its end included."""
        lab = tuple(labelling)
        return sum(self.log_prob(lab[:i], c) for i, c in enumerate(lab)) + self.log_prob(lab, self.END)


def prefix_beam_search(log_probs: np.ndarray, beam: int = 16, lm: CharNGram | None = None, lm_weight: float = 0.5,
                       length_bonus: float = 0.0, prune: float = -12.0) -> tuple[int, ...]:
    """The most probable labelling found by CTC prefix beam search of one (T, K+1) matrix.

    Args:
        beam: prefixes kept after each step.
        lm, lm_weight, length_bonus: with ``lm``, every emitted symbol adds ``lm_weight * log p_LM(c|prefix)
            + length_bonus`` and a finished string ``lm_weight * log p_LM(end|string)``.
        prune: symbols with a step log probability below this are not tried as extensions at that step.

    The returned labelling maximises ``log p(l|x) + lm_weight * log p_LM(l) + length_bonus * |l|`` among
    the final beam and the best-path labelling (scored exactly), so it never scores below best path.
    """
    lp = np.asarray(log_probs, dtype=np.float64)
    T, K1 = lp.shape
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, NEG_INF)}  # prefix -> (log p_blank, log p_sym)

    def ext(prefix: tuple[int, ...], c: int) -> float:
        return 0.0 if lm is None else lm_weight * lm.log_prob(prefix, c) + length_bonus

    for t in range(T):
        row = lp[t]
        cands = [c for c in range(1, K1) if row[c] >= prune] or [int(row[1:].argmax()) + 1]
        nxt: dict[tuple[int, ...], list[float]] = defaultdict(lambda: [NEG_INF, NEG_INF])
        for prefix, (pb, pnb) in beams.items():
            total = np.logaddexp(pb, pnb)
            cell = nxt[prefix]
            cell[0] = np.logaddexp(cell[0], total + row[BLANK])
            last = prefix[-1] if prefix else None
            if last is not None:
                cell[1] = np.logaddexp(cell[1], pnb + row[last])  # a repeat merges into the same symbol
            for c in cands:
                grown = nxt[prefix + (c,)]
                via = pb if c == last else total  # a repeated symbol needs a blank in between
                grown[1] = np.logaddexp(grown[1], via + row[c] + ext(prefix, c))
        ranked = sorted(nxt.items(), key=lambda kv: -np.logaddexp(*kv[1]))[:beam]
        beams = {p: (v[0], v[1]) for p, v in ranked}
    finals = list(beams) + [greedy_decode(lp)]
    finals = list(dict.fromkeys(finals))
    scores = labelling_scores(lp, finals)
    if lm is not None:
        scores = scores + np.array([lm_weight * lm.score(s) + length_bonus * len(s) for s in finals])
    return finals[int(np.argmax(scores))]


__all__ = ["BLANK", "min_steps", "greedy_decode", "labelling_scores", "CharNGram", "prefix_beam_search"]
