"""``backend="cpu_gen"``: numba loops generated from a declaration, against the oracle and the hand-written loops.

Compiling the generated loops takes minutes on a loaded 2-core machine (seconds once numba's cache holds
them), so the comparisons are marked slow; the source generation and its cache are tested by default.
"""

from __future__ import annotations

import pytest
import torch
from cellcases import input_size, random_state

import rnnkit
from rnnkit.cells import declare
from rnnkit.kernels import cpu_generated


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # one cache for the module: numba compiles each generated file once
    monkeypatch.setenv("RNNKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "gen_cache"))


def test_source_is_written_once_per_declaration_and_names_every_state():
    d = declare("toy", states="h m", equations="xa = W(x); ha = R(h); m' = max(m, xa); h' = tanh(ha + m')")
    text = cpu_generated.source(d)
    compile(text, "generated", "exec")  # valid Python
    assert "def forward(" in text and "def backward(" in text and "np.maximum(" in text and "ST1[t + 1]" in text
    assert cpu_generated._module(d) is cpu_generated._module(d)
    files = list((cpu_generated._cache_dir()).glob("cell_*.py"))
    assert any(f.read_text().endswith(text) for f in files)


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
    _compare(name, "cpu", "cpu_gen")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["slstm", "mut1", "mut3", "lstm_hsig_relu"])
def test_generated_equals_reference_for_new_cells(name):
    _compare(name, "reference", "cpu_gen")
