"""Sequence classification: metrics, pooling that ignores padding, class weights, CLI end to end."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rnnkit.cli.main import app
from rnnkit.data.sequences import SequenceSet
from rnnkit.metrics import classification_metrics, confusion_matrix
from rnnkit.tasks import classify as C
from rnnkit.train import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: 1 thread is faster and steadier


def test_metrics_by_hand():
    y, p = np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1])
    m = classification_metrics(y, p, 2)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["confusion_matrix"] == [[2, 1], [0, 1]]
    assert confusion_matrix([2, 2], [0, 2], 3).tolist() == [[0, 0, 0], [0, 0, 0], [1, 0, 1]]


def test_metrics_agree_with_sklearn():
    skm = pytest.importorskip("sklearn.metrics", reason="scikit-learn (rnnkit[datasets]) not installed")
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    m = classification_metrics(y, p, 4)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro"))


@pytest.mark.parametrize("pool", ["last", "mean", "attention"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_never_leaks(pool, bidirectional):
    torch.manual_seed(0)
    net = C.SequenceClassifier(2, 3, C.ClassifyModelConfig(cell="lstm", hidden=6, pool=pool,
                                                           bidirectional=bidirectional)).eval()
    lengths = torch.tensor([5, 2, 7])
    x = torch.randn(3, 7, 2)
    garbage = x.clone()
    for b, n in enumerate(lengths):
        garbage[b, n:] = 1e3 * torch.randn(7 - n, 2)
    with torch.no_grad():
        out = net(garbage, lengths)
        alone = torch.cat([net(x[b:b + 1, :n], lengths[b:b + 1]) for b, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)


def test_balanced_class_weights():
    w = C.balanced_weights(np.array([0, 0, 0, 1]), 3)
    torch.testing.assert_close(w, torch.tensor([4 / 9, 4 / 3, 4 / 3]))


def _toy(n=60, seed=0, long=False):
    rng = np.random.default_rng(seed)
    seqs, labels = [], []
    for i in range(n):
        k = i % 2
        T = int(rng.integers(12, 25))
        t = np.arange(T)
        seqs.append(np.stack([np.sin(t * (0.3 + 0.9 * k)), np.cos(t * 0.2)], 1) + rng.normal(0, 0.1, (T, 2)))
        labels.append("fast" if k else "slow")
    return SequenceSet(seqs, np.array(labels))


def _write_long(path, data):
    with path.open("w") as f:
        f.write("id,step,a,b,label\n")
        for i, (s, y) in enumerate(zip(data.sequences, data.labels)):
            for t in range(len(s)):
                f.write(f"s{i},{t},{s[t, 0]:.4f},{s[t, 1]:.4f},{y}\n")
    return path


def test_train_learns_toy_problem_with_validation_split():
    cfg = load_config(C.ClassifyConfig, None, {"model.hidden": 12, "model.cell": "gru", "trainer.steps": 60,
                                               "trainer.epochs": None, "trainer.optim.lr": 0.02,
                                               "data.val_fraction": 0.2, "data.class_weights": "balanced"})
    model = C.train(_toy(), cfg, None)
    assert model.classes == ["fast", "slow"]
    assert model.evaluate(_toy(40, seed=1))["accuracy"] >= 0.9


def test_cli_train_eval_predict_long_format(tmp_path):
    runner = CliRunner()
    tr, te = _write_long(tmp_path / "tr.csv", _toy()), _write_long(tmp_path / "te.csv", _toy(20, seed=2))
    run = tmp_path / "run"
    common = ["--id-column", "id", "--time", "step", "--label", "label"]
    r = runner.invoke(app, ["classify", "train", "--train", str(tr), "--test", str(te), *common, "--hidden", "12",
                            "--cell", "gru", "--pool", "mean", "--lr", "0.02", "--steps", "60", "--out", str(run),
                            "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["test_accuracy"] >= 0.9 and (run / "confusion_test.png").is_file()
    assert np.array(out["confusion_matrix"]).sum() == 20
    r = runner.invoke(app, ["classify", "eval", str(run), "--test", str(te), *common, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["accuracy"] == out["test_accuracy"]
    r = runner.invoke(app, ["classify", "predict", str(run), "--input", str(te), *common, "--out",
                            str(tmp_path / "p.csv"), "--json"])
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "id,predicted,p_fast,p_slow" and len(lines) == 21 and lines[1].startswith("s0,")
    probs = np.array([[float(v) for v in line.split(",")[2:]] for line in lines[1:]])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)


def test_cli_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["classify", "train", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "give either --train FILE or --dataset NAME" in r.stderr
    p = tmp_path / "one.csv"
    p.write_text("label,t0,t1\na,1,2\na,2,3\n")
    r = runner.invoke(app, ["classify", "train", "--train", str(p), "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "at least 2 classes" in r.stderr


@pytest.mark.slow
def test_italy_power_demand_beats_chance_quickly():
    pytest.importorskip("aeon", reason="aeon (rnnkit[datasets]) not installed")
    from rnnkit.data.sequences import load_bundled

    cfg = load_config(C.ClassifyConfig, None, {"model.hidden": 32, "trainer.epochs": 60, "trainer.batch_size": 16})
    model = C.train(load_bundled("ItalyPowerDemand", "train"), cfg, None)
    assert model.evaluate(load_bundled("ItalyPowerDemand", "test"))["accuracy"] > 0.85


def test_downsample_block_means():
    np.testing.assert_allclose(C.block_mean(np.arange(7.0)[:, None], 3)[:, 0], [1.0, 4.0, 6.0])
    t = C.tensors(SequenceSet([np.arange(8.0)[:, None], np.arange(5.0)[:, None]]), C.Scaler("none").fit(
        np.zeros((2, 1))), None, downsample=2)
    assert t["lengths"].tolist() == [4, 3] and t["x"][1, :3, 0].tolist() == [0.5, 2.5, 4.0]


def test_augment_keeps_padding_and_has_the_documented_statistics():
    from rnnkit.data.sequences import augment

    torch.manual_seed(0)
    x = torch.ones(4000, 30, 2)
    lengths = torch.full((4000,), 30)
    lengths[0] = 10
    x[0, 10:] = 0
    assert augment(x, lengths) is x  # all strengths 0: untouched
    s = augment(x, lengths, scale=0.3)
    assert torch.equal(s[0, 10:], torch.zeros(20, 2))  # padding stays zero
    assert torch.allclose(s[1:, 0], s[1:, -1]) and abs(float(s[1:, 0].std()) - 0.3) < 0.02  # one gain per sequence
    j = augment(x, lengths, jitter=0.5)
    assert abs(float((j[1:] - 1).std()) - 0.5) < 0.01 and abs(float((j[1:] - 1).mean())) < 0.01
    w = augment(x, lengths, warp=0.2, knots=4)[1:, :, 0]
    d = w.diff(dim=1)  # linear between 4 knots over 30 steps: 3 segments of constant slope
    assert torch.allclose(d[:, 1:9], d[:, :1].expand(-1, 8), atol=1e-5)
    assert abs(float(w[:, 0].std()) - 0.2) < 0.02


def test_augmentation_only_while_training():
    cfg = load_config(C.ClassifyConfig, None, {"model.hidden": 8, "trainer.steps": 3, "trainer.epochs": None,
                                               "data.jitter": 0.1, "data.scale": 0.1, "data.warp": 0.1})
    model = C.train(_toy(20), cfg, None)
    p1, p2 = model.predict_proba(_toy(6, seed=3)), model.predict_proba(_toy(6, seed=3))
    np.testing.assert_array_equal(p1, p2)  # inference is deterministic
    task = C.ClassifyTask(None, {"jitter": 1.0})
    batch = {"x": torch.zeros(3, 5, 2), "lengths": torch.full((3,), 5), "y": torch.zeros(3, dtype=torch.long)}
    model.net.eval()
    assert task.loss(model.net, batch) == task.loss(model.net, batch)
    model.net.train()
    assert task.loss(model.net, batch) != task.loss(model.net, batch)
    with pytest.raises(Exception, match="data.jitter: expected an augmentation strength"):
        C.train(_toy(20), load_config(C.ClassifyConfig, None, {"data.jitter": -1.0}), None)
