"""Per-step Triton kernels generated from a cell's declaration (the kernels of ``backend="triton"``).

For a declaration, :func:`source` writes the Triton source of two kernels per *level* (levels as in
:class:`rnnkit.kernels.cpu_generated.Plan`: a recurrent projection of a value computed at level L is
multiplied at level L + 1). One time step of the forward is, per level in increasing order: the
projections of that level (cuBLAS, by :mod:`rnnkit.kernels.triton_backend`), then ``fwd{L}``. The
backward of a step runs the levels in decreasing order: ``bwd{L}``, then the matmuls ``D_p R_p`` of the
projections of level L. Every kernel works on a (BLOCK_B, BLOCK_H) tile of batch rows and hidden
units; cells with a layer norm (of a projection or of a value) take whole rows in one tile.

The pointwise math is rendered from the same templates as the ``bptt`` and ``cpu`` backends
(:data:`~rnnkit.cells.compile.FORWARD`, :data:`~rnnkit.cells.compile.DERIVATIVES`) with a Triton
prelude of the helper functions they name; the backward is reverse mode over the pointwise graph.

What is saved and what is recomputed: the forward keeps, per step, the states (``ST``), the raw output
of every recurrent projection (``HG``) and its input (``PIN``, which the weight gradient needs
anyway); nothing else. A backward kernel recomputes, from those and ``xg``, every value its
derivatives read (a layer norm's statistics included); each forward kernel likewise recomputes the
values of lower levels it reads instead of storing them. Gradients that cross kernels travel in
(B, H) buffers: ``GA{i}`` for a value read at a higher level, ``D{q}`` for a projection's output
(the input of ``dR`` and of ``D R``), ``GS``/``GP`` for the states after / before the step, and
per-row accumulators for the per-unit parameters (summed over rows at the end).

Math runs in float32 (float64 for float64 storage); storage follows the input dtype (bf16 too).
The source is written once to ``$RNNKIT_CACHE_DIR/generated`` under a hash of itself and imported
from there, so Triton's own on-disk cache serves a second process.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from ..cells.compile import DERIVATIVES, FORWARD, derivative_env, render
from ..cells.declare import Declaration
from .cpu_generated import Plan, plan
from .source_cache import load_source

_LEAVES = ("const", "state", "input", "param")

_PRELUDE = '''import os

import triton
import triton.language as tl

if hasattr(triton, "knobs"):  # Triton >= 3.4
    INTERPRETED = bool(triton.knobs.runtime.interpret)
else:
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
EPS: tl.constexpr = tl.constexpr({eps!r})


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # 2 sigmoid(2x) - 1: exact in the limits, no inf/inf for large |x|
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def exp(x):
    return tl.exp(x)


@triton.jit
def log(x):
    return tl.log(x)


@triton.jit
def expm1(x):
    u = tl.exp(x)
    return tl.where(tl.abs(x) < 1e-4, x + 0.5 * x * x, u - 1.0)


@triton.jit
def log1p(x):
    return tl.where(tl.abs(x) < 1e-4, x - 0.5 * x * x, tl.log(1.0 + x))


@triton.jit
def relu(x):
    return tl.where(x > 0.0, x, 0.0)


@triton.jit
def softplus(x):
    return tl.where(x > 20.0, x, log1p(tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def clip01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def maximum(a, b):
    return tl.where(a >= b, a, b)


@triton.jit
def minimum(a, b):
    return tl.where(a <= b, a, b)


@triton.jit
def tie(a, b):
    return tl.where(a > b, 1.0, tl.where(a == b, 0.5, 0.0))


@triton.jit
def positive(a):
    return tl.where(a > 0.0, 1.0, 0.0)


@triton.jit
def inside3(a):
    return tl.where((a > -3.0) & (a < 3.0), 1.0, 0.0)


@triton.jit
def sign(a):
    return tl.where(a > 0.0, 1.0, tl.where(a < 0.0, -1.0, 0.0))


@triton.jit
def abs(a):
    return tl.abs(a)


@triton.jit
def ld(ptr, rows, cols, k, W, H, m, CT: tl.constexpr):
    """Block ``k`` of a (B, W*H) row-major tensor as a (BLOCK_B, BLOCK_H) tile of CT (0 outside ``m``)."""
    return tl.load(ptr + rows[:, None] * (W * H) + k * H + cols[None, :], mask=m, other=0.0).to(CT)


@triton.jit
def st(ptr, val, rows, cols, k, W, H, m):
    tl.store(ptr + rows[:, None] * (W * H) + k * H + cols[None, :], val.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def add(ptr, val, rows, cols, k, W, H, m):
    """``ptr[rows, k*H + cols] += val`` (each element is owned by one program)."""
    p = ptr + rows[:, None] * (W * H) + k * H + cols[None, :]
    tl.store(p, (tl.load(p, mask=m, other=0.0) + val).to(ptr.dtype.element_ty), mask=m)


@triton.jit
def vec(ptr, cols, k, H, CT: tl.constexpr):
    """Block ``k`` of a parameter vector as a (1, BLOCK_H) row of CT."""
    return tl.load(ptr + k * H + cols, mask=cols < H, other=0.0).to(CT)[None, :]


@triton.jit
def mm(a, b, IEEE: tl.constexpr):
    """``a @ b`` on the tensor cores, float32 accumulation; IEEE: full float32 precision (no TF32)."""
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def rowsum(x, m):
    return tl.sum(tl.where(m, x, 0.0), 1)
'''


@dataclass(frozen=True)
class Schedule:
    """The order of one step's work and who writes each cross-kernel buffer first.

    Events of the backward of a step, in order: for L = levels-1 .. 0, kernel ``("k", L)`` then the
    matmuls ``("g", p)`` of the projections of level L (last projection first). ``ga_first[i]`` is the
    first event that writes ``GA{i}`` (it assigns; later ones add); ``dx_first[k]`` the kernel level that
    assigns block k of ``d xg`` (absent: none, or ``dxg_zero``: every writer adds to a zeroed buffer).

    A computed value is differentiated in the backward kernel of the lowest level that reads it (``blevel``),
    which may be above the level where it can first be computed: the Cho GRU's update gate, computed
    beside the reset gate but read only after the second projection, then needs no buffer of its own.
    """

    levels: int
    blevel: tuple[int, ...]  # per node, the level whose backward kernel differentiates it
    fwd_levels: tuple[int, ...]  # levels whose forward kernel stores something
    ga: tuple[int, ...]  # nodes with a GA buffer
    ga_first: dict[int, tuple]
    dx_first: dict[int, int]
    dxg_zero: bool


def _event_key(ev: tuple, pl: Plan) -> tuple:
    if ev[0] == "k":
        return (-ev[1], 0, 0)
    return (-pl.level[ev[1]], 1, -pl.d.nodes[ev[1]].index)


@functools.cache
def schedule(d: Declaration) -> Schedule:
    pl = plan(d)
    nodes = d.nodes
    top = pl.levels - 1
    blevel = list(pl.level)
    for i in range(len(nodes) - 1, -1, -1):
        if nodes[i].op not in (*_LEAVES, "proj", "block"):
            blevel[i] = min(blevel[c] if kind == "node" else pl.level[c] - 1 if kind == "proj" else top
                            for kind, c in pl.readers[i])
    contrib: dict[int, list[tuple]] = {}  # non-leaf node -> events that add to its GA buffer
    dx: dict[int, set[int]] = {}
    dxg_zero = pl.dxg_gaps
    for a, nd in enumerate(nodes):
        evs: list[tuple] = []
        for kind, c in pl.readers[a]:
            if kind == "node":
                evs.append(("k", blevel[c]))
            elif kind == "proj":
                evs.append(("g", c))
            else:
                evs.append(("k", top))
        if nd.op == "input":
            k = d.input_gates if nd.index < 0 else nd.index
            dx.setdefault(k, set()).update(e[1] for e in evs if e[0] == "k")
            dxg_zero = dxg_zero or any(e[0] == "g" for e in evs)
        elif nd.op not in _LEAVES and nd.op != "proj":
            later = [e for e in evs if e[0] == "g" or e[1] > blevel[a]]
            if later:
                contrib[a] = later
    ga = tuple(sorted(contrib))
    ga_first = {a: min(contrib[a], key=lambda e: _event_key(e, pl)) for a in ga}
    dx_first = {} if dxg_zero else {k: max(ls) for k, ls in dx.items() if ls}
    fwd = []
    for lv in range(pl.levels):
        ups = any(pl.level[u] == lv for u in d.updates)
        pins = any(nodes[nodes[p].args[0]].op != "state" and pl.level[nodes[p].args[0]] == lv
                   for p in pl.projections())
        if ups or pins:
            fwd.append(lv)
    return Schedule(pl.levels, tuple(blevel), tuple(fwd), ga, ga_first, dx_first, dxg_zero)


class _Kernel:
    """The body of one generated kernel: value expressions (recomputed from leaves), lines, sinks."""

    def __init__(self, gen: _Gen, level: int) -> None:
        self.g = gen
        self.level = level
        self.lines: list[str] = []
        self.memo: dict[object, str] = {}

    def emit(self, line: str) -> None:
        self.lines.append(line)

    def val(self, i: int) -> str:
        """The tile expression (a variable unless a constant) of node ``i``'s forward value."""
        if i in self.memo:
            return self.memo[i]
        g = self.g
        nd = g.nodes[i]
        op = nd.op
        if op == "const":
            return f"({float(nd.value)!r})"
        v = f"v{i}"
        if op == "state":
            self.emit(f"{v} = ld(ST{nd.index}, rows, cols, 0, 1, H, m, CT)")
        elif op == "input":
            k = g.d.input_gates if nd.index < 0 else nd.index
            self.emit(f"{v} = ld(XG, rows, cols, {k}, {g.xw}, H, m, CT)")
        elif op == "param":
            self.emit(f"{v} = vec(PAR_{nd.name}, cols, {nd.index}, H, CT)")
        elif op == "block":
            p = nd.args[0]
            q, n_b = g.nodes[p].index, int(g.nodes[p].value)
            if not g.d.layer_norm:
                self.emit(f"{v} = ld(HG{q}, rows, cols, {nd.index}, {n_b}, H, m, CT)")
            else:
                self.proj_stats(p)
                off = g.offset[p] + nd.index
                self.emit(f"{v} = uh{q}_{nd.index} * vec(LNG, cols, {off}, H, CT) + vec(BHH, cols, {off}, H, CT)")
        elif op == "layer_norm":
            e = self.val(nd.args[0])
            self.emit(f"mu{i} = rowsum({e}, m) / H")
            self.emit(f"dv{i} = tl.where(m, {e} - mu{i}[:, None], 0.0)")
            self.emit(f"rs{i} = 1.0 / tl.sqrt(tl.sum(dv{i} * dv{i}, 1) / H + EPS)")
            self.emit(f"uh{i} = dv{i} * rs{i}[:, None]")
            y = f"uh{i} * {self.val(nd.args[1])}"
            if len(nd.args) == 3:
                y += f" + {self.val(nd.args[2])}"
            self.emit(f"{v} = {y}")
        else:
            env = {"a": self.val(nd.args[0])}
            if len(nd.args) > 1:
                env["b"] = self.val(nd.args[1])
            self.emit(f"{v} = {render(FORWARD[op], env)}")
        self.memo[i] = v
        return v

    def proj_stats(self, p: int) -> None:
        """Layer-norm statistics of projection ``p`` over all its blocks, and each block normalised."""
        if ("stats", p) in self.memo:
            return
        self.memo[("stats", p)] = ""
        g = self.g
        q, n_b = g.nodes[p].index, int(g.nodes[p].value)
        for j in range(n_b):
            self.emit(f"raw{q}_{j} = ld(HG{q}, rows, cols, {j}, {n_b}, H, m, CT)")
        self.emit(f"mu{q} = ({' + '.join(f'rowsum(raw{q}_{j}, m)' for j in range(n_b))}) / ({n_b} * H)")
        for j in range(n_b):
            self.emit(f"c{q}_{j} = tl.where(m, raw{q}_{j} - mu{q}[:, None], 0.0)")
        var = " + ".join(f"tl.sum(c{q}_{j} * c{q}_{j}, 1)" for j in range(n_b))
        self.emit(f"rs{q} = 1.0 / tl.sqrt(({var}) / ({n_b} * H) + EPS)")
        for j in range(n_b):
            self.emit(f"uh{q}_{j} = c{q}_{j} * rs{q}[:, None]")


class _Gen:
    def __init__(self, d: Declaration) -> None:
        self.d = d
        self.pl = plan(d)
        self.sch = schedule(d)
        self.nodes = d.nodes
        self.S = len(d.states)
        self.projs = self.pl.projections()
        self.xw = d.input_gates + (1 if d.raw_input else 0)
        self.params = [(n, len(b)) for n, b in d.params]
        offs, off = {}, 0
        for p in self.projs:
            offs[p] = off
            off += int(self.nodes[p].value)
        self.offset = offs
        self.GH = off  # recurrent blocks

    def arg_names(self) -> list[str]:
        """Every kernel's positional pointer and integer arguments, in order (the host passes these)."""
        S, qs = range(self.S), [self.nodes[p].index for p in self.projs]
        return (["XG"] + [f"ST{k}" for k in S] + [f"STN{k}" for k in S] + [f"HG{q}" for q in qs]
                + [f"PIN{q}" for q in qs] + [f"PINN{q}" for q in qs] + [f"PAR_{n}" for n, _ in self.params]
                + ["LNG", "BHH", "HM"] + [f"KEEP{k}" for k in S] + ["OM", "Y"] + [f"GS{k}" for k in S]
                + [f"GP{k}" for k in S] + ["DOUT"] + [f"D{q}" for q in qs] + [f"GA{i}" for i in self.sch.ga]
                + ["DXG"] + [f"DPAR_{n}" for n, _ in self.params] + ["DLNG", "DBHH", "B", "H"]
                + [f"KB{k}" for k in S] + [f"KH{k}" for k in S])

    def persistent_arg_names(self) -> list[str]:
        """The persistent kernels' arguments: whole (T, ...) buffers where the per-step kernels take one step."""
        S, qs = range(self.S), [self.nodes[p].index for p in self.projs]
        return (["XG_"] + [f"ST{k}_" for k in S] + [f"HG{q}_" for q in qs] + [f"PIN{q}_" for q in qs]
                + [f"R{q}" for q in qs] + [f"BR{q}" for q in qs] + [f"PAR_{n}" for n, _ in self.params]
                + ["LNG", "BHH", "HM"] + [f"KEEP{k}_" for k in S] + ["OM_", "Y_"] + [f"G{k}_" for k in S]
                + ["DOUT_"] + [f"D{q}_" for q in qs] + [f"GA{i}" for i in self.sch.ga] + ["DXG_"]
                + [f"DPAR_{n}" for n, _ in self.params] + ["DLNG", "DBHH", "T", "B", "H"]
                + [f"KB{k}" for k in S] + [f"KH{k}" for k in S] + [f"KT{k}" for k in S])

    def used_args(self, body: list[str]) -> list[str]:
        """The per-step arguments (:meth:`arg_names`, in that order) that ``body`` names, and B, H."""
        text = "\n".join(body)
        return [a for a in self.arg_names() if a in ("B", "H") or re.search(rf"\b{a}\b", text)]

    def kernel(self, name: str, args: list[str], body: list[str], extra: str = "") -> str:
        head = ["@triton.jit",
                f"def {name}({', '.join(args)}, HAS_KEEP: tl.constexpr, HAS_OMASK: tl.constexpr,",
                "        HAS_HMASK: tl.constexpr, HAS_DOUT: tl.constexpr, CT: tl.constexpr, BLOCK_B: tl.constexpr,",
                f"        BLOCK_H: tl.constexpr{extra}):",
                "    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)",
                "    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)",
                "    m = (rows < B)[:, None] & (cols < H)[None, :]"]
        return "\n".join(head + ["    " + ln for ln in body]) + "\n"

    # ---- persistent: the same bodies inside one loop over time, the projections by tl.dot --------------
    def step_views(self, t: str) -> list[str]:
        """Per-step pointers (the per-step kernels' arguments) into the whole buffers, at step ``t``."""
        lines = [f"XG = XG_ + {t} * (B * {self.xw} * H)", "Y = Y_ + " + t + " * (B * H)", f"OM = OM_ + {t} * B",
                 "DOUT = DOUT_ + " + t + " * (B * H)", f"DXG = DXG_ + {t} * (B * {self.xw} * H)"]
        for k in range(self.S):
            lines += [f"ST{k} = ST{k}_ + {t} * (B * H)", f"STN{k} = ST{k}_ + ({t} + 1) * (B * H)",
                      f"KEEP{k} = KEEP{k}_ + {t} * KT{k}"]
        for p in self.projs:
            q, n_b = self.nodes[p].index, int(self.nodes[p].value)
            lines += [f"HG{q} = HG{q}_ + {t} * (B * {n_b} * H)", f"PIN{q} = PIN{q}_ + {t} * (B * H)",
                      f"PINN{q} = PIN{q}_ + ({t} + 1) * (B * H)", f"D{q} = D{q}_ + {t} * (B * {n_b} * H)"]
        return lines

    def weights(self, transposed: bool) -> list[str]:
        """The recurrent weights, loaded once: per projection and block, an H x H tile (transposed: R^T)."""
        lines = ["rk = tl.arange(0, BLOCK_H)", "rm = (rk < H)[:, None] & (cols < H)[None, :]"]
        for p in self.projs:
            q = self.nodes[p].index
            for j in range(int(self.nodes[p].value)):
                if transposed:  # RT[k, n] = R[j*H + n, k]
                    lines.append(f"RT{q}_{j} = tl.load(R{q} + ({j} * H + cols[None, :]) * H + rk[:, None], mask=rm, "
                                 "other=0.0)")
                else:  # RN[n, k] = R[j*H + n, k]
                    lines.append(f"RN{q}_{j} = tl.load(R{q} + ({j} * H + rk[:, None]) * H + cols[None, :], mask=rm, "
                                 "other=0.0)")
        return lines

    def persistent_forward(self, bodies: dict[int, list[str]]) -> str:
        nodes = self.nodes
        loop = self.step_views("t")
        for lv in range(self.pl.levels):
            for p in self.projs:
                if self.pl.level[p] != lv:
                    continue
                q, n_b = nodes[p].index, int(nodes[p].value)
                loop += ["tl.debug_barrier()",
                         f"pin = tl.load(PIN{q} + rows[:, None] * H + cols[None, :], mask=m, other=0.0)"]
                for j in range(n_b):
                    bias = "" if self.d.layer_norm else f" + vec(BR{q}, cols, {j}, H, CT)"
                    loop.append(f"st(HG{q}, mm(pin, RT{q}_{j}, IEEE){bias}, rows, cols, {j}, {n_b}, H, m)")
            loop += ["tl.debug_barrier()", *bodies.get(lv, [])]
        body = self.weights(True) + ["for t in range(T):"] + ["    " + ln for ln in loop]
        return self.kernel("persistent_fwd", self.persistent_arg_names(), body, ", IEEE: tl.constexpr")

    def persistent_backward(self, bodies: dict[int, list[str]]) -> str:
        nodes, d, sch = self.nodes, self.d, self.sch
        loop = ["t = T - 1 - s", *self.step_views("t")]
        for k in range(self.S):  # the running state gradients: two slots, swapped every step
            loop += [f"GS{k} = G{k}_ + (s % 2) * (B * H)", f"GP{k} = G{k}_ + ((s + 1) % 2) * (B * H)"]
        for lv in range(self.pl.levels - 1, -1, -1):
            loop += ["tl.debug_barrier()", *bodies.get(lv, [])]
            for p in reversed(self.projs):
                if self.pl.level[p] != lv:
                    continue
                q, n_b = nodes[p].index, int(nodes[p].value)
                terms = " + ".join(f"mm(tl.load(D{q} + rows[:, None] * ({n_b} * H) + {j} * H + cols[None, :], "
                                   f"mask=m, other=0.0), RN{q}_{j}, IEEE)" for j in range(n_b))
                loop += ["tl.debug_barrier()", f"gin = ({terms}).to(CT)", "if HAS_HMASK:",
                         "    gin = gin * ld(HM, rows, cols, 0, 1, H, m, CT)"]
                a = nodes[p].args[0]
                src = nodes[a]
                if src.op == "state":
                    loop.append(f"add(GP{src.index}, gin, rows, cols, 0, 1, H, m)")
                elif src.op == "input":
                    k = d.input_gates if src.index < 0 else src.index
                    loop.append(f"add(DXG, gin, rows, cols, {k}, {self.xw}, H, m)")
                elif src.op == "param":
                    loop.append(f"add(DPAR_{src.name}, gin, rows, cols, {src.index}, {len(dict(d.params)[src.name])}, "
                                "H, m)")
                else:
                    fn = "st" if sch.ga_first[a] == ("g", p) else "add"
                    loop.append(f"{fn}(GA{a}, gin, rows, cols, 0, 1, H, m)")
        loop.append("tl.debug_barrier()")
        body = self.weights(False) + ["for s in range(T):"] + ["    " + ln for ln in loop]
        return self.kernel("persistent_bwd", self.persistent_arg_names(), body, ", IEEE: tl.constexpr")

    def hmasked(self, v: str) -> list[str]:
        return ["hm = ld(HM, rows, cols, 0, 1, H, m, CT)", "pv = " + v, "if HAS_HMASK:", "    pv = pv * hm"]

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, lv: int) -> list[str]:
        """The body of level ``lv``'s forward: the projection inputs and new states computed there."""
        nodes, pl, d = self.nodes, self.pl, self.d
        k_ = _Kernel(self, lv)
        for p in self.projs:
            a = nodes[p].args[0]
            if nodes[a].op != "state" and pl.level[a] == lv:
                q = nodes[p].index
                for line in self.hmasked(k_.val(a)):
                    k_.emit(line)
                k_.emit(f"st(PIN{q}, pv, rows, cols, 0, 1, H, m)")
        for k, u in enumerate(d.updates):
            if pl.level[u] != lv:
                continue
            k_.emit(f"n{k} = {k_.val(u)}")
            k_.emit("if HAS_KEEP:")
            k_.emit(f"    kk = tl.load(KEEP{k} + rows[:, None] * KB{k} + cols[None, :] * KH{k}, mask=m, "
                    "other=0.0).to(CT)")
            k_.emit(f"    n{k} = n{k} + kk * (ld(ST{k}, rows, cols, 0, 1, H, m, CT) - n{k})")
            k_.emit(f"st(STN{k}, n{k}, rows, cols, 0, 1, H, m)")
            if k == 0:
                k_.emit("yv = n0")
                k_.emit("if HAS_OMASK:")
                k_.emit("    yv = yv * tl.load(OM + rows, mask=rows < B, other=0.0).to(CT)[:, None]")
                k_.emit("st(Y, yv, rows, cols, 0, 1, H, m)")
            for p in self.projs:
                a = nodes[p].args[0]
                if nodes[a].op == "state" and nodes[a].index == k:
                    for line in self.hmasked(f"n{k}"):
                        k_.emit(line)
                    k_.emit(f"st(PINN{nodes[p].index}, pv, rows, cols, 0, 1, H, m)")
        return k_.lines

    # ---- backward --------------------------------------------------------------------------------
    def backward(self, lv: int) -> list[str]:
        """The body of level ``lv``'s backward (empty if nothing of that level reaches a gradient)."""
        nodes, pl, d, sch = self.nodes, self.pl, self.d, self.sch
        top = pl.levels - 1
        k_ = _Kernel(self, lv)
        grad: dict[int, list[str]] = {}
        sinks: dict[str, list[str]] = {}
        dblk: dict[int, dict[int, list[str]]] = {}

        def contribute(a: int, expr: str) -> None:
            nd = nodes[a]
            if nd.op == "const":
                return
            if nd.op == "state":
                sinks.setdefault(f"gp{nd.index}", []).append(expr)
            elif nd.op == "input":
                sinks.setdefault(f"dx{d.input_gates if nd.index < 0 else nd.index}", []).append(expr)
            elif nd.op == "param":
                sinks.setdefault(f"dp:{nd.name}:{nd.index}", []).append(expr)
            elif sch.blevel[a] == lv:
                grad.setdefault(a, []).append(expr)
            else:
                sinks.setdefault(f"ga{a}", []).append(expr)

        if lv == top:  # the gradients reaching this step's new states; zoneout/lengths carry a share back
            for k, u in enumerate(d.updates):
                k_.emit(f"gu{k} = ld(GS{k}, rows, cols, 0, 1, H, m, CT)")
                if k == 0:
                    k_.emit("if HAS_DOUT:")
                    k_.emit("    dy = ld(DOUT, rows, cols, 0, 1, H, m, CT)")
                    k_.emit("    if HAS_OMASK:")
                    k_.emit("        dy = dy * tl.load(OM + rows, mask=rows < B, other=0.0).to(CT)[:, None]")
                    k_.emit("    gu0 = gu0 + dy")
                k_.emit(f"carry{k} = gu{k} * 0.0")
                k_.emit("if HAS_KEEP:")
                k_.emit(f"    carry{k} = tl.load(KEEP{k} + rows[:, None] * KB{k} + cols[None, :] * KH{k}, mask=m, "
                        f"other=0.0).to(CT) * gu{k}")
                k_.emit(f"    gu{k} = gu{k} - carry{k}")
                contribute(u, f"gu{k}")
        for i in range(len(nodes) - 1, -1, -1):
            nd = nodes[i]
            if sch.blevel[i] != lv or nd.op in _LEAVES:
                continue
            if nd.op == "proj":
                self.proj_backward(k_, i, dblk.get(i, {}), sinks)
                continue
            terms = list(grad.get(i, []))
            if i in sch.ga:
                terms.append(f"ld(GA{i}, rows, cols, 0, 1, H, m, CT)")
            if not terms:
                continue
            gi = f"g{i}"
            k_.emit(f"{gi} = {' + '.join(terms)}")
            if nd.op == "block":
                dblk.setdefault(nd.args[0], {}).setdefault(nd.index, []).append(gi)
            elif nd.op == "layer_norm":
                k_.val(i)
                contribute(nd.args[1], f"{gi} * uh{i}")
                if len(nd.args) == 3:
                    contribute(nd.args[2], gi)
                k_.emit(f"gg{i} = {gi} * {k_.val(nd.args[1])}")
                k_.emit(f"mg{i} = rowsum(gg{i}, m) / H")
                k_.emit(f"mgu{i} = rowsum(gg{i} * uh{i}, m) / H")
                k_.emit(f"du{i} = tl.where(m, rs{i}[:, None] * (gg{i} - mg{i}[:, None] - uh{i} * mgu{i}[:, None]), "
                        "0.0)")
                contribute(nd.args[0], f"du{i}")
            else:
                env = derivative_env(i, nd, gi, k_.val)
                for pos, a in enumerate(nd.args):
                    if nodes[a].op != "const":
                        contribute(a, render(DERIVATIVES[nd.op][pos], env))
        self.flush(k_, lv, sinks)
        return k_.lines

    def proj_backward(self, k_: _Kernel, p: int, dblk: dict[int, list[str]], sinks: dict[str, list[str]]) -> None:
        """Store ``D{q}``, the gradient of projection ``p``'s raw output (through its layer norm, if any)."""
        q, n_b = self.nodes[p].index, int(self.nodes[p].value)
        dy = {j: " + ".join(dblk[j]) if j in dblk else "tl.zeros((BLOCK_B, BLOCK_H), CT)" for j in range(n_b)}
        if not self.d.layer_norm:
            for j in range(n_b):
                k_.emit(f"st(D{q}, {dy[j]}, rows, cols, {j}, {n_b}, H, m)")
            return
        k_.proj_stats(p)
        for j in range(n_b):
            off = self.offset[p] + j
            k_.emit(f"dy{q}_{j} = {dy[j]}")
            sinks.setdefault(f"dlng:{off}", []).append(f"dy{q}_{j} * uh{q}_{j}")
            sinks.setdefault(f"dbhh:{off}", []).append(f"dy{q}_{j}")
            k_.emit(f"gg{q}_{j} = dy{q}_{j} * vec(LNG, cols, {off}, H, CT)")
        k_.emit(f"mg{q} = ({' + '.join(f'rowsum(gg{q}_{j}, m)' for j in range(n_b))}) / ({n_b} * H)")
        k_.emit(f"mgu{q} = ({' + '.join(f'rowsum(gg{q}_{j} * uh{q}_{j}, m)' for j in range(n_b))}) / ({n_b} * H)")
        for j in range(n_b):
            k_.emit(f"st(D{q}, rs{q}[:, None] * (gg{q}_{j} - mg{q}[:, None] - uh{q}_{j} * mgu{q}[:, None]), "
                    f"rows, cols, {j}, {n_b}, H, m)")

    def flush(self, k_: _Kernel, lv: int, sinks: dict[str, list[str]]) -> None:
        """Store every gradient this kernel produced for another kernel or the host."""
        sch = self.sch
        top = self.pl.levels - 1
        pw = dict(self.params)
        for k in range(self.S):
            terms = sinks.get(f"gp{k}", [])
            if lv == top:
                k_.emit(f"st(GP{k}, {' + '.join([f'carry{k}', *terms])}, rows, cols, 0, 1, H, m)")
            elif terms:
                k_.emit(f"add(GP{k}, {' + '.join(terms)}, rows, cols, 0, 1, H, m)")
        for key, terms in sinks.items():
            s = " + ".join(terms)
            if key.startswith("dx"):
                k = int(key[2:])
                fn = "st" if sch.dx_first.get(k) == lv else "add"
                k_.emit(f"{fn}(DXG, {s}, rows, cols, {k}, {self.xw}, H, m)")
            elif key.startswith("dp:"):
                _, name, idx = key.split(":")
                k_.emit(f"add(DPAR_{name}, {s}, rows, cols, {idx}, {pw[name]}, H, m)")
            elif key.startswith("dlng:") or key.startswith("dbhh:"):
                buf = "DLNG" if key.startswith("dlng") else "DBHH"
                k_.emit(f"add({buf}, {s}, rows, cols, {key.split(':')[1]}, {self.GH}, H, m)")
            elif key.startswith("ga"):
                a = int(key[2:])
                fn = "st" if sch.ga_first[a] == ("k", lv) else "add"
                k_.emit(f"{fn}(GA{a}, {s}, rows, cols, 0, 1, H, m)")


def source(d: Declaration) -> str:
    """The Triton source of declaration ``d``: per level the per-step kernels ``fwd{L}`` / ``bwd{L}``, and the
    persistent kernels ``persistent_fwd`` / ``persistent_bwd`` that run the same bodies in a loop over time."""
    from ..cells.base import LN_EPS

    g = _Gen(d)
    fwd = {lv: g.forward(lv) for lv in g.sch.fwd_levels}
    bwd = {lv: body for lv in range(g.pl.levels) if (body := g.backward(lv))}
    parts = [_PRELUDE.format(eps=LN_EPS)]
    # each per-step kernel takes only the arguments its body uses (fewer to pass at every launch)
    used = {name: g.used_args(body) for name, body in [*((f"fwd{lv}", b) for lv, b in fwd.items()),
                                                        *((f"bwd{lv}", b) for lv, b in bwd.items())]}
    parts += [g.kernel(f"fwd{lv}", used[f"fwd{lv}"], body) for lv, body in fwd.items()]
    parts += [g.kernel(f"bwd{lv}", used[f"bwd{lv}"], body) for lv, body in bwd.items()]
    parts += [g.persistent_forward(fwd), g.persistent_backward(bwd)]
    def table(kind: str, levels) -> str:
        return ", ".join(f"({lv}, {kind}{lv}, {used[kind + str(lv)]!r})" for lv in levels)

    parts.append(f"PERSISTENT_ARGS = {g.persistent_arg_names()!r}\n"
                 f"FORWARD = [{table('fwd', fwd)}]\n"
                 f"BACKWARD = [{table('bwd', sorted(bwd, reverse=True))}]\n")
    return "\n\n".join(parts)


@functools.cache
def module(d: Declaration):
    """The generated kernel module of ``d`` (its source written once under a hash of it, then imported)."""
    return load_source(source(d), "triton", f"the declaration {d.name!r}")
