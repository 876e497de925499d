"""Building blocks of the generated CPU loops (:mod:`rnnkit.kernels.cpu_generated`).

Fast float32 tanh, the per-step GEMM (MKL's packed SGEMM or numba's ``np.dot``), the barrier of torch's
OpenMP team, and layer norm over rows (a projection's gate blocks) or over one row (``layer_norm(...)``
in a declaration), forward and backward.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.core.types import ExternalFunction

from ..cells.base import LN_EPS

_JIT = {"fastmath": True, "cache": True, "nogil": True, "error_model": "numpy"}


# ---- shared helpers -------------------------------------------------------------------------------

# Eigen's rational approximation of tanh for float32 (|error| < 3e-7 on the clamped range), as
# float32 constants so that the arithmetic stays in float32 (twice the SIMD lanes of float64).
_T_CLAMP, _A13, _A11, _A9, _A7, _A5, _A3, _A1, _B6, _B4, _B2, _B0 = (np.float32(v) for v in (
    7.90531110763549805, -2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
    5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03,
    1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03))


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


# MKL's packed single-precision GEMM, from the MKL that torch's own library carries (the wrapper
# registers these symbols with LLVM before this module compiles: the real ones when torch exports them,
# otherwise stubs that are never called). Pointers are passed as addresses (intp), which is the same
# calling convention on 64-bit platforms, so the compiled code caches across processes.
_sgemm_compute = ExternalFunction("cblas_sgemm_compute", types.void(
    types.intc, types.intc, types.intc, types.intc, types.intc, types.intc, types.intp, types.intc,
    types.intp, types.intc, types.float32, types.intp, types.intc))
_mkl_threads_local = ExternalFunction("MKL_Set_Num_Threads_Local", types.intc(types.intc))
# The barrier of the OpenMP team the wrapper runs unit ranges on: torch's own libgomp (registered like the
# MKL symbols; a stub when torch carries no libgomp, and then the wrapper never splits units).
_barrier = ExternalFunction("GOMP_barrier", types.void())
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
def _matmul_cols(a, off, k, W, out):
    """``out <- a[:, off:off + k] @ M`` for ``W = (M, packed)``: columns of the rows of a wider C array."""
    M, packed = W
    if packed.size > 1:
        m = a.shape[0]
        n = out.shape[1]
        prev = _mkl_threads_local(1)
        _sgemm_compute(_ROW_MAJOR, _NO_TRANS, _PACKED, m, n, k, a.ctypes.data + off * a.itemsize, a.shape[1],
                       packed.ctypes.data, n, np.float32(0.0), out.ctypes.data, n)
        _mkl_threads_local(prev)
    else:
        np.dot(np.ascontiguousarray(a[:, off:off + k]), M, out)


@njit(**_JIT)
def _ln_rows(v, n, gain, goff, uh, rs, k):
    """In place on rows of ``v`` (B, n): v <- gain * u_hat; saves u_hat and 1/std.

    ``gain`` and ``uh`` columns are offset by ``goff`` (a part of a longer projection); ``rs[:, k]``.
    Rows are sliced first: indexing ``uh[b, goff + j]`` with a run-time offset kept LLVM from vectorizing
    (the layer-norm LSTM's forward was 15% slower).
    """
    g = gain[goff:goff + n]
    for b in range(v.shape[0]):
        x = v[b, :n]
        mu = 0.0
        for j in range(n):
            mu += x[j]
        mu /= n
        var = 0.0
        for j in range(n):
            d = x[j] - mu
            var += d * d
        r = 1.0 / math.sqrt(var / n + LN_EPS)
        rs[b, k] = r
        u_hat = uh[b, goff:goff + n]
        for j in range(n):
            u = (x[j] - mu) * r
            u_hat[j] = u
            x[j] = u * g[j]


@njit(**_JIT)
def _ln_rows_backward_db(dy, n, gain, goff, uh, rs, k, dx, dgain, dbias, has_bias=True):
    """Backward of :func:`_ln_rows`: dx (B, n) <- d(input); dgain[goff:] += sum_b dy * u_hat, and with
    ``has_bias`` ``dbias[goff:]`` += sum_b dy (the bias added after the norm);
    ``dx`` may be ``uh``'s own columns (each element is read before it is written). Every loop stores to
    one array (so that LLVM vectorizes it)."""
    gn = gain[goff:goff + n]
    dg = dgain[goff:goff + n]
    db = dbias[goff:goff + n]
    for b in range(dy.shape[0]):
        y = dy[b, :n]
        u_hat = uh[b, goff:goff + n]
        out = dx[b, :n]
        if has_bias:
            for j in range(n):
                db[j] += y[j]
        mg = 0.0
        mgu = 0.0
        for j in range(n):
            g = y[j] * gn[j]
            u = u_hat[j]
            mg += g
            mgu += g * u
            dg[j] += y[j] * u
        mg /= n
        mgu /= n
        r = rs[b, k]
        for j in range(n):
            out[j] = r * (y[j] * gn[j] - mg - u_hat[j] * mgu)


@njit(**_JIT)
def ln_vec(u, gain, bias, has_bias, uh, y):
    """``y <- gain * u_hat (+ bias)`` for one row ``u``; saves u_hat in ``uh`` and returns 1/std."""
    n = u.shape[0]
    mu = 0.0
    for j in range(n):
        mu += u[j]
    mu /= n
    var = 0.0
    for j in range(n):
        d = u[j] - mu
        var += d * d
    r = 1.0 / math.sqrt(var / n + LN_EPS)
    for j in range(n):
        uh[j] = (u[j] - mu) * r
    if has_bias:
        for j in range(n):
            y[j] = uh[j] * gain[j] + bias[j]
    else:
        for j in range(n):
            y[j] = uh[j] * gain[j]
    return r


@njit(**_JIT)
def ln_vec_backward(dy, uh, r, gain, du, first, dgain, dbias, has_bias):
    """Backward of :func:`ln_vec` for one row: ``du`` (+)= d u (assigned if ``first``); dgain, dbias accumulate."""
    n = dy.shape[0]
    if has_bias:
        for j in range(n):
            dbias[j] += dy[j]
    mg = 0.0
    mgu = 0.0
    for j in range(n):
        g = dy[j] * gain[j]
        mg += g
        mgu += g * uh[j]
        dgain[j] += dy[j] * uh[j]
    mg /= n
    mgu /= n
    if first:
        for j in range(n):
            du[j] = r * (dy[j] * gain[j] - mg - uh[j] * mgu)
    else:
        for j in range(n):
            du[j] += r * (dy[j] * gain[j] - mg - uh[j] * mgu)
