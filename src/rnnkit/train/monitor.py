"""Run logging: metrics.jsonl, TensorBoard scalars and progress on stderr (rich bar or plain lines).

The progress display is a rich bar when stderr is a terminal and ``CI`` is not set, otherwise one plain
line every ``log_every`` steps; ``quiet`` silences it. Files are written by rank 0 only.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


def _fmt_num(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


NONFINITE = "nonfinite"  # the key of a record's non-finite values


def strict_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as strict JSON: each non-finite float becomes ``None``, listed under ``"nonfinite"``.

    ``{"loss": inf, "step": 3}`` -> ``{"loss": None, "step": 3, "nonfinite": {"loss": "inf"}}``; values
    nested in dicts are listed by dotted key. :func:`restore_record` inverts it.
    """
    flags: dict[str, str] = {}

    def clean(v: Any, key: str) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            flags[key] = repr(v)
            return None
        if isinstance(v, dict):
            return {k: clean(x, f"{key}.{k}") for k, x in v.items()}
        return v

    out = {k: clean(v, k) for k, v in record.items()}
    if flags:
        out[NONFINITE] = flags
    return out


def restore_record(record: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`strict_record`: the listed non-finite values put back."""
    out = {k: v for k, v in record.items() if k != NONFINITE}
    for key, text in record.get(NONFINITE, {}).items():
        *path, last = key.split(".")
        node = out
        for k in path:
            node = node[k]
        node[last] = float(text)
    return out


class MetricsLog:
    """Append-only ``metrics.jsonl`` (one JSON object per line) plus TensorBoard scalars."""

    def __init__(self, run_dir: Path | None, tensorboard: bool, purge_after: int | None = None) -> None:
        self.path = run_dir / "metrics.jsonl" if run_dir is not None else None
        self._tb = None
        if run_dir is not None and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # on resume, TensorBoard hides the killed run's events after the restored step
            purge = purge_after + 1 if purge_after is not None else None
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (written by a run that was killed after its last checkpoint)."""
        if self.path is None or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if int(rec.get("step", 0)) <= step:
                keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(strict_record(record), allow_nan=False) + "\n")
        if self._tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k in ("step", "kind") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                prefix = "" if "/" in k else ("eval/" if record.get("kind") == "eval" else "train/")
                self._tb.add_scalar(prefix + k, v, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """Progress on stderr: a rich bar on a terminal, plain lines otherwise, nothing when quiet."""

    def __init__(self, total_steps: int | None, *, quiet: bool, log_every: int, unit: str,
                 enabled: bool = True, rich: bool | None = None) -> None:
        self.total = total_steps
        self.quiet = quiet or not enabled
        self.log_every = log_every
        self.unit = unit
        if rich is None:
            rich = sys.stderr.isatty() and os.environ.get("CI", "").lower() in ("", "0", "false")
        self.rich = rich and not self.quiet
        self._bar = None
        self._task = None
        self._t0 = time.perf_counter()

    def start(self, step: int) -> None:
        self._t0 = time.perf_counter()
        self._step0 = step
        if self.rich:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     console=Console(stderr=True), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("train", total=self.total, completed=step, info="")

    def update(self, step: int, record: dict[str, Any] | None) -> None:
        if self.quiet:
            return
        info = ""
        if record is not None:
            parts = [f"epoch {record['epoch']}", f"loss {_fmt_num(record['loss'])}", f"lr {record['lr']:.3g}"]
            if record.get("grad_norm") is not None:
                parts.append(f"gnorm {_fmt_num(record['grad_norm'])}")
            parts.append(f"{record['throughput']:,.0f} {self.unit}/s")
            if record.get("skipped_steps"):
                parts.append(f"skipped {record['skipped_steps']}")
            info = " | ".join(parts)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, **({"info": info} if info else {}))
        elif record is not None:
            done = step - self._step0
            eta = ""
            if self.total and done > 0:
                rate = (time.perf_counter() - self._t0) / done
                eta = f" | ETA {_fmt_time(rate * (self.total - step))}"
            total = f"/{self.total}" if self.total else ""
            print(f"step {step}{total} | {info}{eta}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


__all__ = ["MetricsLog", "Progress", "strict_record", "restore_record", "NONFINITE"]
