"""The fused CPU backend (``backend="cpu"``): the explicit-BPTT skeleton with the time loop compiled.

Same algorithm as :mod:`rnnkit.kernels.bptt` (input projection for all steps in one autograd matmul,
reverse mode over the cell's equations, dR with one matmul over all steps), but each direction of the
recurrence is ONE call into numba loops generated from the cell's declaration
(:mod:`rnnkit.kernels.cpu_generated`) that run every step: per step a BLAS matmul per recurrent
projection into a preallocated buffer plus the equations fused into a few passes per row, with no
Python or torch op per step. What it keeps for the backward pass: the values the derivatives read,
the states, the layer-norm statistics, and a projection's input when it is not a state.

Runs every declaration (incl. recurrent dropout, zoneout and variable lengths through
:class:`~rnnkit.kernels.common.LayerMasks`) in float32 and float64 on the CPU. Compiled code is
cached on disk by numba (``cache=True``): the first call of a cell in a fresh environment compiles
(see :func:`compile_seconds`), later processes load the cache.

Threads (:func:`split`): a call with enough work is split into parts, one per thread, run at once in
torch's own OpenMP team (:class:`_Team`, the threads torch's ops use, still hot after them): batch rows
(no synchronisation per step), or, for small batches, hidden units (each thread multiplies by its own
rows of R and the threads meet at a barrier once per step). Without torch's libgomp, row parts run on a
small thread pool of our own. The count is ``RNNKIT_CPU_THREADS`` or else ``torch.get_num_threads()``.

Per-step GEMM (:func:`blas`): in float32, MKL's packed SGEMM from the MKL inside torch's own library,
with the recurrent weights packed once per call (:func:`_weight`); otherwise numba's ``np.dot``
(scipy's OpenBLAS, loaded single-threaded, see :func:`_load_blas`). Either runs on one thread per
part.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from ..cells.base import Cell, State, Weights
from . import ATEN_ON_CPU, Backend, LayerConfig, cpu_generated, register
from .capability import Capability
from .common import NUMBA_DTYPES, LayerMasks, check_numba_input

DTYPES = NUMBA_DTYPES


MIN_ROWS = 4  # fewest batch rows worth a thread of their own
MIN_UNITS = 128  # fewest hidden units worth a thread of their own
# Fewest recurrent multiply-adds per call (T * B * H * G*H) worth more threads. In torch's own OpenMP
# team, whose threads are hot after any torch op, the split pays from MIN_TEAM_MACS. On threads of our
# own (no libgomp in torch) a second thread costs ~3 ms right after a torch op, because torch's OpenMP
# workers keep spinning on the other core (docs/kernels.md, "Threads"), hence MIN_SPLIT_MACS there.
MIN_TEAM_MACS = 2**24
MIN_SPLIT_MACS = 2**29
# Rows per thread below which the hidden units are split instead (one barrier per step, each thread
# reading only its share of R per step); from here on rows split as well or better, with no barrier.
UNITS_BELOW_ROWS = 2 * MIN_ROWS
# A cell whose step has more than one GEMM level (a projection of a value computed in the step, as the Cho
# GRU's R (r * h)) meets once per level when it splits units: it does so only with this many recurrent
# multiply-adds per step (B * H * G*H) per extra level (fwd+bwd at T = 100 on the 2-core machine: MUT1
# B = 4, H = 512 0.70x the unsplit time, B = 8, H = 256 1.32x; the Cho GRU B = 8: H = 512 0.80x, H = 256
# 1.19x).
UNITS_MACS_PER_LEVEL = 2**21


def threads() -> int:
    """Threads the backend splits a call over: ``RNNKIT_CPU_THREADS``, else torch's intra-op count."""
    env = os.environ.get("RNNKIT_CPU_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"RNNKIT_CPU_THREADS={env!r}: expected a whole number >= 1")
        return n
    return torch.get_num_threads()


def _edges(n: int, size: int, align: int = 1) -> list[tuple[int, int]]:
    edges = [min(size, round(i * size / n / align) * align) for i in range(n)] + [size]
    return list(zip(edges[:-1], edges[1:]))


def one_part(T: int, B: int, H: int, GH: int) -> bool:
    """Whether a call is too small for a second thread whatever the thread count (decided before asking
    for threads: a step of a stream)."""
    return T * B * H * GH < min(MIN_TEAM_MACS, MIN_SPLIT_MACS)


def split(T: int, B: int, H: int, GH: int, units_ok: bool,
          extra_levels: int = 0) -> tuple[list[tuple[int, int, int, int]], bool]:
    """How one call of a loop is spread over threads: the parts ``(b0, b1, j0, j1)`` (batch rows and hidden
    units), one per thread, and whether they split units (then the threads meet at a barrier every step).

    One part if there is one thread or too little work. Units, in ranges of at least ``MIN_UNITS`` on
    64-byte lines, when the batch has 2 rows or more but fewer than ``UNITS_BELOW_ROWS`` per thread and
    ``units_ok`` (:attr:`rnnkit.kernels.cpu_generated.Plan.units_splittable`; a cell with ``extra_levels``
    GEMM levels after the first needs ``UNITS_MACS_PER_LEVEL`` per step for each) and torch's OpenMP team
    is there; otherwise rows, at least ``MIN_ROWS`` per part. The thresholds come from fwd+bwd timings on the
    2-core machine (docs/kernels.md, "Threads"); a single row is a matrix-vector product per step, faster
    on one thread.
    """
    whole = [(0, B, 0, H)]
    if one_part(T, B, H, GH):
        return whole, False
    n = threads()
    team = _team() is not None
    if n == 1 or T * B * H * GH < (MIN_TEAM_MACS if team else MIN_SPLIT_MACS):
        return whole, False
    nu = min(n, H // MIN_UNITS)
    units_ok = units_ok and B * H * GH >= UNITS_MACS_PER_LEVEL * extra_levels
    if team and units_ok and nu > 1 and 2 <= B < UNITS_BELOW_ROWS * n:
        return [(0, B, j0, j1) for j0, j1 in _edges(nu, H, min(16, MIN_UNITS))], True
    nr = min(n, B // MIN_ROWS)
    return [(b0, b1, 0, H) for b0, b1 in _edges(max(nr, 1), B)], False


class _Team:
    """torch's own OpenMP team (its libgomp), for running one call's parts at once.

    The parts run on the threads torch's parallel ops use, which are still hot (spinning) after the
    last torch op; threads of our own would compete with them for the cores. Each thread enters a
    Python callback, which calls its part's compiled loop; the loops release the GIL, so the parts
    really run together, and loops that split units meet at ``GOMP_barrier`` every step.
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.omp_get_thread_num.restype = lib.omp_get_num_threads.restype = ctypes.c_int
        proto = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
        lib.GOMP_parallel.argtypes = [proto, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        lib.GOMP_parallel.restype = None
        self._body = proto(self._run_part)
        self._jobs: dict[int, tuple[list, bool, list]] = {}
        self._next = itertools.count(1)

    def _run_part(self, key: int) -> None:
        # With ``sync``, a part that raised before its loop started would leave the others waiting at the
        # barrier; the calls only differ in their parts, so they fail alike (e.g. typing) or not at all.
        calls, sync, errors = self._jobs[key]
        k, n = self.lib.omp_get_thread_num(), self.lib.omp_get_num_threads()
        if n != len(calls) and sync:  # a smaller team (e.g. nested): the caller runs it whole
            if k == 0:
                errors.append(None)
            return
        try:
            for i in range(k, len(calls), n):
                calls[i]()
        except BaseException as e:  # noqa: BLE001 (re-raised on the calling thread)
            errors.append(e)

    def run(self, calls: list, sync: bool) -> bool:
        """Run ``calls`` (one per thread); False if the team came out smaller and ``sync`` (nothing ran)."""
        key = next(self._next)
        errors: list = []
        self._jobs[key] = (calls, sync, errors)
        try:
            self.lib.GOMP_parallel(self._body, key, len(calls), 0)
        finally:
            del self._jobs[key]
        if None in errors:
            return False
        if errors:
            raise errors[0]
        return True


@functools.cache
def _team() -> _Team | None:
    """torch's OpenMP team when torch runs on the libgomp it ships (Linux wheels), else None."""
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    for name in sorted(os.listdir(libdir)):
        if name.startswith("libgomp") and ".so" in name:
            try:
                lib = ctypes.CDLL(os.path.join(libdir, name))
                lib.GOMP_parallel, lib.GOMP_barrier, lib.omp_get_thread_num  # noqa: B018
            except (OSError, AttributeError):
                return None
            return _Team(lib)
    return None


_POOL: ThreadPoolExecutor | None = None


def _in_pool(calls: list) -> None:
    """Run ``calls`` at once: the first on this thread, the rest on threads of our own."""
    global _POOL
    if _POOL is None or _POOL._max_workers < len(calls) - 1:
        _POOL = ThreadPoolExecutor(len(calls) - 1, thread_name_prefix="rnnkit-cpu")
    futures = [_POOL.submit(c) for c in calls[1:]]
    try:
        calls[0]()
    finally:
        for f in futures:
            f.result()


def _load_blas() -> None:
    """Load the BLAS numba's ``np.dot`` binds to (scipy's OpenBLAS) single-threaded.

    The backend's threads split the batch and each calls the BLAS on its own rows, so the BLAS must
    not start threads of its own: a spinning OpenBLAS pool also slowed every torch op in the process
    (torch.nn.LSTM from 18 to 38 ms on the 2-core machine). OpenBLAS sizes its pool when it loads, so
    the count is set before loading, without changing the environment of anything else.
    """
    if "scipy.linalg.cython_blas" in sys.modules:
        return
    old = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import scipy.linalg.cython_blas  # noqa: F401
    finally:
        if old is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = old


_MKL_CALLED = {  # symbols the compiled loops call, with their C types (stubs take the same)
    "cblas_sgemm_compute": ctypes.CFUNCTYPE(None, *[ctypes.c_int] * 6, ctypes.c_ssize_t, ctypes.c_int,
                                            ctypes.c_ssize_t, ctypes.c_int, ctypes.c_float, ctypes.c_ssize_t,
                                            ctypes.c_int),
    "MKL_Set_Num_Threads_Local": ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int),
}
_MKL_PACKING = ("cblas_sgemm_pack_get_size", "cblas_sgemm_pack")
_GOMP_CALLED = {"GOMP_barrier": ctypes.CFUNCTYPE(None)}
_STUBS: list = []  # keeps the stub callbacks alive


@functools.cache
def _torch_mkl() -> ctypes.CDLL | None:
    """torch's own library when it exports MKL's packed SGEMM (x86 builds of torch carry MKL), else None."""
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        path = os.path.join(libdir, name)
        if os.path.exists(path):
            try:
                lib = ctypes.CDLL(path)
                for sym in (*_MKL_CALLED, *_MKL_PACKING):
                    getattr(lib, sym)
            except (OSError, AttributeError):
                return None
            lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
            lib.cblas_sgemm_pack_get_size.argtypes = [ctypes.c_int] * 4
            lib.cblas_sgemm_pack.restype = None
            lib.cblas_sgemm_pack.argtypes = [*[ctypes.c_int] * 6, ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                                             ctypes.c_void_p]
            return lib
    return None


@functools.cache
def _kernels():
    """The building blocks of the generated loops (:mod:`rnnkit.kernels.cpu_loops`), imported on first use
    (keeps ``import rnnkit`` light); called before any generated loop compiles or loads.

    Before they compile or load: the BLAS numba calls is made single-threaded (also if scipy was
    imported earlier with a larger OpenBLAS pool), and the MKL symbols the loops reference are
    registered with LLVM, pointing into torch's library or, without it, at stubs never called; so is
    the barrier of torch's OpenMP team (:class:`_Team`).
    """
    import llvmlite.binding as llvm
    from threadpoolctl import ThreadpoolController

    _load_blas()
    for lc in ThreadpoolController().lib_controllers:
        if lc.internal_api == "openblas" and "scipy.libs" in lc.filepath and lc.num_threads != 1:
            lc.set_num_threads(1)
    team = _team()
    for lib, called in ((_torch_mkl(), _MKL_CALLED), (team and team.lib, _GOMP_CALLED)):
        for sym, ctype in called.items():
            if lib is not None:
                addr = ctypes.cast(getattr(lib, sym), ctypes.c_void_p).value
            else:
                _STUBS.append(ctype(lambda *args: 0))
                addr = ctypes.cast(_STUBS[-1], ctypes.c_void_p).value
            llvm.add_symbol(sym, addr)
    from . import cpu_loops

    return cpu_loops


def blas(dtype: torch.dtype) -> str:
    """The per-step GEMM for ``dtype``: ``"mkl"`` (packed weights) or ``"openblas"``.

    ``RNNKIT_CPU_BLAS`` = ``auto`` (default: MKL for float32 when torch carries it), ``mkl`` or ``openblas``.
    """
    want = os.environ.get("RNNKIT_CPU_BLAS", "auto")
    if want not in ("auto", "mkl", "openblas"):
        raise ValueError(f"RNNKIT_CPU_BLAS={want!r}: expected auto, mkl or openblas")
    have = _torch_mkl() is not None and dtype == torch.float32
    if want == "mkl" and not have:
        why = "this torch does not export MKL's packed SGEMM" if dtype == torch.float32 else "float32 only"
        raise ValueError(f"RNNKIT_CPU_BLAS='mkl' is not available here ({why}); use auto or openblas")
    return "mkl" if have and want != "openblas" else "openblas"


_ALIGN = 16  # floats: 64 bytes
_NO_PACK = np.zeros(1, np.float32)


def _weight(R: Tensor, transpose: bool, A: _Arrays) -> tuple:
    """The pair ``(matrix, packed)`` that the loops multiply by: ``R^T`` if ``transpose`` else ``R``.

    With MKL, ``packed`` is MKL's packed copy (made once per call, for at most ``A.rows`` rows at a
    time) and the matrix is unused; otherwise the matrix for numba's ``np.dot`` (a C-ordered copy of
    ``R^T``, faster per step, except for one step where the F-ordered view saves the copy) and a dummy.
    """
    Rn = R.numpy()
    if not A.mkl:
        if transpose:
            return (np.ascontiguousarray(Rn.T) if A.T > 1 else Rn.T), _NO_PACK
        return Rn, _NO_PACK
    lib = _torch_mkl()
    k, n = (Rn.shape[1], Rn.shape[0]) if transpose else Rn.shape
    size = lib.cblas_sgemm_pack_get_size(162, A.rows, n, k)  # CblasBMatrix
    raw = np.empty(-(-size // 4) + _ALIGN, np.float32)
    start = (-raw.ctypes.data // 4) % _ALIGN
    dest = raw[start:start + max(2, -(-size // 4))]  # size > 1 is how the loops tell it from _NO_PACK
    lib.cblas_sgemm_pack(101, 162, 112 if transpose else 111, A.rows, n, k, 1.0, Rn.ctypes.data, Rn.shape[1],
                         dest.ctypes.data)  # row-major, B matrix, (no) transpose
    return A.dummy2, dest


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _rec_parts(R: Tensor, cell: Cell) -> tuple[Tensor, ...]:
    """The rows of R for each recurrent projection (one, or (r, z) and n for the reset-before GRU)."""
    return torch.split(R, [g * cell.hidden_size for g in cell.rec_parts])


def _empty(*shape: int, dtype: torch.dtype) -> Tensor:
    return torch.empty(shape, dtype=dtype)


@functools.cache
def _constants(dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, Tensor]:
    """Placeholders for arrays a call does not use (never written), and a zero to broadcast."""
    ndt = np.float32 if dtype == torch.float32 else np.float64
    return np.zeros(1, ndt), np.zeros((1, 1), ndt), np.zeros((1, 1, 1), ndt), torch.zeros(1, 1, 1, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _ones(B: int, H: int, ndt: type) -> np.ndarray:
    """The all-ones recurrent-dropout mask of a call without recurrent dropout (never written)."""
    return np.ones((B, H), ndt)


@functools.lru_cache(maxsize=64)
def _zeros(zero: Tensor, T: int, B: int, H: int) -> np.ndarray:
    """A (T, B, H) view of zeros (no memory of its own): the ``keep`` of a call without zoneout or lengths."""
    return zero.expand(T, B, H).numpy()


class _Arrays:
    """Mask and dummy arrays in the layout the compiled loops expect (one type signature each)."""

    def __init__(self, cell: Cell, masks: LayerMasks, T: int, B: int, GH: int, dtype: torch.dtype,
                 units_ok: bool, extra_levels: int) -> None:
        H, n_state = cell.hidden_size, cell.state_size
        self.T, self.B, self.H = T, B, H
        self.parts, self.units = split(T, B, H, GH, units_ok, extra_levels)
        self.rows = max(b1 - b0 for b0, b1, _, _ in self.parts)
        self.mkl = T > 1 and blas(dtype) == "mkl"  # packing once pays off over several steps
        self.dummy1, self.dummy2, self.dummy3, zero = _constants(dtype)
        self.has_hmask = masks.hmask is not None
        # all ones without recurrent dropout: the loops multiply by it unconditionally in the backward
        self.hmask = _np(masks.hmask) if self.has_hmask else _ones(B, H, self.dummy1.dtype.type)
        self.has_keep = masks.keep is not None
        if self.has_keep:
            # (T or 1, B or 1, H or 1) -> (T, B, H) views with zero strides where broadcast
            self.keep = [k.detach().to(dtype).expand(T, B, H).numpy() for k in masks.keep]
        else:
            self.keep = [_zeros(zero, T, B, H)] * n_state

    def whole(self) -> None:
        """One part for the whole call (when torch's team comes out smaller than the split)."""
        self.parts, self.units, self.rows = [(0, self.B, 0, self.H)], False, self.B


def _weights(R: Tensor, cell: Cell, transpose: bool, A: _Arrays) -> list[tuple]:
    """Per part of ``A.parts``: the weight pairs (:func:`_weight`) of each recurrent projection of ``R``.

    When the parts split units, each gets the rows of R for its units (gate-major: its i, then its f, ...),
    so its matmul yields only its own gate columns; otherwise all parts share one pair per projection.
    """
    views = not A.mkl and not A.units and not (transpose and A.T > 1)  # no copy of R: the pairs can be kept
    key = (R.data_ptr(), R.shape, R.dtype, cell.rec_parts, transpose, A.units, tuple(A.parts))
    if views and key in _VIEWS:
        return _VIEWS[key]
    projections = _rec_parts(R, cell)
    if not A.units:
        out = [tuple(_weight(p, transpose, A) for p in projections)] * len(A.parts)
        if views:
            _keep_views(key, out)
        return out
    H = cell.hidden_size
    out = []
    for _, _, j0, j1 in A.parts:
        mine = [p.view(-1, H, H)[:, j0:j1].reshape(-1, H) if transpose else p[:, j0:j1].contiguous()
                for p in projections]
        out.append(tuple(_weight(m, transpose, A) for m in mine))
    if views:
        _keep_views(key, out)
    return out


# The weight pairs of recent calls that use R in place (views of R, which they keep alive, so that an
# address is never reused while its entry is here): a stream of one-step calls with masks (zoneout in
# eval mode), which the argument cache of :func:`_one_step` does not take, finds its pairs ready.
_VIEWS: dict[tuple, list[tuple]] = {}


def _keep_views(key: tuple, pairs: list[tuple]) -> None:
    if len(_VIEWS) >= 64:
        del _VIEWS[next(iter(_VIEWS))]
    _VIEWS[key] = pairs


def _launch(fn, A: _Arrays, R: Tensor, cell: Cell, transpose: bool, args: tuple,
            accs: tuple[np.ndarray, ...] = ()) -> None:
    """``fn(*args, *(a[k] for a in accs), *W_k, b0, b1, j0, j1, A.units)`` for every part k of ``A.parts``,
    at once: in torch's OpenMP team (:class:`_Team`), or without it on threads of our own (row parts only).

    ``accs`` are per-part accumulators (the caller sums them). ``args`` must be built on the calling
    thread (torch's grad mode, which ``Tensor.numpy()`` checks, is per thread).
    """
    Ws = _weights(R, cell, transpose, A)
    calls = [functools.partial(fn, *args, *(a[k] for a in accs), *Ws[k], *part, A.units)
             for k, part in enumerate(A.parts)]
    if len(calls) == 1:
        calls[0]()
        return
    team = _team()
    if team is None:
        _in_pool(calls)
    elif not team.run(calls, A.units):
        A.whole()
        _launch(fn, A, R, cell, transpose, args, accs)


def _forward_args(cell: Cell, masks: LayerMasks, names: tuple[str, ...], xg: Tensor, b_hh: Tensor | None,
                  rest: tuple[Tensor, ...]) -> tuple:
    """The generated module and the arguments of its forward loop over ``xg`` (first the input's array),
    with fresh buffers: the call's arrays ``A``, ``common``, the states ``ST`` (each (T + 1, B, H), the
    first step not written), the projections' inputs ``PIN``, the saved values and the layer-norm inputs.
    The buffers are numpy arrays: a torch op per buffer costs more than the loop of one step."""
    _kernels()
    d = cell.declaration
    plan = cpu_generated.plan(d)
    dt = xg.dtype
    K = cpu_generated.module(d, _DTYPE_NAMES[dt])
    S, H = cell.state_size, cell.hidden_size
    T, B, _ = xg.shape
    GH = cell.rec_gates * H
    A = _Arrays(cell, masks, T, B, GH, dt, plan.units_splittable, max(0, plan.gemm_levels - 1))
    w = dict(zip(names, rest[S:]))
    projs = plan.projections()
    ndt = A.dummy1.dtype.type
    bhh = _np(b_hh) if b_hh is not None else np.zeros(GH, ndt)
    BH = [bhh[a * H:z * H] for a, z in plan.block_bounds]
    PAR = [_np(w[n]) for n, _ in d.params]
    lng = _np(w["ln_weight_hh"]) if cell.layer_norm else A.dummy1
    ST = [np.empty((T + 1, B, H), ndt) for _ in range(S)]
    PRE = [np.empty((T, B, H), ndt) if A.has_keep else A.dummy3 for _ in sorted(plan.pre)]
    lay = cpu_generated.layout(d)
    SAVE = np.empty((T, B, lay.width * H), ndt)
    PIN = [np.empty((T, B, H), ndt) if plan.pin(p) or A.has_hmask else A.dummy3 for p in projs]
    ln = cell.layer_norm
    UH = np.empty((T, B, GH), ndt) if ln else A.dummy3
    RSH = np.empty((T, B, len(projs)), ndt) if ln else A.dummy3
    LU = [np.empty((T, B, H), ndt) for _ in plan.ln_nodes]
    LR = [np.empty((T, B, 1), ndt) for _ in plan.ln_nodes]
    common = (_np(xg), *BH, *PAR, lng, A.hmask, A.has_hmask, *A.keep, A.has_keep, *ST, *PRE,
              SAVE, *PIN, UH, RSH, *LU, *LR)
    return K, A, common, ST, PIN, SAVE, UH


def _gen_forward(cell: Cell, masks: LayerMasks, names: tuple[str, ...], xg: Tensor, R: Tensor,
                 b_hh: Tensor | None, rest: tuple[Tensor, ...]) -> tuple[Tensor, list[np.ndarray], _Arrays, tuple]:
    """The generated forward loop over ``xg``: the outputs (T, B, H) over ``ST[0][1:]``, the states ``ST``
    (numpy, each (T + 1, B, H)), the call's arrays and what its backward needs."""
    K, A, common, ST, PIN, SAVE, UH = _forward_args(cell, masks, names, xg, b_hh, rest)
    for s, s0 in zip(ST, rest[:len(ST)]):
        s[0] = s0.detach().numpy()
    Rd = R.detach().contiguous()
    _launch(K.forward, A, Rd, cell, True, common)
    plan = cpu_generated.plan(cell.declaration)
    # the outputs as a tensor of their own over ST0[1:] (not a torch view: the caller may modify it in
    # place, which autograd's version counter then reports, as for any saved tensor)
    out = torch.from_numpy(ST[0][1:])
    if not plan.reads_input:  # free xg now: the backward does not read it
        common = (A.dummy3, *common[1:])
    return out, ST, A, (common, ST, PIN, Rd, b_hh is not None, xg.shape[2], SAVE, UH)


class _GenRecurrence(torch.autograd.Function):
    """The recurrence of one layer/direction through the loops generated from the cell's declaration."""

    @staticmethod
    def forward(ctx, cell: Cell, masks: LayerMasks, names: tuple[str, ...], xg: Tensor, R: Tensor,
                b_hh: Tensor | None, *rest: Tensor):
        out, ST, A, ctx.buf = _gen_forward(cell, masks, names, xg, R, b_hh, rest)
        T = xg.shape[0]
        if masks.out_mask is None:
            result = out
            ctx.save_for_backward(out)
        else:
            result = out * masks.out_mask
            ctx.save_for_backward()
        ctx.cell, ctx.masks, ctx.names, ctx.arrays = cell, masks, names, A
        return (result, *(torch.from_numpy(s[T].copy()) for s in ST))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor | None, *dfinal: Tensor | None):
        if ctx.buf is None:
            raise RuntimeError("backend='cpu' frees its saved activations in the first backward pass through "
                               "them; run the forward again instead of retain_graph=True")
        cell, masks, A = ctx.cell, ctx.masks, ctx.arrays
        ctx.saved_tensors  # noqa: B018 (raises if the caller modified the output in place)
        common, ST, PIN, Rd, has_bias, xg_width, SAVE, UH = ctx.buf
        d = cell.declaration
        plan = cpu_generated.plan(d)
        projs = plan.projections()
        dt = Rd.dtype
        K = cpu_generated.module(d, _DTYPE_NAMES[dt])
        T, B, H = A.T, A.B, A.H
        S = cell.state_size
        ndt = A.dummy1.dtype
        has_dout = dout is not None
        if has_dout and masks.out_mask is not None:
            dout = dout * masks.out_mask
        dout_n = _np(dout) if has_dout else A.dummy3
        dS = [_np(g) if g is not None else np.zeros((B, H), ndt) for g in dfinal]
        O = [_empty(B, H, dtype=dt) for _ in range(S)]
        lay = cpu_generated.layout(d)
        # d xg: over the saved values of each step once dead (``Layout``), else a buffer of its own; d(R h)
        # of each projection: d xg itself (paired), over its u_hat (layer norm), else a buffer of its own.
        # The kernel writes d xg into SAVE when it lives there, and d(R h) over u_hat: dummies for those.
        if lay.dxg_in_save:
            DXG = torch.from_numpy(SAVE)[:, :, :xg_width]
        else:
            DXG = (torch.zeros if plan.dxg_gaps else _empty)(T, B, xg_width, dtype=dt)
        DRAW, own = [], [not lay.dxg_in_save]
        for p, (lo, hi) in zip(projs, plan.block_bounds):
            if cell.layer_norm:
                DRAW.append(torch.from_numpy(UH[:, :, lo * H:hi * H]))
            elif p in plan.paired:
                DRAW.append(DXG)
            else:
                DRAW.append((torch.zeros if plan.draw_gaps(p) else _empty)(T, B, (hi - lo) * H, dtype=dt))
            own.append(not cell.layer_norm and not (p in plan.paired and lay.dxg_in_save))
        n = len(A.parts)
        dPAR = [np.zeros((n, len(b) * H), ndt) for _, b in d.params]
        GH = cell.rec_gates * H
        dlng = np.zeros((n, GH if cell.layer_norm else 1), ndt)
        dbhh = np.zeros((n, GH), ndt)
        args = (*common, has_dout, dout_n, *dS, *(o.numpy() for o in O),
                *(D.numpy() if mine else A.dummy3 for D, mine in zip((DXG, *DRAW), own)))
        _launch(K.backward, A, Rd, cell, False, args, (*dPAR, dlng, dbhh))
        dR_parts = []
        for p, D, P in zip(projs, DRAW, PIN):
            a = d.nodes[d.nodes[p].args[0]]
            inp = torch.from_numpy(P if (plan.pin(p) or A.has_hmask) else ST[a.index][:-1])
            dR_parts.append(D.reshape(T * B, -1).t() @ inp.reshape(T * B, H))
        dR = dR_parts[0] if len(dR_parts) == 1 else torch.cat(dR_parts, 0)
        db = None
        if has_bias:
            db = (torch.from_numpy(dbhh.sum(0)) if cell.layer_norm
                  else torch.cat([D.sum((0, 1)) for D in DRAW])).to(dt)
        grads = {name: torch.from_numpy(g.sum(0)).to(dt) for (name, _), g in zip(d.params, dPAR)}
        if cell.layer_norm:
            grads["ln_weight_hh"] = torch.from_numpy(dlng.sum(0)).to(dt)
        ctx.buf = ctx.arrays = None
        return (None, None, None, DXG, dR, db, *O, *(grads.get(nm) for nm in ctx.names))


_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}


def run_generated(cell: Cell, x: Tensor, state0: State, w: Weights, masks: LayerMasks) -> tuple[Tensor, State]:
    """Run one layer in one direction over ``x`` (T, B, I) through the generated loops."""
    check_numba_input("cpu", x)
    xg = cell.project_input(x, w)
    names = tuple(cell.extra_shapes())
    args = (xg, w["weight_hh"], w["bias_hh"], *state0, *(w[n] for n in names))
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args):
        out, *state = _GenRecurrence.apply(cell, masks, names, *args)
        return out, tuple(state)
    # inference: the loop without autograd's bookkeeping; one step of a stream reuses its call's arguments
    if (x.shape[0] == 1 and masks.hmask is None and masks.keep is None
            and one_part(1, x.shape[1], cell.hidden_size, cell.rec_gates * cell.hidden_size)
            and all(a is None or a.is_contiguous() for a in args[1:])):  # a copy would not follow updates
        return _one_step(cell, names, xg, args[1:])
    out, ST, _, _ = _gen_forward(cell, masks, names, xg, w["weight_hh"], w["bias_hh"], args[3:])
    if masks.out_mask is not None:
        out = out * masks.out_mask
    return out, tuple(torch.from_numpy(s[-1].copy()) for s in ST)


# One-step inference calls by (cell, dtype, batch, thread, weights): the generated forward's arguments with
# their buffers, reused by the next step of the stream. The entries keep the weights alive (an address is
# never reused while its entry is here) and read them through views, so in-place updates are seen.
_STEPS: dict[tuple, tuple] = {}


def _one_step(cell: Cell, names: tuple[str, ...], xg: Tensor, tensors: tuple) -> tuple[Tensor, State]:
    """One step (``xg`` (1, B, ...)) of the generated forward without threads: ``tensors`` are R, b_hh, the
    states and the per-unit parameters (contiguous); returns the output (1, B, H) and the new states."""
    R, b_hh, S = tensors[0], tensors[1], cell.state_size
    weights = (R, b_hh, *tensors[2 + S:])
    key = (cell.declaration, xg.dtype, xg.shape[1], threading.get_ident(),
           *(None if t is None else t.data_ptr() for t in weights))
    entry = _STEPS.get(key)
    if entry is None:
        K, A, common, ST, *_ = _forward_args(cell, LayerMasks(), names, xg, b_hh, tensors[2:])
        W = _weights(R.detach(), cell, True, A)[0]
        entry = (K.forward, (*common[1:], *W, *A.parts[0], A.units), ST, weights)
        if len(_STEPS) >= 64:
            del _STEPS[next(iter(_STEPS))]
        _STEPS[key] = entry
    forward, rest, ST, _ = entry
    for s, s0 in zip(ST, tensors[2:2 + S]):
        s[0] = s0.detach().numpy()
    forward(_np(xg), *rest)
    return torch.from_numpy(ST[0][1:].copy()), tuple(torch.from_numpy(s[1].copy()) for s in ST)


def _unsupported(cell: Cell, cfg: LayerConfig, device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the fused CPU backend runs on the CPU only, not on {device}"
    return None


def compile_seconds() -> dict[str, float]:
    """Compile (or load from the caches) the generated loops of a set of cells for float32 and float64, timed
    per cell: each runs once on a tiny input through forward and backward."""
    from ..layers import build

    times = {}
    for name in ("rnn", "lstm", "lstm_peephole", "lstm_ln", "gru", "gru_cho_ln", "slstm", "mut3"):
        t0 = time.perf_counter()
        for dt in DTYPES:
            layer = build(name, 4, 4, backend="cpu", dtype=dt)
            x = torch.randn(2, 2, 4, dtype=dt, requires_grad=True)
            out, _ = layer(x)
            out.sum().backward()
        times[name] = time.perf_counter() - t0
    return times


# auto: after native for the LSTM (oneDNN's fused LSTM is faster), before it for the RNN and GRU, which
# torch runs as a chain of per-step ATen ops on CPU (docs/kernels.md, "Which backend auto picks").
def _preferred(cell: Cell, device: torch.device) -> bool:
    return device.type == "cpu" and cell.native in ATEN_ON_CPU


def _preferred_step(cell: Cell, device: torch.device) -> bool:
    return device.type == "cpu" and cell.native not in ATEN_ON_CPU


register(Backend("cpu", "fused CPU loops generated from the declaration (numba + BLAS)", _unsupported,
                 run_generated, DTYPES, Capability(), _preferred, _preferred_step), auto_before={"cpu": "bptt"})
