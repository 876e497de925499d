"""Elman RNN cell (Elman 1990), tanh or relu, optionally layer-normalised."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Cell, State, Weights


class ElmanCell(Cell):
    r"""Elman recurrent cell.

    .. math::
        h_t = \phi(W x_t + b_{ih} + R h_{t-1} + b_{hh}), \qquad \phi \in \{\tanh, \mathrm{relu}\}

    With ``layer_norm`` (Ba et al. 2016) the two projections are normalised separately, each with
    its own gain, and the biases are added after normalisation:
    :math:`h_t = \phi(\mathrm{LN}_x(W x_t) + b_{ih} + \mathrm{LN}_h(R h_{t-1}) + b_{hh})`.

    Parameter layout as ``torch.nn.RNN``: ``weight_ih`` (H, I), ``weight_hh`` (H, H), biases (H,).
    """

    family = "rnn"
    gates = 1
    state_size = 1
    rec_parts = (1,)

    def __init__(self, hidden_size: int, *, bias: bool = True, nonlinearity: str = "tanh",
                 layer_norm: bool = False) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(hidden_size, bias=bias, layer_norm=layer_norm)
        self.nonlinearity = nonlinearity

    def options(self) -> dict[str, Any]:
        return {"nonlinearity": self.nonlinearity, **super().options()}

    @property
    def native(self) -> str | None:
        return None if self.layer_norm else f"rnn_{self.nonlinearity}"

    def _act(self, a: Tensor) -> Tensor:
        return torch.tanh(a) if self.nonlinearity == "tanh" else F.relu(a)

    def step(self, x: Tensor, state: State, w: Weights, hmask: Tensor | None = None) -> State:
        (h,) = state
        a = self.project_input(x, w) + self.rec_plain(h, w, 0, hmask)
        return (self._act(a),)

    def forward(self, xg, state, rec, w):
        (h,) = state
        hg, ln = self.rec_norm(rec(h), w, 0)
        h_new = self._act(xg + hg)
        return (h_new,), (h_new, ln)

    def backward(self, dstate, saved, rec_t, w):
        (dh,) = dstate
        h_new, ln = saved
        if self.nonlinearity == "tanh":
            da = dh * (1 - h_new * h_new)
        else:
            da = dh * (h_new > 0).to(dh.dtype)
        grads: dict[str, Tensor] = {}
        dh_prev = rec_t(self.rec_norm_backward(da, ln, w, 0, grads), 0)
        return da, (dh_prev,), grads
