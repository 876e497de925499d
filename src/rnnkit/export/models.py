"""What each task's model looks like as an ONNX graph: its inputs, outputs and streaming step.

A :class:`ModelSpec` names the graph's inputs and outputs, gives example inputs for tracing, the
dynamic axes, and which inputs/outputs carry the recurrent state, for the sequence graph or the
streaming (one step) graph of a model. :func:`load_run_spec` loads a run directory through its task's
own loader and picks the spec; :func:`export_run` writes the file (for a sequence-to-sequence run, two
files: :func:`seq2seq_specs`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..layers import Recurrent
from ..train.checkpoint import atomic_write_bytes
from .graph import DEFAULT_OPSET, ExportResult, to_onnx


@dataclass
class ModelSpec:
    """A model ready for :func:`to_onnx`: the module to trace and its graph's interface."""

    module: nn.Module
    args: tuple[Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    state: list[tuple[str, str]] = field(default_factory=list)  # (state input, state output)
    metadata: dict[str, Any] = field(default_factory=dict)

    def export(self, streaming: bool, opset: int, metadata: dict[str, Any] | None = None) -> ExportResult:
        meta = {**self.metadata, "rnnkit.state": [list(p) for p in self.state], **(metadata or {})}
        return to_onnx(self.module, self.args, input_names=self.input_names, output_names=self.output_names,
                       dynamic_axes=self.dynamic_axes, streaming=streaming, opset=opset, metadata=meta)


def _state_names(stack: Recurrent) -> list[tuple[str, str]]:
    """(input, output) names of the cell's states: ``h0`` -> ``h``, ``c0`` -> ``c``, ... (the cell's names)."""
    return [(f"{n}0", n) for n in stack.cell.state_names]


def _state_args(stack: Recurrent, B: int) -> tuple[Tensor, ...]:
    dtype = stack.layer_weights(0)["weight_ih"].dtype
    LD = stack.num_layers * stack.num_directions
    return tuple(torch.zeros(LD, B, stack.hidden_size, dtype=dtype) for _ in range(stack.cell.state_size))


def _pack(state: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def _unpack(state: tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    return state if len(state) > 1 else state[0]


# ---- language models (charlm, wordlm) ----------------------------------------------------------------
class _LMSequence(nn.Module):
    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, tokens: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        logits, final = self.lm(tokens, _unpack(state))
        return (logits, *_pack(final))


class _LMStep(_LMSequence):
    def forward(self, token: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        logits, final = self.lm.step(token, _unpack(state))
        return (logits, *_pack(final))


def lm_spec(model: nn.Module, streaming: bool) -> ModelSpec:
    """:class:`rnnkit.tasks.lm.RecurrentLM`: tokens (T, B) [or token (B,)] and the state in;
    logits (T, B, V) [or (B, V)] and the state out."""
    state = _state_names(model.rnn)
    if streaming:
        module, args, first = _LMStep(model), (torch.tensor([1, 2]),), "token"
        axes = {"token": {0: "B"}}
        out = "logits"
    else:
        module, args, first = _LMSequence(model), (torch.ones(3, 2, dtype=torch.int64),), "tokens"
        axes = {"tokens": {0: "T", 1: "B"}}
        out = "logits"
    axes.update({i: {1: "B"} for i, _ in state})
    return ModelSpec(module, args + _state_args(model.rnn, 2), [first] + [i for i, _ in state],
                     [out] + [o for _, o in state], axes, state,
                     metadata={"rnnkit.stream": {"input": first, "output": out}})


# ---- sample-data tasks (classify, embed, anomaly, forecast) --------------------------------------------
class _Call(nn.Module):
    """``method`` of ``net`` as a module's forward (the graph of one entry point of a task's model)."""

    def __init__(self, net: nn.Module, method: str, pack_state: bool = False, step: bool = False) -> None:
        super().__init__()
        self.net, self.method, self.pack_state, self.step = net, method, pack_state, step

    def forward(self, x: Tensor, *rest: Tensor) -> Any:
        if self.pack_state:  # (x, *state) -> (y, *state); a step adds and removes the time axis
            y, final = getattr(self.net, self.method)(x.unsqueeze(1) if self.step else x, _unpack(rest))
            return (y.squeeze(1) if self.step else y, *_pack(final))
        return getattr(self.net, self.method)(x, *rest)


class _Ensemble(nn.Module):
    def __init__(self, nets: list[nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x: Tensor, xf: Tensor) -> Tensor:
        return torch.stack([net(x, xf) for net in self.nets])  # (M, B, H, Ct, K)


def _no_stream(task: str, why: str) -> UserError:
    return UserError(f"--streaming: the {task} model {why}, so it has no one-step graph; export the sequence "
                     f"graph (without --streaming)")


def classify_spec(net: nn.Module, channels: int, streaming: bool) -> ModelSpec:
    """Classifier: x (B, T, C) padded, lengths (B,) -> logits (B, K)."""
    if streaming:
        raise _no_stream("classify", "pools over each whole sequence")
    return ModelSpec(_Call(net, "forward"), (torch.zeros(2, 3, channels), torch.tensor([3, 2])), ["x", "lengths"],
                     ["logits"], {"x": {0: "B", 1: "T"}, "lengths": {0: "B"}})


def label_spec(net: nn.Module, features: int, streaming: bool) -> ModelSpec:
    """CTC labeller: x (B, T, F) padded, lengths (B,) -> per-step log-probabilities (B, T, K+1), blank
    included (decoding, greedy or beam, stays in the task's code)."""
    if streaming:
        raise _no_stream("label", "is decoded over each whole sequence")
    return ModelSpec(_Call(net, "forward"), (torch.zeros(2, 3, features), torch.tensor([3, 2])), ["x", "lengths"],
                     ["log_probs"], {"x": {0: "B", 1: "T"}, "lengths": {0: "B"}})


def embed_spec(net: nn.Module, channels: int, streaming: bool) -> ModelSpec:
    """Embedder: x (B, T, C) padded, lengths (B,) -> embedding (B, H)."""
    if streaming:
        raise _no_stream("embed", "embeds each whole sequence")
    return ModelSpec(_Call(net, "embed"), (torch.zeros(2, 3, channels), torch.tensor([3, 2])), ["x", "lengths"],
                     ["embedding"], {"x": {0: "B", 1: "T"}, "lengths": {0: "B"}})


def anomaly_spec(net: nn.Module, channels: int, window: int, streaming: bool) -> ModelSpec:
    """Prediction detector: x (B, T, C) and the state -> predictions of the next points (B, T, C) and the
    state; streaming: x_t (B, C) -> (B, C). Reconstruction detector: windows (B, W, C) -> (B, W, C)."""
    from ..tasks.anomaly import Predictor

    if not isinstance(net, Predictor):
        if streaming:
            raise _no_stream("anomaly (reconstruction)", "reconstructs whole windows")
        return ModelSpec(_Call(net, "forward"), (torch.zeros(2, window, channels),), ["x"], ["reconstruction"],
                         {"x": {0: "B"}})
    state = _state_names(net.encoder)
    if streaming:
        x, axes = torch.zeros(2, channels), {"x": {0: "B"}}
    else:
        x, axes = torch.zeros(2, 3, channels), {"x": {0: "B", 1: "T"}}
    axes.update({i: {1: "B"} for i, _ in state})
    return ModelSpec(_Call(net, "forward", pack_state=True, step=streaming), (x,) + _state_args(net.encoder, 2),
                     ["x"] + [i for i, _ in state], ["prediction"] + [o for _, o in state], axes, state)


def forecast_spec(nets: list[nn.Module], lookback: int, streaming: bool) -> ModelSpec:
    """Forecaster ensemble: lookback window x (B, L, C) and known-future covariates xf (B, H, Cf) ->
    head parameters of every member (M, B, H, Ct, K)."""
    if streaming:
        raise _no_stream("forecast", "reads a whole lookback window")
    n = nets[0]
    c_in = n.n_target + n.n_past + n.n_future
    args = (torch.zeros(2, lookback, c_in), torch.zeros(2, n.horizon, n.n_future))
    return ModelSpec(_Ensemble(nets), args, ["x", "xf"], ["params"], {"x": {0: "B"}, "xf": {0: "B"}})


# ---- sequence to sequence: an encoder graph and a decoder-step graph -----------------------------------
# The encoder graph is the model's ``start``: everything the decoder reads at its first step. The
# decoder-step graph is ``decode_step``: the encoder's outputs come back as inputs at every step, the
# recurrent state and the input feed are carried from each step's outputs to the next step's inputs.
_CONTEXT_AXES = {"memory": {0: "B", 1: "S"}, "keys": {0: "B", 1: "S"}, "mask": {0: "B", 1: "S"},
                 "summary": {0: "B"}}


def _seq2seq_io(model: nn.Module) -> tuple[list[str], list[tuple[str, str]]]:
    """(the encoder's context outputs the decoder reads, the decoder's (state input, output) pairs)."""
    context = ["memory", "keys", "mask"] if model.attention is not None else ["summary"]
    state = _state_names(model.decoder)[:model.config.decoder.state_size]
    if model.config.input_feeding:
        state.append(("feed0", "feed"))
    return context, state


class _Seq2SeqStart(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor, src_len: Tensor) -> tuple[Tensor, ...]:
        st = self.model.start(src, src_len)
        context, _ = _seq2seq_io(self.model)
        out = tuple(getattr(st.enc, name) for name in context) + _pack(st.rnn)
        return out + ((st.feed,) if st.feed is not None else ())


class _Seq2SeqStep(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, token: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        from ..tasks.seq2seq import DecoderState, Encoded

        context, _ = _seq2seq_io(self.model)
        ctx = dict(zip(context, inputs))
        rnn = inputs[len(context):len(context) + self.model.config.decoder.state_size]
        feed = inputs[-1] if self.model.config.input_feeding else None
        enc = Encoded(ctx.get("memory"), ctx.get("keys"), ctx.get("mask"), ctx.get("summary"), None)
        logits, st, w = self.model.decode_step(token, DecoderState(enc, _unpack(tuple(rnn)), feed))
        out = (logits, torch.log_softmax(logits, -1)) + _pack(st.rnn) + ((st.feed,) if feed is not None else ())
        return out + ((w,) if w is not None else ())


def seq2seq_specs(model: nn.Module) -> dict[str, ModelSpec]:
    """:class:`rnnkit.tasks.seq2seq.Seq2Seq` as two graphs.

    ``encoder``: ``src`` (S, B) int64, ``src_len`` (B,) -> ``memory`` (B, S, De), ``keys`` (B, S, K),
    ``mask`` (B, S) bool (with attention) or ``summary`` (B, De) (without), and the decoder's first
    state: ``h0``[, ``c0``] (L, B, Hd)[, ``feed0`` (B, Hd) with input feeding].
    ``decoder``: ``token`` (B,), the encoder's context outputs and the state -> ``logits`` (B, V),
    ``log_probs`` (B, V), ``h``[, ``c``][, ``feed``] and ``attention`` (B, S) (with attention).
    """
    context, state = _seq2seq_io(model)
    src, src_len = torch.tensor([[4, 5], [5, 4], [6, 0]]), torch.tensor([3, 2])
    with torch.no_grad():
        start = _Seq2SeqStart(model).eval()(src, src_len)
    state_axes = {i: ({0: "B"} if i == "feed0" else {1: "B"}) for i, _ in state}
    enc_out = context + [i for i, _ in state]
    encoder = ModelSpec(_Seq2SeqStart(model), (src, src_len), ["src", "src_len"], enc_out,
                        {"src": {0: "S", 1: "B"}, "src_len": {0: "B"}},
                        metadata={"rnnkit.graph_role": "encoder"})
    dec_in = ["token"] + enc_out
    dec_out = ["logits", "log_probs"] + [o for _, o in state] + (["attention"] if model.attention is not None else [])
    decoder = ModelSpec(_Seq2SeqStep(model), (torch.tensor([1, 4]),) + start, dec_in, dec_out,
                        {"token": {0: "B"}, **{c: _CONTEXT_AXES[c] for c in context}, **state_axes}, state,
                        metadata={"rnnkit.graph_role": "decoder", "rnnkit.context": context})
    return {"encoder": encoder, "decoder": decoder}


def seq2seq_paths(out: Path) -> dict[str, Path]:
    """The two files of an exported encoder-decoder: ``model.onnx`` -> ``model.encoder.onnx`` and
    ``model.decoder.onnx``."""
    stem = out.name[:-len(".onnx")] if out.name.endswith(".onnx") else out.name
    return {role: out.with_name(f"{stem}.{role}.onnx") for role in ("encoder", "decoder")}


# ---- run directories ---------------------------------------------------------------------------------
def _lm_run(run_dir: Path, checkpoint: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    from ..data.text import CharVocab, vocab_from_dict
    from ..tasks.charlm import CharLMConfig
    from ..tasks.lm import VOCAB_FILE, load_run
    from ..tasks.wordlm import WordLMConfig

    vocab = vocab_from_dict(json.loads((run_dir / VOCAB_FILE).read_text(encoding="utf-8")))
    task = "charlm" if isinstance(vocab, CharVocab) else "wordlm"
    run = load_run(run_dir, CharLMConfig if task == "charlm" else WordLMConfig, checkpoint)
    meta = {"rnnkit.task": task, "rnnkit.vocab": vocab.to_dict(), "rnnkit.checkpoint_step": run.step}
    return run.model, (lambda streaming: lm_spec(run.model, streaming)), meta


def _sample_run(run_dir: Path, task: str) -> tuple[nn.Module, Any]:
    """(a model of a sample-data task's run, its spec maker) from ``model.json`` + ``model.safetensors``."""
    if task == "classify":
        from ..tasks.classify import Classifier

        c = Classifier.load(run_dir)
        return c.net, lambda streaming: classify_spec(c.net, c.meta["channels"], streaming)
    if task == "embed":
        from ..tasks.embed import Embedder

        e = Embedder.load(run_dir)
        return e.net, lambda streaming: embed_spec(e.net, e.meta["channels"], streaming)
    if task == "anomaly":
        from ..tasks.anomaly import Detector

        d = Detector.load(run_dir)
        return d.net, lambda streaming: anomaly_spec(d.net, d.meta["channels"], d.cfg.model.window, streaming)
    if task == "forecast":
        from ..tasks.forecast import ForecastModel

        f = ForecastModel.load(run_dir)
        return f.nets[0], lambda streaming: forecast_spec(f.nets, f.cfg.data.lookback, streaming)
    if task == "label":
        from ..tasks.label import Labeller

        lab = Labeller.load(run_dir)
        features = lab.meta["features"] * lab.cfg.data.stack
        return lab.net, lambda streaming: label_spec(lab.net, features, streaming)
    raise UserError(f"RUN_DIR {str(run_dir)!r}: a {task!r} run; ONNX export covers charlm, wordlm, seq2seq, "
                    f"classify, embed, anomaly, forecast and label runs")


def _is_seq2seq(run_dir: Path) -> bool:
    from ..tasks.seq2seq import VOCAB_FILE

    try:
        vocab = json.loads((run_dir / VOCAB_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(vocab, dict) and set(vocab) == {"source", "target"}


def load_run_spec(run_dir: str | Path, checkpoint: str | None = None) -> tuple[Callable[[bool], ModelSpec],
                                                                                dict[str, Any]]:
    """The export spec maker (``streaming -> ModelSpec``) of a run directory's trained model, and the
    metadata to store with its export (task, vocabulary or model.json, checkpoint step). A seq2seq run
    has two graphs: see :func:`export_run`."""
    from ..tasks.base import META_FILE
    from ..tasks.lm import VOCAB_FILE

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR {str(run_dir)!r}: no such directory (expected the --out of a training run)")
    if _is_seq2seq(run_dir):
        raise UserError(f"RUN_DIR {str(run_dir)!r}: a seq2seq run exports as an encoder graph and a decoder-step "
                        f"graph (rnnkit.export.models.export_run), not as one model")
    if (run_dir / VOCAB_FILE).is_file():
        _, make, meta = _lm_run(run_dir, checkpoint or "latest")
        return make, meta
    if (run_dir / META_FILE).is_file():
        if checkpoint not in (None, "latest"):
            raise UserError(f"--checkpoint {checkpoint!r}: this run keeps its final model only "
                            f"({META_FILE}); leave --checkpoint out")
        info = json.loads((run_dir / META_FILE).read_text(encoding="utf-8"))
        _, make = _sample_run(run_dir, str(info.get("task")))
        return make, {"rnnkit.task": info.get("task"), "rnnkit.model": info}
    raise UserError(f"RUN_DIR {str(run_dir)!r}: holds no trained model (neither {VOCAB_FILE} with checkpoints nor "
                    f"{META_FILE}); expected the --out directory of a training run")


@dataclass
class Exported:
    """One file written by :func:`export_run`: the export, its path and the seconds it took."""

    result: ExportResult
    path: Path
    seconds: float


def _check_out(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"--out {str(path)!r}: is a directory; expected a file name such as model.onnx")


def _write(files: list[Exported]) -> list[Exported]:
    for f in files:
        f.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(f.path, f.result.model.SerializeToString())
    return files


def _timed(spec: ModelSpec, path: Path, streaming: bool, opset: int, metadata: dict[str, Any]) -> Exported:
    t0 = time.perf_counter()
    result = spec.export(streaming, opset, metadata)
    return Exported(result, path, time.perf_counter() - t0)


def export_seq2seq(model: nn.Module, out: str | Path, *, opset: int = DEFAULT_OPSET,
                   metadata: dict[str, Any] | None = None) -> list[Exported]:
    """Write an encoder-decoder's two graphs (:func:`seq2seq_specs`) as ``out``'s
    :func:`seq2seq_paths`; the encoder file names its decoder file (``rnnkit.decoder``)."""
    paths = seq2seq_paths(Path(out))
    for p in paths.values():
        _check_out(p)
    meta = {**(metadata or {}), "rnnkit.task": "seq2seq"}
    specs = seq2seq_specs(model)
    files = [_timed(specs["encoder"], paths["encoder"], False, opset,
                    {**meta, "rnnkit.decoder": paths["decoder"].name}),
             _timed(specs["decoder"], paths["decoder"], True, opset, meta)]
    return _write(files)


def export_run(run_dir: str | Path, out: str | Path | None = None, *, streaming: bool = False,
               opset: int = DEFAULT_OPSET, checkpoint: str | None = None) -> list[Exported]:
    """Export the model of a run directory: one file (``RUN_DIR/model.onnx``, or
    ``model.streaming.onnx``), or for a seq2seq run the encoder and decoder-step graphs
    (``model.encoder.onnx``, ``model.decoder.onnx``). ``checkpoint`` None: the task's default (the
    language models' latest, seq2seq's best)."""
    run_dir = Path(run_dir)
    if run_dir.is_dir() and _is_seq2seq(run_dir):
        from ..tasks.seq2seq import load_run
        from ..train.config import config_to_dict

        if streaming:
            raise UserError("--streaming: a seq2seq run always exports its encoder graph and its decoder-step "
                            "graph (the decoder's one-step form); leave --streaming out")
        run = load_run(run_dir, checkpoint or "best")
        meta = {"rnnkit.vocab": run.vocabs.to_dict(), "rnnkit.config": config_to_dict(run.config),
                "rnnkit.checkpoint_step": run.step}
        return export_seq2seq(run.model, out if out is not None else run_dir / "model.onnx", opset=opset,
                              metadata=meta)
    make, meta = load_run_spec(run_dir, checkpoint)
    path = Path(out) if out is not None else run_dir / ("model.streaming.onnx" if streaming else "model.onnx")
    _check_out(path)
    return _write([_timed(make(streaming), path, streaming, opset, meta)])


__all__ = ["ModelSpec", "lm_spec", "classify_spec", "label_spec", "embed_spec", "anomaly_spec", "forecast_spec",
           "seq2seq_specs", "seq2seq_paths", "Exported", "load_run_spec", "export_run", "export_seq2seq"]
