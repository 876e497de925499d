"""Language models shared by the character- and word-level tasks: the model, streaming evaluation, and
the training preamble and loading of a stream-trained LM run.

The model reads one symbol per step and predicts the next:

.. math::
    e_t = E[x_t] \\;(\\text{or one-hot}), \\quad h_t = \\mathrm{RNN}(e_t, h_{t-1}), \\quad
    p(x_{t+1} \\mid x_{\\le t}) = \\mathrm{softmax}(W\\, \\mathrm{dropout}(h_t) + b)

trained on the per-symbol cross-entropy :math:`-\\log p(x_{t+1} \\mid x_{\\le t})` (nats; bits and
perplexity in :mod:`rnnkit.metrics.lm`).

:class:`RecurrentLM` has ``forward`` over a prefix and a stateful ``step`` for one symbol, so the decoders
of :mod:`rnnkit.tasks.decoding` (sampling with temperature / top-k / top-p, streaming generation) drive it
one step per new symbol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.text import CharVocab, vocab_from_dict
from ..errors import UserError
from .base import as_user_error, atomic_json, choose_checkpoint, load_checkpoint_into, read_run
from .options import RecurrentOptions

State = Tensor | tuple[Tensor, Tensor] | None
VOCAB_FILE = "vocab.json"
DEFAULT_MINUTES = 5.0  # budget when none of steps / epochs / minutes is set


# ---- model ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LMConfig(RecurrentOptions):
    """Architecture of a :class:`RecurrentLM` (the ``[model]`` section of a run's config).

    Args:
        cell, backend, forget_bias ... zoneout: the recurrent stack (:class:`RecurrentOptions`).
        hidden_size, num_layers: of the recurrent stack.
        embedding_size: input embedding width; 0 feeds one-hot vectors.
        dropout: on every non-recurrent connection (embedding output, between layers, before the
            decoder), as Zaremba et al. 2014.
        tie_weights: share the embedding matrix with the decoder (Press & Wolf 2017); a projection
            H -> E is added when the sizes differ.
        init_range: if > 0, every parameter starts from U(-r, r) (Zaremba et al.); else each layer's own init.
    """

    hidden_size: int = 256
    num_layers: int = 2
    embedding_size: int = 64
    tie_weights: bool = False
    init_range: float = 0.0

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
        self.rnn = cfg.build_stack(E or vocab_size)
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
        x = x.long()  # token ids may be stored narrower (see CharVocab.compact_dtype); no copy when int64
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
        return F.cross_entropy(logits.flatten(0, 1), y.flatten().long(), reduction="none").view(y.shape)


def build_model(vocab_size: int, cfg: LMConfig) -> RecurrentLM:
    """:class:`RecurrentLM` with configuration errors raised as :class:`UserError`."""
    try:
        return RecurrentLM(vocab_size, cfg)
    except (ValueError, TypeError) as e:
        raise as_user_error(e) from None


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
                s += F.cross_entropy(logits.flatten(0, 1), y[t0:t0 + chunk].to(device).flatten().long(),
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

# ---- runs: the training preamble and loading ---------------------------------------------------
def new_model(vocab_size: int, cfg: LMConfig, seed: int) -> RecurrentLM:
    """Seed everything with ``seed``, then build the model (so a seed gives the same initial weights)."""
    from ..train import seed_everything

    seed_everything(seed)
    return build_model(vocab_size, cfg)


def fit_stream(model: RecurrentLM, train_ids: Tensor, cfg: Any, run_dir: Path, vocab: Any, *,
               evaluate: Callable[[nn.Module], dict[str, float]], callbacks: dict[str, Any] | None = None,
               resume: bool = False, quiet: bool = False, progress: bool | None = None) -> tuple[Any, dict[str, Any]]:
    """Train ``model`` on next-symbol prediction over the token stream ``train_ids`` (N,).

    The Trainer runs ``cfg.trainer`` (TBPTT over contiguous streams) into ``run_dir``; the vocabulary is
    written to ``run_dir/vocab.json`` once the trainer has taken the directory (:meth:`Trainer.open_run_dir`). Returns
    (the trainer, its final metrics).
    """
    from ..train import StreamData, Trainer

    trainer = Trainer(model, LMTask(), StreamData(train_ids[:-1], train_ids[1:]), cfg.trainer, run_dir,
                      evaluate=evaluate, callbacks=callbacks or {}, resume=resume, quiet=quiet, progress=progress,
                      full_config=cfg)
    trainer.open_run_dir()  # locked, and a resume checked against its checkpoint, before anything is written
    atomic_json(run_dir / VOCAB_FILE, vocab.to_dict())
    return trainer, trainer.fit()


@dataclass
class LoadedRun:
    """A trained run: its config, vocabulary, model (eval mode) and the checkpoint step it came from."""

    run_dir: Path
    config: Any
    vocab: Any
    model: RecurrentLM
    step: int


def load_run(run_dir: str | Path, config_cls: type, checkpoint: str = "latest", device: str = "cpu") -> LoadedRun:
    """Rebuild the model of a run directory from its ``config.toml``, ``vocab.json`` and a checkpoint.

    ``config_cls``: the task's config dataclass; its ``VOCAB_KIND`` ("char" or "word") must match the
    run's vocabulary. ``checkpoint``: "latest" (newest good one), "best" (the best evaluation) or a step number.
    """
    from ..train import model_state_dict

    def read_vocab(d: Any, run_dir: Path) -> Any:
        try:
            vocab = vocab_from_dict(d)
        except (UserError, TypeError, AttributeError, KeyError) as e:
            raise UserError(f"{str(run_dir / VOCAB_FILE)!r}: not a valid vocabulary file ({e}); restore the "
                            f"run's {VOCAB_FILE}") from None
        kind, wanted = ("char" if isinstance(vocab, CharVocab) else "word"), config_cls.VOCAB_KIND
        if kind != wanted:
            raise UserError(f"RUN_DIR {str(run_dir)!r}: a {kind}-level run; use `rnnkit {kind}lm` for it")
        return vocab

    run_dir, vocab, cfg = read_run(run_dir, config_cls, read_vocab, VOCAB_FILE)
    found = choose_checkpoint(run_dir, checkpoint)
    trained = model_state_dict(found).get("decoder.bias")
    if trained is not None and trained.shape[0] != len(vocab):
        raise UserError(f"{str(run_dir / VOCAB_FILE)!r}: holds {len(vocab)} symbols, but the model of checkpoint "
                        f"step {found.step} was trained on {trained.shape[0]}; restore the run's {VOCAB_FILE}")
    model = build_model(len(vocab), cfg.model)
    step = load_checkpoint_into(model, run_dir, found)
    model.to(device).eval()
    return LoadedRun(run_dir, cfg, vocab, model, step)


__all__ = ["LMConfig", "RecurrentLM", "LMTask", "build_model", "stream_loss", "new_model", "fit_stream", "LoadedRun",
           "load_run", "VOCAB_FILE", "DEFAULT_MINUTES", "State"]
