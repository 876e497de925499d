"""Numba time loops of the fused CPU backend: one forward and one backward per cell family.

Each function runs a whole sequence of one layer/direction in compiled code: per step one BLAS
matmul (``np.dot`` into a preallocated buffer) and the cell's pointwise math fused into one pass
over (B, H), working in place. The math re-expresses the equations in the docstrings of
:class:`rnnkit.cells.ElmanCell`, :class:`rnnkit.cells.LSTMCell` and :class:`rnnkit.cells.GRUCell`
(the torch cells remain the definition; ``tests/test_kernels_cpu.py`` proves equality with the
``reference`` backend). :mod:`rnnkit.kernels.cpu` owns buffers, autograd and the weight gradients.

Conventions shared by every function (all arrays C-contiguous unless said otherwise, one dtype):
    xg      (T, B, G*H) input pre-activations ``W x_t + b_ih`` (layer-normed if the cell says so).
    W       the recurrent weight as a pair ``(matrix, packed)`` for :func:`_matmul`: forward ``R^T``
            (H, G*H), backward ``R`` (G*H, H) as stored.
    bhh     (G*H,) recurrent bias, added after the (optional) layer norm; zeros when the cell has none.
    hmask   (B, H) recurrent-dropout scale on h before the matmul (``has_hmask``).
    keep_*  (T, B, H), possibly with zero strides: ``state = keep * prev + (1 - keep) * cell`` (``has_keep``).
    out     (T, B, H) the h state after every step (the layer applies its output mask afterwards).
    HIN     (T, B, H) the recurrent matmul's input ``h_{t-1} * hmask``; only written when ``has_hmask``
            (otherwise the input is ``h0`` / ``out[t-1]`` and the wrapper rebuilds it for dR).
    UH, RSH layer-norm ``u_hat`` (T, B, G*H) and ``1/std`` (T, B, parts) of the recurrent projection.
Backward outputs: ``DG`` (T, B, G*H) = d xg; ``DRAW`` = d(raw recurrent matmul output), which the
wrapper turns into dR with one matmul over all steps; small parameter gradients are accumulated here.

Rows: every loop runs batch rows ``b0:b1`` only (the last two arguments). The rows of a batch never
interact in a recurrence, so the wrapper runs disjoint row ranges on separate threads (the loops
release the GIL) with no synchronisation per step; each range gets its own parameter-gradient
accumulators. Per step, each loop takes C-contiguous (rows, width) views ``X[t, b0:b1]``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.core.types import ExternalFunction
from numba.extending import overload

from ..cells.base import LN_EPS

_JIT = {"fastmath": True, "cache": True, "nogil": True, "error_model": "numpy"}


# ---- shared helpers -------------------------------------------------------------------------------

# Eigen's rational approximation of tanh for float32 (|error| < 3e-7 on the clamped range), as
# float32 constants so that the arithmetic stays in float32 (twice the SIMD lanes of float64).
_T_CLAMP, _A13, _A11, _A9, _A7, _A5, _A3, _A1, _B6, _B4, _B2, _B0 = (np.float32(v) for v in (
    7.90531110763549805, -2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
    5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03,
    1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03))
_HALF = np.float32(0.5)


@njit(fastmath=True, cache=True, inline="always", error_model="numpy")
def _tanh_f32(x):
    """tanh for float32: pure arithmetic, so LLVM vectorizes the loops around it (libm calls are scalar)."""
    x = min(max(x, -_T_CLAMP), _T_CLAMP)
    x2 = x * x
    p = x2 * _A13 + _A11
    p = x2 * p + _A9
    p = x2 * p + _A7
    p = x2 * p + _A5
    p = x2 * p + _A3
    p = x2 * p + _A1
    q = x2 * _B6 + _B4
    q = x2 * q + _B2
    q = x2 * q + _B0
    return x * p / q


def _tanh(x, like):
    """tanh(x) at the precision of ``like``'s dtype (compiled per dtype, see the overload)."""
    return math.tanh(x)


def _sigmoid(x, like):
    """1 / (1 + exp(-x)) at the precision of ``like``'s dtype."""
    return 1.0 / (1.0 + math.exp(-x))


@overload(_tanh, inline="always")
def _tanh_impl(x, like):
    if like.dtype == types.float32:
        return lambda x, like: _tanh_f32(x)
    return lambda x, like: math.tanh(x)


@overload(_sigmoid, inline="always")
def _sigmoid_impl(x, like):
    if like.dtype == types.float32:
        return lambda x, like: _HALF + _HALF * _tanh_f32(_HALF * x)
    return lambda x, like: 1.0 / (1.0 + math.exp(-x))


# MKL's packed single-precision GEMM, from the MKL that torch's own library carries (the wrapper
# registers these symbols with LLVM before this module compiles: the real ones when torch exports them,
# otherwise stubs that are never called). Pointers are passed as addresses (intp), which is the same
# calling convention on 64-bit platforms, so the compiled code caches across processes.
_sgemm_compute = ExternalFunction("cblas_sgemm_compute", types.void(
    types.intc, types.intc, types.intc, types.intc, types.intc, types.intc, types.intp, types.intc,
    types.intp, types.intc, types.float32, types.intp, types.intc))
_mkl_threads_local = ExternalFunction("MKL_Set_Num_Threads_Local", types.intc(types.intc))
_ROW_MAJOR, _NO_TRANS, _PACKED = 101, 111, 151


@njit(**_JIT)
def _matmul(a, W, out):
    """``out <- a @ M`` for ``W = (M, packed)``.

    With a packed copy (float32 only; ``packed.size > 1``) through MKL's ``cblas_sgemm_compute`` on
    this thread alone: the weights were reordered once per call of the layer, not once per step as a
    plain GEMM does, which is most of the cost when ``a`` has few rows. Otherwise ``np.dot`` (numba's
    BLAS, scipy's OpenBLAS).
    """
    M, packed = W
    if packed.size > 1:
        m, k = a.shape
        n = out.shape[1]
        prev = _mkl_threads_local(1)
        _sgemm_compute(_ROW_MAJOR, _NO_TRANS, _PACKED, m, n, k, a.ctypes.data, k, packed.ctypes.data, n,
                       np.float32(0.0), out.ctypes.data, n)
        _mkl_threads_local(prev)
    else:
        np.dot(a, M, out)


@njit(**_JIT)
def _ln_rows(v, n, gain, goff, uh, rs, k):
    """In place on rows of ``v`` (B, n): v <- gain * u_hat; saves u_hat and 1/std.

    ``gain`` and ``uh`` columns are offset by ``goff`` (a part of a longer projection); ``rs[:, k]``.
    """
    for b in range(v.shape[0]):
        mu = 0.0
        for j in range(n):
            mu += v[b, j]
        mu /= n
        var = 0.0
        for j in range(n):
            d = v[b, j] - mu
            var += d * d
        r = 1.0 / math.sqrt(var / n + LN_EPS)
        rs[b, k] = r
        for j in range(n):
            u = (v[b, j] - mu) * r
            uh[b, goff + j] = u
            v[b, j] = u * gain[goff + j]


@njit(**_JIT)
def _ln_rows_backward(dy, n, gain, goff, uh, rs, k, dx, dgain):
    """Backward of :func:`_ln_rows`: dx (B, n) <- d(input); dgain[goff:] += sum_b dy * u_hat."""
    for b in range(dy.shape[0]):
        mg = 0.0
        mgu = 0.0
        for j in range(n):
            g = dy[b, j] * gain[goff + j]
            u = uh[b, goff + j]
            mg += g
            mgu += g * u
            dgain[goff + j] += dy[b, j] * u
        mg /= n
        mgu /= n
        r = rs[b, k]
        for j in range(n):
            dx[b, j] = r * (dy[b, j] * gain[goff + j] - mg - uh[b, goff + j] * mgu)


@njit(**_JIT)
def _rec_input(t, h0, out, hmask, has_hmask, HIN, b0, b1):
    """Rows b0:b1 of the recurrent matmul's input at step t: ``h_{t-1}`` (times ``hmask``, then kept in HIN)."""
    src = h0[b0:b1] if t == 0 else out[t - 1, b0:b1]
    if not has_hmask:
        return src
    dst = HIN[t, b0:b1]
    for b in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[b, j] = src[b, j] * hmask[b0 + b, j]
    return dst


@njit(**_JIT)
def _rec_grad(DRAW_t, W, tmp, hmask, has_hmask, b0):
    """``tmp <- (DRAW_t @ R) * hmask[b0:]``: the gradient reaching h_{t-1} through the recurrent matmul."""
    _matmul(DRAW_t, W, tmp)
    if has_hmask:
        for b in range(tmp.shape[0]):
            for j in range(tmp.shape[1]):
                tmp[b, j] *= hmask[b0 + b, j]


# ---- Elman RNN (ElmanCell: h_t = phi(xg_t + LN(R h_{t-1}) + b_hh)) ----------------------------------

@njit(**_JIT)
def rnn_forward(xg, W, bhh, relu, layer_norm, ln_g, has_hmask, hmask, has_keep, keep_h,
                h0, out, HC, HIN, UH, RSH, b0, b1):
    """Forward over T steps. HC (T, B, H) receives the cell output before keep-mixing (may alias out)."""
    T, _, H = out.shape
    nb = b1 - b0
    hg = np.empty((nb, H), out.dtype)
    for t in range(T):
        src = _rec_input(t, h0, out, hmask, has_hmask, HIN, b0, b1)
        _matmul(src, W, hg)
        if layer_norm:
            _ln_rows(hg, H, ln_g, 0, UH[t, b0:b1], RSH[t, b0:b1], 0)
        prev = h0[b0:b1] if t == 0 else out[t - 1, b0:b1]
        x = xg[t, b0:b1]
        hc = HC[t, b0:b1]
        o = out[t, b0:b1]
        for b in range(nb):
            for j in range(H):
                a = x[b, j] + hg[b, j] + bhh[j]
                hn = (a if a > 0.0 else 0.0) if relu else _tanh(a, out)
                hc[b, j] = hn
                if has_keep:
                    k = keep_h[t, b0 + b, j]
                    hn = k * prev[b, j] + (1.0 - k) * hn
                o[b, j] = hn


@njit(**_JIT)
def rnn_backward(W, relu, layer_norm, ln_g, has_hmask, hmask, has_keep, keep_h, has_dout, dout, dhT,
                 HC, UH, RSH, DG, DRAW, dh0, dbhh, dln_g, b0, b1):
    """Backward over T steps: DG = d xg, DRAW = d(R h) (equal to DG without layer norm), dh0; the sum of
    DG over steps and rows (= d b_hh) accumulated in ``dbhh``."""
    T, _, H = HC.shape
    nb = b1 - b0
    dh = dhT[b0:b1].copy()
    carry = np.zeros((nb, H), HC.dtype)
    tmp = np.empty((nb, H), HC.dtype)
    for t in range(T - 1, -1, -1):
        hc = HC[t, b0:b1]
        dg = DG[t, b0:b1]
        for b in range(nb):
            for j in range(H):
                d = dh[b, j]
                if has_dout:
                    d += dout[t, b0 + b, j]
                if has_keep:
                    c = keep_h[t, b0 + b, j] * d
                    carry[b, j] = c
                    d -= c
                hn = hc[b, j]
                if relu:
                    g = d if hn > 0.0 else 0.0
                else:
                    g = d * (1.0 - hn * hn)
                dg[b, j] = g
                dbhh[j] += g
        if layer_norm:
            _ln_rows_backward(dg, H, ln_g, 0, UH[t, b0:b1], RSH[t, b0:b1], 0, DRAW[t, b0:b1], dln_g)
        _rec_grad(DRAW[t, b0:b1], W, tmp, hmask, has_hmask, b0)
        for b in range(nb):
            for j in range(H):
                dh[b, j] = tmp[b, j] + carry[b, j] if has_keep else tmp[b, j]
    dh0[b0:b1] = dh


# ---- LSTM (LSTMCell, gate order i, f, g, o) ----------------------------------------------------------

@njit(**_JIT)
def lstm_forward(xg, W, bhh, use_i, use_f, use_o, coupled, peephole, peep, act_out, layer_norm, ln_g,
                 ln_cg, ln_cb, has_hmask, hmask, has_keep, keep_h, keep_c,
                 h0, out, CS, CN, HIN, GATES, UH, RSH, UC, RSC, b0, b1):
    """Forward over T steps.

    CS (T+1, B, H): c states (CS[0] = c0, set by the caller); CN (T, B, H): the cell's c_t before
    keep-mixing (may alias CS[1:]); GATES (T, B, 4H): i, f, g, o after their activations (1 for a
    dropped gate, 1 - i for f when coupled); UC/RSC: layer norm of c_t. h_t = o * phi(LN(c_t)).
    Each (t, b) row is processed in short unit-stride passes so that LLVM vectorizes them.
    """
    T, _, H = out.shape
    G4 = 4 * H
    nb = b1 - b0
    hg = np.empty((nb, G4), out.dtype)
    cc = np.empty(H, out.dtype)
    for t in range(T):
        src = _rec_input(t, h0, out, hmask, has_hmask, HIN, b0, b1)
        _matmul(src, W, hg)
        if layer_norm:
            _ln_rows(hg, G4, ln_g, 0, UH[t, b0:b1], RSH[t, b0:b1], 0)
        hprev = h0[b0:b1] if t == 0 else out[t - 1, b0:b1]
        for bl in range(nb):
            b = b0 + bl
            z = GATES[t, b]
            x = xg[t, b]
            r = hg[bl]
            cp = CS[t, b]
            cn = CN[t, b]
            hn = out[t, b]
            for k in range(G4):
                z[k] = x[k] + r[k] + bhh[k]
            if peephole:
                for j in range(H):
                    z[j] += peep[j] * cp[j]
                    z[H + j] += peep[H + j] * cp[j]
            for k in range(2 * H):
                z[k] = _sigmoid(z[k], out)
            for k in range(2 * H, 3 * H):
                z[k] = _tanh(z[k], out)
            if not use_i:
                z[:H] = 1.0
            if coupled:
                for j in range(H):
                    z[H + j] = 1.0 - z[j]
            elif not use_f:
                z[H:2 * H] = 1.0
            for j in range(H):
                cn[j] = z[H + j] * cp[j] + z[j] * z[2 * H + j]
            if peephole:
                for j in range(H):
                    z[3 * H + j] += peep[2 * H + j] * cn[j]
            if use_o:
                for j in range(H):
                    z[3 * H + j] = _sigmoid(z[3 * H + j], out)
            else:
                z[3 * H:] = 1.0
            if layer_norm:
                mu = 0.0
                for j in range(H):
                    mu += cn[j]
                mu /= H
                var = 0.0
                for j in range(H):
                    var += (cn[j] - mu) * (cn[j] - mu)
                rs = 1.0 / math.sqrt(var / H + LN_EPS)
                RSC[t, b, 0] = rs
                uc = UC[t, b]
                for j in range(H):
                    uc[j] = (cn[j] - mu) * rs
                    cc[j] = uc[j] * ln_cg[j] + ln_cb[j]
            else:
                cc[:] = cn
            if act_out:
                for j in range(H):
                    hn[j] = z[3 * H + j] * _tanh(cc[j], out)
            else:
                for j in range(H):
                    hn[j] = z[3 * H + j] * cc[j]
            if has_keep:  # otherwise CN aliases CS[1:] and c_t is already in place
                cs = CS[t + 1, b]
                for j in range(H):
                    kh = keep_h[t, b, j]
                    hn[j] = kh * hprev[bl, j] + (1.0 - kh) * hn[j]
                    kc = keep_c[t, b, j]
                    cs[j] = kc * cp[j] + (1.0 - kc) * cn[j]


@njit(**_JIT)
def lstm_backward(W, use_i, use_f, use_o, coupled, peephole, peep, act_out, layer_norm, ln_g, ln_cg, ln_cb,
                  has_hmask, hmask, has_keep, keep_h, keep_c, has_dout, dout, dhT, dcT,
                  CS, CN, GATES, UH, RSH, UC, RSC, DG, DRAW, dh0, dc0, dbhh, dpeep, dln_g, dln_cg, dln_cb, b0, b1):
    """Backward over T steps: DG = d xg (= d of the pre-activations a_t), DRAW = d(R h), dh0, dc0, and
    accumulated over all steps: the sum of DG (= d b_hh) and the peephole / layer-norm gradients."""
    T, _, H = CN.shape
    nb = b1 - b0
    dh = dhT[b0:b1].copy()
    dc = dcT[b0:b1].copy()
    carry = np.zeros((nb, H), CN.dtype)
    carry_c = np.zeros((nb, H), CN.dtype)
    tmp = np.empty((nb, H), CN.dtype)
    a = np.empty(H, CN.dtype)
    dy = np.empty(H, CN.dtype)
    dct = np.empty(H, CN.dtype)
    for t in range(T - 1, -1, -1):
        for bl in range(nb):
            b = b0 + bl
            d = dh[bl]
            dcb = dc[bl]
            z = GATES[t, b]
            dz = DG[t, b]
            cp = CS[t, b]
            cn = CN[t, b]
            if has_dout:
                do = dout[t, b]
                for j in range(H):
                    d[j] += do[j]
            if has_keep:
                for j in range(H):
                    ch = keep_h[t, b, j] * d[j]
                    carry[bl, j] = ch
                    d[j] -= ch
                    cc_ = keep_c[t, b, j] * dcb[j]
                    carry_c[bl, j] = cc_
                    dcb[j] -= cc_
            # a = phi(LN(c_t)), recomputed; dy = d(h)/d(phi argument)
            if layer_norm:
                uc = UC[t, b]
                for j in range(H):
                    a[j] = uc[j] * ln_cg[j] + ln_cb[j]
            else:
                a[:] = cn
            if act_out:
                for j in range(H):
                    a[j] = _tanh(a[j], CN)
                    dy[j] = d[j] * z[3 * H + j] * (1.0 - a[j] * a[j])
            else:
                for j in range(H):
                    dy[j] = d[j] * z[3 * H + j]
            if layer_norm:
                uc = UC[t, b]
                rs = RSC[t, b, 0]
                mg = 0.0
                mgu = 0.0
                for j in range(H):
                    dln_cb[j] += dy[j]
                    dln_cg[j] += dy[j] * uc[j]
                    g = dy[j] * ln_cg[j]
                    mg += g
                    mgu += g * uc[j]
                mg /= H
                mgu /= H
                for j in range(H):
                    dy[j] = rs * (dy[j] * ln_cg[j] - mg - uc[j] * mgu)
            # output gate, then c_t = f * c_{t-1} + i * g
            if use_o:
                for j in range(H):
                    o = z[3 * H + j]
                    dz[3 * H + j] = d[j] * a[j] * o * (1.0 - o)
            else:
                dz[3 * H:] = 0.0
            for j in range(H):
                dct[j] = dcb[j] + dy[j]
            if peephole:
                for j in range(H):
                    dct[j] += dz[3 * H + j] * peep[2 * H + j]
                    dpeep[2 * H + j] += dz[3 * H + j] * cn[j]
            for j in range(H):
                i = z[j]
                g = z[2 * H + j]
                dz[2 * H + j] = dct[j] * i * (1.0 - g * g)
                dcb[j] = dct[j] * z[H + j]
            if use_i:
                if coupled:
                    for j in range(H):
                        i = z[j]
                        dz[j] = dct[j] * (z[2 * H + j] - cp[j]) * i * (1.0 - i)
                else:
                    for j in range(H):
                        i = z[j]
                        dz[j] = dct[j] * z[2 * H + j] * i * (1.0 - i)
            else:
                dz[:H] = 0.0
            if use_f:
                for j in range(H):
                    f = z[H + j]
                    dz[H + j] = dct[j] * cp[j] * f * (1.0 - f)
            else:
                dz[H:2 * H] = 0.0
            if peephole:
                for j in range(H):
                    dpeep[j] += dz[j] * cp[j]
                    dpeep[H + j] += dz[H + j] * cp[j]
                    dcb[j] += dz[j] * peep[j] + dz[H + j] * peep[H + j]
            if has_keep:
                for j in range(H):
                    dcb[j] += carry_c[bl, j]
            for k in range(4 * H):
                dbhh[k] += dz[k]
        if layer_norm:
            _ln_rows_backward(DG[t, b0:b1], 4 * H, ln_g, 0, UH[t, b0:b1], RSH[t, b0:b1], 0, DRAW[t, b0:b1],
                              dln_g)
        _rec_grad(DRAW[t, b0:b1], W, tmp, hmask, has_hmask, b0)
        if has_keep:
            for b in range(nb):
                for j in range(H):
                    dh[b, j] = tmp[b, j] + carry[b, j]
        else:
            dh[:, :] = tmp
    dh0[b0:b1] = dh
    dc0[b0:b1] = dc


# ---- GRU (GRUCell, gate order r, z, n) -------------------------------------------------------------

@njit(**_JIT)
def gru_forward(xg, W, bhh, layer_norm, ln_g, has_hmask, hmask, has_keep, keep_h,
                h0, out, HIN, GATES, HN, UH, RSH, b0, b1):
    """Forward over T steps, reset after the matmul: n = tanh(xn + r * (LN(R_n h) + b_hn)).

    GATES (T, B, 3H): r, z, n; HN (T, B, H): the recurrent n term ``LN(R_n h)_n + b_hn``.
    """
    T, _, H = out.shape
    nb = b1 - b0
    hg = np.empty((nb, 3 * H), out.dtype)
    for t in range(T):
        src = _rec_input(t, h0, out, hmask, has_hmask, HIN, b0, b1)
        _matmul(src, W, hg)
        if layer_norm:
            _ln_rows(hg, 3 * H, ln_g, 0, UH[t, b0:b1], RSH[t, b0:b1], 0)
        hprev = h0[b0:b1] if t == 0 else out[t - 1, b0:b1]
        x = xg[t, b0:b1]
        gt = GATES[t, b0:b1]
        hnt = HN[t, b0:b1]
        o = out[t, b0:b1]
        for b in range(nb):
            for j in range(H):
                r = _sigmoid(x[b, j] + hg[b, j] + bhh[j], out)
                z = _sigmoid(x[b, H + j] + hg[b, H + j] + bhh[H + j], out)
                hn = hg[b, 2 * H + j] + bhh[2 * H + j]
                n = _tanh(x[b, 2 * H + j] + r * hn, out)
                hp = hprev[b, j]
                h = n + z * (hp - n)
                gt[b, j] = r
                gt[b, H + j] = z
                gt[b, 2 * H + j] = n
                hnt[b, j] = hn
                if has_keep:
                    k = keep_h[t, b0 + b, j]
                    h = k * hp + (1.0 - k) * h
                o[b, j] = h


@njit(**_JIT)
def gru_backward(W, layer_norm, ln_g, has_hmask, hmask, has_keep, keep_h, has_dout, dout, dhT,
                 h0, out, GATES, HN, UH, RSH, DG, DPOST, DRAW, dh0, dbhh, dln_g, b0, b1):
    """Backward over T steps (reset after). DPOST = d(LN(R h) + b_hh) (its sum is d b_hh, also
    accumulated in ``dbhh``); DRAW = d(R h) (DPOST itself without layer norm)."""
    T, _, H = out.shape
    nb = b1 - b0
    dh = dhT[b0:b1].copy()
    acc = np.zeros((nb, H), out.dtype)
    tmp = np.empty((nb, H), out.dtype)
    for t in range(T - 1, -1, -1):
        hprev = h0[b0:b1] if t == 0 else out[t - 1, b0:b1]
        gt = GATES[t, b0:b1]
        hnt = HN[t, b0:b1]
        dg = DG[t, b0:b1]
        dp = DPOST[t, b0:b1]
        for b in range(nb):
            for j in range(H):
                d = dh[b, j]
                if has_dout:
                    d += dout[t, b0 + b, j]
                c = 0.0
                if has_keep:
                    c = keep_h[t, b0 + b, j] * d
                    d -= c
                r = gt[b, j]
                z = gt[b, H + j]
                n = gt[b, 2 * H + j]
                hp = hprev[b, j]
                dan = d * (1.0 - z) * (1.0 - n * n)
                daz = d * (hp - n) * z * (1.0 - z)
                dar = dan * hnt[b, j] * r * (1.0 - r)
                acc[b, j] = c + d * z
                dg[b, j] = dar
                dg[b, H + j] = daz
                dg[b, 2 * H + j] = dan
                dp[b, j] = dar
                dp[b, H + j] = daz
                dp[b, 2 * H + j] = dan * r
                dbhh[j] += dar
                dbhh[H + j] += daz
                dbhh[2 * H + j] += dan * r
        if layer_norm:
            _ln_rows_backward(dp, 3 * H, ln_g, 0, UH[t, b0:b1], RSH[t, b0:b1], 0, DRAW[t, b0:b1], dln_g)
        _rec_grad(DRAW[t, b0:b1], W, tmp, hmask, has_hmask, b0)
        for b in range(nb):
            for j in range(H):
                dh[b, j] = tmp[b, j] + acc[b, j]
    dh0[b0:b1] = dh


@njit(**_JIT)
def gru_cho_forward(xg, W0, W1, bhh, layer_norm, ln_g, has_hmask, hmask, has_keep, keep_h,
                    h0, out, HIN, Q, GATES, UH, RSH, b0, b1):
    """Forward over T steps, reset before the matmul (Cho et al.): n = tanh(xn + LN(R_n (r h)) + b_hn).

    Two recurrent parts: (r, z) from ``h * hmask`` with W0 (R_rz); n from Q = ``r * h * hmask``
    with W1 (R_n). GATES (T, B, 3H): r, z, n.
    """
    T, _, H = out.shape
    nb = b1 - b0
    hg = np.empty((nb, 2 * H), out.dtype)
    hq = np.empty((nb, H), out.dtype)
    for t in range(T):
        src = _rec_input(t, h0, out, hmask, has_hmask, HIN, b0, b1)
        _matmul(src, W0, hg)
        if layer_norm:
            _ln_rows(hg, 2 * H, ln_g, 0, UH[t, b0:b1], RSH[t, b0:b1], 0)
        hprev = h0[b0:b1] if t == 0 else out[t - 1, b0:b1]
        x = xg[t, b0:b1]
        gt = GATES[t, b0:b1]
        q = Q[t, b0:b1]
        for b in range(nb):
            for j in range(H):
                r = _sigmoid(x[b, j] + hg[b, j] + bhh[j], out)
                gt[b, j] = r
                gt[b, H + j] = _sigmoid(x[b, H + j] + hg[b, H + j] + bhh[H + j], out)
                q[b, j] = r * hprev[b, j] * hmask[b0 + b, j] if has_hmask else r * hprev[b, j]
        _matmul(q, W1, hq)
        if layer_norm:
            _ln_rows(hq, H, ln_g, 2 * H, UH[t, b0:b1], RSH[t, b0:b1], 1)
        o = out[t, b0:b1]
        for b in range(nb):
            for j in range(H):
                z = gt[b, H + j]
                n = _tanh(x[b, 2 * H + j] + hq[b, j] + bhh[2 * H + j], out)
                gt[b, 2 * H + j] = n
                hp = hprev[b, j]
                h = n + z * (hp - n)
                if has_keep:
                    k = keep_h[t, b0 + b, j]
                    h = k * hp + (1.0 - k) * h
                o[b, j] = h


@njit(**_JIT)
def gru_cho_backward(W0, W1, layer_norm, ln_g, has_hmask, hmask, has_keep, keep_h, has_dout, dout, dhT,
                     h0, out, GATES, UH, RSH, DG, DRAW0, DRAW1, dh0, dln_g, b0, b1):
    """Backward over T steps (reset before). DG = d xg (also d of the post-norm projections, so its
    sum is d b_hh); DRAW0 (T, B, 2H) = d(R_rz h), DRAW1 (T, B, H) = d(R_n q)."""
    T, _, H = out.shape
    nb = b1 - b0
    dh = dhT[b0:b1].copy()
    acc = np.zeros((nb, H), out.dtype)
    tmp = np.empty((nb, H), out.dtype)
    d1 = np.empty((nb, H), out.dtype)
    d0 = np.empty((nb, 2 * H), out.dtype)
    for t in range(T - 1, -1, -1):
        hprev = h0[b0:b1] if t == 0 else out[t - 1, b0:b1]
        gt = GATES[t, b0:b1]
        dg = DG[t, b0:b1]
        dst1 = d1 if layer_norm else DRAW1[t, b0:b1]
        for b in range(nb):
            for j in range(H):
                d = dh[b, j]
                if has_dout:
                    d += dout[t, b0 + b, j]
                c = 0.0
                if has_keep:
                    c = keep_h[t, b0 + b, j] * d
                    d -= c
                z = gt[b, H + j]
                n = gt[b, 2 * H + j]
                dan = d * (1.0 - z) * (1.0 - n * n)
                dg[b, H + j] = d * (hprev[b, j] - n) * z * (1.0 - z)
                dg[b, 2 * H + j] = dan
                dst1[b, j] = dan
                acc[b, j] = c + d * z
        if layer_norm:
            _ln_rows_backward(d1, H, ln_g, 2 * H, UH[t, b0:b1], RSH[t, b0:b1], 1, DRAW1[t, b0:b1], dln_g)
        _rec_grad(DRAW1[t, b0:b1], W1, tmp, hmask, has_hmask, b0)  # tmp = d q: d(r * h)
        dst0 = d0 if layer_norm else DRAW0[t, b0:b1]
        for b in range(nb):
            for j in range(H):
                r = gt[b, j]
                dq = tmp[b, j]
                dar = dq * hprev[b, j] * r * (1.0 - r)
                acc[b, j] += dq * r
                dg[b, j] = dar
                dst0[b, j] = dar
                dst0[b, H + j] = dg[b, H + j]
        if layer_norm:
            _ln_rows_backward(d0, 2 * H, ln_g, 0, UH[t, b0:b1], RSH[t, b0:b1], 0, DRAW0[t, b0:b1], dln_g)
        _rec_grad(DRAW0[t, b0:b1], W0, tmp, hmask, has_hmask, b0)
        for b in range(nb):
            for j in range(H):
                dh[b, j] = tmp[b, j] + acc[b, j]
    dh0[b0:b1] = dh
