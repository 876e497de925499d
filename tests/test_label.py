"""Sequence labelling with CTC: decoders against brute force, the n-gram model, readers, errors, CLI."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rnnkit.cli.main import app
from rnnkit.errors import UserError
from rnnkit.tasks import decoding as ctc
from rnnkit.tasks import label as L

pytestmark = pytest.mark.usefixtures("one_thread")


def _collapse(path):
    out, prev = [], 0
    for k in path:
        if k != prev and k != 0:
            out.append(k)
        prev = k
    return tuple(out)


def _brute_force(lp):
    """Every labelling's probability by summing over all (K+1)^T paths."""
    T, K1 = lp.shape
    p = {}
    for path in itertools.product(range(K1), repeat=T):
        lab = _collapse(path)
        p[lab] = p.get(lab, 0.0) + math.exp(sum(lp[t, k] for t, k in enumerate(path)))
    return p


def _random_lp(rng, T, K1, sharp=1.5):
    z = rng.normal(size=(T, K1)) * sharp
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def test_min_steps():
    assert ctc.ctc_min_steps([1, 2, 3]) == 3
    assert ctc.ctc_min_steps([1, 1, 2, 2, 2]) == 8
    assert ctc.ctc_min_steps([]) == 0


def test_labelling_scores_match_brute_force():
    rng = np.random.default_rng(0)
    lp = _random_lp(rng, 5, 3)
    p = _brute_force(lp)
    labs = [(), (1,), (2, 1), (1, 1), (1, 2, 1, 2)]
    np.testing.assert_allclose(np.exp(ctc.ctc_scores(lp, labs)), [p.get(s, 0.0) for s in labs], atol=1e-12)
    assert sum(p.values()) == pytest.approx(1.0)


def test_beam_beats_best_path_where_they_differ():
    # two steps, one symbol: the best path (blank, blank) gives "" with p = 0.36, but "a" has
    # p = 0.4*0.4 + 0.4*0.6 + 0.6*0.4 = 0.64
    lp = np.log(np.array([[0.6, 0.4], [0.6, 0.4]]))
    assert ctc.greedy_ctc(lp) == ()
    assert ctc.ctc_beam_search(lp, beam=4) == (1,)
    s = ctc.ctc_scores(lp, [(), (1,)])
    assert np.exp(s) == pytest.approx([0.36, 0.64])


def test_beam_search_finds_the_most_probable_labelling_and_never_loses_to_greedy():
    rng = np.random.default_rng(1)
    for _ in range(30):
        lp = _random_lp(rng, 5, 3, sharp=0.8)
        p = _brute_force(lp)
        best = max(p, key=p.get)
        beam = ctc.ctc_beam_search(lp, beam=64, prune=-math.inf)
        assert p[beam] == pytest.approx(p[best], rel=1e-9)
        narrow = ctc.ctc_beam_search(lp, beam=1)
        assert p.get(narrow, 0.0) >= p.get(ctc.greedy_ctc(lp), 0.0) - 1e-12


def test_char_ngram_is_normalised_and_beam_with_lm_never_loses_to_greedy():
    labels = [[1, 2, 3], [1, 2], [3, 3, 1], [2]]
    for order in (1, 2, 3):
        lm = ctc.CharNGram(labels, 3, order)
        for hist in [(), (1,), (1, 2), (3, 3), (2, 2, 2)]:
            assert sum(math.exp(lm.log_prob(hist, c)) for c in range(4)) == pytest.approx(1.0)
    lm = ctc.CharNGram(labels, 3, 2)
    assert lm.log_prob((1,), 2) > lm.log_prob((1,), 3)  # "12" seen twice, "13" never
    rng = np.random.default_rng(2)
    for _ in range(20):
        lp = _random_lp(rng, 6, 4, sharp=0.7)

        def total(s, lp=lp):
            return ctc.ctc_scores(lp, [s])[0] + 0.8 * lm.score(s)

        out = ctc.ctc_beam_search(lp, beam=3, lm=lm, lm_weight=0.8)
        assert total(out) >= total(ctc.greedy_ctc(lp)) - 1e-9


# ---- data --------------------------------------------------------------------------------------
def _png(path, a):
    from PIL import Image

    Image.fromarray(np.asarray(a, np.uint8)).save(path)


def _toy_lines(root, n, seed, height=6, labels=None):
    """Text lines where symbol 'a' is a bright column pair at the top, 'b' at the bottom, gaps dark."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        lab = labels[i] if labels else "".join(rng.choice(list("ab"), rng.integers(1, 4)))
        cols = [np.zeros((height, 1))]
        for c in lab:
            col = np.zeros((height, 2))
            col[slice(0, height // 2) if c == "a" else slice(height // 2, height)] = 255
            cols += [col, np.zeros((height, 1))]
        _png(root / f"l{i}.png", np.concatenate(cols, 1))
        rows.append(f"l{i}.png\t{lab}")
    (root / "labels.tsv").write_text("\n".join(rows) + "\n")
    return root


def test_readers_and_bad_input(tmp_path):
    d = _toy_lines(tmp_path / "ok", 4, 0, labels=["ab", "b", "aab", "ba"])
    data = L.read_label_set(d)
    assert data.labels == ["ab", "b", "aab", "ba"] and data.n_features == 6
    assert len(data.sequences[0]) == 7  # columns: gap, a, a, gap, b, b, gap
    np.testing.assert_allclose(data.sequences[1][1], [0, 0, 0, 1, 1, 1])  # the first column of "b"

    _png(d / "l1.png", np.zeros((7, 5)))
    with pytest.raises(UserError, match=r"l1.png has height 7, l0.png has 6"):
        L.read_label_set(d)
    (d / "l1.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"l1.png is not a readable PNG"):
        L.read_label_set(d)
    (d / "labels.tsv").write_text("l0.png\tab\nl2.png\t \n")
    with pytest.raises(UserError, match=r"labels.tsv line 2: empty label for 'l2.png'"):
        L.read_label_set(d)

    feats = tmp_path / "feats"
    feats.mkdir()
    np.save(feats / "s0.npy", np.zeros((5, 3)))
    (feats / "s1.csv").write_text("f1,f2,f3\n1,2,3\n4,5,6\n")
    (feats / "labels.tsv").write_text("s0.npy\txy\ns1.csv\txx\n")
    data = L.read_label_set(feats)
    np.testing.assert_array_equal(data.sequences[1], [[1, 2, 3], [4, 5, 6]])
    targets = L.Alphabet.from_labels(data.labels).encode(data, "--train")
    with pytest.raises(UserError, match=r"s1.csv' has 2 steps, but its label 'xx' needs at least 3"):
        L.check_feasible(data, targets, 1, "--train")
    with pytest.raises(UserError, match=r"symbol 'y', which is not in the model's alphabet 'x'"):
        L.Alphabet("x").encode(data, "--test")

    np.savez(tmp_path / "s.npz", X=np.zeros((2, 4, 3)), lengths=np.array([4, 2]))
    (tmp_path / "s.tsv").write_text("0\tq\n1\tr\n")
    data = L.read_label_set(tmp_path / "s.npz", tmp_path / "s.tsv")
    assert data.labels == ["q", "r"] and [len(s) for s in data.sequences] == [4, 2]
    with pytest.raises(UserError, match=r"s.npz has no 'labels' array"):
        L.read_label_set(tmp_path / "s.npz")


def test_stack_steps():
    x = np.arange(10.0).reshape(5, 2)
    np.testing.assert_array_equal(L.stack_steps(x, 2), [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]])
    assert L.stack_steps(x, 1) is x


# ---- training and the CLI ----------------------------------------------------------------------
def test_ctc_model_padding_never_leaks():
    net = L.CTCModel(3, 4, L.LabelModelConfig(hidden=5, layers=2)).eval()
    lengths = torch.tensor([6, 3])
    x = torch.randn(2, 6, 3)
    garbage = x.clone()
    garbage[1, 3:] = 1e3
    with torch.no_grad():
        out = net(garbage, lengths)
        alone = net(x[1:, :3], lengths[1:])
    torch.testing.assert_close(out[1, :3], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 6))


def test_cli_train_eval_predict_and_errors(tmp_path):
    tr = _toy_lines(tmp_path / "train", 48, 1)
    te = _toy_lines(tmp_path / "test", 12, 2)
    run = tmp_path / "run"
    common = ["--hidden", "12", "--layers", "1", "--set", "data.stack=1", "--set", "trainer.optim.lr=0.02",
              "--quiet", "--json"]
    runner = CliRunner()
    r = runner.invoke(app, ["label", "train", "--train", str(tr), "--test", str(te), "--out", str(run),
                            "--epochs", "40", "--set", "trainer.batch_size=16", "--set", "data.val_fraction=0",
                            *common])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["alphabet"] == "ab"
    assert out["test_greedy_cer"] < 0.2 and out["test_beam_cer"] <= out["test_greedy_cer"] + 1e-9
    assert (run / "alignment_test_0.png").is_file()

    r = runner.invoke(app, ["label", "eval", str(run), "--test", str(te), "--lm-order", "2", "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output)
    assert ev["eval_greedy_cer"] == pytest.approx(out["test_greedy_cer"])
    assert set(ev) >= {"eval_beam_cer", "eval_beam_wer", "eval_beam_seq_accuracy"}

    (te / "labels.tsv").unlink()
    r = runner.invoke(app, ["label", "predict", str(run), "--input", str(te), "--out", str(tmp_path / "p.csv"),
                            "--decoder", "greedy", "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "id,predicted" and len(lines) == 13

    (te / "labels.tsv").write_text("l0.png\tac\n")
    before = (run / "model.safetensors").read_bytes()
    r = runner.invoke(app, ["label", "eval", str(run), "--test", str(te)])
    assert r.exit_code == 2 and "symbol 'c'" in r.output and "Traceback" not in r.output
    assert (run / "model.safetensors").read_bytes() == before
