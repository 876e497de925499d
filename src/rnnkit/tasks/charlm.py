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
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cells import REGISTRY
from ..data.text import (
    CharVocab,
    Coverage,
    load_corpus,
    read_text,
    split_text,
    vocab_from_dict,
)
from ..errors import UserError
from ..layers import LAYERS, build
from ..train.checkpoint import atomic_write_bytes, list_checkpoints
from ..train.config import OptimConfig, TrainerConfig

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


# ---- the char-LM task: config, training, evaluation and sampling of a run directory -------------
@dataclass(frozen=True)
class CharDataConfig:
    """Corpus settings (the ``[data]`` section).

    Args:
        text: a text file or a directory of text files; None = the built-in Shakespeare.
        val: a separate validation file; None = the last ``val_fraction`` of the text.
        encoding: of the text files.
        eval_chars: periodic evaluations during training score the first this many validation characters
            (0 = all); the final evaluation always scores the whole validation text.
        eval_batch_size: parallel streams of the evaluation.
    """

    text: str | None = None
    val: str | None = None
    val_fraction: float = 0.05
    encoding: str = "utf-8"
    eval_chars: int = 50_000
    eval_batch_size: int = 16


@dataclass(frozen=True)
class SampleConfig:
    """Samples written at each evaluation (the ``[sample]`` section); ``prime`` "" starts after a newline."""

    length: int = 400
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    prime: str = ""


DEFAULT_MINUTES = 5.0  # budget when none of steps / epochs / minutes is set


def _default_trainer() -> TrainerConfig:
    return TrainerConfig(batch_size=32, tbptt=100, clip_norm=5.0, eval_every=500, log_every=50,
                         optim=OptimConfig(name="adam", lr=2e-3))


@dataclass(frozen=True)
class CharLMConfig:
    """Everything a ``charlm train`` run is made of; saved as the run's ``config.toml``."""

    # forget bias 0 at init (torch.nn.LSTM's): in 300-step trials on Shakespeare, rnnkit's usual bias of 1
    # was 0.03-0.04 nats/char behind (docs/results.md)
    model: LMConfig = field(default_factory=lambda: LMConfig(cell="lstm_fb0"))
    data: CharDataConfig = field(default_factory=CharDataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    trainer: TrainerConfig = field(default_factory=_default_trainer)


VOCAB_FILE = "vocab.json"
SAMPLES_FILE = "samples.txt"


def _err(exc: Exception) -> UserError:
    return exc if isinstance(exc, UserError) else UserError(str(exc))


def build_model(vocab_size: int, cfg: LMConfig) -> RecurrentLM:
    """:class:`RecurrentLM` with configuration errors raised as :class:`UserError`."""
    try:
        return RecurrentLM(vocab_size, cfg)
    except (ValueError, TypeError) as e:
        raise _err(e) from None


def default_prime(vocab: Any) -> str:
    """A newline when the vocabulary has one, else its first character."""
    return "\n" if "\n" in vocab.stoi else vocab.itos[1]


def encode_prime(vocab: CharVocab, prime: str) -> Tensor:
    """Prime text as indices; characters outside the vocabulary are an error (they would mean nothing)."""
    prime = prime or default_prime(vocab)
    unseen = vocab.unknown(prime)
    if unseen:
        shown = ", ".join(repr(c) for c in unseen[:10])
        raise UserError(f"--prime: {len(unseen)} character(s) not in the model's vocabulary: {shown} "
                        f"(the vocabulary has {len(vocab) - 1} characters from the training text)")
    return vocab.encode(prime)


@dataclass
class CharCorpus:
    """Training and validation text of a run, encoded with the training vocabulary."""

    name: str
    vocab: CharVocab
    train_ids: Tensor
    val_ids: Tensor
    coverage: Coverage


def prepare_corpus(cfg: CharDataConfig, trainer: TrainerConfig) -> CharCorpus:
    """Read, split and encode the corpus; check that it fills at least one batch."""
    text, name = load_corpus(cfg.text, cfg.encoding)
    if cfg.val is not None:
        train_text, val_text = text, read_text(cfg.val, cfg.encoding)
        if len(val_text) < 2:
            raise UserError(f"--val {cfg.val}: needs at least 2 characters, got {len(val_text)}")
    need = trainer.batch_size * 2 + 1
    if len(text) < need:
        train_text = text
    elif cfg.val is None:
        train_text, val_text = split_text(text, cfg.val_fraction, f"--text {name}")
    if len(train_text) < need:
        raise UserError(f"--text {name}: the training text has {len(train_text)} characters, shorter than one "
                        f"batch (batch_size {trainer.batch_size} streams x 2 steps + 1 = {need}); give a longer "
                        f"text or a smaller --batch-size")
    vocab = CharVocab.from_text(train_text)
    return CharCorpus(name, vocab, vocab.encode(train_text), vocab.encode(val_text), vocab.coverage(val_text))


def _atomic_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8"))


def _check_run_vocab(run_dir: Path, vocab: CharVocab) -> None:
    path = run_dir / VOCAB_FILE
    if not path.is_file():
        return
    saved = CharVocab.from_dict(json.loads(path.read_text(encoding="utf-8")))
    if saved != vocab:
        added = [c for c in vocab.itos if c not in saved.stoi]
        lost = [c for c in saved.itos if c not in vocab.stoi]
        raise UserError(f"--resume {str(run_dir)!r}: vocabulary mismatch: the run has {len(saved)} symbols, this "
                        f"training text gives {len(vocab)} (new: {added[:10]!r}, missing: {lost[:10]!r}); "
                        f"resume with the same --text")


def train(cfg: CharLMConfig, run_dir: str | Path, *, resume: bool = False, quiet: bool = False,
          progress: bool | None = None) -> dict[str, Any]:
    """Train a character LM into ``run_dir``; print samples at each evaluation; return final metrics.

    Nothing in an existing run directory is touched unless the inputs check out (``--resume`` with the
    same vocabulary, or a directory without checkpoints).
    """
    from ..train import StreamData, Trainer, seed_everything
    from ..train.config import replace_config

    t = cfg.trainer
    if t.steps is None and t.epochs is None and t.minutes is None:
        cfg = replace_config(cfg, **{"trainer.minutes": DEFAULT_MINUTES})
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {str(run_dir)!r}: exists and is not a directory")
    if list_checkpoints(run_dir / "checkpoints") and not resume:
        raise UserError(f"--out {str(run_dir)!r}: the run directory already has checkpoints; pass --resume to "
                        f"continue it or choose another directory")
    corpus = prepare_corpus(cfg.data, cfg.trainer)
    if resume:
        _check_run_vocab(run_dir, corpus.vocab)
    check_sampling(cfg.sample.temperature, cfg.sample.top_k, cfg.sample.top_p)
    prime = encode_prime(corpus.vocab, cfg.sample.prime)
    seed_everything(cfg.trainer.seed)
    model = build_model(len(corpus.vocab), cfg.model)
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    n_params = sum(p.numel() for p in model.parameters())
    say(f"corpus {corpus.name}: {corpus.train_ids.numel():,} training / {corpus.val_ids.numel():,} validation "
        f"characters; vocabulary {len(corpus.vocab)} symbols (with unknown); validation coverage "
        f"{corpus.coverage.describe()}")
    say(f"model: {cfg.model.cell} {cfg.model.num_layers}x{cfg.model.hidden_size}, {n_params:,} parameters, "
        f"backend {model.rnn.backend_for(torch.device('cpu'))} on cpu")

    val_all = corpus.val_ids
    val_part = val_all[:cfg.data.eval_chars + 1] if cfg.data.eval_chars else val_all
    timing = {"eval_s": 0.0}

    def evaluate(m: nn.Module) -> dict[str, float]:
        t0 = time.perf_counter()
        total, n = stream_loss(m, val_part, cfg.data.eval_batch_size)
        timing["eval_s"] += time.perf_counter() - t0
        out = lm_metrics(total, n)
        return {"loss": out["loss_nats"], "bits_per_char": out["bits_per_char"]}

    samples_path = run_dir / SAMPLES_FILE

    def on_eval(trainer: Any, info: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(cfg.trainer.seed * 7919 + trainer.step)
        s = cfg.sample
        ids = generate(trainer.model, prime, s.length, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                       generator=g, forbid=[CharVocab.unk_index])
        text = corpus.vocab.decode(prime) + corpus.vocab.decode(ids)
        loss = info["metrics"].get("loss", float("nan"))
        header = f"--- sample at step {trainer.step} (validation {loss:.4f} nats/char) ---"
        with samples_path.open("a", encoding="utf-8") as f:
            f.write(f"{header}\n{text}\n\n")
        say(f"{header}\n{text.strip()}\n---")
        timing["eval_s"] += time.perf_counter() - t0

    # (a cosine schedule with only a --minutes budget decays over training time: see rnnkit.train.Schedule)
    trainer = Trainer(model, LMTask(), StreamData(corpus.train_ids[:-1], corpus.train_ids[1:]), cfg.trainer,
                      run_dir, evaluate=evaluate, callbacks={"eval": on_eval}, resume=resume, quiet=quiet,
                      progress=progress, full_config=cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_json(run_dir / VOCAB_FILE, corpus.vocab.to_dict())
    result = trainer.fit()
    # the whole validation text, once, with the final weights
    t0 = time.perf_counter()
    total, n = stream_loss(model, val_all, cfg.data.eval_batch_size)
    final_eval_s = time.perf_counter() - t0
    val = lm_metrics(total, n)
    train_s = max(1e-9, float(result["elapsed_s"]) - timing["eval_s"])
    chars = _trained_chars(result, trainer)
    out = {"val_loss_nats": val["loss_nats"], "val_bits_per_char": val["bits_per_char"], "val_chars": n,
           "train_loss_nats": result.get("train_loss"), "steps": result["step"],
           "epochs_done": result["epochs_done"], "train_chars": chars, "chars_per_s": chars / train_s,
           "elapsed_s": result["elapsed_s"], "final_eval_s": round(final_eval_s, 3),
           "stop_reason": result["stop_reason"], "vocab_size": len(corpus.vocab),
           "val_coverage": corpus.coverage.fraction, "parameters": n_params, "run_dir": str(run_dir)}
    if "best_loss" in result:
        out["best_eval_loss_nats"] = result["best_loss"]
        out["best_step"] = result["best_step"]
    _atomic_json(run_dir / "final_metrics.json", out)
    return out


def _trained_chars(result: dict[str, Any], trainer: Any) -> int:
    """Characters read by training so far (all epochs), from the step count and the stream layout."""
    d = trainer.data
    per_epoch = d.length * d.x.shape[1]
    steps_per_epoch = trainer.steps_per_epoch
    full, rest = divmod(int(result["step"]), steps_per_epoch)
    k = trainer.config.tbptt * trainer.config.grad_accum * d.x.shape[1]
    return full * per_epoch + min(rest * k, per_epoch)


@dataclass
class LoadedRun:
    """A trained run: its config, vocabulary, model (eval mode) and the checkpoint step it came from."""

    run_dir: Path
    config: Any
    vocab: Any
    model: RecurrentLM
    step: int


def load_run(run_dir: str | Path, config_cls: type = CharLMConfig, checkpoint: str = "latest",
             device: str = "cpu") -> LoadedRun:
    """Rebuild the model of a run directory from its ``config.toml``, ``vocab.json`` and a checkpoint.

    ``checkpoint``: "latest" (newest good one), "best" (the best evaluation) or a step number.
    """
    from ..train import config_from_dict, latest_good_checkpoint, load_checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR {str(run_dir)!r}: no such directory (expected the --out of a training run)")
    cfg_path, vocab_path = run_dir / "config.toml", run_dir / VOCAB_FILE
    for p in (cfg_path, vocab_path):
        if not p.is_file():
            raise UserError(f"RUN_DIR {str(run_dir)!r}: not a trained run (no {p.name}); expected the --out "
                            f"directory of a finished or checkpointed training")
    vocab = vocab_from_dict(json.loads(vocab_path.read_text(encoding="utf-8")))
    kind = "char" if isinstance(vocab, CharVocab) else "word"
    wanted = "char" if issubclass(config_cls, CharLMConfig) else "word"
    if kind != wanted:
        raise UserError(f"RUN_DIR {str(run_dir)!r}: a {kind}-level run; use `rnnkit {kind}lm` for it")
    with cfg_path.open("rb") as f:
        cfg = config_from_dict(config_cls, tomllib.load(f))
    ckdir = run_dir / "checkpoints"
    found = None
    if checkpoint == "latest":
        found = latest_good_checkpoint(ckdir)
    else:
        steps = dict(list_checkpoints(ckdir))
        if checkpoint == "best":
            good = latest_good_checkpoint(ckdir)
            best = good.meta.get("best_step") if good is not None else None
            found = load_checkpoint(steps[best]) if best in steps else good
        elif checkpoint.isdigit() and int(checkpoint) in steps:
            found = load_checkpoint(steps[int(checkpoint)])
        else:
            raise UserError(f"--checkpoint: expected 'latest', 'best' or one of the steps {sorted(steps)}, "
                            f"got {checkpoint!r}")
    if found is None:
        raise UserError(f"RUN_DIR {str(run_dir)!r}: holds no checkpoint (train it first, or wait for its first "
                        f"checkpoint)")
    model = build_model(len(vocab), cfg.model)
    sd = {k[len("model."):]: v for k, v in found.tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UserError(f"RUN_DIR {str(run_dir)!r}: checkpoint of step {found.step} does not fit the model of "
                        f"its config.toml ({str(e).splitlines()[0]})") from None
    model.to(device).eval()
    return LoadedRun(run_dir, cfg, vocab, model, found.step)


def evaluate_text(run: LoadedRun, text_path: str | Path | None, encoding: str = "utf-8",
                  batch_size: int = 16) -> dict[str, Any]:
    """Loss of a trained model on a text (file, directory, or None = the run's own validation text)."""
    if text_path is None:
        corpus = prepare_corpus(run.config.data, run.config.trainer)
        text_ids, cov, name = corpus.val_ids, corpus.coverage, f"{corpus.name} (validation split)"
    else:
        text, name = load_corpus(text_path, encoding)
        if len(text) < 2:
            raise UserError(f"--text {name}: needs at least 2 characters, got {len(text)}")
        text_ids, cov = run.vocab.encode(text), run.vocab.coverage(text)
    total, n = stream_loss(run.model, text_ids, batch_size)
    m = lm_metrics(total, n)
    return {"loss_nats": m["loss_nats"], "bits_per_char": m["bits_per_char"], "chars": n,
            "coverage": cov.fraction, "unknown_chars": cov.unknown, "text": name, "checkpoint_step": run.step}


def sample_run(run: LoadedRun, prime: str, length: int, *, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, write: Callable[[str], None] | None = None,
               sampler: Callable[..., list[int]] | None = None) -> str:
    """Generate ``length`` characters after ``prime`` and stream each to ``write`` as it is drawn.

    ``sampler(prime_ids, length, **options)`` draws the symbols; default :func:`generate` with the
    run's model (an exported model's runner brings its own, with the same options and rule).
    """
    check_sampling(temperature, top_k, top_p)
    if length < 0:
        raise UserError(f"--length: expected >= 0, got {length}")
    ids = encode_prime(run.vocab, prime)
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.seed() % 2**63))
    if write is not None:
        write(run.vocab.decode(ids))
    on_token = (lambda i: write(run.vocab.itos[i])) if write is not None else None
    if sampler is None:
        def sampler(ids: Tensor, n: int, **options: Any) -> list[int]:
            return generate(run.model, ids, n, **options)
    out = sampler(ids, length, temperature=temperature, top_k=top_k, top_p=top_p, generator=g,
                  forbid=[run.vocab.unk_index], on_token=on_token)
    return run.vocab.decode(ids) + run.vocab.decode(out)


__all__ = ["LMConfig", "RecurrentLM", "LMTask", "stream_loss", "lm_metrics", "filter_logits", "sample_next",
           "check_sampling", "generate", "CharDataConfig", "SampleConfig", "CharLMConfig", "CharCorpus",
           "prepare_corpus", "build_model", "train", "load_run", "LoadedRun", "evaluate_text", "sample_run",
           "encode_prime", "default_prime"]
