"""Numba time loops of the fused CPU backend: one forward and one backward per cell family.

Each function runs a whole sequence of one layer/direction in compiled code: per step one BLAS
matmul (``np.dot`` into a preallocated buffer) and the cell's pointwise math fused into one pass
over (B, H), working in place. The math re-expresses the equations in the docstrings of
:class:`rnnkit.cells.ElmanCell`, :class:`rnnkit.cells.LSTMCell` and :class:`rnnkit.cells.GRUCell`
(the torch cells remain the definition; ``tests/test_kernels_cpu.py`` proves equality with the
``reference`` backend). :mod:`rnnkit.kernels.cpu` owns buffers, autograd and the weight gradients.

Conventions shared by every function (all arrays C-contiguous unless said otherwise, one dtype):
    xg      (T, B, G*H) input pre-activations ``W x_t + b_ih`` (layer-normed if the cell says so).
    Rt / R  recurrent weight transposed (H, G*H) for the forward, as stored (G*H, H) for the backward.
    bhh     (G*H,) recurrent bias, added after the (optional) layer norm; zeros when the cell has none.
    hmask   (B, H) recurrent-dropout scale on h before the matmul (``has_hmask``).
    keep_*  (T, B, H), possibly with zero strides: ``state = keep * prev + (1 - keep) * cell`` (``has_keep``).
    out     (T, B, H) the h state after every step (the layer applies its output mask afterwards).
    HIN     (T, B, H) the recurrent matmul's input ``h_{t-1} * hmask``; only written when ``has_hmask``
            (otherwise the input is ``h0`` / ``out[t-1]`` and the wrapper rebuilds it for dR).
    UH, RSH layer-norm ``u_hat`` (T, B, G*H) and ``1/std`` (T, B, parts) of the recurrent projection.
Backward outputs: ``DG`` (T, B, G*H) = d xg; ``DRAW`` = d(raw recurrent matmul output), which the
wrapper turns into dR with one matmul over all steps; small parameter gradients are accumulated here.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
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
def _rec_input(t, h0, out, hmask, has_hmask, HIN):
    """The recurrent matmul's input at step t: ``h_{t-1}`` (times ``hmask``, then kept in HIN)."""
    src = h0 if t == 0 else out[t - 1]
    if not has_hmask:
        return src
    dst = HIN[t]
    for b in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[b, j] = src[b, j] * hmask[b, j]
    return dst


@njit(**_JIT)
def _rec_grad(DRAW_t, R, tmp, hmask, has_hmask):
    """``tmp <- (DRAW_t @ R) * hmask``: the gradient reaching h_{t-1} through the recurrent matmul."""
    np.dot(DRAW_t, R, tmp)
    if has_hmask:
        for b in range(tmp.shape[0]):
            for j in range(tmp.shape[1]):
                tmp[b, j] *= hmask[b, j]


# ---- Elman RNN (ElmanCell: h_t = phi(xg_t + LN(R h_{t-1}) + b_hh)) ----------------------------------

@njit(**_JIT)
def rnn_forward(xg, Rt, bhh, relu, layer_norm, ln_g, has_hmask, hmask, has_keep, keep_h,
                h0, out, HC, HIN, UH, RSH):
    """Forward over T steps. HC (T, B, H) receives the cell output before keep-mixing (may alias out)."""
    T, B, H = out.shape
    hg = np.empty((B, H), out.dtype)
    for t in range(T):
        src = _rec_input(t, h0, out, hmask, has_hmask, HIN)
        np.dot(src, Rt, hg)
        if layer_norm:
            _ln_rows(hg, H, ln_g, 0, UH[t], RSH[t], 0)
        prev = h0 if t == 0 else out[t - 1]
        for b in range(B):
            for j in range(H):
                a = xg[t, b, j] + hg[b, j] + bhh[j]
                hn = (a if a > 0.0 else 0.0) if relu else _tanh(a, out)
                HC[t, b, j] = hn
                if has_keep:
                    k = keep_h[t, b, j]
                    hn = k * prev[b, j] + (1.0 - k) * hn
                out[t, b, j] = hn


@njit(**_JIT)
def rnn_backward(R, relu, layer_norm, ln_g, has_hmask, hmask, has_keep, keep_h, has_dout, dout, dhT,
                 HC, UH, RSH, DG, DRAW, dh0, dln_g):
    """Backward over T steps: DG = d xg, DRAW = d(R h) (equal to DG without layer norm), dh0."""
    T, B, H = HC.shape
    dh = dhT.copy()
    carry = np.zeros((B, H), HC.dtype)
    tmp = np.empty((B, H), HC.dtype)
    for t in range(T - 1, -1, -1):
        for b in range(B):
            for j in range(H):
                d = dh[b, j]
                if has_dout:
                    d += dout[t, b, j]
                if has_keep:
                    c = keep_h[t, b, j] * d
                    carry[b, j] = c
                    d -= c
                hn = HC[t, b, j]
                if relu:
                    DG[t, b, j] = d if hn > 0.0 else 0.0
                else:
                    DG[t, b, j] = d * (1.0 - hn * hn)
        if layer_norm:
            _ln_rows_backward(DG[t], H, ln_g, 0, UH[t], RSH[t], 0, DRAW[t], dln_g)
        _rec_grad(DRAW[t], R, tmp, hmask, has_hmask)
        for b in range(B):
            for j in range(H):
                dh[b, j] = tmp[b, j] + carry[b, j] if has_keep else tmp[b, j]
    dh0[:, :] = dh


# ---- LSTM (LSTMCell, gate order i, f, g, o) ----------------------------------------------------------

@njit(**_JIT)
def lstm_forward(xg, Rt, bhh, use_i, use_f, use_o, coupled, peephole, peep, act_out, layer_norm, ln_g,
                 ln_cg, ln_cb, has_hmask, hmask, has_keep, keep_h, keep_c,
                 h0, out, CS, CN, HIN, GATES, UH, RSH, UC, RSC):
    """Forward over T steps.

    CS (T+1, B, H): c states (CS[0] = c0, set by the caller); CN (T, B, H): the cell's c_t before
    keep-mixing (may alias CS[1:]); GATES (T, B, 4H): i, f, g, o after their activations (1 for a
    dropped gate, 1 - i for f when coupled); UC/RSC: layer norm of c_t. h_t = o * phi(LN(c_t)).
    Each (t, b) row is processed in short unit-stride passes so that LLVM vectorizes them.
    """
    T, B, H = out.shape
    G4 = 4 * H
    hg = np.empty((B, G4), out.dtype)
    cc = np.empty(H, out.dtype)
    for t in range(T):
        src = _rec_input(t, h0, out, hmask, has_hmask, HIN)
        np.dot(src, Rt, hg)
        if layer_norm:
            _ln_rows(hg, G4, ln_g, 0, UH[t], RSH[t], 0)
        hprev = h0 if t == 0 else out[t - 1]
        for b in range(B):
            z = GATES[t, b]
            x = xg[t, b]
            r = hg[b]
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
                    hn[j] = kh * hprev[b, j] + (1.0 - kh) * hn[j]
                    kc = keep_c[t, b, j]
                    cs[j] = kc * cp[j] + (1.0 - kc) * cn[j]


@njit(**_JIT)
def lstm_backward(R, use_i, use_f, use_o, coupled, peephole, peep, act_out, layer_norm, ln_g, ln_cg, ln_cb,
                  has_hmask, hmask, has_keep, keep_h, keep_c, has_dout, dout, dhT, dcT,
                  CS, CN, GATES, UH, RSH, UC, RSC, DG, DRAW, dh0, dc0, dpeep, dln_g, dln_cg, dln_cb):
    """Backward over T steps: DG = d xg (= d of the pre-activations a_t), DRAW = d(R h), dh0, dc0, and
    the peephole / layer-norm gradients accumulated over all steps."""
    T, B, H = CN.shape
    dh = dhT.copy()
    dc = dcT.copy()
    carry = np.zeros((B, H), CN.dtype)
    carry_c = np.zeros((B, H), CN.dtype)
    tmp = np.empty((B, H), CN.dtype)
    a = np.empty(H, CN.dtype)
    dy = np.empty(H, CN.dtype)
    dct = np.empty(H, CN.dtype)
    for t in range(T - 1, -1, -1):
        for b in range(B):
            d = dh[b]
            dcb = dc[b]
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
                    carry[b, j] = ch
                    d[j] -= ch
                    cc_ = keep_c[t, b, j] * dcb[j]
                    carry_c[b, j] = cc_
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
                    dcb[j] += carry_c[b, j]
        if layer_norm:
            _ln_rows_backward(DG[t], 4 * H, ln_g, 0, UH[t], RSH[t], 0, DRAW[t], dln_g)
        _rec_grad(DRAW[t], R, tmp, hmask, has_hmask)
        if has_keep:
            for b in range(B):
                for j in range(H):
                    dh[b, j] = tmp[b, j] + carry[b, j]
        else:
            dh[:, :] = tmp
    dh0[:, :] = dh
    dc0[:, :] = dc


# ---- GRU (GRUCell, gate order r, z, n) -------------------------------------------------------------

@njit(**_JIT)
def gru_forward(xg, Rt, bhh, layer_norm, ln_g, has_hmask, hmask, has_keep, keep_h,
                h0, out, HIN, GATES, HN, UH, RSH):
    """Forward over T steps, reset after the matmul: n = tanh(xn + r * (LN(R_n h) + b_hn)).

    GATES (T, B, 3H): r, z, n; HN (T, B, H): the recurrent n term ``LN(R_n h)_n + b_hn``.
    """
    T, B, H = out.shape
    hg = np.empty((B, 3 * H), out.dtype)
    for t in range(T):
        src = _rec_input(t, h0, out, hmask, has_hmask, HIN)
        np.dot(src, Rt, hg)
        if layer_norm:
            _ln_rows(hg, 3 * H, ln_g, 0, UH[t], RSH[t], 0)
        hprev = h0 if t == 0 else out[t - 1]
        for b in range(B):
            for j in range(H):
                r = _sigmoid(xg[t, b, j] + hg[b, j] + bhh[j], out)
                z = _sigmoid(xg[t, b, H + j] + hg[b, H + j] + bhh[H + j], out)
                hn = hg[b, 2 * H + j] + bhh[2 * H + j]
                n = _tanh(xg[t, b, 2 * H + j] + r * hn, out)
                hp = hprev[b, j]
                h = n + z * (hp - n)
                GATES[t, b, j] = r
                GATES[t, b, H + j] = z
                GATES[t, b, 2 * H + j] = n
                HN[t, b, j] = hn
                if has_keep:
                    k = keep_h[t, b, j]
                    h = k * hp + (1.0 - k) * h
                out[t, b, j] = h


@njit(**_JIT)
def gru_backward(R, layer_norm, ln_g, has_hmask, hmask, has_keep, keep_h, has_dout, dout, dhT,
                 h0, out, GATES, HN, UH, RSH, DG, DPOST, DRAW, dh0, dbhh, dln_g):
    """Backward over T steps (reset after). DPOST = d(LN(R h) + b_hh) (its sum is d b_hh, also
    accumulated in ``dbhh``); DRAW = d(R h) (DPOST itself without layer norm)."""
    T, B, H = out.shape
    dh = dhT.copy()
    acc = np.zeros((B, H), out.dtype)
    tmp = np.empty((B, H), out.dtype)
    for t in range(T - 1, -1, -1):
        hprev = h0 if t == 0 else out[t - 1]
        for b in range(B):
            for j in range(H):
                d = dh[b, j]
                if has_dout:
                    d += dout[t, b, j]
                c = 0.0
                if has_keep:
                    c = keep_h[t, b, j] * d
                    d -= c
                r = GATES[t, b, j]
                z = GATES[t, b, H + j]
                n = GATES[t, b, 2 * H + j]
                hp = hprev[b, j]
                dan = d * (1.0 - z) * (1.0 - n * n)
                daz = d * (hp - n) * z * (1.0 - z)
                dar = dan * HN[t, b, j] * r * (1.0 - r)
                acc[b, j] = c + d * z
                DG[t, b, j] = dar
                DG[t, b, H + j] = daz
                DG[t, b, 2 * H + j] = dan
                DPOST[t, b, j] = dar
                DPOST[t, b, H + j] = daz
                DPOST[t, b, 2 * H + j] = dan * r
                dbhh[j] += dar
                dbhh[H + j] += daz
                dbhh[2 * H + j] += dan * r
        if layer_norm:
            _ln_rows_backward(DPOST[t], 3 * H, ln_g, 0, UH[t], RSH[t], 0, DRAW[t], dln_g)
        _rec_grad(DRAW[t], R, tmp, hmask, has_hmask)
        for b in range(B):
            for j in range(H):
                dh[b, j] = tmp[b, j] + acc[b, j]
    dh0[:, :] = dh


@njit(**_JIT)
def gru_cho_forward(xg, Rt0, Rt1, bhh, layer_norm, ln_g, has_hmask, hmask, has_keep, keep_h,
                    h0, out, HIN, Q, GATES, UH, RSH):
    """Forward over T steps, reset before the matmul (Cho et al.): n = tanh(xn + LN(R_n (r h)) + b_hn).

    Two recurrent parts: (r, z) from ``h * hmask`` with Rt0 (H, 2H); n from Q = ``r * h * hmask``
    with Rt1 (H, H). GATES (T, B, 3H): r, z, n.
    """
    T, B, H = out.shape
    hg = np.empty((B, 2 * H), out.dtype)
    hq = np.empty((B, H), out.dtype)
    for t in range(T):
        src = _rec_input(t, h0, out, hmask, has_hmask, HIN)
        np.dot(src, Rt0, hg)
        if layer_norm:
            _ln_rows(hg, 2 * H, ln_g, 0, UH[t], RSH[t], 0)
        hprev = h0 if t == 0 else out[t - 1]
        q = Q[t]
        for b in range(B):
            for j in range(H):
                r = _sigmoid(xg[t, b, j] + hg[b, j] + bhh[j], out)
                GATES[t, b, j] = r
                GATES[t, b, H + j] = _sigmoid(xg[t, b, H + j] + hg[b, H + j] + bhh[H + j], out)
                q[b, j] = r * hprev[b, j] * hmask[b, j] if has_hmask else r * hprev[b, j]
        np.dot(q, Rt1, hq)
        if layer_norm:
            _ln_rows(hq, H, ln_g, 2 * H, UH[t], RSH[t], 1)
        for b in range(B):
            for j in range(H):
                z = GATES[t, b, H + j]
                n = _tanh(xg[t, b, 2 * H + j] + hq[b, j] + bhh[2 * H + j], out)
                GATES[t, b, 2 * H + j] = n
                hp = hprev[b, j]
                h = n + z * (hp - n)
                if has_keep:
                    k = keep_h[t, b, j]
                    h = k * hp + (1.0 - k) * h
                out[t, b, j] = h


@njit(**_JIT)
def gru_cho_backward(R0, R1, layer_norm, ln_g, has_hmask, hmask, has_keep, keep_h, has_dout, dout, dhT,
                     h0, out, GATES, UH, RSH, DG, DRAW0, DRAW1, dh0, dln_g):
    """Backward over T steps (reset before). DG = d xg (also d of the post-norm projections, so its
    sum is d b_hh); DRAW0 (T, B, 2H) = d(R_rz h), DRAW1 (T, B, H) = d(R_n q)."""
    T, B, H = out.shape
    dh = dhT.copy()
    acc = np.zeros((B, H), out.dtype)
    tmp = np.empty((B, H), out.dtype)
    d1 = np.empty((B, H), out.dtype)
    d0 = np.empty((B, 2 * H), out.dtype)
    for t in range(T - 1, -1, -1):
        hprev = h0 if t == 0 else out[t - 1]
        dst1 = d1 if layer_norm else DRAW1[t]
        for b in range(B):
            for j in range(H):
                d = dh[b, j]
                if has_dout:
                    d += dout[t, b, j]
                c = 0.0
                if has_keep:
                    c = keep_h[t, b, j] * d
                    d -= c
                z = GATES[t, b, H + j]
                n = GATES[t, b, 2 * H + j]
                dan = d * (1.0 - z) * (1.0 - n * n)
                DG[t, b, H + j] = d * (hprev[b, j] - n) * z * (1.0 - z)
                DG[t, b, 2 * H + j] = dan
                dst1[b, j] = dan
                acc[b, j] = c + d * z
        if layer_norm:
            _ln_rows_backward(d1, H, ln_g, 2 * H, UH[t], RSH[t], 1, DRAW1[t], dln_g)
        _rec_grad(DRAW1[t], R1, tmp, hmask, has_hmask)  # tmp = d q / (nothing else): d(r * h)
        dst0 = d0 if layer_norm else DRAW0[t]
        for b in range(B):
            for j in range(H):
                r = GATES[t, b, j]
                dq = tmp[b, j]
                dar = dq * hprev[b, j] * r * (1.0 - r)
                acc[b, j] += dq * r
                DG[t, b, j] = dar
                dst0[b, j] = dar
                dst0[b, H + j] = DG[t, b, H + j]
        if layer_norm:
            _ln_rows_backward(d0, 2 * H, ln_g, 0, UH[t], RSH[t], 0, DRAW0[t], dln_g)
        _rec_grad(DRAW0[t], R0, tmp, hmask, has_hmask)
        for b in range(B):
            for j in range(H):
                dh[b, j] = tmp[b, j] + acc[b, j]
    dh0[:, :] = dh
