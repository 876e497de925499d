r"""Gate statistics (Karpathy, Johnson & Fei-Fei 2015): how often each gate is saturated.

For every gate with values in [0, 1] (named in the cell's declaration: LSTM ``i, f, o``; GRU ``r, z``;
any declared cell's sigmoid gates) and every unit, the fraction of time steps
(over a batch of sequences) at which the gate is *left-saturated* (value < 0.1) and
*right-saturated* (value > 0.9), plus a histogram of all its values. A gate that is mostly
saturated acts as a switch; a forget gate right-saturated most of the time is a memory unit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..layers import Recurrent
from .capture import Trace, trace

LEFT, RIGHT = 0.1, 0.9


def saturation(values: Tensor, left: float = LEFT, right: float = RIGHT,
               mask: Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit fractions of values below ``left`` and above ``right``.

    Args:
        values: (T, B, H) gate activations.
        mask: optional (T, B, 1) weights, 1 on valid steps and 0 on padding.
    Returns:
        (left_fraction (H,), right_fraction (H,)).
    """
    if values.dim() != 3:
        raise ValueError(f"values: expected shape (T, B, H), got {tuple(values.shape)}")
    v = values.detach().double()
    w = torch.ones_like(v[..., :1]) if mask is None else mask.detach().double()
    total = (w.sum((0, 1))).clamp_min(1.0)
    lf = (((v < left).double() * w).sum((0, 1)) / total).cpu().numpy()
    rf = (((v > right).double() * w).sum((0, 1)) / total).cpu().numpy()
    return lf, rf


@torch.no_grad()
def gate_statistics(layer: Recurrent, x: Tensor, *, lengths: Tensor | Sequence[int] | None = None,
                    bins: int = 50, traced: Trace | None = None) -> dict:
    """Saturation fractions per unit and value histograms of every sigmoid gate of every layer.

    Args:
        layer: a unidirectional rnnkit layer stack (evaluation semantics, see ``capture.trace``).
        x: a batch of inputs in the layer's layout.
        lengths: optional valid lengths (padding steps are excluded from the statistics).
        bins: histogram bins over [0, 1].
        traced: ``capture.trace(layer, x, lengths=lengths)`` when the caller already has it.
    Returns:
        JSON-ready ``{"family", "left", "right", "layers": [{gate: {"left_frac": [H], "right_frac": [H],
        "hist": [bins], "mean": float}}]}``.
    """
    tr = traced if traced is not None else trace(layer, x, lengths=lengths)
    mask = None
    if lengths is not None:
        T = len(tr.steps[0])
        lens = torch.as_tensor(lengths).cpu()
        mask = (torch.arange(T).unsqueeze(1) < lens.unsqueeze(0)).double().unsqueeze(-1)
    layers = []
    for k in range(tr.num_layers):
        entry = {}
        for g, v in tr.gates(k).items():
            if g not in tr.unit_gates:
                continue
            lf, rf = saturation(v, mask=mask)
            flat = v.detach().double().flatten(0, 1)  # (T*B, H)
            if mask is not None:
                flat = flat[mask.flatten(0, 1).squeeze(-1) > 0]
            hist, _ = np.histogram(flat.cpu().numpy().ravel(), bins=bins, range=(0.0, 1.0))
            entry[g] = {"left_frac": lf.round(4).tolist(), "right_frac": rf.round(4).tolist(),
                        "hist": hist.tolist(), "mean": float(flat.mean())}
        layers.append(entry)
    return {"family": tr.family, "left": LEFT, "right": RIGHT, "layers": layers}


__all__ = ["saturation", "gate_statistics", "LEFT", "RIGHT"]
