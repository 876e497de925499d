r"""What rnnkit derives from a :class:`~rnnkit.cells.declare.Declaration`: a working cell.

:class:`DeclaredCell` evaluates the declaration's pointwise graph in torch ops and derives:

* ``step()``, the plain-torch step under autograd (the ``reference`` kernel's oracle);
* ``forward()``, the same evaluation given the kernel's input pre-activations and its ``rec``
  (recurrent matmul) callable, returning what the backward needs;
* ``backward()``, reverse mode over the pointwise graph, used by the ``bptt`` kernel.

What is saved and what is recomputed: the forward keeps, per step, exactly the node values that a
local derivative reads, and nothing is recomputed in the backward. Those are the outputs of
``sigmoid tanh exp relu softplus`` (their derivatives are written in terms of the output), both
operands of ``*``, ``max`` and ``min``, the divisor and the result of ``/``, the argument of ``log``,
``abs`` and ``hard_sigmoid``, and the statistics (normalised value, 1/std) of every layer norm.
Sums, differences and the projections themselves keep nothing (the kernel keeps each projection's
input for the weight gradient). States and inputs are referenced, not copied.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LN_EPS, Cell, State, Weights, ln_backward, ln_forward
from .declare import Declaration, Node

# Each operation once, as expression templates over its arguments ``a``, ``b``, its value ``y`` and the
# gradient ``g`` reaching it: the forward, and per argument the gradient that argument receives. The
# torch code of this module and the numba source of :mod:`rnnkit.kernels.cpu_generated` are both
# rendered from these. Helper functions: ``sigmoid tanh exp log log1p expm1 sign`` and
# ``relu(a)``, ``softplus(a)``, ``clip01(a)`` (clamp to [0, 1]), ``maximum``/``minimum``,
# ``tie(a, b)`` (1 if a > b, 1/2 if a == b, else 0: torch's even split of a tie), ``positive(a)``
# (1 if a > 0 else 0) and ``inside3(a)`` (1 if -3 < a < 3 else 0).
FORWARD: dict[str, str] = {
    "add": "a + b", "sub": "a - b", "mul": "a * b", "div": "a / b", "neg": "-a",
    "max": "maximum(a, b)", "min": "minimum(a, b)",
    "sigmoid": "sigmoid(a)", "tanh": "tanh(a)", "exp": "exp(a)", "log": "log(a)", "relu": "relu(a)",
    "softplus": "softplus(a)", "hard_sigmoid": "clip01(a / 6.0 + 0.5)", "abs": "abs(a)",
}
DERIVATIVES: dict[str, tuple[str, ...]] = {
    "add": ("g", "g"), "sub": ("g", "-g"), "neg": ("-g",), "mul": ("g * b", "g * a"),
    "div": ("g / b", "-g / b * y"),
    "max": ("g * tie(a, b)", "g * tie(b, a)"), "min": ("g * tie(b, a)", "g * tie(a, b)"),
    "sigmoid": ("g * y * (1.0 - y)",), "tanh": ("g * (1.0 - y * y)",), "exp": ("g * y",), "log": ("g / a",),
    "relu": ("g * positive(y)",),
    "softplus": ("-g * expm1(-y)",),  # sigmoid(a) = 1 - exp(-softplus(a))
    "hard_sigmoid": ("g * inside3(a) / 6.0",), "abs": ("g * sign(a)",),
}


def _reads(op: str) -> tuple[Any, ...]:
    names = set(re.findall(r"\b[aby]\b", " ".join(DERIVATIVES[op])))
    return tuple(r for r, n in (("out", "y"), (0, "a"), (1, "b")) if n in names)


#: Which values each operation's derivative reads: "out" (its own value) and/or argument positions.
DERIVATIVE_READS: dict[str, tuple[Any, ...]] = {op: _reads(op) for op in DERIVATIVES if _reads(op)}


def render(template: str, env: dict[str, str]) -> str:
    """A ``FORWARD``/``DERIVATIVES`` template with its names a, b, y, g replaced by (parenthesised)
    expressions (for code generators)."""
    return re.sub(r"\b([abyg])\b", lambda m: f"({env[m.group(1)]})", template)


def derivative_env(i: int, nd: Node, g: str, value: Callable[[int], str]) -> dict[str, str]:
    """The names of ``DERIVATIVES[nd.op]`` bound to expressions (for code generators): ``g`` the gradient,
    ``y`` (node ``i``'s value) and ``a``/``b`` (its arguments' values, ``value(node)``) where read."""
    env = {"g": g}
    reads = DERIVATIVE_READS.get(nd.op, ())
    if "out" in reads:
        env["y"] = value(i)
    for pos, key in ((0, "a"), (1, "b")):
        if pos < len(nd.args) and pos in reads:
            env[key] = value(nd.args[pos])
    return env


def _like(a: Any, b: Any) -> tuple[Tensor, Any]:
    return (a, b) if isinstance(a, Tensor) else (b, a)


def _tie(a: Any, b: Any) -> Any:
    t = a if isinstance(a, Tensor) else b
    if not isinstance(t, Tensor):
        return 1.0 if a > b else (0.5 if a == b else 0.0)
    return torch.where(a == b, 0.5, (a > b).to(t.dtype)).to(t.dtype)


def _extreme(fn: Callable) -> Callable:
    def run(a: Any, b: Any) -> Any:
        t, _ = _like(a, b)
        return fn(torch.as_tensor(a, dtype=t.dtype), torch.as_tensor(b, dtype=t.dtype))
    return run


#: The torch functions the templates name.
TORCH_FUNCTIONS: dict[str, Any] = {
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "exp": torch.exp, "log": torch.log, "relu": torch.relu,
    "softplus": F.softplus, "expm1": torch.expm1, "log1p": torch.log1p, "sign": torch.sign, "abs": torch.abs,
    # clamp(x/6 + 1/2, 0, 1), not F.hardsigmoid: torch's backward of that uses a float32 1/6 in float64
    "clip01": lambda a: torch.clamp(a, 0.0, 1.0),
    "maximum": _extreme(torch.maximum), "minimum": _extreme(torch.minimum), "tie": _tie,
    "positive": lambda a: (a > 0).to(a.dtype), "inside3": lambda a: ((a > -3) & (a < 3)).to(a.dtype),
}


@functools.cache
def _code(template: str) -> Any:
    return compile(template, template, "eval")


def pointwise(op: str, a: list[Any]) -> Any:
    """The forward of one pointwise operation on its argument values (tensors or floats)."""
    if op not in FORWARD:
        raise ValueError(f"op: no pointwise forward for {op!r}")
    return eval(_code(FORWARD[op]), TORCH_FUNCTIONS, {"a": a[0], "b": a[1] if len(a) > 1 else None})


def _local_grads(op: str, g: Tensor, a: list[Any], y: Any) -> list[Tensor]:
    """Gradients w.r.t. each argument of ``y = op(*a)`` given ``g = dL/dy``."""
    if op not in DERIVATIVES:
        raise ValueError(f"op: no derivative for {op!r}")
    env = {"g": g, "y": y, "a": a[0], "b": a[1] if len(a) > 1 else None}
    return [eval(_code(t), TORCH_FUNCTIONS, env) for t in DERIVATIVES[op]]


class DeclaredCell(Cell):
    """A cell whose step, forward and backward are derived from its declaration.

    Args:
        declaration: the compiled equations (:func:`rnnkit.cells.declare`).
        hidden_size: H.
        bias: whether the projections carry ``bias_ih`` / ``bias_hh``.
    """

    def __init__(self, declaration: Declaration, hidden_size: int, *, bias: bool = True) -> None:
        if not isinstance(declaration, Declaration):
            raise TypeError(f"declaration: expected a rnnkit.cells.Declaration (from declare()), "
                            f"got {type(declaration).__name__}")
        super().__init__(hidden_size, bias=bias, layer_norm=declaration.layer_norm)
        self._set_declaration(declaration)

    def _set_declaration(self, d: Declaration) -> None:
        self.declaration = d
        self.family = getattr(self, "family", "") or d.name
        self.gates = d.input_gates
        self.rec_gates = d.recurrent_gates
        self.state_size = len(d.states)
        self.state_names = d.states
        self.rec_parts = d.rec_parts
        self._params = dict(d.params)
        self._init = dict(d.init)
        reads: set[int] = set()
        for i, n in enumerate(d.nodes):
            for r in DERIVATIVE_READS.get(n.op, ()):
                reads.add(i if r == "out" else n.args[r])
        self._saved_ids = tuple(i for i in sorted(reads) if d.nodes[i].op != "const")

    # ---- description -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.declaration.name

    def extra_shapes(self) -> dict[str, tuple[int, ...]]:
        H = self.hidden_size
        shapes = {p: (len(b) * H,) for p, b in self._params.items() if not p.startswith("ln_")}
        if self.layer_norm:
            shapes["ln_weight_ih"] = (self.gates * H,)
            shapes["ln_weight_hh"] = (self.rec_gates * H,)
        shapes.update({p: (len(b) * H,) for p, b in self._params.items() if p.startswith("ln_")})
        return shapes

    @property
    def native(self) -> str | None:
        """The torch._VF function that computes this declaration (plain LSTM, GRU, RNN), if any."""
        from .gru import gru_declaration
        from .lstm import lstm_declaration
        from .rnn import elman_declaration

        return {lstm_declaration(): "lstm", gru_declaration(): "gru", elman_declaration(): "rnn_tanh",
                elman_declaration(nonlinearity="relu"): "rnn_relu"}.get(self.declaration)

    def init_extra(self, name: str, p: Tensor) -> None:
        kind = self._init.get(name, "ones" if name.startswith("ln_weight") else "uniform")
        if kind == "ones":
            torch.nn.init.ones_(p)
        elif kind == "zeros":
            torch.nn.init.zeros_(p)
        else:
            k = self.hidden_size**-0.5
            torch.nn.init.uniform_(p, -k, k)

    def check_input_size(self, input_size: int) -> str | None:
        """None if the cell can take inputs of ``input_size`` features, else the reason it cannot."""
        if self.declaration.raw_input and input_size != self.hidden_size:
            return (f"cell {self.name!r} uses the raw input x in its equations, so its input size must equal "
                    f"hidden_size={self.hidden_size}; got {input_size}")
        return None

    # ---- math --------------------------------------------------------------------------------
    def project_input(self, x: Tensor, w: Weights) -> Tensor:
        """Input pre-activations for all steps at once, with autograd: (..., I) -> (..., G*H [+ H]).

        The raw input is appended as a last block when the equations use ``x`` itself.
        """
        if self.layer_norm:
            GH = self.gates * self.hidden_size
            xg = F.layer_norm(F.linear(x, w["weight_ih"]), (GH,), w["ln_weight_ih"], w["bias_ih"], LN_EPS)
        else:
            xg = F.linear(x, w["weight_ih"], w["bias_ih"])
        return torch.cat([xg, x], -1) if self.declaration.raw_input else xg

    def _evaluate(self, xg: Tensor, state: State, w: Weights,
                  project: Callable[[Tensor, int], tuple[Tensor, tuple]]) -> tuple[list[Any], dict[int, tuple]]:
        """Every node's value for one step, and the layer-norm statistics by node."""
        H = self.hidden_size
        d = self.declaration
        vals: list[Any] = [None] * len(d.nodes)
        stats: dict[int, tuple] = {}
        for i, n in enumerate(d.nodes):
            op = n.op
            if op == "const":
                v = n.value
            elif op == "state":
                v = state[n.index]
            elif op == "input":
                k = self.gates if n.index < 0 else n.index
                v = xg[..., k * H:(k + 1) * H]
            elif op == "param":
                v = w[n.name][n.index * H:(n.index + 1) * H]
            elif op == "proj":
                v, stats[i] = project(vals[n.args[0]], n.index)
            elif op == "block":
                v = vals[n.args[0]][..., n.index * H:(n.index + 1) * H]
            elif op == "layer_norm":
                y, u_hat, rstd = ln_forward(vals[n.args[0]], vals[n.args[1]])
                stats[i] = (u_hat, rstd)
                v = y if len(n.args) < 3 else y + vals[n.args[2]]
            else:
                v = pointwise(op, [vals[a] for a in n.args])
            vals[i] = v
        return vals, stats

    def step(self, x: Tensor, state: State, w: Weights, hmask: Tensor | None = None) -> State:
        xg = self.project_input(x, w)

        def project(inp: Tensor, part: int) -> tuple[Tensor, tuple]:
            return self.rec_plain(inp, w, part, hmask), ()

        vals, _ = self._evaluate(xg, state, w, project)
        return tuple(vals[i] for i in self.declaration.updates)

    def _kernel_step(self, xg: Tensor, state: State, rec: Callable[..., Tensor], w: Weights):
        """Every node's value given the kernel's ``rec(inp, part)`` (raw projection; norm and bias here)."""
        def project(inp: Tensor, part: int) -> tuple[Tensor, tuple]:
            return self.rec_norm(rec(inp, part), w, part)

        return self._evaluate(xg, state, w, project)

    def forward(self, xg, state, rec, w):
        vals, stats = self._kernel_step(xg, state, rec, w)
        saved = ({i: vals[i] for i in self._saved_ids}, stats, xg.shape)
        return tuple(vals[i] for i in self.declaration.updates), saved

    def values(self, xg: Tensor, state: State, rec: Callable[..., Tensor], w: Weights
               ) -> tuple[State, dict[str, Tensor]]:
        """One step like :meth:`forward`, returning the new state and every named value (gates, ...)."""
        vals, _ = self._kernel_step(xg, state, rec, w)
        named = {n: vals[i] for n, i in self.declaration.symbols if not n.endswith("'")}
        return tuple(vals[i] for i in self.declaration.updates), named

    def backward(self, dstate, saved, rec_t, w):
        vals, stats, xg_shape = saved
        d = self.declaration
        nodes = d.nodes
        H = self.hidden_size
        grad: list[Any] = [None] * len(nodes)

        def acc(i: int, g: Tensor | None) -> None:
            if g is None or nodes[i].op == "const":
                return
            grad[i] = g if grad[i] is None else grad[i] + g

        for i, g in zip(d.updates, dstate):
            acc(i, g)
        like = dstate[0]
        dxg = like.new_zeros(xg_shape)
        dprev: list[Tensor | None] = [None] * self.state_size
        pgrads: dict[str, Tensor] = {}
        blocks: dict[int, dict[int, Tensor]] = {}
        grads: dict[str, Tensor] = {}
        for i in range(len(nodes) - 1, -1, -1):
            n: Node = nodes[i]
            g = grad[i]
            if n.op == "proj":  # every projection reports to the kernel, with zeros if nothing reached it
                got = blocks.get(i, {})
                dy = torch.cat([got.get(j, like.new_zeros(like.shape[:-1] + (H,))) for j in range(int(n.value))], -1)
                draw = self.rec_norm_backward(dy, stats[i], w, n.index, grads)
                acc(n.args[0], rec_t(draw, n.index))
                continue
            if g is None:
                continue
            op = n.op
            if op == "state":
                dprev[n.index] = g if dprev[n.index] is None else dprev[n.index] + g
            elif op == "input":
                k = self.gates if n.index < 0 else n.index
                dxg[..., k * H:(k + 1) * H] += g
            elif op == "param":
                gs = g.sum(0) if g.dim() > 1 else g
                if n.name not in pgrads:
                    pgrads[n.name] = gs.new_zeros(len(self._params[n.name]) * H)
                pgrads[n.name][n.index * H:(n.index + 1) * H] += gs
            elif op == "block":
                slot = blocks.setdefault(n.args[0], {})
                slot[n.index] = g if n.index not in slot else slot[n.index] + g
            elif op == "layer_norm":
                u_hat, rstd = stats[i]
                if len(n.args) == 3:
                    acc(n.args[2], g)
                gain = self._value(n.args[1], w)
                acc(n.args[1], g * u_hat)
                du, _ = ln_backward(g, u_hat, rstd, gain)
                acc(n.args[0], du)
            else:
                args = [vals.get(a, nodes[a].value if nodes[a].op == "const" else None) for a in n.args]
                for a, ga in zip(n.args, _local_grads(op, g, args, vals.get(i))):
                    acc(a, ga)
        for s in range(self.state_size):
            if dprev[s] is None:
                dprev[s] = torch.zeros_like(like)
        grads.update(pgrads)
        return dxg, tuple(dprev), grads

    def _value(self, i: int, w: Weights) -> Tensor:
        n = self.declaration.nodes[i]
        H = self.hidden_size
        return w[n.name][n.index * H:(n.index + 1) * H]

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({self.name!r}, hidden_size={self.hidden_size}{opts})"
