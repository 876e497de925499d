"""Error messages name the real cause: the broken file, torch's own reason, the unseen label, and only
the steps the user asked for."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from rnnkit.cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def one_line(res, *fragments, code=2):
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == code and len(lines) == 1 and "Traceback" not in res.output, res.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def charlm_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    text = d / "t.txt"
    text.write_text("to be or not to be, that is the question. " * 60, encoding="utf-8")
    res = runner.invoke(app, ["charlm", "train", "--text", str(text), "--out", str(d / "run"), "--steps", "2",
                              "--hidden-size", "8", "--layers", "1", "--embedding-size", "4", "--batch-size", "4",
                              "--tbptt", "10", "--quiet", "--set", "trainer.tensorboard=false"])
    assert res.exit_code == 0, res.output
    return d / "run"


def drop_last_symbol(path):
    vocab = json.loads(path.read_text())
    path.write_text(json.dumps({**vocab, "itos": vocab["itos"][:-1]}))


@pytest.mark.parametrize("damage,fragments", [
    (lambda r: (r / "config.toml").write_text((r / "config.toml").read_text() + "\nbroken [toml\n"),
     ["config.toml", "not a valid config file"]),
    (lambda r: (r / "config.toml").write_text((r / "config.toml").read_text() + "\n[extra]\nx = 1\n"),
     ["config.toml", "unknown config key extra"]),
    (lambda r: (r / "vocab.json").write_text("{"), ["vocab.json", "not a valid vocabulary file"]),
    (lambda r: drop_last_symbol(r / "vocab.json"), ["vocab.json", "was trained on"]),
    (lambda r: (r / "config.toml").write_text((r / "config.toml").read_text().replace("hidden_size = 8",
                                                                                       "hidden_size = 12")),
     ["config.toml", "size mismatch for", "torch.Size([32, 8])"]),
])
def test_broken_run_files_are_named(charlm_run, tmp_path, damage, fragments):
    run = tmp_path / "run"
    shutil.copytree(charlm_run, run)
    damage(run)
    line = one_line(runner.invoke(app, ["charlm", "sample", str(run), "--length", "3"]), *fragments)
    if "vocab.json" in fragments:
        assert "config.toml" not in line  # an edited vocabulary is not blamed on the config


def _series(path, values):
    path.write_text("t,value\n" + "".join(f"{i},{v!r}\n" for i, v in enumerate(values)))
    return path


def test_forecast_overflow_and_differencing_wording(tmp_path):
    x = [100 + 10 * math.sin(i / 3) for i in range(120)]
    big = list(x)
    big[50] = 1e308
    res = runner.invoke(app, ["forecast", "train", "--csv", str(_series(tmp_path / "big.csv", big)), "--out",
                              str(tmp_path / "F"), "--steps", "2", "--quiet"])
    one_line(res, "--csv: value too large at row 50, column 'value'")
    assert not (tmp_path / "F").exists()
    short = _series(tmp_path / "short.csv", x[:20])
    # (the automatic mode sizes its windows to a short series; the fixed model names what is missing)
    res = runner.invoke(app, ["forecast", "train", "--csv", str(short), "--out", str(tmp_path / "S"), "--quiet",
                              "--no-auto"])
    assert "differencing" not in one_line(res, "--csv: the series has 20 rows")
    res = runner.invoke(app, ["forecast", "train", "--csv", str(short), "--out", str(tmp_path / "S"), "--quiet",
                              "--no-auto", "--set", "data.difference=[1]"])
    one_line(res, "--csv (after differencing): the series has 19 rows")


def _sequences(path, labels, seed=0):
    rng = np.random.default_rng(seed)
    path.write_text("label," + ",".join(f"t{i}" for i in range(6)) + "\n" + "".join(
        f"{y}," + ",".join(f"{v:.3f}" for v in rng.normal(y, 1.0, 6)) + "\n" for y in labels))
    return path


def test_integer_labels_stay_integers_and_unseen_test_labels_stop_before_training(tmp_path):
    train = _sequences(tmp_path / "train.csv", [0, 1] * 12)
    res = runner.invoke(app, ["classify", "train", "--train", str(train), "--test",
                              str(_sequences(tmp_path / "bad.csv", [0, 1, 2], seed=1)), "--out", str(tmp_path / "B"),
                              "--epochs", "1", "--quiet"])
    one_line(res, "--test: labels ['2'] do not occur in the training set (classes ['0', '1'])")
    assert not (tmp_path / "B").exists()  # said before any training
    out = tmp_path / "p.csv"
    res = runner.invoke(app, ["classify", "train", "--train", str(train), "--out", str(tmp_path / "C"), "--epochs",
                              "1", "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["classify", "predict", str(tmp_path / "C"), "--input", str(train), "--out", str(out)])
    assert res.exit_code == 0, res.output
    header, first = out.read_text().splitlines()[:2]
    assert header.split(",")[2:] == ["p_0", "p_1"] and first.split(",")[1] in ("0", "1")
