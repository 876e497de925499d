"""Time-series data handling: tables, missing values, scalers, windows, sequence readers and padding."""

import numpy as np
import pytest
import torch

from rnnkit.data.sequences import SequenceSet, length_mask, load_bundled, pad, read_sequences
from rnnkit.data.series import (
    Scaler,
    SeriesError,
    fill_missing,
    load_series,
    make_windows,
    read_table,
    sliding_windows,
)
from rnnkit.errors import UserError


def _write(path, text):
    path.write_text(text)
    return path


def test_read_csv_types_and_missing(tmp_path):
    p = _write(tmp_path / "a.csv", "t,x,name\n1,2.5,a\n2,,b\n3,NA,c\n")
    t = read_table(p)
    assert list(t) == ["t", "x", "name"]
    assert t["t"].dtype == np.float64 and np.isnan(t["x"][1:]).all()
    assert t["name"].dtype == object and t["name"].tolist() == ["a", "b", "c"]


def test_non_numeric_target_is_a_user_error(tmp_path):
    p = _write(tmp_path / "a.csv", "x,y\n1,a\n2,b\n")
    with pytest.raises(UserError, match=r"--target: column 'y' is not numeric \(e.g. value 'a'\)"):
        load_series(p, "y")
    with pytest.raises(SeriesError, match="no column 'z'"):
        load_series(p, "z")


def test_constant_series_is_an_error(tmp_path):
    p = _write(tmp_path / "a.csv", "x\n" + "3\n" * 10)
    with pytest.raises(SeriesError, match="constant"):
        load_series(p, "x")


@pytest.mark.parametrize("policy, expected", [
    ("ffill", [1.0, 1.0, 1.0, 4.0, 4.0]),
    ("interpolate", [1.0, 1.0, 2.5, 4.0, 4.0]),
    ("zero", [0.0, 1.0, 0.0, 4.0, 0.0]),
])
def test_fill_policies(policy, expected):
    x = np.array([np.nan, 1.0, np.nan, 4.0, np.nan])
    np.testing.assert_allclose(fill_missing(x, policy), expected)


def test_missing_values_error_by_default():
    with pytest.raises(SeriesError, match=r"1 missing value.*first at row 2.*--fill"):
        fill_missing(np.array([1.0, 2.0, np.nan, 3.0]), None, "--target")
    with pytest.raises(SeriesError, match="fill: expected one of"):
        fill_missing(np.array([1.0, np.nan]), "mean")


def test_trailing_future_rows_stay_missing(tmp_path):
    p = _write(tmp_path / "a.csv", "y,f\n1,0\n2,1\n3,0\n,1\n,0\n")
    s = load_series(p, "y", future=["f"], trailing_future=True)
    assert np.isnan(s.target[3:]).all() and not np.isnan(s.target[:3]).any()
    with pytest.raises(SeriesError, match="missing"):
        load_series(p, "y", future=["f"])


@pytest.mark.parametrize("kind", ["standard", "minmax", "robust", "none"])
def test_scaler_fit_on_train_only_round_trips(kind):
    rng = np.random.default_rng(0)
    train = rng.normal(5, 2, (100, 2))
    test = rng.normal(50, 2, (10, 2))  # far outside the training range: must not influence the fit
    s = Scaler(kind).fit(train)
    s2 = Scaler(kind).fit(train)
    s2.transform(test)
    np.testing.assert_allclose(s.center, s2.center)
    np.testing.assert_allclose(s.inverse(s.transform(test)), test)
    restored = Scaler.from_state(s.state())
    np.testing.assert_allclose(restored.transform(test), s.transform(test))
    if kind == "standard":
        z = s.transform(train)
        np.testing.assert_allclose(z.mean(0), 0, atol=1e-12)
        np.testing.assert_allclose(z.std(0), 1, atol=1e-12)
    if kind == "minmax":
        z = s.transform(train)
        np.testing.assert_allclose([z.min(), z.max()], [0, 1], atol=1e-12)


def test_make_windows_layout():
    T = 10
    y = np.arange(T, dtype=float)[:, None]
    past = 100 + y
    fut = 1000 + y
    w = make_windows(y, lookback=3, horizon=2, past=past, future=fut)
    assert w["x"].shape == (6, 3, 3) and w["y"].shape == (6, 2, 1) and w["xf"].shape == (6, 2, 1)
    np.testing.assert_array_equal(w["x"][1, :, 0], [1, 2, 3])
    np.testing.assert_array_equal(w["x"][1, :, 1], [101, 102, 103])
    np.testing.assert_array_equal(w["y"][1, :, 0], [4, 5])
    np.testing.assert_array_equal(w["xf"][1, :, 0], [1004, 1005])
    np.testing.assert_array_equal(w["start"], np.arange(6))


def test_too_short_series():
    with pytest.raises(SeriesError, match=r"shorter than lookback \+ horizon = 8 \+ 4 = 12"):
        make_windows(np.arange(10.0)[:, None], 8, 4)
    with pytest.raises(SeriesError, match="--horizon: expected an int >= 1"):
        make_windows(np.arange(10.0)[:, None], 3, 0)
    assert sliding_windows(np.arange(5.0)[:, None], 5).shape == (1, 5, 1)


def test_numpy_and_dataframe_inputs(tmp_path):
    a = np.stack([np.arange(20.0), np.arange(20.0) ** 2], 1)
    np.save(tmp_path / "a.npy", a)
    s = load_series(tmp_path / "a.npy", "c1")
    np.testing.assert_array_equal(s.target[:, 0], a[:, 1])
    s2 = load_series(np.arange(20.0))
    assert s2.target_names == ["value"]
    pd = pytest.importorskip("pandas", reason="pandas (rnnkit[datasets]) not installed")
    df = pd.DataFrame({"y": np.arange(20.0), "label": ["a"] * 20})
    s3 = load_series(df)  # the non-numeric column is not a default target
    assert s3.target_names == ["y"]


# ---- sequences ---------------------------------------------------------------------------------
def test_pad_and_mask():
    seqs = [np.ones((3, 2)), 2 * np.ones((5, 2))]
    x, lengths = pad(seqs)
    assert x.shape == (2, 5, 2) and lengths.tolist() == [3, 5]
    assert (x[0, 3:] == 0).all() and (x[1] == 2).all()
    m = length_mask(torch.tensor(lengths), 5)
    assert m.tolist() == [[True] * 3 + [False] * 2, [True] * 5]


def test_wide_csv_unequal_lengths(tmp_path):
    p = _write(tmp_path / "w.csv", "label,t0,t1,t2,t3\na,1,2,3,4\nb,5,6,,\n")
    s = read_sequences(p)
    assert s.labels.tolist() == ["a", "b"] and s.lengths.tolist() == [4, 2]
    np.testing.assert_array_equal(s.sequences[1][:, 0], [5, 6])


def test_csv_without_a_header_keeps_its_first_row(tmp_path):
    """A first row of data (the UCR archive's CSV: label, then values) is kept, the columns named c0, c1, ...;
    a header of step numbers (label,0,1,2 or 0,1,2) and ordinary names stay a header."""
    s = read_sequences(_write(tmp_path / "ucr.csv", "a,1,2,3\nb,4,5,6\na,7,8,9\n"))
    assert s.labels.tolist() == ["a", "b", "a"] and s.lengths.tolist() == [3, 3, 3]
    np.testing.assert_array_equal(s.sequences[0][:, 0], [1, 2, 3])
    s = read_sequences(_write(tmp_path / "ucr_num.csv", "1,0.5,0.25\n2,0.75,0.5\n"), label="c0")
    assert s.labels.tolist() == ['1', '2'] and s.lengths.tolist() == [2, 2]
    assert list(read_table(_write(tmp_path / "y.csv", "5\n6\n7\n"))) == ["c0"]
    steps = read_table(_write(tmp_path / "steps.csv", "label,0,1,2\na,1,2,3\n"))
    assert list(steps) == ["label", "0", "1", "2"]
    assert list(read_table(_write(tmp_path / "steps2.csv", "0,1,2\n5,6,7\n"))) == ["0", "1", "2"]
    assert len(read_table(_write(tmp_path / "data.csv", "5,1,2\n5,6,7\n"))["c0"]) == 2
    assert list(read_table(_write(tmp_path / "named.csv", "t,y\n1,5\n"))) == ["t", "y"]
    assert list(read_table(_write(tmp_path / "years.csv", "id,2019,2021\na,1,2\n"))) == ["id", "2019", "2021"]


def test_long_csv_multivariate(tmp_path):
    p = _write(tmp_path / "l.csv", "id,t,a,b,cls\ns1,1,1,10,x\ns1,0,0,9,x\ns2,0,5,5,y\n")
    s = read_sequences(p, id_col="id", time_col="t", label="cls")
    assert s.ids == ["s1", "s2"] and s.n_channels == 2 and s.labels.tolist() == ["x", "y"]
    np.testing.assert_array_equal(s.sequences[0], [[0, 9], [1, 10]])  # ordered by t
    bad = _write(tmp_path / "bad.csv", "id,a,cls\ns1,1,x\ns1,2,y\n")
    with pytest.raises(SeriesError, match="several labels"):
        read_sequences(bad, id_col="id", label="cls")


def test_ucr_tsv_and_npz(tmp_path):
    p = _write(tmp_path / "u.tsv", "1\t0.1\t0.2\t0.3\n2\t1.0\t2.0\tNaN\n")
    s = read_sequences(p)
    assert s.labels.tolist() == ["1", "2"] and s.lengths.tolist() == [3, 2]
    np.savez(tmp_path / "d.npz", X=np.zeros((4, 6, 3)), y=np.array([0, 1, 0, 1]), lengths=np.array([6, 5, 4, 3]))
    s2 = read_sequences(tmp_path / "d.npz")
    assert s2.n_channels == 3 and s2.lengths.tolist() == [6, 5, 4, 3] and s2.labels.tolist() == ["0", "1", "0", "1"]
    with pytest.raises(SeriesError, match="same number of channels"):
        SequenceSet([np.zeros((3, 1)), np.zeros((3, 2))])


def test_bundled_sets_are_read_offline():
    pytest.importorskip("aeon", reason="aeon (rnnkit[datasets]) not installed")
    tr = load_bundled("JapaneseVowels", "train")
    assert len(tr) == 270 and tr.n_channels == 12 and tr.lengths.min() < tr.lengths.max()
    gp = load_bundled("GunPoint", "test")
    assert len(gp) == 150 and gp.lengths.tolist() == [150] * 150
    with pytest.raises(SeriesError, match="not shipped"):
        load_bundled("NoSuchSet", "train")


def test_nonfinite_values_are_missing_values_named_by_row_and_column(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("t,a,b\n0,1,2\n1,2,inf\n2,3,-inf\n3,4,5\n")
    with pytest.raises(SeriesError, match=r"--target: 2 missing value.*first at row 1, column 'b': inf.*--fill"):
        load_series(p, "a,b")
    s = load_series(p, "a,b", fill="ffill")
    np.testing.assert_array_equal(s.target[:, 1], [2.0, 2.0, 2.0, 5.0])


def test_values_that_overflow_once_scaled_are_named(tmp_path):
    with pytest.raises(SeriesError, match=r"--csv: value too large at row 2, column 'v': 1e\+308"):
        Scaler("standard").fit(np.array([[1.0], [2.0], [1e308], [1e308]]), ["v"], "--csv")
    with pytest.raises(SeriesError, match=r"row 1, column 0: 1e\+39"):
        Scaler("none").fit(np.array([[1.0], [1e39]]))
    sc = Scaler("standard").fit(np.array([[1.0], [2.0], [3.0]]))
    with pytest.raises(SeriesError, match="value too large at row 0"):
        sc.transform(np.array([[1e300]]))
    assert np.isnan(sc.transform(np.array([[np.nan]]))).all()  # missing stays missing


def test_header_only_or_empty_inputs(tmp_path):
    p = tmp_path / "h.csv"
    p.write_text("time,value\n")
    with pytest.raises(SeriesError, match="only a header row"):
        load_series(p)
    np.save(tmp_path / "e.npy", np.zeros((0, 2)))
    with pytest.raises(SeriesError, match="the array is empty"):
        read_table(tmp_path / "e.npy")
