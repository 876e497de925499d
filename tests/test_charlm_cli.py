"""`rnnkit charlm train|eval|sample` end to end on a tiny corpus, and every bad input of issue 5."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from rnnkit.cli.main import app

runner = CliRunner()
TINY = ["--hidden-size", "8", "--layers", "1", "--embedding-size", "4", "--batch-size", "4", "--tbptt", "10",
        "--sample-length", "20", "--quiet", "--set", "trainer.tensorboard=false"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNKIT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text("KING:\nTo be or not to be, that is the question.\n\n" * 40, encoding="utf-8")
    return p


def invoke(*argv):
    return runner.invoke(app, [str(a) for a in argv])


def train(corpus, out, *extra):
    res = invoke("charlm", "train", "--text", corpus, "--out", out, *TINY, *extra)
    assert res.exit_code == 0, res.output
    return res


def assert_user_error(res, *fragments):
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def snapshot(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small trained run shared by the eval/sample tests."""
    d = tmp_path_factory.mktemp("charlm")
    text = d / "tiny.txt"
    text.write_text("KING:\nTo be or not to be, that is the question.\n\n" * 40, encoding="utf-8")
    res = invoke("charlm", "train", "--text", text, "--out", d / "run", *TINY, "--steps", 4, "--eval-every", 2,
                 "--json")
    assert res.exit_code == 0, res.output
    return d / "run", text, json.loads(res.stdout)


def test_train_json_and_run_directory(trained):
    run, text, out = trained
    for key in ("val_loss_nats", "val_bits_per_char", "val_chars", "steps", "chars_per_s", "vocab_size",
                "train_loss_nats", "elapsed_s"):
        assert key in out, key
    assert out["steps"] == 4 and out["vocab_size"] == len(set(text.read_text())) + 1
    assert out["val_bits_per_char"] == pytest.approx(out["val_loss_nats"] / math.log(2))
    assert 0 < out["val_loss_nats"] < math.log(out["vocab_size"]) + 0.5
    for name in ("config.toml", "vocab.json", "metrics.jsonl", "samples.txt", "final_metrics.json"):
        assert (run / name).is_file(), name
    assert (run / "samples.txt").read_text().count("--- sample at step") == 2  # steps 2 and 4
    assert list((run / "checkpoints").glob("step-00000004.safetensors"))


def test_eval_json_shape(trained):
    run, text, _ = trained
    res = invoke("charlm", "eval", run, "--text", text, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {"loss_nats", "bits_per_char", "chars"} <= set(out)
    assert out["chars"] == len(text.read_text()) - 1
    assert out["bits_per_char"] == pytest.approx(out["loss_nats"] / math.log(2))
    # the run's own validation split by default
    res = invoke("charlm", "eval", run, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["loss_nats"] == pytest.approx(trained[2]["val_loss_nats"], rel=1e-6)


def test_eval_unseen_characters_are_counted_unknown(trained, tmp_path):
    run, _, _ = trained
    other = tmp_path / "other.txt"
    other.write_text("To be or not, Zebra!", encoding="utf-8")
    res = invoke("charlm", "eval", run, "--text", other, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["unknown_chars"] == 2 and out["coverage"] == pytest.approx(1 - 2 / 20)  # "Z" and "!"


def test_sample_streams_prime_and_is_seeded(trained):
    run, _, _ = trained
    a = invoke("charlm", "sample", run, "--prime", "KING:", "--length", 30, "--seed", 5)
    b = invoke("charlm", "sample", run, "--prime", "KING:", "--length", 30, "--seed", 5, "--top-k", 3,
               "--temperature", 0.5)
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert a.stdout.startswith("KING:") and len(a.stdout) == 5 + 30 + 1
    assert a.stdout == invoke("charlm", "sample", run, "--prime", "KING:", "--length", 30, "--seed", 5).stdout
    assert "\ufffd" not in a.stdout + b.stdout


def test_resume_continues_exactly(corpus, tmp_path):
    full = json.loads(train(corpus, tmp_path / "full", "--steps", 6, "--json").stdout)
    train(corpus, tmp_path / "part", "--steps", 3)
    res = invoke("charlm", "train", "--text", corpus, "--out", tmp_path / "part", "--resume", "--steps", 6,
                 "--quiet", "--json")
    assert res.exit_code == 0, res.output
    resumed = json.loads(res.stdout)
    assert resumed["steps"] == 6
    assert resumed["val_loss_nats"] == pytest.approx(full["val_loss_nats"], rel=1e-6)


# ---- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("content,fragment", [("", "contains no text"), ("abc\n", "shorter than one batch")])
def test_empty_and_too_short_text(tmp_path, content, fragment):
    p = tmp_path / "small.txt"
    p.write_text(content, encoding="utf-8")
    res = invoke("charlm", "train", "--text", p, "--out", tmp_path / "r", *TINY, "--steps", 1)
    assert_user_error(res, "small.txt", fragment)
    assert not (tmp_path / "r").exists()


def test_non_utf8_text_names_file_and_offset(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes(("To be or not to be. " * 10 + "caf\u00e9").encode("latin-1"))
    res = invoke("charlm", "train", "--text", p, "--out", tmp_path / "r", *TINY, "--steps", 1)
    assert_user_error(res, "latin.txt", "byte offset 203", "--encoding")
    res = invoke("charlm", "train", "--text", p, "--encoding", "latin-1", "--out", tmp_path / "r", *TINY,
                 "--steps", 1, "--json")
    assert res.exit_code == 0, res.output


def test_prime_with_unseen_characters(trained):
    run, _, _ = trained
    assert_user_error(invoke("charlm", "sample", run, "--prime", "Zebra\u00e9"), "--prime", "'Z'", "'\u00e9'")


def test_run_dir_missing_or_without_checkpoint(trained, tmp_path):
    assert_user_error(invoke("charlm", "sample", tmp_path / "nope"), "no such directory")
    assert_user_error(invoke("charlm", "eval", tmp_path), "not a trained run")
    run, _, _ = trained
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.toml", "vocab.json"):
        (bare / name).write_bytes((run / name).read_bytes())
    assert_user_error(invoke("charlm", "eval", bare), "holds no checkpoint")


def test_vocabulary_mismatch_at_resume_leaves_run_untouched(trained, tmp_path):
    run, _, _ = trained
    before = snapshot(run)
    other = tmp_path / "other.txt"
    other.write_text("completely different words here! " * 30, encoding="utf-8")
    res = invoke("charlm", "train", "--text", other, "--out", run, "--resume", "--steps", 8, "--quiet")
    assert_user_error(res, "vocabulary mismatch")
    res = invoke("charlm", "train", "--text", other, "--out", run, *TINY, "--steps", 8)
    assert_user_error(res, "already has checkpoints", "--resume")
    assert snapshot(run) == before


def test_bad_options(corpus, tmp_path):
    assert_user_error(invoke("charlm", "train", "--text", corpus, "--out", tmp_path / "r", "--cell", "nope",
                             "--steps", 1, "--quiet"), "model.cell")
    assert_user_error(invoke("charlm", "train", "--text", tmp_path / "missing.txt", "--out", tmp_path / "r",
                             "--steps", 1, "--quiet"), "missing.txt", "no such file")
    assert not (tmp_path / "r").exists()


# ---- declared cells: --cell NAME and --cell path/to/file.py:NAME ------------------------------
CELL_TINY = ["--hidden-size", "6", "--layers", "1", "--embedding-size", "6", "--batch-size", "4", "--tbptt", "8",
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


@pytest.mark.parametrize("cell", ["slstm", "mut1"])
def test_charlm_trains_a_registered_declared_cell(corpus, tmp_path, cell):
    res = invoke("charlm", "train", "--text", corpus, "--out", tmp_path / "run", *CELL_TINY, "--cell", cell,
                 "--steps", 2, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["steps"] == 2


@pytest.mark.parametrize("cell", ["user", "slstm"])
def test_charlm_trains_resumes_and_samples(corpus, tmp_path, cell):
    """A user's cell from a file, and the four-state sLSTM: TBPTT carry, checkpoint, exact resume."""
    path = tmp_path / "mycell.py"
    path.write_text(USER_CELL, encoding="utf-8")
    ref = f"{path}:MGU" if cell == "user" else cell
    full = invoke("charlm", "train", "--text", corpus, "--out", tmp_path / "full", *CELL_TINY, "--cell", ref,
                  "--steps", 4, "--json")
    assert full.exit_code == 0, full.output
    part = invoke("charlm", "train", "--text", corpus, "--out", tmp_path / "part", *CELL_TINY, "--cell", ref,
                  "--steps", 2)
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
    res = invoke("charlm", "train", "--text", corpus, "--out", tmp_path / "run", *CELL_TINY, "--steps", 1,
                 "--cell", ref.format(dir=tmp_path))
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.cell: ") and fragment in lines[0], res.stderr
    assert not (tmp_path / "run").exists()


def test_a_bad_declaration_in_a_user_file_names_its_equation(corpus, tmp_path):
    (tmp_path / "bad.py").write_text(USER_CELL.replace("tanh(xn", "tanhh(xn"), encoding="utf-8")
    res = invoke("charlm", "train", "--text", corpus, "--out", tmp_path / "run", *CELL_TINY, "--steps", 1,
                 "--cell", f"{tmp_path}/bad.py:MGU")
    assert res.exit_code == 2, res.output
    assert "cell 'mgu', equation 5 `n = tanhh(xn + hn)`: unknown operation 'tanhh'" in res.stderr
