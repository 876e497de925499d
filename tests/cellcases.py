"""What tests parametrized over the cell registry need to know about each cell."""

from __future__ import annotations

import torch

from rnnkit.cells import REGISTRY, declare, make_cell


def _cell(name: str, H: int = 4):
    spec = REGISTRY[name]
    return make_cell(spec.family, H, **spec.cell_options)


#: Registered cells whose generated ``cpu`` loops the default suite compiles: every kind of level
#: structure (one GEMM first; a projection of ``r * h`` or of ``tanh(h)``), layer norm of projections and
#: of a value, parameters, dropped and coupled gates, several states, the raw input. Every registered cell
#: is run by the slow tests (each declaration compiles for ~8 s of CPU per dtype).
CPU_CASES = ["rnn_relu", "rnn_ln", "lstm", "lstm_peephole_ln", "lstm_cifg", "lstm_zoneout", "gru", "gru_cho_ln",
             "gru_rdrop", "slstm", "mut1", "mut3"]


def input_size(name: str, I: int, H: int) -> int:
    """``I``, or ``H`` for a cell whose equations use the raw input (MUT1, MUT2)."""
    return H if _cell(name, H).declaration.raw_input else I


def random_state(name: str, LD: int, B: int, H: int, dtype=torch.float64, generator=None, requires_grad=True):
    """A given initial state for the layer (a tensor, or a tuple for several states). Values lie in
    [0.5, 1.5]: the sLSTM divides by its normaliser state n, which must stay away from zero."""
    parts = [(torch.rand(LD, B, H, dtype=dtype, generator=generator) + 0.5).requires_grad_(requires_grad)
             for _ in range(_cell(name).state_size)]
    return tuple(parts) if len(parts) > 1 else parts[0]


#: A user cell that uses every operation of the language, two states, a parameter, a layer norm over a
#: block, the raw input and a recurrent projection of an expression of the state.
USER = declare("everything", states="h m", params={"p": "pa pb", "g": "gn"}, init={"g": "ones"}, equations="""
    xa, xb, xc = W(x)
    ha, hb = R(h)
    hc = R(a * h - m / 4)
    a = sigmoid(xa + ha + pa * m)
    b = hard_sigmoid(2 * (xb + hb))
    s = softplus(xc) + exp(-abs(hc)) + log(1 + a)
    m' = max(m * b, relu(s) - 1) + min(x, 0.5)
    h' = tanh(layer_norm(s * pb, gn)) * (1 - b) + b * h - m' / (2 + a)
""")
