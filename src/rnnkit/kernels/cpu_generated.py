"""Fused CPU time loops generated from a cell's declaration (the loops of ``backend="cpu"``).

For a declaration and a dtype, :func:`source` writes the Python source of two numba functions, the
forward and the backward time loop of one layer/direction, in the skeleton of
:mod:`rnnkit.kernels.cpu` (one call runs every step of its part of the batch rows and hidden units;
per step one GEMM per recurrent projection into a buffer, then the pointwise equations fused into a
few unit-stride passes over each row).

How the equations become passes. Each step is split into *levels* by the recurrent projections: a
projection of an expression computed at level L is multiplied at level L + 1 (the LSTM has one level
after its GEMM; the Cho GRU and MUT cells, which project ``r * h``, have two). Within a level, every
row of the part runs the level's passes in equation order:

* forward: a value gets an array (and a pass of its own) when the backward reads it (the values
  :data:`rnnkit.cells.compile.DERIVATIVE_READS` names, kept for every step), when it is read more than
  once, at another level, by a layer norm or by a projection; every other value is written inline
  into the expression of its one reader. A layer norm is a row reduction between two passes.
* backward (reverse mode, the same templates as the ``bptt`` kernel's, :data:`~rnnkit.cells.compile.DERIVATIVES`):
  a value read once, at its own level, is differentiated inside its reader's pass (a scalar); every
  other value accumulates its gradient in an array and starts a pass of its own. Inputs, projection
  outputs, parameters and states are the sinks: ``d xg``, ``d(R h)`` (turned into dR by one matmul over
  all steps in :mod:`rnnkit.kernels.cpu`), per-part parameter accumulators, and the state gradients.

What is saved and what is recomputed: what the derivatives read, except (1) a new state, which the
backward reads from the states (kept per step before zoneout mixes it, ``PRE``, only under zoneout),
and (2) a value made by one cheap operation (no exp, log or tanh) from things the backward has anyway
(saved values, states, parameters, constants, a layer norm's ``u_hat``), which each backward loop that
reads it recomputes (the GRU's ``1 - z``); then the layer-norm statistics and each projection's input
when it is not a state (or recurrent dropout scales it). ``d xg`` is written over the saved values of
its step (:class:`Layout`). The source is written once to ``$RNNKIT_CACHE_DIR/generated`` (default
``~/.cache/rnnkit/generated``) under a hash of itself, so numba's on-disk cache (``cache=True``)
serves a second process without compiling again.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from ..cells.compile import DERIVATIVE_READS, DERIVATIVES, FORWARD, derivative_env, render
from ..cells.declare import Declaration
from .source_cache import load_source

_LEAVES = ("const", "state", "input", "param")
# recomputed in the backward only if cheap: a tanh recomputed in two backward loops cost more than the saved
# value's store and load (the LSTM's fwd+bwd measured ~10% slower)
_TRANSCENDENTAL = frozenset({"sigmoid", "tanh", "exp", "log", "softplus"})
STORES = 1  # arrays a backward loop stores to: LLVM vectorized none of the loops that stored to two or more

_PRELUDE = '''import math

import numpy as np
from numba import njit

from rnnkit.kernels.cpu_loops import _barrier, _ln_rows, _ln_rows_backward_db, _matmul, _matmul_cols, \\
    _tanh_f32, ln_vec, ln_vec_backward

F = np.{dtype}
_J = dict(fastmath=True, cache=True, nogil=True, error_model="numpy")
_I = dict(fastmath=True, cache=True, inline="always", error_model="numpy")
exp = math.exp
log = math.log
expm1 = math.expm1
log1p = math.log1p


@njit(**_I)
def tanh(x):
    return {tanh}


@njit(**_I)
def sigmoid(x):
    return {sigmoid}


@njit(**_I)
def relu(x):
    return x if x > F(0.0) else F(0.0)


@njit(**_I)
def softplus(x):
    return x if x > F(20.0) else log1p(exp(min(x, F(20.0))))


@njit(**_I)
def clip01(x):
    return min(max(x, F(0.0)), F(1.0))


@njit(**_I)
def maximum(a, b):
    return a if a >= b else b


@njit(**_I)
def minimum(a, b):
    return a if a <= b else b


@njit(**_I)
def tie(a, b):
    return F(1.0) if a > b else (F(0.5) if a == b else F(0.0))


@njit(**_I)
def positive(a):
    return F(1.0) if a > F(0.0) else F(0.0)


@njit(**_I)
def inside3(a):
    return F(1.0) if (a > F(-3.0)) and (a < F(3.0)) else F(0.0)


@njit(**_I)
def sign(a):
    return F(1.0) if a > F(0.0) else (F(-1.0) if a < F(0.0) else F(0.0))
'''
_ACTIVATIONS = {
    "float32": ("_tanh_f32(x)", "F(0.5) + F(0.5) * _tanh_f32(F(0.5) * x)"),
    "float64": ("math.tanh(x)", "F(1.0) / (F(1.0) + math.exp(-x))"),
}
_NUMBER = re.compile(r"(?<![\w.])(\d+\.\d*)")


def _render(template: str, env: dict[str, str]) -> str:
    """:func:`~rnnkit.cells.compile.render`, with the template's numbers typed as F(...)."""
    return render(_NUMBER.sub(r"F(\1)", template), env)


@dataclass
class Plan:
    """What the generator reads off a declaration: levels, readers, saved and materialised values."""

    d: Declaration
    level: list[int] = field(default_factory=list)
    readers: list[list[tuple[str, int]]] = field(default_factory=list)  # ("node"|"proj"|"update", index)
    saved: set[int] = field(default_factory=set)
    # values one cheap operation makes from what the backward has anyway: recomputed there, not saved
    recomputed: set[int] = field(default_factory=set)
    pre: set[int] = field(default_factory=set)  # states whose new value is kept per step under zoneout
    array: set[int] = field(default_factory=set)  # forward: values with an array of their own
    root: set[int] = field(default_factory=set)  # backward: values whose gradient is an array

    def __post_init__(self) -> None:
        nodes = self.d.nodes
        n = len(nodes)
        self.readers = [[] for _ in range(n)]
        for i, nd in enumerate(nodes):
            if nd.op in _LEAVES:
                lv = 0
            elif nd.op == "proj":
                lv = self.level[nd.args[0]] + 1
            else:
                lv = max((self.level[a] for a in nd.args), default=0)
            self.level.append(lv)
            if nd.op == "proj":
                self.readers[nd.args[0]].append(("proj", i))
            elif nd.op != "block":
                for a in nd.args:
                    self.readers[a].append(("node", i))
        for k, u in enumerate(self.d.updates):
            self.readers[u].append(("update", k))
        for i, nd in enumerate(nodes):
            for r in DERIVATIVE_READS.get(nd.op, ()):
                j = i if r == "out" else nd.args[r]
                if nodes[j].op not in _LEAVES:
                    self.saved.add(j)
        new_state = {u: k for k, u in enumerate(self.d.updates)}
        for i in sorted(self.saved):
            if i in new_state:  # read from the states (kept before zoneout under zoneout), not saved again
                self.pre.add(new_state[i])
                continue
            args = nodes[i].args
            if nodes[i].op in FORWARD and nodes[i].op not in _TRANSCENDENTAL and all(
                    nodes[a].op in ("state", "param", "const", "layer_norm") or a in new_state
                    or (a in self.saved and a not in self.recomputed) for a in args):
                self.recomputed.add(i)
                self.pre.update(new_state[a] for a in args if a in new_state)
        self.saved -= self.recomputed | set(new_state)
        for i, nd in enumerate(nodes):
            if nd.op in _LEAVES or nd.op in ("proj", "block"):
                continue
            rd = self.readers[i]
            cross = any(self._reader_level(r) != self.level[i] for r in rd)
            ln_read = any(kind == "node" and nodes[c].op == "layer_norm" for kind, c in rd)
            kept = any(kind == "update" and c in self.pre for kind, c in rd)  # written to PRE under zoneout
            if i in self.saved or nd.op == "layer_norm" or len(rd) != 1 or cross or ln_read or kept:
                self.array.add(i)
            if nd.op == "layer_norm" or len(rd) != 1 or cross or rd[0][0] != "node" or ln_read:
                self.root.add(i)
        self.paired = self._pairs()

    def _pairs(self) -> set[int]:
        """The projections whose gradient equals that of the input pre-activations, block for block: each
        of their blocks k is read only by one sum ``x_k + r_k`` that is the only reader of input block k
        (or both are unused), and the input has no other blocks. Their ``d(R h)`` is ``d xg`` itself (with
        a layer-normed projection: the gradient of its normalised output)."""
        d, nodes = self.d, self.d.nodes
        projs = [i for i, nd in enumerate(nodes) if nd.op == "proj"]
        if d.raw_input or len(projs) != 1 or int(nodes[projs[0]].value) != d.input_gates:
            return set()
        p = projs[0]
        inputs = {nd.index: i for i, nd in enumerate(nodes) if nd.op == "input"}
        blocks = {nd.index: i for i, nd in enumerate(nodes) if nd.op == "block" and nd.args[0] == p}
        for k in range(d.input_gates):
            x, r = inputs.get(k), blocks.get(k)
            if x is None and r is None:
                continue
            if x is None or r is None or len(self.readers[x]) != 1 or len(self.readers[r]) != 1:
                return set()
            (kx, cx), (_, cr) = self.readers[x][0], self.readers[r][0]
            if kx != "node" or cx != cr or nodes[cx].op != "add":
                return set()
        return {p}

    def _reader_level(self, r: tuple[str, int]) -> int:
        """The level at which a reader reads its value (a projection: where its input is built)."""
        kind, c = r
        if kind == "update":
            return self.level[self.d.updates[c]]
        return self.level[c] if kind == "node" else self.level[c] - 1

    @functools.cached_property
    def reads_input(self) -> bool:
        """Whether the backward reads the input pre-activations (a derivative reads an input block)."""
        nodes = self.d.nodes
        return any(nodes[nd.args[r]].op == "input" for nd in nodes for r in DERIVATIVE_READS.get(nd.op, ())
                   if r != "out")

    @functools.cached_property
    def levels(self) -> int:
        return max(self.level) + 1

    @property
    def gemm_levels(self) -> int:
        """GEMM levels of a step (the LSTM 1; the Cho GRU and MUT cells, which project ``r * h``, 2)."""
        return self.levels - 1

    def projections(self) -> tuple[int, ...]:
        """The proj nodes, in projection order."""
        return self._projections

    @functools.cached_property
    def _projections(self) -> tuple[int, ...]:
        ps = [i for i, nd in enumerate(self.d.nodes) if nd.op == "proj"]
        return tuple(sorted(ps, key=lambda i: self.d.nodes[i].index))

    @functools.cached_property
    def ln_nodes(self) -> list[int]:
        """The ``layer_norm(...)`` nodes."""
        return [i for i, nd in enumerate(self.d.nodes) if nd.op == "layer_norm"]

    @functools.cached_property
    def block_bounds(self) -> list[tuple[int, int]]:
        """Per projection (in order), its first and last-plus-one block among the recurrent blocks."""
        ends = np.cumsum([0, *(int(self.d.nodes[p].value) for p in self.projections())])
        return list(zip(ends[:-1].tolist(), ends[1:].tolist()))

    @functools.cached_property
    def dxg_gaps(self) -> bool:
        """Whether some input block has no gradient (``_`` blocks): ``d xg`` must start at zero."""
        d = self.d
        used = {nd.index if nd.index >= 0 else d.input_gates for nd in d.nodes if nd.op == "input"}
        return not set(range(d.input_gates + d.raw_input)) <= used

    def draw_gaps(self, p: int) -> bool:
        """Whether some block of projection ``p`` has no gradient: its ``d(R h)`` must start at zero."""
        used = {nd.index for nd in self.d.nodes if nd.op == "block" and nd.args[0] == p}
        return len(used) < int(self.d.nodes[p].value)

    def pin(self, p: int) -> bool:
        """Whether projection node ``p`` multiplies a computed value (kept per step for dR), not a state (a
        state input needs a buffer only when recurrent dropout scales it, decided at run time)."""
        return self.d.nodes[self.d.nodes[p].args[0]].op != "state"

    @functools.cached_property
    def units_splittable(self) -> bool:
        """Whether a call can split hidden units over threads: no layer norm (rows are reduced). The threads
        meet before each GEMM of a level above the first (its input has every unit) and at each step's end."""
        d = self.d
        return not d.layer_norm and "layer_norm" not in d.operations()


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, depth: int, text: str) -> None:
        self.lines.append("    " * depth + text)


def source(d: Declaration, dtype: str) -> str:
    """The numba source of ``forward`` and ``backward`` for declaration ``d`` in ``dtype`` ("float32"/"float64")."""
    pl = plan(d)
    tanh, sigm = _ACTIVATIONS[dtype]
    # numba's cache does not follow calls into other modules: the digest of the building blocks makes
    # the source (and so its cache file) new whenever they change
    head = f"# cpu_loops {_loops_digest()}\n" + _PRELUDE.format(dtype=dtype, tanh=tanh, sigmoid=sigm)
    lay = layout(d)
    return head + "\n\n" + _Forward(pl, lay).text() + "\n\n" + _Backward(pl, lay).text()


@functools.cache
def _loops_digest() -> str:
    return hashlib.sha256((Path(__file__).parent / "cpu_loops.py").read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Layout:
    """Where the forward keeps the saved values: ``slots[node]`` is its H-wide block of the (T, B, width*H)
    buffer ``SAVE``. With ``dxg_in_save``, the backward writes ``d xg`` over the first blocks (block k
    over the value in slot k, which no later pass of the same step reads), so the input gradient
    takes no memory of its own. A ``deferred`` block is computed into a scratch row first and copied
    over its slot at the end of the row's passes: its pass runs while the slot's value is still read.
    A block without a gradient (``_``) is zeroed there."""

    slots: dict[int, int]
    width: int
    dxg_in_save: bool
    deferred: frozenset[int] = frozenset()
    zeroed: frozenset[int] = frozenset()
    last_written: int = -1  # the d xg block whose pass comes last (the zeroed blocks go in its row)


@functools.cache
def layout(d: Declaration) -> Layout:
    """The :class:`Layout` of ``d``: the saved values in order, then, if the backward's passes allow it,
    reordered so that ``d xg`` block k can overwrite slot k (read off the order of the passes), with as
    many slots as input blocks at least."""
    pl = plan(d)
    saved = sorted(pl.saved)
    plain = {i: k for k, i in enumerate(saved)}
    n_x = d.input_gates + (1 if d.raw_input else 0)
    # in the order the backward's statements run for one element: the last line that reads each saved
    # value and the first that writes each d xg block (a line reads before it writes)
    last_read: dict[int, int] = {}
    first_write: dict[int, int] = {}
    lines = _Backward(pl, Layout(plain, len(saved), False)).text().splitlines()
    for n, line in enumerate(lines):
        for m in re.finditer(r"\bsv(\d+)\[j\]", line):
            last_read[int(m.group(1))] = n
        for m in re.finditer(r"\bdx(\d+)\[j\] \+?= ", line):
            first_write.setdefault(int(m.group(1)), n)
    if not first_write:
        return Layout(plain, len(saved), False)
    last = max(first_write.values())
    zeroed = set(range(n_x)) - set(first_write)

    def row_end(n: int) -> int:  # the last line of the row loop that holds line n
        return next((m for m in range(n + 1, len(lines)) if len(lines[m]) - len(lines[m].lstrip()) <= 8),
                    len(lines)) - 1

    # fewer saved values than input blocks: free slots (negative ids) make up the difference
    free = sorted(saved + [-1 - k for k in range(n_x - len(saved))], key=lambda i: last_read.get(i, -1))
    match: dict[int, int] = {}
    deferred = set()
    for k in sorted(first_write, key=first_write.get) + sorted(zeroed):  # greedy: ascending thresholds
        fit = None if k in zeroed else next((i for i in free if last_read.get(i, -1) <= first_write[k]), None)
        if fit is None:
            fit = next((i for i in free if last_read.get(i, -1) <= row_end(first_write.get(k, last))), None)
            if k not in zeroed:
                deferred.add(k)
        if fit is None:
            return Layout(plain, len(saved), False)
        free.remove(fit)
        match[fit] = k
    slots = {i: k for i, k in match.items() if i >= 0}
    for i in saved:
        if i not in slots:
            slots[i] = n_x + len([j for j in slots if slots[j] >= n_x])
    return Layout(slots, max(len(saved), n_x), True, frozenset(deferred), frozenset(zeroed),
                  max(first_write, key=first_write.get))


class _Gen:
    """What both loops share: argument names, row views, value expressions."""

    def __init__(self, plan: Plan, lay: Layout) -> None:
        self.plan = plan
        self.lay = lay
        self.slots = lay.slots
        self.d = plan.d
        self.nodes = plan.d.nodes
        self.S = len(plan.d.states)
        self.projs = plan.projections()
        self.P = len(self.projs)
        self.lns = plan.ln_nodes
        self.params = [p for p, _ in self.d.params]
        offs, off = {}, 0
        for p in self.projs:
            offs[p] = off
            off += int(self.nodes[p].value)
        self.offset = offs
        self.views: dict[str, str] = {}  # row view name -> its definition (per row)

    def common_args(self) -> list[str]:
        """The arrays both loops take, in order (the wrapper passes them in this order)."""
        P, S = self.P, self.S
        return (["xg"] + [f"BH{p}" for p in range(P)] + [f"PAR_{n}" for n in self.params]
                + ["lng", "hmask", "has_hmask"] + [f"K{k}" for k in range(S)] + ["has_keep"]
                + [f"ST{k}" for k in range(S)] + [f"PRE{k}" for k in sorted(self.plan.pre)] + ["SAVE"]
                + [f"PIN{q}" for q, p in enumerate(self.projs)] + ["UH", "RSH"]
                + [f"LU{i}" for i in self.lns] + [f"LR{i}" for i in self.lns])

    # -- views (a row of the part, indexed from 0 by j) -------------------------------------------------
    def view(self, name: str, definition: str) -> str:
        self.views[name] = definition
        return name

    def sv(self, i: int) -> str:
        """The row view of saved value ``i`` (its slot of ``SAVE``)."""
        s = self.slots[i]
        return self.view(f"sv{i}", f"SAVE[t, b][{s} * H + j0:{s} * H + j1]")

    def new_state(self, k: int, i: int) -> str:
        """The row view of state ``k``'s new value (node ``i``) before zoneout mixes it: ``ST[t + 1]`` itself
        without zoneout, else per step (``PRE``) when the backward reads it, or scratch."""
        mixed = f"PRE{k}[t, b][j0:j1]" if k in self.plan.pre else f"M{i}[bl]"
        return self.view(f"u{k}", f"{mixed} if has_keep else ST{k}[t + 1, b][j0:j1]")

    def value(self, i: int, inline) -> str:
        """Expression for node ``i`` at unit j (forward values; ``inline(i)`` gives computed nodes)."""
        nd = self.nodes[i]
        op = nd.op
        if op == "const":
            return f"F({float(nd.value)!r})"
        if op == "state":
            return self.view(f"s{nd.index}", f"ST{nd.index}[t, b][j0:j1]") + "[j]"
        if op == "input":
            k = self.d.input_gates if nd.index < 0 else nd.index
            return self.view(f"x{k}", f"xg[t, b][{k} * H + j0:{k} * H + j1]") + "[j]"
        if op == "param":
            return f"p_{nd.name}_{nd.index}[j]"
        if op == "block":
            p = nd.args[0]
            q = self.nodes[p].index
            r = self.view(f"r{q}_{nd.index}", f"RAW{q}[bl][{nd.index} * nj:{nd.index + 1} * nj]")
            return f"({r}[j] + bh{q}_{nd.index}[j])"
        return inline(i)

    def param_views(self, w: _Writer, grads: bool = False) -> None:
        for n, blocks in self.d.params:
            for k in range(len(blocks)):
                w(1, f"p_{n}_{k} = PAR_{n}[{k} * H + j0:{k} * H + j1]")
                if grads:
                    w(1, f"dp_{n}_{k} = dPAR_{n}[{k} * H + j0:{k} * H + j1]")
        for p in self.projs:
            q = self.nodes[p].index
            for k in range(int(self.nodes[p].value)):
                w(1, f"bh{q}_{k} = BH{q}[{k} * H + j0:{k} * H + j1]")

    def emit_row(self, w: _Writer, depth: int, body: list[str]) -> None:
        """The row views the body uses, then the body."""
        used = {v for v in self.views if re.search(rf"\b{v}\b", "\n".join(body))}
        for v in sorted(used):
            w(depth, f"{v} = {self.views[v]}")
        for line in body:
            w(depth, line)


class _Forward(_Gen):
    def array_of(self, i: int) -> str:
        """The row array holding computed node ``i``'s value."""
        if i in self.plan.saved:
            return self.sv(i)
        upd = [c for kind, c in self.plan.readers[i] if kind == "update"]
        if upd:  # a new state: straight into ST[t + 1] unless zoneout mixes it
            return self.new_state(upd[0], i)
        return self.view(f"m{i}", f"M{i}[bl]")

    def inline(self, i: int) -> str:
        if i in self.plan.array:
            return self.array_of(i) + "[j]"
        nd = self.nodes[i]
        env = {"a": self.value(nd.args[0], self.inline)}
        if len(nd.args) > 1:
            env["b"] = self.value(nd.args[1], self.inline)
        return _render(FORWARD[nd.op], env)

    def scratch(self) -> list[int]:
        """Computed nodes with an array that is not saved: per-part (rows, units) buffers."""
        kept = {self.d.updates[k] for k in self.plan.pre}
        return [i for i in sorted(self.plan.array) if i not in self.plan.saved and i not in kept]

    def text(self) -> str:
        plan, nodes, d = self.plan, self.nodes, self.d
        w = _Writer()
        w(0, "@njit(**_J)")
        args = self.common_args() + [f"W{q}" for q in range(self.P)] + ["b0", "b1", "j0", "j1", "sync"]
        w(0, f"def forward({', '.join(args)}):")
        w(1, "T = ST0.shape[0] - 1")
        w(1, "H = ST0.shape[2]")
        w(1, "nb = b1 - b0")
        w(1, "nj = j1 - j0")
        for i in self.scratch():
            w(1, f"M{i} = np.empty((nb, nj), xg.dtype)")
        for p in self.projs:
            q = nodes[p].index
            w(1, f"RAW{q} = np.empty((nb, {int(nodes[p].value)} * nj), xg.dtype)")
        w(1, "src = np.empty((nb, H), xg.dtype)")
        self.param_views(w)
        w(1, "for t in range(T):")
        for lv in range(plan.levels):
            # the GEMMs of this level's projections; a projection of a value computed this step reads every
            # unit of it: threads that split units meet first
            if any(plan.level[p] == lv and plan.pin(p) for p in self.projs):
                w(2, "if sync:")
                w(3, "_barrier()")
            for p in self.projs:
                if plan.level[p] != lv:
                    continue
                q, a = nodes[p].index, nodes[p].args[0]
                if plan.pin(p):
                    inp = f"PIN{q}[t, b0:b1]"
                else:
                    k = nodes[a].index
                    w(2, "if has_hmask:")
                    w(3, "for bl in range(nb):")
                    w(4, "hm = hmask[b0 + bl]")
                    w(4, f"sr = ST{k}[t, b0 + bl]")
                    w(4, f"dst = PIN{q}[t, b0 + bl] if j0 == 0 else src[bl]")
                    w(4, "for j in range(H):")
                    w(5, "dst[j] = sr[j] * hm[j]")
                    inp = f"(PIN{q}[t, b0:b1] if j0 == 0 else src) if has_hmask else ST{k}[t, b0:b1]"
                w(2, f"_matmul({inp}, W{q}, RAW{q})")
                if d.layer_norm:
                    n_b = int(nodes[p].value)
                    w(2, f"_ln_rows(RAW{q}, {n_b} * H, lng, {self.offset[p]} * H, UH[t, b0:b1], RSH[t, b0:b1], {q})")
            body = self.level_body(lv)
            if body:
                w(2, "for bl in range(nb):")
                w(3, "b = b0 + bl")
                self.emit_row(w, 3, body)
        w(2, "if sync:")
        w(3, "_barrier()")
        return "\n".join(w.lines) + "\n"

    def level_body(self, lv: int) -> list[str]:
        plan, nodes, d = self.plan, self.nodes, self.d
        body: list[str] = []
        for i, nd in enumerate(nodes):
            if plan.level[i] != lv or nd.op in _LEAVES or nd.op == "proj":
                continue
            if nd.op == "block":
                if i in plan.saved:
                    body += ["for j in range(nj):", f"    {self.array_of(i)}[j] = {self.value(i, self.inline)}"]
                continue
            if nd.op == "layer_norm":
                e = self.array_of(nd.args[0]) if nd.args[0] in plan.array else None
                gain = nodes[nd.args[1]]
                bias = nodes[nd.args[2]] if len(nd.args) == 3 else None
                g = f"PAR_{gain.name}[{gain.index} * H:{gain.index + 1} * H]"
                bb = f"PAR_{bias.name}[{bias.index} * H:{bias.index + 1} * H]" if bias else g
                body.append(f"LR{i}[t, b, 0] = ln_vec({e}, {g}, {bb}, {bias is not None}, LU{i}[t, b], "
                            f"{self.array_of(i)})")
                continue
            if i in plan.array:
                nd_env = {"a": self.value(nd.args[0], self.inline)}
                if len(nd.args) > 1:
                    nd_env["b"] = self.value(nd.args[1], self.inline)
                body += ["for j in range(nj):", f"    {self.array_of(i)}[j] = {_render(FORWARD[nd.op], nd_env)}"]
        # projection inputs computed at this level
        for p in self.projs:
            a = nodes[p].args[0]
            if plan.pin(p) and plan.level[a] == lv:
                q = nodes[p].index
                pin = self.view(f"pin{q}", f"PIN{q}[t, b][j0:j1]")
                hm = self.view("hm", "hmask[b][j0:j1]")
                body += ["if has_hmask:", "    for j in range(nj):",
                         f"        {pin}[j] = {self.value(a, self.inline)} * {hm}[j]",
                         "else:", "    for j in range(nj):", f"        {pin}[j] = {self.value(a, self.inline)}"]
        # new states
        for k, u in enumerate(d.updates):
            if plan.level[u] != lv:
                continue
            st = self.view(f"n{k}", f"ST{k}[t + 1, b][j0:j1]")
            kk = self.view(f"k{k}", f"K{k}[t, b][j0:j1]")
            s = self.view(f"s{k}", f"ST{k}[t, b][j0:j1]") + "[j]"
            new = self.value(u, self.inline) if u not in plan.array else self.array_of(u) + "[j]"
            body += ["if has_keep:", "    for j in range(nj):",
                     f"        {st}[j] = {kk}[j] * {s} + (F(1.0) - {kk}[j]) * ({new})"]
            if u not in plan.array or u in plan.saved:
                body += ["else:", "    for j in range(nj):", f"        {st}[j] = {new}"]
        return body


class _Backward(_Gen):
    def __init__(self, plan: Plan, lay: Layout) -> None:
        super().__init__(plan, lay)
        self.dxg = "SAVE" if lay.dxg_in_save else "DXG"  # the array d xg is written into
        self.written: set[str] = set()  # sinks written this step (the first write assigns)
        self.tmp = 0

    def saved_value(self, i: int) -> str:
        """Forward value of node ``i`` as the backward reads it."""
        nd = self.nodes[i]
        if nd.op in _LEAVES:
            return self.value(i, None)
        if i in self.plan.recomputed:  # in each loop that reads it (cheaper than a pass into a scratch row)
            return _render(FORWARD[nd.op], dict(zip("ab", map(self.saved_value, nd.args))))
        if i in self.plan.saved:
            return self.sv(i) + "[j]"
        upd = [c for kind, c in self.plan.readers[i] if kind == "update"]
        if upd:
            return self.new_state(upd[0], i) + "[j]"
        # a layer norm: u_hat * gain (+ bias)
        gain = self.value(nd.args[1], None)
        lu = self.view(f"lu{i}", f"LU{i}[t, b]")
        return f"({lu}[j] * {gain}" + (f" + {self.value(nd.args[2], None)})" if len(nd.args) == 3 else ")")

    def sink(self, a: int, expr: str, out: list[str]) -> None:
        """Add ``expr`` to the gradient of node ``a`` (not fused)."""
        nd = self.nodes[a]
        op = nd.op
        if op == "const":
            return
        if op == "param":
            out.append(f"dp_{nd.name}_{nd.index}[j] += {expr}")
            return
        if op == "input":
            k = self.d.input_gates if nd.index < 0 else nd.index
            name = self.view(f"df{k}", f"DF{k}") if k in self.lay.deferred else self.dx(k)
        elif op == "block":
            if nd.args[0] in self.plan.paired:
                return  # d(R h) is d xg: the input block's write is this one
            q = self.nodes[nd.args[0]].index
            k = nd.index
            if self.d.layer_norm:  # d of the normalised projection, for this step only (see text())
                name = self.view(f"dr{q}_{k}", f"DY{q}[bl][{k} * H:{k + 1} * H]")
            else:
                name = self.view(f"dr{q}_{k}", f"DRAW{q}[t, b][{k} * H + j0:{k} * H + j1]")
        elif op == "state":
            name = self.view(f"gp{nd.index}", f"GP{nd.index}[bl][j0:j1]")
            if name not in self.written:
                self.written.add(name)
                out.append(f"{name}[j] = {expr} + ({name}[j] if has_keep else F(0.0))")
                return
        else:
            name = self.view(f"ga{a}", f"GA{a}[bl]")
        if name in self.written:
            out.append(f"{name}[j] += {expr}")
        else:
            self.written.add(name)
            out.append(f"{name}[j] = {expr}")

    def paths(self, i: int, g: str, prefix: list[str]) -> list[list[str]]:
        """The paths that carry the gradient ``g`` of node ``i`` (after the lines ``prefix``) into its
        arguments: per sink or array reached, the lines that compute its contribution, the store last."""
        nd = self.nodes[i]
        if nd.op == "layer_norm":
            return []
        env = derivative_env(i, nd, g, self.saved_value)
        loops: list[list[str]] = []
        for pos, a in enumerate(nd.args):
            if self.nodes[a].op == "const":
                continue
            expr = _render(DERIVATIVES[nd.op][pos], env)
            if self.fused(a):
                self.tmp += 1
                name = f"d{self.tmp}"
                loops += self.paths(a, name, [*prefix, f"{name} = {expr}"])
            else:
                out: list[str] = []
                self.sink(a, expr, out)
                loops += [[*prefix, line] for line in out]
        return loops

    def fused(self, a: int) -> bool:
        nd = self.nodes[a]
        return nd.op not in _LEAVES and nd.op not in ("block", "proj") and a not in self.plan.root

    def root_pass(self, i: int) -> list[str]:
        """The pass that starts at root node ``i``: its gradient (array, plus a new state's), then its arguments."""
        nd = self.nodes[i]
        terms = []
        if any(kind in ("node", "proj") for kind, _ in self.plan.readers[i]):
            terms.append(self.view(f"ga{i}", f"GA{i}[bl]") + "[j]")
        for kind, k in self.plan.readers[i]:
            if kind == "update":
                terms.append(self.view(f"gs{k}", f"GS{k}[bl][j0:j1]") + "[j]")
        if nd.op == "layer_norm":
            e = nd.args[0]
            gain = self.nodes[nd.args[1]]
            bias = self.nodes[nd.args[2]] if len(nd.args) == 3 else None
            has_array = any(kind in ("node", "proj") for kind, _ in self.plan.readers[i])
            lines = [f"gln = GA{i}[bl]"]
            for kind, k in self.plan.readers[i]:
                if kind == "update":
                    op = "+=" if has_array else "="
                    lines += ["for j in range(nj):", f"    gln[j] {op} GS{k}[bl][j]"]
                    has_array = True
            first = f"ga{e}" not in self.written
            self.written.add(f"ga{e}")
            dg = f"dPAR_{gain.name}[{gain.index} * H:{gain.index + 1} * H]"
            db = f"dPAR_{bias.name}[{bias.index} * H:{bias.index + 1} * H]" if bias else dg
            lines.append(f"ln_vec_backward(gln, LU{i}[t, b], LR{i}[t, b, 0], "
                         f"PAR_{gain.name}[{gain.index} * H:{gain.index + 1} * H], GA{e}[bl], {first}, {dg}, "
                         f"{db}, {bias is not None})")
            return lines
        lines: list[str] = []
        # the paths into d xg last: the saved values they read are then dead when d xg overwrites them
        paths = self.paths(i, f"g{i}", [f"g{i} = {' + '.join(terms)}"])
        paths.sort(key=lambda lp: lp[-1].startswith("dx"))  # stable: each array's writes keep their order
        # at most STORES stores per loop (LLVM vectorizes loops that store to few arrays, not one that stored
        # to seven), each loop computing the scalars its stores need
        loops = []
        for k in range(0, len(paths), STORES):
            loop: list[str] = []
            for path in paths[k:k + STORES]:
                loop += [ln for ln in path[:-1] if ln not in loop] + [path[-1]]
            loops.append(loop)
        for loop in loops:
            lines += ["for j in range(nj):"] + ["    " + line for line in loop]
        return lines

    def dx(self, k: int) -> str:
        return self.view(f"dx{k}", f"{self.dxg}[t, b][{k} * H + j0:{k} * H + j1]")

    def level_body(self, lv: int) -> list[str]:
        body: list[str] = []
        for i in range(len(self.nodes) - 1, -1, -1):
            if self.plan.level[i] == lv and i in self.plan.root:
                body += self.root_pass(i)
        text = "\n".join(body)
        for k in sorted(self.lay.deferred):
            if re.search(rf"\bdf{k}\b", text):
                body += ["for j in range(nj):", f"    {self.dx(k)}[j] = df{k}[j]"]
        if self.lay.zeroed and re.search(rf"\bd[xf]{self.lay.last_written}\[j\]", text):
            for k in sorted(self.lay.zeroed):
                body += ["for j in range(nj):", f"    {self.dx(k)}[j] = F(0.0)"]
        return body

    def roots_with_array(self) -> list[int]:
        return sorted(i for i in self.plan.root if any(kind in ("node", "proj") for kind, _ in self.plan.readers[i])
                      or self.nodes[i].op == "layer_norm")

    def text(self) -> str:
        plan, nodes, d, S = self.plan, self.nodes, self.d, self.S
        w = _Writer()
        w(0, "@njit(**_J)")
        args = (self.common_args() + ["has_dout", "dout"] + [f"dS{k}" for k in range(S)] + [f"O{k}" for k in range(S)]
                + ["DXG"] + [f"DRAW{q}" for q in range(self.P)] + [f"dPAR_{n}" for n in self.params]
                + ["dlng", "dbhh"] + [f"W{q}" for q in range(self.P)] + ["b0", "b1", "j0", "j1", "sync"])
        w(0, f"def backward({', '.join(args)}):")
        w(1, "T = ST0.shape[0] - 1")
        w(1, "H = ST0.shape[2]")
        w(1, "nb = b1 - b0")
        w(1, "nj = j1 - j0")
        for k in range(S):
            w(1, f"GS{k} = dS{k}[b0:b1].copy()")
            w(1, f"GP{k} = np.empty((nb, H), xg.dtype)")
        for i in self.roots_with_array():
            w(1, f"GA{i} = np.empty((nb, {'H' if nodes[i].op == 'layer_norm' else 'nj'}), xg.dtype)")
        w(1, "tmp = np.empty((nb, nj), ST0.dtype)")
        for k in sorted(self.lay.deferred):
            w(1, f"DF{k} = np.empty(nj, ST0.dtype)")
        if d.layer_norm:
            for p in self.projs:
                if p not in plan.paired:
                    w(1, f"DY{nodes[p].index} = np.zeros((nb, {int(nodes[p].value)} * H), ST0.dtype)")
        self.param_views(w, grads=True)
        w(1, "for t in range(T - 1, -1, -1):")
        # incoming: the output gradient, then zoneout's carry to the previous state
        pre = ["if has_dout:", "    do = dout[t, b][j0:j1]", "    g0 = GS0[bl][j0:j1]", "    for j in range(nj):",
               "        g0[j] += do[j]", "if has_keep:"]
        for k in range(S):
            pre += [f"    gk = GS{k}[bl][j0:j1]", f"    pk = GP{k}[bl][j0:j1]", f"    kk = K{k}[t, b][j0:j1]",
                    "    for j in range(nj):", "        pk[j] = kk[j] * gk[j]", "        gk[j] -= pk[j]"]
        w(2, "for bl in range(nb):")
        w(3, "b = b0 + bl")
        for line in pre:
            w(3, line)
        self.written = set()
        for lv in range(plan.levels - 1, -1, -1):
            body = self.level_body(lv)
            if body:
                w(2, "for bl in range(nb):")
                w(3, "b = b0 + bl")
                self.emit_row(w, 3, body)
            for p in reversed(self.projs):
                if plan.level[p] != lv:
                    continue
                q, a = nodes[p].index, nodes[p].args[0]
                n_b = int(nodes[p].value)
                if d.layer_norm:  # d(raw projection) written over its u_hat, which only this step reads
                    off = self.offset[p]
                    dy = f"{self.dxg}[t, b0:b1]" if p in plan.paired else f"DY{q}"
                    w(2, f"_ln_rows_backward_db({dy}, {n_b} * H, lng, {off} * H, UH[t, b0:b1], RSH[t, b0:b1], {q}, "
                         f"UH[t, b0:b1, {off} * H:{off + n_b} * H], dlng, dbhh)")
                w(2, "if sync:")
                w(3, "_barrier()")
                if d.layer_norm:
                    w(2, f"_matmul_cols(UH[t, b0:b1], {self.offset[p]} * H, {n_b} * H, W{q}, tmp)")
                elif self.dxg == "SAVE" and p in plan.paired:  # d(R h) = d xg, over the first blocks of SAVE
                    w(2, f"_matmul_cols(SAVE[t, b0:b1], 0, {n_b} * H, W{q}, tmp)")
                else:
                    w(2, f"_matmul(DRAW{q}[t, b0:b1], W{q}, tmp)")
                an = nodes[a]
                if an.op == "state":
                    tgt, key = f"GP{an.index}", f"gp{an.index}"
                else:
                    tgt, key = f"GA{a}", f"ga{a}"
                first = key not in self.written
                self.written.add(key)
                w(2, "for bl in range(nb):")
                # GA rows hold the part's own units from 0 (a layer norm's, and GP's, every unit)
                own = an.op != "state" and an.op != "layer_norm"
                w(3, f"tg = {tgt}[bl]" if own else f"tg = {tgt}[bl][j0:j1]")
                w(3, "tm = tmp[bl]")
                w(3, "hm = hmask[b0 + bl][j0:j1]")
                w(3, "for j in range(nj):")
                w(4, "v = tm[j] * hm[j] if has_hmask else tm[j]")
                if first and an.op == "state":
                    w(4, "tg[j] = v + (tg[j] if has_keep else F(0.0))")
                elif first:
                    w(4, "tg[j] = v")
                else:
                    w(4, "tg[j] += v")
        # states no equation reads: only zoneout's carry reaches the previous step
        for k in range(S):
            if f"gp{k}" not in self.written:
                w(2, "if not has_keep:")
                w(3, f"GP{k}[:] = 0.0")
        for k in range(S):
            w(2, f"GS{k}, GP{k} = GP{k}, GS{k}")
        for k in range(S):
            w(1, f"O{k}[b0:b1, j0:j1] = GS{k}[:, j0:j1]")
        return "\n".join(w.lines) + "\n"


@functools.cache
def plan(d: Declaration) -> Plan:
    """The (cached) :class:`Plan` of ``d``."""
    return Plan(d)


@functools.cache
def module(d: Declaration, dtype: str) -> ModuleType:
    """The generated module of ``d`` in ``dtype``: its source written once under a hash of it, then imported."""
    return load_source(source(d, dtype), "cpu", f"the declaration {d.name!r} ({dtype})")
