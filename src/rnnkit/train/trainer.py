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
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.streams import batchify, chunk_bounds, tbptt_plan
from ..errors import TrainingError, UserError
from . import checkpoint as ckpt
from . import distributed as dist_util
from .config import TrainerConfig, config_to_dict, save_config
from .monitor import MetricsLog, Progress
from .optim import Schedule, build_optimizer

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
        self.optimizer = build_optimizer(self.params, config.optim)
        self.steps_per_epoch = math.ceil(self.data.n_batches / config.grad_accum)
        self.total_steps = self._total_steps()
        self.schedule = Schedule(config.schedule, config.optim.lr, self.total_steps, config.metric_mode,
                                 budget_s=config.minutes * 60 if config.minutes else None, clock=self._elapsed)

        # progress of the run (all of it is in the checkpoint)
        self.step = 0
        self.epoch = 1  # 1-based current epoch
        self.batch_index = 0  # micro-batches consumed in the current epoch
        self.carry: Any = None  # recurrent state at the next window start (stream data)
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self.best: float | None = None
        self.best_step: int | None = None
        self.evals_without_improvement = 0
        self.elapsed_before = 0.0
        self.last_eval: dict[str, float] = {}
        self.last_eval_step: int | None = None
        self.last_checkpoint_step: int | None = None
        self.stop_reason: str | None = None
        self._stop_requested: str | None = None
        self._train_loss: float = float("nan")
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
    def checkpoint_dir(self) -> Path | None:
        return self.run_dir / "checkpoints" if self.run_dir is not None else None

    @property
    def lr(self) -> float:
        return self.schedule.lr(self.step, self.epoch)

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

    def _setup_run_dir(self) -> None:
        if self.run_dir is None:
            return
        existing = ckpt.list_checkpoints(self.checkpoint_dir)
        if existing and not self.resume:
            raise UserError(f"--out {str(self.run_dir)!r}: the run directory already has checkpoints; pass "
                            f"--resume to continue it or choose another directory")
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.full_config, self.run_dir)

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
        c = self.config
        self._setup_run_dir()
        if self.resume and self.run_dir is not None:
            self._load_latest()
        dist_util.broadcast_module(self.model)
        self.log = MetricsLog(self.run_dir if self.is_main else None, c.tensorboard,
                              purge_after=self.step if self.resume else None)
        if self.resume:
            self.log.truncate_after(self.step)
        self.progress = Progress(self.total_steps, quiet=self.quiet or not self.is_main, log_every=c.log_every,
                                 unit=self.data.unit, rich=self._progress_mode)
        self._t_start = time.perf_counter()
        self.progress.start(self.step)
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
            if self.evaluate_fn is not None and self.last_eval_step != self.step:
                self._run_eval()
            if self.checkpoint_dir is not None and self.last_checkpoint_step != self.step:
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
        return self.elapsed_before + (time.perf_counter() - start if start is not None else 0.0)

    @property
    def elapsed_s(self) -> float:
        """Training wall-clock seconds so far, summed over resumes (what the minutes budget counts)."""
        return self._elapsed()

    def _budget_left(self) -> bool:
        c = self.config
        if c.steps is not None and self.step >= c.steps:
            return False
        if c.epochs is not None and self.epoch > c.epochs:
            return False
        return True

    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _micro_stream(self) -> tuple[Tensor, Tensor, int]:
        """Forward/backward of one TBPTT window; returns (loss sum, count, tokens) of this rank."""
        d: _Streams = self.data  # type: ignore[assignment]
        plan = tbptt_plan(d.length, d.k1, d.k2, self.batch_index)
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
        batch, n = d.batch(self.epoch, self.batch_index)
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
            if self.batch_index >= self.data.n_batches:
                break
            if self.data.kind == "stream":
                s, n, units = self._micro_stream()
            else:
                s, n, units = self._micro_samples()
            sums += torch.stack([s, n.double(), torch.tensor(float(units), dtype=torch.float64)])
            self.batch_index += 1
        dist_util.all_reduce_sum(sums)
        dist_util.all_reduce_grads(self.params)
        loss_sum, count, units = float(sums[0]), float(sums[1]), float(sums[2])
        grads = [p.grad for p in self.params if p.grad is not None]
        if count > 0:
            for g in grads:
                g.div_(count)
        loss = loss_sum / count if count > 0 else float("nan")
        gnorm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        lr = self.schedule.lr(self.step, self.epoch)
        if count == 0:  # nothing counted (all items masked): no update, not a divergence
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        elif not (math.isfinite(loss) and math.isfinite(gnorm)):
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
            self.optimizer.zero_grad(set_to_none=True)
            if self.carry is not None and not _finite(tree_tensors(self.carry)):
                self.carry = None
            if self.nonfinite_in_a_row >= c.max_nonfinite:
                raise TrainingError(
                    f"training stopped at step {self.step + 1}: {self.nonfinite_in_a_row} non-finite steps in a "
                    f"row (loss {loss}, gradient norm {gnorm}; limit trainer.max_nonfinite={c.max_nonfinite}); "
                    f"try a lower learning rate or gradient clipping")
        else:
            self.nonfinite_in_a_row = 0
            if c.clip_value is not None:
                torch.nn.utils.clip_grad_value_(self.params, c.clip_value)
            if c.clip_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(self.params, c.clip_norm, torch.tensor(gnorm))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.step += 1
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
        epoch_done = self.batch_index >= self.data.n_batches
        if self.callbacks["step_end"]:
            self._fire("step_end", {"step": self.step, "epoch": self.epoch, "lr": self._last_lr,
                                    "grad_norm": self._log_gnorm, "loss": self._last_loss})
        if self.step % c.log_every == 0 or epoch_done or not self._budget_left():
            self._log_train()
        elif self.is_main:
            self.progress.update(self.step, None)  # moves the rich bar; plain lines wait for the next record
        if epoch_done:
            self._fire("epoch_end", {"epoch": self.epoch, "step": self.step})
            finished_epoch = self.epoch
            self.epoch += 1
            self.batch_index = 0
            self.carry = None
            if c.eval_each_epoch and self.evaluate_fn is not None:
                self._run_eval(epoch=finished_epoch)
        if c.eval_every and self.step % c.eval_every == 0 and self.evaluate_fn is not None \
                and self.last_eval_step != self.step:
            self._run_eval()
        if self.stop_reason is None and self._stop_requested:
            self.stop_reason = self._stop_requested
        if c.minutes is not None and self._elapsed() >= c.minutes * 60:
            self.stop_reason = self.stop_reason or "minutes"
        if dist_util.active():
            self.stop_reason = dist_util.broadcast_object(self.stop_reason)  # rank 0 decides
        if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.last_checkpoint_step != self.step:
            self._save()

    def _log_train(self) -> None:
        acc = self._log_acc
        loss = acc[0] / acc[1] if acc[1] else float("nan")
        record = {"kind": "train", "step": self.step, "epoch": self.epoch, "loss": loss, "lr": self._last_lr,
                  "grad_norm": self._log_gnorm, "throughput": acc[2] / acc[3] if acc[3] > 0 else 0.0,
                  "skipped_steps": self.skipped_steps, "elapsed_s": round(self._elapsed(), 3)}
        self._train_loss = loss
        self._log_acc = [0.0, 0.0, 0, 0.0]
        if self.is_main:
            self.log.write(record)
            self.progress.update(self.step, record)

    # ---------------------------------------------------------------- evaluation

    def _improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best if self.config.metric_mode == "min" else value > self.best

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
        self.last_eval = metrics
        self.last_eval_step = self.step
        if self.config.metric not in metrics:
            raise UserError(f"trainer.metric: {self.config.metric!r} is not among the evaluation metrics "
                            f"{sorted(metrics)}")
        value = metrics[self.config.metric]
        self.schedule.observe(value)
        improved = self._improved(value)
        if improved:
            self.best, self.best_step = value, self.step
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        record = {"kind": "eval", "step": self.step, "epoch": epoch if epoch is not None else self.epoch,
                  **{f"eval/{k}": v for k, v in metrics.items()}}
        if self.is_main:
            self.log.write(record)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            self.progress.message(f"eval @ step {self.step}: {shown}" + (" (best)" if improved else ""))
        self._fire("eval", {"step": self.step, "metrics": metrics, "improved": improved})
        if self.config.early_stopping and self.evals_without_improvement >= self.config.early_stopping:
            self.stop_reason = "early_stopping"
        if improved and self.checkpoint_dir is not None and self.last_checkpoint_step != self.step:
            self._save()
        return metrics

    def _final_metrics(self) -> dict[str, Any]:
        epochs_done = self.epoch - 1 + self.batch_index / self.data.n_batches
        out: dict[str, Any] = {"step": self.step, "epochs_done": round(epochs_done, 4),
                               "train_loss": self._train_loss, "skipped_steps": self.skipped_steps,
                               "elapsed_s": round(self._elapsed(), 3), "stop_reason": self.stop_reason}
        out.update(self.last_eval)
        if self.best is not None:
            out[f"best_{self.config.metric}"] = self.best
            out["best_step"] = self.best_step
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
        self.last_checkpoint_step = self.step
        if not self.is_main or self.checkpoint_dir is None:
            return
        model_sd = {k: v for k, v in self.model.state_dict().items()}
        if not _finite(model_sd.values()):
            warnings.warn(f"step {self.step}: the model has non-finite weights; checkpoint not written",
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
            "step": self.step, "epoch": self.epoch, "batch_index": self.batch_index,
            "data_kind": self.data.kind, "n_batches": self.data.n_batches, "world_size": self.world_size,
            "optimizer": optim_skel, "ranks": ranks_skel, "schedule": self.schedule.state_dict(),
            "rng_numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "rng_python": [py_state[0], list(py_state[1]), py_state[2]],
            "skipped_steps": self.skipped_steps, "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "best": self.best, "best_step": self.best_step,
            "evals_without_improvement": self.evals_without_improvement,
            "elapsed_s": self._elapsed(), "last_eval": self.last_eval, "last_eval_step": self.last_eval_step,
            "train_loss": self._train_loss if math.isfinite(self._train_loss) else None,
            "trainer_config": config_to_dict(self.config),
        }
        path = ckpt.save_checkpoint(self.checkpoint_dir, self.step, tensors, meta)
        keep = {self.best_step} if self.best_step is not None else set()
        ckpt.prune_checkpoints(self.checkpoint_dir, self.config.keep_checkpoints, keep)
        self._fire("checkpoint", {"step": self.step, "path": str(path)})

    def _load_latest(self) -> None:
        found = ckpt.latest_good_checkpoint(self.checkpoint_dir)
        if found is None:
            if ckpt.list_checkpoints(self.checkpoint_dir):
                raise TrainingError(f"--resume: no usable checkpoint in {str(self.checkpoint_dir)!r} "
                                    f"(all are damaged)")
            self._note(f"--resume: no checkpoint in {str(self.run_dir)!r} yet; starting from scratch")
            return
        self.load_checkpoint(found)

    def load_checkpoint(self, found: ckpt.Checkpoint) -> None:
        """Restore model, optimizer, schedule, RNG, data position and carried state from a checkpoint."""
        meta, tensors = found.meta, found.tensors
        if meta["data_kind"] != self.data.kind or meta["n_batches"] != self.data.n_batches:
            raise UserError(f"--resume: the checkpoint was made with different training data "
                            f"({meta['data_kind']} data, {meta['n_batches']} batches per epoch; now "
                            f"{self.data.kind}, {self.data.n_batches})")
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_sd, strict=True)
        self.optimizer.load_state_dict(ckpt.unflatten_state(meta["optimizer"], tensors))
        self.schedule.load_state_dict(meta["schedule"])
        ranks = ckpt.unflatten_state(meta["ranks"], tensors)
        if len(ranks) != self.world_size:
            if self.data.kind == "stream":
                raise UserError(f"--resume: the checkpoint was written by {len(ranks)} processes; stream "
                                f"training resumes with the same number, got {self.world_size}")
            ranks = [ranks[0]] * self.world_size
        local = ranks[self.rank]
        self.carry = tree_map(lambda t: t.to(self.device), local["carry"])
        torch.set_rng_state(local["rng"]["torch"])
        if "cuda" in local["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(local["rng"]["cuda"], self.device)
        kind, pos, has_gauss, cached = meta["rng_numpy"]
        np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
        v, st, gauss = meta["rng_python"]
        random.setstate((v, tuple(st), gauss))
        self.step, self.epoch, self.batch_index = meta["step"], meta["epoch"], meta["batch_index"]
        self.skipped_steps, self.nonfinite_in_a_row = meta["skipped_steps"], meta["nonfinite_in_a_row"]
        self.best, self.best_step = meta["best"], meta["best_step"]
        self.evals_without_improvement = meta["evals_without_improvement"]
        self.elapsed_before = float(meta["elapsed_s"])
        self.last_eval = {k: float(v) for k, v in meta["last_eval"].items()}
        self.last_eval_step = meta["last_eval_step"]
        self.last_checkpoint_step = self.step
        self._train_loss = float("nan") if meta["train_loss"] is None else float(meta["train_loss"])
        old = meta.get("trainer_config", {})
        new = config_to_dict(self.config)
        budget = {"steps", "epochs", "minutes", "checkpoint_every", "log_every", "device", "tensorboard"}
        changed = sorted(k for k in set(old) | set(new) if k not in budget and old.get(k) != new.get(k))
        if changed:
            self._note(f"--resume: trainer settings differ from the checkpoint's: {', '.join(changed)}")

    def _note(self, text: str) -> None:
        """A one-line notice on stderr (rank 0, not when quiet)."""
        if self.is_main and not self.quiet:
            print(text, file=sys.stderr, flush=True)


__all__ = ["Trainer", "StreamData", "EVENTS", "seed_everything", "detach_state", "tree_map", "evaluate_stream"]
