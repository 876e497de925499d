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
from rnnkit.tasks.classify_auto import AutoClassifySettings, auto_train, folds_of
from rnnkit.tasks.encoders import final_hidden
from rnnkit.tasks.lstm_fcn import FCN, LSTMFCN, LSTMFCNConfig, Reader


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
    cfg = LSTMFCNConfig(hidden=8, shuffle=shuffle, squeeze_excite=se, read=read, stride=2)
    net = LSTMFCN(2, 3, cfg, max_len=20).eval()
    a = torch.randn(1, 13, 2)
    batch = torch.cat([torch.cat([a, torch.zeros(1, 7, 2)], 1), torch.randn(1, 20, 2)])
    out = net(batch, torch.tensor([13, 20]))
    assert out.shape == (2, 3)
    torch.testing.assert_close(out[:1], net(a, torch.tensor([13])))


@pytest.mark.parametrize("cell", sorted(REGISTRY))
def test_any_registered_cell_in_the_recurrent_branch(cell):
    torch.manual_seed(3)
    net = LSTMFCN(1, 2, LSTMFCNConfig(cell=cell, hidden=4, shuffle=False), max_len=9)
    x = torch.randn(4, 9, 1)
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


def test_auto_classifier_chooses_by_cross_validation_and_records_it():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 24)
    seqs = [np.sin(2 * np.pi * (1 + k) * t + rng.normal())[:, None] + 0.1 * rng.normal(size=(24, 1))
            for k in (0, 1) for _ in range(8)]
    labels = ["slow"] * 8 + ["fast"] * 8
    s = AutoClassifySettings(cv_steps=20, steps=40, folds=2, lstm_fcn=LSTMFCNConfig(hidden=4, branch_dropout=0.0))
    model = auto_train(SequenceSet(seqs, np.array(labels)), s)
    rec = model.record
    assert rec["chosen"] in ("recurrent", "lstm_fcn") and rec["folds"] == 2
    means = {k: v["mean"] for k, v in rec["candidates"].items()}
    assert means[rec["chosen"]] == max(means.values())
    assert all(len(v["fold_accuracy"]) == 2 for v in rec["candidates"].values())
    assert model.evaluate(SequenceSet(seqs, np.array(labels)))["accuracy"] >= 0.5
