"""GPU kernel speed: rnnkit's Triton backend against cuDNN (torch.nn.LSTM/GRU/RNN) and a plain PyTorch loop.

For every cell of the grid and every shape (B, H) with I = H and T steps, times

* ``triton``  the layer with ``backend="triton"`` (every variant),
* ``auto``    the layer with ``backend="auto"`` (cuDNN for the plain cells, triton otherwise),
* ``cudnn``   ``torch.nn.LSTM`` / ``GRU`` / ``RNN`` of the cell's family on the same shape: the
              target is ours <= 1.25x this time for every variant, and ``auto`` never slower for
              the plain cells,
* ``loop``    the ``reference`` backend (autograd through the cell's ``step()``, one Python
              iteration per step): the target is >= 20x faster at B <= 64; timed for B <= --loop-max-b,

in two modes: ``fwd`` (inference, ``torch.no_grad``) and ``fwdbwd`` (forward, backward of
``out.sum()``). Median of ``--repeat`` runs after ``--warmup`` runs, CUDA-event timed.
Writes JSON (every record, machine, versions, date, command) and a Markdown table.

    python benchmarks/kernels_cuda.py                                  # the full grid (GPU)
    python benchmarks/kernels_cuda.py --quick                          # a few minutes
    python benchmarks/kernels_cuda.py --device cpu --ours bptt --quick # script smoke test, no GPU

Runs unchanged on any CUDA GPU; record the output in docs/results.md ("Kernel speed (GPU)").
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import rnnkit
from rnnkit.cells import REGISTRY

DEFAULT_CELLS = ["lstm", "lstm_peephole", "lstm_cifg", "lstm_ln", "lstm_zoneout", "lstm_rdrop",
                 "gru", "gru_cho", "gru_ln", "rnn", "rnn_ln"]
TORCH_NN = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN, "slstm": torch.nn.LSTM,
            "mut1": torch.nn.GRU, "mut2": torch.nn.GRU, "mut3": torch.nn.GRU}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], None], device: torch.device, warmup: int, repeat: int) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_step(module: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """The timed unit: one forward (no grad), or one forward + backward of ``out.sum()``."""
    if mode == "fwd":
        def fwd() -> None:
            with torch.no_grad():
                module(x)
        return fwd

    xg = x.detach().requires_grad_(True)

    def fwdbwd() -> None:
        module.zero_grad(set_to_none=True)
        xg.grad = None
        out, _ = module(xg)
        out.float().sum().backward()
    return fwdbwd


def build(kind: str, cell: str, H: int, device: torch.device, dtype: torch.dtype, ours: str) -> torch.nn.Module:
    spec = REGISTRY[cell]
    if kind == "cudnn":
        m = TORCH_NN[spec.family](H, H)
    else:
        backend = {"ours": ours, "auto": "auto", "loop": "reference"}.get(kind, kind)
        m = rnnkit.build(cell, H, H, backend=backend)
    return m.to(device, dtype).train()


def run_grid(args: argparse.Namespace) -> tuple[list[dict], bool]:
    """Time the grid; returns the records and whether ``--max-minutes`` cut it short."""
    device = torch.device(args.device)
    dtypes = [getattr(torch, d) for d in args.dtypes]
    records = []
    cudnn_cache: dict[tuple, float] = {}
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
    for dtype in dtypes:
        for B in args.batch:
            for H in args.hidden:
                x = torch.randn(args.steps, B, H, device=device, dtype=dtype)
                for cell in args.cells:
                    family = REGISTRY[cell].family
                    for mode in args.modes:
                        if deadline is not None and time.monotonic() > deadline:
                            print(f"--max-minutes {args.max_minutes} reached: stopping after {len(records)} "
                                  "records", file=sys.stderr)
                            return records, True
                        rec = {"cell": cell, "family": family, "dtype": str(dtype).removeprefix("torch."),
                               "T": args.steps, "B": B, "H": H, "I": H, "mode": mode}
                        kinds = ["ours", "auto", "cudnn"]
                        spec = REGISTRY[cell]
                        probe = rnnkit.build(cell, H, H)
                        cfg = rnnkit.kernels.LayerConfig(**spec.layer_options)
                        refused = rnnkit.kernels.BACKENDS[args.ours].refuses(probe.cell, cfg, device)
                        if refused is not None:  # e.g. triton_persistent above its size limit
                            kinds.remove("ours")
                            rec["ours_error"] = f"refused: {refused}"
                        for extra in args.also:
                            if rnnkit.kernels.BACKENDS[extra].refuses(probe.cell, cfg, device) is None:
                                kinds.append(extra)
                        if B <= args.loop_max_b:
                            kinds.append("loop")
                        for kind in kinds:
                            key = (family, str(dtype), B, H, mode)
                            if kind == "cudnn" and key in cudnn_cache:
                                rec["cudnn_ms"] = cudnn_cache[key]
                                continue
                            m = build(kind, cell, H, device, dtype, args.ours)
                            if kind == "auto":
                                rec["auto_backend"] = m.backend_for(device)
                                if rec["auto_backend"] == args.ours and "ours_ms" in rec:
                                    rec["auto_ms"] = rec["ours_ms"]  # the same module: no need to time twice
                                    continue
                            try:
                                ms = time_fn(make_step(m, x, mode), device, args.warmup, args.repeat)
                            except (torch.OutOfMemoryError, RuntimeError, TypeError, ValueError) as e:
                                # recorded in the table, not hidden: one failing shape must not end a GPU run
                                ms = None
                                rec[f"{kind}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                                print(f"{cell} {kind} B={B} H={H} {mode}: {rec[f'{kind}_error']}", file=sys.stderr)
                            finally:
                                if device.type == "cuda":
                                    torch.cuda.empty_cache()
                            rec[f"{kind}_ms"] = ms
                            if kind == "cudnn":
                                cudnn_cache[key] = ms
                        _ratios(rec)
                        records.append(rec)
                        print(_line(rec), file=sys.stderr, flush=True)
    return records, False


def _ratios(rec: dict) -> None:
    ours, cudnn, loop = rec.get("ours_ms"), rec.get("cudnn_ms"), rec.get("loop_ms")
    rec["ours_over_cudnn"] = ours / cudnn if ours and cudnn else None
    rec["auto_over_cudnn"] = rec["auto_ms"] / cudnn if rec.get("auto_ms") and cudnn else None
    rec["loop_over_ours"] = loop / ours if ours and loop else None


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:.2f}{unit}" if v < 100 else f"{v:.0f}{unit}"


def _line(r: dict) -> str:
    return (f"{r['cell']:>16} {r['dtype']:>8} B={r['B']:<4} H={r['H']:<5} {r['mode']:>6}: "
            f"ours {_fmt(r.get('ours_ms'))} ms, auto({r.get('auto_backend', '?')}) {_fmt(r.get('auto_ms'))} ms, "
            f"cudnn {_fmt(r.get('cudnn_ms'))} ms, loop {_fmt(r.get('loop_ms'))} ms, "
            f"ours/cudnn {_fmt(r.get('ours_over_cudnn'), 'x')}, loop/ours {_fmt(r.get('loop_over_ours'), 'x')}")


def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["gpu"] = None
    return info


def markdown(records: list[dict], meta: dict) -> str:
    m = meta["machine"]
    also = sorted({k[:-3] for r in records for k in r if k.endswith("_ms")} - {"ours", "auto", "cudnn", "loop"})
    lines = [f"GPU: {m.get('gpu') or 'none (' + meta['device'] + ')'}; torch {m['torch']}, triton {m['triton']}, "
             f"CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')}; {meta['date']}.",
             f"Command: `{meta['command']}`. T = {records[0]['T'] if records else '?'}, I = H; median of "
             f"{meta['repeat']} runs; ours = backend {meta['ours']!r}, loop = backend 'reference'."
             + (" Stopped early by --max-minutes: the grid is incomplete." if meta.get("stopped_early") else ""),
             "",
             "| cell | dtype | B | H | mode | ours ms | auto ms (backend) | cuDNN ms | loop ms | ours/cuDNN | "
             "loop/ours |" + "".join(f" {a} ms |" for a in also), "|---|---|---|---|---|---|---|---|---|---|---|"
             + "---|" * len(also)]
    for r in records:
        lines.append(f"| {r['cell']} | {r['dtype']} | {r['B']} | {r['H']} | {r['mode']} | {_fmt(r.get('ours_ms'))} | "
                     f"{_fmt(r.get('auto_ms'))} ({r.get('auto_backend', '-')}) | {_fmt(r.get('cudnn_ms'))} | "
                     f"{_fmt(r.get('loop_ms'))} | {_fmt(r.get('ours_over_cudnn'), 'x')} | "
                     f"{_fmt(r.get('loop_over_ours'), 'x')} |" + "".join(f" {_fmt(r.get(a + '_ms'))} |" for a in also))
    worst = [r["ours_over_cudnn"] for r in records if r.get("ours_over_cudnn")]
    auto = [r["auto_over_cudnn"] for r in records if r.get("auto_over_cudnn") and r.get("auto_backend") == "native"]
    loop = [r["loop_over_ours"] for r in records if r.get("loop_over_ours")]
    summary = []
    if worst:
        summary.append(f"worst ours/cuDNN {max(worst):.2f}x (target <= 1.25x)")
    if auto:
        summary.append(f"worst auto(native)/cuDNN {max(auto):.2f}x (target <= 1x)")
    if loop:
        summary.append(f"smallest loop/ours {min(loop):.1f}x (target >= 20x at B <= 64)")
    if summary:
        lines += ["", "Summary: " + "; ".join(summary) + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ours", default="triton", help="backend timed as 'ours' (default triton)")
    ap.add_argument("--cells", nargs="+", default=DEFAULT_CELLS, choices=sorted(REGISTRY))
    ap.add_argument("--batch", nargs="+", type=int, default=[16, 64, 128, 256])
    ap.add_argument("--hidden", nargs="+", type=int, default=[64, 256, 512, 1024, 2048])
    ap.add_argument("--steps", type=int, default=100, help="T")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--also", nargs="*", default=["triton_persistent"],
                    help="more backends to time where they support the shape (default: %(default)s)")
    ap.add_argument("--loop-max-b", type=int, default=64, help="time the Python loop only up to this batch")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--quick", action="store_true",
                    help="B in {16, 64, 256}, H in {256, 1024}, float32; lstm, lstm_peephole, lstm_ln, gru, gru_cho")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop starting new measurements after this long and write what was measured")
    ap.add_argument("--out", default="benchmarks/out/kernels_cuda", help="path stem for .json and .md")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.hidden, args.dtypes = [16, 64, 256], [256, 1024], ["float32"]
        args.cells = ["lstm", "lstm_peephole", "lstm_ln", "gru", "gru_cho"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available (use --device cpu --ours bptt for a smoke test)",
              file=sys.stderr)
        return 2
    records, cut = run_grid(args)
    argv = sys.argv[1:] if argv is None else argv
    meta = {"device": args.device, "ours": args.ours, "repeat": args.repeat, "machine": machine(device),
            "stopped_early": cut,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python", "benchmarks/kernels_cuda.py", *argv])}
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    stem.with_suffix(".md").write_text(markdown(records, meta))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
