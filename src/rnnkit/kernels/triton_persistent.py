"""``backend="triton_persistent"``: hand-written Triton kernels that run a whole time loop in one launch.

Forward and backward each run in one kernel launch (``persistent_fwd`` / ``persistent_bwd`` of
:mod:`rnnkit.kernels.triton_kernels`), with the recurrent weights kept on chip and the recurrent matmul
done by ``tl.dot``. These kernels are written by hand for rnnkit's built-in RNN, LSTM and GRU variants
(the declarations :func:`~rnnkit.kernels.capability.hand_written` recognises, read through the built-in
cell's variant flags) and for small H only; every other declaration is refused, and ``auto`` never picks
this backend. The per-step ``triton`` backend runs every declaration with kernels generated from it.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from ..cells.base import Cell, State, Weights
from . import Backend, LayerConfig, register
from .capability import Capability, hand_written_cell
from .common import LayerMasks
from .triton_backend import _cdiv, _pow2, apply, check_mode, unsupported

# Persistent variant: the G recurrent weight tiles of one program must fit on chip (registers / shared
# memory): G * BLOCK_H^2 <= MAX_R_ELEMS with BLOCK_H = next power of two >= H (and >= 16, tl.dot's minimum),
# i.e. H <= 64 for LSTM and GRU, H <= 128 for the Elman RNN.
MAX_R_ELEMS = 16384
PERSISTENT_BLOCK_B = 16


def _persistent_block_h(H: int) -> int:
    return max(16, _pow2(H))


def _kernels(device: torch.device) -> ModuleType:
    """The hand-written kernel module (imports triton: only when the backend runs), checked against ``device``."""
    from . import triton_kernels

    return check_mode(triton_kernels, device)


class _PersistentRun:
    """Forward and backward each in ONE launch: the time loops run inside the kernels, R stays on chip."""

    def __init__(self, cell: Cell, masks: LayerMasks, xg: Tensor, R: Tensor, b_hh: Tensor | None,
                 extras: dict[str, Tensor]) -> None:
        self.cell, self.xg, self.R, self.b_hh, self.extras = cell, xg, R, b_hh, extras
        self.T, self.B = xg.shape[0], xg.shape[1]
        self.H = H = cell.hidden_size
        self.dtype, self.device = xg.dtype, xg.device
        self.K = _kernels(xg.device)
        self.ln = cell.layer_norm
        self.ln_bias = cell.layer_norm and b_hh is not None
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

    def p(self, t: Tensor | None) -> Tensor:
        """A pointer argument; absent tensors are replaced by a dummy the kernel never reads."""
        return self.dummy if t is None else t

    def flags(self) -> dict:
        return {"HAS_KEEP": self.keep is not None, "HAS_OMASK": self.omask is not None,
                "HAS_HMASK": self.hmask is not None}

    def masked(self, h: Tensor) -> Tensor:
        return h if self.hmask is None else h * self.hmask

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
        dR, db = self._backward_persistent(dout, d_acc, dxg)  # leaves the initial-state gradients in d_acc
        dstate0 = [d.to(dt) for d in d_acc]
        if self.ln_bias:
            db = self.acc["bias_hh"].sum(0).to(dt)
        grads = {n: a.sum(0).to(dt) for n, a in self.acc.items() if n != "bias_hh"}
        return dxg, dR, db, dstate0, grads

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
        return dR, db




def run_persistent(cell: Cell, x: Tensor, state0: State, w: Weights, masks: LayerMasks) -> tuple[Tensor, State]:
    """As :func:`rnnkit.kernels.triton_backend.run`, with each time loop in one persistent kernel (small H)."""
    return apply(_PersistentRun, hand_written_cell(cell), x, state0, w, masks)


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


BACKEND = Backend("triton_persistent", "Triton, forward in one persistent kernel, R on chip (CUDA, small H)",
                  unsupported_persistent, run_persistent, capability=Capability(hand_written=True))
register(BACKEND)
