"""The training loop: truncated BPTT over streams or full BPTT over samples, with exact resume.

Two kinds of training data:

* :class:`StreamData` ``(inputs, targets)``, both with a leading time axis N: laid out as B contiguous
  streams (:func:`rnnkit.data.streams.batchify`) and trained with truncated BPTT (``tbptt`` = k1,
  ``tbptt_backward`` = k2). The task provides::

      forward(model, x, state) -> (pred, state)   # x: (T, B, ...) time-major; state None at a stream start
      loss(pred, y) -> Tensor (T, B)               # unreduced; or (loss, weight) with weight (T, B)

  The recurrent state may be a tensor or a nested tuple/list/dict of tensors; it is detached between
  windows and reset to None at the start of every epoch.

* Samples: a dict of tensors with a leading sample axis, a list of per-sample dicts, or a map-style
  ``torch.utils.data.Dataset``; batched by a permutation seeded with (seed, epoch). The task provides::

      loss(model, batch) -> Tensor | (Tensor, n_items)   # mean over the batch (or over n_items items)
      collate(items) -> batch                            # optional, for lists / Datasets

Every optimizer step: forward/backward of ``grad_accum`` micro-batches on the summed loss, all-reduce of
gradients and counts (distributed), division by the global count (so "mean" is a true mean over tokens
or items, and "sum_time" a sum over time averaged over streams), non-finite check, clipping, schedule,
optimizer step. Evaluation, callbacks and checkpoints follow, in that order.
"""

from __future__ import annotations

import math
import random
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch
from torch import Tensor, nn

from ..data.streams import batchify, chunk_bounds, tbptt_plan
from ..errors import TrainingError, UserError
from . import checkpoint as ckpt
from . import distributed as dist_util
from .config import TrainerConfig, config_to_dict, save_config
from .monitor import MetricsLog, Progress, restore_record, strict_record
from .optim import Schedule, build_optimizer
from .rundir import check_run_dir, lock_run_dir, read_saved_config, setting_differences

EVENTS = ("step_end", "eval", "checkpoint", "epoch_end", "fit_end")
Callback = Callable[["Trainer", dict[str, Any]], None]


@dataclass(frozen=True)
class StreamData:
    """A long sequence for truncated BPTT: ``inputs`` and ``targets`` with the same leading length N.

    Shape: inputs (N,) token ids or (N, F) features; targets (N,) or (N, F'). Position i of ``targets``
    is what the model should predict after reading ``inputs[: i + 1]`` (for a language model
    ``inputs = ids[:-1]``, ``targets = ids[1:]``).
    """

    inputs: Tensor
    targets: Tensor

    def __post_init__(self) -> None:
        for name in ("inputs", "targets"):
            v = getattr(self, name)
            if not isinstance(v, Tensor) or v.dim() < 1:
                raise UserError(f"StreamData.{name}: expected a tensor with a leading time axis, got {v!r:.60}")
        if self.inputs.shape[0] != self.targets.shape[0]:
            raise UserError(f"StreamData: inputs and targets must have the same length, got "
                            f"{self.inputs.shape[0]} and {self.targets.shape[0]}")


@dataclass
class TrainState:
    """The progress of a run: every value besides tensors that a checkpoint saves and a resume restores.

    Saved whole as the checkpoint's ``"progress"`` entry (strict JSON, see
    :func:`~rnnkit.train.monitor.strict_record`) and restored whole, so a field added here is saved and
    restored with no other change. Tensors (model, optimizer, carried recurrent state, RNG states) are
    saved next to it.
    """

    step: int = 0
    epoch: int = 1  # 1-based current epoch
    batch_index: int = 0  # micro-batches consumed in the current epoch
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    best: float | None = None  # best value of config.metric so far
    best_step: int | None = None
    evals_without_improvement: int = 0
    elapsed_s: float = 0.0  # training seconds of the earlier runs this one resumes
    last_eval: dict[str, float] = field(default_factory=dict)
    last_eval_step: int | None = None
    train_loss: float = math.nan  # mean training loss over the last log interval

    def to_json(self) -> dict[str, Any]:
        return strict_record(asdict(self))

    @classmethod
    def from_json(cls, data: Any) -> TrainState:
        """Rebuild from :meth:`to_json` output; raises ``ValueError`` naming a missing or mistyped field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"progress: expected a table, got {type(data).__name__}")
        data = restore_record(dict(data))
        if data.get("train_loss", 0.0) is None:  # written as null before non-finite values were flagged
            data["train_loss"] = math.nan
        hints = get_type_hints(cls)
        for f in fields(cls):
            if f.name not in data:
                raise ValueError(f"progress: missing {f.name!r}")
            if not _is_instance(data[f.name], hints[f.name]):
                raise ValueError(f"progress.{f.name}: expected {hints[f.name]}, got {data[f.name]!r:.60}")
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def _is_instance(value: Any, tp: Any) -> bool:
    """isinstance for the annotations of :class:`TrainState` (an int is a float, a bool is not an int)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_is_instance(value, a) for a in get_args(tp))
    if origin is dict:
        kt, vt = get_args(tp)
        return isinstance(value, dict) and all(_is_instance(k, kt) and _is_instance(v, vt) for k, v in value.items())
    if tp is type(None):
        return value is None
    if isinstance(value, bool):
        return tp is bool
    if tp is float:
        return isinstance(value, (int, float))
    return isinstance(value, tp)


# ------------------------------------------------------------------------------------ state helpers


def tree_map(fn: Callable[[Tensor], Any], obj: Any) -> Any:
    """Apply ``fn`` to every tensor of a nested tuple/list/dict."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(tree_map(fn, v) for v in obj)
    if isinstance(obj, list):
        return [tree_map(fn, v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: tree_map(fn, v) for k, v in obj.items()}
    return obj


def tree_tensors(obj: Any) -> list[Tensor]:
    out: list[Tensor] = []
    tree_map(out.append, obj)
    return out


def detach_state(state: Any) -> Any:
    """The recurrent state with every tensor detached (a gradient cut)."""
    return tree_map(lambda t: t.detach(), state)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA); call before building the model."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _finite(tensors: Iterable[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


@torch.no_grad()
def evaluate_stream(model: nn.Module, task: Any, data: StreamData, batch_size: int = 1, chunk: int = 100,
                    device: torch.device | str | None = None) -> dict[str, float]:
    """Mean per-step loss of ``task`` over a whole stream, carrying the state across chunks (no gradients).

    The evaluation counterpart of TBPTT training: ``data`` is laid out as ``batch_size`` streams, run
    ``chunk`` steps at a time, with ``task.forward`` / ``task.loss`` as in training. Returns
    ``{"loss": mean loss per (weighted) step, "steps": number of steps counted}``; for a language model
    ``exp(loss)`` is the perplexity and ``loss / ln 2`` the bits per token.
    """
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = batchify(data.inputs, batch_size).to(device)
    y = batchify(data.targets, batch_size).to(device)
    total, count, state = 0.0, 0.0, None
    for start, end in chunk_bounds(x.shape[0], chunk):
        pred, state = task.forward(model, x[start:end], state)
        out = task.loss(pred, y[start:end])
        lt, wt = out if isinstance(out, tuple) else (out, None)
        total += float(lt.double().sum() if wt is None else (lt.double() * wt).sum())
        count += float(lt.numel() if wt is None else wt.double().sum())
    model.train(was_training)
    return {"loss": total / count if count else float("nan"), "steps": count}


@dataclass
class _Resumed:
    """A checkpoint decoded for resuming (see :meth:`Trainer._decode`)."""

    progress: TrainState
    data_kind: str
    n_batches: int
    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    ranks: list[dict[str, Any]]
    rng_numpy: tuple[Any, ...]
    rng_python: tuple[Any, ...]
    trainer_config: dict[str, Any]


# ------------------------------------------------------------------------------------ data sources


class _Streams:
    """Stream data laid out for TBPTT on this rank; micro-batch i is chunk i."""

    kind = "stream"
    unit = "tok"

    def __init__(self, data: StreamData, cfg: TrainerConfig, rank: int, world: int, device: torch.device):
        self.x = batchify(data.inputs, cfg.batch_size, rank=rank, world_size=world).to(device)
        self.y = batchify(data.targets, cfg.batch_size, rank=rank, world_size=world).to(device)
        self.length = self.x.shape[0]
        self.k1 = cfg.tbptt
        self.k2 = cfg.tbptt_backward or cfg.tbptt
        self.n_batches = len(chunk_bounds(self.length, self.k1))


class _Samples:
    """Sample data batched by a (seed, epoch)-seeded permutation; micro-batch i is slice i of it."""

    kind = "sample"
    unit = "samples"

    def __init__(self, data: Any, cfg: TrainerConfig, rank: int, world: int, seed: int,
                 collate: Callable[[list[Any]], Any] | None):
        if isinstance(data, Mapping):
            lens = {k: len(v) for k, v in data.items() if isinstance(v, Tensor)}
            if not lens or len(set(lens.values())) != 1:
                raise UserError(f"training data: expected a dict of tensors with the same leading size, got "
                                f"sizes {lens}")
            self.n = next(iter(lens.values()))
        elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
            self.n = len(data)
        else:
            raise UserError(f"training data: expected StreamData, a dict of tensors, a list of samples or a "
                            f"map-style Dataset, got {type(data).__name__}")
        if self.n < 1:
            raise UserError("training data: the data set is empty")
        if cfg.batch_size < world:
            raise UserError(f"trainer.batch_size: expected at least one sample per process ({world}), "
                            f"got {cfg.batch_size}")
        self.data, self.cfg, self.rank, self.world, self.seed = data, cfg, rank, world, seed
        self.collate = collate
        bs = cfg.batch_size
        self.n_batches = self.n // bs if cfg.drop_last else math.ceil(self.n / bs)
        if self.n_batches < 1:
            raise UserError(f"trainer.batch_size={bs} with drop_last: larger than the data set ({self.n})")
        self._perm_epoch: int | None = None
        self._perm: Tensor | None = None

    def batch(self, epoch: int, index: int) -> tuple[Any, int]:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        bs = self.cfg.batch_size
        idx = self._perm[index * bs:(index + 1) * bs]
        idx = torch.tensor_split(idx, self.world)[self.rank]
        if isinstance(self.data, Mapping):
            return {k: (v[idx] if isinstance(v, Tensor) else v) for k, v in self.data.items()}, len(idx)
        items = [self.data[int(i)] for i in idx]
        collate = self.collate or torch.utils.data.default_collate
        return collate(items), len(idx)


# ------------------------------------------------------------------------------------ trainer


class Trainer:
    """Train ``model`` on ``train_data`` with ``task``; see the module docstring for the task protocol.

    Args:
        model: the module to train (moved to ``config.device``).
        task: object with ``forward``/``loss`` (stream data) or ``loss`` (sample data).
        train_data: :class:`StreamData`, a dict of tensors, a list of samples or a Dataset.
        config: :class:`TrainerConfig`.
        run_dir: run directory (``config.toml``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``);
            None writes nothing and cannot checkpoint.
        evaluate: ``evaluate(model) -> dict[str, float]``, run in eval mode without gradients (and with
            the RNG state forked, so sampling does not change training) every ``eval_every`` steps and
            at the end. Its ``config.metric`` entry chooses the best checkpoint.
        callbacks: ``{event: fn or [fn, ...]}`` with events "step_end", "eval", "checkpoint",
            "epoch_end", "fit_end"; ``fn(trainer, info)``; run on rank 0 only, RNG forked.
        resume: continue from the newest good checkpoint in ``run_dir`` (start fresh if there is none).
        quiet: no progress output. ``progress``: force the rich bar (True) or plain lines (False).
        full_config: the task's whole config, saved as ``config.toml`` (default: ``config``).
    """

    def __init__(self, model: nn.Module, task: Any, train_data: Any, config: TrainerConfig,
                 run_dir: str | Path | None, *, evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
                 callbacks: Mapping[str, Callback | Sequence[Callback]] | None = None, resume: bool = False,
                 quiet: bool = False, progress: bool | None = None, full_config: Any = None) -> None:
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"config: expected a TrainerConfig, got {type(config).__name__}")
        if config.steps is None and config.epochs is None and config.minutes is None:
            raise UserError("trainer budget: set at least one of steps, epochs or minutes (all are unset)")
        self.config = config
        self.model = model
        self.task = task
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.evaluate_fn = evaluate
        self.resume = resume
        self.quiet = quiet
        self._progress_mode = progress
        self.full_config = full_config if full_config is not None else config
        self.callbacks: dict[str, list[Callback]] = {e: [] for e in EVENTS}
        for event, fns in (callbacks or {}).items():
            for fn in ([fns] if callable(fns) else list(fns)):
                self.add_callback(event, fn)

        self.device = self._pick_device(config.device)
        self._owns_process_group = dist_util.env_world_size() > 1 and not dist_util.active()
        self.rank, self.world_size = dist_util.init_from_env(self.device)
        if self.device.type == "cuda" and self.world_size > 1 and config.device in ("auto", "cuda"):
            import os

            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        self.is_main = self.rank == 0

        if isinstance(train_data, StreamData):
            for name in ("forward", "loss"):
                if not callable(getattr(task, name, None)):
                    raise TypeError(f"task: stream data needs task.{name}(...), missing on {type(task).__name__}")
            self.data: _Streams | _Samples = _Streams(train_data, config, self.rank, self.world_size, self.device)
        else:
            if not callable(getattr(task, "loss", None)):
                raise TypeError(f"task: sample data needs task.loss(model, batch), missing on {type(task).__name__}")
            self.data = _Samples(train_data, config, self.rank, self.world_size, config.seed,
                                 getattr(task, "collate", None))
        if self.data.kind == "stream" and config.batch_size % self.world_size:
            raise UserError(f"trainer.batch_size: expected a multiple of the number of processes "
                            f"({self.world_size}), got {config.batch_size}")

        self.model.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise UserError("model: has no trainable parameters")
        top = min(torch.finfo(p.dtype).max for p in self.params if p.is_floating_point())
        if config.optim.lr > top:
            raise UserError(f"trainer.optim.lr: {config.optim.lr!r} is beyond the range of the model's parameters "
                            f"(at most {top:.3g} in {self.params[0].dtype}); expected a much smaller rate")
        self.optimizer = build_optimizer(self.params, config.optim)
        self.steps_per_epoch = math.ceil(self.data.n_batches / config.grad_accum)
        self.total_steps = self._total_steps()
        self.schedule = Schedule(config.schedule, config.optim.lr, self.total_steps, config.metric_mode,
                                 budget_s=config.minutes * 60 if config.minutes else None, clock=self._elapsed)

        # progress of the run: all of it is in the checkpoint (state whole, carry per process)
        self.state = TrainState()
        self.carry: Any = None  # recurrent state at the next window start (stream data)
        self.last_checkpoint_step: int | None = None
        self._opened, self._resume_from, self._lock = False, None, None  # see open_run_dir
        self.stop_reason: str | None = None
        self._stop_requested: str | None = None
        self._log_acc = [0.0, 0.0, 0, 0.0]  # loss sum, loss count, units, seconds since last log
        self._log_gnorm: float | None = None

    # ---------------------------------------------------------------- public helpers

    def add_callback(self, event: str, fn: Callback) -> None:
        """Register ``fn(trainer, info)`` for ``event`` (one of :data:`EVENTS`)."""
        if event not in EVENTS:
            raise UserError(f"callbacks: unknown event {event!r}; expected one of {', '.join(EVENTS)}")
        if not callable(fn):
            raise TypeError(f"callbacks[{event!r}]: expected a callable, got {fn!r}")
        self.callbacks[event].append(fn)

    def request_stop(self, reason: str = "stopped by a callback") -> None:
        """Stop after the current step (e.g. from a callback)."""
        self._stop_requested = reason

    @property
    def step(self) -> int:
        """Optimizer steps done (``state.step``)."""
        return self.state.step

    @property
    def epoch(self) -> int:
        """The current epoch, 1-based (``state.epoch``)."""
        return self.state.epoch

    @property
    def best_step(self) -> int | None:
        """The step of the best evaluation so far (``state.best_step``)."""
        return self.state.best_step

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.run_dir / "checkpoints" if self.run_dir is not None else None

    @property
    def lr(self) -> float:
        return self.schedule.lr(self.state.step, self.state.epoch)

    # ---------------------------------------------------------------- setup

    @staticmethod
    def _pick_device(name: str) -> torch.device:
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise UserError(f"--device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {name!r}: CUDA is not available on this machine; use 'cpu' or 'auto'")
        return dev

    def _total_steps(self) -> int | None:
        c = self.config
        totals = []
        if c.steps is not None:
            totals.append(c.steps)
        if c.epochs is not None:
            totals.append(c.epochs * self.steps_per_epoch)
        return min(totals) if totals else None

    def open_run_dir(self) -> None:
        """Take the run directory: lock it, check a resume against its checkpoint, write ``config.toml``.

        Nothing in the directory changes before the resume checks out. :meth:`fit` does this first; a task
        that writes files of its own into the run directory calls it before writing them. The lock is
        held until :meth:`fit` ends.

        Raises:
            UserError: the directory is another process's, has checkpoints but no resume was asked for,
                or the checkpoint does not fit this run (the message names the settings that differ).
        """
        if not self._opened:
            self._resume_from = self._setup_run_dir()
            self._opened = True

    def _setup_run_dir(self) -> ckpt.Checkpoint | None:
        if self.run_dir is None:
            return None
        check_run_dir(self.run_dir, self.resume)
        if self.is_main:
            self._lock = lock_run_dir(self.run_dir)
            self._lock.__enter__()
        found = self._find_resume_point() if self.resume else None
        if found is not None:
            self._check_resume(found)
        if self.is_main:
            save_config(self.full_config, self.run_dir)
        return found

    def _release_run_dir(self) -> None:
        lock, self._lock = self._lock, None
        self._opened, self._resume_from = False, None
        if lock is not None:
            lock.__exit__(None, None, None)

    # ---------------------------------------------------------------- the loop

    def fit(self) -> dict[str, Any]:
        """Train until the budget is spent (or early stopping); return the final metrics.

        The model keeps its final weights; the best evaluation's weights are in the checkpoint of
        ``best_step`` (``model.load_state_dict(model_state_dict(find_checkpoint(run_dir, "best")))``).

        Returns:
            dict with ``step``, ``epoch``, ``train_loss`` (mean over the last log interval),
            ``skipped_steps``, ``elapsed_s``, ``stop_reason``, the last evaluation's metrics and
            ``best_<metric>`` / ``best_step`` when an evaluation ran.
        """
        c = self.config
        previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
        if c.deterministic:
            import os

            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        try:
            return self._fit()
        finally:
            torch.use_deterministic_algorithms(previous[0])
            torch.backends.cudnn.benchmark = previous[1]

    def _fit(self) -> dict[str, Any]:
        try:
            self.open_run_dir()
            if self._resume_from is not None:
                self.load_checkpoint(self._resume_from)
            return self._loop()
        finally:
            self._release_run_dir()

    def _loop(self) -> dict[str, Any]:
        c = self.config
        dist_util.broadcast_module(self.model)
        self.log = MetricsLog(self.run_dir if self.is_main else None, c.tensorboard,
                              purge_after=self.state.step if self.resume else None)
        if self.resume:
            self.log.truncate_after(self.state.step)
        self.progress = Progress(self.total_steps, quiet=self.quiet or not self.is_main, log_every=c.log_every,
                                 unit=self.data.unit, rich=self._progress_mode)
        self._t_start = time.perf_counter()
        self.progress.start(self.state.step)
        try:
            while self._budget_left():
                self._train_step()
                self._after_step()
                if self.stop_reason is not None:
                    break
            if self.stop_reason is None:
                self.stop_reason = "budget"
            if self._log_acc[2]:  # steps since the last record (a stop between log intervals)
                self._log_train()
            if self.evaluate_fn is not None and self.state.last_eval_step != self.state.step:
                self._run_eval()
            if self.checkpoint_dir is not None and self.last_checkpoint_step != self.state.step:
                self._save()
        finally:
            self.progress.stop()
            self.log.flush()
        result = self._final_metrics()
        self._fire("fit_end", result)
        self.log.close()
        if self._owns_process_group:
            torch.distributed.destroy_process_group()
            self._owns_process_group = False
        return result

    def _elapsed(self) -> float:
        start = getattr(self, "_t_start", None)
        return self.state.elapsed_s + (time.perf_counter() - start if start is not None else 0.0)

    @property
    def elapsed_s(self) -> float:
        """Training wall-clock seconds so far, summed over resumes (what the minutes budget counts)."""
        return self._elapsed()

    def _budget_left(self) -> bool:
        c = self.config
        if c.steps is not None and self.state.step >= c.steps:
            return False
        if c.epochs is not None and self.state.epoch > c.epochs:
            return False
        return True

    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _micro_stream(self) -> tuple[Tensor, Tensor, int]:
        """Forward/backward of one TBPTT window; returns (loss sum, count, tokens) of this rank."""
        d: _Streams = self.data  # type: ignore[assignment]
        plan = tbptt_plan(d.length, d.k1, d.k2, self.state.batch_index)
        state = self.carry
        new_carry = state if plan.next_window == plan.window else None
        losses, weights = [], []
        for seg in plan.segments:
            if seg.detach_before:
                state = detach_state(state)
            with self._autocast():
                pred, state = self.task.forward(self.model, d.x[seg.start:seg.end], state)
                if seg.loss:
                    out = self.task.loss(pred, d.y[seg.start:seg.end])
            if seg.loss:
                lt, wt = out if isinstance(out, tuple) else (out, None)
                want = (seg.end - seg.start, d.x.shape[1])
                if not isinstance(lt, Tensor) or tuple(lt.shape) != want:
                    got = tuple(lt.shape) if isinstance(lt, Tensor) else type(lt).__name__
                    raise TypeError(f"task.loss(pred, y): expected the unreduced loss of shape (T, B) = {want}, "
                                    f"got {got}")
                losses.append(lt.float())
                weights.append(wt)
            if seg.end == plan.next_window:
                new_carry = detach_state(state)
        self.carry = new_carry
        total = sum(lt.sum() if wt is None else (lt * wt).sum() for lt, wt in zip(losses, weights))
        n_tokens = (plan.end - plan.start) * d.x.shape[1]
        if self.config.loss_reduction == "sum_time":
            count = torch.tensor(float(d.x.shape[1]), dtype=torch.float64)
        elif any(w is not None for w in weights):
            count = sum(torch.as_tensor(float(lt.numel())) if wt is None else wt.detach().double().sum().cpu()
                        for lt, wt in zip(losses, weights))
        else:
            count = torch.tensor(float(n_tokens), dtype=torch.float64)
        total.backward()
        return total.detach().double().cpu(), count, n_tokens

    def _micro_samples(self) -> tuple[Tensor, Tensor, int]:
        d: _Samples = self.data  # type: ignore[assignment]
        batch, n = d.batch(self.state.epoch, self.state.batch_index)
        zero = torch.zeros((), dtype=torch.float64)
        if n == 0:  # a last batch smaller than the number of processes leaves this rank without samples
            return zero, zero, 0
        batch = tree_map(lambda t: t.to(self.device, non_blocking=True), batch)
        with self._autocast():
            out = self.task.loss(self.model, batch)
        if isinstance(out, tuple):
            loss, n_items = out
            n_items = float(n_items)
        else:
            loss, n_items = out, float(n)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise TypeError(f"task.loss: expected a scalar tensor, got {loss!r:.80}")
        if n_items == 0:  # everything masked: nothing to learn from, and 0 * nan must not poison the step
            return zero, zero, n
        total = loss.float() * n_items
        total.backward()
        return total.detach().double().cpu(), torch.tensor(n_items, dtype=torch.float64), n

    def _train_step(self) -> None:
        c = self.config
        t0 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, count, units
        for _ in range(c.grad_accum):
            if self.state.batch_index >= self.data.n_batches:
                break
            if self.data.kind == "stream":
                s, n, units = self._micro_stream()
            else:
                s, n, units = self._micro_samples()
            sums += torch.stack([s, n.double(), torch.tensor(float(units), dtype=torch.float64)])
            self.state.batch_index += 1
        dist_util.all_reduce_sum(sums)
        dist_util.all_reduce_grads(self.params)
        loss_sum, count, units = float(sums[0]), float(sums[1]), float(sums[2])
        grads = [p.grad for p in self.params if p.grad is not None]
        if count > 0:
            for g in grads:
                g.div_(count)
        loss = loss_sum / count if count > 0 else float("nan")
        gnorm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        lr = self.schedule.lr(self.state.step, self.state.epoch)
        if count == 0:  # nothing counted (all items masked): no update, not a divergence
            self.state.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        elif not (math.isfinite(loss) and math.isfinite(gnorm)):
            self.state.skipped_steps += 1
            self.state.nonfinite_in_a_row += 1
            self.optimizer.zero_grad(set_to_none=True)
            if self.carry is not None and not _finite(tree_tensors(self.carry)):
                self.carry = None
            if self.state.nonfinite_in_a_row >= c.max_nonfinite:
                raise TrainingError(
                    f"training stopped at step {self.state.step + 1}: {self.state.nonfinite_in_a_row} non-finite "
                    f"steps in a row (loss {loss}, gradient norm {gnorm}; limit "
                    f"trainer.max_nonfinite={c.max_nonfinite}); try a lower learning rate or gradient clipping")
        else:
            self.state.nonfinite_in_a_row = 0
            if c.clip_value is not None:
                torch.nn.utils.clip_grad_value_(self.params, c.clip_value)
            if c.clip_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(self.params, c.clip_norm, torch.tensor(gnorm))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.state.step += 1
        self._last_loss = loss
        dt = time.perf_counter() - t0
        acc = self._log_acc
        if math.isfinite(loss):
            acc[0] += loss * count
            acc[1] += count
        acc[2] += units
        acc[3] += dt
        self._log_gnorm = gnorm
        self._last_lr = lr

    def _after_step(self) -> None:
        c = self.config
        epoch_done = self.state.batch_index >= self.data.n_batches
        if self.callbacks["step_end"]:
            self._fire("step_end", {"step": self.state.step, "epoch": self.state.epoch, "lr": self._last_lr,
                                    "grad_norm": self._log_gnorm, "loss": self._last_loss})
        if self.state.step % c.log_every == 0 or epoch_done or not self._budget_left():
            self._log_train()
        elif self.is_main:
            self.progress.update(self.state.step, None)  # moves the rich bar; plain lines wait for the next record
        if epoch_done:
            self._fire("epoch_end", {"epoch": self.state.epoch, "step": self.state.step})
            finished_epoch = self.state.epoch
            self.state.epoch += 1
            self.state.batch_index = 0
            self.carry = None
            if c.eval_each_epoch and self.evaluate_fn is not None:
                self._run_eval(epoch=finished_epoch)
        if c.eval_every and self.state.step % c.eval_every == 0 and self.evaluate_fn is not None \
                and self.state.last_eval_step != self.state.step:
            self._run_eval()
        if self.stop_reason is None and self._stop_requested:
            self.stop_reason = self._stop_requested
        if c.minutes is not None and self._elapsed() >= c.minutes * 60:
            self.stop_reason = self.stop_reason or "minutes"
        if dist_util.active():
            self.stop_reason = dist_util.broadcast_object(self.stop_reason)  # rank 0 decides
        if c.checkpoint_every and self.state.step % c.checkpoint_every == 0 \
                and self.last_checkpoint_step != self.state.step:
            self._save()

    def _log_train(self) -> None:
        acc = self._log_acc
        loss = acc[0] / acc[1] if acc[1] else float("nan")
        record = {"kind": "train", "step": self.state.step, "epoch": self.state.epoch, "loss": loss,
                  "lr": self._last_lr,
                  "grad_norm": self._log_gnorm, "throughput": acc[2] / acc[3] if acc[3] > 0 else 0.0,
                  "skipped_steps": self.state.skipped_steps, "elapsed_s": round(self._elapsed(), 3)}
        self.state.train_loss = loss
        self._log_acc = [0.0, 0.0, 0, 0.0]
        if self.is_main:
            self.log.write(record)
            self.progress.update(self.state.step, record)

    # ---------------------------------------------------------------- evaluation

    def _improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.state.best is None:
            return True
        return value < self.state.best if self.config.metric_mode == "min" else value > self.state.best

    def _run_eval(self, epoch: int | None = None) -> dict[str, float]:
        metrics: dict[str, float] | None = None
        if self.is_main:
            was_training = self.model.training
            self.model.eval()
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), \
                    torch.no_grad():
                metrics = {k: float(v) for k, v in dict(self.evaluate_fn(self.model)).items()}
            self.model.train(was_training)
        metrics = dist_util.broadcast_object(metrics)  # type: ignore[assignment]
        self.state.last_eval = metrics
        self.state.last_eval_step = self.state.step
        if self.config.metric not in metrics:
            raise UserError(f"trainer.metric: {self.config.metric!r} is not among the evaluation metrics "
                            f"{sorted(metrics)}")
        value = metrics[self.config.metric]
        self.schedule.observe(value)
        improved = self._improved(value)
        if improved:
            self.state.best, self.state.best_step = value, self.state.step
            self.state.evals_without_improvement = 0
        else:
            self.state.evals_without_improvement += 1
        record = {"kind": "eval", "step": self.state.step, "epoch": epoch if epoch is not None else self.state.epoch,
                  **{f"eval/{k}": v for k, v in metrics.items()}}
        if self.is_main:
            self.log.write(record)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            self.progress.message(f"eval @ step {self.state.step}: {shown}" + (" (best)" if improved else ""))
        self._fire("eval", {"step": self.state.step, "metrics": metrics, "improved": improved})
        if self.config.early_stopping and self.state.evals_without_improvement >= self.config.early_stopping:
            self.stop_reason = "early_stopping"
        if improved and self.checkpoint_dir is not None and self.last_checkpoint_step != self.state.step:
            self._save()
        return metrics

    def _final_metrics(self) -> dict[str, Any]:
        epochs_done = self.state.epoch - 1 + self.state.batch_index / self.data.n_batches
        out: dict[str, Any] = {"step": self.state.step, "epochs_done": round(epochs_done, 4),
                               "train_loss": self.state.train_loss, "skipped_steps": self.state.skipped_steps,
                               "elapsed_s": round(self._elapsed(), 3), "stop_reason": self.stop_reason}
        out.update(self.state.last_eval)
        if self.state.best is not None:
            out[f"best_{self.config.metric}"] = self.state.best
            out["best_step"] = self.state.best_step
        return out

    def _fire(self, event: str, info: dict[str, Any]) -> None:
        if not self.is_main or not self.callbacks[event]:
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for fn in self.callbacks[event]:
                fn(self, info)

    # ---------------------------------------------------------------- checkpoints

    def _rank_local_state(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"carry": tree_map(lambda t: t.detach().cpu(), self.carry), "rng": rng}

    def _save(self) -> None:
        """Write a checkpoint of the current step (rank 0; every rank contributes its local state)."""
        local = dist_util.gather_objects(self._rank_local_state())
        self.last_checkpoint_step = self.state.step
        if not self.is_main or self.checkpoint_dir is None:
            return
        model_sd = {k: v for k, v in self.model.state_dict().items()}
        if not _finite(model_sd.values()):
            warnings.warn(f"step {self.state.step}: the model has non-finite weights; checkpoint not written",
                          RuntimeWarning, stacklevel=2)
            return
        tensors: dict[str, Tensor] = {}
        for k, v in model_sd.items():
            tensors[f"model.{k}"] = v.detach().cpu().contiguous().clone()
        optim_skel = ckpt.flatten_state(self.optimizer.state_dict(), "optim", tensors)
        ranks_skel = ckpt.flatten_state(local, "ranks", tensors)
        np_state = np.random.get_state()
        tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
        py_state = random.getstate()
        meta = {
            "progress": replace(self.state, elapsed_s=self._elapsed()).to_json(),
            "data_kind": self.data.kind, "n_batches": self.data.n_batches, "world_size": self.world_size,
            "optimizer": optim_skel, "ranks": ranks_skel, "schedule": self.schedule.state_dict(),
            "rng_numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "rng_python": [py_state[0], list(py_state[1]), py_state[2]],
            "best_step": self.state.best_step,  # read by find_checkpoint(run_dir, "best")
            "trainer_config": config_to_dict(self.config),
        }
        path = ckpt.save_checkpoint(self.checkpoint_dir, self.state.step, tensors, meta)
        keep = {self.state.best_step} if self.state.best_step is not None else set()
        ckpt.prune_checkpoints(self.checkpoint_dir, self.config.keep_checkpoints, keep)
        self._fire("checkpoint", {"step": self.state.step, "path": str(path)})

    def _decode(self, found: ckpt.Checkpoint) -> _Resumed:
        """Everything a resume restores, read from ``found`` without changing anything.

        Raises:
            CheckpointError: an entry is missing or malformed (a damaged checkpoint, though its
                checksums hold).
        """
        meta, tensors = found.meta, found.tensors
        try:
            progress = TrainState.from_json(meta.get("progress", meta))  # (older checkpoints: top level)
            ranks = ckpt.unflatten_state(meta["ranks"], tensors)
            local = [{"carry": r["carry"], "rng": dict(r["rng"])} for r in ranks]
            if not local or not all(isinstance(r["rng"]["torch"], Tensor) for r in local):
                raise ValueError("ranks: expected a torch RNG state per process")
            kind, pos, has_gauss, cached = meta["rng_numpy"]
            v, st, gauss = meta["rng_python"]
            return _Resumed(
                progress=progress, data_kind=str(meta["data_kind"]), n_batches=int(meta["n_batches"]),
                model={k[len("model."):]: t for k, t in tensors.items() if k.startswith("model.")},
                optimizer=ckpt.unflatten_state(meta["optimizer"], tensors), schedule=dict(meta["schedule"]),
                ranks=local, rng_numpy=(str(kind), tensors["rng.numpy"].numpy().astype(np.uint32), int(pos),
                                        int(has_gauss), float(cached)),
                rng_python=(int(v), tuple(int(i) for i in st), gauss),
                trainer_config=dict(meta.get("trainer_config", {})))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise ckpt.CheckpointError(f"{found.path.name}: malformed content ({type(e).__name__}: {e})") from None

    def _find_resume_point(self) -> ckpt.Checkpoint | None:
        """The newest usable checkpoint of the run directory (None: there is none yet)."""
        found = ckpt.latest_good_checkpoint(self.checkpoint_dir, decode=self._decode)
        if found is None and ckpt.list_checkpoints(self.checkpoint_dir):
            raise TrainingError(f"--resume: no usable checkpoint in {str(self.checkpoint_dir)!r} "
                                f"(all are damaged)")
        if found is None:
            self._note(f"--resume: no checkpoint in {str(self.run_dir)!r} yet; starting from scratch")
        return found

    def _mismatch(self, r: _Resumed) -> str | None:
        """Why the checkpoint cannot continue this trainer's model, optimizer and data (None: it can)."""
        if r.data_kind != self.data.kind:
            return (f"it was trained on {r.data_kind} data by another kind of task; this one trains on "
                    f"{self.data.kind} data")
        if r.n_batches != self.data.n_batches:
            return (f"the training data is laid out differently ({r.data_kind} data, {r.n_batches} batches per "
                    f"epoch in the checkpoint; now {self.data.kind}, {self.data.n_batches})")
        if len(r.ranks) != self.world_size and self.data.kind == "stream":
            return (f"the checkpoint was written by {len(r.ranks)} processes; stream training resumes with the "
                    f"same number, got {self.world_size}")
        want = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in r.model.items()}
        if want != have:
            diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            shown = "; ".join(f"{k}: {have.get(k, 'missing')} in the checkpoint, {want.get(k, 'missing')} now"
                              for k in diff[:3])
            return f"the model's weights differ ({shown}{'; ...' if len(diff) > 3 else ''})"
        old_optim = r.trainer_config.get("optim", {}).get("name", self.config.optim.name)
        if old_optim != self.config.optim.name:
            return f"the optimizer's state is {old_optim!r}'s, this run uses {self.config.optim.name!r}"
        groups = r.optimizer.get("param_groups", [])
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.optimizer.param_groups]:
            return "the optimizer's parameter groups differ"
        return None

    def _check_resume(self, found: ckpt.Checkpoint) -> None:
        """Raise UserError naming the changed settings when ``found`` cannot continue this run."""
        r = self._decode(found)
        reason = self._mismatch(r)
        if reason is None:
            return
        saved = read_saved_config(self.run_dir)
        changed = setting_differences(saved, config_to_dict(self.full_config), limit=5) if saved is not None else []
        same_task = r.data_kind == self.data.kind
        what = f"settings that differ from its config.toml: {'; '.join(changed)}" if changed and same_task \
            else reason
        raise UserError(f"--resume {str(self.run_dir)!r}: the checkpoint of step {found.step} does not fit this "
                        f"run ({what}); resume with the run's settings or choose another --out")

    def load_checkpoint(self, found: ckpt.Checkpoint) -> None:
        """Restore model, optimizer, schedule, RNG, data position and carried state from a checkpoint."""
        r = self._decode(found)
        reason = self._mismatch(r)
        if reason is not None:
            raise UserError(f"--resume: the checkpoint of step {found.step} does not fit: {reason}")
        self.model.load_state_dict(r.model, strict=True)
        self.optimizer.load_state_dict(r.optimizer)
        self.schedule.load_state_dict(r.schedule)
        local = r.ranks[self.rank] if len(r.ranks) == self.world_size else r.ranks[0]
        self.carry = tree_map(lambda t: t.to(self.device), local["carry"])
        torch.set_rng_state(local["rng"]["torch"])
        if "cuda" in local["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(local["rng"]["cuda"], self.device)
        np.random.set_state(r.rng_numpy)
        random.setstate(r.rng_python)
        self.state = r.progress
        self.last_checkpoint_step = self.state.step
        new = config_to_dict(self.config)
        changed = setting_differences(r.trainer_config, new, limit=20)
        if changed:
            self._note(f"--resume: trainer settings differ from the checkpoint's: {'; '.join(changed)}")

    def _note(self, text: str) -> None:
        """A one-line notice on stderr (rank 0, not when quiet)."""
        if self.is_main and not self.quiet:
            print(text, file=sys.stderr, flush=True)


__all__ = ["Trainer", "TrainState", "StreamData", "EVENTS", "seed_everything", "detach_state", "tree_map",
           "evaluate_stream"]
