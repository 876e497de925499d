"""``backend="triton"``: explicit BPTT with fused Triton kernels for the pointwise math of every cell.

Same skeleton as :mod:`rnnkit.kernels.bptt`: the input projections of all steps come from one matmul
(``cell.project_input``, under autograd). Per time step, forward: one cuBLAS matmul
``hg = (h * hmask) R^T (+ b_hh)`` into a preallocated buffer, then ONE Triton kernel that does the
cell's whole pointwise step (gates, layer norms, zoneout / length mixing, output mask, the next
matmul's input). Backward: one kernel per step (the cell's hand-derived derivatives, recomputing the
step's activations from ``xg``, ``hg`` and the saved state), then one matmul ``D_t R`` that the next
kernel adds in; ``dR`` and ``db`` come from one matmul over all steps at the end. The Cho GRU
(``reset_after=False``) needs the reset gate before its second matmul, so it runs two kernels and two
matmuls per step in each direction.

States are carried in float32 whatever the input dtype; ``bfloat16`` inputs keep bf16 storage for
``xg``, the matmul operands and the outputs, with float32 math inside the kernels and float32
accumulation in cuBLAS.

``backend="triton_persistent"`` (:class:`_PersistentRun`, small H only) runs the whole forward and the
whole backward time loop each in one kernel launch, with R kept on chip; see ``docs/triton.md``.

Devices: CUDA only. For tests and debugging the kernels also run on the CPU under Triton's
interpreter: set ``TRITON_INTERPRET=1`` **and** ``RNNKIT_TRITON_CPU=1`` before the kernels are first
used (Triton decides at definition time whether a kernel is interpreted). Without both variables a
CPU tensor is refused with an error; triton is imported only when the backend first runs.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from ..cells.base import Cell, State, Weights
from . import Backend, LayerConfig, register
from .capability import Capability, hand_written_cell
from .common import LayerMasks

CPU_ENV = "RNNKIT_TRITON_CPU"


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


def _kernels(device: torch.device) -> ModuleType:
    """Import the kernel module; check that its mode (compiled / interpreted) can serve ``device``."""
    from . import triton_kernels as K

    if device.type == "cpu" and not K.INTERPRETED:
        raise RuntimeError("backend='triton' on the CPU needs Triton's interpreter, but the kernels were "
                           "already compiled for the GPU in this process: set TRITON_INTERPRET=1 before "
                           "the first use of the Triton backend")
    return K


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
    """Everything one layer/direction needs across forward and backward (kept on ``ctx``)."""

    def __init__(self, cell: Cell, masks: LayerMasks, xg: Tensor, R: Tensor, b_hh: Tensor | None,
                 extras: dict[str, Tensor]) -> None:
        self.cell, self.xg, self.R, self.b_hh, self.extras = cell, xg, R, b_hh, extras
        self.T, self.B = xg.shape[0], xg.shape[1]
        self.H = H = cell.hidden_size
        self.dtype, self.device = xg.dtype, xg.device
        self.K = _kernels(xg.device)
        self.ln = cell.layer_norm
        self.ln_bias = cell.layer_norm and b_hh is not None
        self.launch = _Launch.make(self.B, H, whole_rows=cell.layer_norm)
        self.hmask = None if masks.hmask is None else masks.hmask.contiguous()
        self.keep = masks.keep
        self.omask = None if masks.out_mask is None else masks.out_mask.reshape(self.T, self.B).contiguous()
        bounds = [0]
        for g in cell.rec_parts:
            bounds.append(bounds[-1] + g * H)
        self.R_parts = [R[a:z] for a, z in zip(bounds, bounds[1:])]
        self.Rt_parts = [r.t() for r in self.R_parts]
        rb = b_hh if cell.rec_bias else None
        self.b_parts = [None if rb is None else rb[a:z] for a, z in zip(bounds, bounds[1:])]
        self.dummy = xg

    # ---- small helpers -----------------------------------------------------------------------------
    def p(self, t: Tensor | None) -> Tensor:
        """A pointer argument; absent tensors are replaced by a dummy the kernel never reads."""
        return self.dummy if t is None else t

    def mm_rec(self, inp: Tensor, part: int, out: Tensor) -> None:
        """``out = inp R_part^T (+ b_part)``: the recurrent projection (cuBLAS on GPU)."""
        b = self.b_parts[part]
        if b is None:
            torch.mm(inp, self.Rt_parts[part], out=out)
        else:
            torch.addmm(b, inp, self.Rt_parts[part], out=out)

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

    def om_steps(self) -> Sequence[Tensor]:
        return self.steps(self.omask)

    def flags(self) -> dict:
        return {"HAS_KEEP": self.keep is not None, "HAS_OMASK": self.omask is not None,
                "HAS_HMASK": self.hmask is not None}

    def masked(self, h: Tensor) -> Tensor:
        return h if self.hmask is None else h * self.hmask

    def cell_flags(self) -> dict:
        c = self.cell
        if c.family == "lstm":
            return {"USE_I": c.use_i, "USE_F": c.use_f, "USE_O": c.use_o, "COUPLED": c.coupled,
                    "PEEP": c.peephole, "ACT": c.output_activation, "LN": self.ln, "LN_BIAS": self.ln_bias}
        if c.family == "rnn":
            return {"RELU": c.nonlinearity == "relu", "LN": self.ln, "LN_BIAS": self.ln_bias}
        return {"LN": self.ln, "LN_BIAS": self.ln_bias}

    # ---- forward -----------------------------------------------------------------------------------
    def buffers(self, n: int, shape: tuple[int, ...], dtype: torch.dtype, ring: int) -> tuple[Tensor, list[Tensor]]:
        """A (n, *shape) buffer and its n per-step views; without a backward to save for (inference), only
        ``ring`` slots, reused in turn (2 for a state read at t and written at t + 1, 1 for scratch)."""
        slots = n if self.save else min(n, ring)
        buf = torch.empty(slots, *shape, dtype=dtype, device=self.device)
        views = buf.unbind(0)
        return buf, (list(views) if slots == n else [views[t % slots] for t in range(n)])

    def forward(self, state0: State) -> tuple[Tensor, State]:
        T, B, H, dt, dev = self.T, self.B, self.H, self.dtype, self.device
        # S[k][t] is state component k before step t (float32); Hin[t] the matmul input of step t.
        self.S, self.S_steps = [], []
        for s0 in state0:
            buf, views = self.buffers(T + 1, (B, H), torch.float32, 2)
            views[0].copy_(s0)
            self.S.append(buf)
            self.S_steps.append(views)
        self.Hin, self.Hin_steps = self.buffers(T + 1, (B, H), dt, 2)
        self.Hin_steps[0].copy_(self.masked(state0[0]))
        y = torch.empty(T, B, H, dtype=dt, device=dev)
        fam = self.cell.family
        if fam == "gru" and not self.cell.reset_after:
            self._forward_cho(y)
        else:
            self._forward_one(y, fam)
        return y, tuple(v[T] for v in self.S_steps)

    def _forward_one(self, y: Tensor, fam: str) -> None:
        T, B, H, K, L = self.T, self.B, self.H, self.K, self.launch
        GH = self.cell.gates * H
        e, p = self.extras, self.p
        self.hg, hgs = self.buffers(T, (B, GH), self.dtype, 1)
        hm = p(self.hmask)
        flags = {**self.flags(), **self.cell_flags(), "WRITE_HIN": True, **L.meta}
        # Per-step views made up front (one unbind each): indexing in the loop costs more than the launch.
        xs, ys, hins, oms = self.xg.unbind(0), y.unbind(0), self.Hin_steps, self.om_steps()
        hs, cs = self.S_steps[0], self.S_steps[-1]
        khs, kh_b, kh_h = self.keep_steps(0)
        if fam == "lstm":
            kcs, kc_b, kc_h = self.keep_steps(1)
            launch = K.lstm_fwd[L.grid]
            w = (p(e.get("weight_ch")), p(e.get("ln_weight_hh")), p(self.b_hh), p(e.get("ln_weight_c")),
                 p(e.get("ln_bias_c")))
            for t in range(T):
                self.mm_rec(hins[t], 0, hgs[t])
                launch(xs[t], hgs[t], hs[t], cs[t], hs[t + 1], cs[t + 1], ys[t], hins[t + 1], hm, khs[t], kcs[t],
                       oms[t], *w, B, H, GH, GH, kh_b, kh_h, kc_b, kc_h, **flags)
        elif fam == "gru":
            launch = K.gru_fwd[L.grid]
            w = (p(e.get("ln_weight_hh")), p(self.b_hh))
            for t in range(T):
                self.mm_rec(hins[t], 0, hgs[t])
                launch(xs[t], hgs[t], hs[t], hs[t + 1], ys[t], hins[t + 1], hm, khs[t], oms[t], *w, B, H, GH, GH,
                       kh_b, kh_h, **flags)
        else:
            launch = K.rnn_fwd[L.grid]
            w = (p(e.get("ln_weight_hh")), p(self.b_hh))
            for t in range(T):
                self.mm_rec(hins[t], 0, hgs[t])
                launch(xs[t], hgs[t], hs[t], hs[t + 1], ys[t], hins[t + 1], hm, khs[t], oms[t], *w, B, H,
                       kh_b, kh_h, **flags)

    def _forward_cho(self, y: Tensor) -> None:
        T, B, H, K, L = self.T, self.B, self.H, self.K, self.launch
        e, p = self.extras, self.p
        dt = self.dtype
        self.hg, hgs = self.buffers(T, (B, 2 * H), dt, 1)   # raw (r, z) projections
        self.hn, hns = self.buffers(T, (B, H), dt, 1)       # raw n projections
        self.Q, qs = self.buffers(T, (B, H), dt, 1)         # r * h * hmask, input of R_n
        hm = p(self.hmask)
        lnw, bhh = p(e.get("ln_weight_hh")), p(self.b_hh)
        cf = self.cell_flags()
        flags_a = {"HAS_HMASK": self.hmask is not None, **cf, **L.meta}
        flags_b = {"WRITE_HIN": True, **self.flags(), **cf, **L.meta}
        xs, ys, hins, hs, oms = self.xg.unbind(0), y.unbind(0), self.Hin_steps, self.S_steps[0], self.om_steps()
        khs, kh_b, kh_h = self.keep_steps(0)
        launch_a, launch_b = K.cho_fwd_a[L.grid], K.cho_fwd_b[L.grid]
        for t in range(T):
            self.mm_rec(hins[t], 0, hgs[t])
            launch_a(xs[t], hgs[t], hs[t], qs[t], hm, lnw, bhh, B, H, 3 * H, **flags_a)
            self.mm_rec(qs[t], 1, hns[t])
            launch_b(xs[t], hgs[t], hns[t], hs[t], hs[t + 1], ys[t], hins[t + 1], hm, khs[t], oms[t], lnw, bhh,
                     B, H, 3 * H, kh_b, kh_h, **flags_b)


    # ---- backward ----------------------------------------------------------------------------------
    def backward(self, dout: Tensor | None, dfinal: tuple[Tensor | None, ...]):
        T, B, H, dt, dev = self.T, self.B, self.H, self.dtype, self.device
        f32 = torch.float32
        cell = self.cell
        GH = cell.gates * H
        acc_names = ["ln_weight_hh", "bias_hh", "weight_ch", "ln_weight_c", "ln_bias_c"]
        sizes = {"ln_weight_hh": GH, "bias_hh": GH, "weight_ch": 3 * H, "ln_weight_c": H, "ln_bias_c": H}
        wanted = {"ln_weight_hh": self.ln, "bias_hh": self.ln_bias, "weight_ch": "weight_ch" in self.extras,
                  "ln_weight_c": self.ln and cell.family == "lstm", "ln_bias_c": self.ln and cell.family == "lstm"}
        self.acc = {n: torch.zeros(B, sizes[n], dtype=f32, device=dev) for n in acc_names if wanted[n]}
        # Fresh float32 copies: the kernels update these in place, and autograd may hand the same gradient
        # tensor to several consumers.
        d_acc = [torch.zeros(B, H, dtype=f32, device=dev) if d is None
                 else d.to(dtype=f32, memory_format=torch.contiguous_format, copy=True) for d in dfinal]
        dout = None if dout is None else dout.contiguous()
        dxg = torch.empty(T, B, GH, dtype=dt, device=dev)
        if cell.family == "gru" and not cell.reset_after:
            dmm, dR, db = self._backward_cho(dout, d_acc, dxg)
        else:
            dmm, dR, db = self._backward_one(dout, d_acc, dxg)
        # Gradient w.r.t. the initial state: the direct part plus the last matmul term (None: already added).
        dh0 = d_acc[0] if dmm is None else d_acc[0] + self.masked(dmm.to(f32))
        dstate0 = [dh0.to(dt)] + [d.to(dt) for d in d_acc[1:]]
        if self.ln_bias:
            db = self.acc["bias_hh"].sum(0).to(dt)
        grads = {n: a.sum(0).to(dt) for n, a in self.acc.items() if n != "bias_hh"}
        return dxg, dR, db, dstate0, grads

    def _backward_one(self, dout, d_acc, dxg):
        T, B, H, K, L = self.T, self.B, self.H, self.K, self.launch
        cell, e, p = self.cell, self.extras, self.p
        fam = cell.family
        GH = cell.gates * H
        # D[t]: gradient w.r.t. the raw recurrent projection; dxg itself unless LN or the GRU's r * hn.
        D = dxg if (not self.ln and fam != "gru") else torch.empty_like(dxg)
        dmm = torch.empty(B, H, dtype=self.dtype, device=self.device)
        hm, a = p(self.hmask), self.acc
        base = {**self.flags(), **self.cell_flags(), "HAS_DY": dout is not None, **L.meta}
        flags = {False: {**base, "HAS_DMM": False}, True: {**base, "HAS_DMM": True}}
        xs, hgs, dxs, Ds, oms = self.xg.unbind(0), self.hg.unbind(0), dxg.unbind(0), D.unbind(0), self.om_steps()
        dys = self.steps(dout)
        hs, cs = self.S[0].unbind(0), self.S[-1].unbind(0)
        khs, kh_b, kh_h = self.keep_steps(0)
        R0 = self.R_parts[0]
        if fam == "lstm":
            kcs, kc_b, kc_h = self.keep_steps(1)
            launch = K.lstm_bwd[L.grid]
            w = (p(a.get("weight_ch")), p(a.get("ln_weight_hh")), p(a.get("bias_hh")), p(a.get("ln_weight_c")),
                 p(a.get("ln_bias_c")), p(e.get("weight_ch")), p(e.get("ln_weight_hh")), p(self.b_hh),
                 p(e.get("ln_weight_c")), p(e.get("ln_bias_c")))
            for t in range(T - 1, -1, -1):
                launch(xs[t], hgs[t], cs[t], d_acc[0], d_acc[1], dmm, dys[t], oms[t], hm, khs[t], kcs[t], dxs[t],
                       Ds[t], *w, B, H, GH, GH, kh_b, kh_h, kc_b, kc_h, **flags[t < T - 1])
                torch.mm(Ds[t], R0, out=dmm)
        elif fam == "gru":
            launch = K.gru_bwd[L.grid]
            w = (p(a.get("ln_weight_hh")), p(a.get("bias_hh")), p(e.get("ln_weight_hh")), p(self.b_hh))
            for t in range(T - 1, -1, -1):
                launch(xs[t], hgs[t], hs[t], d_acc[0], dmm, dys[t], oms[t], hm, khs[t], dxs[t], Ds[t], *w,
                       B, H, GH, GH, kh_b, kh_h, **flags[t < T - 1])
                torch.mm(Ds[t], R0, out=dmm)
        else:
            launch = K.rnn_bwd[L.grid]
            w = (p(a.get("ln_weight_hh")), p(a.get("bias_hh")), p(e.get("ln_weight_hh")), p(self.b_hh))
            for t in range(T - 1, -1, -1):
                launch(xs[t], hgs[t], d_acc[0], dmm, dys[t], oms[t], hm, khs[t], dxs[t], Ds[t], *w,
                       B, H, kh_b, kh_h, **flags[t < T - 1])
                torch.mm(Ds[t], R0, out=dmm)
        Df = D.reshape(T * B, GH)
        dR = Df.t() @ self.Hin[:T].reshape(T * B, H)
        db = Df.sum(0) if self.b_parts[0] is not None else None
        return dmm, dR, db

    def _backward_cho(self, dout, d_acc, dxg):
        T, B, H, K, L = self.T, self.B, self.H, self.K, self.launch
        e, p = self.extras, self.p
        dt, dev = self.dtype, self.device
        D0 = torch.empty(T, B, 2 * H, dtype=dt, device=dev)
        D1 = torch.empty(T, B, H, dtype=dt, device=dev)
        dmm = torch.empty(B, H, dtype=dt, device=dev)
        dq = torch.empty(B, H, dtype=dt, device=dev)
        dz = torch.empty(B, H, dtype=torch.float32, device=dev)
        hm, a = p(self.hmask), self.acc
        lnw, bhh = p(e.get("ln_weight_hh")), p(self.b_hh)
        acc_ln, acc_b = p(a.get("ln_weight_hh")), p(a.get("bias_hh"))
        cf = self.cell_flags()
        base_b = {"HAS_DY": dout is not None, **self.flags(), **cf, **L.meta}
        flags_b = {False: {**base_b, "HAS_DMM": False}, True: {**base_b, "HAS_DMM": True}}
        flags_a = {"HAS_HMASK": self.hmask is not None, **cf, **L.meta}
        xs, hgs, hns, hs = self.xg.unbind(0), self.hg.unbind(0), self.hn.unbind(0), self.S[0].unbind(0)
        dxs, D0s, D1s, dys, oms = dxg.unbind(0), D0.unbind(0), D1.unbind(0), self.steps(dout), self.om_steps()
        khs, kh_b, kh_h = self.keep_steps(0)
        launch_a, launch_b = K.cho_bwd_a[L.grid], K.cho_bwd_b[L.grid]
        R_rz, R_n = self.R_parts
        for t in range(T - 1, -1, -1):
            launch_b(xs[t], hgs[t], hns[t], hs[t], d_acc[0], dz, dmm, dys[t], oms[t], hm, khs[t], dxs[t], D1s[t],
                     acc_ln, acc_b, lnw, bhh, B, H, 3 * H, kh_b, kh_h, **flags_b[t < T - 1])
            torch.mm(D1s[t], R_n, out=dq)
            launch_a(xs[t], hgs[t], hs[t], dq, d_acc[0], dz, hm, dxs[t], D0s[t], acc_ln, acc_b, lnw, bhh,
                     B, H, 3 * H, **flags_a)
            torch.mm(D0s[t], R_rz, out=dmm)
        dR = torch.cat([D0.reshape(T * B, 2 * H).t() @ self.Hin[:T].reshape(T * B, H),
                        D1.reshape(T * B, H).t() @ self.Q.reshape(T * B, H)], 0)
        db = None
        if self.b_parts[0] is not None:
            db = torch.cat([D0.sum((0, 1)), D1.sum((0, 1))])
        return dmm, dR, db


# Persistent variant: the G recurrent weight tiles of one program must fit on chip (registers / shared
# memory): G * BLOCK_H^2 <= MAX_R_ELEMS with BLOCK_H = next power of two >= H (and >= 16, tl.dot's minimum),
# i.e. H <= 64 for LSTM and GRU, H <= 128 for the Elman RNN.
MAX_R_ELEMS = 16384
PERSISTENT_BLOCK_B = 16


def _persistent_block_h(H: int) -> int:
    return max(16, _pow2(H))


class _PersistentRun(_Run):
    """Forward and backward each in ONE launch: the time loops run inside the kernels, R stays on chip."""

    def forward(self, state0: State) -> tuple[Tensor, State]:
        T, B, H, dt, dev = self.T, self.B, self.H, self.dtype, self.device
        cell, e, p = self.cell, self.extras, self.p
        f32 = torch.float32
        cho = cell.family == "gru" and not cell.reset_after
        G = cell.gates
        self.S = [torch.empty(T + 1, B, H, dtype=f32, device=dev) for _ in state0]
        for s, s0 in zip(self.S, state0):
            s[0].copy_(s0)
        y = torch.empty(T, B, H, dtype=dt, device=dev)
        save = self.save
        self.Hin = torch.empty(T + 1 if save else 1, B, H, dtype=dt, device=dev)
        self.Hin[0].copy_(self.masked(state0[0]))
        s_hg = (2 if cho else G) * H
        self.hg = torch.empty(T if save else 1, B, s_hg, dtype=dt, device=dev)
        if cho:
            self.Q = torch.empty(T if save else 1, B, H, dtype=dt, device=dev)
            self.hn = torch.empty(T if save else 1, B, H, dtype=dt, device=dev)
        kargs = self._keep_seq_args()
        flags = {**self._persistent_flags(), "REC_BIAS": cell.rec_bias}
        bh = _persistent_block_h(H)
        rb = self.b_hh if cell.rec_bias else None
        self._launch_persistent(self.K.persistent_fwd,
            self.xg, self.R.contiguous(), p(rb), self.S[0], self.S[-1], y, self.Hin, self.hg,
            p(getattr(self, "Q", None)), p(getattr(self, "hn", None)), p(self.hmask), kargs[0], kargs[4],
            p(None if self.omask is None else self.omask), p(e.get("weight_ch")), p(e.get("ln_weight_hh")),
            p(self.b_hh), p(e.get("ln_weight_c")), p(e.get("ln_bias_c")), T, B, H, s_hg, *kargs[1:4], *kargs[5:8],
            G=G, **flags, **self.flags(), SAVE=save, BLOCK_B=PERSISTENT_BLOCK_B, BLOCK_H=bh,
            num_warps=4 if G * bh * bh <= 4096 else 8, enable_fp_fusion=True)
        return y, tuple(s[T] for s in self.S)

    def _launch_persistent(self, kernel, *args, **kw) -> None:
        """Launch on one program per 16 sequences; a GPU without the shared memory it needs is an error."""
        from triton.runtime.errors import OutOfResources

        try:
            kernel[(_cdiv(self.B, PERSISTENT_BLOCK_B),)](*args, **kw)
        except OutOfResources as e:
            raise RuntimeError(
                f"backend='triton_persistent': this GPU cannot hold the recurrent weights on chip for "
                f"hidden_size={self.H}, dtype={self.dtype} ({e}); use bfloat16, a smaller hidden size or "
                f"backend='triton'") from e

    def _keep_seq_args(self) -> list:
        """(keep, t stride, b stride, h stride) for h and c; stride 0 where the mask broadcasts."""
        keep = [None, None] if self.keep is None else list(self.keep) + [None]
        kargs = []
        for k in keep[:2]:
            if k is None:
                kargs += [self.dummy, 0, 0, 0]
            else:
                ke = k.expand(k.shape[0], self.B, self.H)
                kargs += [ke, ke.stride(0) if k.shape[0] > 1 else 0, ke.stride(1), ke.stride(2)]
        return kargs

    def _persistent_flags(self) -> dict:
        cell = self.cell
        lstm = cell.family == "lstm"
        cho = cell.family == "gru" and not cell.reset_after
        return {"FAMILY": {"rnn": 0, "lstm": 1, "gru": 3 if cho else 2}[cell.family],
                "USE_I": lstm and cell.use_i, "USE_F": lstm and cell.use_f, "USE_O": lstm and cell.use_o,
                "COUPLED": lstm and cell.coupled, "PEEP": lstm and cell.peephole,
                "ACT": lstm and cell.output_activation, "RELU": cell.family == "rnn" and cell.nonlinearity == "relu",
                "LN": self.ln, "LN_BIAS": self.ln_bias}

    def _backward_one(self, dout, d_acc, dxg):
        return self._backward_persistent(dout, d_acc, dxg)

    def _backward_cho(self, dout, d_acc, dxg):
        return self._backward_persistent(dout, d_acc, dxg)

    def _backward_persistent(self, dout, d_acc, dxg):
        """The whole reverse time loop in one launch; updates ``d_acc`` to the initial-state gradients."""
        T, B, H, dt, dev = self.T, self.B, self.H, self.dtype, self.device
        cell, e, p, a = self.cell, self.extras, self.p, self.acc
        cho = cell.family == "gru" and not cell.reset_after
        G = cell.gates
        s_hg = (2 if cho else G) * H
        store_d = self.ln or cell.family == "gru"  # else D (d of the raw projection) is d xg itself
        D = torch.empty(T, B, s_hg, dtype=dt, device=dev) if store_d else dxg
        D1 = torch.empty(T, B, H, dtype=dt, device=dev) if cho else None
        kargs = self._keep_seq_args()
        bh = _persistent_block_h(H)
        self._launch_persistent(self.K.persistent_bwd,
            self.xg, self.hg, p(getattr(self, "hn", None)), self.S[0], self.S[-1], p(dout), p(self.omask),
            p(self.hmask), kargs[0], kargs[4], self.R.contiguous(), dxg, D, p(D1), d_acc[0], d_acc[-1],
            p(a.get("weight_ch")), p(a.get("ln_weight_hh")), p(a.get("bias_hh")), p(a.get("ln_weight_c")),
            p(a.get("ln_bias_c")), p(e.get("weight_ch")), p(e.get("ln_weight_hh")), p(self.b_hh),
            p(e.get("ln_weight_c")), p(e.get("ln_bias_c")), T, B, H, s_hg, *kargs[1:4], *kargs[5:8],
            G=G, **self._persistent_flags(), **self.flags(), STORE_D=store_d, HAS_DY=dout is not None,
            BLOCK_B=PERSISTENT_BLOCK_B, BLOCK_H=bh, num_warps=4 if G * bh * bh <= 4096 else 8,
            enable_fp_fusion=True)
        Hin = self.Hin[:T].reshape(T * B, H)
        if cho:
            dR = torch.cat([D.reshape(T * B, 2 * H).t() @ Hin, D1.reshape(T * B, H).t() @ self.Q.reshape(T * B, H)])
            db = torch.cat([D.sum((0, 1)), D1.sum((0, 1))]) if self.b_parts[0] is not None else None
        else:
            Df = D.reshape(T * B, G * H)
            dR = Df.t() @ Hin
            db = Df.sum(0) if self.b_parts[0] is not None else None
        return None, dR, db


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


def _apply(run_cls: type, cell: Cell, x: Tensor, state0: State, w: Weights, masks: LayerMasks):
    cell = hand_written_cell(cell)
    xg = cell.project_input(x, w)  # (T, B, G*H): one matmul for all steps, autograd handles dW
    names = tuple(cell.extra_shapes())
    out, *state = _TritonRecurrence.apply(run_cls, cell, names, masks, xg, w["weight_hh"], w["bias_hh"], *state0,
                                          *(w[n] for n in names))
    return out, tuple(state)


def run(cell: Cell, x: Tensor, state0: State, w: Weights, masks: LayerMasks) -> tuple[Tensor, State]:
    """Run one layer in one direction over ``x`` (T, B, I); returns outputs (T, B, H) and final state."""
    return _apply(_Run, cell, x, state0, w, masks)


def run_persistent(cell: Cell, x: Tensor, state0: State, w: Weights, masks: LayerMasks) -> tuple[Tensor, State]:
    """As :func:`run`, with the forward time loop in one persistent kernel (small H only)."""
    return _apply(_PersistentRun, cell, x, state0, w, masks)


def unsupported_persistent(cell: Cell, cfg: LayerConfig, device: torch.device) -> str | None:
    reason = unsupported(cell, cfg, device)
    if reason is not None:
        return reason
    bh = _persistent_block_h(cell.hidden_size)
    if cell.gates * bh * bh > MAX_R_ELEMS:
        limit = max(h for h in (16, 32, 64, 128, 256) if cell.gates * h * h <= MAX_R_ELEMS)
        return (f"the persistent kernel keeps R on chip, which needs hidden_size <= {limit} for this cell "
                f"(got {cell.hidden_size}); use backend='triton'")
    return None


register(Backend("triton", "fused Triton kernels per step (CUDA)", unsupported, run,
                 capability=Capability(hand_written=True)), auto_before={"cuda": "bptt"})
register(Backend("triton_persistent", "Triton, forward in one persistent kernel, R on chip (CUDA, small H)",
                 unsupported_persistent, run_persistent, capability=Capability(hand_written=True)))
