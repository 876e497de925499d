"""``rnnkit bench``: speed and memory of every cell under every backend, against torch.nn and a Python loop.

Side by side in one process: for each shape (T, B, H, with I = H) and mode (``fwd`` = forward under
``no_grad``, ``fwdbwd`` = forward + backward of ``out.sum()``), every runner is timed round-robin
(one call of each in turn, ``repeats`` rounds after ``warmup`` calls) and the median is kept, so slow
drifts of a shared machine hit all runners alike. Runners:

* every registry cell under every backend registered for the device (``reference`` only on request);
* ``torch.nn.LSTM``, ``torch.nn.GRU``, ``torch.nn.RNN`` of the same shape;
* ``loop:<family>``: the plain PyTorch Python loop a user would write for that family (peephole LSTM,
  GRU, tanh RNN; see :func:`loop_lstm`), the baseline of the "x loop" speed-ups.

Also ``step()`` latency of 2-layer stacks at B = 1 (against one call of the torch.nn module of the cell's
family on a length-1 sequence), peak memory
of a forward + backward (CPU: peak RSS growth with large allocations forced to ``mmap`` so freed
memory leaves the process; CUDA: ``torch.cuda.max_memory_allocated``), and optionally the first-call
compile time of the ``cpu`` backend in a fresh numba cache. Writes JSON, a Markdown report and a PNG.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from torch import Tensor, nn

from ..kernels import cpu as cpu_backend

NAME = "bench"
app = typer.Typer(help="Benchmark the kernels: every cell and backend against torch.nn and a Python loop.",
                  no_args_is_help=False, invoke_without_command=True, pretty_exceptions_enable=False)

FULL_GRID = {"T": (50, 200), "B": (1, 8, 32, 64), "H": (64, 128, 256, 512, 1024)}
QUICK_GRID = {"T": (50,), "B": (8, 32), "H": (128, 256)}
MODES = ("fwd", "fwdbwd")
TORCH_BASELINES = {"lstm": "torch.nn.LSTM", "gru": "torch.nn.GRU", "rnn": "torch.nn.RNN", "slstm": "torch.nn.LSTM",
                   "mut1": "torch.nn.GRU", "mut2": "torch.nn.GRU", "mut3": "torch.nn.GRU"}
LOOP_FAMILIES = ("lstm", "gru", "rnn")  # the families with a plain Python loop baseline (``loop:<family>``)


def _torch_baseline(family: str) -> str:
    """The torch.nn module a cell family is compared with (torch.nn.LSTM for a user's cell)."""
    return TORCH_BASELINES.get(family, "torch.nn.LSTM")
# The variant targets (at most 1.5x torch.nn.LSTM, >= 4x faster than the loop) cover these.
VARIANTS = ("lstm_peephole", "lstm_cifg", "lstm_nfg", "lstm_nig", "lstm_nog", "lstm_noact", "lstm_ln",
            "lstm_peephole_ln", "lstm_rdrop", "lstm_zoneout")
PLAIN = {"lstm": "torch.nn.LSTM", "gru": "torch.nn.GRU", "rnn": "torch.nn.RNN"}
STEP_LAYERS = 2  # the stacks the step() latencies time (a generator's or an online scorer's)


class BenchError(ValueError):
    """Bad benchmark arguments."""


# ---- the "what a user would write" baselines -----------------------------------------------------

def loop_lstm(x: Tensor, h: Tensor, c: Tensor, W: Tensor, R: Tensor, b: Tensor, p: Tensor) -> Tensor:
    """Peephole LSTM as a plain Python loop over time (gate order i, f, g, o; ``p`` = (3H,) peepholes)."""
    pi, pf, po = p.chunk(3)
    outs = []
    for t in range(x.shape[0]):
        a = x[t] @ W.t() + h @ R.t() + b
        ai, af, ag, ao = a.chunk(4, 1)
        i = torch.sigmoid(ai + pi * c)
        f = torch.sigmoid(af + pf * c)
        c = f * c + i * torch.tanh(ag)
        o = torch.sigmoid(ao + po * c)
        h = o * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs)


def loop_gru(x: Tensor, h: Tensor, W: Tensor, R: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """GRU (reset after the matmul, as torch.nn.GRU) as a plain Python loop over time."""
    outs = []
    for t in range(x.shape[0]):
        xr, xz, xn = (x[t] @ W.t() + b_ih).chunk(3, 1)
        hr, hz, hn = (h @ R.t() + b_hh).chunk(3, 1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs)


def loop_rnn(x: Tensor, h: Tensor, W: Tensor, R: Tensor, b: Tensor) -> Tensor:
    """Elman tanh RNN as a plain Python loop over time."""
    outs = []
    for t in range(x.shape[0]):
        h = torch.tanh(x[t] @ W.t() + h @ R.t() + b)
        outs.append(h)
    return torch.stack(outs)


class _Loop(nn.Module):
    def __init__(self, family: str, H: int) -> None:
        super().__init__()
        G = {"lstm": 4, "gru": 3, "rnn": 1}[family]
        k = H ** -0.5
        self.family = family
        self.W = nn.Parameter(torch.empty(G * H, H).uniform_(-k, k))
        self.R = nn.Parameter(torch.empty(G * H, H).uniform_(-k, k))
        self.b = nn.Parameter(torch.empty(G * H).uniform_(-k, k))
        self.b2 = nn.Parameter(torch.empty(G * H).uniform_(-k, k))
        self.p = nn.Parameter(torch.empty(3 * H).uniform_(-k, k))

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        h = x.new_zeros(x.shape[1], self.R.shape[1])
        if self.family == "lstm":
            return loop_lstm(x, h, torch.zeros_like(h), self.W, self.R, self.b, self.p), None
        if self.family == "gru":
            return loop_gru(x, h, self.W, self.R, self.b, self.b2), None
        return loop_rnn(x, h, self.W, self.R, self.b), None


# ---- measuring -----------------------------------------------------------------------------------

@dataclass
class Runner:
    label: str          # "lstm_peephole/cpu", "torch.nn.LSTM", "loop:lstm"
    cell: str           # registry name, or the baseline's name
    backend: str        # backend name, "torch" or "loop"
    family: str
    module: nn.Module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(runner: Runner, x: Tensor, mode: str) -> Callable[[], None]:
    m = runner.module

    def fwd() -> None:
        with torch.no_grad():
            m(x)

    def fwdbwd() -> None:
        out, _ = m(x)
        out.sum().backward()

    return fwd if mode == "fwd" else fwdbwd


MEMORY_REPEATS = 3  # peak-memory measurements per runner and shape (median): a single one can be off when
# the heap still holds memory freed by the previous runner


class _PeakMemory:
    """Peak memory growth of a call: CUDA allocator statistics, or the process's peak RSS on Linux."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ok = device.type == "cuda"
        if device.type == "cpu" and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
                # every allocation >= 64 KiB gets its own mmap and is returned on free: RSS follows live memory
                libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
                libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
                self.libc = libc
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.ok = True
            except OSError:
                self.ok = False

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def measure(self, fn: Callable[[], None]) -> float | None:
        """Peak bytes above the starting point while ``fn`` runs, in MiB (None if unavailable)."""
        if not self.ok:
            return None
        gc.collect()
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            fn()
            _sync(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        # hand free heap pages back first: memory freed before the large allocations went to mmap (the
        # timing pass) would otherwise serve them without the RSS growing
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = self._status("VmRSS:")
        fn()
        return (self._status("VmHWM:") - base) / 2**20


def _time_round_robin(calls: list[Callable[[], None]], device: torch.device, warmup: int,
                      repeats: int) -> list[float]:
    for fn in calls:
        for _ in range(warmup):
            fn()
    samples: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for k, fn in enumerate(calls):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[k].append(time.perf_counter() - t0)
    return [statistics.median(s) * 1e3 for s in samples]


def _runners(cells: list[str], backends: list[str] | None, H: int, device: torch.device,
             with_reference: bool) -> list[Runner]:
    from .. import kernels
    from ..cells import make_cell
    from ..cells import resolve as resolve_cell
    from ..layers import build

    out = [Runner("torch.nn.LSTM", "torch.nn.LSTM", "torch", "lstm", nn.LSTM(H, H)),
           Runner("torch.nn.GRU", "torch.nn.GRU", "torch", "gru", nn.GRU(H, H)),
           Runner("torch.nn.RNN", "torch.nn.RNN", "torch", "rnn", nn.RNN(H, H))]
    families = sorted({resolve_cell(c).family_name for c in cells} & set(LOOP_FAMILIES))
    out += [Runner(f"loop:{f}", f"loop:{f}", "loop", f, _Loop(f, H)) for f in families]
    for name in cells:
        spec = resolve_cell(name)
        cell = make_cell(spec.family, H, **spec.cell_options)
        cfg = kernels.LayerConfig(**spec.layer_options)
        for b in kernels.working_backends(cell, cfg, device):
            if backends is not None and b not in backends:
                continue
            if b == "reference" and not with_reference:
                continue
            module = build(name, H, H, backend=b)
            out.append(Runner(f"{name}/{b}", name, b, spec.family_name, module))
    for r in out:
        r.module.to(device).train(True)
    return out


def auto_choice(cell_name: str, device: torch.device, streaming: bool = False) -> str:
    """The backend ``auto`` picks for a registry cell on ``device`` (for whole sequences, or ``streaming``:
    one step at a time)."""
    from .. import kernels
    from ..cells import make_cell
    from ..cells import resolve as resolve_cell

    spec = resolve_cell(cell_name)
    cell = make_cell(spec.family, 8, **spec.cell_options)
    return kernels.resolve("auto", cell, kernels.LayerConfig(**spec.layer_options), device, streaming=streaming)


def run_sequences(cells: list[str], grid: dict[str, tuple[int, ...]], modes: tuple[str, ...],
                  device: torch.device, *, backends: list[str] | None, warmup: int, repeats: int,
                  memory: bool, with_reference: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Time every runner on every shape of ``grid`` and mode; rows with ratios filled in.

    Peak memory (fwd+bwd) is measured in a second pass over the grid, after all timing: measuring it on
    the CPU switches glibc to one mmap per allocation for the rest of the process (see
    :class:`_PeakMemory`), and every call then pays fresh page faults, which would distort the times
    (it slowed torch.nn.LSTM by 1.1-1.7x at T = 100 on the 2-core machine).
    """
    rows: list[dict[str, Any]] = []
    for H in grid["H"]:
        runners = _runners(cells, backends, H, device, with_reference)
        for T in grid["T"]:
            for B in grid["B"]:
                for mode in modes:
                    x = torch.randn(T, B, H, device=device, requires_grad=(mode == "fwdbwd"))
                    t0 = time.perf_counter()
                    calls = [_call(r, x, mode) for r in runners]
                    ms = _time_round_robin(calls, device, warmup, repeats)
                    by = {r.label: t for r, t in zip(runners, ms)}
                    lstm_ms = by["torch.nn.LSTM"]
                    for r, t in zip(runners, ms):
                        loop_ms = by.get(f"loop:{r.family}")
                        rows.append({
                            "kind": "seq", "label": r.label, "cell": r.cell, "backend": r.backend,
                            "family": r.family, "T": T, "B": B, "H": H, "mode": mode, "ms": t,
                            "x_lstm": t / lstm_ms, "x_torch_family": t / by[_torch_baseline(r.family)],
                            "speedup_vs_loop": (loop_ms / t) if loop_ms else None,
                            "peak_mib": None, "mem_x_lstm": None})
                    log(f"T={T} B={B} H={H} {mode}: {len(runners)} runners in {time.perf_counter() - t0:.1f}s "
                        f"(torch.nn.LSTM {lstm_ms:.2f} ms)")
    if memory and "fwdbwd" in modes:
        peak = _PeakMemory(device)
        at = {(r["label"], r["T"], r["B"], r["H"]): r for r in rows if r["mode"] == "fwdbwd"}
        for H in grid["H"]:
            runners = _runners(cells, backends, H, device, with_reference)
            for T in grid["T"]:
                for B in grid["B"]:
                    x = torch.randn(T, B, H, device=device, requires_grad=True)
                    mem = {}
                    for r in runners:
                        call = _call(r, x, "fwdbwd")
                        call()  # warm: first-call work (compilation, caches) is not the call's memory
                        got = [peak.measure(call) for _ in range(MEMORY_REPEATS)]
                        mem[r.label] = None if None in got else statistics.median(got)
                    base = mem["torch.nn.LSTM"]
                    for label, m in mem.items():
                        row = at[(label, T, B, H)]
                        row["peak_mib"] = m
                        row["mem_x_lstm"] = (m / base) if (m is not None and base) else None
                    log(f"T={T} B={B} H={H}: peak memory of {len(runners)} runners")
    return rows


def run_step_latency(cells: list[str], Hs: tuple[int, ...], device: torch.device, *,
                     backends: list[str] | None, calls: int, log: Callable[[str], None],
                     layers: int = STEP_LAYERS, block: int = 1) -> list[dict[str, Any]]:
    """Median latency of one ``step()`` at B = 1 (eval, no_grad) of a ``layers``-layer stack, against one call
    of torch.nn.LSTM / GRU / RNN of the same shape on a length-1 sequence (``x_lstm``; ``x_torch_family``:
    against the torch.nn module of the cell's family). The runners take turns, ``block`` timed calls each
    (1: call by call, each call finding the others' weights in the caches; more: a stream, its weights hot),
    until each has made ``calls``."""
    from .. import kernels
    from ..cells import make_cell
    from ..cells import resolve as resolve_cell
    from ..layers import build

    rows = []
    for H in Hs:
        fns: list[tuple[str, str, str, Callable[[], Any]]] = []
        x1 = torch.randn(1, 1, H, device=device)
        for label in PLAIN.values():
            m = getattr(nn, label.rsplit(".", 1)[1])(H, H, layers).to(device).eval()
            fns.append((label, label, "torch", lambda m=m, x1=x1: m(x1)))
        for name in cells:
            spec = resolve_cell(name)
            cell = make_cell(spec.family, H, **spec.cell_options)
            cfg = kernels.LayerConfig(**spec.layer_options)
            for b in kernels.working_backends(cell, cfg, device):
                if b == "reference" or (backends is not None and b not in backends):
                    continue
                layer = build(name, H, H, num_layers=layers, backend=b).to(device).eval()
                xt = torch.randn(1, H, device=device)
                _, s0 = layer.step(xt)
                fns.append((f"{name}/{b}", name, b, lambda m=layer, s=s0, xt=xt: m.step(xt, s)))
        with torch.no_grad():
            for _, _, _, fn in fns:
                for _ in range(10):
                    fn()
            samples: list[list[float]] = [[] for _ in fns]
            for _ in range(max(1, calls // block)):
                for k, (_, _, _, fn) in enumerate(fns):
                    for _ in range(block):
                        _sync(device)
                        t0 = time.perf_counter()
                        fn()
                        _sync(device)
                        samples[k].append(time.perf_counter() - t0)
        us = {label: statistics.median(s) * 1e6 for (label, *_), s in zip(fns, samples)}
        for label, cell_name, b, _ in fns:
            base = label if b == "torch" else _torch_baseline(resolve_cell(cell_name).family_name)
            rows.append({"kind": "step", "label": label, "cell": cell_name, "backend": b, "B": 1, "H": H,
                         "layers": layers, "us": us[label], "x_lstm": us[label] / us["torch.nn.LSTM"],
                         "x_torch_family": us[label] / us[base]})
        log(f"step() latency H={H}: {len(fns)} runners (torch.nn.LSTM {us['torch.nn.LSTM']:.1f} us, "
            f"torch.nn.GRU {us['torch.nn.GRU']:.1f} us)")
    return rows


def compile_times() -> dict[str, Any]:
    """First-call (cold caches) and second-process (warm caches) time of the ``cpu`` backend, per cell."""
    code = ("import json, time; t0 = time.perf_counter(); import rnnkit.kernels.cpu as c; "
            "t1 = time.perf_counter(); p0 = time.process_time(); s = c.compile_seconds(); "
            "p1 = time.process_time(); print(json.dumps({'import_s': t1 - t0, 'per_cell_s': s, "
            "'total_s': sum(s.values()), 'total_cpu_s': p1 - p0}))")
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "NUMBA_CACHE_DIR": d, "RNNKIT_CACHE_DIR": d}
        for key in ("cold", "warm"):
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            out[key] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ---- reporting -----------------------------------------------------------------------------------

def _machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count(), "device": str(device),
                            "rnnkit_cpu_threads": cpu_backend.threads(),
                            "rnnkit_cpu_blas": cpu_backend.blas(torch.float32)}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        info["load_avg_1_5_15"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        import numba
        info["numba"] = numba.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def targets(rows: list[dict[str, Any]], steps: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """Check the speed targets on the measured rows (``auto``'s backend for each cell)."""
    seq = [r for r in rows if r["kind"] == "seq"]
    chosen = {c: auto_choice(c, device) for c in {r["cell"] for r in seq if r["backend"] not in ("torch", "loop")}}
    auto_rows = [r for r in seq if r["cell"] in chosen and r["backend"] == chosen[r["cell"]]]
    out = []

    def add(name: str, values: list[tuple[str, float]], limit: float, better: str) -> None:
        if not values:
            return
        worst = max(values, key=lambda v: v[1]) if better == "lower" else min(values, key=lambda v: v[1])
        ok = worst[1] <= limit if better == "lower" else worst[1] >= limit
        out.append({"target": name, "limit": limit, "worst": worst[1], "where": worst[0], "met": ok,
                    "n": len(values)})

    big = [r for r in auto_rows if r["mode"] == "fwdbwd" and r["H"] >= 128 and r["B"] >= 8 and r["cell"] in VARIANTS]
    where = "{cell}/{backend} T={T} B={B} H={H}"
    add("variants fwd+bwd <= 1.5x torch.nn.LSTM (H>=128, B>=8)",
        [(where.format(**r), r["x_lstm"]) for r in big], 1.5, "lower")
    add("variants fwd+bwd <= 1.2x torch.nn.LSTM (aim)", [(where.format(**r), r["x_lstm"]) for r in big], 1.2, "lower")
    add("variants fwd+bwd >= 4x faster than the Python loop",
        [(where.format(**r), r["speedup_vs_loop"]) for r in big if r["speedup_vs_loop"]], 4.0, "higher")
    plain = [r for r in auto_rows if r["cell"] in ("lstm", "gru", "rnn")]
    add("plain lstm/gru/rnn via auto <= 1.0x torch.nn (fwd and fwd+bwd)",
        [(where.format(**r) + f" {r['mode']}", r["x_torch_family"]) for r in plain], 1.0, "lower")
    st = [r for r in steps if r["backend"] != "torch" and r["backend"] == auto_choice(r["cell"], device, True)]
    add("step() at B=1 <= 1 call of torch.nn of its family (length 1)",
        [(f"{r['cell']}/{r['backend']} H={r['H']}", r["x_torch_family"]) for r in st], 1.0, "lower")
    mem = [r for r in auto_rows if r["mode"] == "fwdbwd" and r["mem_x_lstm"] is not None]
    add("peak memory fwd+bwd <= 1.2x torch.nn.LSTM", [(where.format(**r), r["mem_x_lstm"]) for r in mem], 1.2, "lower")
    return out


def markdown(result: dict[str, Any]) -> str:
    """The Markdown report: targets, then per mode a table of ratios per runner and shape."""
    rows, steps, meta = result["rows"], result["steps"], result["meta"]
    lines = [f"Command: `{meta['command']}`  ", f"Date: {meta['date']}  ",
             f"Machine: {meta['machine'].get('cpu')} ({meta['machine'].get('cpu_count')} cores), "
             f"device {meta['machine']['device']}, torch {meta['machine']['torch']} "
             f"({meta['machine']['torch_threads']} threads; cpu backend "
             f"{meta['machine'].get('rnnkit_cpu_threads', '?')} threads, "
             f"{meta['machine'].get('rnnkit_cpu_blas', 'openblas')} GEMM), numba {meta['machine'].get('numba')}, "
             f"load average at start {meta['machine'].get('load_avg_1_5_15')}  ",
             f"Median of {meta['repeats']} round-robin runs after {meta['warmup']} warm-up call(s); float32, I = H.",
             ""]
    if result.get("targets"):
        lines += ["| target | worst measured | where | met |", "|---|---|---|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['target']} | {t['worst']:.2f} | {t['where']} | {'yes' if t['met'] else '**no**'} |")
        lines.append("")
    if result.get("compile"):
        c = result["compile"]
        cells = ", ".join(c["cold"]["per_cell_s"])
        lines.append(f"cpu backend compile time: first call in a fresh numba cache {c['cold']['total_s']:.0f} s "
                     f"wall, {c['cold'].get('total_cpu_s', float('nan')):.0f} s CPU ({cells}; "
                     f"float32 + float64); later processes load the cache in {c['warm']['total_s']:.1f} s.")
        lines.append("")
    shapes = sorted({(r["T"], r["B"], r["H"]) for r in rows}, key=lambda s: (s[2], s[1], s[0]))
    for mode in MODES:
        mrows = [r for r in rows if r["mode"] == mode]
        if not mrows:
            continue
        title = "forward (no_grad)" if mode == "fwd" else "forward + backward"
        lines += [f"**{title}**: time / torch.nn.LSTM of the same shape (speed-up vs the family's Python loop)"
                  + ("; peak memory / torch.nn.LSTM's" if mode == "fwdbwd" else ""), ""]
        head = "| runner | " + " | ".join(f"T={T} B={B} H={H}" for T, B, H in shapes) + " |"
        lines += [head, "|---|" + "---|" * len(shapes)]
        labels = list(dict.fromkeys(r["label"] for r in mrows))
        idx = {(r["label"], r["T"], r["B"], r["H"]): r for r in mrows}
        for label in labels:
            cells = []
            for s in shapes:
                r = idx.get((label, *s))
                if r is None:
                    cells.append("")
                    continue
                if label == "torch.nn.LSTM":
                    txt = f"{r['ms']:.1f} ms"
                else:
                    txt = f"{r['x_lstm']:.2f}x"
                    if r["speedup_vs_loop"] and r["backend"] != "loop":
                        txt += f" ({r['speedup_vs_loop']:.1f}x)"
                if mode == "fwdbwd" and r["mem_x_lstm"] is not None:
                    txt += f" m{r['mem_x_lstm']:.2f}" if label != "torch.nn.LSTM" else f", {r['peak_mib']:.0f} MiB"
                cells.append(txt)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    if steps:
        Hs = sorted({r["H"] for r in steps})
        lines += [f"**step() at B=1**, {steps[0]['layers']} layers: latency, and / one call of the torch.nn "
                  "module of the cell's family on a length-1 sequence", "",
                  "| runner | " + " | ".join(f"H={H}" for H in Hs) + " |", "|---|" + "---|" * len(Hs)]
        idx = {(r["label"], r["H"]): r for r in steps}
        for label in dict.fromkeys(r["label"] for r in steps):
            cells = []
            for H in Hs:
                r = idx.get((label, H))
                cells.append("" if r is None else f"{r['us']:.0f} us" + (
                    "" if r["backend"] == "torch" else f" ({r['x_torch_family']:.2f}x)"))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Bar chart of time / torch.nn.LSTM per cell (auto's backend), one group of bars per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["backend"] not in ("torch",)]
    device = torch.device(result["meta"]["machine"]["device"])
    chosen = {c: auto_choice(c, device) for c in {r["cell"] for r in rows if r["backend"] != "loop"}}
    shapes = sorted({(r["T"], r["B"], r["H"]) for r in rows}, key=lambda s: (s[2], s[1], s[0]))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    width_in = max(8.0, 0.25 * len(chosen) * max(1, len(shapes)))
    fig, axes = plt.subplots(len(modes), 1, figsize=(width_in, 4 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        names = [c for c in dict.fromkeys(r["cell"] for r in rows if r["backend"] != "loop")] + \
                sorted({r["cell"] for r in rows if r["backend"] == "loop"})
        width = 0.8 / max(1, len(shapes))
        for k, s in enumerate(shapes):
            vals = []
            for n in names:
                r = next((r for r in rows if r["mode"] == mode and (r["T"], r["B"], r["H"]) == s and r["cell"] == n
                          and (r["backend"] == "loop" or r["backend"] == chosen.get(n))), None)
                vals.append(r["x_lstm"] if r else float("nan"))
            ax.bar([i + k * width for i in range(len(names))], vals, width, label=f"T={s[0]} B={s[1]} H={s[2]}")
        for y, style in ((1.0, "-"), (1.2, ":"), (1.5, "--")):
            ax.axhline(y, color="k", linestyle=style, linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("time / torch.nn.LSTM")
        ax.set_title(f"{mode}: backend chosen by auto (loop = plain PyTorch Python loop)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(name: str, text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if text is None:
        return default
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise BenchError(f"--{name}: expected comma-separated positive integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise BenchError(f"--{name}: expected comma-separated positive integers, got {text!r}")
    return vals


def run_benchmark(*, quick: bool = False, device: str = "cpu", cells: str | None = None,
                  backends: str | None = None, T: str | None = None, B: str | None = None, H: str | None = None,
                  modes: str = "fwd,fwdbwd", warmup: int = 1, repeats: int | None = None,
                  threads: int | None = None, memory: bool = True, step: bool = True,
                  compile_time: bool = False, reference: bool = False, quiet: bool = False,
                  command: str = "") -> dict[str, Any]:
    """Run the suite and return the result dict (see the module docstring)."""
    from .. import kernels
    from ..cells import REGISTRY
    from ..cells import resolve as resolve_cell
    from ..errors import UserError

    log = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BenchError(f"--device: expected cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device: {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    cell_list = list(REGISTRY) if cells is None else [c.strip() for c in cells.split(",") if c.strip()]
    unknown = [c for c in cell_list if c not in REGISTRY and ":" not in c]
    if unknown or not cell_list:
        raise BenchError(f"--cells: unknown cell(s) {unknown or cells!r}; expected names from {sorted(REGISTRY)} "
                         f"or 'path/to/file.py:NAME'")
    try:
        for c in cell_list:
            resolve_cell(c)
    except UserError as e:
        raise BenchError(f"--cells: {e}") from None
    backend_list = None if backends is None else [b.strip() for b in backends.split(",") if b.strip()]
    if backend_list is not None:
        bad = [b for b in backend_list if b not in kernels.BACKENDS]
        if bad or not backend_list:
            raise BenchError(f"--backends: unknown backend(s) {bad or backends!r}; "
                             f"expected names from {sorted(kernels.BACKENDS)}")
    mode_list = tuple(m.strip() for m in modes.split(",") if m.strip())
    if not mode_list or any(m not in MODES for m in mode_list):
        raise BenchError(f"--modes: expected a comma-separated subset of {list(MODES)}, got {modes!r}")
    base = QUICK_GRID if quick else FULL_GRID
    grid = {"T": _ints("T", T, base["T"]), "B": _ints("B", B, base["B"]), "H": _ints("H", H, base["H"])}
    if repeats is None:
        repeats = 3 if quick else 5
    if repeats < 1 or warmup < 0:
        raise BenchError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    if threads is not None:
        if threads < 1:
            raise BenchError(f"--threads: expected an int >= 1, got {threads}")
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    meta = {"command": command, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": _machine(dev), "grid": grid, "modes": mode_list, "warmup": warmup, "repeats": repeats,
            "auto": {c: auto_choice(c, dev) for c in cell_list}}
    result: dict[str, Any] = {"meta": meta}
    if compile_time and dev.type == "cpu" and "cpu" in kernels.BACKENDS:
        log("compile time of the cpu backend (fresh numba cache, in a subprocess)...")
        result["compile"] = compile_times()
    t0 = time.perf_counter()
    result["rows"] = run_sequences(cell_list, grid, mode_list, dev, backends=backend_list, warmup=warmup,
                                   repeats=repeats, memory=memory, with_reference=reference, log=log)
    result["steps"] = (run_step_latency(cell_list, grid["H"], dev, backends=backend_list,
                                        calls=50 if quick else 200, log=log) if step else [])
    meta["seconds"] = time.perf_counter() - t0
    result["targets"] = targets(result["rows"], result["steps"], dev)
    return result


@app.callback(invoke_without_command=True)
def bench(
    quick: bool = typer.Option(False, "--quick", help="Small grid: T=50, B in {8,32}, H in {128,256}, 3 runs."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    cells: str | None = typer.Option(
        None, "--cells", help="Comma-separated registry names or path/to/file.py:NAME (default: all registry cells)."),
    backends: str | None = typer.Option(None, "--backends", help="Comma-separated backends (default: all "
                                        "registered that run the cell, except reference)."),
    T: str | None = typer.Option(None, "--T", help="Override the grid's sequence lengths, e.g. 50,200."),
    B: str | None = typer.Option(None, "--B", help="Override the grid's batch sizes, e.g. 8,32."),
    H: str | None = typer.Option(None, "--H", help="Override the grid's hidden sizes (I = H), e.g. 128,256."),
    modes: str = typer.Option("fwd,fwdbwd", "--modes", help="fwd, fwdbwd or both."),
    warmup: int = typer.Option(1, "--warmup", help="Warm-up calls per runner."),
    repeats: int | None = typer.Option(None, "--repeats", help="Timed round-robin runs (default 3 quick, 5 full)."),
    threads: int | None = typer.Option(None, "--threads", help="torch.set_num_threads; the cpu backend "
                                       "splits a batch over RNNKIT_CPU_THREADS threads (default: this count)."),
    no_memory: bool = typer.Option(False, "--no-memory", help="Skip the peak-memory measurements."),
    no_step: bool = typer.Option(False, "--no-step", help="Skip the step() latency measurements."),
    compile_time: bool = typer.Option(False, "--compile-time", help="Also time the cpu backend's first-call "
                                      "compile in a fresh numba cache (subprocesses)."),
    reference: bool = typer.Option(False, "--reference", help="Also time the (slow) reference backend."),
    out: Annotated[Path | None, typer.Option("--out", help="Directory for kernels.json, kernels.md, "
                                             "kernels.png.")] = None,
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress on stderr."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
) -> None:
    """Time every cell under every backend against torch.nn and a plain Python loop; write JSON/Markdown/PNG."""
    command = "rnnkit bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else " ".join(sys.argv)
    try:
        result = run_benchmark(quick=quick, device=device, cells=cells, backends=backends, T=T, B=B, H=H,
                               modes=modes, warmup=warmup, repeats=repeats, threads=threads,
                               memory=not no_memory, step=not no_step, compile_time=compile_time,
                               reference=reference, quiet=quiet, command=command)
        write_outputs(result, out, quiet=quiet)
    except BenchError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(result))
    else:
        print(markdown(result))


def write_outputs(result: dict[str, Any], out: Path | None, *, quiet: bool = False) -> None:
    """Write ``kernels.json``, ``kernels.md`` and ``kernels.png`` into ``out`` (nothing if None)."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out: {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(result, indent=1))
    (out / "kernels.md").write_text(markdown(result) + "\n")
    plot(result, out / "kernels.png")
    if not quiet:
        print(f"wrote {out / 'kernels.json'}, {out / 'kernels.md'}, {out / 'kernels.png'}", file=sys.stderr)
