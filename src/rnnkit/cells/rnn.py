"""Elman RNN cell (Elman 1990), tanh or relu, optionally layer-normalised."""

from __future__ import annotations

import functools
from typing import Any

from .compile import DeclaredCell
from .declare import Declaration, declare


@functools.cache
def elman_declaration(*, nonlinearity: str = "tanh", layer_norm: bool = False) -> Declaration:
    """The equation of an Elman RNN (see :class:`ElmanCell`)."""
    return declare("rnn", states="h", equations=f"xa = W(x); ha = R(h); h' = {nonlinearity}(xa + ha)",
                   layer_norm=layer_norm)


class ElmanCell(DeclaredCell):
    r"""Elman recurrent cell.

    .. math::
        h_t = \phi(W x_t + b_{ih} + R h_{t-1} + b_{hh}), \qquad \phi \in \{\tanh, \mathrm{relu}\}

    With ``layer_norm`` (Ba et al. 2016) the two projections are normalised separately, each with
    its own gain, and the biases are added after normalisation:
    :math:`h_t = \phi(\mathrm{LN}_x(W x_t) + b_{ih} + \mathrm{LN}_h(R h_{t-1}) + b_{hh})`.

    Parameter layout as ``torch.nn.RNN``: ``weight_ih`` (H, I), ``weight_hh`` (H, H), biases (H,).
    """

    family = "rnn"

    def __init__(self, hidden_size: int, *, bias: bool = True, nonlinearity: str = "tanh",
                 layer_norm: bool = False) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(elman_declaration(nonlinearity=nonlinearity, layer_norm=bool(layer_norm)), hidden_size,
                         bias=bias)

    def options(self) -> dict[str, Any]:
        return {"nonlinearity": self.nonlinearity, "layer_norm": self.layer_norm}
