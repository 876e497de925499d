"""LSTM cell with forget gate (Gers et al. 2000) and the variants studied by Greff et al. 2017."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .compile import DeclaredCell
from .declare import ACTIVATIONS, Declaration, declare

GATE_NAMES = ("input", "forget", "output")


def _act(name: str, e: str) -> str:
    return e if name == "identity" else f"{name}({e})"


@functools.cache
def lstm_declaration(*, peephole: bool = False, coupled: bool = False, drop_gates: tuple[str, ...] = (),
                     output_activation: bool = True, layer_norm: bool = False,
                     gate_activation: str = "sigmoid", candidate_activation: str = "tanh") -> Declaration:
    """The equations of an LSTM variant (see :class:`LSTMCell`)."""
    use_i, use_o = "input" not in drop_gates, "output" not in drop_gates
    use_f = "forget" not in drop_gates and not coupled
    blocks = [b if use else "_" for b, use in (("i", use_i), ("f", use_f), ("g", True), ("o", use_o))]
    peep = {g: (f" + p{g} * c" if g != "o" else " + po * c'") if peephole else "" for g in "ifo"}
    eqs = [", ".join("x" + b if b != "_" else b for b in blocks) + " = W(x)",
           ", ".join("h" + b if b != "_" else b for b in blocks) + " = R(h)"]
    if use_i:
        eqs.append("i = " + _act(gate_activation, f"xi + hi{peep['i']}"))
    if coupled:
        eqs.append("f = 1 - i")
    elif use_f:
        eqs.append("f = " + _act(gate_activation, f"xf + hf{peep['f']}"))
    eqs.append("g = " + _act(candidate_activation, "xg + hg"))
    keep = "f * c" if (use_f or coupled) else "c"
    eqs.append(f"c' = {keep} + " + ("i * g" if use_i else "g"))
    cc = "layer_norm(c', gc, bc)" if layer_norm else "c'"
    out = f"tanh({cc})" if output_activation else cc
    if use_o:
        eqs.append("o = " + _act(gate_activation, f"xo + ho{peep['o']}"))
        out = f"o * {out}"
    eqs.append(f"h' = {out}")
    params: dict[str, str] = {}
    if peephole:
        params["weight_ch"] = " ".join(f"p{g}" if (g == "i" and use_i) or (g == "f" and use_f) or
                                       (g == "o" and use_o) else "_" for g in "ifo")
    if layer_norm:
        params.update(ln_weight_c="gc", ln_bias_c="bc")
    return declare("lstm", states="h c", equations="\n".join(eqs), params=params, layer_norm=layer_norm)


class LSTMCell(DeclaredCell):
    r"""Long short-term memory cell, gate order (i, f, g, o) as ``torch.nn.LSTM``.

    .. math::
        \begin{aligned}
        a_t &= W x_t + b_{ih} + R h_{t-1} + b_{hh} \quad (4H: a^i, a^f, a^g, a^o) \\
        i_t &= \sigma(a^i_t + p_i \odot c_{t-1}) \qquad f_t = \sigma(a^f_t + p_f \odot c_{t-1}) \\
        g_t &= \tanh(a^g_t) \qquad c_t = f_t \odot c_{t-1} + i_t \odot g_t \\
        o_t &= \sigma(a^o_t + p_o \odot c_t) \qquad h_t = o_t \odot \phi(c_t)
        \end{aligned}

    Variants (each a constructor option, each a change of the declaration, :func:`lstm_declaration`):

    * ``peephole`` (Graves 2013): the diagonal terms :math:`p_i, p_f, p_o` (``weight_ch``, shape
      (3H,), ordered input, forget, output); without it they are absent (zero).
    * ``coupled`` (CIFG, Greff et al.): :math:`f_t = 1 - i_t`; the forget rows of the weights are unused.
    * ``drop_gates``: any of ``"input"``, ``"forget"``, ``"output"``; a dropped gate is fixed at 1
      (no forget gate is the original 1997 LSTM). Its weight rows are kept (for torch.nn layout)
      but unused.
    * ``output_activation=False``: :math:`\phi` is the identity instead of tanh.
    * ``gate_activation`` (default ``"sigmoid"``) replaces :math:`\sigma` in i, f, o and
      ``candidate_activation`` (default ``"tanh"``) the tanh of g: any of
      :data:`rnnkit.cells.declare.ACTIVATIONS`.
    * ``forget_bias``: the forget-gate bias at initialisation (``bias_ih`` forget slice; the
      ``bias_hh`` slice starts at 0). With ``coupled`` the input-gate bias is set to ``-forget_bias``.
    * ``layer_norm`` (Ba et al. 2016): :math:`a_t = \mathrm{LN}_x(W x_t) + b_{ih} + \mathrm{LN}_h(R h_{t-1})
      + b_{hh}` with gains ``ln_weight_ih``/``ln_weight_hh`` (4H), and
      :math:`h_t = o_t \odot \phi(\mathrm{LN}_c(c_t))` with ``ln_weight_c``/``ln_bias_c`` (H).
    """

    family = "lstm"

    def __init__(self, hidden_size: int, *, bias: bool = True, peephole: bool = False,
                 coupled: bool = False, drop_gates: Iterable[str] = (), output_activation: bool = True,
                 forget_bias: float = 1.0, layer_norm: bool = False, gate_activation: str = "sigmoid",
                 candidate_activation: str = "tanh") -> None:
        if isinstance(drop_gates, str):
            raise TypeError(f"drop_gates: expected a collection of gate names, got the string {drop_gates!r}"
                            f" (write drop_gates=({drop_gates!r},))")
        dropped = tuple(sorted(set(drop_gates)))
        unknown = [g for g in dropped if g not in GATE_NAMES]
        if unknown:
            raise ValueError(f"drop_gates: unknown gate(s) {unknown}; expected a subset of {list(GATE_NAMES)}")
        if coupled and ("input" in dropped or "forget" in dropped):
            raise ValueError(f"coupled=True ties the forget gate to the input gate (f = 1 - i); it cannot be "
                             f"combined with drop_gates={list(dropped)}")
        if not isinstance(forget_bias, (int, float)) or isinstance(forget_bias, bool):
            raise TypeError(f"forget_bias: expected a number, got {forget_bias!r}")
        for arg, v in (("gate_activation", gate_activation), ("candidate_activation", candidate_activation)):
            if v not in ACTIVATIONS:
                raise ValueError(f"{arg}: expected one of {list(ACTIVATIONS)}, got {v!r}")
        self.peephole = bool(peephole)
        self.coupled = bool(coupled)
        self.drop_gates = dropped
        self.output_activation = bool(output_activation)
        self.forget_bias = float(forget_bias)
        self.gate_activation = gate_activation
        self.candidate_activation = candidate_activation
        self.use_i = "input" not in dropped
        self.use_f = "forget" not in dropped and not self.coupled
        self.use_o = "output" not in dropped
        decl = lstm_declaration(peephole=self.peephole, coupled=self.coupled, drop_gates=dropped,
                                output_activation=self.output_activation, layer_norm=bool(layer_norm),
                                gate_activation=gate_activation, candidate_activation=candidate_activation)
        super().__init__(decl, hidden_size, bias=bias)

    def options(self) -> dict[str, Any]:
        return {"peephole": self.peephole, "coupled": self.coupled, "drop_gates": self.drop_gates,
                "output_activation": self.output_activation, "forget_bias": self.forget_bias,
                "gate_activation": self.gate_activation, "candidate_activation": self.candidate_activation,
                "layer_norm": self.layer_norm}

    def init_biases(self, bias_ih: Tensor, bias_hh: Tensor) -> None:
        H = self.hidden_size
        with torch.no_grad():
            if self.coupled:
                bias_ih[:H] = -self.forget_bias
                bias_hh[:H] = 0.0
            elif self.use_f:
                bias_ih[H:2 * H] = self.forget_bias
                bias_hh[H:2 * H] = 0.0
