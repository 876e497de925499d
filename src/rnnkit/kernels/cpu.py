"""The fused CPU backend (``backend="cpu"``): the explicit-BPTT skeleton with the time loop compiled.

Same algorithm as :mod:`rnnkit.kernels.bptt` (input projection for all steps in one autograd matmul,
hand-derived backward, dR with one matmul over all steps), but each direction of the recurrence is
ONE call into numba (:mod:`rnnkit.kernels.cpu_cells`) that runs every step: a BLAS matmul into a
preallocated buffer plus the cell's pointwise math fused into one pass, with no Python or torch op
per step. What it keeps for the backward pass: the gates after activation, the c states (LSTM), the
layer-norm statistics, and the recurrent input only when recurrent dropout makes it differ from the
output (otherwise ``h0`` and the output itself are used).

Supports every cell and variant of :mod:`rnnkit.cells` (incl. recurrent dropout, zoneout and
variable lengths through :class:`~rnnkit.kernels.common.LayerMasks`) in float32 and float64 on
the CPU. Compiled code is cached on disk by numba (``cache=True``): the first call in a fresh
environment compiles (see :func:`compile_seconds`), later processes load the cache.

Threads: the per-step matmuls run in the BLAS that numba calls (scipy's OpenBLAS), with
``RNNKIT_CPU_THREADS`` threads (default 1: the per-step matmuls are small, and a multi-threaded
OpenBLAS stalled badly on the shared machine this was measured on; see :func:`_load_blas`).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
from torch import Tensor

from ..cells.base import Cell, State, Weights
from . import BACKENDS, Backend, LayerConfig, register
from .common import LayerMasks

DTYPES = (torch.float32, torch.float64)
_EXTRAS = ("weight_ch", "ln_weight_hh", "ln_weight_c", "ln_bias_c")


def _blas_threads_wanted() -> int:
    env = os.environ.get("RNNKIT_CPU_THREADS")
    return int(env) if env else 1


def _load_blas() -> None:
    """Load the BLAS numba's ``np.dot`` binds to (scipy's OpenBLAS) with its thread count set at start-up.

    OpenBLAS creates its thread pool when the library loads, and lowering the count later at run time
    did not stop it stalling here (some shapes fell from ~60 to ~0.1 GFLOP/s on the shared 2-core
    machine), so the count is fixed before loading, without changing the environment of anything else.
    """
    if "scipy.linalg.cython_blas" in sys.modules:
        return
    old = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = str(_blas_threads_wanted())
    try:
        import scipy.linalg.cython_blas  # noqa: F401
    finally:
        if old is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = old


class _BlasThreads:
    """Keeps the thread count of the BLAS that numba calls at ``RNNKIT_CPU_THREADS`` (default 1)."""

    def __init__(self) -> None:
        self.libs: list | None = None
        self.current = -1

    def ensure(self) -> None:
        want = _blas_threads_wanted()
        if want == self.current:
            return
        if self.libs is None:
            _load_blas()
            from threadpoolctl import ThreadpoolController

            ctl = ThreadpoolController()
            self.libs = [lc for lc in ctl.lib_controllers
                         if lc.internal_api == "openblas" and "scipy.libs" in lc.filepath]
        for lc in self.libs:
            if lc.num_threads != want:
                lc.set_num_threads(want)
        self.current = want


blas_threads = _BlasThreads()


def _kernels():
    """The numba loops, imported on first use (keeps ``import rnnkit`` light), after the BLAS is set up."""
    blas_threads.ensure()
    from . import cpu_cells

    return cpu_cells


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _rt(R: Tensor, T: int) -> np.ndarray:
    """R transposed, (H, rows): a C-ordered copy is faster per step; for one step the F view saves the copy."""
    return R.t().contiguous().numpy() if T > 1 else R.numpy().T


def _empty(*shape: int, dtype: torch.dtype) -> Tensor:
    return torch.empty(shape, dtype=dtype)


class _Arrays:
    """Mask and dummy arrays in the layout the compiled loops expect (one type signature each)."""

    def __init__(self, masks: LayerMasks, T: int, B: int, H: int, n_state: int, dtype: torch.dtype) -> None:
        ndt = np.float32 if dtype == torch.float32 else np.float64
        self.dummy1 = np.zeros(1, ndt)
        self.dummy2 = np.zeros((1, 1), ndt)
        self.dummy3 = np.zeros((1, 1, 1), ndt)
        self.has_hmask = masks.hmask is not None
        self.hmask = _np(masks.hmask) if self.has_hmask else self.dummy2
        self.has_keep = masks.keep is not None
        if self.has_keep:
            # (T or 1, B or 1, H or 1) -> (T, B, H) views with zero strides where broadcast
            self.keep = [k.detach().to(dtype).expand(T, B, H).numpy() for k in masks.keep]
        else:
            z = torch.zeros(1, 1, 1, dtype=dtype).expand(T, B, H).numpy()
            self.keep = [z] * n_state


class _CpuRecurrence(torch.autograd.Function):
    """The recurrence of one layer/direction given input pre-activations ``xg`` (T, B, G*H)."""

    @staticmethod
    def forward(ctx, cell: Cell, masks: LayerMasks, names: tuple[str, ...], xg: Tensor, R: Tensor,
                b_hh: Tensor | None, *rest: Tensor):
        K = _kernels()
        n_state = cell.state_size
        state0 = rest[:n_state]
        ex = {n: _np(t) for n, t in zip(names, rest[n_state:])}
        T, B, GH = xg.shape
        H, dt = cell.hidden_size, xg.dtype
        A = _Arrays(masks, T, B, H, n_state, dt)
        ln = cell.layer_norm
        xg_n = _np(xg)
        Rd = R.detach().contiguous()
        Rt = _rt(Rd, T)
        bhh = _np(b_hh) if b_hh is not None else np.zeros(GH, A.dummy1.dtype)
        ln_g = ex.get("ln_weight_hh", A.dummy1)
        h0 = _np(state0[0])
        out = _empty(T, B, H, dtype=dt)
        HIN = _empty(T, B, H, dtype=dt) if A.has_hmask else torch.empty(1, 1, 1, dtype=dt)
        parts = len(cell.rec_parts)
        UH = _empty(T, B, GH, dtype=dt) if ln else torch.empty(1, 1, 1, dtype=dt)
        RSH = _empty(T, B, parts, dtype=dt) if ln else torch.empty(1, 1, 1, dtype=dt)
        buf: dict[str, Tensor] = {"HIN": HIN, "UH": UH, "RSH": RSH}
        family = cell.family
        if family == "rnn":
            HC = _empty(T, B, H, dtype=dt) if A.has_keep else out
            K.rnn_forward(xg_n, Rt, bhh, cell.nonlinearity == "relu", ln, ln_g,
                          A.has_hmask, A.hmask, A.has_keep, A.keep[0], h0, out.numpy(), HC.numpy(),
                          HIN.numpy(), UH.numpy(), RSH.numpy())
            buf["HC"] = HC
        elif family == "lstm":
            CS = _empty(T + 1, B, H, dtype=dt)
            CS[0] = state0[1]
            CN = _empty(T, B, H, dtype=dt) if A.has_keep else CS[1:]
            GATES = _empty(T, B, GH, dtype=dt)
            UC = _empty(T, B, H, dtype=dt) if ln else torch.empty(1, 1, 1, dtype=dt)
            RSC = _empty(T, B, 1, dtype=dt) if ln else torch.empty(1, 1, 1, dtype=dt)
            K.lstm_forward(xg_n, Rt, bhh, cell.use_i, cell.use_f, cell.use_o,
                           cell.coupled, cell.peephole, ex.get("weight_ch", A.dummy1), cell.output_activation,
                           ln, ln_g, ex.get("ln_weight_c", A.dummy1), ex.get("ln_bias_c", A.dummy1),
                           A.has_hmask, A.hmask, A.has_keep, A.keep[0], A.keep[1], h0, out.numpy(),
                           CS.numpy(), CN.numpy(), HIN.numpy(), GATES.numpy(), UH.numpy(), RSH.numpy(),
                           UC.numpy(), RSC.numpy())
            buf.update(CS=CS, CN=CN, GATES=GATES, UC=UC, RSC=RSC)
        elif cell.reset_after:
            GATES = _empty(T, B, GH, dtype=dt)
            HN = _empty(T, B, H, dtype=dt)
            K.gru_forward(xg_n, Rt, bhh, ln, ln_g, A.has_hmask, A.hmask,
                          A.has_keep, A.keep[0], h0, out.numpy(), HIN.numpy(), GATES.numpy(), HN.numpy(),
                          UH.numpy(), RSH.numpy())
            buf.update(GATES=GATES, HN=HN)
        else:
            GATES = _empty(T, B, GH, dtype=dt)
            Q = _empty(T, B, H, dtype=dt)
            K.gru_cho_forward(xg_n, _rt(Rd[:2 * H], T), _rt(Rd[2 * H:], T),
                              bhh, ln, ln_g, A.has_hmask, A.hmask, A.has_keep, A.keep[0], h0, out.numpy(),
                              HIN.numpy(), Q.numpy(), GATES.numpy(), UH.numpy(), RSH.numpy())
            buf.update(GATES=GATES, Q=Q)
        final = [out[T - 1].clone()]
        if family == "lstm":
            final.append(buf["CS"][T].clone())
        if masks.out_mask is not None:
            result = out * masks.out_mask
            buf["out"] = out  # private: the unmasked h states
            ctx.save_for_backward()
        else:
            result = out
            ctx.save_for_backward(out)  # returned to the caller: autograd checks it is not modified
        ctx.cell, ctx.masks, ctx.names, ctx.arrays, ctx.buf = cell, masks, names, A, buf
        ctx.inputs = (Rd, b_hh is not None, bhh, ex, state0[0].detach())
        return (result, *final)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor | None, *dfinal: Tensor | None):
        K = _kernels()
        cell, masks, A, buf = ctx.cell, ctx.masks, ctx.arrays, ctx.buf
        Rd, has_bias, bhh, ex, h0t = ctx.inputs
        out = buf["out"] if "out" in buf else ctx.saved_tensors[0]
        T, B, H = out.shape
        dt = out.dtype
        GH = cell.gates * H
        ln = cell.layer_norm
        has_dout = dout is not None
        if has_dout and masks.out_mask is not None:
            dout = dout * masks.out_mask
        dout_n = _np(dout) if has_dout else A.dummy3
        dT = [_np(d) if d is not None else np.zeros((B, H), A.dummy1.dtype) for d in dfinal]
        h0 = h0t.numpy()
        ln_g = ex.get("ln_weight_hh", A.dummy1)
        dln_g = np.zeros(GH if ln else 1)
        DG = _empty(T, B, GH, dtype=dt)
        dh0 = _empty(B, H, dtype=dt)
        grads: dict[str, np.ndarray] = {}
        db_hh = None
        family = cell.family
        if family == "rnn":
            DRAW = buf["UH"] if ln else DG  # d(R h) overwrites u_hat step by step (no longer needed)
            K.rnn_backward(Rd.numpy(), cell.nonlinearity == "relu", ln, ln_g, A.has_hmask, A.hmask,
                           A.has_keep, A.keep[0], has_dout, dout_n, dT[0], buf["HC"].numpy(),
                           buf["UH"].numpy(), buf["RSH"].numpy(), DG.numpy(), DRAW.numpy(), dh0.numpy(), dln_g)
            dstate = [dh0]
            draws = [DRAW]
            if has_bias:
                db_hh = DG.sum((0, 1))
        elif family == "lstm":
            DRAW = buf["UH"] if ln else DG  # d(R h) overwrites u_hat step by step (no longer needed)
            dc0 = _empty(B, H, dtype=dt)
            dpeep = np.zeros(3 * H if cell.peephole else 1)
            dln_cg = np.zeros(H if ln else 1)
            dln_cb = np.zeros(H if ln else 1)
            K.lstm_backward(Rd.numpy(), cell.use_i, cell.use_f, cell.use_o, cell.coupled,
                            cell.peephole, ex.get("weight_ch", A.dummy1), cell.output_activation, ln, ln_g,
                            ex.get("ln_weight_c", A.dummy1), ex.get("ln_bias_c", A.dummy1), A.has_hmask,
                            A.hmask, A.has_keep, A.keep[0], A.keep[1], has_dout, dout_n, dT[0], dT[1],
                            buf["CS"].numpy(), buf["CN"].numpy(), buf["GATES"].numpy(), buf["UH"].numpy(),
                            buf["RSH"].numpy(), buf["UC"].numpy(), buf["RSC"].numpy(), DG.numpy(),
                            DRAW.numpy(), dh0.numpy(), dc0.numpy(), dpeep, dln_g, dln_cg, dln_cb)
            dstate = [dh0, dc0]
            draws = [DRAW]
            if has_bias:
                db_hh = DG.sum((0, 1))
            grads.update(weight_ch=dpeep, ln_weight_c=dln_cg, ln_bias_c=dln_cb)
        elif cell.reset_after:
            DPOST = _empty(T, B, GH, dtype=dt)
            DRAW = buf["UH"] if ln else DPOST  # overwrites u_hat step by step
            dbhh = np.zeros(GH)
            K.gru_backward(Rd.numpy(), ln, ln_g, A.has_hmask, A.hmask, A.has_keep, A.keep[0],
                           has_dout, dout_n, dT[0], h0, out.numpy(), buf["GATES"].numpy(), buf["HN"].numpy(),
                           buf["UH"].numpy(), buf["RSH"].numpy(), DG.numpy(), DPOST.numpy(), DRAW.numpy(),
                           dh0.numpy(), dbhh, dln_g)
            del DPOST
            dstate = [dh0]
            draws = [DRAW]
            if has_bias:
                db_hh = torch.from_numpy(dbhh).to(dt)
        else:
            DRAW0 = _empty(T, B, 2 * H, dtype=dt)
            DRAW1 = _empty(T, B, H, dtype=dt)
            K.gru_cho_backward(Rd[:2 * H].numpy(), Rd[2 * H:].numpy(), ln, ln_g,
                               A.has_hmask, A.hmask, A.has_keep, A.keep[0], has_dout, dout_n, dT[0], h0,
                               out.numpy(), buf["GATES"].numpy(), buf["UH"].numpy(), buf["RSH"].numpy(),
                               DG.numpy(), DRAW0.numpy(), DRAW1.numpy(), dh0.numpy(), dln_g)
            dstate = [dh0]
            draws = [DRAW0, DRAW1]
            if has_bias:
                db_hh = DG.sum((0, 1))
        grads["ln_weight_hh"] = dln_g
        # dR: one matmul over all steps per recurrent part, against that part's recurrent input
        dR_parts = []
        for part, D in enumerate(draws):
            g = D.shape[-1]
            if part == 1:  # Cho GRU: the n part's input is q = r * h * hmask
                X = buf["Q"]
                dR_parts.append(D.reshape(T * B, g).t() @ X.reshape(T * B, H))
            elif A.has_hmask:
                X = buf["HIN"]
                dR_parts.append(D.reshape(T * B, g).t() @ X.reshape(T * B, H))
            else:  # input is h0, then the outputs: no copy of them was kept
                h0m = h0t
                dR = D[0].t() @ h0m
                if T > 1:
                    dR.addmm_(D[1:].reshape((T - 1) * B, g).t(), out[:-1].reshape((T - 1) * B, H))
                dR_parts.append(dR)
        dR = dR_parts[0] if len(dR_parts) == 1 else torch.cat(dR_parts, 0)
        ctx.buf = ctx.arrays = ctx.inputs = None  # free the activations now
        extras = [torch.from_numpy(grads[n]).to(dt) for n in ctx.names]
        return (None, None, None, DG, dR, db_hh, *dstate, *extras)


def run(cell: Cell, x: Tensor, state0: State, w: Weights, masks: LayerMasks) -> tuple[Tensor, State]:
    """Run one layer in one direction over ``x`` (T, B, I); returns outputs (T, B, H) and final state."""
    if x.dtype not in DTYPES:
        others = [n for n in BACKENDS if n != "cpu"]
        raise TypeError(f"backend='cpu' runs float32 and float64 only, got dtype {x.dtype}; "
                        f"use another dtype or one of the backends {others}")
    if x.device.type != "cpu":
        raise ValueError(f"backend='cpu': input is on {x.device}; expected the CPU")
    blas_threads.ensure()
    xg = cell.project_input(x, w)  # (T, B, G*H): one matmul for all steps, autograd handles dW
    names = tuple(n for n in _EXTRAS if w.get(n) is not None)
    out, *state = _CpuRecurrence.apply(cell, masks, names, xg, w["weight_hh"], w["bias_hh"], *state0,
                                       *(w[n] for n in names))
    return out, tuple(state)


def _unsupported(cell: Cell, cfg: LayerConfig, device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the fused CPU backend runs on the CPU only, not on {device}"
    return None


def compile_seconds() -> dict[str, float]:
    """Compile (or load from numba's on-disk cache) every loop for float32 and float64, timed per family.

    Runs each cell family once on a tiny input through forward and backward.
    """
    from ..layers import build

    times = {}
    for name in ("rnn", "rnn_ln", "lstm_peephole", "lstm_ln", "lstm_zoneout", "gru", "gru_cho_ln"):
        t0 = time.perf_counter()
        for dt in DTYPES:
            layer = build(name, 3, 4, backend="cpu", dtype=dt)
            x = torch.randn(2, 2, 3, dtype=dt, requires_grad=True)
            out, _ = layer(x)
            out.sum().backward()
        times[name] = time.perf_counter() - t0
    return times


register(Backend("cpu", "fused CPU loops (numba + BLAS)", _unsupported, run), auto_before={"cpu": "bptt"})
