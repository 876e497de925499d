"""Word-level language model: perplexity on Penn Treebank or your own files, Zaremba et al. 2014 presets.

Tokens are whitespace-separated words, one sentence per line, each line followed by ``<eos>``; words
outside the (frequency-capped) vocabulary become ``<unk>``. The model is :class:`RecurrentLM` (embedding
-> recurrent stack -> dropout -> linear) and the metric is perplexity,
:math:`\\exp\\big(-\\tfrac1N \\sum_t \\log p(w_{t+1} \\mid w_{\\le t})\\big)`.

Presets (``--preset``) reproduce Zaremba, Sutskever & Vinyals 2014 "Recurrent neural network
regularization": the loss is summed over the unrolled steps and averaged over the batch, which is what
their SGD learning rate of 1.0 assumes (``trainer.loss_reduction = "sum_time"``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..data.text import WordVocab, penn_treebank, read_text, split_text, tokenize_lines
from ..errors import UserError
from ..metrics.lm import lm_metrics
from ..train.config import OptimConfig, TrainerConfig
from . import lm
from .base import atomic_json, check_saved_vocab, open_run_dir, reporter, with_budget
from .decoding import check_sampling, generate, sampling_generator
from .lm import DEFAULT_MINUTES, VOCAB_FILE, LMConfig, LoadedRun, stream_loss

# Zaremba et al. 2014, section 4.1 (lr schedule: multiply by `decay` every epoch from `start_epoch` on).
PRESETS: dict[str, dict[str, Any]] = {
    "zaremba-small": {
        "model.cell": "lstm", "model.hidden_size": 200, "model.embedding_size": 200, "model.num_layers": 2,
        "model.dropout": 0.0, "model.init_range": 0.1, "model.forget_bias": 0.0,
        "trainer.batch_size": 20, "trainer.tbptt": 20, "trainer.loss_reduction": "sum_time",
        "trainer.optim.name": "sgd", "trainer.optim.lr": 1.0, "trainer.clip_norm": 5.0, "trainer.epochs": 13,
        "trainer.schedule.name": "step", "trainer.schedule.decay": 0.5, "trainer.schedule.start_epoch": 5,
        "trainer.schedule.every": 1,
    },
    "zaremba-medium": {
        "model.cell": "lstm", "model.hidden_size": 650, "model.embedding_size": 650, "model.num_layers": 2,
        "model.dropout": 0.5, "model.init_range": 0.05, "model.forget_bias": 0.0,
        "trainer.batch_size": 20, "trainer.tbptt": 35, "trainer.loss_reduction": "sum_time",
        "trainer.optim.name": "sgd", "trainer.optim.lr": 1.0, "trainer.clip_norm": 5.0, "trainer.epochs": 39,
        "trainer.schedule.name": "step", "trainer.schedule.decay": 1 / 1.2, "trainer.schedule.start_epoch": 7,
        "trainer.schedule.every": 1,
    },
    "zaremba-large": {
        "model.cell": "lstm", "model.hidden_size": 1500, "model.embedding_size": 1500, "model.num_layers": 2,
        "model.dropout": 0.65, "model.init_range": 0.04, "model.forget_bias": 0.0,
        "trainer.batch_size": 20, "trainer.tbptt": 35, "trainer.loss_reduction": "sum_time",
        "trainer.optim.name": "sgd", "trainer.optim.lr": 1.0, "trainer.clip_norm": 10.0, "trainer.epochs": 55,
        "trainer.schedule.name": "step", "trainer.schedule.decay": 1 / 1.15, "trainer.schedule.start_epoch": 15,
        "trainer.schedule.every": 1,
    },
}
# Published valid / test perplexities of the presets (Zaremba et al. 2014, table 1).
PUBLISHED = {"zaremba-small": (120.7, 114.5), "zaremba-medium": (86.2, 82.7), "zaremba-large": (82.2, 78.4)}


@dataclass(frozen=True)
class WordDataConfig:
    """Corpus settings (the ``[data]`` section).

    Args:
        corpus: "ptb" (Penn Treebank from the optional ``treebank`` package) or "files".
        train, valid, test: text files or directories, one sentence per line (``corpus = "files"``);
            without ``valid`` the last ``val_fraction`` of the training tokens is held out.
        max_vocab: vocabulary cap including ``<unk>`` and ``<eos>`` (0 = no cap).
        fraction: use only the first fraction of every split (quick trials; 1 = all).
        eval_batch_size, eval_chunk: stream layout of the evaluation (1 stream = exact, as Zaremba et al.).
    """

    corpus: str = "files"
    train: str | None = None
    valid: str | None = None
    test: str | None = None
    val_fraction: float = 0.05
    encoding: str = "utf-8"
    max_vocab: int = 10_000
    fraction: float = 1.0
    eval_batch_size: int = 1
    eval_chunk: int = 256


def _default_trainer() -> TrainerConfig:
    return TrainerConfig(batch_size=20, tbptt=35, clip_norm=5.0, eval_each_epoch=True, log_every=100,
                         optim=OptimConfig(name="adam", lr=2e-3))


@dataclass(frozen=True)
class WordLMConfig:
    """Everything a ``wordlm train`` run is made of; saved as the run's ``config.toml``."""

    VOCAB_KIND: ClassVar[str] = "word"

    preset: str = ""
    model: LMConfig = field(default_factory=lambda: LMConfig(hidden_size=200, embedding_size=200))
    data: WordDataConfig = field(default_factory=WordDataConfig)
    trainer: TrainerConfig = field(default_factory=_default_trainer)


def preset_overrides(name: str | None) -> dict[str, Any]:
    """The dotted config keys a preset sets (empty for None / "")."""
    if not name:
        return {}
    if name not in PRESETS:
        raise UserError(f"--preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return {"preset": name, **PRESETS[name]}


@dataclass
class WordCorpus:
    name: str
    vocab: WordVocab
    train_ids: torch.Tensor
    splits: dict[str, torch.Tensor]  # "valid", maybe "test"
    coverage: dict[str, float]


def _cut(tokens: list[str], fraction: float) -> list[str]:
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"data.fraction: expected a fraction in (0, 1], got {fraction}")
    return tokens if fraction == 1.0 else tokens[:max(2, int(len(tokens) * fraction))]


def prepare_corpus(cfg: WordDataConfig, trainer: TrainerConfig) -> WordCorpus:
    """Tokenise the splits, build the vocabulary on the training tokens, encode everything."""
    if cfg.corpus == "ptb":
        ptb = penn_treebank()
        toks = {k: tokenize_lines(v) for k, v in ptb.items()}
        train, splits, name = toks["train"], {"valid": toks["valid"], "test": toks["test"]}, "ptb"
    elif cfg.corpus == "files":
        if cfg.train is None:
            raise UserError("--train: a training text is needed with corpus 'files' (or use --corpus ptb)")
        train = tokenize_lines(read_text(cfg.train, cfg.encoding))
        splits: dict[str, list[str]] = {}
        if cfg.valid is not None:
            splits["valid"] = tokenize_lines(read_text(cfg.valid, cfg.encoding))
        else:
            train, splits["valid"] = (list(x) for x in split_text(train, cfg.val_fraction, f"--train {cfg.train}"))
        if cfg.test is not None:
            splits["test"] = tokenize_lines(read_text(cfg.test, cfg.encoding))
        name = str(cfg.train)
    else:
        raise UserError(f"--corpus: expected 'ptb' or 'files', got {cfg.corpus!r}")
    train = _cut(train, cfg.fraction)
    splits = {k: _cut(v, cfg.fraction) for k, v in splits.items()}
    for k, v in splits.items():
        if len(v) < 2:
            raise UserError(f"--{k}: needs at least 2 tokens, got {len(v)}")
    need = trainer.batch_size * 2 + 1
    if len(train) < need:
        raise UserError(f"--train {name}: {len(train)} tokens are fewer than one batch (batch_size "
                        f"{trainer.batch_size} streams x 2 steps + 1 = {need})")
    if cfg.max_vocab < 0:
        raise UserError(f"--max-vocab: expected >= 3 or 0 (no cap), got {cfg.max_vocab}")
    vocab = WordVocab.from_tokens(train, cfg.max_vocab or None)
    return WordCorpus(name, vocab, vocab.encode(train), {k: vocab.encode(v) for k, v in splits.items()},
                      {k: vocab.coverage(v).fraction for k, v in splits.items()})


def _ppl_metrics(model: torch.nn.Module, ids: torch.Tensor, cfg: WordDataConfig) -> dict[str, float]:
    total, n = stream_loss(model, ids, cfg.eval_batch_size, cfg.eval_chunk)
    m = lm_metrics(total, n, unit="word")
    return {"loss_nats": m["loss_nats"], "perplexity": m["perplexity"], "tokens": n}


def train(cfg: WordLMConfig, run_dir: str | Path, *, resume: bool = False, quiet: bool = False,
          progress: bool | None = None) -> dict[str, Any]:
    """Train a word LM into ``run_dir``; evaluate validation perplexity (each epoch) and test at the end."""
    cfg = with_budget(cfg, DEFAULT_MINUTES)
    run_dir = open_run_dir(run_dir, resume)
    corpus = prepare_corpus(cfg.data, cfg.trainer)
    if resume:
        check_saved_vocab(run_dir / VOCAB_FILE, corpus.vocab, "words")
    model = lm.new_model(len(corpus.vocab), cfg.model, cfg.trainer.seed)
    say = reporter(quiet)
    n_params = sum(p.numel() for p in model.parameters())
    cov = ", ".join(f"{k} {v:.2%}" for k, v in corpus.coverage.items())
    say(f"corpus {corpus.name}: {corpus.train_ids.numel():,} training tokens, "
        + ", ".join(f"{k} {v.numel():,}" for k, v in corpus.splits.items())
        + f"; vocabulary {len(corpus.vocab):,} (coverage {cov}); model {cfg.model.cell} "
        f"{cfg.model.num_layers}x{cfg.model.hidden_size}, {n_params:,} parameters"
        + (f"; preset {cfg.preset}" if cfg.preset else ""))

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        r = _ppl_metrics(m, corpus.splits["valid"], cfg.data)
        return {"loss": r["loss_nats"], "perplexity": r["perplexity"]}

    t0 = time.perf_counter()
    _, result = lm.fit_stream(model, corpus.train_ids, cfg, run_dir, corpus.vocab, evaluate=evaluate, resume=resume,
                              quiet=quiet, progress=progress)
    train_loss = result.get("train_loss")
    if train_loss is not None and cfg.trainer.loss_reduction == "sum_time":
        train_loss = train_loss / cfg.trainer.tbptt  # summed over the unrolled steps -> per word
    out: dict[str, Any] = {"steps": result["step"], "epochs_done": result["epochs_done"],
                           "train_loss_nats": train_loss, "elapsed_s": result["elapsed_s"],
                           "stop_reason": result["stop_reason"], "vocab_size": len(corpus.vocab),
                           "parameters": n_params}
    for split, ids in corpus.splits.items():
        r = _ppl_metrics(model, ids, cfg.data)
        out[f"{split}_perplexity"] = r["perplexity"]
        out[f"{split}_loss_nats"] = r["loss_nats"]
        out[f"{split}_tokens"] = r["tokens"]
    if cfg.preset in PUBLISHED:
        out["published_valid_perplexity"], out["published_test_perplexity"] = PUBLISHED[cfg.preset]
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    out["run_dir"] = str(run_dir)
    atomic_json(run_dir / "final_metrics.json", out)
    return out


def load_word_run(run_dir: str | Path, checkpoint: str = "latest", device: str = "cpu") -> LoadedRun:
    """:func:`rnnkit.tasks.lm.load_run` of a word-level run (``checkpoint``: "latest", "best" or a step)."""
    return lm.load_run(run_dir, WordLMConfig, checkpoint, device)


def evaluate_run(run: LoadedRun, text: str | Path | None = None, encoding: str = "utf-8") -> dict[str, Any]:
    """Perplexity on a text file, or on the run's own validation and test splits."""
    cfg: WordLMConfig = run.config
    out: dict[str, Any] = {"checkpoint_step": run.step}
    if text is not None:
        tokens = tokenize_lines(read_text(text, encoding))
        if len(tokens) < 2:
            raise UserError(f"--text {text}: needs at least 2 tokens, got {len(tokens)}")
        r = _ppl_metrics(run.model, run.vocab.encode(tokens), cfg.data)
        out.update(perplexity=r["perplexity"], loss_nats=r["loss_nats"], tokens=r["tokens"],
                   coverage=run.vocab.coverage(tokens).fraction, text=str(text))
        return out
    corpus = prepare_corpus(cfg.data, cfg.trainer)
    if corpus.vocab != run.vocab:
        raise UserError(f"RUN_DIR {str(run.run_dir)!r}: its corpus now gives a different vocabulary than the "
                        f"one it was trained with; pass --text to score a file")
    for split, ids in corpus.splits.items():
        r = _ppl_metrics(run.model, ids, cfg.data)
        out[f"{split}_perplexity"] = r["perplexity"]
        out[f"{split}_loss_nats"] = r["loss_nats"]
        out[f"{split}_tokens"] = r["tokens"]
    return out


def sample_run(run: LoadedRun, prime: str, length: int, *, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, write: Any = None) -> str:
    """Generate ``length`` words after ``prime`` (words; unknown ones are an error); ``<eos>`` is a newline."""
    check_sampling(temperature, top_k, top_p)
    vocab: WordVocab = run.vocab
    words = prime.split() or ["<eos>"]
    unseen = [w for w in words if w not in vocab.stoi]
    if unseen:
        raise UserError(f"--prime: word(s) not in the model's vocabulary: {unseen[:10]!r}")
    g = sampling_generator(seed)

    def show(i: int) -> str:
        return "\n" if i == vocab.eos_index else vocab.itos[i] + " "

    ids = vocab.encode(words)
    if write is not None and prime.strip():
        write(" ".join(words) + " ")
    out = generate(run.model, ids, length, temperature=temperature, top_k=top_k, top_p=top_p, generator=g,
                   forbid=[vocab.unk_index], on_token=(lambda i: write(show(i))) if write else None)
    return "".join(show(i) for i in out)


__all__ = ["PRESETS", "PUBLISHED", "WordDataConfig", "WordLMConfig", "preset_overrides", "prepare_corpus",
           "train", "load_word_run", "evaluate_run", "sample_run"]
