"""The cells added as declarations: sLSTM, MUT1-3 and an LSTM with chosen activations, computed by hand."""

import dataclasses
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import rnnkit
from rnnkit.cli.main import app


def sig(v):
    return 1 / (1 + math.exp(-v))


def _scalar_layer(name, backend, params, **kw):
    """A one-unit layer (I = H = 1) with the given parameters (lists, by torch.nn name without ``_l0``)."""
    m = rnnkit.build(name, 1, 1, backend=backend, dtype=torch.float64, **kw)
    with torch.no_grad():
        for k, v in params.items():
            getattr(m, k + "_l0").copy_(torch.tensor(v, dtype=torch.float64))
    return m


def _outputs(m, xs, state=None):
    out, final = m(torch.tensor(xs, dtype=torch.float64).view(-1, 1, 1), state)
    return out.flatten().tolist(), final


BACKENDS = ["reference", "bptt"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_slstm_by_hand(backend):
    # pre-activations (i, f, z, o) = W x with x = 1 and R = 0: 0.5, -0.3, 0.2, 0.1
    m = _scalar_layer("slstm", backend, {"weight_ih": [[0.5], [-0.3], [0.2], [0.1]], "weight_hh": [[0.0]] * 4,
                                         "bias_ih": [0.0] * 4, "bias_hh": [0.0] * 4})
    (h1, h2), (h, c, n, mm) = _outputs(m, [1.0, 1.0])
    # step 1 from zeros: m1 = max(-0.3 + 0, 0.5) = 0.5, i = e^0 = 1, f = e^(-0.3 - 0.5), c1 = tanh(0.2), n1 = 1
    assert h1 == pytest.approx(sig(0.1) * math.tanh(0.2), abs=1e-14)
    # step 2: m2 = max(-0.3 + 0.5, 0.5) = 0.5, i = 1, f = e^(-0.3 + 0.5 - 0.5) = e^-0.3
    f2 = math.exp(-0.3)
    c2, n2 = f2 * math.tanh(0.2) + math.tanh(0.2), f2 + 1
    assert h2 == pytest.approx(sig(0.1) * c2 / n2, abs=1e-14)
    assert [c.item(), n.item(), mm.item()] == pytest.approx([c2, n2, 0.5], abs=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slstm_output_does_not_depend_on_the_stabiliser(backend):
    """Against the unstabilised float64 sLSTM (c, n grow like exp of the summed gate pre-activations)."""
    torch.manual_seed(3)
    H, T, B = 4, 7, 3
    m = rnnkit.build("slstm", 3, H, backend=backend, dtype=torch.float64)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)  # large pre-activations: exp() without a stabiliser reaches e^(T * 3 ...)
    x = torch.randn(T, B, 3, dtype=torch.float64)
    out, _ = m(x)
    W, R, b = m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0 + m.bias_hh_l0
    h = c = n = torch.zeros(B, H, dtype=torch.float64)
    expected = []
    with torch.no_grad():
        for t in range(T):
            ai, af, az, ao = (x[t] @ W.T + h @ R.T + b).chunk(4, -1)
            c = torch.exp(af) * c + torch.exp(ai) * torch.tanh(az)
            n = torch.exp(af) * n + torch.exp(ai)
            h = torch.sigmoid(ao) * c / n
            expected.append(h)
    torch.testing.assert_close(out, torch.stack(expected), rtol=1e-10, atol=1e-12)


def _mut_params(name):
    if name == "mut1":  # W: (z, r); R: (r | h of r*h)
        return {"weight_ih": [[0.4], [-0.7]], "bias_ih": [0.1, 0.2], "weight_hh": [[0.9], [-1.1]],
                "bias_hh": [0.3, -0.05]}
    if name == "mut2":  # W: (z, h); R: (z, r | h of r*h)
        return {"weight_ih": [[0.4], [-0.7]], "bias_ih": [0.1, 0.2], "weight_hh": [[0.9], [-1.1], [0.6]],
                "bias_hh": [0.3, -0.05, 0.15]}
    # mut3: W: (z, r, h); R: (z of tanh h | r of h | h of r*h)
    return {"weight_ih": [[0.4], [-0.7], [0.8]], "bias_ih": [0.1, 0.2, -0.3], "weight_hh": [[0.9], [-1.1], [0.6]],
            "bias_hh": [0.3, -0.05, 0.15]}


def _mut_by_hand(name, x, h):
    p = _mut_params(name)
    W = [w[0] for w in p["weight_ih"]]
    bi, U, bh = p["bias_ih"], [u[0] for u in p["weight_hh"]], p["bias_hh"]
    if name == "mut1":
        z = sig(W[0] * x + bi[0])
        r = sig(W[1] * x + bi[1] + U[0] * h + bh[0])
        cand = math.tanh(U[1] * (r * h) + bh[1] + math.tanh(x))
    elif name == "mut2":
        z = sig(W[0] * x + bi[0] + U[0] * h + bh[0])
        r = sig(x + U[1] * h + bh[1])
        cand = math.tanh(U[2] * (r * h) + bh[2] + W[1] * x + bi[1])
    else:
        z = sig(W[0] * x + bi[0] + U[0] * math.tanh(h) + bh[0])
        r = sig(W[1] * x + bi[1] + U[1] * h + bh[1])
        cand = math.tanh(U[2] * (r * h) + bh[2] + W[2] * x + bi[2])
    return cand * z + h * (1 - z)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["mut1", "mut2", "mut3"])
def test_mut_by_hand(name, backend):
    m = _scalar_layer(name, backend, _mut_params(name))
    xs, h = [0.5, -1.2, 0.3], 0.2
    out, final = _outputs(m, xs, torch.tensor([[[h]]], dtype=torch.float64))
    for t, x in enumerate(xs):
        h = _mut_by_hand(name, x, h)
        assert out[t] == pytest.approx(h, abs=1e-14)
    assert final.item() == pytest.approx(h, abs=1e-14)


def test_mut1_and_mut2_need_input_size_equal_to_hidden_size():
    with pytest.raises(ValueError, match="input_size: cell 'mut1' uses the raw input x .* got 3"):
        rnnkit.build("mut1", 3, 4)
    with pytest.raises(ValueError, match="layer 1 input: cell 'mut2' .* hidden_size=4; got 8"):
        rnnkit.build("mut2", 4, 4, num_layers=2, bidirectional=True)
    rnnkit.build("mut3", 3, 4)  # MUT3 projects x everywhere


@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_with_chosen_activations_by_hand(backend):
    # gates hard_sigmoid (clamp(a/6 + 1/2, 0, 1)), candidate relu; pre-activations (i, f, g, o) at x = 1:
    m = _scalar_layer("lstm", backend, {"weight_ih": [[1.2], [-4.0], [0.7], [0.3]], "weight_hh": [[0.0]] * 4,
                                        "bias_ih": [0.0] * 4, "bias_hh": [0.0] * 4},
                      gate_activation="hard_sigmoid", candidate_activation="relu")
    (h1,), (h, c) = _outputs(m, [1.0], (torch.zeros(1, 1, 1, dtype=torch.float64),
                                        torch.full((1, 1, 1), 2.0, dtype=torch.float64)))
    i, f, g, o = 1.2 / 6 + 0.5, 0.0, 0.7, 0.3 / 6 + 0.5  # -4.0 saturates: f = 0, the old c = 2 is forgotten
    assert c.item() == pytest.approx(f * 2.0 + i * g, abs=1e-14)
    assert h1 == pytest.approx(o * math.tanh(i * g), abs=1e-14)
    assert m.cell.declaration.sigmoid_gates() == ("i", "f", "o")
    with pytest.raises(ValueError, match="gate_activation: expected one of"):
        rnnkit.LSTM(2, 3, gate_activation="softmax")


def test_new_cells_are_listed_and_refused_by_the_hand_written_backend():
    from rnnkit.kernels import LayerConfig, working_backends

    for name in ("slstm", "mut1", "mut2", "mut3", "lstm_hsig_relu"):
        cell = rnnkit.build(name, 4, 4).cell
        assert working_backends(cell, LayerConfig(), torch.device("cpu")) == ["reference", "bptt", "cpu"], name
    assert rnnkit.build("slstm", 4, 4).cell.state_names == ("h", "c", "n", "m")


def test_cells_lists_the_declared_cells():
    res = CliRunner().invoke(app, ["cells", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["slstm"]["states"] == ["h", "c", "n", "m"] and rows["slstm"]["backends_cpu"] == ["reference", "bptt",
                                                                                           "cpu"]
    assert rows["mut3"]["gates"] == ["z", "r"] and "cpu" in rows["lstm"]["backends_cpu"]
    assert {"mut1", "mut2", "lstm_hsig_relu"} <= set(rows)


def test_lstm_activations_from_a_task_config():
    """The LSTM's gate and candidate activations are model options of every task (TOML, --set)."""
    from rnnkit.tasks.options import RecurrentOptions

    @dataclasses.dataclass(frozen=True)
    class Opts(RecurrentOptions):
        hidden_size: int = 4
        num_layers: int = 1

    stack = Opts(cell="lstm", gate_activation="hard_sigmoid", candidate_activation="relu").build_stack(3)
    assert stack.cell.declaration == rnnkit.build("lstm_hsig_relu", 3, 4).cell.declaration
    with pytest.raises(ValueError, match=r"model.gate_activation: not an option of cell 'gru'"):
        Opts(cell="gru", gate_activation="hard_sigmoid").check_cell()
