"""Many series in one table: long format (one row per ``id, time, value``), with the checks a regular time
index needs.

Checks, each an error naming the file row (the header is line 1, so data row ``r`` is line ``r + 2``):
duplicate timestamps within an id; an id with a single point; times that are not on a regular grid.
Gaps on the grid (a missing month, say) are an error by default, or filled by the ``fill`` policy of
:func:`rnnkit.data.series.fill_missing` (``ffill``, ``interpolate``, ``zero``) after inserting the
missing steps.

Times may be numbers (years, step indices) or dates (``1949-01``, ``1972-01-01``, ``2020-01-01 10:00``);
dates are put on the coarsest calendar unit (year, month, day, hour, minute, second) that holds all of them
exactly, so monthly dates written as the first of each month are one step apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .series import FILL_POLICIES, SeriesError, fill_missing, read_table

_UNITS = ("Y", "M", "D", "h", "m", "s")


@dataclass
class Panel:
    """Several univariate series: ``values[i]`` (T_i,) on the regular time index ``times[i]``."""

    ids: list[str]
    values: list[np.ndarray]
    times: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)


def _as_grid(times: np.ndarray, arg: str) -> tuple[np.ndarray, str]:
    """Times -> (int64 positions on a calendar or numeric grid, unit name)."""
    if times.dtype.kind == "f":
        if np.isnan(times).any():
            row = int(np.argmax(np.isnan(times)))
            raise SeriesError(f"{arg}: empty time at row {row} (line {row + 2})")
        return times.astype(np.float64), "number"
    try:
        stamps = np.array([np.datetime64(str(t).strip().replace(" ", "T")) for t in times])
    except ValueError as e:
        raise SeriesError(f"{arg}: {e}; expected numbers or dates such as 1949-01 or 1972-01-01") from e
    for unit in _UNITS:
        coarse = stamps.astype(f"datetime64[{unit}]")
        if (coarse.astype(stamps.dtype) == stamps).all():
            return coarse.astype(np.int64).astype(np.float64), unit
    return stamps.astype("datetime64[s]").astype(np.int64).astype(np.float64), "s"


def regularize(t: np.ndarray, y: np.ndarray, rows: np.ndarray, step: float, fill: str | None, arg: str,
               label: str) -> tuple[np.ndarray, np.ndarray]:
    """Put one series (sorted times ``t``, values ``y``, file rows ``rows``) on the grid of ``step``:
    duplicates and off-grid times are errors; gaps are an error or filled by ``fill``."""
    d = np.diff(t)
    dup = np.nonzero(d == 0)[0]
    if len(dup):
        i = dup[0]
        raise SeriesError(f"{arg}: duplicate timestamp {label}at rows {rows[i]} and {rows[i + 1]} (lines "
                          f"{rows[i] + 2} and {rows[i + 1] + 2}); expected one value per time")
    k = d / step
    off = np.nonzero(np.abs(k - np.round(k)) > 1e-9)[0]
    if len(off):
        i = off[0]
        raise SeriesError(f"{arg}: {label}row {rows[i + 1]} (line {rows[i + 1] + 2}) is {d[i]:g} after the "
                          f"previous time, not a multiple of the step {step:g}; expected a regular time index")
    k = np.round(k).astype(np.int64)
    gaps = np.nonzero(k > 1)[0]
    if len(gaps) and fill is None:
        i = gaps[0]
        raise SeriesError(f"{arg}: {label}{int((k - 1).clip(0).sum())} missing time step(s) (first after row "
                          f"{rows[i]}, line {rows[i] + 2}); fill them with --fill {{{'|'.join(FILL_POLICIES)}}} "
                          "or supply a complete series")
    pos = np.concatenate([[0], np.cumsum(k)])
    full = np.full(int(pos[-1]) + 1, np.nan)
    full[pos] = y
    return t[0] + step * np.arange(len(full)), fill_missing(full, fill, f"{arg} {label}".strip().rstrip(":"))


def read_long(source: Any, id_col: str = "id", time_col: str = "time", value_col: str = "value",
              fill: str | None = None, name: str = "--csv") -> Panel:
    """Read a long table (one row per id, time and value) into a :class:`Panel`; see :func:`panel_from_table`."""
    return panel_from_table(read_table(source, name), [value_col], id_col, time_col, fill, name)


def panel_from_table(table: dict[str, np.ndarray], targets: Sequence[str], id_col: str | None = None,
                     time_col: str | None = None, fill: str | None = None, name: str = "--csv") -> Panel:
    """The series of a table: with ``id_col``, one series per id of the single column ``targets[0]`` (long
    format); without, one series per target column (wide format, rows in time order).

    With ``time_col`` every series is put on its regular time grid: the step is the most common spacing
    between consecutive times over all series; duplicates and off-grid times are errors, gaps an error
    or filled by ``fill``. Rows may come in any order within an id (they are sorted by time).
    Without it, missing values follow ``fill`` (:func:`rnnkit.data.series.fill_missing`).
    """
    cols = [("--id-column", id_col), ("--time", time_col)] + [("--target", t) for t in targets]
    for arg, col in cols:
        if col is not None and col not in table:
            raise SeriesError(f"{arg}: no column {col!r} in {name}; the table has {list(table)}")
    for t in targets:
        if table[t].dtype.kind != "f":
            raise SeriesError(f"--target: column {t!r} is not numeric; expected numbers")
    if id_col is not None and len(targets) != 1:
        raise SeriesError(f"--target: long format (--id-column) takes one value column, got {list(targets)}")
    n = len(table[targets[0]])
    if id_col is None:
        groups = [(t, table[t], np.arange(n)) for t in targets]
    else:
        values = table[targets[0]]
        ids = np.array([str(v) if not isinstance(v, float) else f"{v:g}" for v in table[id_col]], dtype=object)
        order: dict[str, list[int]] = {}
        for r, i in enumerate(ids):
            order.setdefault(i, []).append(r)
        groups = []
        for key, idx in order.items():
            if len(idx) == 1:
                raise SeriesError(f"{name}: id {key!r} has a single point (row {idx[0]}, line {idx[0] + 2}); "
                                  "expected at least 2 points per series")
            groups.append((key, values[idx], np.asarray(idx)))
    if time_col is None:
        return Panel([k for k, _, _ in groups], [fill_missing(v, fill, f"{name} {k!r}") for k, v, _ in groups],
                     [np.arange(len(v)) for _, v, _ in groups])
    grid, unit = _as_grid(table[time_col], "--time")
    sorted_groups = []
    for key, v, rows in groups:
        o = np.argsort(grid[rows], kind="stable")
        sorted_groups.append((key, v[o], rows[o]))
    steps = np.concatenate([np.diff(grid[r]) for _, _, r in sorted_groups])
    pos = steps[steps > 0]
    if not len(pos):
        key, _, r = sorted_groups[0]
        raise SeriesError(f"{name}: duplicate timestamp {_label(key, id_col)}at rows {r[0]} and {r[1]} "
                          f"(lines {r[0] + 2} and {r[1] + 2}); expected one value per time")
    uniq, counts = np.unique(pos, return_counts=True)
    step = float(uniq[np.argmax(counts)])
    panel = Panel([], [], [])
    for key, v, r in sorted_groups:
        t, y = regularize(grid[r], v, r, step, fill, name, _label(key, id_col))
        panel.ids.append(key)
        panel.values.append(y)
        panel.times.append(t if unit == "number" else t.astype(np.int64).astype(f"datetime64[{unit}]"))
    return panel


def _label(key: str, id_col: str | None) -> str:
    return f"id {key!r}: " if id_col is not None else f"column {key!r}: "


def check_horizon(lengths: Sequence[int], horizon: int, min_history: int, arg: str = "--horizon") -> None:
    """Raise unless every series keeps ``min_history`` rows when ``horizon`` rows are held out, naming the
    largest horizon that works."""
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise SeriesError(f"{arg}: expected an int >= 1, got {horizon!r}")
    shortest = min(lengths)
    if shortest - horizon < min_history:
        largest = shortest - min_history
        hint = (f"the largest horizon that works is {largest}" if largest >= 1 else
                f"the series needs at least {min_history + 1} rows for any horizon")
        raise SeriesError(f"{arg}: {horizon} is too long for a series of {shortest} rows (a model needs "
                          f"{min_history} rows of history plus a validation tail as long as the horizon); {hint}")
