"""Many-series input: the Monash .tsf reader and long-format id,time,value tables with their checks."""

from __future__ import annotations

import numpy as np
import pytest

from rnnkit.data.panel import check_horizon, read_long
from rnnkit.data.series import SeriesError
from rnnkit.data.tsf import aeon_tsf, read_tsf

TSF = """# comment
@relation test
@attribute series_name string
@attribute start_timestamp date
@frequency yearly
@horizon 4
@missing true
@equallength false
@data
T1:1979-01-01 00-00-00:1.5,2,3
T2:1980-01-01 00-00-00:4,?,6,7
"""


def test_tsf_reads_header_attributes_and_missing_values(tmp_path):
    p = tmp_path / "a.tsf"
    p.write_text(TSF)
    d = read_tsf(p)
    assert d.frequency == "yearly" and d.horizon == 4 and d.missing and not d.equal_length
    assert d.names == ["T1", "T2"]
    assert d.attributes["start_timestamp"][1] == np.datetime64("1980-01-01T00:00:00")
    np.testing.assert_array_equal(d.series[0], [1.5, 2, 3])
    assert np.isnan(d.series[1][1]) and d.series[1][3] == 7


@pytest.mark.parametrize("bad, match", [
    (TSF.replace("T1:1979-01-01 00-00-00:", "T1:"), "line 10: expected 2 attribute"),
    (TSF.replace("1.5,2,3", "1.5,x,3"), "line 10: the series holds a value"),
    (TSF.replace("@missing true", "@missing false"), "line 11: missing value"),
    (TSF.replace("@horizon 4", "@horizon four"), "line 6: @horizon expects an integer"),
    (TSF.replace("@data\n", ""), "expected a header line starting with @"),
])
def test_tsf_errors_name_the_line(tmp_path, bad, match):
    p = tmp_path / "bad.tsf"
    p.write_text(bad)
    with pytest.raises(SeriesError, match=match):
        read_tsf(p)


def test_tsf_m1_yearly_from_aeon():
    pytest.importorskip("aeon")
    d = read_tsf(aeon_tsf("m1_yearly_dataset"))
    assert len(d.series) == 181 and d.horizon == 6 and d.frequency == "yearly"
    assert min(len(y) for y in d.series) == 15 and d.series[0][:3].tolist() == [3600, 7700, 12300]


def _csv(tmp_path, text):
    p = tmp_path / "long.csv"
    p.write_text(text)
    return p


def test_long_format_sorts_and_puts_monthly_dates_on_a_grid(tmp_path):
    p = _csv(tmp_path, "id,time,value\nb,2020-02-01,5\na,2020-01,1\na,2020-03,3\na,2020-02,2\nb,2020-01-01,4\n")
    panel = read_long(p)
    assert panel.ids == ["b", "a"]
    np.testing.assert_array_equal(panel.values[1], [1, 2, 3])
    np.testing.assert_array_equal(panel.values[0], [4, 5])
    assert str(panel.times[1][2]) == "2020-03"


def test_long_format_gap_is_an_error_or_filled(tmp_path):
    p = _csv(tmp_path, "id,time,value\na,1,1\na,2,2\na,4,4\na,5,5\nb,1,0\nb,2,1\n")
    with pytest.raises(SeriesError, match=r"id 'a': 1 missing time step\(s\) \(first after row 1, line 3\)"):
        read_long(p)
    panel = read_long(p, fill="interpolate")
    np.testing.assert_allclose(panel.values[0], [1, 2, 3, 4, 5])
    np.testing.assert_allclose(panel.times[0], [1, 2, 3, 4, 5])
    np.testing.assert_allclose(read_long(p, fill="ffill").values[0], [1, 2, 2, 4, 5])
    empty = _csv(tmp_path, "id,time,value\na,1,1\na,2,\na,3,3\nb,1,0\nb,2,1\n")
    with pytest.raises(SeriesError, match=r"^--csv id 'a': 1 missing value\(s\) \(empty, NaN or ±inf; first at row 1: "
                                          r"nan\); choose a policy with --fill"):
        read_long(empty)


def test_long_format_duplicate_and_single_point_name_the_row(tmp_path):
    p = _csv(tmp_path, "id,time,value\na,1,1\na,2,2\na,2,3\n")
    with pytest.raises(SeriesError, match=r"duplicate timestamp id 'a': at rows 1 and 2 \(lines 3 and 4\)"):
        read_long(p)
    p = _csv(tmp_path, "id,time,value\na,1,1\na,2,2\nb,7,3\n")
    with pytest.raises(SeriesError, match=r"id 'b' has a single point \(row 2, line 4\)"):
        read_long(p)
    p = _csv(tmp_path, "id,time,value\na,1,1\na,2,2\na,3.5,3\n")
    with pytest.raises(SeriesError, match=r"row 2 \(line 4\) is 1.5 after the previous time"):
        read_long(p)
    with pytest.raises(SeriesError, match="--id-column: no column 'series'"):
        read_long(p, id_col="series")


def test_horizon_error_names_the_largest_that_works():
    check_horizon([20, 30], 15, 5)
    with pytest.raises(SeriesError, match="the largest horizon that works is 15"):
        check_horizon([20, 30], 16, 5)
    with pytest.raises(SeriesError, match="at least 6 rows"):
        check_horizon([5], 1, 5)
