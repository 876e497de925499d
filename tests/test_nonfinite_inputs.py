"""Non-finite and overflowing values in user files: one clear line naming row and column, or filled as
the user's --fill says; never a silent run with exit status 0."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from rnnkit.cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def _csv(path, values):
    path.write_text("t,value\n" + "".join(f"{i},{v}\n" for i, v in enumerate(values)))
    return path


def _one_line_error(res, *fragments):
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.output, res.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    d = tmp_path_factory.mktemp("anomaly")
    x = np.sin(np.arange(300) / 5.0) + 0.05 * np.random.default_rng(0).standard_normal(300)
    res = runner.invoke(app, ["anomaly", "fit", "--csv", str(_csv(d / "normal.csv", x)), "--time", "t", "--hidden",
                              "8", "--window", "32", "--steps", "3", "--out", str(d / "run"), "--quiet"])
    assert res.exit_code == 0, res.output
    return d / "run", x


def test_anomaly_score_with_inf_names_row_and_column_or_follows_fill(tmp_path, detector):
    run, x = detector
    bad = [f"{v:.5f}" for v in x[:100]]
    bad[40] = "inf"
    path = _csv(tmp_path / "test.csv", bad)
    out = tmp_path / "scores.csv"
    res = runner.invoke(app, ["anomaly", "score", str(run), "--csv", str(path), "--time", "t", "--out", str(out)])
    _one_line_error(res, "row 40", "column 'value'", "inf", "--fill")
    assert not out.exists()
    res = runner.invoke(app, ["anomaly", "score", str(run), "--csv", str(path), "--time", "t", "--out", str(out),
                              "--fill", "ffill", "--json"])
    assert res.exit_code == 0, res.output
    scores = [float(r.split(",")[3]) for r in out.read_text().splitlines()[1:]]
    assert len(scores) == 100 and all(math.isfinite(s) for s in scores)
    assert json.loads(res.stdout)["points"] == 100


@pytest.mark.parametrize("group,argv", [
    ("anomaly", ["fit", "--steps", "2"]),
    ("anomaly", ["score", "RUN"]),
])
def test_header_only_csv_is_one_line(tmp_path, detector, group, argv):
    path = tmp_path / "h.csv"
    path.write_text("t,value\n")
    argv = [str(detector[0]) if a == "RUN" else a for a in argv]
    res = runner.invoke(app, [group, *argv, "--csv", str(path), "--out", str(tmp_path / "o")])
    _one_line_error(res, "only a header row")
