"""Truncated BPTT: stream layout, the TBPTT(k1, k2) plan and the gradients the Trainer computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rnnkit import LSTM
from rnnkit.data.streams import batchify, chunk_bounds, tbptt_plan
from rnnkit.errors import UserError
from rnnkit.train import StreamData, Trainer, TrainerConfig, load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: 1 thread is faster and steadier


def test_batchify_layout_and_sharding():
    data = torch.arange(23)
    x = batchify(data, 4)  # L = 5, remainder 3 dropped
    assert x.shape == (5, 4)
    assert x[:, 0].tolist() == [0, 1, 2, 3, 4] and x[:, 3].tolist() == [15, 16, 17, 18, 19]
    feats = torch.arange(40.0).view(20, 2)
    assert torch.equal(batchify(feats, 2)[:, 1], feats[10:20])
    r1 = batchify(data, 4, rank=1, world_size=2)
    assert torch.equal(r1, x[:, 2:4])
    with pytest.raises(UserError, match="batch_size"):
        batchify(data, 3, world_size=2)
    with pytest.raises(UserError, match="too few"):
        batchify(torch.arange(5), 4)


@pytest.mark.parametrize("k1,k2", [(5, 5), (5, 2), (5, 3), (5, 8), (4, 13), (3, 1)])
def test_plan_covers_each_step_once_and_windows(k1, k2):
    L = 17
    seen = []
    for i, (start, end) in enumerate(chunk_bounds(L, k1)):
        plan = tbptt_plan(L, k1, k2, i)
        assert (plan.start, plan.end) == (start, end)
        assert plan.window == max(0, start - max(0, k2 - k1))
        assert plan.segments[0].start == plan.window and plan.segments[-1].end == end
        for a, b in zip(plan.segments[:-1], plan.segments[1:]):
            assert a.end == b.start
        loss_steps = [t for s in plan.segments if s.loss for t in range(s.start, s.end)]
        assert loss_steps == list(range(start, end))
        seen += loss_steps
        # the next window must start at a segment boundary of this one
        bounds = {plan.window} | {s.end for s in plan.segments}
        assert plan.next_window in bounds
    assert seen == list(range(L))


# ---------------------------------------------------------------------------------------------------------
# a model whose "input at step s" is an embedding row of its own, so the gradient w.r.t. the input at step s
# is the update of that row under SGD with lr 1


class PosModel(nn.Module):
    def __init__(self, length: int, hidden: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(length, 3)
        self.rnn = LSTM(3, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x, state=None):
        h, state = self.rnn(self.embed(x), state)
        return self.head(h)[..., 0], state  # (T, B)


class WeightedTask:
    """Squared error; targets (N, 2) = (value, weight)."""

    def __init__(self) -> None:
        self.preds: list[torch.Tensor] = []

    def forward(self, model, x, state):
        return model(x, state)

    def loss(self, pred, y):
        self.preds.append(pred.detach().clone())
        return (pred - y[..., 0]) ** 2, y[..., 1]


def _pos_data(L: int, B: int, weight_at: int | None = None, seed: int = 0) -> StreamData:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.arange(L * B)
    values = torch.randn(L * B, generator=g, dtype=torch.float64)
    weights = torch.ones(L * B, dtype=torch.float64)
    if weight_at is not None:
        weights = (torch.arange(L * B) == weight_at).double()
    return StreamData(inputs, torch.stack([values, weights], 1))


def _sgd_config(**kw) -> TrainerConfig:
    base = {"optim.name": "sgd", "optim.lr": 1.0, "tensorboard": False, "log_every": 1000}
    base.update(kw)
    return load_config(TrainerConfig, None, base)


def _train(model, data, cfg, task=None):
    task = task or WeightedTask()
    Trainer(model, task, data, cfg, None, quiet=True).fit()
    return task


@pytest.mark.parametrize("k2", [None, 12, 30])
def test_k1_equal_to_length_gives_full_bptt_gradients(k2):
    L, B = 12, 2
    torch.manual_seed(0)
    model = PosModel(L * B).double()
    ref = PosModel(L * B).double()
    ref.load_state_dict(model.state_dict())
    data = _pos_data(L, B)
    _train(model, data, _sgd_config(steps=1, batch_size=B, tbptt=L, tbptt_backward=k2))
    # full BPTT by hand: mean squared error over all L*B steps
    x = batchify(data.inputs, B)
    y = batchify(data.targets, B)
    pred, _ = ref(x)
    ((pred - y[..., 0]) ** 2).mean().backward()
    for (name, p0), p1 in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(p0.detach() - p1.detach(), p0.grad, rtol=1e-10, atol=1e-12, msg=name)


def _input_grads(L: int, k1: int, k2: int, t: int) -> torch.Tensor:
    """|d loss_t / d input_s| for every s (one stream), through the Trainer (SGD, lr 1)."""
    torch.manual_seed(1)
    model = PosModel(L).double()
    before = model.embed.weight.detach().clone()
    chunk = t // k1
    cfg = _sgd_config(steps=chunk + 1, batch_size=1, tbptt=k1, tbptt_backward=k2, loss_reduction="sum_time")
    _train(model, _pos_data(L, 1, weight_at=t), cfg)
    return (model.embed.weight.detach() - before).abs().sum(1)


@pytest.mark.parametrize("k1,k2,t", [(6, 6, 10), (6, 3, 11), (6, 2, 9), (4, 7, 10), (4, 9, 15), (5, 12, 7)])
def test_gradient_reaches_exactly_the_truncation_window(k1, k2, t):
    L = 20
    g = _input_grads(L, k1, k2, t)
    reach = {s for s in range(L) if g[s] > 1e-14}
    assert max(reach) == t  # nothing flows to the future
    # the property: zero for d >= k2, non-zero for small d
    assert all(t - s < k2 for s in reach)
    assert 0 in {t - s for s in reach}
    # and the exact window of docs/training.md
    start = (t // k1) * k1
    end = min(start + k1, L)
    if k2 >= k1:
        lo = max(0, start - (k2 - k1))
    else:
        cuts = [c for c in range(end - k2, start, -k2) if c <= t]
        lo = max(cuts) if cuts else start
    assert reach == set(range(lo, t + 1))


def test_k2_smaller_than_k1_last_steps_see_k2_back():
    g = _input_grads(20, 8, 3, 15)  # chunk [8, 16), cuts at 13 and 10: step 15 sees 13, 14, 15
    assert [s for s in range(20) if g[s] > 1e-14] == [13, 14, 15]


def test_k2_larger_than_k1_reaches_into_previous_chunk():
    g = _input_grads(20, 4, 7, 8)  # chunk [8, 12), window from 5
    assert [s for s in range(20) if g[s] > 1e-14] == [5, 6, 7, 8]


@pytest.mark.parametrize("k1,k2", [(5, 5), (5, 2), (4, 9), (7, 7)])
def test_state_carry_equals_one_long_forward(k1, k2):
    L, B = 23, 3
    torch.manual_seed(2)
    model = PosModel(L * B).double()
    data = _pos_data(L, B)
    x = batchify(data.inputs, B)
    with torch.no_grad():
        full, _ = model(x)
    # lr so small that float64 weights do not change: every chunk sees the same model
    cfg = _sgd_config(epochs=1, batch_size=B, tbptt=k1, tbptt_backward=k2, **{"optim.lr": 1e-40})
    task = _train(model, data, cfg)
    torch.testing.assert_close(torch.cat(task.preds), full, rtol=1e-12, atol=1e-12)


def test_state_resets_at_epoch_start():
    L, B = 10, 2
    torch.manual_seed(3)
    model = PosModel(L * B).double()
    data = _pos_data(L, B)
    task = _train(model, data, _sgd_config(epochs=2, batch_size=B, tbptt=4, **{"optim.lr": 1e-40}))
    first, second = torch.cat(task.preds[:3]), torch.cat(task.preds[3:])
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_sum_time_reduction_scales_by_chunk_length():
    L, B, k1 = 8, 2, 8
    torch.manual_seed(4)
    m1 = PosModel(L * B).double()
    m2 = PosModel(L * B).double()
    m2.load_state_dict(m1.state_dict())
    p0 = [p.detach().clone() for p in m1.parameters()]
    data = _pos_data(L, B)
    _train(m1, data, _sgd_config(steps=1, batch_size=B, tbptt=k1))
    _train(m2, data, _sgd_config(steps=1, batch_size=B, tbptt=k1, loss_reduction="sum_time"))
    for a, b, c in zip(p0, m1.parameters(), m2.parameters()):
        torch.testing.assert_close((a - c.detach()), (a - b.detach()) * k1, rtol=1e-9, atol=1e-12)
