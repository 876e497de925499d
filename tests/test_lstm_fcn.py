"""LSTM-FCN / MLSTM-FCN and the strided / dilated readers: oracles built from plain slicing, padding that
never changes a prediction, any registered cell in the recurrent branch, and the automatic choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnnkit import build
from rnnkit.cells import REGISTRY
from rnnkit.data.sequences import SequenceSet
from rnnkit.data.series import SeriesError
from rnnkit.tasks import classify as C
from rnnkit.tasks.classify_auto import AutoClassifySettings, choose_model, ensemble_size, final_steps, folds_of
from rnnkit.tasks.encoders import final_hidden
from rnnkit.tasks.lstm_fcn import FCN, LSTMFCN, LSTMFCNConfig, Reader
from rnnkit.train.config import load_config, replace_config


def _final(enc, x):
    return final_hidden(enc(x)[1], 1)


def test_fold_reader_is_a_reshape_and_dilate_averages_the_phases():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 2)
    L = torch.full((3,), 10)
    enc = build("gru", 6, 5, batch_first=True)
    folded = torch.cat([x, torch.zeros(3, 2, 2)], 1).reshape(3, 4, 6)  # T = 10 -> 12 = 4 blocks of 3
    torch.testing.assert_close(Reader("fold", 3)(enc, x, L), _final(enc, folded))
    enc2 = build("lstm", 2, 5, batch_first=True)
    want = torch.stack([_final(enc2, x[:, j::3]) for j in range(3)]).mean(0)
    # phases of a length-10 sequence: j=0 has 4 steps, j=1 and j=2 have 3 (the padded step is masked out)
    torch.testing.assert_close(Reader("dilate", 3)(enc2, x, L), want)
    torch.testing.assert_close(Reader("dilate", 1)(enc2, x, L), _final(enc2, x))


def test_dilated_reader_respects_lengths():
    torch.manual_seed(1)
    enc = build("lstm", 1, 4, batch_first=True)
    a = torch.randn(1, 7, 1)
    alone = Reader("dilate", 2)(enc, a, torch.tensor([7]))
    batch = torch.cat([a, torch.full((1, 4, 1), 1e3)], 1)  # garbage past the end
    batch = torch.cat([batch, torch.randn(1, 11, 1)])
    torch.testing.assert_close(Reader("dilate", 2)(enc, batch, torch.tensor([7, 11]))[:1], alone)


@pytest.mark.parametrize("shuffle, se, read", [(True, False, "full"), (False, True, "fold"), (False, False, "dilate")])
def test_lstm_fcn_padding_never_changes_a_prediction(shuffle, se, read):
    torch.manual_seed(2)
    cfg = LSTMFCNConfig(hidden=8, shuffle=shuffle, squeeze_excite=se, reader=read, stride=2)
    net = LSTMFCN(2, 3, cfg, max_len=20).eval()
    a = torch.randn(1, 13, 2)
    batch = torch.cat([torch.cat([a, torch.zeros(1, 7, 2)], 1), torch.randn(1, 20, 2)])
    out = net(batch, torch.tensor([13, 20]))
    assert out.shape == (2, 3)
    torch.testing.assert_close(out[:1], net(a, torch.tensor([13])))


@pytest.mark.parametrize("cell", sorted(REGISTRY))
def test_any_registered_cell_in_the_recurrent_branch(cell):
    torch.manual_seed(3)
    # 4 channels = 4 hidden units: some cells (MUT1, MUT2) use the raw input in their equations
    net = LSTMFCN(4, 2, LSTMFCNConfig(cell=cell, hidden=4, shuffle=False), max_len=9)
    x = torch.randn(4, 9, 4)
    loss = net(x, torch.full((4,), 9)).logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.rnn.parameters())


def test_fcn_pools_over_valid_steps_only():
    torch.manual_seed(4)
    fcn = FCN(1, filters=(4, 4, 4)).eval()
    x = torch.randn(1, 6, 1)
    padded = torch.cat([x, torch.zeros(1, 5, 1)], 1)
    torch.testing.assert_close(fcn(padded, torch.tensor([6])), fcn(x, torch.tensor([6])))


def test_reader_rejects_bad_settings():
    with pytest.raises(SeriesError, match="--read"):
        Reader("skip", 2)
    with pytest.raises(SeriesError, match="--stride"):
        Reader("fold", 0)


def test_folds_are_stratified_and_cover_everything():
    y = np.array([0] * 7 + [1] * 5)
    folds = folds_of(y, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(12))
    for f in folds:
        assert 1 <= (y[f] == 1).sum() <= 2 and 2 <= (y[f] == 0).sum() <= 3


def test_auto_classifier_chooses_by_cross_validation_and_records_it(tmp_path):
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 24)
    seqs = [np.sin(2 * np.pi * (1 + k) * t + rng.normal())[:, None] + 0.1 * rng.normal(size=(24, 1))
            for k in (0, 1) for _ in range(8)]
    data = SequenceSet(seqs, np.array(["slow"] * 8 + ["fast"] * 8))
    cfg = load_config(C.ClassifyConfig, None, {"model.hidden": 4, "model.branch_dropout": 0.0, "auto.steps": 20,
                                               "auto.folds": 2, "trainer.steps": 40, "trainer.epochs": None})
    model = C.train(data, cfg, tmp_path / "run")
    rec = model.meta["choice"]
    assert model.cfg.model.kind == rec["chosen"] and rec["folds"] == 2
    means = {k: v["mean"] for k, v in rec["candidates"].items()}
    assert set(means) == {"recurrent", "lstm_fcn"} and means[rec["chosen"]] == max(means.values())
    assert all(len(v["fold_accuracy"]) == 2 for v in rec["candidates"].values())
    back = C.Classifier.load(tmp_path / "run")  # the saved config holds the choice, not "auto"
    assert back.cfg.model.kind == rec["chosen"]
    np.testing.assert_allclose(back.predict_proba(data), model.predict_proba(data), rtol=1e-6)


class _Fixed(torch.nn.Module):
    """Logits w * (-m, m), m the sequence mean: always right on +-1 data, more confident with larger w."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, x, lengths):
        m = x.mean((1, 2))
        return self.w * torch.stack([-m, m], -1)


def test_auto_choice_breaks_accuracy_ties_by_validation_loss():
    y = torch.tensor([0, 1] * 6)
    data = {"x": (2.0 * y - 1)[:, None, None].repeat(1, 3, 1), "lengths": torch.full((12,), 3), "y": y}
    tcfg = load_config(C.ClassifyConfig, None, {"trainer.optim.lr": 1e-9}).trainer
    s = AutoClassifySettings(steps=1, folds=2)
    rec = choose_model(lambda kind: _Fixed(0.5 if kind == "recurrent" else 3.0), C.ClassifyTask(), data, tcfg, s)
    cand = rec["candidates"]
    assert cand["recurrent"]["mean"] == cand["lstm_fcn"]["mean"] == 1.0
    assert cand["lstm_fcn"]["loss"] < cand["recurrent"]["loss"] and rec["chosen"] == "lstm_fcn"
    rec = choose_model(lambda kind: _Fixed(3.0 if kind == "recurrent" else 0.5), C.ClassifyTask(), data, tcfg, s)
    assert rec["chosen"] == "recurrent"


def test_final_steps_rule():
    s = AutoClassifySettings(steps=300, final_steps=1500, final_minutes=10.0)
    assert final_steps(s, 200, 0.1) == (1500, "1500 steps (max of auto.final_steps and the default epochs)")
    assert final_steps(s, 3000, 0.1)[0] == 3000  # large sets keep their default epochs
    n, why = final_steps(s, 200, 1.0)  # 1500 s would exceed the 600 s cap
    assert n == 600 and "fit in auto.final_minutes = 10" in why
    assert final_steps(s, 200, 10.0)[0] == 300  # never below one cross-validation fit
    with pytest.raises(SeriesError, match="auto.final_minutes: expected a number > 0, got 0"):
        final_steps(AutoClassifySettings(final_minutes=0), 1, 0.1)
    # as many networks as fit in the cap, each with its full steps; at least one
    assert [ensemble_size(s, 1500, pace) for pace in (0.1, 0.2, 0.3, 1.0)] == [3, 2, 1, 1]
    with pytest.raises(SeriesError, match="auto.ensemble: expected an int >= 1, got 0"):
        ensemble_size(AutoClassifySettings(ensemble=0), 1, 0.1)


def test_auto_classifier_default_budget_trains_winner_longer_with_cosine(tmp_path):
    rng = np.random.default_rng(1)
    seqs = [rng.normal(size=(8, 1)) + k for k in (0, 3) for _ in range(6)]
    data = SequenceSet(seqs, np.array(["a"] * 6 + ["b"] * 6))
    cfg = load_config(C.ClassifyConfig, None, {"model.hidden": 4, "auto.steps": 4, "auto.folds": 2,
                                               "auto.final_steps": 7})
    model = C.train(data, cfg, tmp_path / "run")
    assert model.meta["choice"]["final"]["steps"] == 100  # 100 default epochs of one batch beat 7 steps
    assert model.meta["train"]["step"] == 100
    saved = C.Classifier.load(tmp_path / "run").cfg.trainer
    assert (saved.steps, saved.epochs, saved.schedule.name) == (100, None, "cosine")
    cfg = load_config(C.ClassifyConfig, None, {"model.hidden": 4, "auto.steps": 4, "auto.folds": 2,
                                               "trainer.steps": 5, "trainer.epochs": None})
    model = C.train(data, cfg, None)  # a budget given by the user is kept
    assert "final" not in model.meta["choice"] and model.meta["train"]["step"] == 5
    assert model.cfg.trainer.schedule.name == "constant"


def test_plain_classifier_reads_long_series_folded():
    cfg = C.ClassifyModelConfig(kind="recurrent", hidden=5, reader="fold", stride=4)
    net = C.SequenceClassifier(2, 3, cfg)
    assert net.encoder.input_size == 8 and net(torch.randn(2, 17, 2), torch.tensor([17, 9])).shape == (2, 3)
    with pytest.raises(SeriesError, match="needs model.pool 'last'"):
        C.SequenceClassifier(2, 3, C.ClassifyModelConfig(reader="dilate", stride=2, pool="mean"))


def test_auto_classifier_averages_an_ensemble_of_the_winner(tmp_path):
    """auto.ensemble networks of the chosen kind, seeds trainer.seed + k, the later ones trained in
    run_dir/member<k>: the model's probabilities are their mean, the saved config says model.ensemble, and
    the run loads, embeds (members side by side) and exports as one model."""
    rng = np.random.default_rng(1)
    seqs = [rng.normal(size=(8, 1)) + k for k in (0, 3) for _ in range(6)]
    data = SequenceSet(seqs, np.array(["a"] * 6 + ["b"] * 6))
    cfg = load_config(C.ClassifyConfig, None, {"model.hidden": 4, "auto.steps": 4, "auto.folds": 2,
                                               "auto.ensemble": 2, "trainer.steps": 6, "trainer.epochs": None})
    model = C.train(data, cfg, tmp_path / "run")
    net = model.net
    assert isinstance(net, C.Ensemble) and len(net.members) == 2 and model.cfg.model.ensemble == 2
    assert model.cfg.model.kind == model.meta["choice"]["chosen"]
    a, b = (next(m.parameters()) for m in net.members)
    assert not torch.equal(a, b)  # different seeds
    assert (tmp_path / "run" / "member1" / "config.toml").is_file()
    t = C.tensors(data, model.scaler, None)
    mean = torch.stack([torch.softmax(m(t["x"], t["lengths"]), -1) for m in net.members]).mean(0)
    np.testing.assert_allclose(model.predict_proba(data), mean.detach().numpy(), rtol=1e-5, atol=1e-7)
    again = C.Classifier.load(tmp_path / "run")
    assert again.cfg.model.ensemble == 2
    np.testing.assert_allclose(again.predict_proba(data), model.predict_proba(data), rtol=1e-6)
    assert again.embed(data).shape[1] == 2 * net.members[0].embed(t["x"], t["lengths"]).shape[1]
    pytest.importorskip("onnxruntime")
    from rnnkit.export.models import export_run
    from rnnkit.export.runner import OnnxRunner

    (exported,) = export_run(tmp_path / "run")
    logits = OnnxRunner(exported.path).run({"x": t["x"].numpy(), "lengths": t["lengths"].numpy()})["logits"]
    np.testing.assert_allclose(torch.softmax(torch.as_tensor(logits), -1).numpy(), mean.detach().numpy(),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(SeriesError, match="model.ensemble: expected an int >= 1, got 0"):
        C.train(data, replace_config(model.cfg, **{"model.ensemble": 0}), None)
