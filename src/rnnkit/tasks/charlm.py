"""Character-level language model: next-character prediction and text generation (char-rnn).

The model, its streaming evaluation and decoding are :mod:`rnnkit.tasks.lm` (shared with the word-level
task); this file holds the character corpus, the samples written during training and the metrics in bits
per character.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..data.text import CharVocab, Coverage, load_corpus, read_text, split_text
from ..errors import UserError
from ..metrics.lm import lm_metrics
from ..train.config import OptimConfig, TrainerConfig
from . import lm
from .base import atomic_json, check_saved_vocab, open_run_dir, reporter, with_budget
from .decoding import check_sampling, generate, sampling_generator
from .lm import DEFAULT_MINUTES, VOCAB_FILE, LMConfig, LoadedRun, stream_loss


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


def _default_trainer() -> TrainerConfig:
    return TrainerConfig(batch_size=32, tbptt=100, clip_norm=5.0, eval_every=500, log_every=50,
                         optim=OptimConfig(name="adam", lr=2e-3))


@dataclass(frozen=True)
class CharLMConfig:
    """Everything a ``charlm train`` run is made of; saved as the run's ``config.toml``."""

    VOCAB_KIND: ClassVar[str] = "char"

    # forget bias 0 at init (torch.nn.LSTM's): in 300-step trials on Shakespeare, rnnkit's usual bias of 1
    # was 0.03-0.04 nats/char behind (docs/results.md)
    model: LMConfig = field(default_factory=lambda: LMConfig(cell="lstm_fb0"))
    data: CharDataConfig = field(default_factory=CharDataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    trainer: TrainerConfig = field(default_factory=_default_trainer)


SAMPLES_FILE = "samples.txt"


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
    ids = vocab.compact_dtype  # 1 byte per character for up to 256 symbols: a large text stays small
    return CharCorpus(name, vocab, vocab.encode(train_text, ids), vocab.encode(val_text, ids), vocab.coverage(val_text))


def train(cfg: CharLMConfig, run_dir: str | Path, *, resume: bool = False, quiet: bool = False,
          progress: bool | None = None) -> dict[str, Any]:
    """Train a character LM into ``run_dir``; print samples at each evaluation; return final metrics.

    Nothing in an existing run directory is touched unless the inputs check out (``--resume`` with the
    same vocabulary, or a directory without checkpoints).
    """
    cfg = with_budget(cfg, DEFAULT_MINUTES)
    run_dir = open_run_dir(run_dir, resume)
    corpus = prepare_corpus(cfg.data, cfg.trainer)
    if resume:
        check_saved_vocab(run_dir / VOCAB_FILE, corpus.vocab, "symbols")
    check_sampling(cfg.sample.temperature, cfg.sample.top_k, cfg.sample.top_p)
    prime = encode_prime(corpus.vocab, cfg.sample.prime)
    model = lm.new_model(len(corpus.vocab), cfg.model, cfg.trainer.seed)
    say = reporter(quiet)
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
    trainer, result = lm.fit_stream(model, corpus.train_ids, cfg, run_dir, corpus.vocab, evaluate=evaluate,
                                    callbacks={"eval": on_eval}, resume=resume, quiet=quiet, progress=progress)
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
    atomic_json(run_dir / "final_metrics.json", out)
    return out


def _trained_chars(result: dict[str, Any], trainer: Any) -> int:
    """Characters read by training so far (all epochs), from the step count and the stream layout."""
    d = trainer.data
    per_epoch = d.length * d.x.shape[1]
    steps_per_epoch = trainer.steps_per_epoch
    full, rest = divmod(int(result["step"]), steps_per_epoch)
    k = trainer.config.tbptt * trainer.config.grad_accum * d.x.shape[1]
    return full * per_epoch + min(rest * k, per_epoch)


def load_run(run_dir: str | Path, config_cls: type = CharLMConfig, checkpoint: str = "latest",
             device: str = "cpu") -> LoadedRun:
    """:func:`rnnkit.tasks.lm.load_run` of a character-level run (``checkpoint``: "latest", "best" or a step)."""
    return lm.load_run(run_dir, config_cls, checkpoint, device)


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
        text_ids, cov = run.vocab.encode(text, run.vocab.compact_dtype), run.vocab.coverage(text)
    total, n = stream_loss(run.model, text_ids, batch_size)
    m = lm_metrics(total, n)
    return {"loss_nats": m["loss_nats"], "bits_per_char": m["bits_per_char"], "chars": n,
            "coverage": cov.fraction, "unknown_chars": cov.unknown, "text": name, "checkpoint_step": run.step}


def sample_run(run: LoadedRun, prime: str, length: int, *, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, write: Callable[[str], None] | None = None) -> str:
    """Generate ``length`` characters after ``prime`` and stream each to ``write`` as it is drawn."""
    check_sampling(temperature, top_k, top_p)
    if length < 0:
        raise UserError(f"--length: expected >= 0, got {length}")
    ids = encode_prime(run.vocab, prime)
    g = sampling_generator(seed)
    if write is not None:
        write(run.vocab.decode(ids))
    on_token = (lambda i: write(run.vocab.itos[i])) if write is not None else None
    out = generate(run.model, ids, length, temperature=temperature, top_k=top_k, top_p=top_p, generator=g,
                   forbid=[run.vocab.unk_index], on_token=on_token)
    return run.vocab.decode(ids) + run.vocab.decode(out)


__all__ = ["CharDataConfig", "SampleConfig", "CharLMConfig", "CharCorpus", "prepare_corpus", "train", "load_run",
           "evaluate_text", "sample_run", "encode_prime", "default_prime"]
