"""The generated CPU loops (:mod:`rnnkit.kernels.cpu_generated`): their source, its cache and their plan (the
numbers are checked against ``reference`` in ``test_kernels_cpu.py``)."""

from __future__ import annotations

import pytest

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
    assert cho.levels == 3 and cho.units_splittable and not cho.paired
    assert [cho.pin(p) for p in cho.projections()] == [False, True]
    assert not cpu_generated.plan(rnnkit.cells.make_cell("lstm", 4, layer_norm=True).declaration).units_splittable
