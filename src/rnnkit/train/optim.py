"""Optimizers and learning-rate schedules built from :class:`OptimConfig` / :class:`ScheduleConfig`.

The schedule is a small object of our own (not ``torch.optim.lr_scheduler``) so its whole state is a
few numbers that go into the checkpoint's JSON.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .config import OptimConfig, ScheduleConfig


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam, AdamW or RMSprop with the settings of ``cfg``."""
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
    raise UserError(f"trainer.optim.name: expected 'sgd', 'adam', 'adamw' or 'rmsprop', got {cfg.name!r}")


class Schedule:
    """Learning-rate factor as a function of (step, epoch) and, for "plateau", the evaluation history.

    ``lr = base_lr * factor(step, epoch)``, with ``step`` the number of optimizer steps done before the
    current one (0-based) and ``epoch`` 1-based. Warm-up multiplies any schedule by
    ``min(1, (step + 1) / warmup_steps)``.
    """

    def __init__(self, cfg: ScheduleConfig, base_lr: float, total_steps: int | None, mode: str = "min", *,
                 budget_s: float | None = None, clock: Callable[[], float] | None = None) -> None:
        self.cfg = cfg
        self.base_lr = base_lr
        self.total_steps = cfg.total_steps or total_steps
        # cosine over wall-clock time when only a minutes budget is known: p = clock() / budget_s
        self.budget_s = budget_s if (not self.total_steps and clock is not None) else None
        self.clock = clock
        if cfg.name == "cosine" and not self.total_steps and not self.budget_s:
            raise UserError("trainer.schedule.name='cosine': needs a step, epoch or minutes budget or "
                            "trainer.schedule.total_steps, got none")
        self.mode = mode
        self.plateau_scale = 1.0
        self.best: float | None = None
        self.bad = 0

    def factor(self, step: int, epoch: int) -> float:
        c = self.cfg
        f = 1.0
        if c.name == "step":
            n = (epoch - c.start_epoch) // c.every + 1
            f = c.decay ** max(0, n)
        elif c.name == "cosine":
            w = c.warmup_steps
            if self.total_steps:
                p = min(1.0, max(0.0, (step - w) / max(1, self.total_steps - w)))
            else:  # time-based (minutes budget only): not reproducible bit for bit
                p = min(1.0, max(0.0, self.clock() / self.budget_s))
            f = c.min_factor + (1.0 - c.min_factor) * 0.5 * (1.0 + math.cos(math.pi * p))
        elif c.name == "plateau":
            f = self.plateau_scale
        if c.warmup_steps:
            f *= min(1.0, (step + 1) / c.warmup_steps)
        return f

    def lr(self, step: int, epoch: int) -> float:
        return self.base_lr * self.factor(step, epoch)

    def observe(self, value: float) -> None:
        """Feed an evaluation metric (plateau schedule only)."""
        if self.cfg.name != "plateau" or not math.isfinite(value):
            return
        better = self.best is None or (
            value < self.best * (1 - self.cfg.threshold) if self.mode == "min"
            else value > self.best * (1 + self.cfg.threshold))
        if better:
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad >= self.cfg.patience:
            self.plateau_scale = max(self.cfg.min_factor, self.plateau_scale * self.cfg.decay)
            self.bad = 0

    def state_dict(self) -> dict[str, Any]:
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau_scale = float(state["plateau_scale"])
        self.best = None if state["best"] is None else float(state["best"])
        self.bad = int(state["bad"])


__all__ = ["build_optimizer", "Schedule"]
