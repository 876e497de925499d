"""A tiny built-in model and tasks for testing and demonstrating the Trainer (also used by its tests'
subprocesses: SIGKILL resume, torchrun). Not meant for real work.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import LSTM


class TinyLM(nn.Module):
    """Embedding -> rnnkit.LSTM -> linear over the vocabulary; ``forward(x (T, B), state) -> (logits, state)``."""

    def __init__(self, vocab: int = 11, emb: int = 8, hidden: int = 16, layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.rnn = LSTM(emb, hidden, layers, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        h, state = self.rnn(self.drop(self.embed(x)), state)  # (T, B, H)
        return self.head(self.drop(h)), state  # (T, B, V)


class StreamLMTask:
    """Next-token prediction over streams: per-step cross-entropy, shape (T, B)."""

    def forward(self, model: nn.Module, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        return model(x, state)

    def loss(self, pred: Tensor, y: Tensor) -> Tensor:
        T, B, V = pred.shape
        return F.cross_entropy(pred.reshape(T * B, V), y.reshape(T * B), reduction="none").view(T, B)


class TinyClassifier(nn.Module):
    """rnnkit.LSTM over (B, T, F) features, last hidden state -> linear classes."""

    def __init__(self, features: int = 3, hidden: int = 12, classes: int = 3, dropout: float = 0.0):
        super().__init__()
        self.rnn = LSTM(features, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        _, (h, _) = self.rnn(x)
        return self.head(self.drop(h[-1]))


class ClassifyTask:
    """Sample task: mean cross-entropy over the batch of ``{"x": (B, T, F), "y": (B,)}``."""

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(model(batch["x"]), batch["y"])


def random_tokens(n: int, vocab: int = 11, seed: int = 0) -> Tensor:
    """A learnable token sequence: a noisy repeating pattern."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) % 7
    noise = torch.randint(0, vocab, (n,), generator=g)
    keep = torch.rand(n, generator=g) < 0.8
    return torch.where(keep, base, noise)


def random_classification(n: int = 64, T: int = 6, features: int = 3, classes: int = 3,
                          seed: int = 0) -> dict[str, Tensor]:
    """Sequences whose class is the sign pattern of the mean of feature 0 (learnable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, features, generator=g)
    y = torch.bucketize(x[:, :, 0].mean(1), torch.tensor([-0.2, 0.2]))
    return {"x": x, "y": y.clamp_max(classes - 1)}


__all__ = ["TinyLM", "StreamLMTask", "TinyClassifier", "ClassifyTask", "random_tokens", "random_classification",
           "run", "main"]


def run(out: str | None, *, kind: str = "stream", resume: bool = False, threads: int | None = 1,
        quiet: bool = True, dropout: float = 0.1, **trainer_kw: Any) -> dict[str, Any]:
    """Train the toy model with ``TrainerConfig(**trainer_kw)``; the driver of the Trainer's own tests.

    ``kind``: "stream" (TinyLM, TBPTT over random tokens) or "sample" (TinyClassifier). Returns the
    final metrics plus ``params``, the final state_dict.
    """
    from .config import TrainerConfig, load_config
    from .trainer import StreamData, Trainer, seed_everything

    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(TrainerConfig, None, trainer_kw)  # dotted keys allowed: **{"optim.lr": 0.1}
    seed_everything(cfg.seed)
    if kind == "stream":
        ids = random_tokens(4001, seed=1)
        model: nn.Module = TinyLM(dropout=dropout)
        task: Any = StreamLMTask()
        data: Any = StreamData(ids[:-1], ids[1:])
    else:
        model, task, data = TinyClassifier(dropout=dropout), ClassifyTask(), random_classification(96, seed=1)
    trainer = Trainer(model, task, data, cfg, out, resume=resume, quiet=quiet, progress=False)
    result = trainer.fit()
    result["params"] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m rnnkit.train.toy --out DIR [--resume] [--kind stream|sample] [--set key=value ...]``."""
    import argparse

    from .config import parse_override

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--out", default=None)
    p.add_argument("--kind", default="stream", choices=["stream", "sample"])
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args(argv)
    kw = {}
    for item in a.set:
        keys, value = parse_override(item)
        kw[".".join(keys)] = value
    run(a.out, kind=a.kind, resume=a.resume, threads=a.threads, dropout=a.dropout, **kw)


if __name__ == "__main__":
    main()
