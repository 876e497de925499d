"""Property-based tests (hypothesis): padding never leaks, readers fail only with UserError, damaged
checkpoints are skipped.

Each property draws a few dozen cases (the same ones every run); the whole file runs in seconds.
``RNNKIT_PROPERTY_SCALE=20`` draws twenty times as many, freshly random, for a deeper search.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnnkit
from rnnkit import kernels
from rnnkit.cells import REGISTRY

SCALE = int(os.environ.get("RNNKIT_PROPERTY_SCALE", "1"))
FAST = settings(max_examples=25 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=SCALE == 1)

# ---------------------------------------------------------------------------------------------- layers

# every backend that runs on the CPU, with the cells it supports (native: the plain cells only)
FAMILY_FIRST = tuple(sorted({REGISTRY[c].family: c for c in sorted(REGISTRY, reverse=True)}.values()))


def _runs(backend: str, cell: str) -> bool:
    """Whether ``backend`` runs ``cell`` on the CPU in float64 with varying lengths (capability query)."""
    try:  # building checks the backend; running checks varying lengths and the dtype
        rnnkit.build(cell, 4, 4, backend=backend).double().backend_for(torch.device("cpu"), variable_lengths=True,
                                                                       dtype=torch.float64)
    except ValueError:
        return False
    return True


LAYER_CELLS = {be: tuple(c for c in FAMILY_FIRST + ("lstm_peephole", "gru_ln") if _runs(be, c))
               for be in ("auto", "cpu", "bptt", "reference", "native") if be in kernels.BACKENDS or
               be == "auto"}
JUNK = st.one_of(st.just(math.nan), st.just(math.inf), st.just(-math.inf),
                 st.floats(-1e30, 1e30, allow_nan=False, allow_infinity=False))


@st.composite
def padded_batches(draw):
    T = draw(st.integers(1, 6))
    B = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    junk = draw(st.lists(JUNK, min_size=T * B * 4, max_size=T * B * 4))
    return T, B, lengths, torch.tensor(junk, dtype=torch.float64).view(T, B, 4)


@pytest.mark.parametrize("backend", sorted(LAYER_CELLS))
@settings(FAST, max_examples=12 * SCALE)
@given(data=st.data(), batch=padded_batches(), bidirectional=st.booleans(), layers=st.integers(1, 2))
def test_padding_never_reaches_valid_steps(backend, data, batch, bidirectional, layers):
    """Whatever the padding holds (nan, inf, huge numbers), valid outputs, final states and gradients are
    those of zero padding, and every gradient is finite."""
    T, B, lengths, junk = batch
    cell = data.draw(st.sampled_from(LAYER_CELLS[backend]), label="cell")
    torch.manual_seed(0)
    # input size = hidden size: some cells (the mut family) add the raw input to the state, so they stack
    # bidirectionally only one layer deep
    if bidirectional and rnnkit.build(cell, 4, 4).cell.check_input_size(8) is not None:
        layers = 1
    layer = rnnkit.build(cell, 4, 4, num_layers=layers, bidirectional=bidirectional, backend=backend).double()
    valid = (torch.arange(T).unsqueeze(1) < torch.tensor(lengths).unsqueeze(0)).unsqueeze(-1)  # (T, B, 1)
    clean = torch.randn(T, B, 4, dtype=torch.float64)
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
    assert {REGISTRY[c].family for c in LAYER_CELLS["reference"]} == {REGISTRY[c].family for c in REGISTRY}
    assert all(LAYER_CELLS.values()), LAYER_CELLS


# ---------------------------------------------------------------------------------------------- readers

READERS = settings(FAST, max_examples=40 * SCALE,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CELL = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-10**30, 10**30).map(str),
                 st.sampled_from(["", "nan", "NA", "?", "inf", "-inf", "1e999", "x", " ", '"', "1,5", "\t"]),
                 st.text(max_size=4))


def _read_all(path, suffix):
    """Every reader that accepts ``suffix``; returns what they parsed."""
    from rnnkit.data.sequences import read_sequences
    from rnnkit.data.series import load_series, read_table
    from rnnkit.data.text import read_text

    out = {}
    if suffix in (".csv", ".tsv", ".npy", ".npz"):
        out["table"] = read_table(path, "--csv")
    if suffix in (".csv", ".tsv", ".npy"):
        out["series"] = load_series(path, name="--csv", fill="ffill")
    if suffix in (".csv", ".tsv", ".ts", ".npy", ".npz"):
        out["sequences"] = read_sequences(path, fill="ffill")
    if suffix == ".txt":
        out["text"] = read_text(path)
    if suffix in (".csv", ".tsv"):
        from rnnkit.data.pairs import read_pairs

        out["pairs"] = read_pairs(path)
    if suffix == ".tsf":
        from rnnkit.data.tsf import read_tsf

        out["tsf"] = read_tsf(path)
    if suffix == ".idx":
        from rnnkit.data.images import read_idx

        out["idx"] = read_idx(path)
    return out


def _only_user_errors(fn):
    from rnnkit.errors import UserError

    try:
        return fn()
    except UserError:
        return None


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".txt", ".ts", ".npy", ".npz", ".tsf", ".idx"])
@READERS
@given(data=st.binary(max_size=300))
def test_random_bytes_give_a_parse_or_a_user_error(tmp_path, suffix, data):
    path = tmp_path / f"f{suffix}"
    path.write_bytes(data)
    _only_user_errors(lambda: _read_all(path, suffix))


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".ts", ".npy"])
@READERS
@given(data=st.data())
def test_mutated_valid_files_give_a_parse_or_a_user_error(tmp_path, suffix, data):
    """A valid file with random bytes overwritten, inserted or cut off."""
    import io

    path = tmp_path / f"f{suffix}"
    if suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, np.arange(12.0).reshape(4, 3))
        good = buf.getvalue()
    elif suffix == ".ts":
        good = b"@problemName t\n@timeStamps false\n@univariate true\n@classLabel true a b\n@data\n" \
               b"1.0,2.0,3.0:a\n2.0,1.0,0.5:b\n"
    else:
        sep = b"," if suffix == ".csv" else b"\t"
        good = sep.join([b"label", b"t0", b"t1"]) + b"\n" + sep.join([b"a", b"1.5", b"2"]) + b"\n" + \
            sep.join([b"b", b"3", b"-4e2"]) + b"\n"
    i = data.draw(st.integers(0, len(good)), label="at")
    cut = data.draw(st.integers(0, 8), label="cut")
    patch = data.draw(st.binary(max_size=6), label="patch")
    path.write_bytes(good[:i] + patch + good[i + cut:])
    _only_user_errors(lambda: _read_all(path, suffix))


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
@READERS
@given(array=st.one_of(
    st.lists(st.floats(), max_size=12).map(lambda v: np.array(v)),
    st.lists(st.text(max_size=3), max_size=6).map(lambda v: np.array(v, dtype=str)),
    st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(0, 2)).map(
        lambda s: np.ones(s, dtype="int8"))))
def test_any_array_file_gives_a_parse_or_a_user_error(tmp_path, suffix, array):
    path = tmp_path / f"a{suffix}"
    if suffix == ".npy":
        np.save(path, array)
    else:
        np.savez(path, X=array, y=np.arange(len(array)))
    _only_user_errors(lambda: _read_all(path, suffix))


@READERS
@given(rows=st.lists(st.lists(CELL, min_size=1, max_size=4), min_size=1, max_size=6),
       header=st.lists(st.text("abcxyz_", min_size=1, max_size=3), min_size=1, max_size=4, unique=True))
def test_csv_tables_parse_exactly_or_give_a_user_error(tmp_path, rows, header):
    """Random rows under a header: a parse gives each numeric column's values exactly, else a UserError."""
    import csv

    path = tmp_path / "t.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    table = _only_user_errors(lambda: _read_all(path, ".csv")["table"])
    if table is None:
        return
    assert list(table) == [h.strip() for h in header] and all(len(r) == len(header) for r in rows)
    for j, h in enumerate(header):
        col = table[h.strip()]
        if col.dtype.kind == "f":
            cells = [r[j].strip() for r in rows]
            want = [np.nan if c.lower() in ("", "na", "nan", "null", "none", "n/a", "?") else float(c) for c in cells]
            np.testing.assert_array_equal(col, np.array(want, dtype=np.float64))


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A toy run with checkpoints at steps 2 and 4, and a trainer that can resume it."""
    from rnnkit.train import StreamData, Trainer, TrainerConfig, load_checkpoint, load_config
    from rnnkit.train.toy import StreamLMTask, TinyLM, random_tokens, run

    root = tmp_path_factory.mktemp("ckpt")
    settings_ = {"batch_size": 4, "tbptt": 8, "tensorboard": False, "steps": 4, "checkpoint_every": 2}
    run(str(root / "run"), **settings_)
    ids = random_tokens(4001, seed=1)
    cfg = load_config(TrainerConfig, None, settings_)
    tr = Trainer(TinyLM(dropout=0.1), StreamLMTask(), StreamData(ids[:-1], ids[1:]), cfg, root / "run",
                 resume=True, quiet=True)
    originals = {s: load_checkpoint(root / "run" / "checkpoints" / f"step-{s:08d}.json") for s in (2, 4)}
    return root / "run" / "checkpoints", tr, originals


@FAST
@given(data=st.data(), target=st.sampled_from(["json", "safetensors"]), how=st.sampled_from(["truncate", "flip"]),
       both=st.booleans())
def test_damaged_newest_checkpoint_falls_back_or_says_none_is_usable(saved_run, tmp_path_factory, data, target,
                                                                     how, both):
    import shutil
    import warnings

    from rnnkit.errors import TrainingError
    from rnnkit.train.checkpoint import latest_good_checkpoint

    source, tr, originals = saved_run
    ckdir = tmp_path_factory.mktemp("damaged") / "checkpoints"
    shutil.copytree(source, ckdir)
    for step in ((4, 2) if both else (4,)):
        path = ckdir / f"step-{step:08d}.{target}"
        blob = bytearray(path.read_bytes())
        if how == "truncate":
            blob = blob[:data.draw(st.integers(0, len(blob) - 1), label="keep")]
        else:
            i = data.draw(st.integers(0, len(blob) - 1), label="byte")
            blob[i] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        path.write_bytes(bytes(blob))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        found = latest_good_checkpoint(ckdir, decode=tr._decode)
        if found is None:
            tr.run_dir = ckdir.parent
            with pytest.raises(TrainingError, match="no usable checkpoint"):
                tr._find_resume_point()
            return
    # the previous checkpoint, or a damaged one the damage left intact (e.g. a flip in unused header bytes)
    original = originals[found.step]
    if found.step == 4 or both:
        assert found.meta == original.meta
        assert all(torch.equal(found.tensors[k], original.tensors[k]) for k in original.tensors)
