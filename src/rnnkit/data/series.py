"""Time-series input: tables from CSV/Parquet/NumPy/DataFrame, missing values, scaling, sliding windows.

A *table* here is an ordered ``dict[str, np.ndarray]`` of columns (numeric columns as float64, others as
object arrays), so the core package reads CSV and NumPy without pandas; Parquet and DataFrames go
through pandas when it is installed (``rnnkit[datasets]``).

Shapes: ``T`` time steps, ``C`` channels, ``L`` lookback, ``H`` horizon, ``N`` windows.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

FILL_POLICIES = ("ffill", "interpolate", "zero")
SCALERS = ("standard", "minmax", "robust", "none")
_MISSING = {"", "na", "nan", "null", "none", "n/a", "?"}

Table = dict[str, np.ndarray]


class SeriesError(UserError):
    """Bad time-series input (a user error: the message names the argument, the value and what was expected)."""


# ---- reading -----------------------------------------------------------------------------------
def _convert_column(raw: Sequence[str]) -> np.ndarray:
    """Float64 if every non-missing entry parses as a number, else an object array of the strings."""
    out = np.empty(len(raw), dtype=np.float64)
    for i, s in enumerate(raw):
        t = s.strip()
        if t.lower() in _MISSING:
            out[i] = np.nan
            continue
        try:
            out[i] = float(t)
        except ValueError:
            return np.array([s.strip() for s in raw], dtype=object)
    return out


def read_text_file(path: Path) -> str:
    """A UTF-8 text file (a leading byte-order mark dropped); undecodable bytes are a SeriesError."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SeriesError(f"{path}: not valid UTF-8 at byte offset {e.start} (bytes {data[e.start:e.end].hex(' ')}: "
                          f"{e.reason}); save the file as UTF-8") from None


def load_numpy(path: Path, name: str) -> Any:
    """``np.load`` without pickles; a damaged or foreign file is a SeriesError. An ``.npz`` is read whole."""
    import tokenize
    import zipfile
    import zlib

    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {k: loaded[k] for k in loaded.files}
        return loaded
    except (ValueError, EOFError, OSError, SyntaxError, tokenize.TokenError, zipfile.BadZipFile, zlib.error,
            KeyError) as e:  # (a damaged .npy header fails numpy's literal parsing)
        raise SeriesError(f"{name}: {str(path)!r} is not a readable NumPy file ({type(e).__name__}: "
                          f"{str(e)[:120]})") from None


def _is_data(rows: list[list[str]]) -> bool:
    """Whether the first row is data, not a header. A row that starts with a name is data when that name is
    also a value of the first column below (a class, as in the UCR archive's CSV: label, then values) and
    the rest are numbers; a row of numbers is data unless it reads 0, 1, 2, ... or 1, 2, 3, ... (three or
    more step numbers: the header pandas writes for a table of time steps)."""
    first = [f.strip() for f in rows[0]]
    if not first or not all(_is_number(v) for v in first[1:]):
        return False
    if not _is_number(first[0]):
        return first[0] in {r[0].strip() for r in rows[1:] if r}
    nums = [float(v) for v in first]
    return not (len(nums) >= 3 and nums[0] in (0.0, 1.0)
                and all(b - a == 1 for a, b in zip(nums, nums[1:])))


def _read_csv(path: Path) -> Table:
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    text = read_text_file(path)
    try:
        rows = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if r]
    except csv.Error as e:
        raise SeriesError(f"{path}: not a valid CSV file ({e})") from None
    if not rows:
        raise SeriesError(f"{path}: the file is empty; expected a header row and at least one data row")
    if _is_data(rows):  # no header (e.g. the UCR archive's CSV: a label, then the values)
        rows = [[f"c{j}" for j in range(len(rows[0]))]] + rows
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header):
        raise SeriesError(f"{path}: duplicate column names in the header {header}")
    body = rows[1:]
    if not body:
        raise SeriesError(f"{path}: only a header row ({header}); expected at least one data row")
    for n, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise SeriesError(f"{path}: line {n} has {len(r)} fields, the header has {len(header)}")
    return {h: _convert_column([r[j] for r in body]) for j, h in enumerate(header)}


def _from_dataframe(df: Any) -> Table:
    table: Table = {}
    for col in df.columns:
        values = df[col].to_numpy()
        if values.dtype.kind in "biuf":
            table[str(col)] = values.astype(np.float64)
        else:
            table[str(col)] = _convert_column(["" if v is None or (isinstance(v, float) and math.isnan(v))
                                               else str(v) for v in values])
    return table


def _from_array(a: np.ndarray, name: str) -> Table:
    a = np.asarray(a)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise SeriesError(f"{name}: expected a 1-D (T,) or 2-D (T, C) array, got shape {a.shape}")
    if a.dtype.kind not in "biuf":
        raise SeriesError(f"{name}: expected a numeric array, got dtype {a.dtype}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise SeriesError(f"{name}: the array is empty (shape {a.shape}); expected at least one row and column")
    names = ["value"] if a.shape[1] == 1 else [f"c{j}" for j in range(a.shape[1])]
    return {n: a[:, j].astype(np.float64) for j, n in enumerate(names)}


def read_table(source: Any, name: str = "input") -> Table:
    """Read a table from a path (``.csv``, ``.tsv``, ``.parquet``, ``.npy``, ``.npz``), a pandas DataFrame,
    a NumPy array (columns ``value`` or ``c0, c1, ...``) or a mapping of column name to values.

    Args:
        source: the data or a path to it.
        name: the argument's name, used in error messages (e.g. ``"--csv"``).
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise SeriesError(f"{name}: file not found: {str(path)!r}")
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv", ".tab", ".txt"):
            return _read_csv(path)
        if suffix == ".parquet":
            try:
                import pandas as pd
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise SeriesError(f"{name}: reading Parquet needs pandas and pyarrow "
                                  "(pip install 'rnnkit[datasets]' pyarrow)") from e
            try:
                return _from_dataframe(pd.read_parquet(path))
            except ImportError as e:  # pragma: no cover
                raise SeriesError(f"{name}: reading Parquet needs pyarrow or fastparquet: {e}") from e
        if suffix == ".npy":
            return _from_array(load_numpy(path, name), name)
        if suffix == ".npz":
            table: Table = {}
            for k, a in load_numpy(path, name).items():  # a 1-D array is one column; a 2-D one k_0, k_1, ...
                cols = _from_array(a, f"{name} [{k}]")
                table.update({k if c == "value" else f"{k}_{c[1:]}": v for c, v in cols.items()})
            if not table:
                raise SeriesError(f"{name}: {str(path)!r} holds no arrays")
            return table
        raise SeriesError(f"{name}: unsupported file type {suffix!r} for {str(path)!r}; expected .csv, .tsv, "
                          ".parquet, .npy or .npz")
    if hasattr(source, "columns") and hasattr(source, "to_numpy"):
        return _from_dataframe(source)
    if isinstance(source, np.ndarray):
        return _from_array(source, name)
    if isinstance(source, Mapping):
        return {str(k): (np.asarray(v, dtype=np.float64) if np.asarray(v).dtype.kind in "biuf"
                         else _convert_column([str(x) for x in v])) for k, v in source.items()}
    raise SeriesError(f"{name}: expected a file path, a pandas DataFrame, a NumPy array or a dict of columns, "
                      f"got {type(source).__name__}")


# ---- missing values and checks -----------------------------------------------------------------
def fill_missing(x: np.ndarray, policy: str | None, name: str = "series",
                 columns: Sequence[str] | None = None) -> np.ndarray:
    """Fill missing values (NaN) and non-finite ones (±inf) along time (axis 0) of a (T,) or (T, C) array.

    ``None`` raises on any of them, naming the first one's row and column (``columns``: the column
    names); ``ffill`` carries the last valid value forward (leading gaps take the first valid value);
    ``interpolate`` is linear in the index (edges held constant); ``zero`` fills 0.
    """
    x = np.array(x, dtype=np.float64, copy=True)
    mask = ~np.isfinite(x)
    if not mask.any():
        return x
    if policy is None:
        row, *col = np.argwhere(mask)[0].tolist()
        where = f"row {row}"
        if col and (x.shape[1] > 1 or columns is not None):
            j = col[0]
            where += f", column {repr(columns[j]) if columns is not None and j < len(columns) else j}"
        raise SeriesError(f"{name}: {int(mask.sum())} missing value(s) (empty, NaN or ±inf; first at {where}: "
                          f"{float(x[(row, *col)])!r}); choose a policy with --fill {{{'|'.join(FILL_POLICIES)}}}")
    x[mask] = np.nan
    if policy not in FILL_POLICIES:
        raise SeriesError(f"fill: expected one of {FILL_POLICIES}, got {policy!r}")
    cols = x.reshape(len(x), -1)
    for j in range(cols.shape[1]):
        c = cols[:, j]
        bad = np.isnan(c)
        if bad.all():
            raise SeriesError(f"{name}: column {j} has no valid value to fill from")
        if policy == "zero":
            c[bad] = 0.0
        elif policy == "interpolate":
            idx = np.arange(len(c))
            c[bad] = np.interp(idx[bad], idx[~bad], c[~bad])
        else:  # ffill: index of the last valid value at or before each row
            last = np.where(~bad, np.arange(len(c)), -1)
            np.maximum.accumulate(last, out=last)
            first = int(np.argmax(~bad))
            last[last < 0] = first
            c[:] = c[last]
    return cols.reshape(x.shape)


def numeric_columns(table: Table, columns: Sequence[str], arg: str) -> np.ndarray:
    """Stack ``columns`` of ``table`` into a (T, C) float64 array; clear errors for missing/non-numeric ones."""
    out = []
    for c in columns:
        if c not in table:
            raise SeriesError(f"{arg}: no column {c!r}; the table has {list(table)}")
        v = table[c]
        if v.dtype.kind != "f":
            sample = next((s for s in v if s.strip().lower() not in _MISSING and not _is_number(s)), v[0])
            raise SeriesError(f"{arg}: column {c!r} is not numeric (e.g. value {sample!r}); expected numbers")
        out.append(v)
    if not out:
        raise SeriesError(f"{arg}: no columns selected")
    return np.stack(out, axis=1)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def check_not_constant(x: np.ndarray, names: Sequence[str], arg: str) -> None:
    """Raise if a column of the (T, C) array ``x`` has (nearly) zero spread: nothing to learn or scale."""
    for j, n in enumerate(names):
        c = x[:, j]
        if np.nanmax(c) - np.nanmin(c) <= 1e-12 * max(1.0, float(np.nanmax(np.abs(c)))):
            raise SeriesError(f"{arg}: column {n!r} is constant (every value is {c[0]:g}); expected a varying series")


# ---- the series container ----------------------------------------------------------------------
@dataclass
class Series:
    """A multivariate series with optional covariates, aligned in time.

    Attributes:
        target: (T, Ct) values to forecast.
        past: (T, Cp) covariates observed only up to the present.
        future: (T, Cf) covariates known ahead of time (calendar, planned inputs).
        time: (T,) time labels (strings or numbers) or None.
    """

    target: np.ndarray
    target_names: list[str]
    past: np.ndarray
    past_names: list[str] = field(default_factory=list)
    future: np.ndarray | None = None
    future_names: list[str] = field(default_factory=list)
    time: np.ndarray | None = None

    def __post_init__(self) -> None:
        T = len(self.target)
        if self.future is None:
            self.future = np.zeros((T, 0))
        for name, a in (("past", self.past), ("future", self.future)):
            if a.shape[0] != T:
                raise SeriesError(f"{name} covariates: {a.shape[0]} rows, the target has {T}")

    def __len__(self) -> int:
        return len(self.target)

    def slice(self, start: int, stop: int) -> Series:
        """Rows ``start:stop`` (a view)."""
        return Series(self.target[start:stop], self.target_names, self.past[start:stop], self.past_names,
                      self.future[start:stop], self.future_names,
                      None if self.time is None else self.time[start:stop])


def load_series(source: Any, target: Sequence[str] | str | None = None, *, time: str | None = None,
                past: Sequence[str] = (), future: Sequence[str] = (), fill: str | None = None,
                name: str = "--csv", trailing_future: bool = False) -> Series:
    """Read a table and select the target (default: every numeric column but ``time``) and covariates.

    Missing values follow ``fill`` (see :func:`fill_missing`); non-numeric selected columns and constant
    targets are errors. With ``trailing_future``, trailing rows whose target is empty are kept as NaN
    (rows that carry only known-future covariates for a forecast).
    """
    table = read_table(source, name)
    if time is not None and time not in table:
        raise SeriesError(f"--time: no column {time!r}; the table has {list(table)}")
    if isinstance(target, str):
        target = [t for t in target.split(",") if t]
    if not target:
        used = {time, *past, *future}
        target = [c for c, v in table.items() if c not in used and v.dtype.kind == "f"]
        if not target:
            raise SeriesError(f"--target: no numeric column found in {list(table)}; name one with --target")
    y = numeric_columns(table, target, "--target")
    observed = ~np.isnan(y).all(axis=1)
    n_obs = int(np.nonzero(observed)[0].max()) + 1 if (trailing_future and observed.any()) else len(y)
    y = np.concatenate([fill_missing(y[:n_obs], fill, "--target", target), y[n_obs:]])
    check_not_constant(y[:n_obs], target, "--target")
    p = fill_missing(numeric_columns(table, past, "--past-covariates"), fill, "--past-covariates", past) if past \
        else np.zeros((len(y), 0))
    f = fill_missing(numeric_columns(table, future, "--future-covariates"), fill, "--future-covariates", future) \
        if future else np.zeros((len(y), 0))
    return Series(y, list(target), p, list(past), f, list(future), None if time is None else table[time])


# ---- scaling -----------------------------------------------------------------------------------
class Scaler:
    r"""Per-column affine scaling :math:`z = (x - \text{center}) / \text{scale}`, fit on training rows only.

    ``standard``: mean / standard deviation; ``minmax``: min / (max - min) to [0, 1]; ``robust``:
    median / interquartile range; ``none``: identity. Saved with the model via :meth:`state`.
    """

    def __init__(self, kind: str = "standard") -> None:
        if kind not in SCALERS:
            raise SeriesError(f"scaler: expected one of {SCALERS}, got {kind!r}")
        self.kind = kind
        self.center: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.names: list[str] | None = None
        self.arg = "values"

    def fit(self, x: np.ndarray, names: Sequence[str] | None = None, arg: str = "values") -> Scaler:
        """Fit on (..., C) training values (NaNs ignored); ``names`` and ``arg`` name columns and input in errors.

        Raises:
            SeriesError: a column's center or spread overflows float64, or its scaled values overflow
                float32 (the model's precision); the message names the row and column of its largest value.
        """
        x = np.asarray(x, dtype=np.float64).reshape(-1, np.shape(x)[-1])
        self.names, self.arg = list(names) if names is not None else None, arg
        with np.errstate(over="ignore", invalid="ignore"):
            self._fit(x)
        spread_overflows = ~(np.isfinite(self.center) & np.isfinite(self.scale))
        if spread_overflows.any():
            self._too_large(np.broadcast_to(spread_overflows, x.shape) & ~np.isnan(x), x)
        self.transform(x)  # checks that the training values stay in range once scaled
        return self

    def _fit(self, x: np.ndarray) -> None:
        if self.kind == "standard":
            c, s = np.nanmean(x, 0), np.nanstd(x, 0)
        elif self.kind == "minmax":
            c = np.nanmin(x, 0)
            s = np.nanmax(x, 0) - c
        elif self.kind == "robust":
            q1, c, q3 = np.nanpercentile(x, [25, 50, 75], axis=0)
            s = q3 - q1
        else:
            c, s = np.zeros(x.shape[1]), np.ones(x.shape[1])
        s = np.where(s > 1e-12, s, 1.0)  # a constant column passes through unscaled, centred
        self.center, self.scale = c, s

    def _check(self) -> None:
        if self.center is None:
            raise RuntimeError("Scaler: call fit() first")

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Scale (..., C) values; NaNs stay NaN, and a value that overflows float32 once scaled is an error."""
        self._check()
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            z = (x - self.center) / self.scale
        bad = ~np.isnan(x) & ~(np.abs(z) <= np.finfo(np.float32).max)
        if bad.any():
            self._too_large(bad, x)
        return z

    def _too_large(self, bad: np.ndarray, x: np.ndarray) -> None:
        """Raise naming the largest value of the first column with a ``bad`` entry."""
        rows, flat = bad.reshape(-1, bad.shape[-1]), x.reshape(-1, x.shape[-1])
        j = int(np.argmax(rows.any(0)))
        i = int(np.argmax(np.where(rows[:, j], np.abs(flat[:, j]), -1.0)))
        column = repr(self.names[j]) if self.names is not None and j < len(self.names) else str(j)
        raise SeriesError(f"{self.arg}: value too large at row {i}, column {column}: {flat[i, j]:.6g} overflows "
                          f"once scaled ({self.kind} scaling); expected values well within ±1e38")

    def inverse(self, z: np.ndarray) -> np.ndarray:
        self._check()
        return np.asarray(z, dtype=np.float64) * self.scale + self.center

    def inverse_spread(self, s: np.ndarray) -> np.ndarray:
        """Map a spread (standard deviation, interval half-width) back to data units."""
        self._check()
        return np.asarray(s, dtype=np.float64) * self.scale

    def state(self) -> dict[str, Any]:
        self._check()
        return {"kind": self.kind, "center": self.center.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Scaler:
        s = cls(state["kind"])
        s.center = np.asarray(state["center"], dtype=np.float64)
        s.scale = np.asarray(state["scale"], dtype=np.float64)
        return s


# ---- windows -----------------------------------------------------------------------------------
def check_length(n: int, lookback: int, horizon: int, arg: str = "--csv") -> None:
    """Raise unless a series of ``n`` rows holds at least one window of lookback + horizon rows."""
    for name, v in (("--lookback", lookback), ("--horizon", horizon)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SeriesError(f"{name}: expected an int >= 1, got {v!r}")
    if n < lookback + horizon:
        raise SeriesError(f"{arg}: the series has {n} rows, shorter than lookback + horizon = "
                          f"{lookback} + {horizon} = {lookback + horizon}; use a longer series or smaller windows")


def sliding_windows(x: np.ndarray, length: int, stride: int = 1) -> np.ndarray:
    """All windows ``x[s:s+length]`` for s = 0, stride, ...: (N, length, C) from (T, C) (a copy)."""
    if len(x) < length:
        raise SeriesError(f"series: {len(x)} rows, shorter than the window length {length}")
    starts = np.arange(0, len(x) - length + 1, stride)
    idx = starts[:, None] + np.arange(length)[None, :]
    return x[idx]


def make_windows(target: np.ndarray, lookback: int, horizon: int, past: np.ndarray | None = None,
                 future: np.ndarray | None = None, stride: int = 1) -> dict[str, np.ndarray]:
    """Windows for forecasting from (T, Ct) target and optional (T, Cp) past / (T, Cf) future covariates.

    Returns:
        ``x``: (N, L, Ct + Cp + Cf) inputs over the lookback (target first, then past, then future);
        ``y``: (N, H, Ct) targets over the horizon; ``xf``: (N, H, Cf) future covariates over the horizon;
        ``start``: (N,) index of each window's first row.
    """
    check_length(len(target), lookback, horizon, "series")
    T = len(target)
    past = np.zeros((T, 0)) if past is None else past
    future = np.zeros((T, 0)) if future is None else future
    inputs = np.concatenate([target, past, future], axis=1)
    w = sliding_windows(np.concatenate([inputs, target, future], axis=1), lookback + horizon, stride)
    ci, ct = inputs.shape[1], target.shape[1]
    return {"x": w[:, :lookback, :ci], "y": w[:, lookback:, ci:ci + ct], "xf": w[:, lookback:, ci + ct:],
            "start": np.arange(0, T - lookback - horizon + 1, stride)}
