"""What each task's model looks like as an ONNX graph: its inputs, outputs and streaming step.

A :class:`ModelSpec` names the graph's inputs and outputs, gives example inputs for tracing, the
dynamic axes, and which inputs/outputs carry the recurrent state, for the sequence graph or the
streaming (one step) graph of a model. :func:`load_run_spec` loads a run directory through its task's
own loader and picks the spec; :func:`export_run` writes the file.
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
    raise UserError(f"RUN_DIR {str(run_dir)!r}: a {task!r} run; ONNX export covers charlm, wordlm, classify, "
                    f"embed, anomaly, forecast and label runs (seq2seq: call rnnkit.export.to_onnx on its model)")


def load_run_spec(run_dir: str | Path, checkpoint: str = "latest") -> tuple[Callable[[bool], ModelSpec],
                                                                           dict[str, Any]]:
    """The export spec maker (``streaming -> ModelSpec``) of a run directory's trained model, and the
    metadata to store with its export (task, vocabulary or model.json, checkpoint step)."""
    from ..tasks.base import META_FILE
    from ..tasks.lm import VOCAB_FILE

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR {str(run_dir)!r}: no such directory (expected the --out of a training run)")
    if (run_dir / VOCAB_FILE).is_file():
        _, make, meta = _lm_run(run_dir, checkpoint)
        return make, meta
    if (run_dir / META_FILE).is_file():
        if checkpoint != "latest":
            raise UserError(f"--checkpoint {checkpoint!r}: this run keeps its final model only "
                            f"({META_FILE}); leave --checkpoint out")
        info = json.loads((run_dir / META_FILE).read_text(encoding="utf-8"))
        _, make = _sample_run(run_dir, str(info.get("task")))
        return make, {"rnnkit.task": info.get("task"), "rnnkit.model": info}
    raise UserError(f"RUN_DIR {str(run_dir)!r}: holds no trained model (neither {VOCAB_FILE} with checkpoints nor "
                    f"{META_FILE}); expected the --out directory of a training run")


def export_run(run_dir: str | Path, out: str | Path | None = None, *, streaming: bool = False,
               opset: int = DEFAULT_OPSET, checkpoint: str = "latest") -> tuple[ExportResult, Path, float]:
    """Export the model of a run directory; returns (result, file written, seconds the export took)."""
    run_dir = Path(run_dir)
    make, meta = load_run_spec(run_dir, checkpoint)
    path = Path(out) if out is not None else run_dir / ("model.streaming.onnx" if streaming else "model.onnx")
    if path.is_dir():
        raise UserError(f"--out {str(path)!r}: is a directory; expected a file name such as model.onnx")
    t0 = time.perf_counter()
    result = make(streaming).export(streaming, opset, meta)
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, result.model.SerializeToString())
    return result, path, seconds


__all__ = ["ModelSpec", "lm_spec", "classify_spec", "label_spec", "embed_spec", "anomaly_spec", "forecast_spec",
           "load_run_spec", "export_run"]
