"""The derived step / forward / backward of every registered cell equal the hand-written ones they replace."""

import pytest
import torch
from legacy_cells.gru import GRUCell
from legacy_cells.lstm import LSTMCell
from legacy_cells.rnn import ElmanCell

from rnnkit.cells import REGISTRY, make_cell
from rnnkit.kernels.bptt import _RecBackward, _RecForward

LEGACY = {"rnn": ElmanCell, "lstm": LSTMCell, "gru": GRUCell}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_derived_equals_hand_written(name):
    spec = REGISTRY[name]
    torch.manual_seed(0)
    H, B, I = 5, 3, 4
    new = make_cell(spec.family, H, **spec.cell_options)
    old = LEGACY[spec.family](H, **spec.cell_options)
    G = new.gates
    dt = torch.float64
    w = {"weight_ih": torch.randn(G * H, I, dtype=dt), "weight_hh": torch.randn(G * H, H, dtype=dt),
         "bias_ih": torch.randn(G * H, dtype=dt), "bias_hh": torch.randn(G * H, dtype=dt)}
    assert new.extra_shapes() == old.extra_shapes()
    for n, shape in new.extra_shapes().items():
        w[n] = torch.randn(shape, dtype=dt)
    x = torch.randn(B, I, dtype=dt)
    state = tuple(torch.randn(B, H, dtype=dt) for _ in range(new.state_size))
    hmask = torch.rand(B, H, dtype=dt) + 0.5
    for a, b in zip(new.step(x, state, w, hmask), old.step(x, state, w, hmask)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    xg = new.project_input(x, w)
    torch.testing.assert_close(xg, old.project_input(x, w), rtol=1e-12, atol=1e-12)
    results = []
    for cell in (new, old):
        rec = _RecForward(cell, w["weight_hh"], w["bias_hh"] if cell.rec_bias else None, hmask)
        st, saved = cell.forward(xg, state, rec, w)
        dstate = tuple(torch.full_like(s, 0.3) * (k + 1) for k, s in enumerate(st))
        rt = _RecBackward(rec)
        dxg, dprev, grads = cell.backward(dstate, saved, rt, w)
        results.append((st, dxg, dprev, grads, rec.inputs, rt.douts))
    (s1, dx1, dp1, g1, in1, do1), (s2, dx2, dp2, g2, in2, do2) = results
    for a, b in [*zip(s1, s2), (dx1, dx2), *zip(dp1, dp2)]:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert sorted(g1) == sorted(g2)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-12, atol=1e-12)
    for a, b in zip([t for p in in1 + do1 for t in p], [t for p in in2 + do2 for t in p]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
