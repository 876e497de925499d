"""Instruments: activation capture, gradient flow through time, gate statistics, ablation aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cellcases import input_size

import rnnkit
from rnnkit.analysis.ablation import aggregate, harm, markdown, parse_lengths
from rnnkit.analysis.capture import correlated_units, text_activations, text_features, trace
from rnnkit.analysis.gates import gate_statistics, saturation
from rnnkit.analysis.gradflow import decay_per_step, gradient_flow


@pytest.mark.parametrize("name", sorted(rnnkit.REGISTRY))
@pytest.mark.parametrize("num_layers", [1, 2])
def test_trace_matches_forward(name: str, num_layers: int) -> None:
    torch.manual_seed(0)
    # the reference kernel (the oracle; no JIT warm-up) gives the numbers trace() must reproduce
    I = input_size(name, 3, 5)
    layer = rnnkit.build(name, I, 5, num_layers=num_layers, batch_first=True, backend="reference").eval()
    x = torch.randn(3, 6, I)
    lengths = [6, 1, 4]
    out, state = layer(x, lengths=lengths)
    tr = trace(layer, x, lengths=lengths)
    mask = (torch.arange(6).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float().unsqueeze(-1)
    torch.testing.assert_close(tr.get("h").transpose(0, 1) * mask, out)
    h_final = state[0] if isinstance(state, tuple) else state
    for k in range(num_layers):  # the state at the last step equals each layer's final state
        torch.testing.assert_close(tr.get("h", k)[-1], h_final[k])
    if isinstance(state, tuple):  # every further state (c; c, n, m for the sLSTM), by its declared name
        for name_k, s in zip(layer.cell.state_names[1:], state[1:]):
            torch.testing.assert_close(tr.get(name_k, 0)[-1], s[0])


def test_trace_gates_follow_the_variants() -> None:
    x = torch.randn(4, 2, 3)
    full = trace(rnnkit.build("lstm", 3, 5), x)
    assert set(full.gates()) == {"i", "f", "g", "o"}
    for g in ("i", "f", "o"):
        v = full.gates()[g]
        assert torch.all((v > 0) & (v < 1))
    assert set(trace(rnnkit.build("lstm_nfg", 3, 5), x).gates()) == {"i", "g", "o"}
    assert set(trace(rnnkit.build("lstm_nog", 3, 5), x).gates()) == {"i", "f", "g"}
    cifg = trace(rnnkit.build("lstm_cifg", 3, 5), x).gates()
    torch.testing.assert_close(cifg["f"], 1 - cifg["i"])
    assert set(trace(rnnkit.build("gru", 3, 5), x).gates()) == {"r", "z", "n"}
    assert trace(rnnkit.build("rnn", 3, 5), x).gates() == {}
    with pytest.raises(KeyError, match="available"):
        trace(rnnkit.build("gru", 3, 5), x).get("c")
    with pytest.raises(ValueError, match="unidirectional"):
        trace(rnnkit.GRU(3, 5, bidirectional=True), x)
    with pytest.raises(TypeError, match="layer"):
        trace(torch.nn.LSTM(3, 5), x)


def test_gradient_flow_matches_the_hand_recursion_of_an_elman_rnn() -> None:
    """dL/dh_t = R^T diag(1 - h_{t+1}^2) dL/dh_{t+1}, with dL/dh_T = w for L = w . h_T."""
    torch.manual_seed(1)
    layer = rnnkit.RNN(2, 4).double()
    x = torch.randn(7, 1, 2, dtype=torch.float64)
    w = torch.randn(4, dtype=torch.float64)
    flow = gradient_flow(layer, x, lambda out: (out[-1] * w).sum())
    with torch.no_grad():
        h = layer(x)[0][:, 0]  # (T, H)
    R = layer.weight_hh_l0.detach()
    g = w.clone()
    expected = [0.0] * 7
    for t in range(6, -1, -1):
        expected[t] = float(g.norm())
        g = R.t() @ ((1 - h[t] ** 2) * g)
    np.testing.assert_allclose(flow["h"], expected, rtol=1e-10)
    assert set(flow) == {"h"}


def test_gradient_flow_lstm_has_cell_state_and_tracks_batch_geometric_mean() -> None:
    torch.manual_seed(2)
    layer = rnnkit.LSTM(2, 6, batch_first=True)
    x = torch.randn(3, 5, 2)
    flow = gradient_flow(layer, x, lambda out: out[-1].sum())
    assert set(flow) == {"h", "c"} and len(flow["h"]) == len(flow["c"]) == 5
    # the last step's dL/dh is the all-ones vector for every sequence: norm sqrt(H)
    assert flow["h"][-1] == pytest.approx(math.sqrt(6))
    for p in layer.parameters():
        p.requires_grad_(False)
    frozen = gradient_flow(layer, x, lambda out: out[-1].sum())  # works on a frozen model too
    np.testing.assert_allclose(frozen["c"], flow["c"])
    assert not any(p.requires_grad for p in layer.parameters())  # and leaves it frozen


def test_untrained_rnn_gradient_vanishes_faster_than_lstm() -> None:
    torch.manual_seed(0)
    x = torch.rand(8, 60, 2)
    rates = {}
    for name in ("rnn", "lstm"):
        layer = rnnkit.build(name, 2, 32, batch_first=True)
        rates[name] = decay_per_step(gradient_flow(layer, x, lambda out: out[-1].sum())["h"])
    assert rates["rnn"] < rates["lstm"] < 1.0


def test_decay_per_step_of_a_geometric_sequence() -> None:
    assert decay_per_step([0.5 ** (20 - t) for t in range(21)]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="norms"):
        decay_per_step([0.0, 0.0])


def test_saturation_fractions() -> None:
    v = torch.tensor([[[0.05, 0.5]], [[0.95, 0.5]], [[0.02, 0.99]], [[0.5, 0.5]]])  # (T=4, B=1, H=2)
    left, right = saturation(v)
    np.testing.assert_allclose(left, [0.5, 0.0])
    np.testing.assert_allclose(right, [0.25, 0.25])
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(4, 1, 1)
    left, right = saturation(v, mask=mask)
    np.testing.assert_allclose(left, [0.5, 0.0])
    np.testing.assert_allclose(right, [0.5, 0.0])


def test_gate_statistics_see_a_saturated_forget_gate() -> None:
    torch.manual_seed(0)
    layer = rnnkit.LSTM(2, 8, forget_bias=30.0)  # f = sigmoid(30 + small) ~ 1 everywhere
    stats = gate_statistics(layer, torch.randn(10, 4, 2), lengths=[10, 10, 3, 5])
    f = stats["layers"][0]["f"]
    assert all(r == 1.0 for r in f["right_frac"]) and all(v == 0.0 for v in f["left_frac"])
    assert sum(f["hist"]) == 8 * (10 + 10 + 3 + 5)  # padding excluded
    assert set(stats["layers"][0]) == {"i", "f", "o"}
    gru = gate_statistics(rnnkit.GRU(2, 3, num_layers=2), torch.randn(5, 2, 2))
    assert len(gru["layers"]) == 2 and set(gru["layers"][1]) == {"r", "z"}


def test_text_features_and_correlated_units() -> None:
    text = 'ab "cd" (e)\nfg "h"'
    f = text_features(text)
    assert f["inside quotes"].tolist()[:8] == [0, 0, 0, 1, 1, 1, 0, 0]
    assert f["line position"][11] == 0 and f["line position"][12] == 1  # the newline resets the column
    assert f["bracket depth"].tolist()[8:11] == [1, 1, 0]
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(len(text), 4))
    acts[:, 2] = f["inside quotes"] * 2 - 1 + 0.01 * rng.normal(size=len(text))
    top = correlated_units(acts, f, top=2)
    assert top["inside quotes"][0][0] == 2 and top["inside quotes"][0][1] > 0.99
    with pytest.raises(ValueError, match="acts"):
        correlated_units(acts[0], f)


def test_text_activations_record() -> None:
    text = "hi (x)"
    layer = rnnkit.LSTM(3, 4, num_layers=2)
    rec = text_activations(text, trace(layer, torch.randn(len(text), 1, 3)))
    assert rec["text"] == text
    assert set(rec["series"]) == {"layer0/c", "layer0/h", "layer1/c", "layer1/h"}
    assert np.asarray(rec["series"]["layer1/h"]).shape == (len(text), 4)
    with pytest.raises(ValueError, match="characters"):
        text_activations("too long text", trace(layer, torch.randn(3, 1, 3)))


def test_ablation_harm_and_aggregate() -> None:
    assert harm(0.5, 0.9, 0.5, lower_is_better=False) == pytest.approx(1.0)
    assert harm(0.01, 0.01, 1 / 6, lower_is_better=True) == pytest.approx(0.0)
    assert math.isnan(harm(0.5, 0.4, 0.5, lower_is_better=False))
    results = [{"task": "agreement", "cell": c, "seed": s, "test_acc": v, "baseline": 0.5}
               for c, vals in {"lstm": [0.9, 1.0], "lstm_nfg": [0.5, 0.6], "lstm_nog": [0.9, 0.9],
                               "lstm_nig": [0.8, 0.8]}.items() for s, v in enumerate(vals)]
    results.append({"task": "agreement", "cell": "gru", "seed": 0, "error": ["boom"]})
    agg = aggregate(results)
    row = agg["table"]["agreement"]["lstm_nfg"]
    assert row["mean"] == pytest.approx(0.55) and row["n"] == 2 and row["harm"] == pytest.approx(0.4 / 0.45)
    assert agg["ranking"]["gates"] == ["forget gate", "input gate", "output gate"]
    md = markdown(agg)
    assert "| lstm_nfg | 0.55 ± 0.071 (n=2, harm 0.89)" in md
    assert parse_lengths("adding=50", ["adding", "copy"]) == {"adding": 50, "copy": 50}
    assert parse_lengths("70", ["adding", "copy"]) == {"adding": 70, "copy": 70}
    with pytest.raises(ValueError, match="--length"):
        parse_lengths("adding=x", ["adding"])
