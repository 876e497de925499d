"""The hand-written persistent Triton kernels of ``backend="triton_persistent"``: a whole time loop,
forward or backward, in one launch, for rnnkit's built-in RNN, LSTM and GRU variants at small H.

Layout: tile-level math functions per family (``_lstm_cell`` / ``_lstm_bwd_cell``, ``_gru_cell``, ...)
that take and return (BLOCK_B, BLOCK_H) float32 tiles; ``persistent_fwd`` / ``persistent_bwd`` call them
inside a loop over time with the recurrent matmul done by ``tl.dot``. (The per-step kernels of
``backend="triton"`` are generated from each cell's declaration: :mod:`rnnkit.kernels.triton_generated`.)

Imported lazily by :mod:`rnnkit.kernels.triton_persistent` (never at ``import rnnkit``). Rows of a tile
are batch entries, columns hidden units; gate ``k`` of a (B, G*H) tensor lives in columns
``[k*H, (k+1)*H)``.

Pointer conventions (all row-major, the row stride is passed where it is not H):
    xg      (B, G*H)  input pre-activations of the step, ``W x_t + b_ih`` (x dtype)
    hg      (B, g*H)  raw recurrent projection ``(h * hmask) R^T (+ b_hh)`` from cuBLAS (x dtype)
    h0, c0  (B, H)    state before the step, float32; h1, c1 the state after it
    y       (B, H)    the step's output (x dtype); ``hin`` the next recurrent-matmul input h * hmask
    keep_*  (B, H)    zoneout / length mixing ``new = cell + keep * (prev - cell)``, given by strides
                      (0 strides broadcast); ``omask`` (B,) output mask
    dh, dc  (B, H)    float32 running gradients w.r.t. the state, excluding the recurrent-matmul
                      term ``dmm = D_{t+1} R`` which the next (earlier) step's kernel adds itself
    D       (B, g*H)  gradient w.r.t. the raw recurrent projection (the input of dR and dmm)
    acc_*   (B, N)    float32 per-row accumulators of parameter gradients, summed over B at the end
Everything is computed in float32 whatever the storage dtype. The math mirrors ``forward`` and
``backward`` of the cells in :mod:`rnnkit.cells` line by line; the backward recomputes the step's
activations from ``xg``, ``hg`` and the previous state instead of storing them.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton decides when a kernel is defined whether it will be interpreted (TRITON_INTERPRET=1).
if hasattr(triton, "knobs"):  # Triton >= 3.4
    INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
else:
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
LN_EPS: tl.constexpr = tl.constexpr(1e-5)  # = rnnkit.cells.base.LN_EPS (asserted by the tests)


# ---- scalar helpers ---------------------------------------------------------------------------------
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1: exact in the limits and free of inf/inf for large |x|.
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _ld(ptr, rows, cols, k, H, stride, m):
    """Gate ``k`` tile of a (B, stride) row-major tensor, as float32 (0 outside ``m``)."""
    return tl.load(ptr + rows[:, None] * stride + k * H + cols[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _st(ptr, val, rows, cols, k, H, stride, m):
    tl.store(ptr + rows[:, None] * stride + k * H + cols[None, :], val.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _vec(ptr, cols, k, H):
    """Gate ``k`` slice of a parameter vector, as a float32 (1, BLOCK_H) row."""
    return tl.load(ptr + k * H + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _ld2(ptr, rows, cols, sb, sh, m):
    """A (B, H) tensor given by strides (zero strides broadcast), as float32."""
    return tl.load(ptr + rows[:, None] * sb + cols[None, :] * sh, mask=m, other=0.0).to(tl.float32)


# ---- layer norm over 1-4 gate tiles of a row ----------------------------------------------------------
@triton.jit
def _ln_rstd(mu_num, a, b, c, d, m, N, NT: tl.constexpr):
    """Mean and 1/std of the first NT tiles (a, b, c, d) of each row, N elements per row."""
    mu = mu_num / N
    ca = tl.where(m, a - mu[:, None], 0.0)
    var = tl.sum(ca * ca, 1)
    if NT > 1:
        cb = tl.where(m, b - mu[:, None], 0.0)
        var += tl.sum(cb * cb, 1)
    if NT > 2:
        cc = tl.where(m, c - mu[:, None], 0.0)
        var += tl.sum(cc * cc, 1)
    if NT > 3:
        cd = tl.where(m, d - mu[:, None], 0.0)
        var += tl.sum(cd * cd, 1)
    return mu, 1.0 / tl.sqrt(var / N + LN_EPS)


@triton.jit
def _ln_stats(a, b, c, d, m, N, NT: tl.constexpr):
    s = tl.sum(a, 1)
    if NT > 1:
        s += tl.sum(b, 1)
    if NT > 2:
        s += tl.sum(c, 1)
    if NT > 3:
        s += tl.sum(d, 1)
    return _ln_rstd(s, a, b, c, d, m, N, NT)


@triton.jit
def _ln_hat(x, mu, rstd, m):
    return tl.where(m, (x - mu[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _ln_bwd_means(ga, gb, gc, gd, ua, ub, uc, ud, N, NT: tl.constexpr):
    """Row means of g and g * u_hat over NT tiles (g = dy * gain)."""
    s1 = tl.sum(ga, 1)
    s2 = tl.sum(ga * ua, 1)
    if NT > 1:
        s1 += tl.sum(gb, 1)
        s2 += tl.sum(gb * ub, 1)
    if NT > 2:
        s1 += tl.sum(gc, 1)
        s2 += tl.sum(gc * uc, 1)
    if NT > 3:
        s1 += tl.sum(gd, 1)
        s2 += tl.sum(gd * ud, 1)
    return s1 / N, s2 / N


@triton.jit
def _ln_du(g, u, rstd, mg, mgu, m):
    """du = rstd * (g - mean(g) - u_hat * mean(g * u_hat)), 0 outside the mask."""
    return tl.where(m, rstd[:, None] * (g - mg[:, None] - u * mgu[:, None]), 0.0)


# ---- LSTM (every variant: peephole, CIFG, dropped gates, no output activation, layer norm) ------------
@triton.jit
def _lstm_cell(xi, xf, xc, xo, hi, hf, hc, ho, c, cols, m, H, wch, lnh_w, b_hh, lnc_w, lnc_b,
               USE_I: tl.constexpr, USE_F: tl.constexpr, USE_O: tl.constexpr, COUPLED: tl.constexpr,
               PEEP: tl.constexpr, ACT: tl.constexpr, LN: tl.constexpr, LN_BIAS: tl.constexpr):
    """LSTMCell.forward: gates (i, f, g, o), c_new, a = phi(LN(c_new)), h = o * a (unused gates = 1).

    ``x*`` are the input pre-activation tiles, ``h*`` the raw recurrent projection tiles.
    """
    ui = hi
    uf = hf
    uc_ = hc
    uo = ho
    rstd_h = tl.sum(hi, 1) * 0.0
    if LN:
        mu, rstd_h = _ln_stats(hi, hf, hc, ho, m, 4 * H, 4)
        ui = _ln_hat(hi, mu, rstd_h, m)
        uf = _ln_hat(hf, mu, rstd_h, m)
        uc_ = _ln_hat(hc, mu, rstd_h, m)
        uo = _ln_hat(ho, mu, rstd_h, m)
        hi = ui * _vec(lnh_w, cols, 0, H)
        hf = uf * _vec(lnh_w, cols, 1, H)
        hc = uc_ * _vec(lnh_w, cols, 2, H)
        ho = uo * _vec(lnh_w, cols, 3, H)
        if LN_BIAS:
            hi += _vec(b_hh, cols, 0, H)
            hf += _vec(b_hh, cols, 1, H)
            hc += _vec(b_hh, cols, 2, H)
            ho += _vec(b_hh, cols, 3, H)
    ai = xi + hi
    af = xf + hf
    ag = xc + hc
    ao = xo + ho
    one = ai * 0.0 + 1.0
    i = one
    if USE_I:
        if PEEP:
            i = _sigmoid(ai + _vec(wch, cols, 0, H) * c)
        else:
            i = _sigmoid(ai)
    f = one
    if COUPLED:
        f = 1.0 - i
    elif USE_F:
        if PEEP:
            f = _sigmoid(af + _vec(wch, cols, 1, H) * c)
        else:
            f = _sigmoid(af)
    g = _tanh(ag)
    c_new = f * c + i * g
    o = one
    if USE_O:
        if PEEP:
            o = _sigmoid(ao + _vec(wch, cols, 2, H) * c_new)
        else:
            o = _sigmoid(ao)
    cc = c_new
    u_c = c_new
    rstd_c = rstd_h
    if LN:
        cm = tl.where(m, c_new, 0.0)
        mu_c, rstd_c = _ln_stats(cm, cm, cm, cm, m, H, 1)
        u_c = _ln_hat(cm, mu_c, rstd_c, m)
        cc = u_c * _vec(lnc_w, cols, 0, H) + _vec(lnc_b, cols, 0, H)
    a = cc
    if ACT:
        a = _tanh(cc)
    h_new = o * a
    return i, f, g, o, c_new, a, h_new, ui, uf, uc_, uo, rstd_h, u_c, rstd_c


@triton.jit
def _lstm_bwd_cell(dh, dc, c, xi, xf, xc, xo, hi, hf, hc, ho, cols, m, H, wch, lnh_w, b_hh, lnc_w, lnc_b,
                   USE_I: tl.constexpr, USE_F: tl.constexpr, USE_O: tl.constexpr, COUPLED: tl.constexpr,
                   PEEP: tl.constexpr, ACT: tl.constexpr, LN: tl.constexpr, LN_BIAS: tl.constexpr):
    """LSTMCell.backward of one step given d(new h), d(new c) of the cell (keep carry already removed).

    Returns d xg (4 tiles), D = d(raw recurrent projection) (4 tiles), d c_prev, and the per-row
    parameter-gradient contributions: peepholes (3), ln_weight_hh (4), bias_hh (4), ln_weight_c, ln_bias_c.
    """
    i, f, g, o, c_new, a, h_new, ui, uf, uc_, uo, rstd_h, u_c, rstd_c = _lstm_cell(
        xi, xf, xc, xo, hi, hf, hc, ho, c, cols, m, H, wch, lnh_w, b_hh, lnc_w, lnc_b,
        USE_I, USE_F, USE_O, COUPLED, PEEP, ACT, LN, LN_BIAS)
    zero = dh * 0.0
    # h = o * a,  a = phi(LN(c_new))
    da = dh * o
    if ACT:
        da = da * (1.0 - a * a)
    g_lnc_b = zero
    g_lnc_w = zero
    if LN:
        g_lnc_b = da
        g_lnc_w = da * u_c
        gc = da * _vec(lnc_w, cols, 0, H)
        mg, mgu = _ln_bwd_means(gc, gc, gc, gc, u_c, u_c, u_c, u_c, H, 1)
        da = _ln_du(gc, u_c, rstd_c, mg, mgu, m)
    dc = dc + da
    dao = zero
    if USE_O:
        dao = dh * a * o * (1.0 - o)
        if PEEP:
            dc = dc + dao * _vec(wch, cols, 2, H)
    # c_new = f * c + i * g
    dag = dc * i * (1.0 - g * g)
    dc_prev = dc * f
    di = dc * g
    daf = zero
    if COUPLED:
        di = di - dc * c
    elif USE_F:
        daf = dc * c * f * (1.0 - f)
    dai = zero
    if USE_I:
        dai = di * i * (1.0 - i)
    g_pi = zero
    g_pf = zero
    g_po = zero
    if PEEP:
        if USE_I:
            g_pi = dai * c
            dc_prev += dai * _vec(wch, cols, 0, H)
        if USE_F:
            g_pf = daf * c
            dc_prev += daf * _vec(wch, cols, 1, H)
        if USE_O:
            g_po = dao * c_new
    Di = dai
    Df = daf
    Dg = dag
    Do = dao
    g_li = zero
    g_lf = zero
    g_lg = zero
    g_lo = zero
    if LN:
        g_li = dai * ui
        g_lf = daf * uf
        g_lg = dag * uc_
        g_lo = dao * uo
        gi = dai * _vec(lnh_w, cols, 0, H)
        gf = daf * _vec(lnh_w, cols, 1, H)
        gg = dag * _vec(lnh_w, cols, 2, H)
        go = dao * _vec(lnh_w, cols, 3, H)
        mg, mgu = _ln_bwd_means(gi, gf, gg, go, ui, uf, uc_, uo, 4 * H, 4)
        Di = _ln_du(gi, ui, rstd_h, mg, mgu, m)
        Df = _ln_du(gf, uf, rstd_h, mg, mgu, m)
        Dg = _ln_du(gg, uc_, rstd_h, mg, mgu, m)
        Do = _ln_du(go, uo, rstd_h, mg, mgu, m)
    # with layer norm, bias_hh is added after it: its gradient is d(pre-activation) = d xg
    return (dai, daf, dag, dao, Di, Df, Dg, Do, dc_prev, g_pi, g_pf, g_po, g_li, g_lf, g_lg, g_lo,
            g_lnc_w, g_lnc_b)


# ---- GRU, reset after the matmul (torch.nn.GRU form), optionally layer-normalised ----------------------
@triton.jit
def _gru_cell(xr, xz, xn, hr, hz, hn, cols, m, H, lnh_w, b_hh, LN: tl.constexpr, LN_BIAS: tl.constexpr):
    """GRUCell.forward (reset_after): r, z, n and the normalised n projection ``hn``."""
    ur = hr
    uz = hz
    un = hn
    rstd = tl.sum(hr, 1) * 0.0
    if LN:
        mu, rstd = _ln_stats(hr, hz, hn, hn, m, 3 * H, 3)
        ur = _ln_hat(hr, mu, rstd, m)
        uz = _ln_hat(hz, mu, rstd, m)
        un = _ln_hat(hn, mu, rstd, m)
        hr = ur * _vec(lnh_w, cols, 0, H)
        hz = uz * _vec(lnh_w, cols, 1, H)
        hn = un * _vec(lnh_w, cols, 2, H)
        if LN_BIAS:
            hr += _vec(b_hh, cols, 0, H)
            hz += _vec(b_hh, cols, 1, H)
            hn += _vec(b_hh, cols, 2, H)
    r = _sigmoid(xr + hr)
    z = _sigmoid(xz + hz)
    n = _tanh(xn + r * hn)
    return r, z, n, hn, ur, uz, un, rstd


@triton.jit
def _gru_bwd_cell(dh, h, xr, xz, xn, hr, hz, hn, cols, m, H, lnh_w, b_hh, LN: tl.constexpr, LN_BIAS: tl.constexpr):
    """GRUCell.backward (reset_after=True) of one step given d(new h) of the cell.

    Returns d xg (3 tiles), D (3 tiles), the direct part of d h_prev (dh * z), and the per-row
    contributions to ln_weight_hh (3) and bias_hh (3; with layer norm, where bias_hh follows the norm).
    """
    r, z, n, hn_, ur, uz, un, rstd = _gru_cell(xr, xz, xn, hr, hz, hn, cols, m, H, lnh_w, b_hh, LN, LN_BIAS)
    dn = dh * (1.0 - z)
    daz = dh * (h - n) * z * (1.0 - z)
    direct = dh * z
    dan = dn * (1.0 - n * n)
    dar = dan * hn_ * r * (1.0 - r)
    dhn = dan * r
    Dr = dar
    Dz = daz
    Dn = dhn
    zero = dh * 0.0
    g_lr = zero
    g_lz = zero
    g_ln = zero
    if LN:
        g_lr = dar * ur
        g_lz = daz * uz
        g_ln = dhn * un
        gr = dar * _vec(lnh_w, cols, 0, H)
        gz = daz * _vec(lnh_w, cols, 1, H)
        gn = dhn * _vec(lnh_w, cols, 2, H)
        mg, mgu = _ln_bwd_means(gr, gz, gn, gn, ur, uz, un, un, 3 * H, 3)
        Dr = _ln_du(gr, ur, rstd, mg, mgu, m)
        Dz = _ln_du(gz, uz, rstd, mg, mgu, m)
        Dn = _ln_du(gn, un, rstd, mg, mgu, m)
    return dar, daz, dan, Dr, Dz, Dn, direct, g_lr, g_lz, g_ln, dar, daz, dhn


# ---- GRU, reset before the matmul (Cho et al. 2014): two phases per step around R_n --------------------
@triton.jit
def _cho_gates_cell(xr, xz, hr, hz, cols, m, H, lnh_w, b_hh, LN: tl.constexpr, LN_BIAS: tl.constexpr):
    ur = hr
    uz = hz
    rstd = tl.sum(hr, 1) * 0.0
    if LN:
        mu, rstd = _ln_stats(hr, hz, hz, hz, m, 2 * H, 2)
        ur = _ln_hat(hr, mu, rstd, m)
        uz = _ln_hat(hz, mu, rstd, m)
        hr = ur * _vec(lnh_w, cols, 0, H)
        hz = uz * _vec(lnh_w, cols, 1, H)
        if LN_BIAS:
            hr += _vec(b_hh, cols, 0, H)
            hz += _vec(b_hh, cols, 1, H)
    return _sigmoid(xr + hr), _sigmoid(xz + hz), ur, uz, rstd


@triton.jit
def _cho_n_cell(xn, hn, cols, m, H, lnh_w, b_hh, LN: tl.constexpr, LN_BIAS: tl.constexpr):
    un = hn
    rstd = tl.sum(hn, 1) * 0.0
    if LN:
        mu, rstd = _ln_stats(hn, hn, hn, hn, m, H, 1)
        un = _ln_hat(hn, mu, rstd, m)
        hn = un * _vec(lnh_w, cols, 2, H)
        if LN_BIAS:
            hn += _vec(b_hh, cols, 2, H)
    return _tanh(xn + hn), un, rstd


@triton.jit
def _cho_bwd_b_cell(dh, h, xr, xz, xn, hr, hz, hn, cols, m, H, lnh_w, b_hh, LN: tl.constexpr,
                    LN_BIAS: tl.constexpr):
    """Cho GRU backward, phase 2: through h = n + z (h - n) and n. Returns d a_z, d a_n (= d xg_n),
    D1 = d(raw R_n projection), the direct part dh * z of d h_prev, and ln_weight_hh / bias_hh (n rows)."""
    r, z, ur, uz, rstd = _cho_gates_cell(xr, xz, hr, hz, cols, m, H, lnh_w, b_hh, LN, LN_BIAS)
    n, un, rstd_n = _cho_n_cell(xn, hn, cols, m, H, lnh_w, b_hh, LN, LN_BIAS)
    dn = dh * (1.0 - z)
    daz = dh * (h - n) * z * (1.0 - z)
    dan = dn * (1.0 - n * n)
    D1 = dan
    g_ln = dh * 0.0
    if LN:
        g_ln = dan * un
        gn = dan * _vec(lnh_w, cols, 2, H)
        mg, mgu = _ln_bwd_means(gn, gn, gn, gn, un, un, un, un, H, 1)
        D1 = _ln_du(gn, un, rstd_n, mg, mgu, m)
    return daz, dan, D1, dh * z, g_ln, dan


@triton.jit
def _cho_bwd_a_cell(g, h, daz, xr, xz, hr, hz, cols, m, H, lnh_w, b_hh, LN: tl.constexpr, LN_BIAS: tl.constexpr):
    """Cho GRU backward, phase 1: ``g`` = d(r * h) = (D1 R_n) * hmask. Returns d a_r, D0 (r, z tiles),
    the d h_prev term g * r, and ln_weight_hh / bias_hh contributions of the (r, z) rows."""
    r, z, ur, uz, rstd = _cho_gates_cell(xr, xz, hr, hz, cols, m, H, lnh_w, b_hh, LN, LN_BIAS)
    dar = g * h * r * (1.0 - r)
    Dr = dar
    Dz = daz
    zero = g * 0.0
    g_lr = zero
    g_lz = zero
    if LN:
        g_lr = dar * ur
        g_lz = daz * uz
        gr = dar * _vec(lnh_w, cols, 0, H)
        gz = daz * _vec(lnh_w, cols, 1, H)
        mg, mgu = _ln_bwd_means(gr, gz, gz, gz, ur, uz, uz, uz, 2 * H, 2)
        Dr = _ln_du(gr, ur, rstd, mg, mgu, m)
        Dz = _ln_du(gz, uz, rstd, mg, mgu, m)
    return dar, Dr, Dz, g * r, g_lr, g_lz


# ---- Elman RNN (tanh / relu), optionally layer-normalised ----------------------------------------------
@triton.jit
def _rnn_cell(x, hh, cols, m, H, lnh_w, b_hh, RELU: tl.constexpr, LN: tl.constexpr, LN_BIAS: tl.constexpr):
    """ElmanCell.forward: h = phi(x + LN(hh)); also the LN's u_hat and 1/std."""
    u = hh
    rstd = tl.sum(hh, 1) * 0.0
    if LN:
        mu, rstd = _ln_stats(hh, hh, hh, hh, m, H, 1)
        u = _ln_hat(hh, mu, rstd, m)
        hh = u * _vec(lnh_w, cols, 0, H)
        if LN_BIAS:
            hh += _vec(b_hh, cols, 0, H)
    a = x + hh
    if RELU:
        hc = tl.maximum(a, 0.0)
    else:
        hc = _tanh(a)
    return hc, u, rstd


@triton.jit
def _rnn_bwd_cell(dh, x, hh, cols, m, H, lnh_w, b_hh, RELU: tl.constexpr, LN: tl.constexpr, LN_BIAS: tl.constexpr):
    """ElmanCell.backward of one step: returns d xg, D and the ln_weight_hh contribution."""
    hc, u, rstd = _rnn_cell(x, hh, cols, m, H, lnh_w, b_hh, RELU, LN, LN_BIAS)
    if RELU:
        da = tl.where(hc > 0.0, dh, 0.0)
    else:
        da = dh * (1.0 - hc * hc)
    D = da
    g_l = dh * 0.0
    if LN:
        g_l = da * u
        g = da * _vec(lnh_w, cols, 0, H)
        mg, mgu = _ln_bwd_means(g, g, g, g, u, u, u, u, H, 1)
        D = _ln_du(g, u, rstd, mg, mgu, m)
    return da, D, g_l


# ---- persistent forward: the whole time loop in one launch, R kept on chip -------------------------------
@triton.jit
def _rT(R, k, H, kk, cols):
    """Gate ``k`` of R transposed, as a (BLOCK_H, BLOCK_H) tile: ``[j, n] = R[k*H + n, j]`` (0 padded)."""
    msk = (kk < H)[:, None] & (cols < H)[None, :]
    return tl.load(R + (k * H + cols[None, :]) * H + kk[:, None], mask=msk, other=0.0)


@triton.jit
def _mm(h, rT, b):
    """(BLOCK_B, BLOCK_H) @ (BLOCK_H, BLOCK_H) + bias row, float32 accumulation (no TF32)."""
    return tl.dot(h, rT, input_precision="ieee") + b


@triton.jit
def persistent_fwd(xg, R, b_rec, S_h, S_c, y, Hin, hg_out, Q, hn_out, hmask, keep_h, keep_c, omask,
                   wch, lnh_w, b_hh, lnc_w, lnc_b, T, B, H, s_hg, kh_t, kh_b, kh_h, kc_t, kc_b, kc_h,
                   FAMILY: tl.constexpr, G: tl.constexpr, USE_I: tl.constexpr, USE_F: tl.constexpr,
                   USE_O: tl.constexpr, COUPLED: tl.constexpr, PEEP: tl.constexpr, ACT: tl.constexpr,
                   RELU: tl.constexpr, LN: tl.constexpr, LN_BIAS: tl.constexpr, REC_BIAS: tl.constexpr,
                   HAS_KEEP: tl.constexpr, HAS_OMASK: tl.constexpr, HAS_HMASK: tl.constexpr, SAVE: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """All T steps of one layer/direction for a block of BLOCK_B sequences (FAMILY 0 rnn, 1 lstm, 2 gru,
    3 Cho gru). The G recurrent weight tiles (BLOCK_H x BLOCK_H each) are loaded once and stay in
    registers / shared memory; h and c stay in registers. Per step: G ``tl.dot`` (two phases for the Cho
    GRU) and the same pointwise math as the per-step kernels. With SAVE it also writes what the per-step
    backward kernels read: raw projections ``hg_out`` (and ``Q``, ``hn_out`` for Cho), states, ``Hin``.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    kk = tl.arange(0, BLOCK_H)
    m = (rows < B)[:, None] & (cols < H)[None, :]
    GH = G * H
    r0 = _rT(R, 0, H, kk, cols)
    r1 = r0
    r2 = r0
    r3 = r0
    if G > 1:
        r1 = _rT(R, 1, H, kk, cols)
    if G > 2:
        r2 = _rT(R, 2, H, kk, cols)
    if G > 3:
        r3 = _rT(R, 3, H, kk, cols)
    zero_row = tl.zeros([1, BLOCK_H], dtype=tl.float32)
    b0 = zero_row
    b1 = zero_row
    b2 = zero_row
    b3 = zero_row
    if REC_BIAS:
        b0 = _vec(b_rec, cols, 0, H)
        if G > 1:
            b1 = _vec(b_rec, cols, 1, H)
        if G > 2:
            b2 = _vec(b_rec, cols, 2, H)
        if G > 3:
            b3 = _vec(b_rec, cols, 3, H)
    h = _ld(S_h, rows, cols, 0, H, H, m)
    c = h
    if FAMILY == 1:
        c = _ld(S_c, rows, cols, 0, H, H, m)
    hm = h * 0.0 + 1.0
    if HAS_HMASK:
        hm = _ld(hmask, rows, cols, 0, H, H, m)
    for t in range(T):
        xt = xg + t * B * GH
        hin = (h * hm).to(R.dtype.element_ty)
        a0 = _mm(hin, r0, b0)
        a1 = a0
        a2 = a0
        a3 = a0
        if G > 1:
            a1 = _mm(hin, r1, b1)
        if G > 2 and FAMILY != 3:
            a2 = _mm(hin, r2, b2)
        if G > 3:
            a3 = _mm(hin, r3, b3)
        c_cell = c
        if FAMILY == 1:
            i, f, g, o, c_cell, a, h_cell, ui, uf, uc_, uo, rstd_h, u_c, rstd_c = _lstm_cell(
                _ld(xt, rows, cols, 0, H, GH, m), _ld(xt, rows, cols, 1, H, GH, m),
                _ld(xt, rows, cols, 2, H, GH, m), _ld(xt, rows, cols, 3, H, GH, m), a0, a1, a2, a3, c,
                cols, m, H, wch, lnh_w, b_hh, lnc_w, lnc_b, USE_I, USE_F, USE_O, COUPLED, PEEP, ACT, LN, LN_BIAS)
        elif FAMILY == 2:
            r, z, n, hn, ur, uz, un, rstd = _gru_cell(
                _ld(xt, rows, cols, 0, H, GH, m), _ld(xt, rows, cols, 1, H, GH, m),
                _ld(xt, rows, cols, 2, H, GH, m), a0, a1, a2, cols, m, H, lnh_w, b_hh, LN, LN_BIAS)
            h_cell = n + z * (h - n)
        elif FAMILY == 3:
            r, z, ur, uz, rstd = _cho_gates_cell(_ld(xt, rows, cols, 0, H, GH, m), _ld(xt, rows, cols, 1, H, GH, m),
                                                 a0, a1, cols, m, H, lnh_w, b_hh, LN, LN_BIAS)
            q = (r * h * hm).to(R.dtype.element_ty)
            a2 = _mm(q, r2, b2)
            n, un, rstd_n = _cho_n_cell(_ld(xt, rows, cols, 2, H, GH, m), a2, cols, m, H, lnh_w, b_hh, LN, LN_BIAS)
            h_cell = n + z * (h - n)
            if SAVE:
                _st(Q + t * B * H, q, rows, cols, 0, H, H, m)
                _st(hn_out + t * B * H, a2, rows, cols, 0, H, H, m)
        else:
            h_cell, u, rstd = _rnn_cell(_ld(xt, rows, cols, 0, H, GH, m), a0, cols, m, H, lnh_w, b_hh,
                                        RELU, LN, LN_BIAS)
        if SAVE:
            hgt = hg_out + t * B * s_hg
            _st(hgt, a0, rows, cols, 0, H, s_hg, m)
            if G > 1:
                _st(hgt, a1, rows, cols, 1, H, s_hg, m)
            if G > 2 and FAMILY != 3:
                _st(hgt, a2, rows, cols, 2, H, s_hg, m)
            if G > 3:
                _st(hgt, a3, rows, cols, 3, H, s_hg, m)
        h_new = h_cell
        c_new = c_cell
        if HAS_KEEP:
            h_new = h_cell + _ld2(keep_h + t * kh_t, rows, cols, kh_b, kh_h, m) * (h - h_cell)
            if FAMILY == 1:
                c_new = c_cell + _ld2(keep_c + t * kc_t, rows, cols, kc_b, kc_h, m) * (c - c_cell)
        _st(S_h + (t + 1) * B * H, h_new, rows, cols, 0, H, H, m)
        if FAMILY == 1:
            _st(S_c + (t + 1) * B * H, c_new, rows, cols, 0, H, H, m)
        out = h_new
        if HAS_OMASK:
            out = out * tl.load(omask + t * B + rows, mask=rows < B, other=0.0).to(tl.float32)[:, None]
        _st(y + t * B * H, out, rows, cols, 0, H, H, m)
        if SAVE:
            _st(Hin + (t + 1) * B * H, h_new * hm, rows, cols, 0, H, H, m)
        h = tl.where(m, h_new, 0.0)
        c = tl.where(m, c_new, 0.0)


@triton.jit
def _rN(R, k, H, jj, cols):
    """Gate ``k`` of R as a (BLOCK_H, BLOCK_H) tile: ``[j, n] = R[k*H + j, n]`` (0 padded)."""
    msk = (jj < H)[:, None] & (cols < H)[None, :]
    return tl.load(R + (k * H + jj[:, None]) * H + cols[None, :], mask=msk, other=0.0)


@triton.jit
def persistent_bwd(xg, hg, hn_raw, S_h, S_c, dy, omask, hmask, keep_h, keep_c, R, dxg, D, D1, dh_io, dc_io,
                   acc_wch, acc_lnh, acc_bhh, acc_lnc_w, acc_lnc_b, wch, lnh_w, b_hh, lnc_w, lnc_b,
                   T, B, H, s_hg, kh_t, kh_b, kh_h, kc_t, kc_b, kc_h,
                   FAMILY: tl.constexpr, G: tl.constexpr, USE_I: tl.constexpr, USE_F: tl.constexpr,
                   USE_O: tl.constexpr, COUPLED: tl.constexpr, PEEP: tl.constexpr, ACT: tl.constexpr,
                   RELU: tl.constexpr, LN: tl.constexpr, LN_BIAS: tl.constexpr, STORE_D: tl.constexpr,
                   HAS_KEEP: tl.constexpr, HAS_OMASK: tl.constexpr, HAS_HMASK: tl.constexpr, HAS_DY: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """The whole backward time loop of one layer/direction for BLOCK_B sequences in one launch.

    Mirrors the per-step backward kernels: R's gate tiles stay on chip for ``dmm = D_t R``; the
    running state gradients and the parameter-gradient accumulators stay in registers. ``dh_io``,
    ``dc_io`` hold the gradients w.r.t. the final state on entry and w.r.t. the initial state on exit.
    Writes d xg and D (and D1 for the Cho GRU) of every step for the dW / dR / db matmuls.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    jj = tl.arange(0, BLOCK_H)
    m = (rows < B)[:, None] & (cols < H)[None, :]
    GH = G * H
    dt = R.dtype.element_ty
    r0 = _rN(R, 0, H, jj, cols)
    r1 = r0
    r2 = r0
    r3 = r0
    if G > 1:
        r1 = _rN(R, 1, H, jj, cols)
    if G > 2:
        r2 = _rN(R, 2, H, jj, cols)
    if G > 3:
        r3 = _rN(R, 3, H, jj, cols)
    dh_acc = _ld(dh_io, rows, cols, 0, H, H, m)
    dc_acc = dh_acc * 0.0
    if FAMILY == 1:
        dc_acc = _ld(dc_io, rows, cols, 0, H, H, m)
    hm = dh_acc * 0.0 + 1.0
    if HAS_HMASK:
        hm = _ld(hmask, rows, cols, 0, H, H, m)
    zero = dh_acc * 0.0
    dmm = zero
    a_p0 = zero
    a_p1 = zero
    a_p2 = zero
    a_l0 = zero
    a_l1 = zero
    a_l2 = zero
    a_l3 = zero
    a_b0 = zero
    a_b1 = zero
    a_b2 = zero
    a_b3 = zero
    a_cw = zero
    a_cb = zero
    for tt in range(T):
        t = T - 1 - tt
        dh = dh_acc + dmm * hm
        if HAS_DY:
            d = _ld(dy + t * B * H, rows, cols, 0, H, H, m)
            if HAS_OMASK:
                d = d * tl.load(omask + t * B + rows, mask=rows < B, other=0.0).to(tl.float32)[:, None]
            dh += d
        dc = dc_acc
        carry_h = zero
        carry_c = zero
        if HAS_KEEP:
            carry_h = _ld2(keep_h + t * kh_t, rows, cols, kh_b, kh_h, m) * dh
            dh = dh - carry_h
            if FAMILY == 1:
                carry_c = _ld2(keep_c + t * kc_t, rows, cols, kc_b, kc_h, m) * dc
                dc = dc - carry_c
        xt = xg + t * B * GH
        ht = hg + t * B * s_hg
        dxt = dxg + t * B * GH
        Dt = D + t * B * s_hg
        if FAMILY == 1:
            (dai, daf, dag, dao, Di, Df, Dg, Do, dc_prev, g_pi, g_pf, g_po, g_li, g_lf, g_lg, g_lo, g_lnc_w,
             g_lnc_b) = _lstm_bwd_cell(
                dh, dc, _ld(S_c + t * B * H, rows, cols, 0, H, H, m),
                _ld(xt, rows, cols, 0, H, GH, m), _ld(xt, rows, cols, 1, H, GH, m),
                _ld(xt, rows, cols, 2, H, GH, m), _ld(xt, rows, cols, 3, H, GH, m),
                _ld(ht, rows, cols, 0, H, GH, m), _ld(ht, rows, cols, 1, H, GH, m),
                _ld(ht, rows, cols, 2, H, GH, m), _ld(ht, rows, cols, 3, H, GH, m),
                cols, m, H, wch, lnh_w, b_hh, lnc_w, lnc_b, USE_I, USE_F, USE_O, COUPLED, PEEP, ACT, LN, LN_BIAS)
            _st(dxt, dai, rows, cols, 0, H, GH, m)
            _st(dxt, daf, rows, cols, 1, H, GH, m)
            _st(dxt, dag, rows, cols, 2, H, GH, m)
            _st(dxt, dao, rows, cols, 3, H, GH, m)
            Di = Di.to(dt)
            Df = Df.to(dt)
            Dg = Dg.to(dt)
            Do = Do.to(dt)
            if STORE_D:
                _st(Dt, Di, rows, cols, 0, H, GH, m)
                _st(Dt, Df, rows, cols, 1, H, GH, m)
                _st(Dt, Dg, rows, cols, 2, H, GH, m)
                _st(Dt, Do, rows, cols, 3, H, GH, m)
            dmm = _mm(Di, r0, zero) + _mm(Df, r1, zero) + _mm(Dg, r2, zero) + _mm(Do, r3, zero)
            a_p0 += g_pi
            a_p1 += g_pf
            a_p2 += g_po
            a_l0 += g_li
            a_l1 += g_lf
            a_l2 += g_lg
            a_l3 += g_lo
            a_b0 += dai
            a_b1 += daf
            a_b2 += dag
            a_b3 += dao
            a_cw += g_lnc_w
            a_cb += g_lnc_b
            dh_acc = carry_h
            dc_acc = dc_prev + carry_c
        elif FAMILY == 2:
            h = _ld(S_h + t * B * H, rows, cols, 0, H, H, m)
            dar, daz, dan, Dr, Dz, Dn, direct, g_lr, g_lz, g_ln, g_br, g_bz, g_bn = _gru_bwd_cell(
                dh, h, _ld(xt, rows, cols, 0, H, GH, m), _ld(xt, rows, cols, 1, H, GH, m),
                _ld(xt, rows, cols, 2, H, GH, m), _ld(ht, rows, cols, 0, H, GH, m),
                _ld(ht, rows, cols, 1, H, GH, m), _ld(ht, rows, cols, 2, H, GH, m), cols, m, H, lnh_w, b_hh,
                LN, LN_BIAS)
            _st(dxt, dar, rows, cols, 0, H, GH, m)
            _st(dxt, daz, rows, cols, 1, H, GH, m)
            _st(dxt, dan, rows, cols, 2, H, GH, m)
            Dr = Dr.to(dt)
            Dz = Dz.to(dt)
            Dn = Dn.to(dt)
            _st(Dt, Dr, rows, cols, 0, H, GH, m)
            _st(Dt, Dz, rows, cols, 1, H, GH, m)
            _st(Dt, Dn, rows, cols, 2, H, GH, m)
            dmm = _mm(Dr, r0, zero) + _mm(Dz, r1, zero) + _mm(Dn, r2, zero)
            a_l0 += g_lr
            a_l1 += g_lz
            a_l2 += g_ln
            a_b0 += g_br
            a_b1 += g_bz
            a_b2 += g_bn
            dh_acc = direct + carry_h
        elif FAMILY == 3:
            h = _ld(S_h + t * B * H, rows, cols, 0, H, H, m)
            xr = _ld(xt, rows, cols, 0, H, GH, m)
            xz = _ld(xt, rows, cols, 1, H, GH, m)
            hr = _ld(ht, rows, cols, 0, H, 2 * H, m)
            hz = _ld(ht, rows, cols, 1, H, 2 * H, m)
            daz, dan, d1, direct, g_ln, g_bn = _cho_bwd_b_cell(
                dh, h, xr, xz, _ld(xt, rows, cols, 2, H, GH, m), hr, hz,
                _ld(hn_raw + t * B * H, rows, cols, 0, H, H, m), cols, m, H, lnh_w, b_hh, LN, LN_BIAS)
            d1 = d1.to(dt)
            _st(D1 + t * B * H, d1, rows, cols, 0, H, H, m)
            g = _mm(d1, r2, zero) * hm
            dar, Dr, Dz, dh_r, g_lr, g_lz = _cho_bwd_a_cell(g, h, daz, xr, xz, hr, hz, cols, m, H, lnh_w, b_hh,
                                                            LN, LN_BIAS)
            _st(dxt, dar, rows, cols, 0, H, GH, m)
            _st(dxt, daz, rows, cols, 1, H, GH, m)
            _st(dxt, dan, rows, cols, 2, H, GH, m)
            Dr = Dr.to(dt)
            Dz = Dz.to(dt)
            _st(Dt, Dr, rows, cols, 0, H, 2 * H, m)
            _st(Dt, Dz, rows, cols, 1, H, 2 * H, m)
            dmm = _mm(Dr, r0, zero) + _mm(Dz, r1, zero)
            a_l0 += g_lr
            a_l1 += g_lz
            a_l2 += g_ln
            a_b0 += dar
            a_b1 += daz
            a_b2 += g_bn
            dh_acc = direct + dh_r + carry_h
        else:
            da, d, g_l = _rnn_bwd_cell(dh, _ld(xt, rows, cols, 0, H, GH, m), _ld(ht, rows, cols, 0, H, GH, m),
                                       cols, m, H, lnh_w, b_hh, RELU, LN, LN_BIAS)
            _st(dxt, da, rows, cols, 0, H, GH, m)
            d = d.to(dt)
            if STORE_D:
                _st(Dt, d, rows, cols, 0, H, GH, m)
            dmm = _mm(d, r0, zero)
            a_l0 += g_l
            a_b0 += da
            dh_acc = carry_h
        dh_acc = tl.where(m, dh_acc, 0.0)
        dc_acc = tl.where(m, dc_acc, 0.0)
        dmm = tl.where(m, dmm, 0.0)
    _st(dh_io, dh_acc + dmm * hm, rows, cols, 0, H, H, m)
    if FAMILY == 1:
        _st(dc_io, dc_acc, rows, cols, 0, H, H, m)
        if PEEP:
            _st(acc_wch, a_p0, rows, cols, 0, H, 3 * H, m)
            _st(acc_wch, a_p1, rows, cols, 1, H, 3 * H, m)
            _st(acc_wch, a_p2, rows, cols, 2, H, 3 * H, m)
        if LN:
            _st(acc_lnc_w, a_cw, rows, cols, 0, H, H, m)
            _st(acc_lnc_b, a_cb, rows, cols, 0, H, H, m)
    if LN:
        _st(acc_lnh, a_l0, rows, cols, 0, H, GH, m)
        if LN_BIAS:
            _st(acc_bhh, a_b0, rows, cols, 0, H, GH, m)
        if G > 1:
            _st(acc_lnh, a_l1, rows, cols, 1, H, GH, m)
            _st(acc_lnh, a_l2, rows, cols, 2, H, GH, m)
            if LN_BIAS:
                _st(acc_bhh, a_b1, rows, cols, 1, H, GH, m)
                _st(acc_bhh, a_b2, rows, cols, 2, H, GH, m)
        if G > 3:
            _st(acc_lnh, a_l3, rows, cols, 3, H, GH, m)
            if LN_BIAS:
                _st(acc_bhh, a_b3, rows, cols, 3, H, GH, m)
