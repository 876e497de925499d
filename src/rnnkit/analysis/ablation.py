r"""The ablation grid: every (task, cell variant, seed) trained in its own process, then aggregated.

Each run is ``rnnkit experiment <task> --cell <variant> --seed <s> ...`` (or, for the task
``charlm``, a short ``rnnkit charlm train``) in a subprocess (one torch thread each, ``jobs`` at a
time) writing ``out_dir/<task>/<variant>/seed<s>``; a finished run directory is reused, so an
interrupted grid continues where it stopped.

Aggregation: mean and standard deviation over seeds of each task's metric; the *harm* of a variant
on a task is the fraction of the LSTM's margin over the memoryless baseline that the variant loses,

.. math:: \mathrm{harm} = \frac{m_{\mathrm{LSTM}} - m_v}{m_{\mathrm{LSTM}} - m_{\mathrm{base}}}
   \quad(\text{accuracies; with the signs flipped for losses}),

0 = as good as the LSTM, 1 = no better than the baseline (negative = better than the LSTM). The
gate-importance ranking orders the single-gate ablations (no forget / input / output gate, no
output activation) by their mean harm over the tasks.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

DEFAULT_VARIANTS = ("lstm", "lstm_nfg", "lstm_nig", "lstm_nog", "lstm_noact", "lstm_cifg", "lstm_peephole",
                    "lstm_fb0", "gru", "lstm_ln", "rnn")
GATE_ABLATIONS = {"lstm_nfg": "forget gate", "lstm_nig": "input gate", "lstm_nog": "output gate",
                  "lstm_noact": "output activation"}
SYNTHETIC = ("adding", "copy", "temporal-order", "agreement")
#: tasks the grid can run: the synthetic ones and a short character-level LM (`rnnkit charlm train` on
#: the built-in Shakespeare; metric validation bits per character, baseline log2(vocabulary size))
TASK_NAMES = (*SYNTHETIC, "charlm")
DEFAULT_LENGTHS = {"adding": 100, "copy": 50, "temporal-order": 100, "agreement": 30, "charlm": 100}


def task_metric(task: str) -> tuple[str, bool]:
    """(metric name, lower is better) of a grid task."""
    if task == "charlm":
        return "val_bits_per_char", True
    from ..tasks.synthetic import TASKS

    return TASKS[task].metric, TASKS[task].lower_is_better


def parse_lengths(spec: str | None, tasks: list[str]) -> dict[str, int]:
    """``"adding=100,copy=50"`` or ``"60"`` (all tasks) -> {task: T}; unspecified tasks get the defaults."""
    lengths = {t: DEFAULT_LENGTHS.get(t, 100) for t in tasks}
    if not spec:
        return lengths
    try:
        if "=" not in spec:
            return {t: int(spec) for t in tasks}
        for part in spec.split(","):
            k, v = part.split("=")
            if k.strip() not in lengths:
                raise ValueError(f"--length: {k.strip()!r} is not among the tasks {tasks}")
            lengths[k.strip()] = int(v)
    except ValueError as e:
        if "--length" in str(e):
            raise
        raise ValueError(f"--length: expected 'T' or 'task=T,task=T', got {spec!r}") from None
    return lengths


def _command(task: str, variant: str, seed: int, steps: int, length: int, hidden: int, run_dir: Path) -> list[str]:
    if task == "charlm":  # length = the truncated-BPTT chunk
        return [sys.executable, "-m", "rnnkit.cli.main", "charlm", "train", "--cell", variant, "--seed", str(seed),
                "--steps", str(steps), "--tbptt", str(length), "--hidden", str(hidden), "--layers", "1",
                "--out", str(run_dir), "--json", "--quiet", "--set", "trainer.tensorboard=false",
                "--set", "data.eval_chars=20000"]
    return [sys.executable, "-m", "rnnkit.cli.main", "experiment", task, "--cell", variant, "--seed", str(seed),
            "--steps", str(steps), "--length", str(length), "--hidden", str(hidden), "--out", str(run_dir),
            "--json", "--quiet", "--no-analysis", "--set", "trainer.tensorboard=false",
            "--set", "trainer.checkpoint_every=0"]


def run_one(task: str, variant: str, seed: int, steps: int, length: int, hidden: int, run_dir: Path,
            timeout: float | None = None) -> dict[str, Any]:
    """Run (or reuse) one cell of the grid; returns its result dict (with ``"error"`` if it failed)."""
    done = run_dir / ("ablation_result.json" if task == "charlm" else "experiment.json")
    if done.is_file():
        return json.loads(done.read_text())["result"]
    if task not in TASK_NAMES:
        raise ValueError(f"tasks: expected names from {list(TASK_NAMES)}, got {task!r}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    cmd = _command(task, variant, seed, steps, length, hidden, run_dir)
    if any((run_dir / "checkpoints").glob("*.json")):  # interrupted earlier: continue it
        cmd.append("--resume")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        return {"task": task, "cell": variant, "seed": seed, "error": proc.stderr.strip().splitlines()[-1:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = round(time.perf_counter() - t0, 1)
    if task == "charlm":
        import math

        result.update(task="charlm", cell=variant, seed=seed, baseline=math.log2(result["vocab_size"]))
        done.write_text(json.dumps({"result": result}))
    return result


def harm(value: float, lstm: float, baseline: float, lower_is_better: bool) -> float:
    """Fraction of the LSTM's margin over the baseline that ``value`` loses (see the module docstring)."""
    margin = (baseline - lstm) if lower_is_better else (lstm - baseline)
    if margin <= 0:
        return float("nan")  # the LSTM itself did not beat the baseline: nothing to lose
    lost = (value - lstm) if lower_is_better else (lstm - value)
    return lost / margin


def aggregate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean/std per (task, variant), harm relative to the LSTM, and the gate-importance ranking."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        if "error" in r:
            continue
        task = r["task"]
        metric = task_metric(task)[0]
        cell = table.setdefault(task, {}).setdefault(r["cell"], {"values": [], "metric": metric,
                                                                 "baseline": r["baseline"]})
        cell["values"].append(float(r[metric]))
    for task, rows in table.items():
        lower = task_metric(task)[1]
        ref = rows.get("lstm")
        for cell in rows.values():
            vals = cell["values"]
            cell["mean"] = statistics.fmean(vals)
            cell["std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cell["n"] = len(vals)
        for cell in rows.values():
            cell["harm"] = harm(cell["mean"], ref["mean"], cell["baseline"], lower) if ref else float("nan")
    variants = sorted({v for rows in table.values() for v in rows})
    overall = {}
    for v in variants:
        hs = [rows[v]["harm"] for rows in table.values() if v in rows and rows[v]["harm"] == rows[v]["harm"]]
        if hs:
            overall[v] = statistics.fmean(hs)
    ranking = {"overall": sorted(overall, key=lambda v: -overall[v]),
               "gates": [GATE_ABLATIONS[v] for v in sorted((v for v in overall if v in GATE_ABLATIONS),
                                                           key=lambda v: -overall[v])],
               "mean_harm": overall}
    return {"table": table, "ranking": ranking}


def markdown(agg: dict[str, Any]) -> str:
    """The aggregated grid as a Markdown table (mean +- std over seeds; harm in parentheses)."""
    table = agg["table"]
    tasks = list(table)
    variants = sorted({v for rows in table.values() for v in rows},
                      key=lambda v: -agg["ranking"]["mean_harm"].get(v, float("-inf")))
    head = "| variant | " + " | ".join(f"{t} ({next(iter(table[t].values()))['metric']}, "
                                       f"baseline {next(iter(table[t].values()))['baseline']:.3g})"
                                       for t in tasks) + " | mean harm |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    for v in variants:
        cells = []
        for t in tasks:
            c = table[t].get(v)
            if c is None:
                cells.append("—")
                continue
            h = c["harm"]
            cells.append(f"{c['mean']:.4g} ± {c['std']:.2g} (n={c['n']}"
                         + (f", harm {h:.2f})" if h == h else ")"))
        mh = agg["ranking"]["mean_harm"].get(v)
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {'—' if mh is None else f'{mh:.2f}'} |")
    return "\n".join(lines) + "\n"


def run_grid(tasks: list[str], variants: list[str], *, seeds: int, steps: int, lengths: dict[str, int],
             hidden: int, jobs: int, out_dir: Path, quiet: bool = False) -> dict[str, Any]:
    """Run the grid with ``jobs`` processes at a time; write ``ablation.json``, ``ablation.md`` and plots."""
    from ..cells import REGISTRY

    for t in tasks:
        if t not in TASK_NAMES:
            raise ValueError(f"--tasks: expected names from {list(TASK_NAMES)}, got {t!r}")
    for v in variants:
        if v not in REGISTRY:
            raise ValueError(f"--variants: {v!r} is not a registry cell; expected names from {sorted(REGISTRY)}")
    if seeds < 1 or steps < 1 or jobs < 1:
        raise ValueError(f"--seeds/--steps/--jobs: expected positive integers, got {seeds}/{steps}/{jobs}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = [(t, v, s) for t in tasks for v in variants for s in range(seeds)]
    t0 = time.perf_counter()

    def work(item: tuple[str, str, int]) -> dict[str, Any]:
        t, v, s = item
        r = run_one(t, v, s, steps, lengths[t], hidden, out_dir / t / v / f"seed{s}")
        if not quiet:
            shown = r.get("error") or {k: r.get(k) for k in ("task", "cell", "seed", "steps", "wall_s")}
            print(f"[{time.perf_counter() - t0:.0f}s] {shown}", file=sys.stderr, flush=True)
        return r

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait on the subprocesses
        results = list(pool.map(work, grid))
    agg = aggregate(results)
    summary = {"tasks": tasks, "variants": variants, "seeds": seeds, "steps": steps, "lengths": lengths,
               "hidden": hidden, "wall_s": round(time.perf_counter() - t0, 1),
               "errors": [r for r in results if "error" in r], **agg}
    (out_dir / "ablation.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "ablation.md").write_text(markdown(agg))
    from . import plots

    for t, rows in agg["table"].items():
        bars = [{"variant": v, "mean": c["mean"], "std": c["std"]} for v, c in rows.items()]
        first = next(iter(rows.values()))
        plots.save(plots.ablation_bars(bars, metric=first["metric"], baseline=first["baseline"],
                                       title=f"{t} (T={lengths[t]}, {steps} steps, {seeds} seeds)"),
                   out_dir / f"ablation_{t}.png")
    summary["table_path"] = str(out_dir / "ablation.md")
    summary["json_path"] = str(out_dir / "ablation.json")
    return summary


__all__ = ["DEFAULT_VARIANTS", "TASK_NAMES", "task_metric", "GATE_ABLATIONS", "run_grid", "run_one", "aggregate",
           "markdown", "harm", "parse_lengths"]
