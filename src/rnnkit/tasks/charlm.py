"""Character-level language model: next-character prediction and text generation (char-rnn).

The model reads one symbol per step and predicts the next:

.. math::
    e_t = E[x_t] \\;(\\text{or one-hot}), \\quad h_t = \\mathrm{RNN}(e_t, h_{t-1}), \\quad
    p(x_{t+1} \\mid x_{\\le t}) = \\mathrm{softmax}(W\\, \\mathrm{dropout}(h_t) + b)

trained on the per-symbol cross-entropy :math:`-\\log p(x_{t+1} \\mid x_{\\le t})` (nats; bits =
nats / ln 2; perplexity = exp(nats)). :class:`RecurrentLM` is shared with the word-level task.

Generation feeds the prime through ``forward`` once, then one symbol at a time through the recurrent
stack's stateful ``step()``, so each new symbol costs one step, never a re-run of the prefix.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cells import REGISTRY
from ..layers import LAYERS, build

State = Tensor | tuple[Tensor, Tensor] | None
LN2 = math.log(2.0)


# ---- model ------------------------------------------------------------------------------------
VARIANT_OPTIONS = ("forget_bias", "peephole", "coupled", "drop_gates", "output_activation", "layer_norm",
                   "reset_after", "nonlinearity", "recurrent_dropout", "zoneout")


@dataclass(frozen=True)
class LMConfig:
    """Architecture of a :class:`RecurrentLM` (the ``[model]`` section of a run's config).

    Args:
        cell: a name from ``rnnkit.cells.REGISTRY`` (``rnnkit cells`` lists them).
        hidden_size, num_layers: of the recurrent stack.
        embedding_size: input embedding width; 0 feeds one-hot vectors.
        dropout: on every non-recurrent connection (embedding output, between layers, before the
            decoder), as Zaremba et al. 2014.
        tie_weights: share the embedding matrix with the decoder (Press & Wolf 2017); a projection
            H -> E is added when the sizes differ.
        init_range: if > 0, every parameter starts from U(-r, r) (Zaremba et al.); else each layer's own init.
        backend: kernel of the recurrent stack ("auto" or a name from ``rnnkit.kernels.BACKENDS``).
        forget_bias ... zoneout: variant options passed to :func:`rnnkit.build` when set; None keeps the
            registry entry's value (see ``docs/cells.md``).
    """

    cell: str = "lstm"
    hidden_size: int = 256
    num_layers: int = 2
    embedding_size: int = 64
    dropout: float = 0.0
    tie_weights: bool = False
    init_range: float = 0.0
    backend: str = "auto"
    forget_bias: float | None = None
    peephole: bool | None = None
    coupled: bool | None = None
    drop_gates: tuple[str, ...] | None = None
    output_activation: bool | None = None
    layer_norm: bool | None = None
    reset_after: bool | None = None
    nonlinearity: str | None = None
    recurrent_dropout: float | None = None
    zoneout: float | None = None

    def cell_options(self) -> dict[str, Any]:
        """The variant options that are set, for :func:`rnnkit.build`."""
        return {k: getattr(self, k) for k in VARIANT_OPTIONS if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config: unknown key(s) {unknown}; expected some of {sorted(known)}")
        d = dict(d)
        if d.get("drop_gates") is not None:
            d["drop_gates"] = tuple(d["drop_gates"])
        return cls(**d)


def _build_stack(cfg: LMConfig, input_size: int) -> nn.Module:
    if cfg.cell not in REGISTRY:
        raise ValueError(f"model.cell: expected one of {sorted(REGISTRY)}, got {cfg.cell!r}")
    options = cfg.cell_options()
    family = REGISTRY[cfg.cell].family
    accepted = set(inspect.signature(LAYERS[family]).parameters)
    wrong = sorted(k for k in options if k not in accepted)
    if wrong:
        allowed = [k for k in VARIANT_OPTIONS if k in accepted]
        raise ValueError(f"model.{wrong[0]}: not an option of cell {cfg.cell!r} ({family}); "
                         f"its variant options are {allowed}")
    return build(cfg.cell, input_size, cfg.hidden_size, num_layers=cfg.num_layers,
                 dropout=cfg.dropout if cfg.num_layers > 1 else 0.0, backend=cfg.backend, **options)


class RecurrentLM(nn.Module):
    """Embedding (or one-hot) -> rnnkit recurrent stack -> dropout -> linear, over a vocabulary.

    Shape: tokens (T, B) int64 -> logits (T, B, V); state as the recurrent stack (torch.nn layout).
    """

    def __init__(self, vocab_size: int, config: LMConfig | None = None) -> None:
        super().__init__()
        cfg = config or LMConfig()
        if vocab_size < 2:
            raise ValueError(f"vocab_size: expected at least 2 symbols, got {vocab_size}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {cfg.dropout}")
        if cfg.embedding_size < 0:
            raise ValueError(f"embedding_size: expected >= 0 (0 = one-hot input), got {cfg.embedding_size}")
        if cfg.tie_weights and cfg.embedding_size == 0:
            raise ValueError("tie_weights: needs an embedding (embedding_size > 0), got one-hot input")
        self.config = cfg
        self.vocab_size = vocab_size
        E = cfg.embedding_size
        self.embedding = nn.Embedding(vocab_size, E) if E else None
        self.rnn = _build_stack(cfg, E or vocab_size)
        self.drop = nn.Dropout(cfg.dropout)
        H = cfg.hidden_size
        self.proj = nn.Linear(H, E, bias=False) if cfg.tie_weights and E != H else None
        self.decoder = nn.Linear(E if cfg.tie_weights else H, vocab_size)
        if cfg.tie_weights:
            self.decoder.weight = self.embedding.weight
        if cfg.init_range > 0:
            for p in self.parameters():
                nn.init.uniform_(p, -cfg.init_range, cfg.init_range)

    def embed(self, x: Tensor) -> Tensor:
        if self.embedding is None:
            return F.one_hot(x, self.vocab_size).to(self.decoder.weight.dtype)
        return self.embedding(x)

    def head(self, h: Tensor) -> Tensor:
        if self.config.dropout > 0:
            h = self.drop(h)
        if self.proj is not None:
            h = self.proj(h)
        return self.decoder(h)

    def forward(self, x: Tensor, state: State = None) -> tuple[Tensor, State]:
        """Logits (T, B, V) for tokens ``x`` (T, B), and the final recurrent state."""
        e = self.embed(x)  # (T, B, E)
        if self.config.dropout > 0:
            e = self.drop(e)
        out, state = self.rnn(e, state)  # (T, B, H)
        return self.head(out), state

    def step(self, x_t: Tensor, state: State = None) -> tuple[Tensor, State]:
        """One step through the stack's stateful ``step()``: tokens (B,) -> logits (B, V), state."""
        h, state = self.rnn.step(self.drop(self.embed(x_t)), state)  # (B, H); eval: dropout is identity
        return self.head(h), state


class LMTask:
    """The Trainer's view of a language model: forward over a chunk and per-step cross-entropy."""

    def forward(self, model: RecurrentLM, x: Tensor, state: State) -> tuple[Tensor, State]:
        return model(x, state)

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Unreduced cross-entropy in nats, shape (T, B)."""
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)


# ---- evaluation -------------------------------------------------------------------------------
@torch.no_grad()
def stream_loss(model: RecurrentLM, ids: Tensor, batch_size: int = 16, chunk: int = 256) -> tuple[float, int]:
    """Total cross-entropy (nats) of every next-symbol prediction in ``ids`` and their count.

    ``ids`` (N,) is cut into ``batch_size`` contiguous streams read in ``chunk``-step pieces with the
    state carried across; the symbols left over after the last full stream are scored by continuing
    the last stream, so all N - 1 predictions count exactly once.
    """
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"ids: expected a 1-D sequence of at least 2 symbols, got shape {tuple(ids.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        x_all, y_all = ids[:-1], ids[1:]
        n = x_all.numel()
        B = max(1, min(batch_size, n // max(1, chunk // 4)))  # short texts: fewer, longer streams
        L = n // B
        total = 0.0

        def run(x: Tensor, y: Tensor, state: State) -> tuple[float, State]:
            s = 0.0
            for t0 in range(0, x.shape[0], chunk):
                logits, state = model(x[t0:t0 + chunk].to(device), state)
                s += F.cross_entropy(logits.flatten(0, 1), y[t0:t0 + chunk].to(device).flatten(),
                                     reduction="sum").item()
            return s, state

        xs = x_all[:B * L].view(B, L).t()  # (L, B): column b is stream b
        ys = y_all[:B * L].view(B, L).t()
        s, state = run(xs, ys, None)
        total += s
        if B * L < n:  # the tail continues stream B-1
            last = tuple(t[:, -1:].contiguous() for t in state) if isinstance(state, tuple) \
                else state[:, -1:].contiguous()
            s, _ = run(x_all[B * L:].view(-1, 1), y_all[B * L:].view(-1, 1), last)
            total += s
        return total, n
    finally:
        model.train(was_training)


def lm_metrics(total_nats: float, count: int, unit: str = "char") -> dict[str, float]:
    """Loss per symbol in nats, bits and perplexity from a summed cross-entropy."""
    nats = total_nats / count
    return {"loss_nats": nats, f"bits_per_{unit}": nats / LN2, "perplexity": math.exp(min(nats, 700.0))}


# ---- generation -------------------------------------------------------------------------------
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
def generate(model: RecurrentLM, prime: Sequence[int] | Tensor, length: int, *, temperature: float = 1.0,
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


__all__ = ["LMConfig", "RecurrentLM", "LMTask", "stream_loss", "lm_metrics", "filter_logits", "sample_next",
           "check_sampling", "generate"]
