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
Backward outputs: ``DG`` (T, B, G*H) = d xg (the LSTM and reset-after GRU loops write it over GATES);
``DRAW`` = d(raw recurrent matmul output), which the wrapper turns into dR with one matmul over all
steps; small parameter gradients are accumulated here.

Parts: every loop runs batch rows ``b0:b1`` and hidden units ``j0:j1`` only (its last arguments are the
part's weight pair(s), then ``b0, b1, j0, j1`` and ``sync``). Rows never interact in a recurrence, so
row parts run on separate threads with no synchronisation per step. Unit parts need every unit of
``h_{t-1}`` for their matmul: each multiplies by its own rows of R (so its matmul yields only its gate
columns, in a buffer of its own, gate-major), and with ``sync`` the threads of torch's OpenMP team meet
at ``GOMP_barrier`` once per step: after writing h_t (forward), after writing DG_t (backward, before
the matmul that reads all of it). Layer norm and the reset-before GRU need whole rows (``j0, j1 = 0,
H``). Each part gets its own parameter-gradient accumulators. Per (t, b) the loops take C-contiguous
views of the part's units (:func:`_seg`) and index them from 0, so that LLVM vectorizes them.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ..cells.base import LN_EPS
from .cpu_loops import _JIT, _barrier, _ln_rows, _ln_rows_backward, _matmul, _sigmoid, _tanh


@njit(**_JIT)
def _rec_input(t, h0, out, hmask, has_hmask, HIN, b0, b1, j0, buf):
    """Rows b0:b1 of the recurrent matmul's input at step t: ``h_{t-1}``, times ``hmask`` if ``has_hmask``.

    The masked input is kept in HIN by the range that starts at unit 0; the others build it in ``buf``.
    """
    src = h0[b0:b1] if t == 0 else out[t - 1, b0:b1]
    if not has_hmask:
        return src
    dst = HIN[t, b0:b1] if j0 == 0 else buf
    for b in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[b, j] = src[b, j] * hmask[b0 + b, j]
    return dst


@njit(**_JIT)
def _rec_grad(DRAW_t, W, tmp, hmask, has_hmask, b0, j0):
    """``tmp <- (DRAW_t @ R[:, j0:]) * hmask[b0:, j0:]``: the gradient reaching h_{t-1} (units j0:j0+n)."""
    _matmul(DRAW_t, W, tmp)
    if has_hmask:
        for b in range(tmp.shape[0]):
            for j in range(tmp.shape[1]):
                tmp[b, j] *= hmask[b0 + b, j0 + j]


@njit(fastmath=True, cache=True, inline="always", error_model="numpy")
def _seg(v, g, n, j0, j1):
    """Units j0:j1 of block g of ``v`` (blocks of n): a C-contiguous view that loops index from 0 (so that
    LLVM needs no negative-index checks and vectorizes)."""
    return v[g * n + j0:g * n + j1]


@njit(fastmath=True, cache=True, inline="always", error_model="numpy")
def _segs3(v, n, j0, j1):
    return _seg(v, 0, n, j0, j1), _seg(v, 1, n, j0, j1), _seg(v, 2, n, j0, j1)


@njit(fastmath=True, cache=True, inline="always", error_model="numpy")
def _segs4(v, n, j0, j1):
    return _seg(v, 0, n, j0, j1), _seg(v, 1, n, j0, j1), _seg(v, 2, n, j0, j1), _seg(v, 3, n, j0, j1)


@njit(**_JIT)
def _add_rec(dh, tmp, carry, has_keep, j0, j1):
    """dh[:, j0:j1] <- tmp (+ carry[:, j0:j1]): the gradient reaching h_{t-1}, plus what zoneout carried."""
    H = dh.shape[1]
    for b in range(dh.shape[0]):
        d = _seg(dh[b], 0, H, j0, j1)
        tm = tmp[b]
        if has_keep:
            ch = _seg(carry[b], 0, H, j0, j1)
            for j in range(d.shape[0]):
                d[j] = tm[j] + ch[j]
        else:
            d[:] = tm


@njit(**_JIT)
def _through_R(DRAW_t, W, tmp, hmask, has_hmask, dh, carry, has_keep, b0, j0, j1, sync):
    """The end of a backward step: ``dh[:, j0:j1] <- (DRAW_t @ R[:, j0:j1]) * hmask (+ carry)``. With
    ``sync``, first the barrier: the matmul reads every part's columns of DRAW_t."""
    if sync:
        _barrier()
    _rec_grad(DRAW_t, W, tmp, hmask, has_hmask, b0, j0)
    _add_rec(dh, tmp, carry, has_keep, j0, j1)


# ---- Elman RNN (ElmanCell: h_t = phi(xg_t + LN(R h_{t-1}) + b_hh)) ----------------------------------

@njit(**_JIT)
def rnn_forward(xg, bhh, relu, layer_norm, ln_g, has_hmask, hmask, has_keep, keep_h,
                h0, out, HC, HIN, UH, RSH, W, b0, b1, j0, j1, sync):
    """Forward over T steps. HC (T, B, H) receives the cell output before keep-mixing (may alias out)."""
    T, _, H = out.shape
    nj = j1 - j0
    nb = b1 - b0
    hg = np.empty((nb, nj), out.dtype)
    buf = np.empty((nb, H), out.dtype)
    bh = _seg(bhh, 0, H, j0, j1)
    for t in range(T):
        src = _rec_input(t, h0, out, hmask, has_hmask, HIN, b0, b1, j0, buf)
        _matmul(src, W, hg)
        if layer_norm:
            _ln_rows(hg, H, ln_g, 0, UH[t, b0:b1], RSH[t, b0:b1], 0)
        prev = h0[b0:b1] if t == 0 else out[t - 1, b0:b1]
        for bl in range(nb):
            b = b0 + bl
            x = _seg(xg[t, b], 0, H, j0, j1)
            r = hg[bl]
            hc = _seg(HC[t, b], 0, H, j0, j1)
            o = _seg(out[t, b], 0, H, j0, j1)
            for j in range(nj):
                a = x[j] + r[j] + bh[j]
                hn = (a if a > 0.0 else 0.0) if relu else _tanh(a, out)
                hc[j] = hn
                o[j] = hn
            if has_keep:
                p = _seg(prev[bl], 0, H, j0, j1)
                kh = _seg(keep_h[t, b], 0, H, j0, j1)
                for j in range(nj):
                    o[j] = kh[j] * p[j] + (1.0 - kh[j]) * hc[j]
        if sync:
            _barrier()


@njit(**_JIT)
def rnn_backward(relu, layer_norm, ln_g, has_hmask, hmask, has_keep, keep_h, has_dout, dout, dhT,
                 HC, UH, RSH, DG, DRAW, dh0, dbhh, dln_g, W, b0, b1, j0, j1, sync):
    """Backward over T steps: DG = d xg, DRAW = d(R h) (equal to DG without layer norm), dh0; the sum of
    DG over steps and rows (= d b_hh) accumulated in ``dbhh``."""
    T, _, H = HC.shape
    nj = j1 - j0
    nb = b1 - b0
    dh = dhT[b0:b1].copy()
    carry = np.zeros((nb, H), HC.dtype)
    tmp = np.empty((nb, nj), HC.dtype)
    db = _seg(dbhh, 0, H, j0, j1)
    for t in range(T - 1, -1, -1):
        for bl in range(nb):
            b = b0 + bl
            d = _seg(dh[bl], 0, H, j0, j1)
            if has_dout:
                do = _seg(dout[t, b], 0, H, j0, j1)
                for j in range(nj):
                    d[j] += do[j]
            if has_keep:
                kh = _seg(keep_h[t, b], 0, H, j0, j1)
                ch = _seg(carry[bl], 0, H, j0, j1)
                for j in range(nj):
                    ch[j] = kh[j] * d[j]
                    d[j] -= ch[j]
            hc = _seg(HC[t, b], 0, H, j0, j1)
            dg = _seg(DG[t, b], 0, H, j0, j1)
            for j in range(nj):
                hn = hc[j]
                if relu:
                    g = d[j] if hn > 0.0 else 0.0
                else:
                    g = d[j] * (1.0 - hn * hn)
                dg[j] = g
                db[j] += g
        if layer_norm:
            _ln_rows_backward(DG[t, b0:b1], H, ln_g, 0, UH[t, b0:b1], RSH[t, b0:b1], 0, DRAW[t, b0:b1], dln_g)
        _through_R(DRAW[t, b0:b1], W, tmp, hmask, has_hmask, dh, carry, has_keep, b0, j0, j1, sync)
    dh0[b0:b1, j0:j1] = dh[:, j0:j1]


# ---- LSTM (LSTMCell, gate order i, f, g, o) ----------------------------------------------------------

@njit(**_JIT)
def lstm_forward(xg, bhh, use_i, use_f, use_o, coupled, peephole, peep, act_out, layer_norm, ln_g,
                 ln_cg, ln_cb, has_hmask, hmask, has_keep, keep_h, keep_c,
                 h0, out, CS, CN, HIN, GATES, UH, RSH, UC, RSC, W, b0, b1, j0, j1, sync):
    """Forward over T steps.

    CS (T+1, B, H): c states (CS[0] = c0, set by the caller); CN (T, B, H): the cell's c_t before
    keep-mixing (may alias CS[1:]); GATES (T, B, 4H): i, f, g, o after their activations (1 for a
    dropped gate, 1 - i for f when coupled); UC/RSC: layer norm of c_t (whole rows only: then
    ``j0, j1 = 0, H``). h_t = o * phi(LN(c_t)). Each (t, b) row is processed in short unit-stride passes
    so that LLVM vectorizes them.
    """
    T, _, H = out.shape
    nj = j1 - j0
    nb = b1 - b0
    hg = np.empty((nb, 4 * nj), out.dtype)
    buf = np.empty((nb, H), out.dtype)
    cc = np.empty(nj, out.dtype)
    bi, bf, bg, bo = _segs4(bhh, H, j0, j1)
    pi, pf, po = _segs3(peep, H, j0, j1)
    for t in range(T):
        src = _rec_input(t, h0, out, hmask, has_hmask, HIN, b0, b1, j0, buf)
        _matmul(src, W, hg)
        if layer_norm:
            _ln_rows(hg, 4 * H, ln_g, 0, UH[t, b0:b1], RSH[t, b0:b1], 0)
        hprev = h0[b0:b1] if t == 0 else out[t - 1, b0:b1]
        for bl in range(nb):
            b = b0 + bl
            zi, zf, zg, zo = _segs4(GATES[t, b], H, j0, j1)
            xi, xf, xc, xo = _segs4(xg[t, b], H, j0, j1)
            ri, rf, rc, ro = _segs4(hg[bl], nj, 0, nj)
            cp = _seg(CS[t, b], 0, H, j0, j1)
            cn = _seg(CN[t, b], 0, H, j0, j1)
            hn = _seg(out[t, b], 0, H, j0, j1)
            for j in range(nj):
                zi[j] = xi[j] + ri[j] + bi[j]
                zf[j] = xf[j] + rf[j] + bf[j]
                zg[j] = xc[j] + rc[j] + bg[j]
                zo[j] = xo[j] + ro[j] + bo[j]
            if peephole:
                for j in range(nj):
                    zi[j] += pi[j] * cp[j]
                    zf[j] += pf[j] * cp[j]
            for j in range(nj):
                zi[j] = _sigmoid(zi[j], out)
                zf[j] = _sigmoid(zf[j], out)
                zg[j] = _tanh(zg[j], out)
            if not use_i:
                zi[:] = 1.0
            if coupled:
                for j in range(nj):
                    zf[j] = 1.0 - zi[j]
            elif not use_f:
                zf[:] = 1.0
            for j in range(nj):
                cn[j] = zf[j] * cp[j] + zi[j] * zg[j]
            if peephole:
                for j in range(nj):
                    zo[j] += po[j] * cn[j]
            if use_o:
                for j in range(nj):
                    zo[j] = _sigmoid(zo[j], out)
            else:
                zo[:] = 1.0
            if layer_norm:
                mu = 0.0
                for j in range(nj):
                    mu += cn[j]
                mu /= nj
                var = 0.0
                for j in range(nj):
                    var += (cn[j] - mu) * (cn[j] - mu)
                rs = 1.0 / math.sqrt(var / nj + LN_EPS)
                RSC[t, b, 0] = rs
                uc = UC[t, b]
                for j in range(nj):
                    uc[j] = (cn[j] - mu) * rs
                    cc[j] = uc[j] * ln_cg[j] + ln_cb[j]
            else:
                cc[:] = cn
            if act_out:
                for j in range(nj):
                    hn[j] = zo[j] * _tanh(cc[j], out)
            else:
                for j in range(nj):
                    hn[j] = zo[j] * cc[j]
            if has_keep:  # otherwise CN aliases CS[1:] and c_t is already in place
                hp = _seg(hprev[bl], 0, H, j0, j1)
                cs = _seg(CS[t + 1, b], 0, H, j0, j1)
                kh = _seg(keep_h[t, b], 0, H, j0, j1)
                kc = _seg(keep_c[t, b], 0, H, j0, j1)
                for j in range(nj):
                    hn[j] = kh[j] * hp[j] + (1.0 - kh[j]) * hn[j]
                    cs[j] = kc[j] * cp[j] + (1.0 - kc[j]) * cn[j]
        if sync:
            _barrier()


@njit(**_JIT)
def lstm_backward(use_i, use_f, use_o, coupled, peephole, peep, act_out, layer_norm, ln_g, ln_cg, ln_cb,
                  has_hmask, hmask, has_keep, keep_h, keep_c, has_dout, dout, dhT, dcT,
                  CS, CN, GATES, UH, RSH, UC, RSC, DRAW, dh0, dc0, dbhh, dpeep, dln_g, dln_cg, dln_cb,
                  W, b0, b1, j0, j1, sync):
    """Backward over T steps: GATES is overwritten, step by step, with DG = d xg (= d of the
    pre-activations a_t; each unit's gates are read before its gradients are written, through the same
    views, so LLVM sees no aliasing); DRAW = d(R h) (GATES itself without layer norm), dh0, dc0, and
    accumulated over all steps: the sum of DG (= d b_hh) and the peephole / layer-norm gradients."""
    T, _, H = CN.shape
    nj = j1 - j0
    nb = b1 - b0
    dh = dhT[b0:b1].copy()
    dc = dcT[b0:b1].copy()
    carry = np.zeros((nb, H), CN.dtype)
    carry_c = np.zeros((nb, H), CN.dtype)
    tmp = np.empty((nb, nj), CN.dtype)
    a = np.empty(nj, CN.dtype)
    dy = np.empty(nj, CN.dtype)
    dct = np.empty(nj, CN.dtype)
    dbi, dbf, dbg, dbo = _segs4(dbhh, H, j0, j1)
    pi, pf, po = _segs3(peep, H, j0, j1)
    dpi, dpf, dpo = _segs3(dpeep, H, j0, j1)
    for t in range(T - 1, -1, -1):
        for bl in range(nb):
            b = b0 + bl
            d = _seg(dh[bl], 0, H, j0, j1)
            dcb = _seg(dc[bl], 0, H, j0, j1)
            zi, zf, zg, zo = _segs4(GATES[t, b], H, j0, j1)
            dzi, dzf, dzg, dzo = zi, zf, zg, zo  # in place
            cp = _seg(CS[t, b], 0, H, j0, j1)
            cn = _seg(CN[t, b], 0, H, j0, j1)
            if has_dout:
                do = _seg(dout[t, b], 0, H, j0, j1)
                for j in range(nj):
                    d[j] += do[j]
            ch = _seg(carry[bl], 0, H, j0, j1)
            chc = _seg(carry_c[bl], 0, H, j0, j1)
            if has_keep:
                kh = _seg(keep_h[t, b], 0, H, j0, j1)
                kc = _seg(keep_c[t, b], 0, H, j0, j1)
                for j in range(nj):
                    ch[j] = kh[j] * d[j]
                    d[j] -= ch[j]
                    chc[j] = kc[j] * dcb[j]
                    dcb[j] -= chc[j]
            # a = phi(LN(c_t)), recomputed; dy = d(h)/d(phi argument)
            if layer_norm:  # whole rows only
                uc = UC[t, b]
                for j in range(nj):
                    a[j] = uc[j] * ln_cg[j] + ln_cb[j]
            else:
                a[:] = cn
            if act_out:
                for j in range(nj):
                    a[j] = _tanh(a[j], CN)
                    dy[j] = d[j] * zo[j] * (1.0 - a[j] * a[j])
            else:
                for j in range(nj):
                    dy[j] = d[j] * zo[j]
            if layer_norm:
                uc = UC[t, b]
                rs = RSC[t, b, 0]
                mg = 0.0
                mgu = 0.0
                for j in range(nj):
                    dln_cb[j] += dy[j]
                    dln_cg[j] += dy[j] * uc[j]
                    g = dy[j] * ln_cg[j]
                    mg += g
                    mgu += g * uc[j]
                mg /= nj
                mgu /= nj
                for j in range(nj):
                    dy[j] = rs * (dy[j] * ln_cg[j] - mg - uc[j] * mgu)
            # output gate, then c_t = f * c_{t-1} + i * g
            if use_o:
                for j in range(nj):
                    o = zo[j]
                    dzo[j] = d[j] * a[j] * o * (1.0 - o)
            else:
                dzo[:] = 0.0
            for j in range(nj):
                dct[j] = dcb[j] + dy[j]
            if peephole:
                for j in range(nj):
                    dct[j] += dzo[j] * po[j]
                    dpo[j] += dzo[j] * cn[j]
            for j in range(nj):  # c_t = f * c_{t-1} + i * g, with i, f, g read before any is overwritten
                i = zi[j]
                f = zf[j]
                g = zg[j]
                d_ = dct[j]
                dcb[j] = d_ * f
                dzg[j] = d_ * i * (1.0 - g * g)
                if use_i:
                    dzi[j] = d_ * (g - cp[j] if coupled else g) * i * (1.0 - i)
                else:
                    dzi[j] = 0.0
                dzf[j] = d_ * cp[j] * f * (1.0 - f) if use_f else 0.0
            if peephole:
                for j in range(nj):
                    dpi[j] += dzi[j] * cp[j]
                    dpf[j] += dzf[j] * cp[j]
                    dcb[j] += dzi[j] * pi[j] + dzf[j] * pf[j]
            if has_keep:
                for j in range(nj):
                    dcb[j] += chc[j]
            for j in range(nj):
                dbi[j] += dzi[j]
                dbf[j] += dzf[j]
                dbg[j] += dzg[j]
                dbo[j] += dzo[j]
        if layer_norm:
            _ln_rows_backward(GATES[t, b0:b1], 4 * H, ln_g, 0, UH[t, b0:b1], RSH[t, b0:b1], 0, DRAW[t, b0:b1],
                              dln_g)
        _through_R(DRAW[t, b0:b1], W, tmp, hmask, has_hmask, dh, carry, has_keep, b0, j0, j1, sync)
    dh0[b0:b1, j0:j1] = dh[:, j0:j1]
    dc0[b0:b1, j0:j1] = dc[:, j0:j1]


# ---- GRU (GRUCell, gate order r, z, n) -------------------------------------------------------------

@njit(**_JIT)
def gru_forward(xg, bhh, layer_norm, ln_g, has_hmask, hmask, has_keep, keep_h,
                h0, out, HIN, GATES, HN, UH, RSH, W, b0, b1, j0, j1, sync):
    """Forward over T steps, reset after the matmul: n = tanh(xn + r * (LN(R_n h) + b_hn)).

    GATES (T, B, 3H): r, z, n; HN (T, B, H): the recurrent n term ``LN(R_n h)_n + b_hn``.
    """
    T, _, H = out.shape
    nj = j1 - j0
    nb = b1 - b0
    hg = np.empty((nb, 3 * nj), out.dtype)
    buf = np.empty((nb, H), out.dtype)
    br, bz, bn = _segs3(bhh, H, j0, j1)
    for t in range(T):
        src = _rec_input(t, h0, out, hmask, has_hmask, HIN, b0, b1, j0, buf)
        _matmul(src, W, hg)
        if layer_norm:
            _ln_rows(hg, 3 * H, ln_g, 0, UH[t, b0:b1], RSH[t, b0:b1], 0)
        hprev = h0[b0:b1] if t == 0 else out[t - 1, b0:b1]
        for bl in range(nb):
            b = b0 + bl
            xr, xz, xn = _segs3(xg[t, b], H, j0, j1)
            rr, rz, rn = _segs3(hg[bl], nj, 0, nj)
            gr, gz, gn = _segs3(GATES[t, b], H, j0, j1)
            hnt = _seg(HN[t, b], 0, H, j0, j1)
            hp = _seg(hprev[bl], 0, H, j0, j1)
            kh = _seg(keep_h[t, b], 0, H, j0, j1)
            o = _seg(out[t, b], 0, H, j0, j1)
            for j in range(nj):
                r = _sigmoid(xr[j] + rr[j] + br[j], out)
                z = _sigmoid(xz[j] + rz[j] + bz[j], out)
                hn = rn[j] + bn[j]
                n = _tanh(xn[j] + r * hn, out)
                h = n + z * (hp[j] - n)
                gr[j] = r
                gz[j] = z
                gn[j] = n
                hnt[j] = hn
                if has_keep:
                    h = kh[j] * hp[j] + (1.0 - kh[j]) * h
                o[j] = h
        if sync:
            _barrier()


@njit(**_JIT)
def gru_backward(layer_norm, ln_g, has_hmask, hmask, has_keep, keep_h, has_dout, dout, dhT,
                 h0, out, GATES, HN, UH, RSH, DPOST, DRAW, dh0, dbhh, dln_g, W, b0, b1, j0, j1, sync):
    """Backward over T steps (reset after). GATES is overwritten, step by step, with DG = d xg (in place,
    as in :func:`lstm_backward`); DPOST = d(LN(R h) + b_hh) (its sum is d b_hh, also accumulated in
    ``dbhh``); DRAW = d(R h) (DPOST itself without layer norm)."""
    T, _, H = out.shape
    nj = j1 - j0
    nb = b1 - b0
    dh = dhT[b0:b1].copy()
    acc = np.zeros((nb, H), out.dtype)
    tmp = np.empty((nb, nj), out.dtype)
    dbr, dbz, dbn = _segs3(dbhh, H, j0, j1)
    for t in range(T - 1, -1, -1):
        hprev = h0[b0:b1] if t == 0 else out[t - 1, b0:b1]
        for bl in range(nb):
            b = b0 + bl
            dv = _seg(dh[bl], 0, H, j0, j1)
            do = _seg(dout[t, b], 0, H, j0, j1) if has_dout else dv
            kh = _seg(keep_h[t, b], 0, H, j0, j1)
            gr, gz, gn = _segs3(GATES[t, b], H, j0, j1)
            dgr, dgz, dgn = gr, gz, gn  # in place
            dpr, dpz, dpn = _segs3(DPOST[t, b], H, j0, j1)
            hnt = _seg(HN[t, b], 0, H, j0, j1)
            hp = _seg(hprev[bl], 0, H, j0, j1)
            ac = _seg(acc[bl], 0, H, j0, j1)
            for j in range(nj):
                d = dv[j]
                if has_dout:
                    d += do[j]
                c = 0.0
                if has_keep:
                    c = kh[j] * d
                    d -= c
                r = gr[j]
                z = gz[j]
                n = gn[j]
                dan = d * (1.0 - z) * (1.0 - n * n)
                daz = d * (hp[j] - n) * z * (1.0 - z)
                dar = dan * hnt[j] * r * (1.0 - r)
                ac[j] = c + d * z
                dgr[j] = dar
                dgz[j] = daz
                dgn[j] = dan
                dpr[j] = dar
                dpz[j] = daz
                dpn[j] = dan * r
                dbr[j] += dar
                dbz[j] += daz
                dbn[j] += dan * r
        if layer_norm:
            _ln_rows_backward(DPOST[t, b0:b1], 3 * H, ln_g, 0, UH[t, b0:b1], RSH[t, b0:b1], 0, DRAW[t, b0:b1],
                              dln_g)
        _through_R(DRAW[t, b0:b1], W, tmp, hmask, has_hmask, dh, acc, True, b0, j0, j1, sync)
    dh0[b0:b1, j0:j1] = dh[:, j0:j1]


@njit(**_JIT)
def gru_cho_forward(xg, bhh, layer_norm, ln_g, has_hmask, hmask, has_keep, keep_h,
                    h0, out, HIN, Q, GATES, UH, RSH, W0, W1, b0, b1, j0, j1, sync):
    """Forward over T steps, reset before the matmul (Cho et al.): n = tanh(xn + LN(R_n (r h)) + b_hn).

    Two recurrent parts: (r, z) from ``h * hmask`` with W0 (R_rz); n from Q = ``r * h * hmask``
    with W1 (R_n). GATES (T, B, 3H): r, z, n. Whole rows only (``j0, j1 = 0, H``; ``sync`` unused): the
    n part needs ``r * h`` of every unit.
    """
    T, _, H = out.shape
    nb = b1 - b0
    hg = np.empty((nb, 2 * H), out.dtype)
    hq = np.empty((nb, H), out.dtype)
    for t in range(T):
        src = _rec_input(t, h0, out, hmask, has_hmask, HIN, b0, b1, 0, hq)
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
def gru_cho_backward(layer_norm, ln_g, has_hmask, hmask, has_keep, keep_h, has_dout, dout, dhT,
                     h0, out, GATES, UH, RSH, DG, DRAW0, DRAW1, dh0, dln_g, W0, W1, b0, b1, j0, j1, sync):
    """Backward over T steps (reset before). DG = d xg (also d of the post-norm projections, so its
    sum is d b_hh); DRAW0 (T, B, 2H) = d(R_rz h), DRAW1 (T, B, H) = d(R_n q). Whole rows only."""
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
        _rec_grad(DRAW1[t, b0:b1], W1, tmp, hmask, has_hmask, b0, 0)  # tmp = d q: d(r * h)
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
        _rec_grad(DRAW0[t, b0:b1], W0, tmp, hmask, has_hmask, b0, 0)
        for b in range(nb):
            for j in range(H):
                dh[b, j] = tmp[b, j] + acc[b, j]
    dh0[b0:b1] = dh
