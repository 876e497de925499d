r"""Synthetic long-term-dependency tasks: adding, copying memory, temporal order, number agreement.

Each task draws sequences from a seeded ``torch.Generator`` (so a seed gives the same data on any
machine), owns its model head and metrics, and states its memoryless baseline. Training goes through
:mod:`rnnkit.train`; these tasks never loop over steps themselves.

Feeding the trainer: :class:`SyntheticSamples` is a map-style data set of (by default) a million
sequences that are generated on demand, sequence i from its own generator seeded by (seed, i):
every step sees fresh sequences, as in the papers, memory stays constant, and the trainer can
shuffle, checkpoint and resume it like any sample set. Token tasks store tokens as ``uint8`` and
the model one-hot encodes them.
Test metrics are computed on fresh sequences drawn from a different stream (``seed + 1_000_003``).

Protocols (see ``ANCHORS.md``):

* ``adding`` (Arjovsky et al. 2016 form): :math:`x_t = (u_t, m_t)`, :math:`u_t \sim U[0, 1]`, one
  marker in each half of the sequence; target :math:`\sum_t m_t u_t`. Predicting 1 gives MSE 1/6.
* ``copy``: 10 symbols from 8, then T - 1 blanks, a delimiter, then 10 blanks (length T + 20); the
  output must be blank everywhere except the last 10 steps, which repeat the symbols. The memoryless
  baseline (blanks, then uniform guesses) has cross-entropy :math:`10 \ln 8 / (T + 20)`.
* ``temporal-order`` (Hochreiter & Schmidhuber 1997, experiment 6): length T..T+10 with random
  distractors a-d between a start ``B`` and an end ``E``; relevant symbols X/Y at
  t1 in [0.1T, 0.2T], t2 in [0.5T, 0.6T] (6a, 4 classes) or t1 in [0.1T, 0.2T],
  t2 in [0.33T, 0.43T], t3 in [0.66T, 0.76T] (6b, 8 classes). The paper's criterion counts a
  sequence as correct when every output error is below 0.3 (``test_strict_acc``).
* ``agreement``: "the cat(s) , which saw the dog(s) near the house(s) ... , was/were": the subject's
  number decides the verb's; the clause (about T tokens) holds attractor nouns of random number and
  only number-neutral past-tense verbs, so nothing but the first noun predicts the answer.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import build
from ..train.config import TrainerConfig
from .options import RecurrentOptions

Batch = dict[str, Tensor]

#: Seed offset of the test stream, so training and test sequences never coincide.
TEST_SEED_OFFSET = 1_000_003


def _check_length(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


class SyntheticModel(nn.Module):
    """Recurrent stack + linear head for a synthetic task.

    Args:
        input_size: features per step (the vocabulary size for token inputs, which are one-hot encoded).
        output_size: outputs per prediction.
        hidden_size, num_layers: of the recurrent stack.
        cell: a registry name (``rnnkit cells``); ``cell_options`` override its variant options.
        tokens: inputs are integer tokens (B, T) to one-hot encode, instead of floats (B, T, I).
        readout: ``"last"`` (one prediction from each sequence's final state) or ``"all"`` (every step).
    """

    def __init__(self, input_size: int, output_size: int, hidden_size: int, *, cell: str = "lstm",
                 num_layers: int = 1, tokens: bool = False, readout: str = "last",
                 **cell_options: Any) -> None:
        super().__init__()
        if readout not in ("last", "all"):
            raise ValueError(f"readout: expected 'last' or 'all', got {readout!r}")
        self.input_size, self.output_size, self.tokens, self.readout = input_size, output_size, tokens, readout
        self.cell_name = cell
        self.rnn = build(cell, input_size, hidden_size, num_layers=num_layers, batch_first=True, **cell_options)
        self.head = nn.Linear(hidden_size, output_size)

    def encode(self, x: Tensor) -> Tensor:
        """The recurrent layer's input (B, T, I) for a batch's ``x``."""
        if self.tokens:
            return F.one_hot(x.long(), self.input_size).to(self.head.weight.dtype)
        return x

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Predictions: (B, output_size) for ``readout="last"``, (B, T, output_size) for ``"all"``."""
        out, _ = self.rnn(self.encode(x), lengths=lengths)  # (B, T, H)
        return self.readout_from(out, lengths)

    def readout_from(self, out: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The head applied to the top layer's outputs ``out`` (B, T, H): at every step or at each last one."""
        if self.readout == "all":
            return self.head(out)
        if lengths is None:
            return self.head(out[:, -1])
        last = (torch.as_tensor(lengths, device=out.device) - 1).view(-1, 1, 1).expand(-1, 1, out.shape[-1])
        return self.head(out.gather(1, last).squeeze(1))  # (B, H) at each sequence's last valid step


@dataclass(frozen=True)
class SyntheticTask(abc.ABC):
    """Base of the synthetic tasks: data, model, loss and metrics for one sequence length."""

    length: int = 100
    name = ""
    input_size = 1
    output_size = 1
    tokens = False
    readout = "last"
    #: the metric that decides success, and whether lower is better
    metric = "test_loss"
    lower_is_better = True

    def __post_init__(self) -> None:
        _check_length("length", self.length, self.min_length)

    min_length = 2

    # ---- data --------------------------------------------------------------------------------
    @abc.abstractmethod
    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """``n`` sequences as a dict of tensors with a leading sample dim."""

    def sample_seeded(self, n: int, seed: int) -> Batch:
        return self.sample(n, torch.Generator().manual_seed(int(seed)))

    def test_set(self, n: int, seed: int) -> Batch:
        """Fresh test sequences from a stream disjoint from training (``seed + TEST_SEED_OFFSET``)."""
        return self.sample_seeded(n, seed + TEST_SEED_OFFSET)

    @abc.abstractmethod
    def baseline(self) -> float:
        """Value of :attr:`metric` for the best memoryless predictor."""

    # ---- model -------------------------------------------------------------------------------
    def model(self, hidden_size: int = 128, cell: str = "lstm", num_layers: int = 1,
              **cell_options: Any) -> SyntheticModel:
        return SyntheticModel(self.input_size, self.output_size, hidden_size, cell=cell, num_layers=num_layers,
                              tokens=self.tokens, readout=self.readout, **cell_options)

    def predict(self, model: SyntheticModel, batch: Batch) -> Tensor:
        return model(batch["x"], batch.get("lengths"))

    def loss(self, model: SyntheticModel, batch: Batch) -> Tensor:
        """Mean training loss of a batch."""
        return self.loss_from_predictions(self.predict(model, batch), batch)

    @abc.abstractmethod
    def loss_from_predictions(self, preds: Tensor, batch: Batch) -> Tensor:
        """Mean loss of ``preds`` against the batch's targets."""

    @torch.no_grad()
    def metrics(self, model: SyntheticModel, batch: Batch, chunk: int = 1000) -> dict[str, float]:
        """Test metrics on ``batch``, evaluated in chunks (model in eval mode, restored afterwards)."""
        was_training = model.training
        model.eval()
        try:
            n = len(batch["x"])
            parts = [self._metrics_sums({k: v[i:i + chunk] for k, v in batch.items()}, model)
                     for i in range(0, n, chunk)]
        finally:
            model.train(was_training)
        return {k: sum(p[k] for p in parts) / n for k in parts[0]}

    @abc.abstractmethod
    def _metrics_sums(self, batch: Batch, model: SyntheticModel) -> dict[str, float]:
        """Sums over the batch of each test metric (divided by the count in :meth:`metrics`)."""

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "length": self.length, "metric": self.metric, "baseline": self.baseline()}


@dataclass(frozen=True)
class AddingTask(SyntheticTask):
    """The adding problem (Arjovsky et al. 2016 form); metric: test MSE, baseline 1/6."""

    name = "adding"
    input_size = 2
    output_size = 1
    metric = "test_mse"

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        T = self.length
        u = torch.rand(n, T, generator=generator)
        half = T // 2
        i1 = torch.randint(0, half, (n,), generator=generator)
        i2 = torch.randint(half, T, (n,), generator=generator)
        m = torch.zeros(n, T)
        rows = torch.arange(n)
        m[rows, i1] = 1.0
        m[rows, i2] = 1.0
        return {"x": torch.stack([u, m], -1), "y": (u * m).sum(1)}

    def baseline(self) -> float:
        return 1.0 / 6.0

    def loss_from_predictions(self, preds, batch):
        return F.mse_loss(preds.squeeze(-1), batch["y"])

    def _metrics_sums(self, batch, model):
        err = self.predict(model, batch).squeeze(-1) - batch["y"]
        return {"test_mse": float((err * err).sum())}


@dataclass(frozen=True)
class CopyTask(SyntheticTask):
    """Copying memory: tokens 0 = blank, 1..8 = symbols, 9 = delimiter; sequence length T + 20."""

    name = "copy"
    n_symbols = 8
    n_copy = 10
    input_size = 10
    output_size = 9
    tokens = True
    readout = "all"
    metric = "test_ce"
    min_length = 1

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        T, K = self.length, self.n_copy
        sym = torch.randint(1, self.n_symbols + 1, (n, K), generator=generator)
        x = torch.zeros(n, T + 2 * K, dtype=torch.uint8)
        y = torch.zeros(n, T + 2 * K, dtype=torch.uint8)
        x[:, :K] = sym
        x[:, T + K - 1] = self.n_symbols + 1  # delimiter: the next 10 outputs are the copy
        y[:, T + K:] = sym
        return {"x": x, "y": y}

    def baseline(self) -> float:
        return self.n_copy * math.log(self.n_symbols) / (self.length + 2 * self.n_copy)

    def loss_from_predictions(self, preds, batch):
        return F.cross_entropy(preds.flatten(0, 1), batch["y"].long().flatten())  # preds (B, T+20, 9)

    def _metrics_sums(self, batch, model):
        logits = self.predict(model, batch)
        y = batch["y"].long()
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y).mean(1)
        K = self.n_copy
        hit = (logits[:, -K:].argmax(-1) == y[:, -K:]).float().mean(1)
        return {"test_ce": float(ce.sum()), "test_copy_acc": float(hit.sum())}


@dataclass(frozen=True)
class TemporalOrderTask(SyntheticTask):
    """Hochreiter & Schmidhuber 1997 experiment 6a (``variant="a"``, 4 classes) or 6b (8 classes).

    Symbols: a, b, c, d (distractors), B (start), E (end), X, Y (relevant); one-hot inputs.
    Sequence lengths vary in [T, T + 10] (padding + ``lengths``; the class is read at the last step).
    """

    variant: str = "a"
    name = "temporal-order"
    input_size = 8
    tokens = True
    metric = "test_acc"
    lower_is_better = False
    min_length = 20
    SYMBOLS = ("a", "b", "c", "d", "B", "E", "X", "Y")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in ("a", "b"):
            raise ValueError(f"variant: expected 'a' (4 classes) or 'b' (8 classes), got {self.variant!r}")

    @property
    def output_size(self) -> int:  # type: ignore[override]
        return 4 if self.variant == "a" else 8

    def _windows(self) -> list[tuple[int, int]]:
        T = self.length
        fr = [(0.1, 0.2), (0.5, 0.6)] if self.variant == "a" else [(0.1, 0.2), (0.33, 0.43), (0.66, 0.76)]
        return [(max(1, round(a * T)), max(1, round(b * T))) for a, b in fr]

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        T = self.length
        lengths = torch.randint(T, T + 11, (n,), generator=generator)
        x = torch.randint(0, 4, (n, T + 10), generator=generator, dtype=torch.int64)
        rows = torch.arange(n)
        x[:, 0] = 4  # B
        x[rows, lengths - 1] = 5  # E
        x[torch.arange(T + 10).unsqueeze(0) >= lengths.unsqueeze(1)] = 0  # padding (never read)
        y = torch.zeros(n, dtype=torch.int64)
        for lo, hi in self._windows():
            pos = torch.randint(lo, hi + 1, (n,), generator=generator)
            bit = torch.randint(0, 2, (n,), generator=generator)
            x[rows, pos] = 6 + bit  # X or Y
            y = y * 2 + bit
        return {"x": x.to(torch.uint8), "y": y, "lengths": lengths}

    def baseline(self) -> float:
        return 1.0 / self.output_size

    def loss_from_predictions(self, preds, batch):
        return F.cross_entropy(preds, batch["y"])

    def _metrics_sums(self, batch, model):
        p = self.predict(model, batch).softmax(-1)
        target = F.one_hot(batch["y"], self.output_size).to(p.dtype)
        strict = ((p - target).abs() < 0.3).all(-1)  # the 1997 criterion: every output error < 0.3
        return {"test_acc": float((p.argmax(-1) == batch["y"]).sum()), "test_strict_acc": float(strict.sum()),
                "test_ce": float(F.cross_entropy(p.clamp_min(1e-12).log(), batch["y"], reduction="sum"))}


@dataclass(frozen=True)
class AgreementTask(SyntheticTask):
    """Subject-verb number agreement across a distractor clause of about ``length`` tokens.

    Predicts the main verb's number (0 = singular "was", 1 = plural "were") from
    "the NOUN , which VERB the NOUN (PREP the NOUN | and the NOUN)* ,"; attractor nouns in the clause
    take random numbers and its verbs are number-neutral.
    """

    name = "agreement"
    output_size = 2
    tokens = True
    metric = "test_acc"
    lower_is_better = False
    min_length = 3
    NOUNS = ("cat", "dog", "mouse", "house", "tree", "bird", "child", "key")
    PLURALS = ("cats", "dogs", "mice", "houses", "trees", "birds", "children", "keys")
    VERBS = ("saw", "chased", "liked", "found", "heard", "met")
    PREPS = ("near", "behind", "with", "under", "and")
    FUNCTION = ("<pad>", "the", ",", "which")

    @classmethod
    def vocabulary(cls) -> tuple[str, ...]:
        return cls.FUNCTION + cls.NOUNS + cls.PLURALS + cls.VERBS + cls.PREPS

    @property
    def input_size(self) -> int:  # type: ignore[override]
        return len(self.vocabulary())

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        vocab = {w: i for i, w in enumerate(self.vocabulary())}
        nn_, nv, npr = len(self.NOUNS), len(self.VERBS), len(self.PREPS)
        noun0, verb0, prep0 = vocab[self.NOUNS[0]], vocab[self.VERBS[0]], vocab[self.PREPS[0]]
        T = self.length
        # "the N , which V" (5) + k * "P the N" (3 each) + "," ; k >= 1 fills about T tokens
        k = max(1, (T - 3) // 3)
        L = 5 + 3 * k + 1
        x = torch.zeros(n, L, dtype=torch.int64)
        number = torch.randint(0, 2, (n,), generator=generator)

        def noun(num: Tensor) -> Tensor:
            return noun0 + torch.randint(0, nn_, (n,), generator=generator) + num * nn_

        x[:, 0] = vocab["the"]
        x[:, 1] = noun(number)
        x[:, 2] = vocab[","]
        x[:, 3] = vocab["which"]
        x[:, 4] = verb0 + torch.randint(0, nv, (n,), generator=generator)
        for j in range(k):  # attractors: nouns of random number; the last one is nearest the verb
            x[:, 5 + 3 * j] = prep0 + torch.randint(0, npr, (n,), generator=generator)
            x[:, 6 + 3 * j] = vocab["the"]
            x[:, 7 + 3 * j] = noun(torch.randint(0, 2, (n,), generator=generator))
        x[:, L - 1] = vocab[","]
        return {"x": x.to(torch.uint8), "y": number}

    def decode(self, x: Tensor) -> str:
        """One sequence of tokens as text."""
        vocab = self.vocabulary()
        return " ".join(vocab[int(i)] for i in x)

    def baseline(self) -> float:
        return 0.5

    def loss_from_predictions(self, preds, batch):
        return F.cross_entropy(preds, batch["y"])

    def _metrics_sums(self, batch, model):
        logits = self.predict(model, batch)
        return {"test_acc": float((logits.argmax(-1) == batch["y"]).sum()),
                "test_ce": float(F.cross_entropy(logits, batch["y"], reduction="sum"))}


TASKS: dict[str, type[SyntheticTask]] = {
    "adding": AddingTask, "copy": CopyTask, "temporal-order": TemporalOrderTask, "agreement": AgreementTask,
}


def make_task(name: str, length: int, **options: Any) -> SyntheticTask:
    """Build a task by name (``adding``, ``copy``, ``temporal-order``, ``agreement``)."""
    if name not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](length=length, **options)




# ---- experiments: config, data feeding, run ---------------------------------------------------
@dataclass(frozen=True)
class ModelConfig(RecurrentOptions):
    """The recurrent model of an experiment; ``None`` options keep the registry cell's own setting.

    Args:
        cell, dropout, backend, forget_bias ... zoneout: the recurrent stack (:class:`RecurrentOptions`),
            e.g. cell "lstm", "lstm_nfg", "gru", "rnn"; backend "auto", "native", "bptt", "reference".
        hidden_size, num_layers: of the recurrent stack.
    """

    hidden_size: int = 128
    num_layers: int = 1

    def layer_options(self) -> dict[str, Any]:
        """Keyword arguments of the recurrent layer besides its sizes: variant options, dropout, backend."""
        return {**self.cell_options(), "dropout": self.dropout if self.num_layers > 1 else 0.0,
                "backend": self.backend}


@dataclass(frozen=True)
class DataConfig:
    """Which task and how much data.

    Args:
        task: "adding", "copy", "temporal-order" or "agreement".
        length: T (see each task for what it means).
        variant: temporal order "a" (4 classes) or "b" (8 classes).
        train_samples: size of the (virtual, generated on demand) training sample set; the default
            1,000,000 gives fresh sequences at every step for 20,000 steps of batch 50. It does not
            depend on the budget, so a run resumed with a larger budget sees the same data.
        test_samples: fresh test sequences for the metrics.
    """

    task: str = "adding"
    length: int = 100
    variant: str = "a"
    train_samples: int = 1_000_000
    test_samples: int = 1000


def default_trainer_config() -> TrainerConfig:
    """The experiments' trainer defaults: Adam 1e-3, batch 50, clip norm 1, evaluate every 200 steps,
    checkpoint every 1,000 steps (long runs, e.g. adding at T = 400, resume after an interruption)."""
    return TrainerConfig(batch_size=50, clip_norm=1.0, eval_every=200, log_every=50, checkpoint_every=1000)


@dataclass(frozen=True)
class ExperimentConfig:
    """A synthetic experiment: model, data, trainer (Adam 1e-3, batch 50, clip 1 by default), ``stop_at``.

    ``stop_at``: stop as soon as an evaluation reaches this value of the task's metric (below it for
    losses, above it for accuracies); None trains for the whole budget.
    """

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    trainer: TrainerConfig = field(default_factory=default_trainer_config)
    stop_at: float | None = None


class SyntheticSamples(torch.utils.data.Dataset):
    """A map-style data set of ``n`` sequences; sequence i is drawn from its own seeded generator.

    Memory stays constant however long the run, every index is a fresh sequence, and the trainer's
    seeded permutation and checkpointed position make a resumed run see exactly the same data.
    """

    def __init__(self, task: SyntheticTask, n: int, seed: int) -> None:
        self.task, self.n, self.seed = task, int(n), int(seed)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Batch:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} samples")
        g = torch.Generator().manual_seed(self.seed * 1_000_000_007 + i)
        return {k: v[0] for k, v in self.task.sample(1, g).items()}


def task_from_config(data: DataConfig) -> SyntheticTask:
    opts = {"variant": data.variant} if data.task == "temporal-order" else {}
    if data.task != "temporal-order" and data.variant != "a":
        raise ValueError(f"data.variant: only the temporal-order task has variants, got {data.variant!r} "
                         f"for task {data.task!r}")
    return make_task(data.task, data.length, **opts)


def build_model(cfg: ExperimentConfig, task: SyntheticTask) -> SyntheticModel:
    m = cfg.model
    return task.model(hidden_size=m.hidden_size, cell=m.cell, num_layers=m.num_layers, **m.layer_options())


def gradient_flow_of(model: SyntheticModel, task: SyntheticTask, batch: Batch) -> dict[str, list[float]]:
    r"""Per-step :math:`\lVert\partial L_T/\partial h_t\rVert` (and :math:`c_t`) of ``model`` on ``batch``.

    :math:`L_T` is the task loss summed over the batch's sequences (for ``copy``: over the recall steps).
    """
    from ..analysis.gradflow import gradient_flow

    lengths = batch.get("lengths")
    was = model.training
    model.eval()
    try:
        def loss_fn(out: Tensor) -> Tensor:  # out: (T, B, H) top-layer outputs
            preds = model.readout_from(out.transpose(0, 1), lengths)
            return task.loss_from_predictions(preds, batch) * len(batch["x"])

        return gradient_flow(model.rnn, model.encode(batch["x"]), loss_fn, lengths=lengths)
    finally:
        model.train(was)


def run_experiment(cfg: ExperimentConfig, run_dir: str | Path, *, resume: bool = False, quiet: bool = False,
                   analyse: bool = True) -> dict[str, Any]:
    """Train ``cfg``'s model on its task with :class:`rnnkit.train.Trainer` and record the evidence.

    Writes into ``run_dir`` (besides the trainer's ``config.toml``, ``metrics.jsonl``, checkpoints):
    ``experiment.json`` (task, metric, baseline, result), ``learning_curve.png`` (with the baseline),
    and with ``analyse``: ``gradient_flow.json`` (untrained and trained model) and
    ``gate_stats.json`` (gated cells).

    Returns:
        ``{"task", "cell", "length", <metric>: value, "baseline", "steps", "wall_s", ...}``.
    """
    import json
    import time

    from ..analysis import plots
    from ..analysis.report import curves, read_metrics
    from ..train import Trainer, seed_everything

    run_dir = Path(run_dir)
    tcfg = cfg.trainer
    task = task_from_config(cfg.data)
    if tcfg.metric == "loss":  # the trainer's generic default: use the task's metric
        from dataclasses import replace

        tcfg = replace(tcfg, metric=task.metric, metric_mode="min" if task.lower_is_better else "max")
    cfg = ExperimentConfig(cfg.model, cfg.data, tcfg, cfg.stop_at)
    seed_everything(tcfg.seed)
    model = build_model(cfg, task)
    test = task.test_set(cfg.data.test_samples, tcfg.seed)
    probe = {k: v[:32] for k, v in test.items()}
    if cfg.data.train_samples < 1 or cfg.data.test_samples < 1:
        raise ValueError(f"data.train_samples / data.test_samples: expected positive integers, got "
                         f"{cfg.data.train_samples} / {cfg.data.test_samples}")
    train = SyntheticSamples(task, cfg.data.train_samples, tcfg.seed)
    flow: dict[str, Any] = {}
    if analyse and not resume:
        flow[f"{cfg.model.cell} (untrained)"] = gradient_flow_of(model, task, probe)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return task.metrics(m, test)

    def maybe_stop(trainer, info: dict[str, Any]) -> None:
        if cfg.stop_at is None:
            return
        v = info["metrics"][task.metric]
        if (v <= cfg.stop_at) if task.lower_is_better else (v >= cfg.stop_at):
            trainer.request_stop(f"{task.metric} reached {cfg.stop_at}")

    t0 = time.perf_counter()
    trainer = Trainer(model, task, train, tcfg, run_dir, evaluate=evaluate, callbacks={"eval": maybe_stop},
                      resume=resume, quiet=quiet, full_config=cfg)
    fit = trainer.fit()
    wall = time.perf_counter() - t0
    final = task.metrics(model, test)
    result: dict[str, Any] = {"task": task.name, "cell": cfg.model.cell, "length": task.length,
                              "hidden": cfg.model.hidden_size, task.metric: final[task.metric],
                              "baseline": task.baseline(), "beats_baseline": _beats(task, final[task.metric]),
                              "steps": fit["step"], "wall_s": round(fit.get("elapsed_s", wall), 2),
                              "seed": tcfg.seed, **{k: v for k, v in final.items() if k != task.metric},
                              "stop_reason": fit.get("stop_reason")}
    if analyse:
        flow[f"{cfg.model.cell} (trained, {fit['step']} steps)"] = gradient_flow_of(model, task, probe)
        if flow:
            old = {}
            if resume and (run_dir / "gradient_flow.json").is_file():
                old = json.loads((run_dir / "gradient_flow.json").read_text()).get("curves", {})
                old = {k: v for k, v in old.items() if "untrained" in k}
            (run_dir / "gradient_flow.json").write_text(json.dumps(
                {"task": task.name, "length": task.length, "curves": {**old, **flow},
                 "title": f"Gradient flow, {task.name} T={task.length}, {cfg.model.cell}"}))
        if model.rnn.cell.family != "rnn":
            from ..analysis.gates import gate_statistics

            sub = {k: v[:200] for k, v in test.items()}
            stats = gate_statistics(model.rnn, model.encode(sub["x"]), lengths=sub.get("lengths"))
            (run_dir / "gate_stats.json").write_text(json.dumps(stats))
    (run_dir / "experiment.json").write_text(json.dumps(
        {"task": task.name, "metric": task.metric, "lower_is_better": task.lower_is_better,
         "baseline": task.baseline(), "result": result}, indent=1))
    series = curves(read_metrics(run_dir))
    # the training loss shares the metric's scale only when the metric is a loss
    keep = (("train/loss",) if task.lower_is_better else ()) + (f"eval/{task.metric}",)
    main = {k: v for k, v in series.items() if k in keep}
    if main:
        plots.save(plots.learning_curve(main, ylabel=task.metric, baseline=task.baseline(),
                                        title=f"{task.name} T={task.length}, {cfg.model.cell}"),
                   run_dir / "learning_curve.png")
    return result


def _beats(task: SyntheticTask, value: float) -> bool:
    """Clearly better than the memoryless baseline: by 5% of the baseline loss, or of the accuracy headroom."""
    b = task.baseline()
    return value < 0.95 * b if task.lower_is_better else value > b + 0.05 * (1 - b)


__all__ = ["SyntheticModel", "SyntheticTask", "AddingTask", "CopyTask", "TemporalOrderTask", "AgreementTask",
           "TASKS", "make_task", "TEST_SEED_OFFSET", "ModelConfig", "DataConfig", "ExperimentConfig",
           "SyntheticSamples", "default_trainer_config", "task_from_config", "build_model", "gradient_flow_of",
           "run_experiment"]
