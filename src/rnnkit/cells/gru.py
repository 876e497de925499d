"""GRU cell (Cho et al. 2014) in both forms: reset after the matmul (cuDNN / torch.nn.GRU) or before."""

from __future__ import annotations

import functools
from typing import Any

from .compile import DeclaredCell
from .declare import Declaration, declare


@functools.cache
def gru_declaration(*, reset_after: bool = True, layer_norm: bool = False) -> Declaration:
    """The equations of a GRU (see :class:`GRUCell`)."""
    rec, n = ("hr, hz, hn = R(h)", "n = tanh(xn + r * hn)") if reset_after else \
        ("hr, hz = R(h); hn = R(r * h)", "n = tanh(xn + hn)")
    eqs = f"xr, xz, xn = W(x); {rec}; r = sigmoid(xr + hr); z = sigmoid(xz + hz); {n}; h' = (1 - z) * n + z * h"
    return declare("gru", states="h", equations=eqs, layer_norm=layer_norm)


class GRUCell(DeclaredCell):
    r"""Gated recurrent unit, gate order (r, z, n) as ``torch.nn.GRU``.

    ``reset_after=True`` (torch.nn.GRU, cuDNN):

    .. math::
        \begin{aligned}
        r_t &= \sigma(W_r x_t + b_{ir} + R_r h_{t-1} + b_{hr}) \qquad
        z_t = \sigma(W_z x_t + b_{iz} + R_z h_{t-1} + b_{hz}) \\
        n_t &= \tanh(W_n x_t + b_{in} + r_t \odot (R_n h_{t-1} + b_{hn})) \\
        h_t &= (1 - z_t) \odot n_t + z_t \odot h_{t-1}
        \end{aligned}

    ``reset_after=False`` (Cho et al. 2014): :math:`n_t = \tanh(W_n x_t + b_{in} + R_n (r_t \odot h_{t-1}) + b_{hn})`,
    a second recurrent projection (of :math:`r_t \odot h_{t-1}`).

    ``layer_norm`` normalises :math:`W x_t` over all 3H rows and each recurrent projection
    (all 3H rows, or the (r, z) rows and the n rows separately for ``reset_after=False``), with
    gains ``ln_weight_ih`` / ``ln_weight_hh`` (3H); biases are added after normalisation.
    """

    family = "gru"

    def __init__(self, hidden_size: int, *, bias: bool = True, reset_after: bool = True,
                 layer_norm: bool = False) -> None:
        self.reset_after = bool(reset_after)
        super().__init__(gru_declaration(reset_after=self.reset_after, layer_norm=bool(layer_norm)), hidden_size,
                         bias=bias)

    def options(self) -> dict[str, Any]:
        return {"reset_after": self.reset_after, "layer_norm": self.layer_norm}
