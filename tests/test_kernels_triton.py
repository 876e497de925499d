"""``backend="triton"`` (kernels generated from the declaration) against the ``reference`` backend:
outputs, final states and every gradient.

Without CUDA the kernels run in Triton's interpreter on the CPU (``TRITON_INTERPRET=1`` plus
``RNNKIT_TRITON_CPU=1``, set by the fixture below before the kernels are first defined); the
interpreter is slow, so the sizes are tiny. With CUDA the same tests run the compiled kernels.

Tolerance (float32): max |triton - reference| <= 1e-4 * max(1, max |reference|) per tensor. The
kernels evaluate the same equations in a different order (tanh through the sigmoid, layer norm in
one pass over the row, the recurrent matmul separate from the bias), so they differ from the
reference by rounding only; about 1e-6 is observed. float64 (float64 math in the kernels) gets 1e-9.
bfloat16 is compared with a float32 reference on the same (bf16-rounded) numbers by relative norm
error <= 3e-2.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from cellcases import CPU_CASES, USER, input_size

import rnnkit
from rnnkit import kernels
from rnnkit.cells import REGISTRY, make_cell
from rnnkit.cells.declare import Declaration
from rnnkit.kernels import LayerConfig, source_cache, triton_backend, triton_generated

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'rnnkit[triton]')")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float32: 1e-4, torch.float64: 1e-9}


@pytest.fixture(scope="module")
def device():
    """The device the kernels run on; on the CPU, Triton's interpreter switched on for this module."""
    if DEVICE == "cuda":
        yield torch.device("cuda")
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.setenv(triton_backend.CPU_ENV, "1")
        if any(not getattr(m, "INTERPRETED", True) for n, m in list(sys.modules.items())
               if n.startswith("rnnkit_generated_triton_")):
            pytest.skip("the Triton kernels were compiled for the GPU earlier in this process")
        yield torch.device("cpu")


def _run(layer, x, state, lengths, seed: int) -> dict[str, torch.Tensor]:
    """Forward + backward of a fixed random loss; every tensor the comparison looks at, by name."""
    x = x.detach().clone().requires_grad_(True)
    states = tuple(s.detach().clone().requires_grad_(True) for s in state)
    torch.manual_seed(seed)  # the same recurrent-dropout / zoneout masks for both backends
    out, final = layer(x, states if len(states) > 1 else states[0], lengths=lengths)
    final = final if isinstance(final, tuple) else (final,)
    g = torch.Generator().manual_seed(seed + 1)
    loss = (out * torch.randn(out.shape, generator=g).to(out)).sum()
    loss = loss + sum((f * torch.randn(f.shape, generator=g).to(f)).sum() for f in final)
    loss.backward()
    res = {"out": out, **{f"final{k}": f for k, f in enumerate(final)}, "dx": x.grad}
    res.update({f"dstate{k}": s.grad for k, s in enumerate(states)})
    res.update({f"d{n}": p.grad for n, p in layer.named_parameters()})
    return res


def _build(cell: str | Declaration, I: int, H: int, **kw):
    return rnnkit.Recurrent(cell, I, H, **kw) if isinstance(cell, Declaration) else rnnkit.build(cell, I, H, **kw)


def _compare(cell: str | Declaration, device, *, T: int, B: int, I: int, H: int, bidirectional: bool, lengths,
             given_state: bool, training: bool = True, dtype=torch.float32, backend: str = "triton",
             bf16_tol: float = 3e-2, **layer_kw) -> None:
    torch.manual_seed(0)
    name = cell if isinstance(cell, str) else cell.name
    I = (H if cell.raw_input else I) if isinstance(cell, Declaration) else input_size(cell, I, H)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ref = _build(cell, I, H, bidirectional=bidirectional, backend="reference", **layer_kw).to(device, ref_dtype)
    tri = _build(cell, I, H, bidirectional=bidirectional, backend=backend, **layer_kw).to(device, dtype)
    with torch.no_grad():  # the same (for bf16: bf16-rounded) numbers in both
        for p in ref.parameters():
            p.copy_(p.to(dtype).to(ref_dtype))
    tri.load_state_dict(ref.state_dict())
    ref.train(training)
    tri.train(training)
    D = (2 if bidirectional else 1) * layer_kw.get("num_layers", 1)
    x = torch.randn(T, B, I).to(dtype).to(device, ref_dtype)
    # states in [0.5, 1.5]: the sLSTM divides by its normaliser state
    make = (lambda *s: torch.rand(*s) + 0.5) if given_state else torch.zeros
    state = tuple(make(D, B, H).to(dtype).to(device, ref_dtype) for _ in range(ref.cell.state_size))
    want = _run(ref, x, state, lengths, seed=11)
    got = _run(tri, x.to(dtype), tuple(s.to(dtype) for s in state), lengths, seed=11)
    assert tri.backend_for(torch.device(device)) == backend
    assert want.keys() == got.keys()
    for key in want:
        a, b = got[key], want[key]
        assert a is not None and b is not None, f"{name}: no gradient {key}"
        assert a.dtype == dtype and a.shape == b.shape, f"{name}: {key} {a.dtype} {tuple(a.shape)}"
        a = a.to(ref_dtype)
        if dtype in RTOL:
            err, scale = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
            assert err <= RTOL[dtype] * scale, f"{name}: {key} differs by {err:.3g} (scale {scale:.3g})"
        else:
            rel = ((a - b).norm() / b.norm().clamp_min(1e-3)).item()
            assert rel <= bf16_tol, f"{name}: {key} relative error {rel:.3g} in {dtype}"


@needs_triton
@pytest.mark.parametrize("name", CPU_CASES)
def test_registry_cell_bidirectional_lengths_state(name, device):
    """Every kind of declaration (levels, layer norms, parameters, dropped and coupled gates, several
    states, the raw input, zoneout, recurrent dropout): bidirectional layer, variable lengths, given
    initial state, odd H."""
    _compare(name, device, T=3, B=2, I=2, H=3, bidirectional=True, lengths=[3, 2], given_state=True)


@needs_triton
def test_user_cell_every_operation_float64(device):
    """A cell declared here (every operation, three levels): float64 math, so equal to ~1e-12."""
    _compare(USER, device, T=3, B=2, I=3, H=3, bidirectional=True, lengths=[3, 2], given_state=True,
             dtype=torch.float64)
    _compare(USER, device, T=2, B=3, I=3, H=3, bidirectional=False, lengths=None, given_state=False,
             recurrent_dropout=0.3, zoneout=0.2)


@needs_triton
@pytest.mark.parametrize("name", ["slstm", "mut2", "gru_cho_ln"])
def test_float64(name, device):
    _compare(name, device, T=3, B=2, I=2, H=3, bidirectional=True, lengths=[3, 1], given_state=True,
             dtype=torch.float64)


@needs_triton
@pytest.mark.parametrize("name", ["rnn", "lstm_peephole", "gru_cho_ln"])
def test_single_step_single_sequence(name, device):
    """T = 1, B = 1: the first and last step coincide (no recurrent-matmul gradient carried in)."""
    _compare(name, device, T=1, B=1, I=3, H=5, bidirectional=False, lengths=None, given_state=False)


@needs_triton
@pytest.mark.parametrize("name", ["lstm_zoneout", "gru_cho_ln"])
def test_several_programs_per_step(name, device):
    """H = 300, B = 10: several (batch, hidden) tiles per step, partial tiles at both edges."""
    _compare(name, device, T=2, B=10, I=3, H=300, bidirectional=False, lengths=[2, 1] * 5, given_state=True)


@needs_triton
@pytest.mark.parametrize("name", ["lstm_ln", "gru_cho_ln", "rnn_ln", "gru"])
def test_without_biases(name, device):
    """bias=False: no b_hh inside the layer norm or the recurrent matmul."""
    _compare(name, device, T=2, B=2, I=2, H=3, bidirectional=False, lengths=None, given_state=True, bias=False)


@needs_triton
def test_stacked_layers_with_dropout(device):
    _compare("lstm_peephole", device, T=3, B=2, I=2, H=3, bidirectional=False, lengths=[2, 3], given_state=True,
             num_layers=2, dropout=0.3)


@needs_triton
@pytest.mark.parametrize("name", ["lstm_zoneout", "gru_zoneout"])
def test_zoneout_eval_uses_expectation(name, device):
    """At evaluation zoneout mixes with the constant expectation (a broadcast keep mask)."""
    _compare(name, device, T=3, B=2, I=2, H=3, bidirectional=False, lengths=[1, 3], given_state=True,
             training=False)


@needs_triton
@pytest.mark.parametrize("name", ["lstm_peephole_ln", "gru_cho", "rnn_relu", "slstm"])
def test_bfloat16_matches_float32_reference(name, device):
    _compare(name, device, T=3, B=2, I=2, H=4, bidirectional=False, lengths=None, given_state=True,
             dtype=torch.bfloat16)


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("name", list(REGISTRY))
def test_registry_cell_larger_grid(name, device):
    """Slow: wider tiles (H = 37 spans several gate columns), longer sequences, eval mode."""
    _compare(name, device, T=6, B=3, I=4, H=37, bidirectional=True, lengths=[6, 1, 4], given_state=True)
    # float64: at H = 1 from a zero state a layer norm normalises equal values, and its 1/std = 1/sqrt(eps)
    # ~ 316 amplifies float32 rounding to ~1e-4
    _compare(name, device, T=1, B=1, I=1, H=1, bidirectional=False, lengths=None, given_state=False,
             dtype=torch.float64)
    _compare(name, device, T=4, B=2, I=2, H=3, bidirectional=False, lengths=None, given_state=False,
             training=False)


@needs_triton
@pytest.mark.parametrize("name", ["rnn_relu", "lstm_zoneout", "lstm_peephole_ln", "gru_cho_ln", "gru_rdrop", "slstm",
                                  "mut3", USER])
def test_persistent_forward_and_backward(name, device):
    """backend='triton_persistent': the whole forward in one launch, the whole backward in another."""
    _compare(name, device, T=3, B=2, I=2, H=3, bidirectional=True, lengths=[3, 2], given_state=True,
             backend="triton_persistent")


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("name", list(REGISTRY))
def test_persistent_registry(name, device):
    _compare(name, device, T=5, B=17, I=3, H=33, bidirectional=True, lengths=list(range(1, 6)) * 3 + [5, 5],
             given_state=True, backend="triton_persistent")


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "triton_persistent"])
def test_incoming_gradients_are_not_modified(backend, device):
    """The kernels update the running state gradients in place; they must work on copies."""
    torch.manual_seed(4)
    layer = rnnkit.build("lstm_peephole", 2, 3, backend=backend, bidirectional=True).to(device)
    x = torch.randn(3, 2, 2, device=device, requires_grad=True)
    out, (h, c) = layer(x)
    grads = [torch.randn_like(t) for t in (out, h, c)]
    before = [g.clone() for g in grads]
    torch.autograd.grad((out, h, c), x, grads)
    for g, b in zip(grads, before):
        assert torch.equal(g, b)


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "triton_persistent"])
@pytest.mark.parametrize("name", ["lstm_ln", "gru_cho_ln", "rnn_relu"])
def test_inference_without_grad(name, backend, device):
    """Under no_grad nothing is saved for backward: the per-step path reuses two state slots and one
    projection slot across steps, the persistent kernel skips those writes."""
    torch.manual_seed(3)
    ref = rnnkit.build(name, 3, 5, backend="reference").to(device).eval()
    ours = rnnkit.build(name, 3, 5, backend=backend).to(device).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3, device=device)
    with torch.no_grad():
        (y0, s0), (y1, s1) = ref(x, lengths=[5, 2]), ours(x, lengths=[5, 2])
    s0, s1 = (s0, s1) if isinstance(s0, tuple) else ((s0,), (s1,))
    for a, b in zip((y1, *s1), (y0, *s0)):
        torch.testing.assert_close(a, b, rtol=RTOL[torch.float32], atol=RTOL[torch.float32])


@needs_triton
def test_persistent_size_limit_is_explained():
    cuda = torch.device("cuda")
    assert kernels.resolve("triton_persistent", make_cell("lstm", 64), LayerConfig(), cuda) == "triton_persistent"
    assert kernels.resolve("triton_persistent", make_cell("rnn", 128), LayerConfig(), cuda) == "triton_persistent"
    with pytest.raises(ValueError, match=r"hidden_size <= 64 for this cell \(got 65\)"):
        kernels.resolve("triton_persistent", make_cell("gru", 65), LayerConfig(), cuda)
    assert "triton_persistent" not in kernels.AUTO_ORDER["cuda"]


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["lstm_peephole_ln", "lstm_zoneout", "gru_cho", "gru_ln", "rnn_relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_realistic_shapes(name, dtype, device):
    """On a GPU: compiled kernels at B = 64, H = 512 (LN: whole 512-wide rows), bidirectional, lengths.

    bfloat16 rounding compounds over 16 steps (a relu RNN reaches ~4e-2 relative error against the float32
    reference in the interpreter at H = 128), so bf16 gets 0.1 here: a wrong kernel is off by O(1).
    """
    _compare(name, device, T=16, B=64, I=32, H=512, bidirectional=True, lengths=list(range(1, 17)) * 4,
             given_state=True, dtype=dtype, bf16_tol=0.1)


@needs_triton
def test_ln_epsilon_matches_cells():
    from rnnkit.cells.base import LN_EPS

    assert f"EPS: tl.constexpr = tl.constexpr({LN_EPS!r})" in triton_generated.source(USER)


def test_generated_source_is_written_once_and_names_no_family(tmp_path, monkeypatch):
    """The kernels of a declaration: valid Python, two per level, no cell-specific code, one cache file."""
    monkeypatch.setenv("RNNKIT_CACHE_DIR", str(tmp_path))
    cho = make_cell("gru", 4, reset_after=False, layer_norm=True).declaration
    text = triton_generated.source(cho)
    compile(text, "generated", "exec")
    assert "def fwd1(" in text and "def fwd2(" in text and "def bwd2(" in text and "def bwd1(" in text
    assert "def bwd0(" not in text  # nothing at level 0 of the Cho GRU has a gradient
    assert triton_generated.source(USER) != text
    path = source_cache.load_source(text, "triton", "a test").__file__
    assert [p.name for p in (tmp_path / "generated").glob("triton_*.py")] == [os.path.basename(path)]
    assert source_cache.load_source(text, "triton", "a test").__file__ == path


# ---- dispatch: no GPU or interpreter needed ------------------------------------------------------------
@needs_triton
def test_cpu_is_refused_without_the_interpreter(monkeypatch):
    monkeypatch.delenv(triton_backend.CPU_ENV, raising=False)
    cell = make_cell("lstm", 4, peephole=True)
    with pytest.raises(ValueError, match="backend='triton'.*CUDA devices only"):
        kernels.resolve("triton", cell, LayerConfig(), torch.device("cpu"))
    layer = rnnkit.LSTM(2, 4, peephole=True, backend="triton")  # building on the CPU is fine (move to CUDA)
    with pytest.raises(ValueError, match="CUDA devices only"):
        layer(torch.randn(3, 1, 2))


def test_not_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # find_spec -> None, as without the package
    cell = make_cell("gru", 4)
    with pytest.raises(ValueError, match="Triton is not installed"):
        kernels.resolve("triton", cell, LayerConfig(), torch.device("cuda"))
    with pytest.raises(ValueError, match="Triton is not installed"):
        rnnkit.GRU(2, 4, backend="triton")


@needs_triton
def test_auto_on_cuda_prefers_cudnn_for_plain_cells_and_triton_for_every_other():
    cuda = torch.device("cuda")
    for name, spec in REGISTRY.items():
        cell = make_cell(spec.family, 8, **spec.cell_options)
        cfg = LayerConfig(**spec.layer_options)
        native = kernels.BACKENDS["native"].unsupported(cell, cfg, cuda) is None
        expected = "native" if native else "triton"
        assert kernels.resolve("auto", cell, cfg, cuda) == expected, name
    assert kernels.AUTO_ORDER["cuda"].index("triton") < kernels.AUTO_ORDER["cuda"].index("bptt")
    assert "triton" not in kernels.AUTO_ORDER["cpu"]


def test_importing_rnnkit_does_not_import_triton():
    code = "import sys, rnnkit; assert 'triton' not in sys.modules, 'triton imported'; print('ok')"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@needs_triton
@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Slow (~5 min on an idle 2 cores): every kernel specialization of the registry compiles for an H100."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-W", "error", "-m", "rnnkit.kernels.triton_aot", "--arch", "90", "--shapes", "3x5",
           "--dtypes", "float32"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "compiled" in res.stderr and len(res.stdout.splitlines()) >= 40


@needs_triton
@pytest.mark.parametrize("name", ["lstm", "gru_ln"])
def test_nonfinite_padding_never_reaches_valid_steps(name, device):
    """nan/inf in the padding: valid outputs, final states and gradients equal those of zero padding."""
    torch.manual_seed(0)
    layer = rnnkit.build(name, 2, 3, bidirectional=True, backend="triton").to(device)
    lengths = [2, 4, 1]
    valid = (torch.arange(4).unsqueeze(1) < torch.tensor(lengths)).unsqueeze(-1).to(device)  # (T, B, 1)
    x = torch.randn(4, 3, 2, device=device)
    junk = torch.tensor([float("nan"), float("inf"), -float("inf")], device=device).repeat(4, 2).view(4, 3, 2)
    state = tuple(torch.randn(2, 3, 3, device=device) for _ in range(2 if REGISTRY[name].family == "lstm" else 1))
    zero = _run(layer, torch.where(valid, x, 0.0), state, lengths, seed=3)
    bad = _run(layer, torch.where(valid, x, junk), state, lengths, seed=3)
    for key in zero:
        if zero[key] is None:
            continue
        assert torch.isfinite(bad[key]).all(), f"{name}: {key} is not finite"
        torch.testing.assert_close(bad[key], zero[key], rtol=0, atol=0)


@needs_triton
def test_any_declaration_runs_and_a_refusal_names_the_backends_that_can():
    cuda = torch.device("cuda")
    cell = rnnkit.Recurrent(USER, 3, 3).cell
    assert kernels.resolve("auto", cell, LayerConfig(), cuda) == "triton"
    assert kernels.working_backends(cell, LayerConfig(), cuda) == ["reference", "bptt", "triton", "triton_persistent"]
    big = rnnkit.Recurrent(USER, 65, 65).cell
    with pytest.raises(ValueError, match=r"backend='triton_persistent' cannot run .*'everything'.*hidden_size <= 64 "
                                         r"for this cell \(got 65\).*"
                                         r"Backends that can: \['reference', 'bptt', 'triton'\]"):
        kernels.resolve("triton_persistent", big, LayerConfig(), cuda)


@needs_triton
def test_persistent_refuses_float64_with_the_dtypes_it_runs(device):
    layer = rnnkit.build("slstm", 3, 4, backend="triton_persistent").to(device, torch.float64)
    with pytest.raises(TypeError, match=r"backend='triton_persistent' runs the dtypes \['torch.float32', "
                                        r"'torch.bfloat16', 'torch.float16'\], got torch.float64"):
        layer(torch.randn(2, 1, 3, dtype=torch.float64, device=device))
