r"""Gradient flow through time: how much of the final loss's gradient reaches each earlier step.

For a loss :math:`L_T` computed from the outputs at the end of a sequence, the quantities are

.. math::
    g^h_t = \Big\lVert \frac{\partial L_T}{\partial h_t} \Big\rVert_2, \qquad
    g^c_t = \Big\lVert \frac{\partial L_T}{\partial c_t} \Big\rVert_2 \quad (\text{LSTM}),

for every step t, per sequence, then averaged over the batch (geometric mean: the norms span many
orders of magnitude). :math:`h_t` and :math:`c_t` are the states fed into step t + 1, so
:math:`g^h_t` is the gradient that reaches the recurrence through :math:`h_t` and :math:`g^c_t`
through the cell state. In a tanh RNN :math:`g^h_t` shrinks by a roughly constant factor per step
(vanishing gradients); an LSTM whose forget gates sit near 1 carries :math:`g^c_t` across the
sequence almost undiminished.

The states are recorded by :func:`rnnkit.analysis.capture.trace` (each cell's own pointwise math,
step by step, under autograd) with ``retain_grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..layers import Recurrent
from .capture import trace


def gradient_flow(layer: Recurrent, x: Tensor, loss_fn: Callable[[Tensor], Tensor], *,
                  lengths: Tensor | Sequence[int] | None = None, layer_index: int = -1) -> dict[str, list[float]]:
    r"""Per-step gradient norms :math:`\lVert\partial L / \partial s_t\rVert` of every state of one layer.

    Args:
        layer: a unidirectional rnnkit layer stack.
        x: input in the layer's layout.
        loss_fn: maps the top layer's outputs, time-major (T, B, H), to a scalar loss that is a *sum*
            over the sequences of the batch (so each sequence's gradient is its own).
        lengths: optional valid lengths, as for ``layer.forward``.
        layer_index: which layer's states to report.
    Returns:
        ``{"h": [g_0, ..., g_{T-1}], "c": [...], ...}`` (one entry per state of the cell's declaration:
        ``c`` for the LSTM, ``c, n, m`` for the sLSTM): geometric means over the batch of the
        per-sequence L2 norms (zeros count as 1e-30 so the logarithm exists).
    """
    params = [p for p in layer.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:  # the states need a graph even if the model is frozen
            p.requires_grad_(True)
        with torch.enable_grad():
            tr = trace(layer, x, lengths=lengths, retain_grad=True)
            out = torch.stack([s["h"] for s in tr.steps[-1]])  # (T, B, H)
            loss = loss_fn(out)
            if loss.dim() != 0:
                raise ValueError(f"loss_fn: expected a scalar loss, got shape {tuple(loss.shape)}")
            names = list(layer.cell.state_names)
            states = [s[n] for s in tr.steps[layer_index] for n in names]
            grads = torch.autograd.grad(loss, states, allow_unused=True)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    result: dict[str, list[float]] = {n: [] for n in names}
    for j, g in enumerate(grads):
        name = names[j % len(names)]
        if g is None:
            result[name].append(0.0)
            continue
        norms = g.detach().double().norm(dim=-1).clamp_min(1e-30)  # (B,)
        result[name].append(float(norms.log().mean().exp()))
    return result


def decay_per_step(norms: Sequence[float]) -> float:
    """Average factor by which a gradient norm shrinks per step going back in time (log-linear fit)."""
    g = np.asarray(norms, dtype=np.float64)
    t = np.arange(len(g))
    ok = g > 1e-30
    if ok.sum() < 2:
        raise ValueError(f"norms: need at least two positive values, got {list(norms)}")
    slope = np.polyfit(t[ok], np.log10(g[ok]), 1)[0]  # log10 gain per step forward in time
    return float(10 ** (-slope))


__all__ = ["gradient_flow", "decay_per_step"]
