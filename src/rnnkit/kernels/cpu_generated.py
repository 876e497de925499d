"""``backend="cpu_gen"``: numba time loops generated from a cell's declaration (any declared cell).

For a declaration, :func:`source` writes the Python source of two numba functions, the forward time
loop and the backward time loop: per step, one ``np.dot`` per recurrent projection and the declaration's
pointwise equations as numba array expressions; the backward is the reverse mode of
:mod:`rnnkit.cells.compile` written out node by node (same saved values: what the local derivatives
read, nothing recomputed). The source is written once to ``$RNNKIT_CACHE_DIR/generated`` (default
``~/.cache/rnnkit/generated``) under a hash of the declaration, so numba's on-disk cache
(``cache=True``) serves a second process without compiling again.

One thread, float32 and float64, CPU only; ``auto`` does not pick it: it is checked against the
``reference`` oracle and against the hand-written ``cpu`` loops (tests), not yet tuned for speed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from ..cells.base import LN_EPS, Cell, State, Weights
from ..cells.compile import DERIVATIVE_READS
from ..cells.declare import Declaration
from . import Backend, Capability, LayerConfig, register
from .common import NUMBA_DTYPES, LayerMasks, check_numba_input

DTYPES = NUMBA_DTYPES

_HELPERS = f'''
import numpy as np
from numba import njit

EPS = {LN_EPS!r}


@njit(cache=True)
def ln_fwd(u, gain):
    B, N = u.shape
    y = np.empty_like(u)
    uh = np.empty_like(u)
    rs = np.empty((B, 1), u.dtype)
    for b in range(B):
        mu = 0.0
        for j in range(N):
            mu += u[b, j]
        mu /= N
        var = 0.0
        for j in range(N):
            d = u[b, j] - mu
            var += d * d
        r = 1.0 / np.sqrt(var / N + EPS)
        rs[b, 0] = r
        for j in range(N):
            uh[b, j] = (u[b, j] - mu) * r
            y[b, j] = uh[b, j] * gain[j]
    return y, uh, rs


@njit(cache=True)
def ln_bwd(dy, uh, rs, gain):
    B, N = dy.shape
    du = np.empty_like(dy)
    dg = np.zeros(N, dy.dtype)
    for b in range(B):
        m1 = 0.0
        m2 = 0.0
        for j in range(N):
            g = dy[b, j] * gain[j]
            m1 += g
            m2 += g * uh[b, j]
            dg[j] += dy[b, j] * uh[b, j]
        m1 /= N
        m2 /= N
        for j in range(N):
            du[b, j] = rs[b, 0] * (dy[b, j] * gain[j] - m1 - uh[b, j] * m2)
    return du, dg
'''

_UNARY = {
    "sigmoid": "1.0 / (1.0 + np.exp(-{0}))", "tanh": "np.tanh({0})", "exp": "np.exp({0})", "log": "np.log({0})",
    "relu": "np.maximum({0}, 0.0)", "abs": "np.abs({0})",
    "softplus": "np.where({0} > 20.0, {0}, np.log1p(np.exp(np.minimum({0}, 20.0))))",
    "hard_sigmoid": "np.minimum(np.maximum({0} / 6.0 + 0.5, 0.0), 1.0)",
}
_BINARY = {"add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})", "div": "({0} / {1})",
           "max": "np.maximum({0}, {1})", "min": "np.minimum({0}, {1})"}


def _ln_nodes(d: Declaration) -> list[int]:
    """The nodes that layer-normalise: ``layer_norm(...)`` and, with ``layer_norm=True``, every projection."""
    return [i for i, n in enumerate(d.nodes) if n.op == "layer_norm" or (n.op == "proj" and d.layer_norm)]


def _saved(d: Declaration) -> list[int]:
    """The nodes whose per-step values the forward stores for the backward (parameters are read again)."""
    nodes = d.nodes
    read = {i if r == "out" else n.args[r] for i, n in enumerate(nodes) for r in DERIVATIVE_READS.get(n.op, ())}
    return sorted(i for i in read if nodes[i].op not in ("const", "param"))


def source(d: Declaration) -> str:
    """The numba source of ``forward`` and ``backward`` for declaration ``d``."""
    nodes = d.nodes
    P = len(d.projections)
    S = len(d.states)
    G = d.input_gates
    saved = _saved(d)
    preamble = [f"    v{i} = P_{n.name}[{n.index} * H:{n.index + 1} * H]"
                for i, n in enumerate(nodes) if n.op == "param"]
    lns = _ln_nodes(d)
    params = [p for p, _ in d.params]
    offsets, off = [], 0
    for blocks in d.projections:
        offsets.append(off)
        off += len(blocks)

    def val(i: int) -> str:
        n = nodes[i]
        return repr(n.value) if n.op == "const" else f"v{i}"

    common = (["xg"] + [f"RT{p}" for p in range(P)] + [f"R{p}" for p in range(P)] + [f"b{p}" for p in range(P)]
              + [f"P_{p}" for p in params] + ["lng", "hmask"] + [f"K{k}" for k in range(S)]
              + [f"ST{k}" for k in range(S)] + [f"SV{i}" for i in saved] + [f"PIN{p}" for p in range(P)]
              + [f"LU{i}" for i in lns] + [f"LR{i}" for i in lns])
    fw = [f"@njit(cache=True)\ndef forward({', '.join(common)}):",
          "    T = xg.shape[0]", "    H = ST0.shape[2]", *preamble, "    for t in range(T):"]
    for k in range(S):
        fw.append(f"        s{k} = ST{k}[t]")
    for i, n in enumerate(nodes):
        op = n.op
        if op in ("const", "param"):
            continue
        if op == "state":
            e = f"s{n.index}"
        elif op == "input":
            k = G if n.index < 0 else n.index
            e = f"xg[t, :, {k} * H:{k + 1} * H]"
        elif op == "proj":
            p = n.index
            fw.append(f"        PIN{p}[t] = {val(n.args[0])} * hmask")
            fw.append(f"        raw = np.dot(PIN{p}[t], RT{p})")
            if d.layer_norm:
                lo, hi = offsets[p], offsets[p] + int(n.value)
                fw.append(f"        raw, LU{i}[t], LR{i}[t] = ln_fwd(raw, lng[{lo} * H:{hi} * H])")
            e = f"raw + b{p}"
        elif op == "block":
            e = f"v{n.args[0]}[:, {n.index} * H:{n.index + 1} * H]"
        elif op == "layer_norm":
            fw.append(f"        y, LU{i}[t], LR{i}[t] = ln_fwd({val(n.args[0])}, {val(n.args[1])})")
            e = "y" if len(n.args) < 3 else f"y + {val(n.args[2])}"
        elif op == "neg":
            e = f"(-{val(n.args[0])})"
        elif op in _UNARY:
            e = _UNARY[op].format(val(n.args[0]))
        else:
            e = _BINARY[op].format(val(n.args[0]), val(n.args[1]))
        fw.append(f"        v{i} = {e}")
        if i in saved:
            fw.append(f"        SV{i}[t] = v{i}")
    for k, u in enumerate(d.updates):
        fw.append(f"        ST{k}[t + 1] = K{k}[t] * s{k} + (1.0 - K{k}[t]) * {val(u)}")

    bw_args = common + ["dout", *[f"dS{k}" for k in range(S)], "DXG", *[f"DRAW{p}" for p in range(P)],
                        *[f"dP_{p}" for p in params], "dlng", "dbhh"]
    bw = [f"@njit(cache=True)\ndef backward({', '.join(bw_args)}):",
          "    T = xg.shape[0]", "    H = ST0.shape[2]", "    B = ST0.shape[1]", *preamble]
    bw += [f"    g_s{k} = dS{k}.copy()" for k in range(S)]
    bw.append("    for t in range(T - 1, -1, -1):")
    bw.append("        g_s0 = g_s0 + dout[t]")
    for i in saved:
        bw.append(f"        v{i} = SV{i}[t]")
    has: set[int] = set()

    def acc(i: int, e: str) -> None:
        if nodes[i].op == "const":
            return
        bw.append(f"        g{i} = g{i} + {e}" if i in has else f"        g{i} = {e}")
        has.add(i)

    for k in range(S):
        bw.append(f"        c{k} = K{k}[t] * g_s{k}")
        acc(d.updates[k], f"(g_s{k} - c{k})")
    for k in range(S):
        bw.append(f"        g_s{k} = c{k}")
    blocks: dict[int, dict[int, int]] = {}
    for i in range(len(nodes) - 1, -1, -1):
        n = nodes[i]
        op = n.op
        if op == "proj":
            p, nb = n.index, int(n.value)
            bw.append(f"        dy = np.zeros((B, {nb} * H), xg.dtype)")
            for j, src in blocks.get(i, {}).items():
                bw.append(f"        dy[:, {j} * H:{j + 1} * H] = g{src}")
            if d.layer_norm:
                lo, hi = offsets[p], offsets[p] + nb
                bw.append(f"        dbhh[{lo} * H:{hi} * H] += dy.sum(axis=0)")
                bw.append(f"        dy, dg = ln_bwd(dy, LU{i}[t], LR{i}[t], lng[{lo} * H:{hi} * H])")
                bw.append(f"        dlng[{lo} * H:{hi} * H] += dg")
            bw.append(f"        DRAW{p}[t] = dy")
            acc(n.args[0], f"np.dot(dy, R{p}) * hmask")
            continue
        if i not in has:
            continue
        g = f"g{i}"
        a = [val(x) for x in n.args]
        if op == "state":
            bw.append(f"        g_s{n.index} = g_s{n.index} + {g}")
        elif op == "input":
            k = G if n.index < 0 else n.index
            bw.append(f"        DXG[t, :, {k} * H:{k + 1} * H] += {g}")
        elif op == "param":
            bw.append(f"        dP_{n.name}[{n.index} * H:{n.index + 1} * H] += {g}.sum(axis=0)")
        elif op == "block":
            blocks.setdefault(n.args[0], {})[n.index] = i
        elif op == "layer_norm":
            if len(n.args) == 3:
                acc(n.args[2], g)
            acc(n.args[1], f"{g} * LU{i}[t]")
            bw.append(f"        du, dg = ln_bwd({g}, LU{i}[t], LR{i}[t], {a[1]})")
            acc(n.args[0], "du")
        elif op == "add":
            acc(n.args[0], g)
            acc(n.args[1], g)
        elif op == "sub":
            acc(n.args[0], g)
            acc(n.args[1], f"(-{g})")
        elif op == "neg":
            acc(n.args[0], f"(-{g})")
        elif op == "mul":
            acc(n.args[0], f"{g} * {a[1]}")
            acc(n.args[1], f"{g} * {a[0]}")
        elif op == "div":
            acc(n.args[0], f"{g} / {a[1]}")
            acc(n.args[1], f"(-{g} / {a[1]} * v{i})")
        elif op in ("max", "min"):
            cmp = ">" if op == "max" else "<"
            bw.append(f"        w{i} = np.where({a[0]} {cmp} {a[1]}, 1.0, np.where({a[0]} == {a[1]}, 0.5, 0.0))")
            acc(n.args[0], f"{g} * w{i}")
            acc(n.args[1], f"{g} * (1.0 - w{i})")
        elif op == "sigmoid":
            acc(n.args[0], f"{g} * v{i} * (1.0 - v{i})")
        elif op == "tanh":
            acc(n.args[0], f"{g} * (1.0 - v{i} * v{i})")
        elif op == "exp":
            acc(n.args[0], f"{g} * v{i}")
        elif op == "log":
            acc(n.args[0], f"{g} / {a[0]}")
        elif op == "relu":
            acc(n.args[0], f"np.where(v{i} > 0.0, {g}, 0.0)")
        elif op == "softplus":
            acc(n.args[0], f"(-{g} * np.expm1(-v{i}))")
        elif op == "hard_sigmoid":
            acc(n.args[0], f"np.where(({a[0]} > -3.0) & ({a[0]} < 3.0), {g} / 6.0, 0.0)")
        elif op == "abs":
            acc(n.args[0], f"{g} * np.sign({a[0]})")
        else:
            raise ValueError(f"no generated derivative for {op!r}")
    bw.append("    return " + (", ".join(f"g_s{k}" for k in range(S)) if S > 1 else "(g_s0,)"))
    return _HELPERS + "\n\n" + "\n".join(fw) + "\n\n\n" + "\n".join(bw) + "\n"


def _cache_dir() -> Path:
    base = os.environ.get("RNNKIT_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "rnnkit") / "generated"


@functools.cache
def _module(d: Declaration) -> ModuleType:
    """The generated module of ``d``: its source written once under a hash of the source, then imported."""
    from .cpu import _load_blas

    _load_blas()  # numba's np.dot needs a BLAS loaded
    text = source(d)
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    path = _cache_dir() / f"cell_{digest}.py"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(f"# generated by rnnkit from the declaration {d.name!r}\n" + text, encoding="utf-8")
        os.replace(tmp, path)
    name = f"rnnkit_generated_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class _GenRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cell: Cell, names: tuple[str, ...], masks: LayerMasks, xg: Tensor, R: Tensor,
                b_hh: Tensor | None, *rest: Tensor):
        d = cell.declaration
        K = _module(d)
        S, P, H = cell.state_size, len(d.projections), cell.hidden_size
        T, B = xg.shape[0], xg.shape[1]
        dt = xg.dtype
        state0 = rest[:S]
        w = dict(zip(names, rest[S:]))
        bounds = np.cumsum([0, *(g * H for g in cell.rec_parts)])
        Rn = _np(R)
        Rp = [np.ascontiguousarray(Rn[a:z]) for a, z in zip(bounds, bounds[1:])]
        RT = [np.ascontiguousarray(r.T) for r in Rp]
        add_b = b_hh is not None and cell.rec_bias
        after_ln = b_hh is not None and cell.layer_norm
        bn = _np(b_hh) if b_hh is not None else None
        bs = [bn[a:z] if (add_b or after_ln) else np.zeros(z - a, Rn.dtype) for a, z in zip(bounds, bounds[1:])]
        params = [_np(w[p]) for p, _ in d.params]
        lng = _np(w["ln_weight_hh"]) if cell.layer_norm else np.zeros(1, Rn.dtype)
        hmask = _np(masks.hmask) if masks.hmask is not None else np.ones((B, H), Rn.dtype)
        keep = ([k.detach().to(dt).expand(T, B, H).contiguous().numpy() for k in masks.keep]
                if masks.keep is not None else [np.zeros((T, B, H), Rn.dtype)] * S)
        ST = [torch.empty(T + 1, B, H, dtype=dt) for _ in range(S)]
        for k in range(S):
            ST[k][0] = state0[k]
        nodes = d.nodes
        saved = _saved(d)
        lns = _ln_nodes(d)
        width = {i: (int(nodes[i].value) * H if nodes[i].op == "proj" else H) for i in lns}
        SV = [np.empty((T, B, H), Rn.dtype) for _ in saved]
        PIN = [np.empty((T, B, H), Rn.dtype) for _ in range(P)]
        LU = [np.empty((T, B, width[i]), Rn.dtype) for i in lns]
        LR = [np.empty((T, B, 1), Rn.dtype) for _ in lns]
        arrays = ([_np(xg), *RT, *Rp, *bs, *params, lng, hmask, *keep, *(s.numpy() for s in ST), *SV, *PIN, *LU, *LR])
        K.forward(*arrays)
        out = ST[0][1:]
        result = out if masks.out_mask is None else out * masks.out_mask
        ctx.cell, ctx.names, ctx.masks, ctx.arrays, ctx.PIN = cell, names, masks, arrays, PIN
        ctx.meta = (T, B, H, dt, b_hh is not None)
        return (result.clone() if masks.out_mask is None else result, *(s[T].clone() for s in ST))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor | None, *dfinal: Tensor | None):
        cell, masks = ctx.cell, ctx.masks
        d = cell.declaration
        K = _module(d)
        T, B, H, dt, has_bias = ctx.meta
        ndt = np.float32 if dt == torch.float32 else np.float64
        if dout is None:
            dout = torch.zeros(T, B, H, dtype=dt)
        elif masks.out_mask is not None:
            dout = dout * masks.out_mask
        dS = [np.zeros((B, H), ndt) if g is None else _np(g).copy() for g in dfinal]
        xg_width = ctx.arrays[0].shape[2]
        DXG = np.zeros((T, B, xg_width), ndt)
        DRAW = [np.empty((T, B, g * H), ndt) for g in cell.rec_parts]
        dP = [np.zeros(len(b) * H, ndt) for _, b in d.params]
        dlng = np.zeros(cell.rec_gates * H if cell.layer_norm else 1, ndt)
        dbhh = np.zeros(cell.rec_gates * H, ndt)
        dS0 = K.backward(*ctx.arrays, _np(dout), *dS, DXG, *DRAW, *dP, dlng, dbhh)
        dR = torch.cat([torch.from_numpy(D.reshape(T * B, -1)).t() @ torch.from_numpy(X.reshape(T * B, H))
                        for D, X in zip(DRAW, ctx.PIN)], 0)
        db = None
        if has_bias:
            db = torch.from_numpy(dbhh) if cell.layer_norm else torch.cat(
                [torch.from_numpy(D).sum((0, 1)) for D in DRAW])
        grads = {p: torch.from_numpy(g) for (p, _), g in zip(d.params, dP)}
        if cell.layer_norm:
            grads["ln_weight_hh"] = torch.from_numpy(dlng)
        ctx.arrays = ctx.PIN = None
        return (None, None, None, torch.from_numpy(DXG), dR, db, *(torch.from_numpy(np.ascontiguousarray(s))
                                                                    for s in dS0),
                *(grads.get(n) for n in ctx.names))


def run(cell: Cell, x: Tensor, state0: State, w: Weights, masks: LayerMasks) -> tuple[Tensor, State]:
    """Run one layer in one direction over ``x`` (T, B, I); returns outputs (T, B, H) and final state."""
    check_numba_input("cpu_gen", x)
    xg = cell.project_input(x, w)
    names = tuple(cell.extra_shapes())
    out, *state = _GenRecurrence.apply(cell, names, masks, xg, w["weight_hh"], w["bias_hh"], *state0,
                                       *(w[n] for n in names))
    return out, tuple(state)


def _unsupported(cell: Cell, cfg: LayerConfig, device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the generated CPU loops run on the CPU only, not on {device}"
    return None


register(Backend("cpu_gen", "numba loops generated from the declaration (CPU, one thread)", _unsupported, run,
                 DTYPES, Capability(), experimental=True))
