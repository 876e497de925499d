"""Compile every Triton kernel specialization the cell registry uses for a CUDA target, without a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks the kernels' numbers on the CPU but is more
permissive than the compiler; this module checks that the same kernels also compile to a cubin
(Triton's bundled ``ptxas``) for a given architecture. It runs the backends' time loops on the CPU
with recorders in place of the kernels generated from every registry cell's declaration (per level,
and the persistent ones where the size allows), collects each distinct (kernel, argument types,
constexprs, num_warps) launch, and compiles it.

    python -m rnnkit.kernels.triton_aot --arch 90 --shapes 3x5 --dtypes float32

Must run in a process where ``TRITON_INTERPRET`` is unset.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
from types import SimpleNamespace
from typing import Any

import torch

from ..cells import REGISTRY, make_cell
from .common import LayerMasks

_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


class _Recorder:
    """Records launches ``fn[grid](*args, **kw)``: one entry per distinct specialization."""

    def __init__(self) -> None:
        self.launches: dict[tuple, tuple[str, Any, dict, dict, int]] = {}

    def wrap(self, label: str, fn: Any) -> Any:
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kw: rec._record(label, fn, args, kw)

        return _Grid()

    def module(self, module: Any, label: str) -> Any:
        """A stand-in for a kernel module: its kernels record, everything else is the module's."""
        names = {n for n in dir(module) if hasattr(getattr(module, n), "arg_names")}
        ns = SimpleNamespace(**{n: getattr(module, n) for n in dir(module) if not n.startswith("__")})
        for n in names:
            setattr(ns, n, self.wrap(f"{label}.{n}", getattr(module, n)))
        for table in ("FORWARD", "BACKWARD"):
            if hasattr(module, table):
                setattr(ns, table, [(lv, self.wrap(f"{label}.{fn.__name__}", fn), names)
                                    for lv, fn, names in getattr(module, table)])
        return ns

    def _record(self, label: str, fn: Any, args: tuple, kw: dict) -> None:
        kw = dict(kw)
        warps = kw.pop("num_warps", 4)
        kw.pop("enable_fp_fusion", None)
        sig: dict[str, str] = {}
        for arg_name, value in zip(fn.arg_names, args):
            sig[arg_name] = _TYPES[value.dtype] if isinstance(value, torch.Tensor) else "i32"
        for k in kw:
            sig[k] = "constexpr"
        key = (label, id(fn), tuple(sig.items()), tuple(sorted((k, str(v)) for k, v in kw.items())), warps)
        self.launches.setdefault(key, (label, fn, sig, kw, warps))


def collect(shapes: tuple[tuple[int, int], ...] = ((3, 5), (8, 256), (2, 2048)),
            dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)) -> _Recorder:
    """Record the launches of forward + backward for every registry cell, shape (B, H), dtype, masks."""
    from . import triton_backend as tb
    from . import triton_generated

    rec = _Recorder()
    original = tb._kernels

    def kernels(d, device):  # noqa: ARG001
        K = triton_generated.module(d)
        if K.INTERPRETED:
            raise RuntimeError("TRITON_INTERPRET is set: the kernels are interpreted, there is nothing to compile")
        return rec.module(K, d.name)

    tb._kernels = kernels
    try:
        T = 2
        for spec in REGISTRY.values():
            for B, H in shapes:
                cell = make_cell(spec.family, H, **spec.cell_options)
                I = 3 if cell.check_input_size(3) is None else H
                for dt in dtypes:
                    for with_masks in (False, True):
                        _run_once(tb, cell, T, B, I, H, dt, with_masks)
    finally:
        tb._kernels = original
    return rec


def _run_once(tb, cell, T: int, B: int, I: int, H: int, dt: torch.dtype, with_masks: bool) -> None:
    G, GR = cell.gates, cell.rec_gates
    w: dict[str, torch.Tensor | None] = {
        "weight_ih": torch.randn(G * H, I, dtype=dt), "weight_hh": torch.randn(GR * H, H, dtype=dt),
        "bias_ih": torch.randn(G * H, dtype=dt), "bias_hh": torch.randn(GR * H, dtype=dt)}
    for name, shape in cell.extra_shapes().items():
        w[name] = torch.randn(shape, dtype=dt)
    for v in w.values():
        v.requires_grad_(True)
    masks = LayerMasks()
    if with_masks:
        keep = tuple(torch.rand(T, B, H, dtype=dt) for _ in range(cell.state_size))
        masks = LayerMasks(torch.rand(B, H, dtype=dt), keep, torch.ones(T, B, 1, dtype=dt))
    x = torch.randn(T, B, I, dtype=dt)
    state0 = tuple(torch.zeros(B, H, dtype=dt, requires_grad=True) for _ in range(cell.state_size))
    runners = [tb.run]
    if tb.unsupported_persistent(cell, tb.LayerConfig(), torch.device("cuda")) is None:
        runners.append(tb.run_persistent)
    for run in runners:
        out, state = run(cell, x, state0, w, masks)
        (out.float().sum() + sum(s.float().sum() for s in state)).backward()
        with torch.no_grad():  # inference specializations (nothing saved for backward)
            run(cell, x, state0, w, masks)


def _ptxas_summary(log: str) -> str:
    """Registers and spill bytes from ptxas's ``-v`` log (spills = data that did not fit on chip)."""
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    return f"regs={regs[-1] if regs else '?'} spill={spills[-1] if spills else '?'}B"


def compile_all(arch: int = 90, **collect_kw: Any) -> list[str]:
    """Compile every recorded specialization for ``sm_{arch}``; returns one line per kernel compiled."""
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v output: registers and spills per kernel
    import triton
    from triton.backends.compiler import GPUTarget

    rec = collect(**collect_kw)
    target = GPUTarget("cuda", arch, 32)
    lines = []
    for name, fn, sig, constexprs, warps in rec.launches.values():
        t0 = time.perf_counter()
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options={"num_warps": warps, "enable_fp_fusion": True})
        flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items())
        lines.append(f"{name} warps={warps} {flags}: {len(compiled.asm['cubin'])} B cubin, "
                     f"{_ptxas_summary(log.getvalue())}, shared={compiled.metadata.shared}B, "
                     f"{time.perf_counter() - t0:.1f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100, 80 = A100)")
    ap.add_argument("--shapes", nargs="+", default=["3x5", "8x256", "2x2048"], metavar="BxH",
                    help="batch x hidden sizes whose tilings to compile (default: %(default)s)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    shapes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in args.shapes)
    dtypes = tuple(getattr(torch, d) for d in args.dtypes)
    lines = compile_all(args.arch, shapes=shapes, dtypes=dtypes)
    for line in lines:
        print(line)
    print(f"compiled {len(lines)} kernel specializations for sm_{args.arch}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
