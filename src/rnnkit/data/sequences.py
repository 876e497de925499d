"""Sets of (possibly unequal-length) sequences for classification and embeddings: readers and padding.

Readers: UCR/UEA ``.ts`` (through aeon's own loader), UCR ``.tsv`` (label first, one sequence per row,
NaN-padded), CSV wide (one sequence per row, with a label column) or long (an id column, optional time
column, one row per step), NumPy ``.npz`` (``X`` (N, T) or (N, T, C), optional ``y`` and ``lengths``)
or ``.npy`` (X only). Bundled sets come from files shipped inside aeon and from the ``mnist1d`` generator;
nothing is downloaded.

Padding: :func:`pad` returns (N, T, C) with zeros past each length plus the lengths, so the layers'
``lengths`` argument keeps padding out of states, and :func:`length_mask` keeps it out of losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .series import SeriesError, _convert_column, fill_missing, load_numpy, read_table, read_text_file


@dataclass
class SequenceSet:
    """N sequences, each (T_i, C) float64, with optional labels (strings) and ids; ``image_shape`` (H, W)
    when they are images of one size read as sequences (:func:`rnnkit.data.images.as_sequence_set`)."""

    sequences: list[np.ndarray]
    labels: np.ndarray | None = None
    ids: list[str] | None = None
    image_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.sequences:
            raise SeriesError("sequences: the set is empty; expected at least one sequence")
        C = {s.shape[1] for s in self.sequences}
        if len(C) != 1:
            raise SeriesError(f"sequences: every sequence needs the same number of channels, got {sorted(C)}")
        if self.labels is not None:
            self.labels = np.asarray([label_name(v) for v in self.labels], dtype=object)
            if len(self.labels) != len(self.sequences):
                raise SeriesError(f"labels: {len(self.labels)} labels for {len(self.sequences)} sequences")
        if self.ids is None:
            self.ids = [str(i) for i in range(len(self.sequences))]

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def n_channels(self) -> int:
        return self.sequences[0].shape[1]

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(s) for s in self.sequences], dtype=np.int64)


def pad(sequences: Sequence[np.ndarray], max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad (T_i, C) sequences to (N, T, C) float32, T = max length (or ``max_len``, truncating)."""
    lengths = np.array([min(len(s), max_len or len(s)) for s in sequences], dtype=np.int64)
    T = int(lengths.max())
    out = np.zeros((len(sequences), T, sequences[0].shape[1]), dtype=np.float32)
    for i, (s, n) in enumerate(zip(sequences, lengths)):
        out[i, :n] = s[:n]
    return out, lengths


def length_mask(lengths: Tensor, T: int) -> Tensor:
    """(B, T) boolean mask, True at valid steps ``t < lengths[b]``."""
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


def augment(x: Tensor, lengths: Tensor, jitter: float = 0.0, scale: float = 0.0, warp: float = 0.0,
            knots: int = 4) -> Tensor:
    r"""Random training-time augmentation of a padded batch (B, T, C) (Um et al. 2017); padding stays zero.

    .. math:: \tilde x_{b,t,c} = (x_{b,t,c}\, s_{b,c}\, w_{b,t} + \epsilon_{b,t,c})\, m_{b,t}

    with :math:`s \sim N(1, \text{scale}^2)` per sequence and channel, :math:`w` a magnitude-warping curve
    through ``knots`` points :math:`\sim N(1, \text{warp}^2)` evenly spaced over each sequence's own length
    (linear in between), :math:`\epsilon \sim N(0, \text{jitter}^2)` and :math:`m` the valid-step mask.
    Draws from torch's global generator (seeded and checkpointed by the trainer).
    """
    if not (jitter or scale or warp):
        return x
    B, T, C = x.shape
    out = x
    if scale:
        out = out * (1 + scale * torch.randn(B, 1, C, device=x.device, dtype=x.dtype))
    if warp:
        k = torch.randn(B, knots, device=x.device, dtype=x.dtype) * warp + 1
        pos = torch.arange(T, device=x.device, dtype=x.dtype)[None] / (lengths[:, None].to(x.dtype) - 1).clamp(min=1)
        u = pos.clamp(max=1) * (knots - 1)  # (B, T) position in knot units
        lo = u.floor().long().clamp(max=knots - 2)
        frac = u - lo
        curve = k.gather(1, lo) * (1 - frac) + k.gather(1, lo + 1) * frac
        out = out * curve[..., None]
    if jitter:
        out = out + jitter * torch.randn_like(out)
    return out * length_mask(lengths.to(x.device), T)[..., None].to(x.dtype)


def label_name(value: Any) -> str:
    """A class label as text; numbers that are whole print without a decimal point (0.0 and "0.0" -> "0"),
    so a label column read as floats names its classes as written."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if math.isfinite(number) and number.is_integer() else text


# ---- readers -----------------------------------------------------------------------------------
def _from_3d(X: Any) -> list[np.ndarray]:
    """aeon layout (N, C, T) array or list of (C, T_i) -> list of (T_i, C) float64, trailing NaNs cut."""
    out = []
    for x in X:
        x = np.asarray(x, dtype=np.float64).T  # (T, C)
        valid = ~np.isnan(x).all(axis=1)
        n = int(np.nonzero(valid)[0].max()) + 1 if valid.any() else 0
        if n == 0:
            raise SeriesError("sequences: a sequence has no valid value")
        out.append(x[:n])
    return out


def _read_ts(path: Path) -> SequenceSet:
    try:
        from aeon.datasets import load_from_ts_file
    except ImportError as e:
        raise SeriesError(f"{path}: reading .ts files needs aeon (pip install 'rnnkit[datasets]')") from e
    try:
        X, y = load_from_ts_file(str(path))
    except Exception as e:  # aeon's parser raises many types (IOError, ValueError, IndexError, ...) on bad files
        raise SeriesError(f"{path}: not a readable .ts file ({type(e).__name__}: {str(e)[:160]})") from None
    return SequenceSet(_from_3d(X), None if y is None or len(y) == 0 else np.asarray(y))


def _read_ucr_tsv(path: Path) -> SequenceSet:
    rows = [line.rstrip("\n").split("\t") for line in read_text_file(path).splitlines() if line.strip()]
    labels, seqs = [], []
    for n, r in enumerate(rows, start=1):
        vals = _convert_column(r[1:])
        if vals.dtype.kind != "f":
            raise SeriesError(f"{path}: line {n} has non-numeric values; expected a label then numbers (UCR .tsv)")
        valid = np.nonzero(~np.isnan(vals))[0]
        if len(valid) == 0:
            raise SeriesError(f"{path}: line {n} has no values after the label")
        labels.append(r[0].strip())
        seqs.append(vals[: valid.max() + 1, None])
    return SequenceSet(seqs, np.asarray(labels))


def read_sequences(source: Any, *, label: str | None = None, id_col: str | None = None,
                   time_col: str | None = None, fill: str | None = None, name: str = "--train") -> SequenceSet:
    """Read a set of sequences (see the module docstring for the formats).

    Args:
        source: a path, a (N, T) / (N, T, C) array, or a list of (T_i,) / (T_i, C) arrays.
        label: CSV label column (wide: default the first column if it is named ``label``/``class``/``y``
            or is non-numeric; long: constant per id); ``"none"`` for unlabelled input.
        id_col: CSV long format: the column naming the sequence of each row.
        time_col: CSV long format: the column to order rows within a sequence.
        fill: missing-value policy inside sequences (see :func:`rnnkit.data.series.fill_missing`).
    """
    if isinstance(source, (list, tuple)) or (isinstance(source, np.ndarray) and source.dtype != object):
        if isinstance(source, np.ndarray):
            arr = source[..., None] if source.ndim == 2 else source
            if arr.ndim != 3:
                raise SeriesError(f"{name}: expected an array (N, T) or (N, T, C), got shape {source.shape}")
            seqs = list(arr)
        else:
            seqs = [np.asarray(s, dtype=np.float64).reshape(len(s), -1) for s in source]
        return SequenceSet([fill_missing(s, fill, name) for s in seqs])
    path = Path(source)
    if not path.is_file():
        raise SeriesError(f"{name}: file not found: {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix == ".ts":
        return _read_ts(path)
    if suffix == ".tsv":
        s = _read_ucr_tsv(path)
        return SequenceSet([fill_missing(x, fill, name) for x in s.sequences], s.labels)
    if suffix in (".npz", ".npy"):
        if suffix == ".npy":
            X, y, lengths = load_numpy(path, name), None, None
        else:
            z = load_numpy(path, name)
            if "X" not in z:
                raise SeriesError(f"{name}: {path} has arrays {list(z)}; expected 'X' (and optionally "
                                  "'y', 'lengths')")
            X, y, lengths = z["X"], z.get("y"), z.get("lengths")
        if not isinstance(X, np.ndarray) or X.dtype.kind not in "biuf":
            raise SeriesError(f"{name}: {path} holds a {getattr(X, 'dtype', type(X).__name__)} array; expected "
                              f"numbers (N, T) or (N, T, C)")
        seqs = read_sequences(X.astype(np.float64), fill=fill, name=name).sequences
        if lengths is not None:
            seqs = [s[: int(n)] for s, n in zip(seqs, lengths)]
        return SequenceSet(seqs, y)
    if suffix != ".csv":
        raise SeriesError(f"{name}: unsupported file type {suffix!r}; expected .ts, .tsv, .csv, .npz or .npy")
    table = read_table(path, name)
    if id_col is not None:
        return _long_format(table, label, id_col, time_col, fill, name)
    cols = list(table)
    if label is None:
        first = cols[0]
        label = first if (first.lower() in ("label", "class", "y", "target")
                          or table[first].dtype.kind != "f") else "none"
    if label != "none" and label not in table:
        raise SeriesError(f"--label: no column {label!r}; the table has {cols}")
    value_cols = [c for c in cols if c != label]
    X = np.stack([table[c] for c in value_cols], axis=1) if value_cols else None
    if X is None or X.dtype.kind != "f":
        bad = next(c for c in value_cols if table[c].dtype.kind != "f") if value_cols else "(none)"
        raise SeriesError(f"{name}: column {bad!r} is not numeric; wide CSV expects a label column then one "
                          "numeric column per time step (or pass --id-column for long format)")
    seqs = []
    for i, row in enumerate(X):  # trailing empty cells mark a shorter sequence
        valid = np.nonzero(~np.isnan(row))[0]
        if len(valid) == 0:
            raise SeriesError(f"{name}: row {i + 2} has no values")
        seqs.append(fill_missing(row[: valid.max() + 1, None], fill, f"{name} row {i + 2}"))
    return SequenceSet(seqs, None if label == "none" else table[label])


def _long_format(table: dict, label: str | None, id_col: str, time_col: str | None, fill: str | None,
                 name: str) -> SequenceSet:
    if id_col not in table:
        raise SeriesError(f"--id-column: no column {id_col!r}; the table has {list(table)}")
    if time_col is not None and time_col not in table:
        raise SeriesError(f"--time: no column {time_col!r}; the table has {list(table)}")
    if label is not None and label != "none" and label not in table:
        raise SeriesError(f"--label: no column {label!r}; the table has {list(table)}")
    skip = {id_col, time_col, label}
    value_cols = [c for c in table if c not in skip]
    bad = [c for c in value_cols if table[c].dtype.kind != "f"]
    if bad:
        raise SeriesError(f"{name}: column {bad[0]!r} is not numeric (e.g. {table[bad[0]][0]!r}); long format "
                          f"expects numeric value columns besides --id-column/--time/--label")
    ids = np.asarray([str(v) for v in table[id_col]], dtype=object)
    order = list(dict.fromkeys(ids.tolist()))  # first-appearance order
    values = np.stack([table[c] for c in value_cols], axis=1)
    seqs, labels = [], []
    for sid in order:
        rows = np.nonzero(ids == sid)[0]
        if time_col is not None:
            rows = rows[np.argsort(table[time_col][rows], kind="stable")]
        seqs.append(fill_missing(values[rows], fill, f"{name} id {sid}"))
        if label is not None and label != "none":
            lab = {str(v) for v in table[label][rows]}
            if len(lab) != 1:
                raise SeriesError(f"--label: sequence {sid!r} has several labels {sorted(lab)}; expected one")
            labels.append(lab.pop())
    return SequenceSet(seqs, np.asarray(labels) if labels else None, order)


# ---- bundled sets ------------------------------------------------------------------------------
BUNDLED_UCR = ("GunPoint", "ItalyPowerDemand", "ArrowHead", "BasicMotions", "JapaneseVowels", "OSULeaf",
               "ACSF1", "UnitTest")


def bundled_names() -> list[str]:
    """Names accepted by :func:`load_bundled` (aeon-shipped UCR/UEA sets present here, and MNIST1D)."""
    names = ["MNIST1D"]
    try:
        import aeon
    except ImportError:
        return names
    root = Path(aeon.__file__).parent / "datasets" / "data"
    return sorted(n for n in BUNDLED_UCR if (root / n / f"{n}_TRAIN.ts").is_file()) + names


def load_bundled(name: str, split: str) -> SequenceSet:
    """A bundled classification set: ``split`` is ``"train"`` or ``"test"``. Never downloads.

    UCR/UEA sets are read from the ``.ts`` files inside the aeon package; ``MNIST1D`` is generated by
    the ``mnist1d`` package with its default arguments (4,000 train / 1,000 test, length 40).
    """
    if split not in ("train", "test"):
        raise SeriesError(f"split: expected 'train' or 'test', got {split!r}")
    if name.upper() in ("MNIST1D", "MNIST-1D"):
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError as e:
            raise SeriesError("--dataset MNIST1D needs the mnist1d package (pip install 'rnnkit[datasets]')") from e
        d = make_dataset(get_dataset_args())
        X, y = (d["x"], d["y"]) if split == "train" else (d["x_test"], d["y_test"])
        return SequenceSet(list(np.asarray(X, dtype=np.float64)[..., None]), np.asarray(y))
    try:
        import aeon
    except ImportError as e:
        raise SeriesError(f"--dataset {name}: bundled sets need aeon (pip install 'rnnkit[datasets]')") from e
    path = Path(aeon.__file__).parent / "datasets" / "data" / name / f"{name}_{split.upper()}.ts"
    if not path.is_file():
        raise SeriesError(f"--dataset: {name!r} is not shipped with the installed packages (nothing is "
                          f"downloaded); expected one of {bundled_names()}")
    return _read_ts(path)
