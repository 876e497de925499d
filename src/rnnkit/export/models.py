"""What each task's model looks like as an ONNX graph: its inputs, outputs and streaming step.

A :class:`ModelSpec` names the graph's inputs and outputs, gives example inputs for tracing, the
dynamic axes, and which inputs/outputs carry the recurrent state, for the sequence graph or the
streaming (one step) graph of a model. :func:`spec_for` picks the spec of a model by its class.
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
    return [("h0", "h"), ("c0", "c")][:stack.cell.state_size]


def _state_args(stack: Recurrent, B: int) -> tuple[Tensor, ...]:
    dtype = stack.layer_weights(0)["weight_ih"].dtype
    LD = stack.num_layers * stack.num_directions
    return tuple(torch.zeros(LD, B, stack.hidden_size, dtype=dtype) for _ in range(stack.cell.state_size))


def _pack(state: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def _unpack(state: tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    return state if len(state) == 2 else state[0]


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
    """:class:`rnnkit.tasks.charlm.RecurrentLM`: tokens (T, B) [or token (B,)] and the state in;
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


# ---- the registry ------------------------------------------------------------------------------------
def _specs() -> dict[type, Callable[[nn.Module, bool], ModelSpec]]:
    from ..tasks.charlm import RecurrentLM

    return {RecurrentLM: lm_spec}


def spec_for(model: nn.Module, streaming: bool) -> ModelSpec:
    """The export spec of a task's model (by its class)."""
    for cls, make in _specs().items():
        if isinstance(model, cls):
            return make(model, streaming)
    known = ", ".join(sorted(c.__name__ for c in _specs()))
    raise UserError(f"model: no ONNX export for a {type(model).__name__}; exportable models: {known} "
                    f"(or call rnnkit.export.to_onnx on it directly)")


# ---- run directories ---------------------------------------------------------------------------------
def _check_checkpoints(run_dir: Path) -> None:
    """A run whose checkpoints all fail their checks is an error that says so (not 'no checkpoint')."""
    from ..train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint

    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        return
    errors = []
    for step, path in reversed(found):
        try:
            load_checkpoint(path)
            return
        except CheckpointError as e:
            errors.append(f"step {step}: {e}")
    raise UserError(f"RUN_DIR {str(run_dir)!r}: every checkpoint fails its checks ({'; '.join(errors[:3])}); "
                    f"the run has no usable model")


def load_run_model(run_dir: str | Path, checkpoint: str = "latest") -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a run directory (eval mode, CPU) and the metadata to store with its export."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR {str(run_dir)!r}: no such directory (expected the --out of a training run)")
    _check_checkpoints(run_dir)
    from ..tasks import charlm

    if (run_dir / charlm.VOCAB_FILE).is_file():
        from ..data.text import CharVocab, vocab_from_dict
        from ..tasks.wordlm import WordLMConfig

        vocab = vocab_from_dict(json.loads((run_dir / charlm.VOCAB_FILE).read_text(encoding="utf-8")))
        task = "charlm" if isinstance(vocab, CharVocab) else "wordlm"
        run = charlm.load_run(run_dir, charlm.CharLMConfig if task == "charlm" else WordLMConfig,
                              checkpoint=checkpoint)
        return run.model, {"rnnkit.task": task, "rnnkit.vocab": vocab.to_dict(),
                           "rnnkit.checkpoint_step": run.step}
    raise UserError(f"RUN_DIR {str(run_dir)!r}: holds no trained model (no config.toml with checkpoints of a "
                    f"task that can be exported); expected the --out directory of a training run")


def export_run(run_dir: str | Path, out: str | Path | None = None, *, streaming: bool = False,
               opset: int = DEFAULT_OPSET, checkpoint: str = "latest") -> tuple[ExportResult, Path, float]:
    """Export the model of a run directory; returns (result, file written, seconds the export took)."""
    run_dir = Path(run_dir)
    model, meta = load_run_model(run_dir, checkpoint)
    path = Path(out) if out is not None else run_dir / ("model.streaming.onnx" if streaming else "model.onnx")
    if path.is_dir():
        raise UserError(f"--out {str(path)!r}: is a directory; expected a file name such as model.onnx")
    t0 = time.perf_counter()
    result = spec_for(model, streaming).export(streaming, opset, meta)
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, result.model.SerializeToString())
    return result, path, seconds


__all__ = ["ModelSpec", "spec_for", "lm_spec", "load_run_model", "export_run"]
