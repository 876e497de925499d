"""The language-model head, stream evaluation and generation through step()."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rnnkit.metrics import lm_metrics
from rnnkit.tasks.decoding import filter_logits, generate, sample_next
from rnnkit.tasks.lm import LMConfig, LMTask, RecurrentLM, stream_loss

V = 11


def small(**kw) -> RecurrentLM:
    torch.manual_seed(0)
    cfg = {"hidden_size": 16, "num_layers": 2, "embedding_size": 8, **kw}
    return RecurrentLM(V, LMConfig(**cfg))


@pytest.mark.parametrize("kw", [{}, {"embedding_size": 0}, {"tie_weights": True},
                                {"tie_weights": True, "embedding_size": 16},
                                {"cell": "gru", "zoneout": 0.1}, {"cell": "lstm_peephole", "layer_norm": True},
                                {"cell": "rnn", "nonlinearity": "relu", "dropout": 0.2}])
def test_shapes_and_options(kw):
    m = small(**kw)
    x = torch.randint(0, V, (7, 3))
    logits, state = m(x)
    assert logits.shape == (7, 3, V)
    h = state[0] if isinstance(state, tuple) else state
    assert h.shape == (2, 3, 16)
    loss = LMTask().loss(logits, x)
    assert loss.shape == (7, 3)
    loss.mean().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_tied_weights_share_storage():
    m = small(tie_weights=True)
    assert m.decoder.weight is m.embedding.weight
    assert m.proj is not None and m.proj.weight.shape == (8, 16)


def test_bad_options():
    with pytest.raises(ValueError, match="model.peephole: not an option of cell 'gru'"):
        small(cell="gru", peephole=True)
    with pytest.raises(ValueError, match="model.cell: expected one of"):
        small(cell="transformer")
    with pytest.raises(ValueError, match="tie_weights"):
        small(embedding_size=0, tie_weights=True)


def test_init_range():
    m = small(init_range=0.05)
    assert all(float(p.detach().abs().max()) <= 0.05 for p in m.parameters())


def test_config_round_trip():
    cfg = LMConfig(cell="lstm_nfg", drop_gates=("forget",), dropout=0.1)
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown key"):
        LMConfig.from_dict({"hiden_size": 3})


def naive_loss(m, ids):
    logits, _ = m(ids[:-1].view(-1, 1))
    return F.cross_entropy(logits[:, 0], ids[1:], reduction="sum").item()


@pytest.mark.parametrize("n,batch,chunk", [(101, 4, 7), (50, 16, 256), (2, 8, 4), (97, 3, 5)])
def test_stream_loss_counts_every_prediction_once(n, batch, chunk):
    m = small().eval()
    torch.manual_seed(1)
    ids = torch.randint(0, V, (n,))
    total, count = stream_loss(m, ids, batch_size=batch, chunk=chunk)
    assert count == n - 1
    # one stream over everything is exact; several streams restart from zeros, so only close
    one, _ = stream_loss(m, ids, batch_size=1, chunk=chunk)
    assert one == pytest.approx(naive_loss(m, ids), rel=1e-5)
    assert total / count == pytest.approx(one / count, rel=0.2)


def test_metrics():
    out = lm_metrics(2 * math.log(2) * 10, 10)
    assert out["loss_nats"] == pytest.approx(2 * math.log(2))
    assert out["bits_per_char"] == pytest.approx(2.0)
    assert out["perplexity"] == pytest.approx(4.0)


def test_generation_uses_step_and_matches_full_forward(monkeypatch):
    m = small(dropout=0.3)
    calls = {"forward_T": []}
    orig = type(m.rnn).forward

    def spy(self, x, state=None, lengths=None):
        calls["forward_T"].append(x.shape[0])
        return orig(self, x, state, lengths)

    monkeypatch.setattr(type(m.rnn), "forward", spy)
    prime = [1, 2, 3, 4]
    kept: list[torch.Tensor] = []
    g = torch.Generator().manual_seed(3)
    out = generate(m, prime, 12, temperature=0.8, generator=g, keep_logits=kept)
    assert len(out) == 12 and m.training  # the mode is restored
    # the prime once, then one single-step call per new symbol
    assert calls["forward_T"] == [4] + [1] * 12
    m.eval()
    full, _ = orig(m.rnn, m.embed(torch.tensor(prime + out).view(-1, 1)))
    ref = m.head(full)[:, 0]  # (P + N, V)
    torch.testing.assert_close(torch.stack(kept), ref[len(prime) - 1:-1], atol=1e-5, rtol=1e-5)


def test_generation_forbid_stream_and_greedy():
    m = small()
    seen: list[int] = []
    out = generate(m, [1], 30, temperature=5.0, forbid=[0], on_token=seen.append,
                   generator=torch.Generator().manual_seed(0))
    assert seen == out and 0 not in out
    a = generate(m, [1, 2], 10, temperature=0)
    b = generate(m, [1, 2], 10, temperature=0)
    assert a == b
    with pytest.raises(ValueError, match="--top-p"):
        generate(m, [1], 3, top_p=0.0)
    with pytest.raises(ValueError, match="prime"):
        generate(m, [], 3)


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    k = filter_logits(logits, top_k=2)
    assert torch.isinf(k[2:]).all() and torch.isfinite(k[:2]).all()
    p = filter_logits(logits, top_p=0.75)  # 0.5 + 0.3 reaches 0.75
    assert torch.isfinite(p[:2]).all() and torch.isinf(p[2:]).all()
    p = filter_logits(logits, top_p=0.8)  # 0.5 + 0.3 = 0.8 exactly: two kept
    assert torch.isfinite(p).sum() == 2
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).sum() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=g) for _ in range(200)}
    assert draws == {0, 1}
