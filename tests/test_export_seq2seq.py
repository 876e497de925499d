"""ONNX export of the encoder-decoder: the encoder graph and the decoder-step graph equal the PyTorch
model's start() and decode_step(), greedy and beam search through onnxruntime find the same outputs, and
`rnnkit seq2seq translate --onnx` writes the same lines as the run."""

from __future__ import annotations

import json

import pytest
import torch
from test_charlm_cli import assert_user_error
from test_seq2seq import batch, tiny
from test_seq2seq_cli import TINY, invoke, reverse_pairs

from rnnkit.errors import UserError
from rnnkit.export.models import export_seq2seq
from rnnkit.export.runner import OnnxSeq2Seq
from rnnkit.tasks.seq2seq import DecodeConfig, decode

TOL = {"rtol": 1e-5, "atol": 1e-5}

CASES = {  # id -> (attention, encoder cell, bidirectional, input feeding, opset)
    "multiplicative-lstm-bi": ("multiplicative", "lstm", True, False, 18),
    "additive-gru-bi-feed": ("additive", "gru", True, True, 14),  # both graphs converted to opset 14
    "none-lstm_ln-uni-feed": ("none", "lstm_ln", False, True, 18),  # Scan encoder, inline decoder step
    "additive-lstm-bi": ("additive", "lstm", True, False, 18),
    "multiplicative-rnn-uni-feed": ("multiplicative", "rnn", False, True, 13),
}
FAST = {"multiplicative-lstm-bi", "additive-gru-bi-feed", "none-lstm_ln-uni-feed"}


def _model(attention, cell, bidirectional, input_feeding):
    torch.manual_seed(0)
    model = tiny(attention, cell, bidirectional=bidirectional, input_feeding=input_feeding)
    with torch.no_grad():  # sharper distributions than at init: fewer near-ties for the searches
        for p in model.parameters():
            p.mul_(2.0)
    return model.eval()


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_graphs_and_searches_equal_pytorch(case, tmp_path):
    *config, opset = CASES[case]
    model = _model(*config)
    files = export_seq2seq(model, tmp_path / "m.onnx", opset=opset)
    assert {f.result.opset for f in files} == {opset}
    assert [f.path.name for f in files] == ["m.encoder.onnx", "m.decoder.onnx"]
    onnx_model = OnnxSeq2Seq(files[0].path)
    src, lens = batch(S=7, B=5, lengths=(7, 2, 4, 1, 5))  # other sizes than traced
    with torch.no_grad():
        st = model.start(src, lens)
        got = onnx_model.start(src, lens)
        want = {"h0": st.rnn[0] if isinstance(st.rnn, tuple) else st.rnn}
        if isinstance(st.rnn, tuple):
            want["c0"] = st.rnn[1]
        if st.feed is not None:
            want["feed0"] = st.feed
        for name in onnx_model.context:
            want[name] = getattr(st.enc, name)
        assert set(got.arrays) == set(want)
        for name, w in want.items():
            torch.testing.assert_close(got.arrays[name], w, **TOL, msg=lambda m, n=name: f"{n}: {m}")
        for _ in range(4):  # decoder steps along a fixed token path
            tok = torch.randint(4, 11, (5,))
            logits, st, w = model.decode_step(tok, st)
            lg, got, w_onnx = onnx_model.decode_step(tok, got)
            torch.testing.assert_close(lg, logits, **TOL)
            if w is None:
                assert w_onnx is None
            else:
                torch.testing.assert_close(w_onnx, w, **TOL)
    for beam in (1, 3):
        cfg = DecodeConfig(beam_size=beam, max_length_ratio=1.5, max_length_extra=2)
        a, b = decode(model, src, lens, cfg), decode(onnx_model, src, lens, cfg)
        assert b.ids == a.ids, f"beam {beam}"
        torch.testing.assert_close(torch.tensor(b.scores), torch.tensor(a.scores), **TOL)
        for wa, wb in zip(a.attention, b.attention):
            assert (wa is None) == (wb is None)
            if wa is not None:
                torch.testing.assert_close(wb, wa, **TOL)


def test_decoder_graph_interface(tmp_path):
    files = export_seq2seq(_model("additive", "lstm", True, True), tmp_path / "m.onnx")
    enc, dec = (f.result.model.graph for f in files)
    assert [i.name for i in enc.input] == ["src", "src_len"]
    assert [o.name for o in enc.output] == ["memory", "keys", "mask", "h0", "c0", "feed0"]
    assert [i.name for i in dec.input] == ["token", "memory", "keys", "mask", "h0", "c0", "feed0"]
    assert [o.name for o in dec.output] == ["logits", "log_probs", "h", "c", "feed", "attention"]
    assert files[0].result.describe() == ["model.encoder layers 0-1 (bidirectional): lstm -> LSTM operator"]
    assert files[1].result.describe() == ["model.decoder layers 0-1: lstm -> LSTM operator"]


# ---- a trained run, end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("s2s")
    (d / "train.tsv").write_text(reverse_pairs(200, 1), encoding="utf-8")
    (d / "valid.tsv").write_text(reverse_pairs(20, 2), encoding="utf-8")
    (d / "input.txt").write_text("abca\ndcb\nbbad\n", encoding="utf-8")
    res = invoke("seq2seq", "train", "--train", d / "train.tsv", "--valid", d / "valid.tsv", "--out", d / "run",
                 *TINY, "--lr", "1e-2", "--steps", 60, "--eval-every", 30, "--input-feeding",
                 "--attention", "additive", "--set", "model.dropout=0.0")
    assert res.exit_code == 0, res.output
    return d


def test_translate_onnx_writes_the_same_lines(run, tmp_path):
    res = invoke("export", run / "run", "--out", tmp_path / "rev.onnx", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["encoder_onnx"] == str(tmp_path / "rev.encoder.onnx")
    assert info["decoder_onnx"] == str(tmp_path / "rev.decoder.onnx")
    assert info["encoder_graph"] == "sequence" and info["decoder_graph"] == "streaming" and info["opset"] == 18
    for beam in ("1", "3"):
        args = ["--input", run / "input.txt", "--beam-size", beam]
        a = invoke("seq2seq", "translate", run / "run", *args)
        b = invoke("seq2seq", "translate", "--onnx", tmp_path / "rev.encoder.onnx", *args)
        assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
        assert b.stdout == a.stdout and len(a.stdout.splitlines()) == 3
    b = invoke("seq2seq", "translate", "--onnx", tmp_path / "rev.encoder.onnx", input="abc\n")
    assert b.exit_code == 0 and len(b.stdout.splitlines()) == 1, b.output


def test_bad_input(run, tmp_path):
    assert_user_error(invoke("export", run / "run", "--streaming"), "--streaming", "decoder-step graph")
    assert_user_error(invoke("seq2seq", "translate"), "RUN_DIR / --onnx")
    res = invoke("export", run / "run")
    assert res.exit_code == 0, res.output
    assert (run / "run" / "model.encoder.onnx").is_file() and (run / "run" / "model.decoder.onnx").is_file()
    assert_user_error(invoke("seq2seq", "translate", "--onnx", run / "run" / "model.decoder.onnx"),
                      "not the encoder graph")
    with pytest.raises(UserError, match="a seq2seq run exports as an encoder graph"):
        from rnnkit.export.models import load_run_spec

        load_run_spec(run / "run")
