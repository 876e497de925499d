"""Synthetic long-dependency tasks: the data follow the published protocols and the baselines are exact."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rnnkit.tasks.synthetic import (
    TASKS,
    AddingTask,
    AgreementTask,
    CopyTask,
    TemporalOrderTask,
    make_task,
)


def test_adding_protocol_and_baseline() -> None:
    task = AddingTask(length=50)
    b = task.sample_seeded(20000, 0)
    x, y = b["x"], b["y"]
    assert x.shape == (20000, 50, 2) and y.shape == (20000,)
    m = x[..., 1]
    assert torch.all(m.sum(1) == 2)
    assert torch.all(m[:, :25].sum(1) == 1) and torch.all(m[:, 25:].sum(1) == 1)  # one marker per half
    assert torch.all((x[..., 0] >= 0) & (x[..., 0] < 1))
    torch.testing.assert_close(y, (x[..., 0] * m).sum(1))
    # always predicting 1 gives MSE 1/6 (variance of the sum of two U[0, 1])
    mse_one = float(((y - 1) ** 2).mean())
    assert abs(mse_one - 1 / 6) < 0.006
    assert task.baseline() == pytest.approx(1 / 6)


class _Fixed(nn.Module):
    """A 'model' that returns fixed predictions whatever the input (a memoryless predictor)."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x, lengths=None):
        return self.out.expand(x.shape[0], *self.out.shape)


def test_copy_protocol_and_memoryless_baseline() -> None:
    T = 30
    task = CopyTask(length=T)
    b = task.sample_seeded(500, 1)
    x, y = b["x"].long(), b["y"].long()
    assert x.shape == y.shape == (500, T + 20)
    assert torch.all((x[:, :10] >= 1) & (x[:, :10] <= 8))
    assert torch.all(x[:, 10:T + 9] == 0) and torch.all(x[:, T + 9] == 9) and torch.all(x[:, T + 10:] == 0)
    assert torch.all(y[:, :T + 10] == 0)
    assert torch.equal(y[:, T + 10:], x[:, :10])
    # blanks with certainty, then uniform over the 8 symbols: cross-entropy 10 ln 8 / (T + 20)
    logits = torch.full((T + 20, 9), -1e4)
    logits[:T + 10, 0] = 0.0
    logits[T + 10:, 1:] = 0.0
    ce = task.metrics(_Fixed(logits), b)["test_ce"]
    assert ce == pytest.approx(10 * math.log(8) / (T + 20), rel=1e-5)
    assert task.baseline() == pytest.approx(10 * math.log(8) / (T + 20))
    assert CopyTask(length=100).baseline() == pytest.approx(0.173, abs=5e-4)  # ANCHORS.md


@pytest.mark.parametrize("variant,classes,n_rel", [("a", 4, 2), ("b", 8, 3)])
def test_temporal_order_protocol(variant: str, classes: int, n_rel: int) -> None:
    T = 100
    task = TemporalOrderTask(length=T, variant=variant)
    assert task.output_size == classes and task.baseline() == pytest.approx(1 / classes)
    b = task.sample_seeded(2000, 2)
    x, y, lens = b["x"].long(), b["y"], b["lengths"]
    assert torch.all((lens >= T) & (lens <= T + 10))
    rows = torch.arange(len(x))
    assert torch.all(x[:, 0] == 4) and torch.all(x[rows, lens - 1] == 5)  # B ... E
    rel = (x >= 6)
    assert torch.all(rel.sum(1) == n_rel)
    # the class is the binary number of the X/Y sequence in order (X = 0, Y = 1)
    for i in range(20):
        pos = rel[i].nonzero().flatten()
        code = 0
        for p in pos:
            code = code * 2 + int(x[i, p] - 6)
        assert code == int(y[i])
    windows = task._windows()
    for i in range(50):
        pos = rel[i].nonzero().flatten().tolist()
        assert all(lo <= p <= hi for p, (lo, hi) in zip(pos, windows))
    assert set(y.tolist()) == set(range(classes))


def test_agreement_protocol() -> None:
    task = AgreementTask(length=20)
    b = task.sample_seeded(4000, 3)
    x, y = b["x"].long(), b["y"]
    vocab = task.vocabulary()
    nouns, plurals = set(task.NOUNS), set(task.PLURALS)
    subj = [vocab[int(i)] for i in x[:, 1]]
    assert all((w in plurals) == bool(label) for w, label in zip(subj, y.tolist()))
    assert all(w in nouns | plurals for w in subj)
    # the noun nearest the verb is an attractor: independent of the label
    last = torch.tensor([vocab[int(i)] in plurals for i in x[:, -2]], dtype=torch.float)
    agree = float((last == y.float()).float().mean())
    assert 0.45 < agree < 0.55
    # clause verbs are number-neutral
    assert all(vocab[int(i)] in task.VERBS for i in x[:, 4])
    assert x.shape[1] >= 20
    text = task.decode(x[0])
    assert text.startswith("the ") and text.endswith(",") and ", which " in text


@pytest.mark.parametrize("name", sorted(TASKS))
def test_seeded_and_test_stream_disjoint(name: str) -> None:
    task = make_task(name, 25)
    a, b = task.sample_seeded(8, 5), task.sample_seeded(8, 5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    t = task.test_set(8, 5)
    assert not torch.equal(a["x"], t["x"])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_model_loss_and_metrics_run(name: str) -> None:
    task = make_task(name, 24)
    model = task.model(hidden_size=8, cell="gru")
    batch = task.sample_seeded(6, 0)
    loss = task.loss(model, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    m = task.metrics(model, batch, chunk=4)  # chunked evaluation gives means over all items
    assert task.metric in m
    assert model.training  # restored


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="task: expected one of"):
        make_task("nope", 10)
    with pytest.raises(ValueError, match="length: expected an int >= 20, got 5"):
        TemporalOrderTask(length=5)
    with pytest.raises(ValueError, match="variant"):
        TemporalOrderTask(length=50, variant="c")
    with pytest.raises(ValueError, match="readout"):
        AddingTask(length=10).model(8).__class__(2, 1, 8, readout="middle")
