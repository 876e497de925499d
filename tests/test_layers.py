"""Layers: kernels against the reference oracle, torch.nn equality, variants, step(), regularisers, errors."""

import math

import pytest
import torch
from cellcases import input_size, random_state
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from rnnkit.cells import REGISTRY

GRID = [  # (T, B, I, H, layers, bidirectional, batch_first, lengths, with_state)
    (1, 1, 2, 3, 1, False, False, None, False),
    (5, 3, 4, 5, 2, False, True, None, True),
    (6, 4, 3, 7, 2, True, False, [6, 2, 5, 1], True),
    (4, 2, 3, 4, 1, True, True, [3, 4], False),
]


def _run(layer, x, state, lengths, seed=1):
    torch.manual_seed(seed)
    out, final = layer(x, state, lengths=lengths)
    final = final if isinstance(final, tuple) else (final,)
    loss = out.square().sum() + sum((s * s.sin()).sum() for s in final)
    leaves = [x] + [s for s in (state if isinstance(state, tuple) else (state,)) if s is not None]
    grads = torch.autograd.grad(loss, leaves + list(layer.parameters()))
    return out, final, grads


def _pair(name, I, H, L, bidir, batch_first, backend, dtype=torch.float64):
    ref = rnnkit.build(name, I, H, num_layers=L, bidirectional=bidir, batch_first=batch_first,
                       backend="reference").to(dtype)
    other = rnnkit.build(name, I, H, num_layers=L, bidirectional=bidir, batch_first=batch_first,
                         backend=backend).to(dtype)
    other.load_state_dict(ref.state_dict())
    return ref, other


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_bptt_equals_reference(name):
    for T, B, I, H, L, bidir, bf, lengths, with_state in GRID:
        if L > 1 and bidir and input_size(name, 1, H) == H:
            continue  # a raw-input cell's second layer takes 2H features: it needs I = H
        I = input_size(name, I, H)
        ref, fast = _pair(name, I, H, L, bidir, bf, "bptt")
        D = 2 if bidir else 1
        x = torch.randn((B, T, I) if bf else (T, B, I), dtype=torch.float64, requires_grad=True)
        state = random_state(name, L * D, B, H) if with_state else None
        a, b = _run(ref, x, state, lengths), _run(fast, x, state, lengths)
        torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=1e-10)
        for sa, sb in zip(a[1], b[1]):
            torch.testing.assert_close(sa, sb, rtol=1e-10, atol=1e-10)
        for ga, gb in zip(a[2], b[2]):
            torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-9)


# ---- torch.nn equality ---------------------------------------------------------------------------
TORCH_CASES = [
    ("lstm", lambda I, H, **k: nn.LSTM(I, H, **k), lambda I, H, **k: rnnkit.LSTM(I, H, **k)),
    ("gru", lambda I, H, **k: nn.GRU(I, H, **k), lambda I, H, **k: rnnkit.GRU(I, H, **k)),
    ("rnn_tanh", lambda I, H, **k: nn.RNN(I, H, **k), lambda I, H, **k: rnnkit.RNN(I, H, **k)),
    ("rnn_relu", lambda I, H, **k: nn.RNN(I, H, nonlinearity="relu", **k),
     lambda I, H, **k: rnnkit.RNN(I, H, nonlinearity="relu", **k)),
]


@pytest.mark.parametrize("backend", ["reference", "bptt", "native", "auto"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
@pytest.mark.parametrize("bidir", [False, True])
def test_equals_torch_nn(case, backend, bidir):
    _, make_torch, make_ours = case
    theirs = make_torch(3, 5, num_layers=2, bidirectional=bidir).double()
    ours = make_ours(3, 5, num_layers=2, bidirectional=bidir, backend=backend).double()
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not unexpected and not missing
    x = torch.randn(7, 4, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([7, 3, 5, 1])
    # padded + lengths (ours) against a PackedSequence (theirs), and packed against packed
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out_t, st_t = theirs(packed)
    out_t, _ = pad_packed_sequence(out_t, total_length=7)
    for ours_input in ("lengths", "packed"):
        if ours_input == "lengths":
            out_o, st_o = ours(x, lengths=lengths)
        else:
            out_o, st_o = ours(packed)
            out_o, _ = pad_packed_sequence(out_o, total_length=7)
        torch.testing.assert_close(out_o, out_t)
        st_o = st_o if isinstance(st_o, tuple) else (st_o,)
        st_tt = st_t if isinstance(st_t, tuple) else (st_t,)
        for a, b in zip(st_o, st_tt):
            torch.testing.assert_close(a, b)
        g_o = torch.autograd.grad(out_o.sum() + sum(s.sum() for s in st_o), [x, *ours.parameters()],
                                  retain_graph=True)
        g_t = torch.autograd.grad(out_t.sum() + sum(s.sum() for s in st_tt), [x, *theirs.parameters()],
                                  retain_graph=True)
        for a, b in zip(g_o, g_t):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_step_equals_torch_cell(family):
    torch_cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[family](3, 4).double()
    ours = rnnkit.layers.LAYERS[family](3, 4).double()
    sd = {f"{k}_l0": v for k, v in torch_cell.state_dict().items()}
    ours.load_state_dict(sd, strict=False)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    state = None
    hc = None
    for t in range(5):
        y, state = ours.step(x[t], state)
        hc = torch_cell(x[t], hc)
        h_t = hc[0] if family == "lstm" else hc
        torch.testing.assert_close(y, h_t)


def test_state_dict_moves_both_ways():
    ours = rnnkit.LSTM(3, 4, num_layers=2, peephole=True)
    theirs = nn.LSTM(3, 4, num_layers=2)
    _, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert sorted(unexpected) == ["weight_ch_l0", "weight_ch_l1"]
    torch.testing.assert_close(theirs.weight_hh_l1, ours.weight_hh_l1)


# ---- variants against the equations ----------------------------------------------------------
def _scalar_lstm(**options):
    """An LSTM with I = H = 1 and hand-set weights: w_ih = [.5, -.3, .8, .2], w_hh = [.1, .4, -.6, .7]."""
    m = rnnkit.LSTM(1, 1, bias=True, **options).double()
    with torch.no_grad():
        m.weight_ih_l0.copy_(torch.tensor([[0.5], [-0.3], [0.8], [0.2]], dtype=torch.float64))
        m.weight_hh_l0.copy_(torch.tensor([[0.1], [0.4], [-0.6], [0.7]], dtype=torch.float64))
        m.bias_ih_l0.copy_(torch.tensor([0.05, 0.6, -0.1, 0.2], dtype=torch.float64))
        m.bias_hh_l0.zero_()
        if options.get("peephole"):
            m.weight_ch_l0.copy_(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
    return m


def _sig(v):
    return 1 / (1 + math.exp(-v))


def _hand_lstm(xs, h=0.3, c=-0.4, coupled=False, drop=(), act=True, peep=(0, 0, 0)):
    wi, wh, b = [0.5, -0.3, 0.8, 0.2], [0.1, 0.4, -0.6, 0.7], [0.05, 0.6, -0.1, 0.2]
    out = []
    for x in xs:
        a = [wi[k] * x + wh[k] * h + b[k] for k in range(4)]
        i = 1.0 if "input" in drop else _sig(a[0] + peep[0] * c)
        f = 1 - i if coupled else (1.0 if "forget" in drop else _sig(a[1] + peep[1] * c))
        c = f * c + i * math.tanh(a[2])
        o = 1.0 if "output" in drop else _sig(a[3] + peep[2] * c)
        h = o * (math.tanh(c) if act else c)
        out.append(h)
    return out, h, c


@pytest.mark.parametrize("options,hand", [
    ({}, {}),
    ({"coupled": True}, {"coupled": True}),
    ({"drop_gates": ("forget",)}, {"drop": ("forget",)}),
    ({"drop_gates": ("input",)}, {"drop": ("input",)}),
    ({"drop_gates": ("output", "input")}, {"drop": ("output", "input")}),
    ({"output_activation": False}, {"act": False}),
    ({"peephole": True}, {"peep": (0.3, -0.2, 0.5)}),
])
@pytest.mark.parametrize("backend", ["reference", "bptt"])
def test_lstm_variants_match_hand_computation(options, hand, backend):
    m = _scalar_lstm(**options, backend=backend)
    xs = [0.7, -1.2, 0.4]
    x = torch.tensor(xs, dtype=torch.float64).view(3, 1, 1)
    state = (torch.full((1, 1, 1), 0.3, dtype=torch.float64), torch.full((1, 1, 1), -0.4, dtype=torch.float64))
    out, (h, c) = m(x, state)
    exp_out, exp_h, exp_c = _hand_lstm(xs, **hand)
    torch.testing.assert_close(out.flatten(), torch.tensor(exp_out, dtype=torch.float64))
    assert h.item() == pytest.approx(exp_h, abs=1e-12) and c.item() == pytest.approx(exp_c, abs=1e-12)


def test_zero_peepholes_give_plain_lstm():
    peep = rnnkit.LSTM(3, 6, num_layers=2, peephole=True, backend="bptt")
    plain = nn.LSTM(3, 6, num_layers=2)
    plain.load_state_dict(peep.state_dict(), strict=False)
    with torch.no_grad():
        peep.weight_ch_l0.zero_()
        peep.weight_ch_l1.zero_()
    x = torch.randn(8, 2, 3)
    torch.testing.assert_close(peep(x)[0], plain(x)[0])


def test_forget_bias_init():
    m = rnnkit.LSTM(2, 5, forget_bias=1.0)
    assert torch.all(m.bias_ih_l0[5:10] == 1.0) and torch.all(m.bias_hh_l0[5:10] == 0.0)
    cifg = rnnkit.LSTM(2, 5, coupled=True, forget_bias=2.0)
    assert torch.all(cifg.bias_ih_l0[:5] == -2.0)


def test_cho_gru_equation():
    """reset_after=False applies r before the recurrent matmul: n = tanh(W_n x + b_in + R_n (r*h) + b_hn)."""
    m = rnnkit.GRU(2, 3, reset_after=False).double()
    x, h = torch.randn(1, 1, 2, dtype=torch.float64), torch.randn(1, 1, 3, dtype=torch.float64)
    W, R, bi, bh = m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0
    xt, ht = x[0, 0], h[0, 0]
    r = torch.sigmoid(W[:3] @ xt + bi[:3] + R[:3] @ ht + bh[:3])
    z = torch.sigmoid(W[3:6] @ xt + bi[3:6] + R[3:6] @ ht + bh[3:6])
    n = torch.tanh(W[6:] @ xt + bi[6:] + R[6:] @ (r * ht) + bh[6:])
    out, _ = m(x, h)
    torch.testing.assert_close(out[0, 0], (1 - z) * n + z * ht)


# ---- step() and streaming ----------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("layers", [1, 3])
def test_step_equals_forward(name, layers):
    # float64: step() and forward() may run different kernels, whose float32 rounding differs (layer norm
    # amplifies it by 1/std); in float64 the two must agree to rounding of the same math.
    torch.manual_seed(0)
    I = input_size(name, 3, 5)
    m = rnnkit.build(name, I, 5, num_layers=layers, batch_first=True, dtype=torch.float64).eval()
    x = torch.randn(2, 6, I, dtype=torch.float64)
    full, final = m(x)
    state, ys = None, []
    for t in range(6):
        y, state = m.step(x[:, t], state)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), full, rtol=1e-10, atol=1e-12)
    for a, b in zip(final if isinstance(final, tuple) else (final,), state if isinstance(state, tuple) else (state,)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_unbatched_input_and_state():
    m = rnnkit.GRU(3, 4, num_layers=2)
    out, h = m(torch.randn(5, 3), torch.zeros(2, 4))
    assert out.shape == (5, 4) and h.shape == (2, 4)
    y, h = m.step(torch.randn(3), h)
    assert y.shape == (4,) and h.shape == (2, 4)


# ---- regularisers ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"recurrent_dropout": 0.3}, {"zoneout": 0.2}, {"dropout": 0.4, "num_layers": 2}])
def test_regularisers_eval_deterministic_train_seeded(kwargs):
    m = rnnkit.LSTM(3, 8, **kwargs)
    x = torch.randn(6, 4, 3)
    m.eval()
    torch.manual_seed(1)
    a = m(x)[0]
    torch.manual_seed(2)
    b = m(x)[0]
    torch.testing.assert_close(a, b)
    m.train()
    torch.manual_seed(5)
    c = m(x)[0]
    torch.manual_seed(5)
    d = m(x)[0]
    torch.manual_seed(6)
    e = m(x)[0]
    torch.testing.assert_close(c, d)
    assert not torch.allclose(c, e)


def test_recurrent_dropout_off_in_eval_equals_plain():
    a = rnnkit.LSTM(3, 8, recurrent_dropout=0.5).eval()
    b = rnnkit.LSTM(3, 8)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(a(x)[0], b(x)[0])


def test_zoneout_eval_uses_expectation():
    p = 0.3
    m = rnnkit.GRU(2, 4, zoneout=p, backend="bptt").double().eval()
    plain = rnnkit.GRU(2, 4, backend="reference").double()
    plain.load_state_dict(m.state_dict())
    x = torch.randn(3, 1, 2, dtype=torch.float64)
    h = torch.zeros(1, 1, 4, dtype=torch.float64)
    expected = []
    for t in range(3):
        _, h_new = plain(x[t:t + 1], h)
        h = p * h + (1 - p) * h_new
        expected.append(h[0])
    torch.testing.assert_close(m(x)[0], torch.stack(expected))


def test_lengths_outputs_zero_and_state_at_last_step():
    m = rnnkit.LSTM(2, 3, peephole=True, bidirectional=True)
    x = torch.randn(5, 2, 2)
    out, (h, _) = m(x, lengths=[2, 5])
    assert torch.all(out[2:, 0] == 0)
    short, (hs, _) = m(x[:2, :1])
    torch.testing.assert_close(out[:2, :1], short)
    torch.testing.assert_close(h[:, :1], hs)


# ---- dispatch ----------------------------------------------------------------------------------
def test_auto_backend_reported_and_no_silent_fallback():
    assert "-> 'native'" in repr(rnnkit.LSTM(2, 3))
    assert "native" not in repr(rnnkit.LSTM(2, 3, peephole=True)).split("->")[1]
    with pytest.raises(ValueError, match=r"backend='native'.*Backends that can: \['reference', 'bptt'"):
        rnnkit.LSTM(2, 3, peephole=True, backend="native")
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        rnnkit.GRU(2, 3, backend="fast")


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_inputs_have_clear_errors():
    m = rnnkit.LSTM(3, 4, num_layers=2)
    with pytest.raises(ValueError, match=r"input: expected a 3-D tensor .* got shape \(2, 3, 4, 3\)"):
        m(torch.randn(2, 3, 4, 3))
    with pytest.raises(ValueError, match="input: expected feature size input_size=3, got 5"):
        m(torch.randn(4, 2, 5))
    with pytest.raises(TypeError, match="input: dtype torch.float64 does not match"):
        m(torch.randn(4, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"state\[0\] \(h0\): expected shape \(2, 2, 4\).*got \(1, 2, 4\)"):
        m(torch.randn(4, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4)))
    with pytest.raises(TypeError, match=r"state: expected a tuple of 2 tensors \(h0, c0\) for cell .lstm."):
        m(torch.randn(4, 2, 3), torch.zeros(2, 2, 4))
    with pytest.raises(TypeError, match="state\\[1\\] \\(c0\\): dtype torch.float64"):
        m(torch.randn(4, 2, 3), (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"lengths: every value must be in \[1, 4\].*got \[5\] at positions \[1\]"):
        m(torch.randn(4, 2, 3), lengths=[4, 5])
    with pytest.raises(ValueError, match=r"lengths: expected shape \(2,\)"):
        m(torch.randn(4, 2, 3), lengths=[4, 3, 2])
    with pytest.raises(TypeError, match="lengths: expected an integer tensor"):
        m(torch.randn(4, 2, 3), lengths=torch.tensor([4.0, 3.0]))
    with pytest.raises(ValueError, match="lengths: on meta"):
        m(torch.randn(4, 2, 3), lengths=torch.tensor([4, 3], device="meta"))
    with pytest.raises(ValueError, match="drop_gates: unknown gate"):
        rnnkit.LSTM(3, 4, drop_gates=("cell",))
    with pytest.raises(TypeError, match="drop_gates: expected a collection"):
        rnnkit.LSTM(3, 4, drop_gates="forget")
    with pytest.raises(ValueError, match="coupled=True ties the forget gate"):
        rnnkit.LSTM(3, 4, coupled=True, drop_gates=("forget",))
    with pytest.raises(TypeError, match="unexpected keyword argument 'peepholes'"):
        rnnkit.LSTM(3, 4, peepholes=True)
    with pytest.raises(ValueError, match="hidden_size: expected an int >= 1, got 0"):
        rnnkit.GRU(3, 0)
    with pytest.raises(ValueError, match=r"zoneout: expected a probability in \[0, 1\), got 1.5"):
        rnnkit.GRU(3, 4, zoneout=1.5)
    with pytest.raises(ValueError, match="nonlinearity: expected 'tanh' or 'relu', got 'sigmoid'"):
        rnnkit.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="step\\(\\): a bidirectional layer"):
        rnnkit.GRU(3, 4, bidirectional=True).step(torch.randn(2, 3))
    with pytest.raises(ValueError, match="cell: expected one of"):
        rnnkit.build("lstmm", 3, 4)


def test_native_refuses_a_cell_it_cannot_run():
    with pytest.raises(ValueError, match="backend='native' cannot run"):
        rnnkit.GRU(3, 4, backend="native", zoneout=0.1)


def test_auto_avoids_native_for_varying_lengths_on_cpu():
    m = rnnkit.LSTM(3, 4)
    assert m.backend_for(torch.device("cpu")) == "native"
    assert m.backend_for(torch.device("cpu"), variable_lengths=True) == "cpu"
    x = torch.randn(5, 2, 3)
    # full lengths are the same as no lengths (and take the fused native path)
    torch.testing.assert_close(m(x, lengths=[5, 5])[0], m(x)[0])


def test_zoneout_and_recurrent_dropout_masks_have_their_rates():
    torch.manual_seed(0)
    layer = rnnkit.LSTM(4, 64, zoneout=0.3, recurrent_dropout=0.25).train()
    masks = layer._masks(200, 16, None, torch.empty(1, dtype=torch.float64))
    for keep in masks.keep:  # 1 = keep the previous state, with probability zoneout
        assert keep.dtype == torch.float64 and set(keep.unique().tolist()) == {0.0, 1.0}
        assert abs(keep.mean().item() - 0.3) < 0.01
    assert not torch.equal(*masks.keep)
    assert set(masks.hmask.unique().tolist()) == {0.0, 1 / 0.75}
    assert abs((masks.hmask > 0).double().mean().item() - 0.75) < 0.05
    eval_masks = layer.eval()._masks(5, 2, None, torch.empty(1))
    assert eval_masks.hmask is None and all(float(k.unique()) == pytest.approx(0.3) for k in eval_masks.keep)
