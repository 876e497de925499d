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
from numba import njit

from ..cells.base import LN_EPS

_JIT = {"fastmath": True, "cache": True, "nogil": True}


# ---- shared helpers -------------------------------------------------------------------------------

@njit(**_JIT)
def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


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
                hn = (a if a > 0.0 else 0.0) if relu else math.tanh(a)
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
    dropped gate); UC/RSC: layer norm of c_t. h_t = o * phi(LN(c_t)).
    """
    T, B, H = out.shape
    G4 = 4 * H
    hg = np.empty((B, G4), out.dtype)
    row = np.empty(H, out.dtype)
    for t in range(T):
        src = _rec_input(t, h0, out, hmask, has_hmask, HIN)
        np.dot(src, Rt, hg)
        if layer_norm:
            _ln_rows(hg, G4, ln_g, 0, UH[t], RSH[t], 0)
        hprev = h0 if t == 0 else out[t - 1]
        for b in range(B):
            for j in range(H):
                cp = CS[t, b, j]
                ai = xg[t, b, j] + hg[b, j] + bhh[j]
                af = xg[t, b, H + j] + hg[b, H + j] + bhh[H + j]
                ag = xg[t, b, 2 * H + j] + hg[b, 2 * H + j] + bhh[2 * H + j]
                if peephole:
                    ai += peep[j] * cp
                    af += peep[H + j] * cp
                i = _sigmoid(ai) if use_i else 1.0
                if coupled:
                    f = 1.0 - i
                else:
                    f = _sigmoid(af) if use_f else 1.0
                g = math.tanh(ag)
                cn = f * cp + i * g
                GATES[t, b, j] = i
                GATES[t, b, H + j] = f
                GATES[t, b, 2 * H + j] = g
                CN[t, b, j] = cn
                row[j] = cn
            if layer_norm:
                mu = 0.0
                for j in range(H):
                    mu += row[j]
                mu /= H
                var = 0.0
                for j in range(H):
                    var += (row[j] - mu) * (row[j] - mu)
                r = 1.0 / math.sqrt(var / H + LN_EPS)
                RSC[t, b, 0] = r
                for j in range(H):
                    u = (row[j] - mu) * r
                    UC[t, b, j] = u
                    row[j] = u * ln_cg[j] + ln_cb[j]
            for j in range(H):
                cn = CN[t, b, j]
                ao = xg[t, b, 3 * H + j] + hg[b, 3 * H + j] + bhh[3 * H + j]
                if peephole:
                    ao += peep[2 * H + j] * cn
                o = _sigmoid(ao) if use_o else 1.0
                GATES[t, b, 3 * H + j] = o
                a = math.tanh(row[j]) if act_out else row[j]
                hn = o * a
                if has_keep:
                    kh = keep_h[t, b, j]
                    hn = kh * hprev[b, j] + (1.0 - kh) * hn
                    kc = keep_c[t, b, j]
                    cn = kc * CS[t, b, j] + (1.0 - kc) * cn
                out[t, b, j] = hn
                CS[t + 1, b, j] = cn


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
    dy = np.empty(H, CN.dtype)
    for t in range(T - 1, -1, -1):
        for b in range(B):
            # pass 1: gradient reaching phi's argument (dy), and the layer norm of c_t if any
            for j in range(H):
                d = dh[b, j]
                if has_dout:
                    d += dout[t, b, j]
                if has_keep:
                    ch = keep_h[t, b, j] * d
                    carry[b, j] = ch
                    d -= ch
                    cc_ = keep_c[t, b, j] * dc[b, j]
                    carry_c[b, j] = cc_
                    dc[b, j] -= cc_
                dh[b, j] = d  # d h_t of the cell (carried part removed)
                o = GATES[t, b, 3 * H + j]
                if layer_norm:
                    cc = UC[t, b, j] * ln_cg[j] + ln_cb[j]
                else:
                    cc = CN[t, b, j]
                da = d * o
                if act_out:
                    a = math.tanh(cc)
                    da *= 1.0 - a * a
                dy[j] = da
            if layer_norm:
                r = RSC[t, b, 0]
                mg = 0.0
                mgu = 0.0
                for j in range(H):
                    u = UC[t, b, j]
                    dln_cb[j] += dy[j]
                    dln_cg[j] += dy[j] * u
                    g = dy[j] * ln_cg[j]
                    mg += g
                    mgu += g * u
                mg /= H
                mgu /= H
                for j in range(H):
                    dy[j] = r * (dy[j] * ln_cg[j] - mg - UC[t, b, j] * mgu)
            # pass 2: the gates
            for j in range(H):
                d = dh[b, j]
                cp = CS[t, b, j]
                cn = CN[t, b, j]
                i = GATES[t, b, j]
                f = GATES[t, b, H + j]
                g = GATES[t, b, 2 * H + j]
                o = GATES[t, b, 3 * H + j]
                if layer_norm:
                    cc = UC[t, b, j] * ln_cg[j] + ln_cb[j]
                else:
                    cc = cn
                a = math.tanh(cc) if act_out else cc
                dct = dc[b, j] + dy[j]
                dao = 0.0
                if use_o:
                    dao = d * a * o * (1.0 - o)
                    if peephole:
                        dct += dao * peep[2 * H + j]
                        dpeep[2 * H + j] += dao * cn
                dag = dct * i * (1.0 - g * g)
                dcp = dct * f
                di = dct * g
                daf = 0.0
                if coupled:
                    di -= dct * cp
                elif use_f:
                    daf = dct * cp * f * (1.0 - f)
                dai = di * i * (1.0 - i) if use_i else 0.0
                if peephole:
                    dpeep[j] += dai * cp
                    dpeep[H + j] += daf * cp
                    dcp += dai * peep[j] + daf * peep[H + j]
                DG[t, b, j] = dai
                DG[t, b, H + j] = daf
                DG[t, b, 2 * H + j] = dag
                DG[t, b, 3 * H + j] = dao
                dc[b, j] = dcp + carry_c[b, j] if has_keep else dcp
        if layer_norm:
            _ln_rows_backward(DG[t], 4 * H, ln_g, 0, UH[t], RSH[t], 0, DRAW[t], dln_g)
        _rec_grad(DRAW[t], R, tmp, hmask, has_hmask)
        for b in range(B):
            for j in range(H):
                dh[b, j] = tmp[b, j] + carry[b, j] if has_keep else tmp[b, j]
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
                r = _sigmoid(xg[t, b, j] + hg[b, j] + bhh[j])
                z = _sigmoid(xg[t, b, H + j] + hg[b, H + j] + bhh[H + j])
                hn = hg[b, 2 * H + j] + bhh[2 * H + j]
                n = math.tanh(xg[t, b, 2 * H + j] + r * hn)
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
                r = _sigmoid(xg[t, b, j] + hg[b, j] + bhh[j])
                GATES[t, b, j] = r
                GATES[t, b, H + j] = _sigmoid(xg[t, b, H + j] + hg[b, H + j] + bhh[H + j])
                q[b, j] = r * hprev[b, j] * hmask[b, j] if has_hmask else r * hprev[b, j]
        np.dot(q, Rt1, hq)
        if layer_norm:
            _ln_rows(hq, H, ln_g, 2 * H, UH[t], RSH[t], 1)
        for b in range(B):
            for j in range(H):
                z = GATES[t, b, H + j]
                n = math.tanh(xg[t, b, 2 * H + j] + hq[b, j] + bhh[2 * H + j])
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
