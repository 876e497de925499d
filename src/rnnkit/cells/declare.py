r"""The cell declaration language: a cell's equations, written once, checked when defined.

A declaration names the cell's states and lists its pointwise equations, one per line, in a small
language parsed with Python's own grammar (``#`` starts a comment; ``;`` also separates equations).
``s'`` is the new value of state ``s``; the first state is the layer's output. For example the LSTM::

    declare("lstm", states="h c", equations='''
        xi, xf, xg, xo = W(x)          # gate blocks of the input projection  W x + b_ih
        hi, hf, hg, ho = R(h)          # gate blocks of a recurrent projection R h + b_hh
        i = sigmoid(xi + hi); f = sigmoid(xf + hf); g = tanh(xg + hg); o = sigmoid(xo + ho)
        c' = f * c + i * g
        h' = o * tanh(c')
    ''')

Building blocks:

* ``a, b, ... = W(x)``: the input projection (exactly one), one H-wide block per target; its rows are
  ``weight_ih`` (and ``bias_ih``) in target order. ``_`` marks a block kept only for the layout
  (unused on purpose, e.g. the forget rows of a coupled LSTM).
* ``a, b = R(e)``: a recurrent projection of any expression ``e`` of the state (the Cho GRU projects
  ``r * h``); the rows of ``weight_hh`` (and ``bias_hh``) are the blocks of every ``R`` in the order the
  equations list them. Each ``R`` is one "part" for the kernels (one matmul per step).
* ``x`` used in a pointwise expression is the raw input itself (an identity block): the layer then
  needs ``input_size == hidden_size`` (Jozefowicz et al.'s MUT1/MUT2 use it).
* per-unit parameters: ``params={"weight_ch": "p_i p_f p_o"}`` declares a parameter of 3H values whose
  H-wide blocks are the symbols ``p_i, p_f, p_o`` (``_``: a layout-only block); initialised
  U(-1/sqrt(H), 1/sqrt(H)), or ones for names starting ``ln_weight``, zeros for ``ln_bias``
  (override with ``init={"name": "ones"}``).
* ``layer_norm=True`` normalises every projection (``W x`` over all its rows, each ``R`` over its rows)
  before its bias is added, with gains ``ln_weight_ih`` / ``ln_weight_hh`` (Ba et al. 2016).

Operations (:data:`OPERATIONS`): ``+ - * /``, unary ``-``, numeric constants, ``sigmoid tanh exp log
relu softplus hard_sigmoid abs`` (one argument), ``max min`` (two), ``layer_norm(e, gain, bias)``
(normalise ``e`` over its H units; ``gain`` and ``bias`` are one-block parameters, ``bias`` optional).

Checked when defined (:class:`DeclarationError`, naming the equation and the symbol): unknown
operations or symbols, a state never updated, an unused gate block, shape mismatches (a constant
where H units are needed, wrong number of targets), a name defined twice, and cycles.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError

#: Pointwise operations of the language: name -> number of arguments.
OPERATIONS: dict[str, int] = {
    "sigmoid": 1, "tanh": 1, "exp": 1, "log": 1, "relu": 1, "softplus": 1, "hard_sigmoid": 1, "abs": 1,
    "max": 2, "min": 2, "layer_norm": 3,
}
#: Unary activations a declaration builder may take as a user choice (e.g. an LSTM's gate activation).
ACTIVATIONS = ("sigmoid", "tanh", "exp", "relu", "softplus", "hard_sigmoid", "abs", "identity")
_BINOPS = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "div"}
_PRIME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)'")
_NEXT = "__next"
INITS = ("uniform", "ones", "zeros")


class DeclarationError(UserError):
    """A cell declaration that cannot be compiled; the message names the equation and the symbol."""


def _show(name: str) -> str:
    return name[: -len(_NEXT)] + "'" if name.endswith(_NEXT) else name


@dataclass(frozen=True)
class Node:
    """One value of the pointwise graph, (B, H) unless ``width == 1`` (a constant).

    ``op`` is an operation of :data:`OPERATIONS`, an arithmetic op (add sub mul div neg), or a leaf:
    ``const`` (``value``), ``state`` (``index``), ``input`` (block ``index`` of the input
    pre-activations; the raw-x block is the last), ``param`` (``name`` and block ``index``), ``proj``
    (recurrent projection ``index`` of ``args[0]``, ``value`` = its number of blocks) and ``block``
    (block ``index`` of the projection ``args[0]``).
    """

    op: str
    args: tuple[int, ...] = ()
    index: int = 0
    name: str = ""
    value: float = 0.0
    width: int = 0  # 0: H units, 1: a constant


@dataclass(frozen=True)
class Declaration:
    """A compiled cell declaration: the equations as a graph, in evaluation order.

    Equal declarations (``==``) have the same equations, blocks, parameters and options, whatever their
    names: this is how hand-written kernels (torch's, behind ``native``) recognise the cells they implement.

    Attributes:
        name: the cell's name (for messages and reprs).
        states: state names; the first is the output.
        equations: the source, normalised (one equation per line).
        input_blocks: names of the ``W(x)`` targets (``_`` for layout-only blocks).
        raw_input: whether the raw input ``x`` appears in the equations (then I must equal H).
        projections: per ``R``, the names of its blocks.
        params: per-unit parameter -> its block names; ``init``: parameter -> "uniform"/"ones"/"zeros".
        layer_norm: whether every projection is layer-normalised.
        nodes: the graph in topological order; ``updates``: per state, the node of its new value;
        ``symbols``: equation name (``s'`` for a new state) -> node; ``gates``: the names reported as
        gates (statistics).
    """

    name: str = field(compare=False)  # two declarations of the same equations are the same cell
    states: tuple[str, ...]
    equations: str
    input_blocks: tuple[str, ...]
    raw_input: bool
    projections: tuple[tuple[str, ...], ...]
    params: tuple[tuple[str, tuple[str, ...]], ...]
    init: tuple[tuple[str, str], ...]
    layer_norm: bool
    nodes: tuple[Node, ...] = field(repr=False, compare=False)
    updates: tuple[int, ...] = field(repr=False, compare=False)
    symbols: tuple[tuple[str, int], ...] = field(repr=False, compare=False)
    gates: tuple[str, ...] = ()

    @property
    def input_gates(self) -> int:
        """Blocks of ``weight_ih`` (G): the ``W(x)`` targets."""
        return len(self.input_blocks)

    @property
    def recurrent_gates(self) -> int:
        """Blocks of ``weight_hh``: the targets of every ``R``."""
        return sum(len(p) for p in self.projections)

    @property
    def rec_parts(self) -> tuple[int, ...]:
        return tuple(len(p) for p in self.projections)

    def symbol(self, name: str) -> int:
        return dict(self.symbols)[name]

    def operations(self) -> frozenset[str]:
        """Every operation the pointwise graph uses (leaves excluded)."""
        leaves = {"const", "state", "input", "param", "proj", "block"}
        return frozenset(n.op for n in self.nodes if n.op not in leaves)

    def sigmoid_gates(self) -> tuple[str, ...]:
        """The gates whose values lie in [0, 1] by construction: a sigmoid or hard sigmoid, or one
        minus such a gate (for saturation statistics)."""
        nodes = self.nodes
        sym = dict(self.symbols)

        def unit(i: int) -> bool:
            n = nodes[i]
            if n.op in ("sigmoid", "hard_sigmoid"):
                return True
            return (n.op == "sub" and nodes[n.args[0]].op == "const" and nodes[n.args[0]].value == 1.0
                    and unit(n.args[1]))

        return tuple(g for g in self.gates if unit(sym[g]))


def declare(name: str, *, states: str | tuple[str, ...], equations: str,
            params: dict[str, str | tuple[str, ...]] | None = None, init: dict[str, str] | None = None,
            layer_norm: bool = False, gates: str | tuple[str, ...] | None = None) -> Declaration:
    """Compile a cell declaration (see the module docstring for the language).

    Args:
        name: the cell's name.
        states: state names, e.g. ``"h c"``; the first is the output.
        equations: the equations, one per line (or separated by ``;``).
        params: per-unit parameters: name -> its H-wide block names.
        init: parameter name -> "uniform", "ones" or "zeros" (default from the name, see above).
        layer_norm: layer-normalise every projection (gains ``ln_weight_ih``, ``ln_weight_hh``).
        gates: names reported by gate statistics; default every named intermediate value.
    Raises:
        DeclarationError: naming the equation and the symbol at fault.
    """
    return _Compiler(name, states, equations, params or {}, init or {}, layer_norm, gates).compile()


def _names(what: str, value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    items = tuple(value.split()) if isinstance(value, str) else tuple(value)
    for s in items:
        if not isinstance(s, str) or not s.isidentifier():
            raise DeclarationError(f"{what}: {s!r} is not a valid symbol name")
    return items


@dataclass
class _Eq:
    line: int
    text: str
    targets: tuple[str, ...]
    value: ast.expr


class _Compiler:
    def __init__(self, name, states, equations, params, init, layer_norm, gates) -> None:
        if not isinstance(name, str) or not name:
            raise DeclarationError(f"name: expected a non-empty string, got {name!r}")
        self.name = name
        self.states = _names(f"cell {name!r}: states", states)
        if not self.states:
            raise DeclarationError(f"cell {name!r}: states: expected at least one state, got none")
        if not isinstance(equations, str):
            raise DeclarationError(f"cell {name!r}: equations: expected a string, got {type(equations).__name__}")
        self.source = equations
        self.params = {p: _names(f"cell {name!r}: params[{p!r}]", b) for p, b in params.items()}
        for p in self.params:
            if not p.isidentifier():
                raise DeclarationError(f"cell {name!r}: params: {p!r} is not a valid parameter name")
        for p, kind in init.items():
            if p not in self.params:
                raise DeclarationError(f"cell {name!r}: init: {p!r} is not a declared parameter "
                                       f"(have {sorted(self.params)})")
            if kind not in INITS:
                raise DeclarationError(f"cell {name!r}: init[{p!r}]: expected one of {list(INITS)}, got {kind!r}")
        self.init = {p: init.get(p, "ones" if p.startswith("ln_weight") else
                                 "zeros" if p.startswith("ln_bias") else "uniform") for p in self.params}
        self.layer_norm = bool(layer_norm)
        self.gates = None if gates is None else _names(f"cell {name!r}: gates", gates)
        self.nodes: list[Node] = []
        self.memo: dict[Any, int] = {}

    # ---- errors --------------------------------------------------------------------------------
    def err(self, eq: _Eq | None, msg: str) -> DeclarationError:
        where = f"cell {self.name!r}" + (f", equation {eq.line} `{eq.text}`" if eq else "")
        return DeclarationError(f"{where}: {msg}")

    # ---- parsing -------------------------------------------------------------------------------
    def parse(self) -> list[_Eq]:
        eqs = []
        pieces = []
        for raw in self.source.splitlines():
            pieces += [p.strip() for p in raw.split("#", 1)[0].split(";")]
        for text in (p for p in pieces if p):
            eq = _Eq(len(eqs) + 1, text, (), ast.Constant(0))
            try:
                tree = ast.parse(_PRIME.sub(r"\1" + _NEXT, text), mode="exec")
            except SyntaxError as e:
                raise self.err(eq, f"not an equation ({e.msg})") from None
            if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assign) or len(tree.body[0].targets) != 1:
                raise self.err(eq, "expected one assignment `name = expression` (or `a, b = R(e)`)")
            target = tree.body[0].targets[0]
            elts = target.elts if isinstance(target, ast.Tuple) else [target]
            if not all(isinstance(t, ast.Name) for t in elts):
                raise self.err(eq, "the left side must be a name or a tuple of names")
            eq.targets = tuple(t.id for t in elts)
            eq.value = tree.body[0].value
            eqs.append(eq)
        if not eqs:
            raise self.err(None, "equations: none given")
        return eqs

    # ---- compile -------------------------------------------------------------------------------
    def compile(self) -> Declaration:
        eqs = self.parse()
        self.defs: dict[str, tuple[_Eq, int]] = {}  # name -> (equation, block index)
        self.input_eq = None
        self.proj_eqs: list[_Eq] = []
        reserved = {"x", "W", "R", *OPERATIONS, *self.states}
        param_syms = {b: (p, j) for p, blocks in self.params.items() for j, b in enumerate(blocks) if b != "_"}
        for eq in eqs:
            call = eq.value if isinstance(eq.value, ast.Call) and isinstance(eq.value.func, ast.Name) else None
            kind = call.func.id if call is not None and call.func.id in ("W", "R") else None
            if len(eq.targets) > 1 and kind is None:
                raise self.err(eq, f"{len(eq.targets)} targets {list(eq.targets)}, but only W(x) and R(e) "
                                   "give several blocks; a pointwise expression gives one")
            if kind == "W":
                if self.input_eq is not None:
                    raise self.err(eq, f"a second input projection W(x) (the first is equation "
                                       f"{self.input_eq.line}); a cell has exactly one")
                if len(call.args) != 1 or not isinstance(call.args[0], ast.Name) or call.args[0].id != "x":
                    raise self.err(eq, "the input projection is written W(x)")
                self.input_eq = eq
            elif kind == "R":
                if len(call.args) != 1 or call.keywords:
                    raise self.err(eq, "R takes one argument, the expression to project")
                self.proj_eqs.append(eq)
            for j, t in enumerate(eq.targets):
                shown = _show(t)
                if t == "_":
                    if kind is None:
                        raise self.err(eq, "`_` (an unused block) is only a target of W(x) or R(e)")
                    continue
                if t.endswith(_NEXT):
                    base = t[: -len(_NEXT)]
                    if base not in self.states:
                        raise self.err(eq, f"{shown!r} updates {base!r}, which is not a state "
                                           f"(states: {list(self.states)})")
                    if kind is not None:
                        raise self.err(eq, f"state update {shown!r} must be a pointwise expression")
                elif t in reserved or t in param_syms:
                    raise self.err(eq, f"{shown!r} is already a state, parameter or reserved name")
                if t in self.defs:
                    raise self.err(eq, f"{shown!r} is defined twice (also in equation {self.defs[t][0].line})")
                self.defs[t] = (eq, j)
        if self.input_eq is None:
            raise self.err(None, "no input projection: add an equation `a, b, ... = W(x)`")
        missing = [s for s in self.states if s + _NEXT not in self.defs]
        if missing:
            raise self.err(None, f"state {missing[0]!r} is never updated (add an equation `{missing[0]}' = ...`)")
        self.param_syms = param_syms
        self.raw_input = False
        self.projections = [tuple(eq.targets) for eq in self.proj_eqs]
        self.used: set[str] = set()
        updates = tuple(self.resolve(s + _NEXT, None, ()) for s in self.states)
        for s, i in zip(self.states, updates):
            if self.nodes[i].width == 1:
                eq = self.defs[s + _NEXT][0]
                raise self.err(eq, f"shape mismatch: state {s!r} is set to a constant; expected H units")
        for part, eq in enumerate(self.proj_eqs):
            if ("proj", part) not in self.memo:
                raise self.err(eq, "unused gate blocks: no block of this recurrent projection is used")
        for t, (eq, _) in self.defs.items():
            if t not in self.used and not t.endswith(_NEXT):
                what = "gate block" if eq is self.input_eq or eq in self.proj_eqs else "symbol"
                raise self.err(eq, f"unused {what} {t!r} (name a layout-only block `_`)")
        for p, blocks in self.params.items():
            unused = [b for b in blocks if b != "_" and b not in self.used]
            if unused:
                raise self.err(None, f"params[{p!r}]: block {unused[0]!r} is never used")
        named = [t for t in self.defs if not t.endswith(_NEXT) and self.defs[t][0] is not self.input_eq
                 and self.defs[t][0] not in self.proj_eqs]
        gates = tuple(named) if self.gates is None else self.gates
        for g in gates:
            if g not in named:
                raise self.err(None, f"gates: {g!r} is not a named intermediate value (have {named})")
        text = "\n".join(eq.text for eq in eqs)
        symbols = tuple((_show(t), self.memo[("sym", t)]) for t in self.defs if ("sym", t) in self.memo)
        return Declaration(self.name, self.states, text, tuple(self.input_eq.targets), self.raw_input,
                           tuple(self.projections), tuple(self.params.items()), tuple(self.init.items()),
                           self.layer_norm, tuple(self.nodes), updates, symbols, gates)

    def add(self, node: Node) -> int:
        key = ("node", node)
        if key not in self.memo:
            self.nodes.append(node)
            self.memo[key] = len(self.nodes) - 1
        return self.memo[key]

    def resolve(self, name: str, eq: _Eq | None, stack: tuple[str, ...]) -> int:
        """The node of symbol ``name`` (as used in equation ``eq``), compiling its definition."""
        self.used.add(name)
        if ("sym", name) in self.memo:
            return self.memo[("sym", name)]
        if name in self.states:
            return self.add(Node("state", index=self.states.index(name)))
        if name in self.param_syms:
            p, j = self.param_syms[name]
            return self.add(Node("param", index=j, name=p))
        if name == "x":
            self.raw_input = True
            return self.add(Node("input", index=-1))
        if name not in self.defs:
            known = sorted({*self.defs, *self.states, *self.param_syms} - {"_"})
            raise self.err(eq, f"unknown symbol {_show(name)!r} (known: {[_show(k) for k in known]})")
        if name in stack:
            cycle = " -> ".join(_show(s) for s in (*stack[stack.index(name):], name))
            raise self.err(self.defs[name][0], f"cycle: {cycle}")
        deq, j = self.defs[name]
        stack = (*stack, name)
        if deq is self.input_eq:
            node = self.add(Node("input", index=j))
        elif deq in self.proj_eqs:
            part = self.proj_eqs.index(deq)
            key = ("proj", part)
            if key not in self.memo:
                arg = self.expr(deq.value.args[0], deq, stack)
                if self.nodes[arg].width == 1:
                    raise self.err(deq, "shape mismatch: R(...) of a constant; expected an expression of H units")
                self.memo[key] = self.add(Node("proj", (arg,), index=part, value=len(deq.targets)))
            node = self.add(Node("block", (self.memo[key],), index=j))
        else:
            node = self.expr(deq.value, deq, stack)
        self.memo[("sym", name)] = node
        return node

    def expr(self, e: ast.expr, eq: _Eq, stack: tuple[str, ...]) -> int:
        if isinstance(e, ast.Constant) and isinstance(e.value, (int, float)) and not isinstance(e.value, bool):
            return self.add(Node("const", value=float(e.value), width=1))
        if isinstance(e, ast.Name):
            return self.resolve(e.id, eq, stack)
        if isinstance(e, ast.UnaryOp) and isinstance(e.op, (ast.USub, ast.UAdd)):
            a = self.expr(e.operand, eq, stack)
            if isinstance(e.op, ast.UAdd):
                return a
            return self.fold(Node("neg", (a,), width=self.nodes[a].width))
        if isinstance(e, ast.BinOp) and type(e.op) in _BINOPS:
            a, b = self.expr(e.left, eq, stack), self.expr(e.right, eq, stack)
            width = 1 if self.nodes[a].width == 1 and self.nodes[b].width == 1 else 0
            return self.fold(Node(_BINOPS[type(e.op)], (a, b), width=width))
        if isinstance(e, ast.Call) and isinstance(e.func, ast.Name):
            fn = e.func.id
            if fn in ("W", "R"):
                raise self.err(eq, f"{fn}(...) must be the whole right side of its equation "
                                   f"(`a, b = {fn}(...)`), not part of an expression")
            if fn not in OPERATIONS:
                raise self.err(eq, f"unknown operation {fn!r}; expected one of {sorted(OPERATIONS)}")
            if e.keywords:
                raise self.err(eq, f"{fn}: keyword arguments are not part of the language")
            n = OPERATIONS[fn]
            if fn == "layer_norm":
                return self.layer_norm_node(e, eq, stack)
            if len(e.args) != n:
                raise self.err(eq, f"{fn} takes {n} argument(s), got {len(e.args)}")
            args = tuple(self.expr(a, eq, stack) for a in e.args)
            width = 1 if all(self.nodes[a].width == 1 for a in args) else 0
            return self.fold(Node(fn, args, width=width))
        what = type(e).__name__
        if isinstance(e, ast.BinOp):
            what = type(e.op).__name__
        raise self.err(eq, f"unsupported syntax {what} in `{ast.unparse(e)}`; the language has + - * /, "
                           f"numbers, symbols and the operations {sorted(OPERATIONS)}")

    def layer_norm_node(self, e: ast.Call, eq: _Eq, stack: tuple[str, ...]) -> int:
        if len(e.args) not in (2, 3):
            raise self.err(eq, f"layer_norm takes (expression, gain[, bias]), got {len(e.args)} argument(s)")
        a = self.expr(e.args[0], eq, stack)
        if self.nodes[a].width == 1:
            raise self.err(eq, "shape mismatch: layer_norm of a constant; expected an expression of H units")
        pars = []
        for arg in e.args[1:]:
            if not (isinstance(arg, ast.Name) and arg.id in self.param_syms):
                raise self.err(eq, f"layer_norm: {ast.unparse(arg)!r} must be a per-unit parameter block "
                                   f"(declared in params: {sorted(self.param_syms)})")
            pars.append(self.resolve(arg.id, eq, stack))
        return self.add(Node("layer_norm", (a, *pars)))

    def fold(self, node: Node) -> int:
        """Add ``node``, computing it at once when all its arguments are constants."""
        if node.width == 1 and all(self.nodes[a].op == "const" for a in node.args):
            import torch

            from .compile import pointwise

            vals = [torch.tensor(self.nodes[a].value, dtype=torch.float64) for a in node.args]
            return self.add(Node("const", value=float(pointwise(node.op, vals)), width=1))
        return self.add(node)
