"""The generated CPU loops (:mod:`rnnkit.kernels.cpu_generated`): their source, its cache, and equality with the
hand-written loops they replace (``cpu_hand``, slow: each declaration compiles for seconds)."""

from __future__ import annotations

import pytest
import torch
from cellcases import input_size, random_state

import rnnkit
from rnnkit.cells import declare
from rnnkit.kernels import cpu_generated, source_cache


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RNNKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "gen_cache"))
    cpu_generated.module.cache_clear()


def test_source_is_written_once_per_declaration_and_dtype():
    d = declare("toy", states="h m", equations="xa = W(x); ha = R(h); m' = max(m, xa); h' = tanh(ha + m')")
    text = cpu_generated.source(d, "float32")
    compile(text, "generated", "exec")  # valid Python
    assert "def forward(" in text and "def backward(" in text and "F = np.float32" in text
    assert cpu_generated.source(d, "float64") != text
    assert cpu_generated.module(d, "float32") is cpu_generated.module(d, "float32")
    files = list(source_cache.cache_dir().glob("cpu_*.py"))
    assert len(files) == 1 and files[0].read_text().endswith(text)


def test_plan_levels_and_what_is_kept():
    """The LSTM: one level after its GEMM, the gates and tanh(c') kept; the Cho GRU: two levels (it projects
    r * h), r * h kept as the second projection's input; units split only for single-GEMM cells without
    layer norm."""
    lstm = cpu_generated.plan(rnnkit.cells.make_cell("lstm", 4).declaration)
    assert lstm.levels == 2 and lstm.units_splittable and lstm.paired
    names = {i: n for n, i in rnnkit.cells.make_cell("lstm", 4).declaration.symbols}
    assert {names[i] for i in lstm.saved if i in names} == {"i", "f", "g", "o"}
    cho = cpu_generated.plan(rnnkit.cells.make_cell("gru", 4, reset_after=False).declaration)
    assert cho.levels == 3 and not cho.units_splittable and not cho.paired
    assert [cho.pin(p) for p in cho.projections()] == [False, True]
    assert not cpu_generated.plan(rnnkit.cells.make_cell("lstm", 4, layer_norm=True).declaration).units_splittable


def _compare(name: str, backend_a: str, backend_b: str, *, layers: int = 2) -> None:
    torch.manual_seed(0)
    H = 5
    I = input_size(name, 3, H)
    if I == H:
        layers = 1  # a raw-input cell's second bidirectional layer would take 2H features
    a = rnnkit.build(name, I, H, num_layers=layers, bidirectional=True, backend=backend_a, dtype=torch.float64)
    b = rnnkit.build(name, I, H, num_layers=layers, bidirectional=True, backend=backend_b, dtype=torch.float64)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.1 * torch.randn_like(p))
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, I, dtype=torch.float64, requires_grad=True)
    state = random_state(name, layers * 2, 3, H)
    results = []
    for m in (a, b):
        m.train()
        torch.manual_seed(5)  # the same dropout / zoneout masks
        out, final = m(x, state, lengths=[4, 2, 3])
        final = final if isinstance(final, tuple) else (final,)
        loss = (out * out.cos()).sum() + sum(f.sin().sum() for f in final)
        leaves = [x, *(state if isinstance(state, tuple) else (state,)), *m.parameters()]
        results.append([out, *final, *torch.autograd.grad(loss, leaves)])
    for u, v in zip(*results):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lstm_peephole", "lstm_ln", "lstm_zoneout", "gru_cho_ln", "gru_rdrop", "rnn_relu"])
def test_generated_equals_hand_written(name):
    _compare(name, "cpu_hand", "cpu")
