r"""Decoding: turning a model's next-symbol logits into symbols.

The pieces work on logits and know nothing of the model: :func:`filter_logits` (temperature, top-k,
nucleus top-p), :func:`sample_next` (one draw, greedy at temperature 0), :func:`check_sampling` (the
settings' checks, as one-line errors) and :func:`sampling_generator` (a seeded or fresh generator).
:func:`generate` drives them with any :class:`StepModel`: ``forward`` reads the prime once, then every new
symbol is one ``step``, so a symbol costs one step, never a re-run of the prefix, and each is handed to
``on_token`` as soon as it is drawn (streaming).

Conditional decoders (a sequence-to-sequence model, :class:`CondStepModel`) are searched with
:func:`greedy_search` and :func:`beam_search`: batched, with per-sequence length limits, never producing
the ``forbid`` symbols. Beam search keeps finished hypotheses in the beam (extended by the end symbol at
no cost) and ranks the final ones by :math:`\log p / \mathrm{lp}(n)`,
:math:`\mathrm{lp}(n) = ((5 + n) / 6)^\alpha` (Wu et al. 2016) with n the tokens including the end
symbol; with one beam it is greedy search, exactly.

CTC (connectionist temporal classification) decoding of a (T, K+1) matrix of per-step log probabilities
(blank = index 0): :func:`greedy_ctc` (best path: the per-step argmax, repeats merged, blanks removed);
:func:`ctc_beam_search` (prefix beam search, optionally with a :class:`CharNGram` language model, never
scoring below best path); :func:`ctc_scores` (exact labelling log probabilities by the forward algorithm);
:func:`ctc_min_steps` (the steps a labelling needs).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class StepModel(Protocol):
    """A next-symbol model: ``model(x (T, B), state) -> (logits (T, B, V), state)`` over a prefix, and
    ``model.step(x_t (B,), state) -> (logits (B, V), state)`` for one symbol; ``parameters()`` and
    ``train()``/``eval()`` as an ``nn.Module``."""

    training: bool

    def __call__(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]: ...

    def step(self, x_t: Tensor, state: Any = None) -> tuple[Tensor, Any]: ...

    def parameters(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Logits (..., V) after temperature, top-k and nucleus (top-p) filtering; removed entries are -inf.

    top-p keeps the smallest set of most probable symbols whose probability sums to at least ``top_p``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0 (greedy decoding is sample_next's temperature=0), "
                         f"got {temperature}")
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p  # mass before this one >= p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> int:
    """Draw one symbol index from logits (V,); ``temperature == 0`` takes the most probable."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(filter_logits(logits.float(), temperature, top_k, top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"--temperature: expected a number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"--top-k: expected >= 0 (0 = no limit), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"--top-p: expected a probability in (0, 1], got {top_p}")


@torch.no_grad()
def generate(model: StepModel, prime: Sequence[int] | Tensor, length: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
             forbid: Sequence[int] = (), on_token: Callable[[int], None] | None = None,
             keep_logits: list[Tensor] | None = None) -> list[int]:
    """Continue ``prime`` by ``length`` sampled symbols.

    The prime runs through ``forward`` once; every further symbol is one ``model.step``. ``forbid``
    indices (e.g. the unknown symbol) are never drawn; ``on_token`` is called with each new index as
    soon as it is drawn (for streaming); ``keep_logits`` collects the (V,) logits each draw used.
    """
    check_sampling(temperature, top_k, top_p)
    prime = torch.as_tensor(prime, dtype=torch.int64)
    if prime.dim() != 1 or prime.numel() == 0:
        raise ValueError("prime: expected at least one symbol to start from")
    if length < 0:
        raise ValueError(f"--length: expected >= 0, got {length}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        logits, state = model(prime.view(-1, 1).to(device))
        logits = logits[-1, 0]
        out: list[int] = []
        forbid_idx = torch.as_tensor(list(forbid), dtype=torch.int64, device=device)
        for _ in range(length):
            if forbid_idx.numel():
                logits = logits.index_fill(0, forbid_idx, float("-inf"))
            if keep_logits is not None:
                keep_logits.append(logits.detach().cpu())
            tok = sample_next(logits, temperature, top_k, top_p, generator)
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            step_logits, state = model.step(torch.tensor([tok], device=device), state)
            logits = step_logits[0]
        return out
    finally:
        model.train(was_training)


def sampling_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or with a fresh random seed when None."""
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.seed() % 2**63))
    return g


# ---- conditional decoders: greedy and beam search -------------------------------------------------
class DecoderState(Protocol):
    """What a conditional decoder carries from step to step; ``select(index)`` takes the batch rows
    ``index`` (beams are expanded and reordered with it)."""

    def select(self, index: Tensor) -> DecoderState: ...


class CondStepModel(Protocol):
    """A decoder conditioned on a source: ``start(src (S, B), src_len (B,)) -> state`` and
    ``decode_step(tok (B,), state) -> (logits (B, V), state, attention weights (B, S) or None)``."""

    training: bool

    def start(self, src: Tensor, src_len: Tensor) -> DecoderState: ...

    def decode_step(self, tok: Tensor, state: Any) -> tuple[Tensor, Any, Tensor | None]: ...

    def train(self, mode: bool = True) -> Any: ...


@dataclass
class Decoded:
    """Per sequence: output ids (up to, without, the end symbol), total log-probability, and attention
    weights (len(ids) + 1, source length) (None without attention)."""

    ids: list[list[int]]
    scores: list[float]
    attention: list[Tensor | None]


def step_logprobs(logits: Tensor, forbid: Tensor, end: int, stop: Tensor) -> Tensor:
    """Log-probabilities (N, V) of the next symbol: ``forbid`` symbols never, and rows where ``stop`` (N,)
    is set choose ``end`` at zero cost."""
    logp = torch.log_softmax(logits.float().index_fill(-1, forbid, float("-inf")), -1)
    if not bool(stop.any()):
        return logp
    forced = torch.full_like(logp, float("-inf"))
    forced[:, end] = 0.0
    return torch.where(stop.unsqueeze(1), forced, logp)


def length_penalty(n: Tensor, alpha: float) -> Tensor:
    """:math:`((5 + n) / 6)^\alpha` (Wu et al. 2016)."""
    return ((5.0 + n.double()) / 6.0) ** alpha


def _finish(ids: list[list[int]], attn: list[Tensor] | None, src_len: Tensor,
            end: int) -> tuple[list[list[int]], list[Tensor | None]]:
    """Each sequence cut at its first ``end`` (its attention rows too), attention columns at the source length."""
    out, atts = [], []
    for b, seq in enumerate(ids):
        n = seq.index(end) if end in seq else len(seq)
        out.append(seq[:n])
        atts.append(None if attn is None else attn[b][:n + 1, :int(src_len[b])])
    return out, atts


def _search_args(max_len: Tensor, forbid: Sequence[int], device: torch.device) -> tuple[Tensor, Tensor]:
    return max_len.to(device).clamp_min(1), torch.as_tensor(list(forbid), dtype=torch.int64, device=device)


@torch.no_grad()
def greedy_search(model: CondStepModel, src: Tensor, src_len: Tensor, max_len: Tensor, *, start: int, end: int,
                  forbid: Sequence[int] = ()) -> Decoded:
    """The most probable symbol at every step for a batch ``src`` (S, B), ``src_len`` (B,); sequence b
    stops at ``end`` or after ``max_len[b]`` symbols (``end`` included)."""
    B, dev = src.shape[1], src.device
    limit, never = _search_args(max_len, forbid, dev)
    state = model.start(src, src_len)
    tok = torch.full((B,), start, dtype=torch.int64, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    score = torch.zeros(B, dtype=torch.float32, device=dev)
    toks, atts = [], []
    for t in range(int(limit.max())):
        logits, state, w = model.decode_step(tok, state)
        logp = step_logprobs(logits, never, end, done | (t >= limit - 1))
        tok = logp.argmax(-1)
        score = score + logp.gather(1, tok.unsqueeze(1)).squeeze(1)
        toks.append(tok)
        atts.append(w)
        done = done | (tok == end)
        if bool(done.all()):
            break
    attn = None if atts[0] is None else list(torch.stack(atts, 1).cpu())
    ids, attn = _finish(torch.stack(toks, 1).tolist(), attn, src_len, end)
    return Decoded(ids, score.tolist(), attn)


@torch.no_grad()
def beam_search(model: CondStepModel, src: Tensor, src_len: Tensor, max_len: Tensor, *, beam_size: int, start: int,
                end: int, forbid: Sequence[int] = (), alpha: float = 0.0) -> Decoded:
    """Batched beam search with ``beam_size`` beams per sequence (see the module docstring).

    Each step keeps the ``K`` best extensions of the ``K`` beams by total log-probability (the top ``K``
    of each beam first, then of those ``K * K``, which hold the top ``K`` of all). Decoding stops when
    every beam has finished or reached its length limit; the hypothesis with the best length-normalised
    score (``alpha``) is returned.
    """
    K = beam_size
    B, dev = src.shape[1], src.device
    limit, never = _search_args(max_len, forbid, dev)
    limit_k = limit.repeat_interleave(K)
    state = model.start(src, src_len).select(torch.arange(B, device=dev).repeat_interleave(K))
    tok = torch.full((B * K,), start, dtype=torch.int64, device=dev)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    done = torch.zeros(B, K, dtype=torch.bool, device=dev)
    length = torch.zeros(B, K, dtype=torch.int64, device=dev)
    base = (torch.arange(B, device=dev) * K).unsqueeze(1)  # (B, 1)
    toks, backs, atts = [], [], []
    k1 = None
    for t in range(int(limit.max())):
        logits, state, w = model.decode_step(tok, state)
        logp = step_logprobs(logits, never, end, done.view(-1) | (t >= limit_k - 1))
        k1 = k1 or min(K, logp.shape[-1])  # extensions kept per beam
        top_lp, top_tok = logp.topk(k1, dim=-1)  # (B*K, k1)
        cand = scores.unsqueeze(2) + top_lp.view(B, K, k1)
        scores, idx = cand.view(B, K * k1).topk(K, dim=-1)  # (B, K)
        parent = idx // k1
        tok_bk = top_tok.view(B, K * k1).gather(1, idx)  # (B, K)
        flat = (base + parent).view(-1)
        state = state.select(flat)
        was_done = done.gather(1, parent)
        length = length.gather(1, parent) + (~was_done).long()
        done = was_done | (tok_bk == end)
        toks.append(tok_bk)
        backs.append(parent)
        atts.append(None if w is None else w.index_select(0, flat).view(B, K, -1))
        tok = tok_bk.view(-1)
        if bool(done.all()):
            break
    best = (scores.double() / length_penalty(length, alpha)).argmax(1, keepdim=True)  # (B, 1)
    k, seq, att = best, [], []
    for t in range(len(toks) - 1, -1, -1):  # follow the back-pointers from the last step
        seq.append(toks[t].gather(1, k))
        if atts[t] is not None:
            att.append(atts[t].gather(1, k.unsqueeze(2).expand(-1, -1, atts[t].shape[2])))
        k = backs[t].gather(1, k)
    attn = list(torch.cat(att[::-1], 1).cpu()) if att else None
    ids, attn = _finish(torch.cat(seq[::-1], 1).tolist(), attn, src_len, end)
    return Decoded(ids, scores.gather(1, best).squeeze(1).tolist(), attn)


# ---- CTC (Graves et al. 2006) ---------------------------------------------------------------------
# A path (one index per step) maps to a labelling by merging repeats, then removing blanks; a labelling's
# probability p(l|x) sums over its paths the product of the per-step probabilities.
CTC_BLANK = 0
NEG_INF = -math.inf


def ctc_min_steps(label: Sequence[int]) -> int:
    """Steps CTC needs to emit ``label``: its length plus one blank between each pair of equal neighbours."""
    return len(label) + sum(1 for a, b in zip(label[:-1], label[1:]) if a == b)


def greedy_ctc(log_probs: np.ndarray) -> tuple[int, ...]:
    """Best path of one (T, K+1) matrix: argmax per step, repeats merged, blanks removed."""
    best = np.asarray(log_probs).argmax(-1)
    out, prev = [], CTC_BLANK
    for k in best.tolist():
        if k != prev and k != CTC_BLANK:
            out.append(k)
        prev = k
    return tuple(out)


def ctc_scores(log_probs: np.ndarray, labellings: Sequence[Sequence[int]]) -> np.ndarray:
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
                     torch.tensor([len(s) for s in labellings], dtype=torch.long), blank=CTC_BLANK, reduction="none",
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


def ctc_beam_search(log_probs: np.ndarray, beam: int = 16, lm: CharNGram | None = None, lm_weight: float = 0.5,
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
            cell[0] = np.logaddexp(cell[0], total + row[CTC_BLANK])
            last = prefix[-1] if prefix else None
            if last is not None:
                cell[1] = np.logaddexp(cell[1], pnb + row[last])  # a repeat merges into the same symbol
            for c in cands:
                grown = nxt[prefix + (c,)]
                via = pb if c == last else total  # a repeated symbol needs a blank in between
                grown[1] = np.logaddexp(grown[1], via + row[c] + ext(prefix, c))
        ranked = sorted(nxt.items(), key=lambda kv: -np.logaddexp(*kv[1]))[:beam]
        beams = {p: (v[0], v[1]) for p, v in ranked}
    finals = list(beams) + [greedy_ctc(lp)]
    finals = list(dict.fromkeys(finals))
    scores = ctc_scores(lp, finals)
    if lm is not None:
        scores = scores + np.array([lm_weight * lm.score(s) + length_bonus * len(s) for s in finals])
    return finals[int(np.argmax(scores))]


__all__ = ["StepModel", "filter_logits", "sample_next", "check_sampling", "generate", "sampling_generator",
           "CondStepModel", "DecoderState", "Decoded", "step_logprobs", "length_penalty", "greedy_search",
           "beam_search", "CTC_BLANK", "ctc_min_steps", "greedy_ctc", "ctc_scores", "CharNGram", "ctc_beam_search"]
