"""LSTM cell with forget gate (Gers et al. 2000) and the variants studied by Greff et al. 2017."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LN_EPS, Cell, State, Weights, ln_backward, ln_forward

GATE_NAMES = ("input", "forget", "output")


class LSTMCell(Cell):
    r"""Long short-term memory cell, gate order (i, f, g, o) as ``torch.nn.LSTM``.

    .. math::
        \begin{aligned}
        a_t &= W x_t + b_{ih} + R h_{t-1} + b_{hh} \quad (4H: a^i, a^f, a^g, a^o) \\
        i_t &= \sigma(a^i_t + p_i \odot c_{t-1}) \qquad f_t = \sigma(a^f_t + p_f \odot c_{t-1}) \\
        g_t &= \tanh(a^g_t) \qquad c_t = f_t \odot c_{t-1} + i_t \odot g_t \\
        o_t &= \sigma(a^o_t + p_o \odot c_t) \qquad h_t = o_t \odot \phi(c_t)
        \end{aligned}

    Variants (each a constructor option):

    * ``peephole`` (Graves 2013): the diagonal terms :math:`p_i, p_f, p_o` (``weight_ch``, shape
      (3H,), ordered input, forget, output); without it they are absent (zero).
    * ``coupled`` (CIFG, Greff et al.): :math:`f_t = 1 - i_t`; the forget rows of the weights are unused.
    * ``drop_gates``: any of ``"input"``, ``"forget"``, ``"output"``; a dropped gate is fixed at 1
      (no forget gate is the original 1997 LSTM). Its weight rows are kept (for torch.nn layout)
      but unused.
    * ``output_activation=False``: :math:`\phi` is the identity instead of tanh.
    * ``forget_bias``: the forget-gate bias at initialisation (``bias_ih`` forget slice; the
      ``bias_hh`` slice starts at 0). With ``coupled`` the input-gate bias is set to ``-forget_bias``.
    * ``layer_norm`` (Ba et al. 2016): :math:`a_t = \mathrm{LN}_x(W x_t) + b_{ih} + \mathrm{LN}_h(R h_{t-1})
      + b_{hh}` with gains ``ln_weight_ih``/``ln_weight_hh`` (4H), and
      :math:`h_t = o_t \odot \phi(\mathrm{LN}_c(c_t))` with ``ln_weight_c``/``ln_bias_c`` (H).
    """

    family = "lstm"
    gates = 4
    state_size = 2
    rec_parts = (4,)

    def __init__(self, hidden_size: int, *, bias: bool = True, peephole: bool = False,
                 coupled: bool = False, drop_gates: Iterable[str] = (), output_activation: bool = True,
                 forget_bias: float = 1.0, layer_norm: bool = False) -> None:
        super().__init__(hidden_size, bias=bias, layer_norm=layer_norm)
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
        self.peephole = bool(peephole)
        self.coupled = bool(coupled)
        self.drop_gates = dropped
        self.output_activation = bool(output_activation)
        self.forget_bias = float(forget_bias)
        self.use_i = "input" not in dropped
        self.use_f = "forget" not in dropped and not self.coupled
        self.use_o = "output" not in dropped

    def options(self) -> dict[str, Any]:
        return {"peephole": self.peephole, "coupled": self.coupled, "drop_gates": self.drop_gates,
                "output_activation": self.output_activation, "forget_bias": self.forget_bias,
                **super().options()}

    @property
    def is_plain(self) -> bool:
        return not (self.peephole or self.coupled or self.drop_gates or not self.output_activation
                    or self.layer_norm)

    @property
    def native(self) -> str | None:
        return "lstm" if self.is_plain else None

    def extra_shapes(self) -> dict[str, tuple[int, ...]]:
        H = self.hidden_size
        shapes = {}
        if self.peephole:
            shapes["weight_ch"] = (3 * H,)
        shapes.update(super().extra_shapes())
        if self.layer_norm:
            shapes["ln_weight_c"] = (H,)
            shapes["ln_bias_c"] = (H,)
        return shapes

    def init_biases(self, bias_ih: Tensor, bias_hh: Tensor) -> None:
        H = self.hidden_size
        with torch.no_grad():
            if self.coupled:
                bias_ih[:H] = -self.forget_bias
                bias_hh[:H] = 0.0
            elif self.use_f:
                bias_ih[H:2 * H] = self.forget_bias
                bias_hh[H:2 * H] = 0.0

    # ---- plain torch (reference) --------------------------------------------------------------
    def step(self, x: Tensor, state: State, w: Weights, hmask: Tensor | None = None) -> State:
        h, c = state
        a = self.project_input(x, w) + self.rec_plain(h, w, 0, hmask)
        ai, af, ag, ao = a.chunk(4, -1)
        pi, pf, po = w["weight_ch"].chunk(3) if self.peephole else (0.0, 0.0, 0.0)
        i = torch.sigmoid(ai + pi * c) if self.use_i else torch.ones_like(c)
        if self.coupled:
            f = 1 - i
        else:
            f = torch.sigmoid(af + pf * c) if self.use_f else torch.ones_like(c)
        c_new = f * c + i * torch.tanh(ag)
        o = torch.sigmoid(ao + po * c_new) if self.use_o else torch.ones_like(c)
        cc = c_new
        if self.layer_norm:
            cc = F.layer_norm(c_new, (self.hidden_size,), w["ln_weight_c"], w["ln_bias_c"], LN_EPS)
        h_new = o * (torch.tanh(cc) if self.output_activation else cc)
        return h_new, c_new

    # ---- pointwise forward / hand-derived backward -------------------------------------------
    def forward(self, xg, state, rec, w):
        h, c = state
        hg, ln_h = self.rec_norm(rec(h), w, 0)
        ai, af, ag, ao = (xg + hg).chunk(4, 1)
        pi, pf, po = w["weight_ch"].chunk(3) if self.peephole else (None, None, None)
        i = (torch.sigmoid(ai if pi is None else ai + pi * c)) if self.use_i else None
        if self.coupled:
            f = 1 - i
        elif self.use_f:
            f = torch.sigmoid(af if pf is None else af + pf * c)
        else:
            f = None
        g = torch.tanh(ag)
        c_new = (c if f is None else f * c) + (g if i is None else i * g)
        o = torch.sigmoid(ao if po is None else ao + po * c_new) if self.use_o else None
        ln_c = ()
        cc = c_new
        if self.layer_norm:
            y, u_hat, rstd = ln_forward(c_new, w["ln_weight_c"])
            cc, ln_c = y + w["ln_bias_c"], (u_hat, rstd)
        a = torch.tanh(cc) if self.output_activation else cc
        h_new = a if o is None else o * a
        return (h_new, c_new), (c, i, f, g, o, c_new, a, ln_h, ln_c)

    def backward(self, dstate, saved, rec_t, w):
        dh, dc_next = dstate
        c, i, f, g, o, c_new, a, ln_h, ln_c = saved
        grads: dict[str, Tensor] = {}
        pi, pf, po = w["weight_ch"].chunk(3) if self.peephole else (None, None, None)
        H = self.hidden_size
        zero = None
        # h = o * a,  a = phi(LN(c_new))
        da = dh if o is None else dh * o
        if self.output_activation:
            da = da * (1 - a * a)
        if self.layer_norm:
            grads["ln_bias_c"] = da.sum(0)
            da, grads["ln_weight_c"] = ln_backward(da, *ln_c, w["ln_weight_c"])
        dc = dc_next + da
        dao = zero
        if o is not None:
            dao = dh * a * o * (1 - o)
            if po is not None:
                dc = dc + dao * po
        # c_new = f * c + i * g
        dag = dc * (1 - g * g) if i is None else dc * i * (1 - g * g)
        dc_prev = dc if f is None else dc * f
        di = None if i is None else dc * g
        daf = zero
        if self.coupled:
            di = di - dc * c
        elif f is not None:
            daf = dc * c * f * (1 - f)
        dai = None if i is None else di * i * (1 - i)
        if self.peephole:
            dp = []
            for d_pre, p, src in ((dai, pi, c), (daf, pf, c), (dao, po, c_new)):
                if d_pre is None:
                    dp.append(torch.zeros(H, dtype=dh.dtype, device=dh.device))
                else:
                    dp.append((d_pre * src).sum(0))
                    if src is c:
                        dc_prev = dc_prev + d_pre * p
            grads["weight_ch"] = torch.cat(dp)
        blocks = [d if d is not None else torch.zeros_like(dh) for d in (dai, daf, dag, dao)]
        dpre = torch.cat(blocks, 1)
        dh_prev = rec_t(self.rec_norm_backward(dpre, ln_h, w, 0, grads), 0)
        return dpre, (dh_prev, dc_prev), grads
