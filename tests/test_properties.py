"""Property-based tests (hypothesis): padding never leaks, readers fail only with UserError, damaged
checkpoints are skipped.

Each property draws a few dozen random cases; the whole file runs in seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnnkit
from rnnkit.cells import REGISTRY

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)

# ---------------------------------------------------------------------------------------------- layers

# every backend that runs on the CPU, with the cells it supports (native: the plain cells only)
LAYER_CELLS = {be: ("lstm", "gru", "rnn", "lstm_peephole", "gru_ln") for be in ("auto", "cpu", "bptt", "reference")}
LAYER_CELLS["native"] = ("lstm", "gru", "rnn")
JUNK = st.one_of(st.just(math.nan), st.just(math.inf), st.just(-math.inf),
                 st.floats(-1e30, 1e30, allow_nan=False, allow_infinity=False))


@st.composite
def padded_batches(draw):
    T = draw(st.integers(1, 6))
    B = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    junk = draw(st.lists(JUNK, min_size=T * B * 3, max_size=T * B * 3))
    return T, B, lengths, torch.tensor(junk, dtype=torch.float64).view(T, B, 3)


@pytest.mark.parametrize("backend", sorted(LAYER_CELLS))
@settings(FAST, max_examples=12)
@given(data=st.data(), batch=padded_batches(), bidirectional=st.booleans(), layers=st.integers(1, 2))
def test_padding_never_reaches_valid_steps(backend, data, batch, bidirectional, layers):
    """Whatever the padding holds (nan, inf, huge numbers), valid outputs, final states and gradients are
    those of zero padding, and every gradient is finite."""
    T, B, lengths, junk = batch
    cell = data.draw(st.sampled_from(LAYER_CELLS[backend]), label="cell")
    torch.manual_seed(0)
    layer = rnnkit.build(cell, 3, 4, num_layers=layers, bidirectional=bidirectional, backend=backend).double()
    valid = (torch.arange(T).unsqueeze(1) < torch.tensor(lengths).unsqueeze(0)).unsqueeze(-1)  # (T, B, 1)
    clean = torch.randn(T, B, 3, dtype=torch.float64)
    results = []
    for pad in (junk, torch.zeros_like(junk)):
        x = torch.where(valid, clean, pad).requires_grad_(True)
        layer.zero_grad()
        out, final = layer(x, lengths=lengths)
        final = final if isinstance(final, tuple) else (final,)
        (out.sum() + sum(s.square().sum() for s in final)).backward()
        results.append((out, final, x.grad, [p.grad.clone() for p in layer.parameters()]))
    (out_j, fin_j, gx_j, gp_j), (out_z, fin_z, gx_z, gp_z) = results
    torch.testing.assert_close(out_j * valid, out_z * valid, rtol=0, atol=0)
    assert not out_j.masked_select(~valid).any()  # outputs past each length are zero
    for a, b in zip(fin_j, fin_z):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.isfinite(gx_j).all()
    assert not gx_j.masked_select(~valid).any()  # padding gets no gradient
    for a, b in zip(gp_j, gp_z):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_layer_cases_cover_the_registry_families():
    assert {REGISTRY[c].family for cells in LAYER_CELLS.values() for c in cells} == \
        {REGISTRY[c].family for c in REGISTRY}
