r"""MUT1, MUT2 and MUT3, the three architectures found by Jozefowicz, Zaremba & Sutskever (2015)'s search.

As in the paper (:math:`\sigma` the sigmoid, :math:`\odot` elementwise, biases in every projection):

.. math::
    \begin{aligned}
    \text{MUT1:}\ & z = \sigma(W_{xz} x_t + b_z), \quad r = \sigma(W_{xr} x_t + W_{hr} h_t + b_r), \\
      & h_{t+1} = \tanh(W_{hh}(r \odot h_t) + \tanh(x_t) + b_h) \odot z + h_t \odot (1 - z) \\
    \text{MUT2:}\ & z = \sigma(W_{xz} x_t + W_{hz} h_t + b_z), \quad r = \sigma(x_t + W_{hr} h_t + b_r), \\
      & h_{t+1} = \tanh(W_{hh}(r \odot h_t) + W_{xh} x_t + b_h) \odot z + h_t \odot (1 - z) \\
    \text{MUT3:}\ & z = \sigma(W_{xz} x_t + W_{hz} \tanh(h_t) + b_z), \\
      & r = \sigma(W_{xr} x_t + W_{hr} h_t + b_r), \\
      & h_{t+1} = \tanh(W_{hh}(r \odot h_t) + W_{xh} x_t + b_h) \odot z + h_t \odot (1 - z)
    \end{aligned}

MUT1 and MUT2 add the raw input :math:`x_t` to a hidden-sized pre-activation, so they need
``input_size == hidden_size`` (e.g. ``--embedding-size`` equal to ``--hidden-size``; the paper's inputs
are embeddings of the hidden size). The recurrent projections are separate parts of ``weight_hh`` in the
order they appear below (MUT3: :math:`W_{hz}` of tanh(h), then :math:`W_{hr}`, then :math:`W_{hh}`).
"""

from __future__ import annotations

from .declare import declare

MUT1 = declare("mut1", states="h", equations="""
    xz, xr = W(x)
    hr = R(h)
    hh = R(r * h)
    z = sigmoid(xz)
    r = sigmoid(xr + hr)
    h' = tanh(hh + tanh(x)) * z + h * (1 - z)
""")

MUT2 = declare("mut2", states="h", equations="""
    xz, xh = W(x)
    hz, hr = R(h)
    hh = R(r * h)
    z = sigmoid(xz + hz)
    r = sigmoid(x + hr)
    h' = tanh(hh + xh) * z + h * (1 - z)
""")

MUT3 = declare("mut3", states="h", equations="""
    xz, xr, xh = W(x)
    hz = R(tanh(h))
    hr = R(h)
    hh = R(r * h)
    z = sigmoid(xz + hz)
    r = sigmoid(xr + hr)
    h' = tanh(hh + xh) * z + h * (1 - z)
""")
