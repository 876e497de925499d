"""ONNX export: every registry cell in onnxruntime equals PyTorch (sequence and streaming graphs, lengths,
2 layers, both directions), the exported char-LM writes the same text, and the bad inputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from test_charlm_cli import assert_user_error, invoke, train
from torch import nn

import rnnkit
from rnnkit.cells import REGISTRY
from rnnkit.errors import UserError
from rnnkit.export import DEFAULT_OPSET, OnnxRunner, to_onnx

TOL = {"rtol": 1e-5, "atol": 1e-5}
I, H, L = 3, 5, 2
# registry cells that the standard operators compute exactly (recurrent dropout is off in inference)
ON_OPERATOR = {"rnn", "rnn_relu", "lstm", "lstm_fb0", "lstm_peephole", "lstm_cifg", "lstm_rdrop", "gru",
               "gru_cho", "gru_rdrop"}
# a few cells of each mapping for the default suite's streaming test; the rest run with -m slow
STREAM_FAST = {"lstm_cifg", "gru_cho", "rnn_relu", "lstm_peephole_ln", "gru_zoneout", "slstm"}


def _needs_square(name: str) -> bool:
    """Cells whose equations use the raw input take input size = hidden size (so no bidirectional stack)."""
    try:
        rnnkit.build(name, I, H)
        return False
    except ValueError:
        return True


def _stack(name: str, bidirectional: bool) -> rnnkit.Recurrent:
    torch.manual_seed(0)
    layer = rnnkit.build(name, H if _needs_square(name) else I, H, num_layers=L, bidirectional=bidirectional)
    with torch.no_grad():  # move every parameter off its init (layer-norm gains of 1, zero biases)
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer.eval()


def _flat(state):
    return state if isinstance(state, tuple) else (state,)


class Both(nn.Module):
    """The stack run twice, without and with lengths: both code paths in one graph."""

    def __init__(self, stack):
        super().__init__()
        self.stack = stack

    def forward(self, x, lengths, *state):
        s = state if len(state) > 1 else state[0]
        y, f = self.stack(x, s)
        y_len, f_len = self.stack(x, s, lengths=lengths)
        return (y, *_flat(f), y_len, *_flat(f_len))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_sequence_graph_equals_pytorch(name):
    bidirectional = not _needs_square(name)
    stack = _stack(name, bidirectional)
    S, D, In = stack.cell.state_size, stack.num_directions, stack.input_size
    model = Both(stack).eval()
    T, B = 6, 4
    state_names = [f"{n}0" for n in stack.cell.state_names]
    outs = ["y", *stack.cell.state_names]
    example = (torch.randn(T, B, In), torch.tensor([6, 2, 5, 3])) + tuple(torch.randn(D * L, B, H) for _ in range(S))
    res = to_onnx(model, example, input_names=["x", "lengths", *state_names],
                  output_names=outs + [o + "_len" for o in outs],
                  dynamic_axes={"x": {0: "T", 1: "B"}, "lengths": {0: "B"}, **{s: {1: "B"} for s in state_names}})
    onnx.checker.check_model(res.model, full_check=True)
    assert [o.version for o in res.model.opset_import if o.domain in ("", "ai.onnx")] == [DEFAULT_OPSET]
    assert len(res.mappings) == 1
    assert res.mappings[0].mapping == ("LSTM GRU RNN".split()[["lstm", "gru", "rnn"].index(stack.cell.family)]
                                       + " operator" if name in ON_OPERATOR else "Scan of the cell's step()")
    runner = OnnxRunner(res.model.SerializeToString())
    for T2, lens in ((6, [6, 2, 5, 1]), (3, [1, 3, 2]), (1, [1])):  # other sizes than traced: dynamic axes
        B2 = len(lens)
        x = torch.randn(T2, B2, In)
        state = tuple(torch.randn(D * L, B2, H) for _ in range(S))
        lengths = torch.tensor(lens)
        got = runner.run({"x": x, "lengths": lengths, **dict(zip(state_names, state))})
        with torch.no_grad():
            want = model(x, lengths, *state)
        for n, w in zip(res.model.graph.output, want):
            torch.testing.assert_close(torch.from_numpy(got[n.name]), w, **TOL, msg=lambda m, n=n: f"{n.name}: {m}")


class Steps(nn.Module):
    def __init__(self, stack):
        super().__init__()
        self.stack = stack

    def forward(self, x_t, *state):
        y, f = self.stack.step(x_t, state if len(state) > 1 else state[0])
        return (y, *_flat(f))


@pytest.mark.parametrize("name", [n if n in STREAM_FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(REGISTRY)])
def test_streaming_graph_equals_step(name):
    stack = _stack(name, bidirectional=False)
    S, In, outs = stack.cell.state_size, stack.input_size, stack.cell.state_names
    names = [f"{n}0" for n in outs]
    res = to_onnx(Steps(stack), (torch.randn(2, In),) + tuple(torch.randn(L, 2, H) for _ in range(S)),
                  input_names=["x", *names], output_names=["y", *outs],
                  dynamic_axes={"x": {0: "B"}, **{n: {1: "B"} for n in names}}, streaming=True,
                  metadata={"rnnkit.state": [[i, o] for i, o in zip(names, outs)]})
    assert not stack.training, "to_onnx must leave each submodule in the mode it found it"
    assert res.mappings[0].mapping in ("LSTM operator", "GRU operator", "RNN operator", "the cell's step(), inline")
    assert not any(n.op_type == "Scan" for n in res.model.graph.node)
    runner = OnnxRunner(res.model.SerializeToString())
    xs = torch.randn(5, 3, In)
    state, ort_state = None, runner.initial_state(3)
    for t in range(5):
        with torch.no_grad():
            y, state = stack.step(xs[t], state)
        out, ort_state = runner.step({"x": xs[t]}, ort_state)
        torch.testing.assert_close(torch.from_numpy(out["y"]), y, **TOL)
        for k, s in zip(outs, _flat(state)):
            torch.testing.assert_close(torch.from_numpy(out[k]), s, **TOL)
    with torch.no_grad():
        y_seq, _ = stack(xs)
    torch.testing.assert_close(torch.from_numpy(out["y"]), y_seq[-1], **TOL)


def test_streaming_bidirectional_is_an_error():
    stack = _stack("lstm", bidirectional=True)
    with pytest.raises(UserError, match=r"layer 'stack' is bidirectional.*sequence graph"):
        to_onnx(Steps(stack), (torch.randn(2, I), torch.zeros(4, 2, H), torch.zeros(4, 2, H)),
                input_names=["x", "h0", "c0"], output_names=["y", "h", "c"], streaming=True)


def test_opset_too_old_names_the_operator():
    stack = _stack("lstm_ln", bidirectional=False)
    with pytest.raises(UserError, match=r"--opset 16: too old for the ONNX operator LayerNormalization, which "
                                        r"exists from opset 17 \(used by stack layers 0-1: lstm\(layer_norm=True\)"
                                        r".*use --opset 17 or later"):
        to_onnx(Steps(stack), (torch.randn(2, I), torch.zeros(2, 2, H), torch.zeros(2, 2, H)),
                input_names=["x", "h0", "c0"], output_names=["y", "h", "c"], streaming=True, opset=16)
    res = to_onnx(Steps(stack), (torch.randn(2, I), torch.zeros(2, 2, H), torch.zeros(2, 2, H)),
                  input_names=["x", "h0", "c0"], output_names=["y", "h", "c"], streaming=True, opset=17)
    x, h, c = torch.randn(2, I), torch.randn(2, 2, H), torch.randn(2, 2, H)
    got = OnnxRunner(res.model.SerializeToString()).run({"x": x, "h0": h, "c0": c})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got["c"]), stack.step(x, (h, c))[1][1], **TOL)


@pytest.mark.parametrize("name", ["lstm", "gru_zoneout"])  # the LSTM operator; a Scan of the cell's step
def test_older_opsets_compute_the_same(name):
    """Sequence graph (with lengths, so the Scan's masks too) and streaming graph at opsets 13-17: each
    converted file passes the checker, runs, and equals PyTorch; opset 12 is an error naming the operator
    and the oldest opset that works."""
    from rnnkit.export.graph import convert_opset

    stack = _stack(name, bidirectional=False)
    S, outs = stack.cell.state_size, list(stack.cell.state_names)
    names = [f"{n}0" for n in outs]
    seq = to_onnx(Both(stack), (torch.randn(6, 2, I), torch.tensor([6, 3])) + tuple(torch.zeros(L, 2, H)
                                                                                 for _ in range(S)),
                  input_names=["x", "lengths", *names], output_names=["y", *outs] + [f"{o}_len" for o in ["y", *outs]],
                  dynamic_axes={"x": {0: "T", 1: "B"}, "lengths": {0: "B"}, **{n: {1: "B"} for n in names}})
    step = to_onnx(Steps(stack), (torch.randn(2, I),) + tuple(torch.zeros(L, 2, H) for _ in range(S)),
                   input_names=["x", *names], output_names=["y", *outs], streaming=True,
                   dynamic_axes={"x": {0: "B"}, **{n: {1: "B"} for n in names}})
    x, lengths = torch.randn(5, 3, I), torch.tensor([5, 2, 4])
    state = tuple(torch.randn(L, 3, H) for _ in range(S))
    feeds = {"x": x, "lengths": lengths, **dict(zip(names, state))}
    with torch.no_grad():
        want_seq = Both(stack)(x, lengths, *state)
        want_step = Steps(stack)(x[0], *state)
    for opset in (13, 14, 15, 16, 17):
        for res, want, f in ((seq, want_seq, feeds), (step, want_step, {**feeds, "x": x[0]})):
            model = onnx.ModelProto()
            model.CopyFrom(res.model)
            model = convert_opset(model, opset, res.mappings)
            assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]
            onnx.checker.check_model(model, full_check=True)
            runner = OnnxRunner(model.SerializeToString())
            got = runner.run({k: v for k, v in f.items() if k in runner.inputs})
            for out, w in zip(runner.outputs, want):
                torch.testing.assert_close(torch.from_numpy(got[out]), w, **TOL,
                                           msg=lambda m, o=f"opset {opset} {out}": f"{o}: {m}")
    with pytest.raises(UserError, match=r"--opset 12: too old for the ONNX operator \w+, whose form in this model "
                                        r"needs opset 13 .*use --opset 13 or later"):
        convert_opset(step.model, 12, step.mappings)


# ---- a trained char-LM end to end --------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The CLI tests' tiny char-LM with 2 layers and two checkpoints."""
    d = tmp_path_factory.mktemp("charlm")
    text = d / "tiny.txt"
    text.write_text("KING:\nTo be or not to be, that is the question.\n\n" * 40, encoding="utf-8")
    train(text, d / "run", "--layers", 2, "--steps", 6, "--eval-every", 3, "--checkpoint-every", 3)
    return d / "run"


def test_charlm_onnx_sampler_writes_the_same_text(trained, tmp_path):
    out = tmp_path / "lm.onnx"
    res = invoke("export", trained, "--streaming", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["graph"] == "streaming" and info["opset"] == DEFAULT_OPSET and info["bytes"] == out.stat().st_size
    assert info["layers"] == ["lm.rnn layers 0-1: lstm(forget_bias=0.0) -> LSTM operator"]
    for rule in (["--temperature", "0.8"], ["--temperature", "1.2", "--top-k", "5"], ["--top-p", "0.9"]):
        args = ["--prime", "KING:", "--length", "60", "--seed", "7", *rule]
        torch_text = invoke("charlm", "sample", trained, *args)
        onnx_text = invoke("charlm", "sample", "--onnx", out, *args)
        assert torch_text.exit_code == 0 and onnx_text.exit_code == 0, (torch_text.output, onnx_text.output)
        assert onnx_text.stdout == torch_text.stdout and len(torch_text.stdout) > 60


def test_charlm_onnx_distributions_match(trained, tmp_path):
    """Per-step logits of the streaming graph against the PyTorch model's, over a sampled text."""
    from rnnkit.export.models import export_run
    from rnnkit.tasks import charlm
    from rnnkit.tasks.decoding import generate

    path = export_run(trained, tmp_path / "lm.onnx", streaming=True)[0].path
    run = charlm.load_run(trained)
    prime = charlm.encode_prime(run.vocab, "KING:")
    a, b = [], []
    ids = generate(run.model, prime, 40, generator=torch.Generator().manual_seed(3), keep_logits=a)
    ids_onnx = OnnxRunner(path).generate(prime, 40, generator=torch.Generator().manual_seed(3), keep_logits=b)
    assert ids == ids_onnx
    torch.testing.assert_close(torch.stack(b), torch.stack(a), **TOL)


def test_sequence_graph_of_a_run_equals_the_model(trained):
    from rnnkit.tasks import charlm

    res = invoke("export", trained)
    assert res.exit_code == 0, res.output
    assert "lm.rnn layers 0-1: lstm(forget_bias=0.0) -> LSTM operator" in res.stdout
    runner = OnnxRunner(trained / "model.onnx")
    assert runner.meta("task") == "charlm" and runner.meta("graph") == "sequence"
    model = charlm.load_run(trained).model
    tokens = torch.randint(1, model.vocab_size, (7, 3))
    got = runner.run({"tokens": tokens, **runner.initial_state(3)})
    with torch.no_grad():
        logits, (h, c) = model(tokens)
    torch.testing.assert_close(torch.from_numpy(got["logits"]), logits, **TOL)
    torch.testing.assert_close(torch.from_numpy(got["c"]), c, **TOL)


# ---- bad input ----------------------------------------------------------------------------------------
def test_run_dir_without_a_model(tmp_path):
    assert_user_error(invoke("export", tmp_path), "holds no trained model")
    assert_user_error(invoke("export", tmp_path / "missing"), "no such directory")


def test_damaged_checkpoints(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckpts = sorted((run / "checkpoints").glob("step-*.safetensors"))
    assert len(ckpts) >= 2
    data = bytearray(ckpts[-1].read_bytes())
    data[-1] ^= 0xFF
    ckpts[-1].write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="skipping damaged checkpoint"):  # the fallback rule: previous one
        res = invoke("export", run, "--streaming")
    assert res.exit_code == 0, res.output
    older = int(ckpts[-2].stem.split("-")[1])
    assert OnnxRunner(run / "model.streaming.onnx").meta("checkpoint_step") == older
    for p in ckpts[:-1]:
        p.write_bytes(p.read_bytes()[:-3])
    with pytest.warns(RuntimeWarning, match="checksum mismatch"):
        assert_user_error(invoke("export", run), "every checkpoint fails its checks")


def test_bad_flags_and_files(trained, tmp_path):
    assert_user_error(invoke("export", trained, "--format", "tflite"), "--format", "'tflite'")
    assert_user_error(invoke("export", trained, "--opset", "99"), "--opset")
    assert_user_error(invoke("charlm", "sample", "--onnx", tmp_path / "none.onnx"), "no such file")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert_user_error(invoke("charlm", "sample", "--onnx", bad), "bad.onnx")
    res = invoke("export", trained, "--out", tmp_path / "seq.onnx")
    assert res.exit_code == 0, res.output
    assert_user_error(invoke("charlm", "sample", "--onnx", tmp_path / "seq.onnx"), "--streaming")
    assert_user_error(invoke("charlm", "sample"), "RUN_DIR / --onnx")
    with pytest.raises(UserError, match="streaming needs a file written with"):
        OnnxRunner(tmp_path / "seq.onnx").step({"tokens": np.ones((2, 1), dtype=np.int64)})


# ---- every task's model -------------------------------------------------------------------------------
def _task_inputs(task, runner, streaming):
    """Random inputs for a task's graph, from the graph's own input shapes (B = 3, T = 9 where dynamic)."""
    feeds = {}
    for name, info in runner.inputs.items():
        shape = [d if isinstance(d, int) else (3 if d == "B" else 9) for d in info.shape]
        if name == "lengths":
            feeds[name] = torch.tensor([9, 4, 1])
        elif info.type == "tensor(int64)":
            feeds[name] = torch.randint(1, 5, shape)
        else:
            feeds[name] = torch.randn(shape)
    return feeds


TASK_CASES = {  # table case -> (streaming graph too?, the model call the graph must equal)
    "wordlm": (True, lambda m, f: (m(f["tokens"], (f["h0"], f["c0"]))[0],)),
    "classify": (False, lambda m, f: (m(f["x"], f["lengths"]),)),
    "label": (False, lambda m, f: (m(f["x"], f["lengths"]),)),
    "embed": (False, lambda m, f: (m.embed(f["x"], f["lengths"]),)),
    "forecast": (False, lambda ms, f: (torch.stack([m(f["x"], f["xf"]) for m in ms]),)),
    "anomaly-prediction": (True, lambda m, f: (m(f["x"], (f["h0"], f["c0"]))[0],)),
    "anomaly-reconstruction": (False, lambda m, f: (m(f["x"]),)),
}


TASK_FAST = {"anomaly-prediction"}  # each case trains a small model first; the rest run with -m slow


@pytest.mark.parametrize("case", [c if c in TASK_FAST else pytest.param(c, marks=pytest.mark.slow)
                                  for c in sorted(TASK_CASES)])
def test_every_task_model_exports(case, tmp_path):
    """A model trained by each task's table case: its sequence graph equals the model; where the model
    streams, the streaming graph steps through the same numbers; otherwise --streaming is a clear error."""
    import test_tasks_table as table

    from rnnkit.export.models import export_run, load_run_spec

    make_inputs, train = table.CASES[case]
    train(tmp_path, *make_inputs(tmp_path))
    run = tmp_path / "run"
    streams, call = TASK_CASES[case]
    (exported,) = export_run(run)
    path = exported.path
    make, _ = load_run_spec(run)
    spec = make(False)
    model = spec.module.nets if hasattr(spec.module, "nets") else getattr(spec.module, "net", None)
    model = getattr(spec.module, "lm", model)
    runner = OnnxRunner(path)
    feeds = _task_inputs(case, runner, False)
    got = runner.run(feeds)
    with torch.no_grad():
        want = call(list(model) if isinstance(model, nn.ModuleList) else model, feeds)
    torch.testing.assert_close(torch.from_numpy(got[runner.outputs[0]]), want[0], **TOL)
    if not streams:
        with pytest.raises(UserError, match="--streaming: the .* model .* export the sequence graph"):
            export_run(run, tmp_path / "s.onnx", streaming=True)
        return
    spath = export_run(run, tmp_path / "s.onnx", streaming=True)[0].path
    stream = OnnxRunner(spath)
    seq_in = next(iter(feeds))  # tokens (T, B) or x (B, T, C): step through its time axis
    state = {k: feeds[k] for k, _ in stream.state_pairs}
    steps = feeds[seq_in].shape[0 if seq_in == "tokens" else 1]
    for t in range(steps):
        x_t = feeds[seq_in][t] if seq_in == "tokens" else feeds[seq_in][:, t]
        out, state = stream.step({next(iter(stream.inputs)): x_t}, state)
        seq_t = got[runner.outputs[0]][t] if seq_in == "tokens" else got[runner.outputs[0]][:, t]
        torch.testing.assert_close(torch.from_numpy(out[stream.outputs[0]]), torch.from_numpy(seq_t), **TOL)
    if case == "wordlm":  # the word sampler writes the same text from the graph
        args = ["--prime", "a b", "--length", 30, "--seed", 5, "--temperature", 1.5]
        torch_text, onnx_text = invoke("wordlm", "sample", run, *args), invoke("wordlm", "sample", "--onnx", spath,
                                                                              *args)
        assert torch_text.exit_code == 0 and onnx_text.exit_code == 0, (torch_text.output, onnx_text.output)
        assert onnx_text.stdout == torch_text.stdout and len(torch_text.stdout.split()) >= 25  # <eos>: newline
    if case == "anomaly-prediction":  # online scoring with the streaming graph, in two chunks
        from rnnkit.data.series import load_series
        from rnnkit.export.runner import anomaly_detector
        from rnnkit.tasks.anomaly import Detector

        values = load_series(tmp_path / "test.csv", "y", time="t").target
        ours, theirs = Detector.load(run).stream(), anomaly_detector(spath).stream()
        for part in (values[:100], values[100:]):
            a, b = ours.update(part), theirs.update(part)
            np.testing.assert_allclose(b["score"], a["score"], rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(b["flag"], a["flag"])


def _scores(path):
    rows = path.read_text().splitlines()
    return rows[0], np.array([[float(v) for v in r.split(",")] for r in rows[1:]])


def test_anomaly_score_onnx_equals_the_run(tmp_path):
    """`rnnkit anomaly score --onnx` (streaming and sequence graphs) writes the scores of the run's model;
    --stream keeps its state next to the file, never in the run directory."""
    from test_anomaly import _csv, _signal

    from rnnkit.tasks.anomaly import STREAM_FILE

    normal = _csv(tmp_path / "normal.csv", _signal(300))
    run = tmp_path / "run"
    res = invoke("anomaly", "fit", "--csv", normal, "--time", "t", "--hidden", 8, "--window", 32, "--steps", 10,
                 "--out", run, "--quiet")
    assert res.exit_code == 0, res.output
    x = _signal(200, seed=4)
    x[120:124] += 3
    test = _csv(tmp_path / "test.csv", x)
    for flags in ([], ["--streaming"]):
        assert invoke("export", run, *flags).exit_code == 0
    want = invoke("anomaly", "score", run, "--csv", test, "--time", "t", "--out", tmp_path / "torch.csv", "--json")
    assert want.exit_code == 0, want.output
    header, a = _scores(tmp_path / "torch.csv")
    assert header == "index,time,value,score,raw_score,flag"
    for name in ("model.onnx", "model.streaming.onnx"):
        got = invoke("anomaly", "score", "--onnx", run / name, "--csv", test, "--time", "t", "--out",
                     tmp_path / "onnx.csv", "--json")
        assert got.exit_code == 0, got.output
        assert json.loads(got.stdout)["flagged_points"] == json.loads(want.stdout)["flagged_points"]
        header_b, b = _scores(tmp_path / "onnx.csv")
        assert header_b == header
        np.testing.assert_allclose(b[:, 3:5], a[:, 3:5], rtol=1e-4, atol=1e-5)  # score, raw_score
        np.testing.assert_array_equal(b[:, [0, 1, 2, 5]], a[:, [0, 1, 2, 5]])  # index, time, value, flag
    streaming = run / "model.streaming.onnx"
    for k in range(2):
        res = invoke("anomaly", "score", "--onnx", streaming, "--csv", test, "--stream", "--out",
                     tmp_path / f"s{k}.csv")
        assert res.exit_code == 0, res.output
    assert (tmp_path / "s1.csv").read_text().splitlines()[1].startswith("200,")
    assert streaming.with_suffix("." + STREAM_FILE).is_file() and not (run / STREAM_FILE).exists()
    assert_user_error(invoke("anomaly", "score", "--csv", test, "--out", tmp_path / "x.csv"), "RUN_DIR / --onnx")
    assert_user_error(invoke("anomaly", "score", run, "--onnx", streaming, "--csv", test, "--out",
                             tmp_path / "x.csv"), "RUN_DIR / --onnx")
