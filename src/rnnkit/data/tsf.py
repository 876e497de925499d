"""Reader of the Monash forecasting archive's ``.tsf`` files (Godahewa et al. 2021).

The format: ``#`` comment lines, then ``@`` header lines (``@relation``, one ``@attribute NAME TYPE`` per
leading field with TYPE ``string``, ``numeric`` or ``date``, ``@frequency``, ``@horizon``, ``@missing``,
``@equallength``), then ``@data`` and one series per line::

    T1:1972-01-01 00-00-00:3600,7700,12300,...

the attribute values separated by ``:`` and the observations by ``,`` (``?`` = missing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .series import SeriesError

ATTRIBUTE_TYPES = ("string", "numeric", "date")


@dataclass
class TsfData:
    """The contents of a ``.tsf`` file.

    Attributes:
        series: one float64 array per series (NaN where the file has ``?``).
        attributes: attribute name -> one value per series (str, float or ``numpy.datetime64``).
        frequency, horizon: the header's values (None when absent).
        missing, equal_length: the header's flags.
    """

    series: list[np.ndarray]
    attributes: dict[str, list[Any]] = field(default_factory=dict)
    frequency: str | None = None
    horizon: int | None = None
    missing: bool = False
    equal_length: bool = False

    @property
    def names(self) -> list[str]:
        """A name per series: the first string attribute (``series_name`` in the archive), else its index."""
        for values in self.attributes.values():
            if values and isinstance(values[0], str):
                return list(values)
        return [str(i) for i in range(len(self.series))]


def _flag(value: str, where: str) -> bool:
    v = value.strip().lower()
    if v not in ("true", "false"):
        raise SeriesError(f"{where}: expected true or false, got {value!r}")
    return v == "true"


def _date(text: str, where: str) -> np.datetime64:
    """``1972-01-01 00-00-00`` (the archive's form) or an ISO date/time."""
    t = text.strip()
    parts = t.split(" ")
    if len(parts) == 2:
        t = f"{parts[0]}T{parts[1].replace('-', ':')}"
    try:
        return np.datetime64(t, "s")
    except ValueError as e:
        raise SeriesError(f"{where}: {text!r} is not a date (expected e.g. 1972-01-01 00-00-00)") from e


def read_tsf(path: str | Path, name: str = "--tsf") -> TsfData:
    """Read a ``.tsf`` file; errors name the file, the line and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise SeriesError(f"{name}: file not found: {str(path)!r}")
    attrs: list[tuple[str, str]] = []
    data = TsfData(series=[])
    in_data = False
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, raw in enumerate(f, start=1):
            line = raw.strip()
            where = f"{path}: line {n}"
            if not line or line.startswith("#"):
                continue
            if not in_data:
                if not line.startswith("@"):
                    raise SeriesError(f"{where}: expected a header line starting with @ before @data, got "
                                      f"{line[:40]!r}")
                key, _, rest = line[1:].partition(" ")
                key = key.lower()
                if key == "attribute":
                    parts = rest.split()
                    if len(parts) != 2 or parts[1].lower() not in ATTRIBUTE_TYPES:
                        raise SeriesError(f"{where}: expected '@attribute NAME TYPE' with TYPE one of "
                                          f"{ATTRIBUTE_TYPES}, got {line!r}")
                    attrs.append((parts[0], parts[1].lower()))
                elif key == "frequency":
                    data.frequency = rest.strip()
                elif key == "horizon":
                    try:
                        data.horizon = int(rest)
                    except ValueError as e:
                        raise SeriesError(f"{where}: @horizon expects an integer, got {rest!r}") from e
                elif key == "missing":
                    data.missing = _flag(rest, where)
                elif key == "equallength":
                    data.equal_length = _flag(rest, where)
                elif key == "data":
                    in_data = True
                    data.attributes = {a: [] for a, _ in attrs}
                continue
            fields = line.split(":")
            if len(fields) != len(attrs) + 1:
                raise SeriesError(f"{where}: expected {len(attrs)} attribute value(s) then the series, separated by "
                                  f"':', got {len(fields) - 1} separator(s)")
            for (a, kind), v in zip(attrs, fields[:-1]):
                if kind == "date":
                    data.attributes[a].append(_date(v, f"{where}, attribute {a}"))
                elif kind == "numeric":
                    try:
                        data.attributes[a].append(float(v))
                    except ValueError as e:
                        raise SeriesError(f"{where}: attribute {a} expects a number, got {v!r}") from e
                else:
                    data.attributes[a].append(v)
            values = fields[-1].split(",")
            try:
                y = np.array([np.nan if v.strip() == "?" else float(v) for v in values], dtype=np.float64)
            except ValueError as e:
                raise SeriesError(f"{where}: the series holds a value that is neither a number nor '?': {e}") from e
            if np.isnan(y).any() and not data.missing:
                raise SeriesError(f"{where}: missing value '?' in a file whose header says @missing false")
            data.series.append(y)
    if not in_data:
        raise SeriesError(f"{path}: no @data line; expected a .tsf file of the Monash forecasting archive")
    if not data.series:
        raise SeriesError(f"{path}: no series after @data")
    return data


def aeon_tsf(name: str) -> Path:
    """Path of a ``.tsf`` file shipped in the ``aeon`` wheel, e.g. ``m1_yearly_dataset``."""
    try:
        import aeon
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SeriesError(f"{name}: the built-in Monash files ship with aeon (pip install 'rnnkit[datasets]')") from e
    root = Path(aeon.__file__).parent / "datasets" / "data"
    found = sorted(root.glob(f"**/{name}.tsf"))
    if not found:
        have = sorted(p.stem for p in root.glob("**/*.tsf"))
        raise SeriesError(f"--dataset: no {name}.tsf in aeon's data folder; it has {have}")
    return found[0]
