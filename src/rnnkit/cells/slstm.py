r"""The sLSTM of xLSTM (Beck et al. 2024): exponential gates with a normaliser and a stabiliser state.

.. math::
    \begin{aligned}
    \tilde\imath_t &= W_i x_t + R_i h_{t-1} + b_i \qquad \tilde f_t = W_f x_t + R_f h_{t-1} + b_f \\
    z_t &= \tanh(W_z x_t + R_z h_{t-1} + b_z) \qquad o_t = \sigma(W_o x_t + R_o h_{t-1} + b_o) \\
    m_t &= \max(\tilde f_t + m_{t-1},\ \tilde\imath_t) \\
    i_t &= \exp(\tilde\imath_t - m_t) \qquad f_t = \exp(\tilde f_t + m_{t-1} - m_t) \\
    c_t &= f_t \odot c_{t-1} + i_t \odot z_t \qquad n_t = f_t \odot n_{t-1} + i_t \\
    h_t &= o_t \odot c_t / n_t
    \end{aligned}

Four states (h, c, n, m); exponential input and forget gates (:math:`\exp(\tilde f)`, the paper's
exponential choice for the forget gate). The stabiliser m keeps every exponent <= 0 and cancels out of
:math:`h_t` exactly: c and n are the unstabilised ones times :math:`e^{-m_t}` (tested against an
unstabilised float64 computation). The recurrent matrix is full: the paper's block-diagonal recurrent
heads are not modelled (one head of size H). Gate layout of ``weight_ih`` / ``weight_hh``: (i, f, z, o).
"""

from __future__ import annotations

from .declare import declare

SLSTM = declare("slstm", states="h c n m", gates="i f z o", equations="""
    xi, xf, xz, xo = W(x)
    hi, hf, hz, ho = R(h)
    ai = xi + hi
    af = xf + hf
    z = tanh(xz + hz)
    o = sigmoid(xo + ho)
    m' = max(af + m, ai)
    i = exp(ai - m')
    f = exp(af + m - m')
    c' = f * c + i * z
    n' = f * n + i
    h' = o * c' / n'
""")
