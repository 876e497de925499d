"""The contract every recurrent cell implements.

A cell is pure math: it owns no parameters and no time loop. It declares the shapes of its
parameters, computes one step in plain torch (``step``, the oracle used by the ``reference``
kernel), and provides the pointwise forward/backward that the BPTT kernels call around their
matmuls. Kernels own the time loop, the matmuls (through the ``rec`` callables below) and what
is kept for the backward pass. Every cell of rnnkit is a :class:`~rnnkit.cells.compile.DeclaredCell`,
which derives all three from the cell's declaration.

Names follow the equations: ``x`` input, ``h``/``c`` states, ``W`` = ``weight_ih``,
``R`` = ``weight_hh``, ``G`` gates per cell, ``H`` hidden size, ``B`` batch.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

State = tuple[Tensor, ...]
Weights = dict[str, Tensor | None]

# Layer-norm epsilon shared by the derived step and backward and the generated kernels.
LN_EPS = 1e-5


def ln_forward(u: Tensor, gain: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Normalise ``u`` (B, N) over its last dim; returns (gain * u_hat, u_hat, 1/std)."""
    mu = u.mean(-1, keepdim=True)
    var = u.var(-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + LN_EPS)
    u_hat = (u - mu) * rstd
    return u_hat * gain, u_hat, rstd


def ln_backward(dy: Tensor, u_hat: Tensor, rstd: Tensor, gain: Tensor) -> tuple[Tensor, Tensor]:
    """Backward of :func:`ln_forward`: returns (du, dgain summed over the batch)."""
    dgain = (dy * u_hat).sum(0)
    g = dy * gain
    du = rstd * (g - g.mean(-1, keepdim=True) - u_hat * (g * u_hat).mean(-1, keepdim=True))
    return du, dgain


def add_bias(a: Tensor, b: Tensor | None) -> Tensor:
    return a if b is None else a + b


class Cell(abc.ABC):
    """Base class of a cell definition for a fixed hidden size and variant options.

    Attributes:
        family: the family that built it ("rnn", "lstm", "gru", ...; a declared cell's name otherwise).
        gates: G, the number of gate blocks in ``weight_ih`` rows (G * H rows).
        rec_gates: the number of gate blocks in ``weight_hh`` rows (equal to G for torch.nn's cells).
        state_size: the number of state tensors, each (B, H); the first is the output.
        state_names: their names.
        rec_parts: gate counts of the recurrent projections, in row order.
        rec_bias: whether the kernel's ``rec`` adds ``bias_hh`` (False for layer-norm cells,
            which add it after normalising, inside the pointwise math).
    """

    family: str = ""
    gates: int = 1
    state_size: int = 1
    rec_gates: int = 1
    state_names: tuple[str, ...] = ("h",)
    rec_parts: tuple[int, ...] = (1,)

    def __init__(self, hidden_size: int, *, bias: bool = True, layer_norm: bool = False) -> None:
        self.hidden_size = hidden_size
        self.bias = bias
        self.layer_norm = layer_norm

    # ---- description -------------------------------------------------------------------------
    @property
    def rec_bias(self) -> bool:
        return self.bias and not self.layer_norm

    def options(self) -> dict[str, Any]:
        """The variant options that define this cell (for repr, registry and configs)."""
        return {"layer_norm": self.layer_norm}

    @abc.abstractmethod
    def extra_shapes(self) -> dict[str, tuple[int, ...]]:
        """Cell-specific parameters beyond torch.nn's four, by base name (no ``_l{k}`` suffix)."""

    @property
    def native(self) -> str | None:
        """Name of the torch._VF function computing this cell, or None if torch has none."""
        return None

    # ---- initialisation ----------------------------------------------------------------------
    @abc.abstractmethod
    def init_extra(self, name: str, p: Tensor) -> None:
        """Initialise the extra parameter ``name`` (see :meth:`extra_shapes`) in place."""

    def init_biases(self, bias_ih: Tensor, bias_hh: Tensor) -> None:
        """Adjust the torch-style U(-k, k) bias init (e.g. the forget-gate bias). Default: keep."""
        return None

    # ---- math --------------------------------------------------------------------------------
    @abc.abstractmethod
    def project_input(self, x: Tensor, w: Weights) -> Tensor:
        """Input pre-activations for all steps at once, with autograd: (T, B, I) -> (T, B, G*H)."""

    def rec_plain(self, h: Tensor, w: Weights, part: int, hmask: Tensor | None) -> Tensor:
        """Plain-torch recurrent projection of one part (including layer norm), for ``step``."""
        H = self.hidden_size
        start = sum(self.rec_parts[:part]) * H
        stop = start + self.rec_parts[part] * H
        R = w["weight_hh"][start:stop]
        b = None if w["bias_hh"] is None else w["bias_hh"][start:stop]
        if hmask is not None:
            h = h * hmask
        if not self.layer_norm:
            return F.linear(h, R, b)
        gain = w["ln_weight_hh"][start:stop]
        return F.layer_norm(F.linear(h, R), (stop - start,), gain, b, LN_EPS)

    def rec_norm(self, hg: Tensor, w: Weights, part: int) -> tuple[Tensor, tuple]:
        """Layer-norm (if enabled) a raw recurrent projection inside the pointwise forward."""
        if not self.layer_norm:
            return hg, ()
        H = self.hidden_size
        start = sum(self.rec_parts[:part]) * H
        stop = start + self.rec_parts[part] * H
        y, u_hat, rstd = ln_forward(hg, w["ln_weight_hh"][start:stop])
        b = None if w["bias_hh"] is None else w["bias_hh"][start:stop]
        return add_bias(y, b), (u_hat, rstd)

    def rec_norm_backward(self, dy: Tensor, ln_saved: tuple, w: Weights, part: int,
                          grads: dict[str, Tensor]) -> Tensor:
        """Backward of :meth:`rec_norm`: returns d(raw projection), accumulates ln/bias grads."""
        if not self.layer_norm:
            return dy
        H = self.hidden_size
        start = sum(self.rec_parts[:part]) * H
        stop = start + self.rec_parts[part] * H
        u_hat, rstd = ln_saved
        du, dgain = ln_backward(dy, u_hat, rstd, w["ln_weight_hh"][start:stop])
        _accumulate(grads, "ln_weight_hh", dgain, start, stop, self.rec_gates * H)
        if w["bias_hh"] is not None:
            _accumulate(grads, "bias_hh", dy.sum(0), start, stop, self.rec_gates * H)
        return du

    @abc.abstractmethod
    def step(self, x: Tensor, state: State, w: Weights, hmask: Tensor | None = None) -> State:
        """One step in plain torch (autograd): the oracle. ``hmask`` scales h in the recurrent matmul."""

    @abc.abstractmethod
    def forward(self, xg: Tensor, state: State, rec: Callable[..., Tensor], w: Weights) -> tuple[State, Any]:
        """Pointwise forward of one step given input pre-activations ``xg`` (B, G*H).

        Returns the new state and what :meth:`backward` needs (``saved``).
        """

    @abc.abstractmethod
    def backward(self, dstate: State, saved: Any, rec_t: Callable[..., Tensor], w: Weights
                 ) -> tuple[Tensor, State, dict[str, Tensor]]:
        """Hand-derived backward of :meth:`forward`.

        Args:
            dstate: gradient w.r.t. the new state (B, H) per component.
            rec_t: ``rec_t(d_out, part)`` returns the gradient w.r.t. that part's recurrent input
                (``d_out @ R_part``) and lets the kernel accumulate the weight gradient.
        Returns:
            (d xg (B, G*H), gradient w.r.t. the previous state, {name: grad} for the extra parameters, and ``bias_hh``
            when it is added after a layer norm).
        """

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}(hidden_size={self.hidden_size}, {opts})"


def _accumulate(grads: dict[str, Tensor], name: str, g: Tensor, start: int, stop: int, total: int) -> None:
    """Add ``g`` into rows [start, stop) of ``grads[name]`` (created at size ``total``)."""
    if name not in grads:
        grads[name] = g.new_zeros(total)
    grads[name][start:stop] += g
