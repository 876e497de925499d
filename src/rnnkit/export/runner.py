"""``OnnxRunner``: an exported file in onnxruntime, for whole sequences, streaming and generation.

A streaming graph written by ``rnnkit export --streaming`` records in its metadata which inputs carry
the recurrent state and which outputs return it (``rnnkit.state``: pairs ``[input, output]``), so the
runner can keep the state between calls: ``step`` feeds one time step and carries the state on, and
``generate`` runs the language models' sampler (:func:`rnnkit.tasks.decoding.generate`) with the graph
as its model, so the same seed and sampling options write the same text as ``rnnkit charlm sample``.
:class:`OnnxSeq2Seq` does the same for an exported encoder-decoder: its encoder graph and decoder-step
graph are the model of the task's greedy and beam search. :func:`anomaly_detector` puts the task's
anomaly detector around an exported predictor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..errors import UserError

_NP_DTYPE = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Options for low latency: every graph optimisation, sequential execution, ``threads`` intra-op
    threads (None: onnxruntime's default, one per core) and one inter-op thread."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only
    return opts


class OnnxRunner:
    """An ONNX file written by :func:`rnnkit.export.to_onnx`, loaded in onnxruntime.

    Args:
        path: the ``.onnx`` file (or its bytes).
        threads: intra-op threads; None = 1 for a streaming graph (one small step gains nothing from
            more), onnxruntime's default for a sequence graph.
    """

    def __init__(self, path: str | os.PathLike | bytes, threads: int | None = None) -> None:
        if isinstance(path, bytes):
            data, self.path = path, None
        else:
            self.path = Path(path)
            if not self.path.is_file():
                raise UserError(f"--onnx {str(self.path)!r}: no such file (expected a file written by "
                                f"`rnnkit export`)")
            data = self.path.read_bytes()
        try:
            model = onnx.load_model_from_string(data)
        except Exception as e:  # protobuf's DecodeError and friends
            raise UserError(f"--onnx {str(self.path)!r}: not an ONNX model ({type(e).__name__})") from None
        self.metadata: dict[str, str] = {p.key: p.value for p in model.metadata_props}
        try:
            self.graph: str = self.meta("graph", "sequence")
            self.state_pairs: list[tuple[str, str]] = [tuple(p) for p in self.meta("state", [])]
        except ValueError:
            raise UserError(f"--onnx {str(self.path)!r}: malformed rnnkit metadata in the file") from None
        if threads is None and self.graph == "streaming":
            threads = 1
        try:
            self.session = ort.InferenceSession(data, session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's Fail / InvalidGraph
            raise UserError(f"--onnx {str(self.path)!r}: onnxruntime cannot load it ({str(e).splitlines()[0]})"
                            ) from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def meta(self, key: str, default: Any = None) -> Any:
        """A JSON metadata entry (``rnnkit.<key>``) of the file, decoded."""
        raw = self.metadata.get(f"rnnkit.{key}")
        return default if raw is None else json.loads(raw)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """One call of the graph: ``{input name: array}`` -> ``{output name: array}``."""
        missing = sorted(set(self.inputs) - set(feeds))
        if missing:
            raise UserError(f"inputs: missing {missing}; the graph takes {sorted(self.inputs)}")
        arrays = {}
        for name, value in feeds.items():
            if name not in self.inputs:
                raise UserError(f"inputs: unknown {name!r}; the graph takes {sorted(self.inputs)}")
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            arrays[name] = np.asarray(value, dtype=_NP_DTYPE.get(self.inputs[name].type))
        return dict(zip(self.outputs, self.session.run(self.outputs, arrays)))

    # ---- streaming -------------------------------------------------------------------------------
    def initial_state(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zero state for ``batch`` streams, keyed by the graph's state inputs."""
        state = {}
        for name, _ in self.state_pairs:
            info = self.inputs[name]
            shape = [d if isinstance(d, int) else batch for d in info.shape]
            state[name] = np.zeros(shape, dtype=_NP_DTYPE[info.type])
        return state

    def step(self, feeds: Mapping[str, Any], state: Mapping[str, np.ndarray] | None = None
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One step of a streaming graph: returns (outputs, the state for the next step)."""
        if self.graph != "streaming" or not self.state_pairs:
            raise UserError(f"--onnx {str(self.path)!r}: a {self.graph} graph; streaming needs a file written "
                            f"with `rnnkit export --streaming`")
        if state is None:
            first = next(iter(feeds.values()))
            state = self.initial_state(int(np.shape(first)[0]) if np.ndim(first) else 1)
        out = self.run({**feeds, **state})
        return out, {i: out[o] for i, o in self.state_pairs}

    def language_model(self) -> OnnxLM:
        """This streaming graph as a next-symbol model for :func:`rnnkit.tasks.decoding.generate`."""
        return OnnxLM(self)

    def generate(self, prime: Sequence[int] | torch.Tensor, length: int, **options: Any) -> list[int]:
        """:func:`rnnkit.tasks.decoding.generate` (the language models' sampler, same options and rule)
        with this streaming graph as the model."""
        from ..tasks.decoding import generate

        return generate(self.language_model(), prime, length, **options)


class _InferenceOnly:
    """What the decoding functions ask of a model besides its steps: ``parameters()`` (where inputs
    go: the CPU) and ``train()``/``eval()`` (nothing to switch in an exported graph)."""

    training = False
    _device = torch.zeros(0)

    def parameters(self) -> Iterator[torch.Tensor]:
        yield self._device

    def train(self, mode: bool = True) -> _InferenceOnly:
        return self

    def eval(self) -> _InferenceOnly:
        return self


class OnnxLM(_InferenceOnly):
    """A language model's streaming graph as a :class:`rnnkit.tasks.decoding.StepModel`.

    ``step`` is one call of the graph; calling it on a prefix (T, B) runs the steps one after another
    (the streaming graph has no time axis), so the prime costs T calls.
    """

    def __init__(self, runner: OnnxRunner) -> None:
        io = runner.meta("stream")
        if runner.graph != "streaming" or io is None:
            raise UserError(f"--onnx {str(runner.path)!r}: not a language model's streaming graph (export it with "
                            f"`rnnkit export RUN_DIR --streaming` from a charlm or wordlm run)")
        self.runner = runner
        self.token, self.logits = io["input"], io["output"]

    def step(self, x_t: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        out, state = self.runner.step({self.token: x_t}, state)
        return torch.from_numpy(out[self.logits]), state

    def __call__(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        logits = []
        for x_t in x:
            lg, state = self.step(x_t, state)
            logits.append(lg)
        return torch.stack(logits), state


class OnnxPredictor:
    """An anomaly prediction detector's graph called like its network: ``(x (1, T, C), state) ->
    (predictions (1, T, C), state)`` with the state in torch.nn layout; a streaming graph runs the T steps
    one after another, a sequence graph in one call."""

    def __init__(self, runner: OnnxRunner) -> None:
        self.runner = runner
        self.x, self.out = next(iter(runner.inputs)), runner.outputs[0]

    def __call__(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        r = self.runner
        names = [i for i, _ in r.state_pairs]
        feed_state = r.initial_state(x.shape[0]) if state is None else dict(zip(names, _parts(state)))
        if r.graph == "streaming":
            preds = []
            for t in range(x.shape[1]):
                out, feed_state = r.step({self.x: x[:, t]}, feed_state)
                preds.append(torch.from_numpy(out[self.out]))
            pred = torch.stack(preds, 1)
        else:
            out = r.run({self.x: x, **feed_state})
            feed_state = {i: out[o] for i, o in r.state_pairs}
            pred = torch.from_numpy(out[self.out])
        parts = tuple(torch.from_numpy(feed_state[n]) for n in names)
        return pred, (parts if len(parts) > 1 else parts[0])


@dataclass
class GraphState:
    """The decoder graph's inputs between two steps (torch tensors), each with its batch axis;
    ``select(index)`` takes the batch rows ``index`` (beam expansion and reordering)."""

    arrays: dict[str, torch.Tensor]
    batch_axes: dict[str, int]

    def select(self, index: torch.Tensor) -> GraphState:
        return GraphState({k: v.index_select(self.batch_axes[k], index) for k, v in self.arrays.items()},
                          self.batch_axes)


class OnnxSeq2Seq(_InferenceOnly):
    """An exported encoder-decoder (``rnnkit export`` of a seq2seq run) as a
    :class:`rnnkit.tasks.decoding.CondStepModel`: ``start`` is one call of the encoder graph, ``decode_step``
    one call of the decoder-step graph, so :func:`~rnnkit.tasks.decoding.greedy_search` and
    :func:`~rnnkit.tasks.decoding.beam_search` decode with it as with the PyTorch model.

    Args:
        path: the encoder file (``model.encoder.onnx``); its decoder file is the one it names, next to it.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.encoder = OnnxRunner(path, threads)
        if self.encoder.meta("task") != "seq2seq" or self.encoder.meta("graph_role") != "encoder":
            raise UserError(f"--onnx {str(path)!r}: not the encoder graph of an exported seq2seq model (expected "
                            f"the *.encoder.onnx file written by `rnnkit export RUN_DIR` of a seq2seq run)")
        self.decoder = OnnxRunner(Path(path).parent / self.encoder.meta("decoder"), threads)
        self.context: list[str] = self.decoder.meta("context")
        self.state_pairs = self.decoder.state_pairs
        self.attention = "attention" in self.decoder.outputs
        self.batch_axes = {name: list(info.shape).index("B") for name, info in self.decoder.inputs.items()}

    def start(self, src: torch.Tensor, src_len: torch.Tensor) -> GraphState:
        out = self.encoder.run({"src": src, "src_len": src_len})
        return GraphState({k: torch.from_numpy(v) for k, v in out.items()}, self.batch_axes)

    def decode_step(self, tok: torch.Tensor, st: GraphState) -> tuple[torch.Tensor, GraphState, torch.Tensor | None]:
        out = self.decoder.run({"token": tok, **st.arrays})
        arrays = dict(st.arrays)
        arrays.update({i: torch.from_numpy(out[o]) for i, o in self.state_pairs})
        w = torch.from_numpy(out["attention"]) if self.attention else None
        return torch.from_numpy(out["logits"]), GraphState(arrays, self.batch_axes), w


def seq2seq_run(path: str | os.PathLike) -> Any:
    """An exported encoder-decoder as a :class:`rnnkit.tasks.seq2seq.LoadedRun` whose model is the pair of
    graphs (``rnnkit seq2seq translate --onnx FILE``): config and vocabularies from the encoder's metadata."""
    from ..data.pairs import PairVocabs
    from ..tasks.seq2seq import LoadedRun, Seq2SeqConfig
    from ..train import config_from_dict

    model = OnnxSeq2Seq(path)
    r = model.encoder
    return LoadedRun(Path(path), config_from_dict(Seq2SeqConfig, r.meta("config")),
                     PairVocabs.from_dict(r.meta("vocab")), model, r.meta("checkpoint_step", 0))


def _parts(state: Any) -> tuple[Any, ...]:
    return state if isinstance(state, tuple) else (state,)


def anomaly_detector(path: str | os.PathLike) -> Any:
    """The :class:`rnnkit.tasks.anomaly.Detector` of an exported prediction detector, scoring with
    onnxruntime; ``.stream()`` scores points as they arrive (with the streaming graph: one step each)."""
    from ..tasks.anomaly import AnomalyConfig, Detector
    from ..train import config_from_dict

    runner = OnnxRunner(path)
    info = runner.meta("model") or {}
    if runner.meta("task") != "anomaly" or info.get("config", {}).get("model", {}).get("detector") == "reconstruction":
        raise UserError(f"--onnx {str(path)!r}: not an exported anomaly prediction detector (export the run of "
                        f"`rnnkit anomaly fit` with model.detector='prediction')")
    return Detector.from_meta(info, config_from_dict(AnomalyConfig, info["config"]), OnnxPredictor(runner))


def lm_run(path: str | os.PathLike, task: str) -> Any:
    """An exported language model as a :class:`rnnkit.tasks.lm.LoadedRun` whose model is its streaming
    graph, for the task's ``sample_run`` (``rnnkit charlm sample --onnx FILE``)."""
    from ..data.text import vocab_from_dict
    from ..tasks.lm import LoadedRun

    runner = OnnxRunner(path)
    found = runner.meta("task")
    if found != task:
        what = f"a {found} model" if found else "not a model exported from an rnnkit run"
        raise UserError(f"--onnx {str(path)!r}: {what}; `rnnkit {task} sample --onnx` needs a {task} run's "
                        f"streaming graph (rnnkit export RUN_DIR --streaming)")
    return LoadedRun(Path(path), None, vocab_from_dict(runner.meta("vocab")), runner.language_model(),
                     runner.meta("checkpoint_step", 0))


__all__ = ["OnnxRunner", "OnnxLM", "OnnxPredictor", "OnnxSeq2Seq", "GraphState", "session_options", "lm_run",
           "seq2seq_run", "anomaly_detector"]
