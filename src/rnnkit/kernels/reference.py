"""The oracle: autograd through each cell's plain-torch ``step()``, one Python iteration per step."""

from __future__ import annotations

import torch
from torch import Tensor

from ..cells.base import Cell, State, Weights
from .common import LayerMasks


def run(cell: Cell, x: Tensor, state0: State, w: Weights, masks: LayerMasks) -> tuple[Tensor, State]:
    """Run one layer in one direction over ``x`` (T, B, I); returns outputs (T, B, H) and final state."""
    state = state0
    outs = []
    for t in range(x.shape[0]):
        new = cell.step(x[t], state, w, masks.hmask)
        if masks.keep is not None:
            new = tuple(k[t] * s + (1 - k[t]) * n for k, s, n in zip(masks.keep, state, new))
        outs.append(new[0] if masks.out_mask is None else new[0] * masks.out_mask[t])
        state = new
    return torch.stack(outs), state
