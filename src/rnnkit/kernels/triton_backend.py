"""``backend="triton"``: explicit BPTT with Triton kernels generated from the cell's declaration.

Same skeleton as :mod:`rnnkit.kernels.bptt`: the input projections of all steps come from one matmul
(``cell.project_input``, under autograd). Per time step and level of the declaration
(:mod:`rnnkit.kernels.triton_generated`), forward: one cuBLAS matmul per recurrent projection of that
level, ``HG = PIN R_p^T (+ b_p)`` into a preallocated buffer, then the level's generated kernel (the
pointwise equations, layer norms, zoneout / length mixing, output mask, the next matmuls' inputs
``PIN``). Backward, levels in reverse: the level's generated kernel, then per projection one matmul
``D_p R_p`` into the gradient of its input; ``dR`` and ``db`` come from one matmul over all steps at
the end. Any declaration runs: any number of states, parameters, projections of any expression.

States are carried in float32 (float64 for float64 inputs) whatever the input dtype; ``bfloat16``
inputs keep bf16 storage for ``xg``, the matmul operands and the outputs, with float32 math inside
the kernels and float32 accumulation in cuBLAS.

``backend="triton_persistent"`` (:class:`_PersistentRun`, small H only) runs the whole forward and the
whole backward time loop each in one launch of the generated persistent kernels, R kept on chip.

Devices: CUDA only. For tests and debugging the kernels also run on the CPU under Triton's
interpreter: set ``TRITON_INTERPRET=1`` **and** ``RNNKIT_TRITON_CPU=1`` before the kernels are first
used (Triton decides at definition time whether a kernel is interpreted). Without both variables a
CPU tensor is refused with an error; triton is imported only when the backend first runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from ..cells.base import Cell, State, Weights
from ..cells.declare import Declaration
from . import Backend, LayerConfig, register, triton_generated
from .capability import Capability
from .common import LayerMasks
from .cpu_generated import plan

CPU_ENV = "RNNKIT_TRITON_CPU"
#: The storage dtypes it runs (math in float32, float64 for float64).
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def cpu_interpreter_requested() -> bool:
    """True when both ``TRITON_INTERPRET=1`` and ``RNNKIT_TRITON_CPU=1`` are set (tests, debugging)."""
    truthy = ("1", "true", "yes", "on")
    return os.environ.get("TRITON_INTERPRET", "").lower() in truthy and os.environ.get(CPU_ENV) == "1"


def unsupported(cell: Cell, cfg: LayerConfig, device: torch.device) -> str | None:
    """None if the Triton backend can run ``cell`` on ``device``, else the reason (its declaration is
    checked by the backend's :class:`~rnnkit.kernels.capability.Capability`)."""
    if not triton_installed():
        return "Triton is not installed (pip install 'rnnkit[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and cpu_interpreter_requested():
        return None
    return (f"the Triton kernels run on CUDA devices only, got device type {device.type!r} "
            f"(on the CPU they run only in Triton's interpreter, for tests: set TRITON_INTERPRET=1 and "
            f"{CPU_ENV}=1 before first use)")


def check_mode(K: ModuleType, device: torch.device) -> ModuleType:
    """``K``, a kernel module, if its mode (compiled / interpreted) can serve ``device``."""
    if device.type == "cpu" and not K.INTERPRETED:
        raise RuntimeError("backend='triton' on the CPU needs Triton's interpreter, but the kernels were "
                           "already compiled for the GPU in this process: set TRITON_INTERPRET=1 before "
                           "the first use of the Triton backend")
    return K


def _kernels(d: Declaration, device: torch.device) -> ModuleType:
    """The generated kernel module of declaration ``d``, checked against ``device``."""
    return check_mode(triton_generated.module(d), device)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@dataclass(frozen=True)
class _Launch:
    """Tiling of one step: whole rows for layer-norm cells (row reductions), else 256-wide H tiles."""

    grid: tuple[int, int]
    meta: dict

    @staticmethod
    def make(B: int, H: int, whole_rows: bool) -> _Launch:
        bh = _pow2(H) if whole_rows else min(_pow2(H), 256)
        bb = max(1, min(_pow2(B), 2048 // bh))
        warps = 4 if bb * bh <= 1024 else 8
        # enable_fp_fusion given explicitly (FMA contraction on, Triton's default): Triton >= 3.9 warns when
        # it has to fall back on its default, and the test suite turns warnings into errors.
        meta = {"BLOCK_B": bb, "BLOCK_H": bh, "num_warps": warps, "enable_fp_fusion": True}
        return _Launch((_cdiv(B, bb), _cdiv(H, bh)), meta)


class _Run:
    """One layer/direction through the kernels generated from the cell's declaration (kept on ``ctx``)."""

    def __init__(self, cell: Cell, masks: LayerMasks, xg: Tensor, R: Tensor, b_hh: Tensor | None,
                 extras: dict[str, Tensor]) -> None:
        d = cell.declaration
        self.d, self.pl, self.sch = d, plan(d), triton_generated.schedule(d)
        self.K = _kernels(d, xg.device)
        self.xg, self.b_hh = xg, b_hh
        self.T, self.B = xg.shape[0], xg.shape[1]
        self.H = H = cell.hidden_size
        self.dtype, self.device = xg.dtype, xg.device
        self.acc = torch.float64 if xg.dtype == torch.float64 else torch.float32  # states, running gradients
        self.ln = cell.layer_norm
        whole_rows = d.layer_norm or "layer_norm" in d.operations()
        self.launch = _Launch.make(self.B, H, whole_rows)
        self.grid = self.launch.grid
        self.hmask = None if masks.hmask is None else masks.hmask.contiguous()
        self.keep = masks.keep
        self.omask = None if masks.out_mask is None else masks.out_mask.reshape(self.T, self.B).contiguous()
        self.projs = self.pl.projections()
        self.R_parts = [R[a * H:z * H] for a, z in self.pl.block_bounds]
        self.Rt_parts = [r.t() for r in self.R_parts]
        rb = b_hh if cell.rec_bias else None
        self.b_parts = [None if rb is None else rb[a * H:z * H] for a, z in self.pl.block_bounds]
        self.params = {n: extras[n] for n, _ in d.params}
        self.dummy = xg
        GH = cell.rec_gates * H
        self.fixed = {"B": self.B, "H": H, "HM": self.p(self.hmask),
                      "LNG": extras["ln_weight_hh"] if self.ln else self.dummy,
                      "BHH": (b_hh if b_hh is not None else torch.zeros(GH, dtype=xg.dtype, device=xg.device))
                      if self.ln else self.dummy,
                      **{f"PAR_{n}": v for n, v in self.params.items()}}
        for k in range(len(d.states)):
            ks, kb, kh = self.keep_steps(k)
            self.fixed.update({f"KB{k}": kb, f"KH{k}": kh})
            self.fixed[f"KEEP{k}"] = ks
        self.fixed["OM"] = self.steps(self.omask)
        self.fixed["XG"] = xg.unbind(0)
        self.names = sorted({n for _, _, names in (*self.K.FORWARD, *self.K.BACKWARD) for n in names})
        CT = self.K.tl.float64 if self.acc == torch.float64 else self.K.tl.float32
        self.meta = {"HAS_KEEP": self.keep is not None, "HAS_OMASK": self.omask is not None,
                     "HAS_HMASK": self.hmask is not None, "CT": CT, **self.launch.meta}

    # ---- small helpers -----------------------------------------------------------------------------
    def p(self, t: Tensor | None) -> Tensor:
        """A pointer argument; absent tensors are replaced by a dummy the kernel never reads."""
        return self.dummy if t is None else t

    def steps(self, x: Tensor | None) -> Sequence[Tensor]:
        """Per-step views of a (T or T+1, ...) tensor made in one call; the dummy pointer for None."""
        return [self.dummy] * (self.T + 1) if x is None else x.unbind(0)

    def keep_steps(self, comp: int) -> tuple[Sequence[Tensor], int, int]:
        """Per-step (B, H) views of keep mask ``comp`` and their (batch, hidden) strides (0 broadcasts)."""
        if self.keep is None:
            return [self.dummy] * self.T, 0, 0
        k = self.keep[comp]
        ke = k.expand(k.shape[0], self.B, self.H)
        return (ke.unbind(0) if k.shape[0] > 1 else [ke[0]] * self.T), ke.stride(1), ke.stride(2)

    def masked(self, h: Tensor) -> Tensor:
        return h if self.hmask is None else h * self.hmask

    def buffers(self, n: int, shape: tuple[int, ...], dtype: torch.dtype, ring: int) -> tuple[Tensor, list[Tensor]]:
        """A (n, *shape) buffer and its n per-step views; without a backward to save for (inference), only
        ``ring`` slots, reused in turn (2 for a value read at t and written at t + 1, 1 for scratch)."""
        slots = n if self.save else min(n, ring)
        buf = torch.empty(slots, *shape, dtype=dtype, device=self.device)
        views = buf.unbind(0)
        return buf, (list(views) if slots == n else [views[t % slots] for t in range(n)])

    def values(self, per_step: dict[str, Sequence], t: int) -> dict:
        """The per-step kernels' arguments at step ``t``, by name (``per_step`` and fixed lists indexed by t)."""
        out = {}
        for name in self.names:
            v = per_step.get(name, self.fixed.get(name, self.dummy))
            out[name] = v[t] if isinstance(v, (list, tuple)) else v
        return out

    def errstate(self):
        """The interpreter computes in NumPy, which warns where the GPU silently gives inf/nan (lanes
        outside the tile's mask read zeros): quiet, as on the GPU."""
        return np.errstate(all="ignore") if self.K.INTERPRETED else contextlib.nullcontext()

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, state0: State) -> tuple[Tensor, State]:
        T, B, H, dt = self.T, self.B, self.H, self.dtype
        nodes = self.d.nodes
        step: dict[str, Sequence] = {}
        for k, s0 in enumerate(state0):
            _, views = self.buffers(T + 1, (B, H), self.acc, 2)
            views[0].copy_(s0)
            step[f"ST{k}"], step[f"STN{k}"] = views, views[1:]
        self.PIN = []
        for p, (a, z) in zip(self.projs, self.pl.block_bounds):
            q = nodes[p].index
            _, hgs = self.buffers(T, (B, (z - a) * H), dt, 1)
            pin, pins = self.buffers(T + 1, (B, H), dt, 2)
            src = nodes[nodes[p].args[0]]
            if src.op == "state":
                pins[0].copy_(self.masked(state0[src.index]))
            self.PIN.append(pin)
            step.update({f"HG{q}": hgs, f"PIN{q}": pins, f"PINN{q}": pins[1:]})
        y = torch.empty(T, B, H, dtype=dt, device=self.device)
        step["Y"] = y.unbind(0)
        self.step = step
        grid, meta = self.grid, {**self.meta, "HAS_DOUT": False}
        by_level = [[(q, step[f"PIN{q}"], step[f"HG{q}"]) for q, p in enumerate(self.projs) if self.pl.level[p] == lv]
                    for lv in range(self.pl.levels)]
        kernels = {lv: (fn, names) for lv, fn, names in self.K.FORWARD}
        with self.errstate():
            for t in range(T):
                vals = self.values(step, t)
                for lv in range(self.pl.levels):
                    for q, pins, hgs in by_level[lv]:
                        b = self.b_parts[q]
                        if b is None:
                            torch.mm(pins[t], self.Rt_parts[q], out=hgs[t])
                        else:
                            torch.addmm(b, pins[t], self.Rt_parts[q], out=hgs[t])
                    if lv in kernels:
                        fn, names = kernels[lv]
                        fn[grid](*[vals[n] for n in names], **meta)
        return y, tuple(step[f"ST{k}"][T] for k in range(len(state0)))

    # ---- backward ----------------------------------------------------------------------------------
    def grad_buffers(self, dout: Tensor | None, dfinal: tuple[Tensor | None, ...]) -> tuple[list[Tensor], dict]:
        """Fresh copies of the final-state gradients (the kernels update them in place, and autograd may hand
        one gradient tensor to several consumers), and the backward's buffers by kernel argument name."""
        T, B, H, dt, dev, acc = self.T, self.B, self.H, self.dtype, self.device, self.acc
        GS = [torch.zeros(B, H, dtype=acc, device=dev) if g is None
              else g.to(dtype=acc, memory_format=torch.contiguous_format, copy=True) for g in dfinal]
        GH = sum(z - a for a, z in self.pl.block_bounds) * H
        self.D = [torch.empty(T, B, (z - a) * H, dtype=dt, device=dev) for a, z in self.pl.block_bounds]
        self.dxg = (torch.zeros if self.sch.dxg_zero else torch.empty)(T, B, self.xg.shape[2], dtype=dt, device=dev)
        self.dpar = {n: torch.zeros(B, v.numel(), dtype=acc, device=dev) for n, v in self.params.items()}
        self.dlng = torch.zeros(B, GH, dtype=acc, device=dev) if self.ln else self.dummy
        self.dbhh = torch.zeros(B, GH, dtype=acc, device=dev) if self.ln else self.dummy
        self.GA = {i: torch.empty(B, H, dtype=acc, device=dev) for i in self.sch.ga}
        bufs = {"DLNG": self.dlng, "DBHH": self.dbhh, **{f"GA{i}": g for i, g in self.GA.items()},
                **{f"DPAR_{n}": g for n, g in self.dpar.items()}}
        return GS, bufs

    def finish(self, dstate0: list[Tensor]):
        """The gradients autograd receives, from the backward's buffers: dR and db by one matmul / sum over all
        steps, the per-row parameter accumulators summed over rows."""
        T, B, H, dt = self.T, self.B, self.H, self.dtype
        dR_parts = [Dq.reshape(T * B, -1).t() @ P[:T].reshape(T * B, H) for Dq, P in zip(self.D, self.PIN)]
        dR = torch.cat(dR_parts, 0) if len(dR_parts) > 1 else dR_parts[0]
        db = None
        if self.b_hh is not None:
            db = self.dbhh.sum(0).to(dt) if self.ln else torch.cat([Dq.sum((0, 1)) for Dq in self.D])
        grads = {n: g.sum(0).to(dt) for n, g in self.dpar.items()}
        if self.ln:
            grads["ln_weight_hh"] = self.dlng.sum(0).to(dt)
        return self.dxg, dR, db, [g.to(dt) for g in dstate0], grads

    def backward(self, dout: Tensor | None, dfinal: tuple[Tensor | None, ...]):
        T, B, H, dt, dev = self.T, self.B, self.H, self.dtype, self.device
        pl = self.pl
        GS, bufs = self.grad_buffers(dout, dfinal)
        GP = [torch.empty_like(g) for g in GS]
        step = {**self.step, **bufs, "DOUT": self.steps(None if dout is None else dout.contiguous()),
                "DXG": self.dxg.unbind(0)}
        Ds = [x.unbind(0) for x in self.D]
        for q in range(len(self.projs)):
            step[f"D{q}"] = Ds[q]
        meta = {**self.meta, "HAS_DOUT": dout is not None}
        kernels = {lv: (fn, names) for lv, fn, names in self.K.BACKWARD}
        tmp = torch.empty(B, H, dtype=dt, device=dev)
        by_level = [[q for q, p in reversed(list(enumerate(self.projs))) if pl.level[p] == lv]
                    for lv in range(pl.levels)]
        with self.errstate():
            for t in range(T - 1, -1, -1):
                for k in range(len(GS)):
                    step[f"GS{k}"], step[f"GP{k}"] = GS[k], GP[k]
                vals = self.values(step, t)
                for lv in range(pl.levels - 1, -1, -1):
                    if lv in kernels:
                        fn, names = kernels[lv]
                        fn[self.grid](*[vals[n] for n in names], **meta)
                    for q in by_level[lv]:
                        torch.mm(Ds[q][t], self.R_parts[q], out=tmp)
                        self._send(self.projs[q], self.masked(tmp), GP, self.GA, self.dxg[t], self.dpar)
                GS, GP = GP, GS
        return self.finish(GS)

    def _send(self, p: int, g: Tensor, GP: list[Tensor], GA: dict[int, Tensor], dxg_t: Tensor,
              dpar: dict[str, Tensor]) -> None:
        """Add ``g`` = d(projection input), from the matmul ``D_p R_p``, to the gradient of that input."""
        H = self.H
        a = self.d.nodes[p].args[0]
        src = self.d.nodes[a]
        if src.op == "state":
            GP[src.index].add_(g)
        elif src.op == "input":
            k = self.d.input_gates if src.index < 0 else src.index
            dxg_t[:, k * H:(k + 1) * H].add_(g)
        elif src.op == "param":
            dpar[src.name][:, src.index * H:(src.index + 1) * H].add_(g)
        elif self.sch.ga_first[a] == ("g", p):
            GA[a].copy_(g)
        else:
            GA[a].add_(g)


# The persistent kernels keep every recurrent weight block on chip (registers / shared memory): blocks *
# BLOCK_H^2 <= MAX_R_ELEMS with BLOCK_H = max(16, next power of two >= H) (tl.dot's minimum is 16), i.e.
# H <= 64 for four blocks (LSTM, sLSTM), H <= 128 for one (Elman RNN).
MAX_R_ELEMS = 16384
PERSISTENT_BLOCK_B = 16
PERSISTENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _persistent_block_h(H: int) -> int:
    return max(16, _pow2(H))


class _PersistentRun(_Run):
    """Forward and backward each in ONE launch of the generated persistent kernels: the same per-level bodies
    inside a loop over time, the recurrent matmuls by ``tl.dot`` with R loaded once; a program owns
    PERSISTENT_BLOCK_B sequences and whole rows."""

    def _keep_args(self) -> dict:
        out = {}
        for k in range(len(self.d.states)):
            if self.keep is None:
                out.update({f"KEEP{k}_": self.dummy, f"KT{k}": 0})
            else:
                kp = self.keep[k]
                ke = kp.expand(kp.shape[0], self.B, self.H)
                out.update({f"KEEP{k}_": ke, f"KT{k}": ke.stride(0) if kp.shape[0] > 1 else 0})
        return out

    def _launch(self, kernel, args: dict, has_dout: bool) -> None:
        from triton.runtime.errors import OutOfResources

        bh = _persistent_block_h(self.H)
        blocks = sum(z - a for a, z in self.pl.block_bounds)
        meta = {**self.meta, "HAS_DOUT": has_dout, "BLOCK_B": PERSISTENT_BLOCK_B, "BLOCK_H": bh,
                "IEEE": self.dtype == torch.float32, "num_warps": 4 if blocks * bh * bh <= 4096 else 8}
        base = {"XG_": self.xg, "OM_": self.p(self.omask), "T": self.T, **self._keep_args(),
                **{f"R{q}": r.contiguous() for q, r in enumerate(self.R_parts)},
                **{f"BR{q}": self.p(b) for q, b in enumerate(self.b_parts)}}
        values = [args.get(n, base.get(n, self.fixed.get(n, self.dummy))) for n in self.K.PERSISTENT_ARGS]
        try:
            with self.errstate():
                kernel[(_cdiv(self.B, PERSISTENT_BLOCK_B),)](*values, **meta)
        except OutOfResources as e:
            raise RuntimeError(
                f"backend='triton_persistent': this GPU cannot hold the recurrent weights on chip for "
                f"hidden_size={self.H}, dtype={self.dtype} ({e}); use bfloat16, a smaller hidden size or "
                f"backend='triton'") from e

    def forward(self, state0: State) -> tuple[Tensor, State]:
        T, B, H, dt, dev = self.T, self.B, self.H, self.dtype, self.device
        nodes = self.d.nodes
        args: dict = {}
        self.S = []
        for k, s0 in enumerate(state0):
            st = torch.empty(T + 1, B, H, dtype=self.acc, device=dev)
            st[0].copy_(s0)
            self.S.append(st)
            args[f"ST{k}_"] = st
        self.PIN = []
        for q, (p, (a, z)) in enumerate(zip(self.projs, self.pl.block_bounds)):
            pin = torch.empty(T + 1, B, H, dtype=dt, device=dev)
            src = nodes[nodes[p].args[0]]
            if src.op == "state":
                pin[0].copy_(self.masked(state0[src.index]))
            self.PIN.append(pin)
            args[f"PIN{q}_"] = pin
            args[f"HG{q}_"] = torch.empty(T, B, (z - a) * H, dtype=dt, device=dev)
        y = torch.empty(T, B, H, dtype=dt, device=dev)
        args["Y_"] = y
        self.args_fwd = args
        self._launch(self.K.persistent_fwd, args, False)
        return y, tuple(s[T] for s in self.S)

    def backward(self, dout: Tensor | None, dfinal: tuple[Tensor | None, ...]):
        GS, bufs = self.grad_buffers(dout, dfinal)
        G = [torch.stack([g, torch.empty_like(g)]) for g in GS]  # two slots, swapped every step
        args = {**self.args_fwd, **bufs, "DOUT_": self.p(None if dout is None else dout.contiguous()),
                "DXG_": self.dxg, **{f"G{k}_": g for k, g in enumerate(G)},
                **{f"D{q}_": d for q, d in enumerate(self.D)}}
        self._launch(self.K.persistent_bwd, args, dout is not None)
        return self.finish([g[self.T % 2] for g in G])


class _TritonRecurrence(torch.autograd.Function):
    """The recurrence of one layer/direction given input pre-activations ``xg`` (T, B, G*H)."""

    @staticmethod
    def forward(ctx, run_cls: type, cell: Cell, names: tuple[str, ...], masks: LayerMasks, xg: Tensor, R: Tensor,
                b_hh: Tensor | None, *rest: Tensor):
        n_state = cell.state_size
        extras = {n: v.contiguous() for n, v in zip(names, rest[n_state:]) if v is not None}
        run = run_cls(cell, masks, xg.contiguous(), R, b_hh, extras)
        run.save = any(ctx.needs_input_grad)
        y, final = run.forward(rest[:n_state])
        ctx.run, ctx.names, ctx.n_state = run, names, n_state
        return (y, *(s.to(xg.dtype, copy=True) for s in final))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor | None, *dfinal: Tensor | None):
        run = ctx.run
        ctx.run = None  # free the activations once used
        dxg, dR, db, dstate0, grads = run.backward(dout, dfinal)
        return (None, None, None, None, dxg, dR, db, *dstate0, *(grads.get(n) for n in ctx.names))


def apply(run_cls: type, cell: Cell, x: Tensor, state0: State, w: Weights, masks: LayerMasks):
    """Run ``cell`` over ``x`` with the runner class ``run_cls`` (its forward and backward)."""
    xg = cell.project_input(x, w)  # (T, B, G*H): one matmul for all steps, autograd handles dW
    names = tuple(cell.extra_shapes())
    out, *state = _TritonRecurrence.apply(run_cls, cell, names, masks, xg, w["weight_hh"], w["bias_hh"], *state0,
                                          *(w[n] for n in names))
    return out, tuple(state)


def _check_dtype(backend: str, x: Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if x.dtype not in dtypes:
        raise TypeError(f"backend={backend!r} runs the dtypes {[str(t) for t in dtypes]}, got {x.dtype}; use "
                        f"another dtype or another backend")


def run(cell: Cell, x: Tensor, state0: State, w: Weights, masks: LayerMasks) -> tuple[Tensor, State]:
    """Run one layer in one direction over ``x`` (T, B, I); returns outputs (T, B, H) and final state."""
    _check_dtype("triton", x, DTYPES)
    return apply(_Run, cell, x, state0, w, masks)


def run_persistent(cell: Cell, x: Tensor, state0: State, w: Weights, masks: LayerMasks) -> tuple[Tensor, State]:
    """As :func:`run`, with each time loop (forward, backward) in one persistent kernel (small H)."""
    _check_dtype("triton_persistent", x, PERSISTENT_DTYPES)
    return apply(_PersistentRun, cell, x, state0, w, masks)


def unsupported_persistent(cell: Cell, cfg: LayerConfig, device: torch.device) -> str | None:
    reason = unsupported(cell, cfg, device)
    if reason is not None:
        return reason
    bh = _persistent_block_h(cell.hidden_size)
    if cell.rec_gates * bh * bh > MAX_R_ELEMS:
        limit = max(h for h in (16, 32, 64, 128) if cell.rec_gates * h * h <= MAX_R_ELEMS)
        return (f"the persistent kernel keeps R on chip, which needs hidden_size <= {limit} for this cell "
                f"(got {cell.hidden_size}); use backend='triton'")
    return None


register(Backend("triton", "Triton kernels generated from the declaration, per step (CUDA)", unsupported, run,
                 DTYPES, Capability()), auto_before={"cuda": "bptt"})
register(Backend("triton_persistent", "generated Triton kernels, each time loop in one launch, R on chip (CUDA, "
                 "small H)", unsupported_persistent, run_persistent, PERSISTENT_DTYPES, Capability()))
