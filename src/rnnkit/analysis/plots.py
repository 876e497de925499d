"""Matplotlib figures (Agg backend, no display): learning curves, gradient flow, gate statistics.

Every function returns a ``matplotlib.figure.Figure``; :func:`save` writes it as PNG and closes it,
:func:`to_png_bytes` renders it in memory (for the HTML report).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

_COLORS = {"rnn": "tab:red", "lstm": "tab:blue", "gru": "tab:green"}


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG (100 dpi) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def to_png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def learning_curve(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, ylabel: str = "loss",
                   baseline: float | None = None, baseline_label: str = "memoryless baseline",
                   title: str = "", log_y: bool = True) -> Figure:
    """Curves ``{label: (steps, values)}`` with an optional horizontal baseline."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, (x, y) in series.items():
        if len(x):
            ax.plot(x, y, label=label, lw=1.2)
    if baseline is not None:
        ax.axhline(baseline, color="k", ls="--", lw=1, label=f"{baseline_label} ({baseline:.3g})")
    ys = [v for _, y in series.values() for v in y]
    if log_y and ys and min(ys) > 0 and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def gradient_flow(curves: Mapping[str, Mapping[str, Sequence[float]]], *, title: str = "") -> Figure:
    r"""Norm of dL_T/dh_t (solid), dL_T/dc_t (dashed) and of any further state (dotted, dash-dot) against t,
    log scale, one colour per model.

    Args:
        curves: ``{label: {"h": [...], "c": [...], ...}}`` (one entry per state); a label starting with a family name
            ("rnn", "lstm", "gru") gets that family's colour; "untrained" in it gives a faint line.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, g in curves.items():
        fam = next((f for f in ("lstm", "gru", "rnn") if label.lower().startswith(f)), None)
        color = _COLORS.get(fam)
        alpha = 0.45 if "untrained" in label else 1.0
        others = [n for n in g if n not in ("h", "c")]
        styles = [("h", "-"), ("c", "--"), *zip(others, [":", "-."] * len(others))]
        for name, ls in styles:
            if name in g and len(g[name]):
                y = np.maximum(np.asarray(g[name], dtype=float), 1e-30)
                ax.plot(np.arange(len(y)), y, ls=ls, color=color, alpha=alpha,
                        label=f"{label}: |dL/d{name}_t|")
    ax.set_yscale("log")
    ax.set_xlabel("t (loss at the last step)")
    ax.set_ylabel("gradient norm")
    ax.set_title(title or "Gradient flow through time")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return fig


def gate_statistics(stats: Mapping, *, title: str = "") -> Figure:
    """Per gate: histogram of values, and per-unit right- vs left-saturation scatter (Karpathy et al.)."""
    layers = stats["layers"]
    gates = [g for g in ("i", "f", "o", "r", "z") if any(g in entry for entry in layers)]
    if not gates:
        raise ValueError(f"stats: no sigmoid gates recorded (family {stats.get('family')!r})")
    fig, axes = plt.subplots(2, len(gates), figsize=(3.0 * len(gates), 5.6), squeeze=False)
    names = {"i": "input", "f": "forget", "o": "output", "r": "reset", "z": "update"}
    for j, g in enumerate(gates):
        for k, entry in enumerate(layers):
            if g not in entry:
                continue
            e = entry[g]
            hist = np.asarray(e["hist"], dtype=float)
            edges = np.linspace(0, 1, len(hist) + 1)
            axes[0, j].stairs(hist / max(hist.sum(), 1), edges, label=f"layer {k}")
            axes[1, j].scatter(e["left_frac"], e["right_frac"], s=8, alpha=0.7, label=f"layer {k}")
        axes[0, j].set_title(f"{names[g]} gate ({g})")
        axes[0, j].set_xlabel("activation")
        axes[1, j].plot([0, 1], [1, 0], color="0.7", lw=0.8)
        axes[1, j].set_xlim(0, 1)
        axes[1, j].set_ylim(0, 1)
        axes[1, j].set_xlabel(f"left-saturated (< {stats['left']})")
        axes[1, j].set_ylabel(f"right-saturated (> {stats['right']})")
    axes[0, 0].set_ylabel("fraction of values")
    if len(layers) > 1:
        axes[0, 0].legend(fontsize=7)
    fig.suptitle(title or f"Gate statistics ({stats['family']})")
    fig.tight_layout()
    return fig


def ablation_bars(rows: Sequence[Mapping], *, metric: str, baseline: float | None = None,
                  title: str = "") -> Figure:
    """Mean +- std of ``metric`` per variant (rows: {"variant", "mean", "std"})."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(rows) + 1.5), 3.6))
    x = np.arange(len(rows))
    ax.bar(x, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], color="tab:blue", alpha=0.8, capsize=3)
    ax.set_xticks(x, [r["variant"] for r in rows], rotation=45, ha="right", fontsize=8)
    if baseline is not None:
        ax.axhline(baseline, color="k", ls="--", lw=1, label=f"baseline ({baseline:.3g})")
        ax.legend(fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


__all__ = ["save", "to_png_bytes", "learning_curve", "gradient_flow", "gate_statistics", "ablation_bars"]
