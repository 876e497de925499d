"""Declared cells through the command line: `rnnkit cells`, `charlm train --cell NAME` and `--cell file.py:NAME`
(train, exact resume, sample), and bad cell references."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from rnnkit.cli.main import app

runner = CliRunner()
TINY = ["--hidden-size", "6", "--layers", "1", "--embedding-size", "6", "--batch-size", "4", "--tbptt", "8",
        "--sample-length", "10", "--quiet", "--set", "trainer.tensorboard=false"]
USER_CELL = '''
from rnnkit.cells import declare

# a minimal gated unit: one gate mixes the old state with a candidate
MGU = declare("mgu", states="h", equations="""
    xf, xn = W(x)
    hf = R(h)
    hn = R(f * h)
    f = sigmoid(xf + hf)
    n = tanh(xn + hn)
    h' = (1 - f) * h + f * n
""")
NOT_A_CELL = 3
'''


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNKIT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text("To be or not to be, that is the question.\n" * 30, encoding="utf-8")
    return p


def invoke(*argv):
    return runner.invoke(app, [str(a) for a in argv])


def test_cells_lists_the_declared_cells():
    res = invoke("cells", "--json")
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["slstm"]["states"] == ["h", "c", "n", "m"] and rows["slstm"]["backends_cpu"] == ["reference", "bptt"]
    assert rows["mut3"]["gates"] == ["z", "r"] and "cpu" in rows["lstm"]["backends_cpu"]
    assert {"mut1", "mut2", "lstm_hsig_relu"} <= set(rows)


@pytest.mark.parametrize("cell", ["slstm", "mut1"])
def test_charlm_trains_a_registered_declared_cell(corpus, tmp_path, cell):
    res = invoke("charlm", "train", "--text", corpus, "--out", tmp_path / "run", *TINY, "--cell", cell,
                 "--steps", 2, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["steps"] == 2


@pytest.mark.parametrize("cell", ["user", "slstm"])
def test_charlm_trains_resumes_and_samples(corpus, tmp_path, cell):
    """A user's cell from a file, and the four-state sLSTM: TBPTT carry, checkpoint, exact resume."""
    path = tmp_path / "mycell.py"
    path.write_text(USER_CELL, encoding="utf-8")
    ref = f"{path}:MGU" if cell == "user" else cell
    full = invoke("charlm", "train", "--text", corpus, "--out", tmp_path / "full", *TINY, "--cell", ref,
                  "--steps", 4, "--json")
    assert full.exit_code == 0, full.output
    part = invoke("charlm", "train", "--text", corpus, "--out", tmp_path / "part", *TINY, "--cell", ref, "--steps", 2)
    assert part.exit_code == 0, part.output
    res = invoke("charlm", "train", "--text", corpus, "--out", tmp_path / "part", "--resume", "--steps", 4,
                 "--quiet", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["val_loss_nats"] == pytest.approx(json.loads(full.stdout)["val_loss_nats"],
                                                                   rel=1e-6)
    sample = invoke("charlm", "sample", tmp_path / "full", "--prime", "To", "--length", 12, "--seed", 1)
    assert sample.exit_code == 0 and sample.stdout.startswith("To"), sample.output


@pytest.mark.parametrize("ref,fragment", [
    ("missing.py:MGU", "file 'missing.py' not found"),
    ("{dir}/mycell.py:NOPE", "'NOPE' in "),
    ("{dir}/mycell.py:NOT_A_CELL", "is a int, not a cell declaration; the declarations there are ['MGU']"),
    ("lstmm", "expected one of"),
])
def test_bad_cell_references_are_one_line_errors(corpus, tmp_path, ref, fragment):
    (tmp_path / "mycell.py").write_text(USER_CELL, encoding="utf-8")
    res = invoke("charlm", "train", "--text", corpus, "--out", tmp_path / "run", *TINY, "--steps", 1,
                 "--cell", ref.format(dir=tmp_path))
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.cell: ") and fragment in lines[0], res.stderr
    assert not (tmp_path / "run").exists()


def test_a_bad_declaration_in_a_user_file_names_its_equation(corpus, tmp_path):
    (tmp_path / "bad.py").write_text(USER_CELL.replace("tanh(xn", "tanhh(xn"), encoding="utf-8")
    res = invoke("charlm", "train", "--text", corpus, "--out", tmp_path / "run", *TINY, "--steps", 1,
                 "--cell", f"{tmp_path}/bad.py:MGU")
    assert res.exit_code == 2, res.output
    assert "cell 'mgu', equation 5 `n = tanhh(xn + hn)`: unknown operation 'tanhh'" in res.stderr
