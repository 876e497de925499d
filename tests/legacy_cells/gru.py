"""GRU cell (Cho et al. 2014) in both forms: reset after the matmul (cuDNN / torch.nn.GRU) or before."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Cell, State, Weights


class GRUCell(Cell):
    r"""Gated recurrent unit, gate order (r, z, n) as ``torch.nn.GRU``.

    ``reset_after=True`` (torch.nn.GRU, cuDNN):

    .. math::
        \begin{aligned}
        r_t &= \sigma(W_r x_t + b_{ir} + R_r h_{t-1} + b_{hr}) \qquad
        z_t = \sigma(W_z x_t + b_{iz} + R_z h_{t-1} + b_{hz}) \\
        n_t &= \tanh(W_n x_t + b_{in} + r_t \odot (R_n h_{t-1} + b_{hn})) \\
        h_t &= (1 - z_t) \odot n_t + z_t \odot h_{t-1}
        \end{aligned}

    ``reset_after=False`` (Cho et al. 2014): :math:`n_t = \tanh(W_n x_t + b_{in} + R_n (r_t \odot h_{t-1}) + b_{hn})`.

    ``layer_norm`` normalises :math:`W x_t` over all 3H rows and each recurrent projection
    (all 3H rows, or the (r, z) rows and the n rows separately for ``reset_after=False``), with
    gains ``ln_weight_ih`` / ``ln_weight_hh`` (3H); biases are added after normalisation.
    """

    family = "gru"
    gates = 3
    state_size = 1

    def __init__(self, hidden_size: int, *, bias: bool = True, reset_after: bool = True,
                 layer_norm: bool = False) -> None:
        super().__init__(hidden_size, bias=bias, layer_norm=layer_norm)
        self.reset_after = bool(reset_after)
        self.rec_parts = (3,) if self.reset_after else (2, 1)

    def options(self) -> dict[str, Any]:
        return {"reset_after": self.reset_after, **super().options()}

    @property
    def native(self) -> str | None:
        return "gru" if self.reset_after and not self.layer_norm else None

    def step(self, x: Tensor, state: State, w: Weights, hmask: Tensor | None = None) -> State:
        (h,) = state
        xr, xz, xn = self.project_input(x, w).chunk(3, -1)
        if self.reset_after:
            hr, hz, hn = self.rec_plain(h, w, 0, hmask).chunk(3, -1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
        else:
            hr, hz = self.rec_plain(h, w, 0, hmask).chunk(2, -1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + self.rec_plain(r * h, w, 1, hmask))
        return ((1 - z) * n + z * h,)

    def forward(self, xg, state, rec, w):
        (h,) = state
        xr, xz, xn = xg.chunk(3, 1)
        if self.reset_after:
            hg, ln = self.rec_norm(rec(h), w, 0)
            hr, hz, hn = hg.chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            ln_n = ()
        else:
            hg, ln = self.rec_norm(rec(h), w, 0)
            hr, hz = hg.chunk(2, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            hn, ln_n = self.rec_norm(rec(r * h, 1), w, 1)
            n = torch.tanh(xn + hn)
        h_new = n + z * (h - n)
        return (h_new,), (h, r, z, n, hn, ln, ln_n)

    def backward(self, dstate, saved, rec_t, w):
        (dh,) = dstate
        h, r, z, n, hn, ln, ln_n = saved
        grads: dict[str, Tensor] = {}
        dn = dh * (1 - z)
        daz = dh * (h - n) * z * (1 - z)
        dh_prev = dh * z
        dan = dn * (1 - n * n)
        if self.reset_after:
            dar = dan * hn * r * (1 - r)
            dhg = torch.cat([dar, daz, dan * r], 1)
            dh_prev = dh_prev + rec_t(self.rec_norm_backward(dhg, ln, w, 0, grads), 0)
        else:
            dq = rec_t(self.rec_norm_backward(dan, ln_n, w, 1, grads), 1)   # q = r * h
            dar = dq * h * r * (1 - r)
            dh_prev = dh_prev + dq * r
            dhg = torch.cat([dar, daz], 1)
            dh_prev = dh_prev + rec_t(self.rec_norm_backward(dhg, ln, w, 0, grads), 0)
        return torch.cat([dar, daz, dan], 1), (dh_prev,), grads
