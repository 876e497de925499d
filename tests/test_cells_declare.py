"""The cell declaration language: definition-time errors, and user cells through the derived backward."""

import pytest
import torch
from cellcases import USER

import rnnkit
from rnnkit.cells import DeclarationError, declare
from rnnkit.errors import UserError

GOOD = "xa, xb = W(x); ha, hb = R(h); a = sigmoid(xa + ha); h' = a * tanh(xb + hb) + (1 - a) * h"


def test_a_valid_declaration_compiles():
    d = declare("toy", states="h", equations=GOOD)
    assert (d.input_gates, d.recurrent_gates, d.rec_parts, d.states, d.gates) == (2, 2, (2,), ("h",), ("a",))
    assert d.sigmoid_gates() == ("a",)
    assert {"sigmoid", "tanh", "add", "mul", "sub"} <= d.operations()


@pytest.mark.parametrize("equations,states,pattern", [
    (GOOD.replace("tanh", "tanhh"), "h", r"equation 4 `h' = a \* tanhh\(xb \+ hb\) .*unknown operation 'tanhh'"),
    (GOOD, "h c", r"state 'c' is never updated"),
    ("xa, xb = W(x); ha, hb = R(h); h' = tanh(xa + ha)", "h", r"equation 1 `xa, xb = W\(x\)`: unused gate block 'xb'"),
    ("xa = W(x); ha = R(h); h' = 0.5 + 1", "h", r"equation 3 `h' = 0.5 \+ 1`: shape mismatch: state 'h'"),
    ("xa = W(x); ha = R(2.0); h' = tanh(xa + ha)", "h", r"equation 2 .*shape mismatch: R\(...\) of a constant"),
    ("xa = W(x); ha, hb = tanh(xa); h' = ha", "h", r"equation 2 .*2 targets \['ha', 'hb'\]"),
    ("xa = W(x); ha = R(h); a = b + ha; b = a * xa; h' = tanh(b)", "h",
     r"equation 4 `b = a \* xa`: cycle: b -> a -> b"),
    ("xa = W(x); ha = R(h); a = tanh(xa + ha); a = ha; h' = a", "h", r"equation 4 .*'a' is defined twice"),
    ("xa = W(x); ha = R(h); h' = tanh(xa + hq)", "h", r"equation 3 .*unknown symbol 'hq'"),
    ("xa = W(x); h' = tanh(xa + R(h))", "h", r"equation 2 .*R\(...\) must be the whole right side"),
    ("xa = W(x); ha = R(h); h' = tanh(xa + ha) ** 2", "h", r"equation 3 .*unsupported syntax Pow"),
    ("ha = R(h); h' = tanh(ha)", "h", r"no input projection"),
])
def test_bad_declarations_are_rejected_naming_equation_and_symbol(equations, states, pattern):
    with pytest.raises(DeclarationError, match=pattern) as info:
        declare("toy", states=states, equations=equations)
    assert isinstance(info.value, UserError) and "cell 'toy'" in str(info.value)


def test_unused_parameter_block_and_bad_layer_norm_argument():
    with pytest.raises(DeclarationError, match=r"params\['p'\]: block 'p2' is never used"):
        declare("toy", states="h", equations="xa = W(x); ha = R(h); h' = tanh(xa + ha * p1)", params={"p": "p1 p2"})
    with pytest.raises(DeclarationError, match=r"layer_norm: 'xa' must be a per-unit parameter block"):
        declare("toy", states="h", equations="xa = W(x); ha = R(h); h' = layer_norm(ha, xa)")


def _user_layer(backend, **kw):
    torch.manual_seed(0)
    return rnnkit.Recurrent(USER, 3, 3, backend=backend, dtype=torch.float64, **kw)


def test_user_cell_bptt_equals_reference_and_gradchecks():
    ref, fast = _user_layer("reference", bidirectional=True), _user_layer("bptt", bidirectional=True)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    outs = []
    for m in (ref, fast):
        out, (h, mm) = m(x, lengths=[5, 3])
        loss = out.sin().sum() + h.cos().sum() + mm.sum()
        outs.append((out, h, mm, *torch.autograd.grad(loss, [x, *m.parameters()])))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    def f(x, *params):
        names = [n for n, _ in fast.named_parameters()]
        out, (h, mm) = torch.func.functional_call(fast, dict(zip(names, params)), (x,))
        return out.sin().sum() + h.cos().sum() + mm.sum()

    inputs = (x.detach().clone().requires_grad_(), *(p.detach().clone().requires_grad_() for p in fast.parameters()))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_user_cell_refuses_an_input_size_it_cannot_take():
    with pytest.raises(ValueError, match="uses the raw input x .* must equal hidden_size=3; got 4"):
        rnnkit.Recurrent(USER, 4, 3)


def test_user_cell_step_state_and_parameters():
    m = _user_layer("auto", num_layers=2)
    assert sorted(n for n, _ in m.named_parameters() if n.endswith("_l0")) == [
        "bias_hh_l0", "bias_ih_l0", "g_l0", "p_l0", "weight_hh_l0", "weight_ih_l0"]
    assert m.weight_hh_l0.shape == (9, 3) and m.p_l0.shape == (6,) and torch.equal(m.g_l0, torch.ones(3))
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    state = (torch.randn(2, 2, 3, dtype=torch.float64), torch.randn(2, 2, 3, dtype=torch.float64))
    full, final = m(x.transpose(0, 1), state)
    s, ys = state, []
    for t in range(4):
        y, s = m.step(x[:, t], s)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys), full, rtol=1e-10, atol=1e-12)
    for a, b in zip(final, s):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match=r"state: expected a tuple of 2 tensors \(h0, m0\) for cell 'everything'"):
        m(x.transpose(0, 1), state[0])


# ---- dispatch by capability ----------------------------------------------------------------------
def test_hand_written_backend_refuses_a_new_cell_and_auto_picks_the_generated_one():
    from rnnkit import kernels

    m = _user_layer("auto")
    assert m.backend_for(torch.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match=r"backend='native' cannot run .*written by hand.*'everything'.*"
                                         r"Backends that can: \['reference', 'bptt', 'cpu'\]"):
        _user_layer("native")
    cell = m.cell
    cfg = kernels.LayerConfig()
    assert kernels.working_backends(cell, cfg, torch.device("cpu")) == ["reference", "bptt", "cpu"]
    # a user cell with exactly the LSTM's declaration runs on torch's kernels, written by hand for the LSTM
    same = declare("my_lstm", states="h c", equations=rnnkit.cells.lstm.lstm_declaration().equations)
    assert {"native", "cpu"} <= set(kernels.working_backends(rnnkit.cells.make_cell(same, 4), cfg,
                                                             torch.device("cpu")))
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    outs = [rnnkit.Recurrent(same, 4, 5, backend=b, dtype=torch.float64) for b in ("reference", "cpu", "native")]
    for m in outs[1:]:
        m.load_state_dict(outs[0].state_dict())
    ref, *others = [m(x)[0] for m in outs]
    for o in others:
        torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-12)


def test_a_backend_without_an_operation_refuses_the_cell_that_uses_it(monkeypatch):
    from rnnkit import kernels
    from rnnkit.cells.declare import OPERATIONS

    ops = frozenset({"add", "sub", "mul", "div", "neg", *OPERATIONS} - {"softplus"})
    lacking = kernels.Backend("nosoftplus", "bptt without softplus", lambda *a: None, kernels.bptt.run,
                              capability=kernels.Capability(operations=ops, max_states=1))
    monkeypatch.setitem(kernels.BACKENDS, "nosoftplus", lacking)
    with pytest.raises(ValueError, match=r"backend='nosoftplus' cannot run .*it has no softplus \(cell 'everything' "
                                         r"uses them\)\. Backends that can: \['reference', 'bptt', 'cpu'\]"):
        _user_layer("nosoftplus")
    # the GRU uses no softplus and has one state: accepted, and it runs
    gru = rnnkit.GRU(3, 4, backend="nosoftplus")
    out, h = gru(torch.randn(2, 1, 3))
    assert out.shape == (2, 1, 4)
    lstm_reason = lacking.refuses(rnnkit.LSTM(3, 4).cell, kernels.LayerConfig(), torch.device("cpu"))
    assert lstm_reason == "it carries at most 1 states; cell 'lstm' has 2"
