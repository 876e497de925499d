"""The fused CPU backend (``backend="cpu"``, loops generated from the declaration) against the ``reference``
oracle, for every registered cell (a representative set by default, all of them in the slow tests).

Outputs, final states and every gradient (input, initial states, all parameters) must agree within:

| dtype   | rtol  | atol  | why                                                                 |
|---------|-------|-------|---------------------------------------------------------------------|
| float64 | 1e-9  | 1e-10 | same math, different summation order (observed <= 1e-12)            |
| float32 | 2e-4  | 1e-4  | float32 tanh/sigmoid by a rational approximation (|err| < 3e-7) and |
|         |       |       | different summation order; layer-norm cells observed <= 2e-5        |

Masks (recurrent dropout, zoneout) are drawn by the layer: seeding before each run gives both
backends the same numbers.
"""

from __future__ import annotations

import sys

import pytest
import torch
from cellcases import CPU_CASES, input_size

from rnnkit import kernels
from rnnkit.cells import REGISTRY, make_cell
from rnnkit.kernels import cpu_generated
from rnnkit.layers import build

TOL = {torch.float64: (1e-9, 1e-10), torch.float32: (2e-4, 1e-4)}


def _run(name: str, backend: str, dtype: torch.dtype, *, T: int, B: int, I: int, H: int, layers: int = 1,
         bidirectional: bool = False, batch_first: bool = False, lengths: list[int] | None = None,
         init_state: bool = False, train: bool = True, loss_on: str = "both"):
    torch.manual_seed(0)
    layer = build(name, I, H, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                  backend=backend, dtype=dtype)
    layer.train(train)
    # perturb the parameters so that layer-norm gains, peepholes and biases all matter
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, dtype=dtype, generator=gen).requires_grad_()
    LD = layers * (2 if bidirectional else 1)
    state = None
    leaves = [x]
    if init_state:
        # in [0.5, 1.5]: the sLSTM divides by its normaliser state
        parts = [(torch.rand(LD, B, H, dtype=dtype, generator=gen) + 0.5).requires_grad_()
                 for _ in range(layer.cell.state_size)]
        leaves += parts
        state = tuple(parts) if len(parts) > 1 else parts[0]
    torch.manual_seed(2)  # the masks
    out, final = layer(x, state, lengths=lengths)
    finals = final if isinstance(final, tuple) else (final,)
    w = torch.randn(out.shape, dtype=dtype, generator=gen)
    loss = torch.zeros((), dtype=dtype)
    if loss_on in ("both", "out"):
        loss = loss + (out * w).sum()
    if loss_on in ("both", "state"):
        loss = loss + sum((f * f).sum() for f in finals)
    loss.backward()
    grads = {f"input{i}": leaf.grad for i, leaf in enumerate(leaves)}
    grads.update({n: p.grad for n, p in layer.named_parameters()})
    return out.detach(), [f.detach() for f in finals], grads


def _assert_same(ref, got, dtype):
    rtol, atol = TOL[dtype]
    (o1, f1, g1), (o2, f2, g2) = ref, got
    torch.testing.assert_close(o2, o1, rtol=rtol, atol=atol, msg=lambda m: f"output: {m}")
    for k, (a, b) in enumerate(zip(f1, f2)):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m, k=k: f"final state {k}: {m}")
    assert g1.keys() == g2.keys()
    for name, a in g1.items():
        b = g2[name]
        assert a is not None and b is not None, f"missing gradient for {name}"
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m, name=name: f"grad {name}: {m}")


CASES = [pytest.param(n, marks=() if n in CPU_CASES else pytest.mark.slow) for n in REGISTRY]


@pytest.mark.parametrize("dtype", [torch.float64, pytest.param(torch.float32, marks=pytest.mark.slow)],
                         ids=["f64", "f32"])
@pytest.mark.parametrize("name", CASES)
def test_matches_reference_full_config(name, dtype):
    """2 layers, bidirectional, odd sizes, variable lengths, given initial states, train mode."""
    I = input_size(name, 5, 7)
    kw = dict(T=5, B=3, I=I, H=7, layers=1 if I == 7 else 2, bidirectional=True, lengths=[5, 2, 4],
              init_state=True, train=True)
    _assert_same(_run(name, "reference", dtype, **kw), _run(name, "cpu", dtype, **kw), dtype)


def _force_split(monkeypatch, threads: int, units: bool, team: bool) -> list[tuple[bool, int]]:
    """Make the cpu backend split even tiny calls over ``threads``: by units or by rows, in torch's OpenMP
    team or (``team=False``) on threads of its own. Returns the (units, parts) of every launch, as made."""
    from rnnkit.kernels import cpu

    if team and cpu._team() is None:
        pytest.skip("torch does not run on a libgomp of its own here")
    monkeypatch.setenv("RNNKIT_CPU_THREADS", str(threads))
    monkeypatch.setattr(cpu, "MIN_ROWS", 1)
    monkeypatch.setattr(cpu, "MIN_UNITS", 1)
    monkeypatch.setattr(cpu, "MIN_SPLIT_MACS", 0)
    monkeypatch.setattr(cpu, "MIN_TEAM_MACS", 0)
    monkeypatch.setattr(cpu, "UNITS_BELOW_ROWS", 10**6 if units else 0)
    monkeypatch.setattr(cpu, "UNITS_MACS_PER_LEVEL", 0)
    if not team:
        monkeypatch.setattr(cpu, "_team", lambda: None)
    launched = []
    launch = cpu._launch

    def spy(fn, A, *args):
        launched.append((A.units, len(A.parts)))
        launch(fn, A, *args)

    monkeypatch.setattr(cpu, "_launch", spy)
    return launched


SPLITS = {"units": dict(units=True, team=True), "rows-team": dict(units=False, team=True),
          "rows-pool": dict(units=False, team=False)}


@pytest.mark.parametrize("how", list(SPLITS))
@pytest.mark.parametrize("name", CASES)
def test_matches_reference_split_over_threads(name, how, monkeypatch):
    """Three threads, with uneven parts: units (1, 2, 2 of H = 5 each; layer norm and the reset-before GRU
    fall back to rows) or rows (1, 2, 2 of B = 5), in torch's team or on threads of our own."""
    from rnnkit.kernels import cpu

    launched = _force_split(monkeypatch, 3, **SPLITS[how])
    parts, units = cpu.split(4, 5, 5, 20, units_ok=True)
    if how == "units":
        assert units and parts == [(0, 5, 0, 2), (0, 5, 2, 3), (0, 5, 3, 5)]
    else:
        assert not units and parts == [(0, 2, 0, 5), (2, 3, 0, 5), (3, 5, 0, 5)]
    I = input_size(name, 3, 5)
    kw = dict(T=4, B=5, I=I, H=5, layers=1 if I == 5 else 2, bidirectional=True, lengths=[4, 1, 3, 4, 2],
              init_state=True, train=True)
    dtype = torch.float64
    _assert_same(_run(name, "reference", dtype, **kw), _run(name, "cpu", dtype, **kw), dtype)
    spec = REGISTRY[name]
    by_units = how == "units" and cpu_generated.plan(make_cell(spec.family, 5, **spec.cell_options).declaration
                                                     ).units_splittable
    assert launched and all(got == (by_units, 3) for got in launched)


@pytest.mark.parametrize("name", ["lstm_peephole", "gru_zoneout"])
def test_unit_split_falls_back_to_one_thread_when_the_team_is_smaller(name, monkeypatch):
    """If torch's team comes out smaller than the unit split (e.g. nested in another parallel region), the
    call runs whole on one thread instead of deadlocking at the per-step barrier."""
    from rnnkit.kernels import cpu

    launched = _force_split(monkeypatch, 2, units=True, team=True)
    team = cpu._team()
    monkeypatch.setattr(team.lib, "GOMP_parallel", lambda body, key, n, flags: body(key), raising=False)
    monkeypatch.setattr(team.lib, "omp_get_num_threads", lambda: 1, raising=False)
    monkeypatch.setattr(team.lib, "omp_get_thread_num", lambda: 0, raising=False)
    kw = dict(T=3, B=2, I=3, H=4, init_state=True, train=True)
    dtype = torch.float64
    _assert_same(_run(name, "reference", dtype, **kw), _run(name, "cpu", dtype, **kw), dtype)
    assert launched[:2] == [(True, 2), (False, 1)]  # planned on two threads, then run whole


@pytest.mark.parametrize("blas", ["mkl", "openblas"])
@pytest.mark.parametrize("name", ["lstm_peephole_ln", "gru_cho_ln", "gru_zoneout", "lstm_rdrop", "slstm"])
def test_float32_matches_reference_with_each_blas(name, blas, monkeypatch):
    """float32 per-step GEMM through MKL's packed weights and through numba's OpenBLAS, split over two
    threads (units, or rows for layer norm and the reset-before GRU)."""
    from rnnkit.kernels import cpu

    if blas == "mkl" and cpu._torch_mkl() is None:
        pytest.skip("this torch does not export MKL's packed SGEMM")
    monkeypatch.setenv("RNNKIT_CPU_BLAS", blas)
    _force_split(monkeypatch, 2, units=True, team=cpu._team() is not None)
    assert cpu.blas(torch.float32) == blas
    kw = dict(T=6, B=5, I=4, H=9, layers=2, bidirectional=True, lengths=[6, 2, 5, 6, 3], init_state=True,
              train=True)
    dtype = torch.float32
    _assert_same(_run(name, "reference", dtype, **kw), _run(name, "cpu", dtype, **kw), dtype)


def test_blas_setting_errors(monkeypatch):
    from rnnkit.kernels import cpu

    monkeypatch.setenv("RNNKIT_CPU_BLAS", "fast")
    with pytest.raises(ValueError, match="RNNKIT_CPU_BLAS='fast': expected auto, mkl or openblas"):
        cpu.blas(torch.float32)
    monkeypatch.setenv("RNNKIT_CPU_BLAS", "mkl")
    with pytest.raises(ValueError, match="RNNKIT_CPU_BLAS='mkl' is not available"):
        cpu.blas(torch.float64)
    monkeypatch.setenv("RNNKIT_CPU_BLAS", "auto")
    assert cpu.blas(torch.float64) == "openblas"


def test_split_and_thread_setting(monkeypatch):
    from rnnkit.kernels import cpu

    monkeypatch.setenv("RNNKIT_CPU_THREADS", "2")
    assert cpu.split(1, 8, 8, 32, True) == ([(0, 8, 0, 8)], False)  # too little work
    assert cpu.split(1000, 7, 200, 800, True) == ([(0, 7, 0, 200)], False)  # B < 2 MIN_ROWS, H < 2 MIN_UNITS
    assert cpu.split(1000, 1, 1024, 4096, True) == ([(0, 1, 0, 1024)], False)  # one row: one thread
    if cpu._team() is not None:
        assert cpu.split(100, 8, 256, 1024, True) == ([(0, 8, 0, 128), (0, 8, 128, 256)], True)
        assert cpu.split(100, 8, 400, 1600, True) == ([(0, 8, 0, 192), (0, 8, 192, 400)], True)  # 64-byte lines
        assert cpu.split(100, 8, 256, 1024, False) == ([(0, 4, 0, 256), (4, 8, 0, 256)], False)  # layer norm
        assert cpu.split(100, 8, 128, 512, True) == ([(0, 4, 0, 128), (4, 8, 0, 128)], False)  # H < 2 MIN_UNITS
        assert cpu.split(100, 16, 256, 1024, True) == ([(0, 8, 0, 256), (8, 16, 0, 256)], False)
    monkeypatch.setattr(cpu, "_team", lambda: None)  # threads of our own: rows, and only for big calls
    assert cpu.split(100, 64, 512, 2048, True) == ([(0, 32, 0, 512), (32, 64, 0, 512)], False)
    assert cpu.split(100, 8, 256, 1024, True) == ([(0, 8, 0, 256)], False)
    monkeypatch.delenv("RNNKIT_CPU_THREADS")
    assert cpu.threads() == torch.get_num_threads()
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("RNNKIT_CPU_THREADS", bad)
        with pytest.raises(ValueError, match=f"RNNKIT_CPU_THREADS='{bad}'.*>= 1"):
            cpu.threads()


EDGE_CELLS = ["rnn_ln", "lstm_peephole_ln", "lstm_zoneout", "gru_cho_ln"]
EDGE_CASES = {
    "T1_B1": dict(T=1, B=1, I=3, H=5),
    "batch_first_eval": dict(T=4, B=2, I=3, H=9, batch_first=True, train=False, init_state=True),
    "loss_on_output_only": dict(T=3, B=2, I=4, H=3, loss_on="out"),
    "loss_on_state_only": dict(T=3, B=2, I=4, H=3, loss_on="state", lengths=[1, 3]),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("name", EDGE_CELLS)
def test_matches_reference_edge_cases(name, case, dtype):
    kw = EDGE_CASES[case]
    _assert_same(_run(name, "reference", dtype, **kw), _run(name, "cpu", dtype, **kw), dtype)


@pytest.mark.parametrize("name", ["lstm_peephole", "gru_cho", "rnn_relu"])
def test_step_matches_reference(name):
    dtype = torch.float64
    outs = []
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        layer = build(name, 4, 6, num_layers=2, backend=backend, dtype=dtype).eval()
        x = torch.randn(3, 2, 4, dtype=dtype)
        state, ys = None, []
        for t in range(3):
            y, state = layer.step(x[t], state)
            ys.append(y)
        outs.append(torch.stack(ys))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["lstm_zoneout", "mut1", "lstm_peephole", "lstm_ln"])
def test_inference_path_matches_reference(name):
    """Without autograd the loop runs without the autograd Function, and one-step calls reuse their
    arguments and buffers: masks (lengths, zoneout in eval mode) apply, every call returns tensors of its
    own (a state kept from one step is not changed by the next), and an in-place update or a replacement
    of the weights is seen by the next step."""
    dtype = torch.float64
    layers = {}
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        layers[backend] = build(name, 6, 6, num_layers=2, backend=backend, dtype=dtype).eval()
    x = torch.randn(5, 3, 6, dtype=dtype)
    with torch.no_grad():
        ref, cpu = (layers[b](x, lengths=[5, 2, 4]) for b in ("reference", "cpu"))
        torch.testing.assert_close(cpu[0], ref[0], rtol=1e-9, atol=1e-10)
        for a, b in zip(cpu[1], ref[1]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        ys = {b: [] for b in layers}
        kept = {}
        for backend, layer in layers.items():
            state = None
            for t in range(5):
                if t == 3:  # as an optimizer step would
                    layer.weight_hh_l0.mul_(0.5)
                if t == 4:  # a new tensor (as load_state_dict(assign=True) or a user would)
                    layer.weight_hh_l1 = torch.nn.Parameter(layer.weight_hh_l1 * 1.5)
                y, state = layer.step(x[t], state)
                ys[backend].append(y)
                if t == 1:
                    kept[backend] = [s.clone() for s in state] if isinstance(state, tuple) else [state.clone()]
                    held = state if isinstance(state, tuple) else (state,)
            for a, b in zip(held, kept[backend]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert len({y.data_ptr() for y in ys["cpu"]}) == 5
        torch.testing.assert_close(torch.stack(ys["cpu"]), torch.stack(ys["reference"]), rtol=1e-9, atol=1e-10)


def test_auto_on_cpu():
    """auto: native for the plain LSTM, cpu for every other cell (also the plain RNN and GRU, which it runs
    faster than torch); one step at a time the other way round: native for the plain RNN and GRU, cpu for
    the rest; for a dtype cpu cannot run, native where it applies, else bptt."""
    cpu = torch.device("cpu")
    for name, spec in REGISTRY.items():
        cell = make_cell(spec.family, 8, **spec.cell_options)
        cfg = kernels.LayerConfig(**spec.layer_options)
        native = kernels.BACKENDS["native"].unsupported(cell, cfg, cpu) is None
        expected = "native" if native and spec.family == "lstm" else "cpu"
        assert kernels.resolve("auto", cell, cfg, cpu) == expected, name
        step = "native" if native and spec.family != "lstm" else "cpu"
        assert kernels.resolve("auto", cell, cfg, cpu, streaming=True) == step, name
        assert kernels.resolve("auto", cell, cfg, cpu, dtype=torch.float64) == kernels.resolve("auto", cell, cfg, cpu)
        assert kernels.resolve("auto", cell, cfg, cpu, dtype=torch.bfloat16) == ("native" if native else "bptt")
    layer = build("gru", 3, 4)  # auto
    assert layer.backend_for(cpu) == "cpu" and layer.backend_for(cpu, dtype=torch.float16) == "native"
    assert layer.backend_for(cpu, streaming=True) == "native"
    out, _ = layer.to(torch.bfloat16)(torch.randn(2, 1, 3, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_rejects_other_dtypes_and_devices():
    layer = build("lstm_peephole", 3, 4, backend="cpu", dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"float32 and float64 only.*bfloat16.*'bptt'"):
        layer(torch.randn(2, 1, 3, dtype=torch.bfloat16))
    cell = make_cell("lstm", 4, peephole=True)
    with pytest.raises(ValueError, match="CPU only"):
        kernels.resolve("cpu", cell, kernels.LayerConfig(), torch.device("cuda"))


def test_modifying_the_output_in_place_is_detected():
    layer = build("lstm_peephole", 3, 4, backend="cpu", dtype=torch.float64)
    out, _ = layer(torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True))
    loss = out.sum()
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.slow  # ~10-25 s here (matplotlib, every runner twice)
def test_bench_command_writes_json_markdown_and_plot(tmp_path):
    import json

    from typer.testing import CliRunner

    from rnnkit.cli.bench import app

    res = CliRunner().invoke(app, ["--cells", "lstm_peephole,gru", "--T", "3", "--B", "2", "--H", "8",
                                   "--repeats", "1", "--warmup", "0", "--no-step", "--quiet",
                                   "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert json.loads((tmp_path / "kernels.json").read_text())["rows"] == result["rows"]
    labels = {(r["label"], r["mode"]) for r in result["rows"]}
    for label in ("torch.nn.LSTM", "loop:lstm", "loop:gru", "lstm_peephole/cpu", "lstm_peephole/bptt",
                  "gru/native", "gru/cpu"):
        assert {(label, "fwd"), (label, "fwdbwd")} <= labels
    assert all(r["ms"] > 0 and r["x_lstm"] > 0 for r in result["rows"])
    lstm = next(r for r in result["rows"] if r["label"] == "torch.nn.LSTM" and r["mode"] == "fwd")
    assert lstm["x_lstm"] == pytest.approx(1.0)
    assert "| lstm_peephole/cpu |" in (tmp_path / "kernels.md").read_text()
    assert (tmp_path / "kernels.png").read_bytes()[:4] == b"\x89PNG"
    # H=8 is below the variant targets' H >= 128; the plain-cell target applies to every shape
    targets = {t["target"].split(" ")[0]: t for t in result["targets"]}
    assert "variants" not in targets and targets["plain"]["n"] == 2  # gru via native, fwd + fwdbwd
    # peak memory comes from a second pass after all timing: filled for every fwd+bwd row, never for fwd
    if sys.platform.startswith("linux"):
        assert all(r["peak_mib"] is not None for r in result["rows"] if r["mode"] == "fwdbwd")
    assert all(r["peak_mib"] is None for r in result["rows"] if r["mode"] == "fwd")


def test_bench_step_latency_compares_each_cell_with_its_family():
    from rnnkit.cli.bench import run_step_latency, targets

    rows = run_step_latency(["mut1", "lstm_peephole"], (8,), torch.device("cpu"), backends=["cpu", "native"],
                            calls=2, log=lambda _: None)
    us = {r["label"]: r for r in rows}
    assert {"torch.nn.LSTM", "torch.nn.GRU", "torch.nn.RNN", "mut1/cpu", "lstm_peephole/cpu"} <= set(us)
    assert all(r["layers"] == 2 and r["us"] > 0 for r in rows)
    assert us["mut1/cpu"]["x_torch_family"] == pytest.approx(us["mut1/cpu"]["us"] / us["torch.nn.GRU"]["us"])
    assert us["lstm_peephole/cpu"]["x_torch_family"] == pytest.approx(us["lstm_peephole/cpu"]["x_lstm"])
    (t,) = [t for t in targets([], rows, torch.device("cpu")) if t["target"].startswith("step()")]
    assert t["n"] == 2  # auto's backend for a step of each cell
    worst = max((us["mut1/cpu"], us["lstm_peephole/cpu"]), key=lambda r: r["x_torch_family"])
    assert t["worst"] == worst["x_torch_family"] and t["where"] == f"{worst['label']} H=8"


@pytest.mark.parametrize("args, message", [
    (["--cells", "nope"], "--cells: unknown cell"),
    (["--B", "0"], "--B: expected comma-separated positive integers"),
    (["--backends", "gpu9"], "--backends: unknown backend"),
])
def test_bench_command_rejects_bad_arguments(args, message):
    from typer.testing import CliRunner

    from rnnkit.cli.bench import app

    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output


def test_second_backward_through_the_same_graph_is_a_clear_error():
    layer = build("lstm_peephole", 3, 4, backend="cpu")
    out, _ = layer(torch.randn(5, 2, 3))
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backend='cpu' frees .* retain_graph=True"):
        out.sum().backward()
