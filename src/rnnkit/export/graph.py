"""``to_onnx``: a whole model to one ONNX graph, its recurrent stacks mapped layer by layer.

torch's exporter (``torch.onnx.export``, dynamo) traces the model with every
:class:`rnnkit.Recurrent` call replaced by a placeholder operator (``rnnkit.export.Recurrent``); each
placeholder is then replaced by the nodes of :mod:`rnnkit.export.recurrent` (the ONNX ``LSTM`` /
``GRU`` / ``RNN`` operator, or a ``Scan`` of the cell's step), so everything around the recurrence
(embeddings, heads, pooling, losses of the task) is exported by torch and the recurrence by us.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import helper
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import UserError
from ..layers import Recurrent
from .recurrent import LayerMapping, Nodes, Weights, operators, quiet_exporter, stack_nodes

DEFAULT_OPSET = 18  # torch's exporter writes this opset; others are converted from it
DOMAIN = "rnnkit.export"
_LAYERS: dict[int, tuple[Recurrent, str]] = {}  # placeholder id -> (stack, its path), during one export


# ---- the placeholder -------------------------------------------------------------------------------
# One op for any cell: the states travel stacked, (S, L*D, B, H), so the signature does not depend on S.
@torch.library.custom_op("rnnkit_export::recurrent", mutates_args=())
def _recurrent(x: Tensor, states: Tensor, lengths: Tensor | None, layer_id: int, out_size: int
               ) -> tuple[Tensor, Tensor]:
    raise RuntimeError("rnnkit_export::recurrent is a placeholder for ONNX export; it never runs")


@_recurrent.register_fake
def _(x, states, lengths, layer_id, out_size):
    return x.new_empty(x.shape[0], x.shape[1], out_size), states.new_empty(states.shape)


def _register_schema() -> None:
    if onnx.defs.has("Recurrent", DOMAIN):
        return
    F, S = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema
    schema = S("Recurrent", DOMAIN, 1,
               inputs=[F("X", "T"), F("states", "T"),
                       F("lengths", "I", param_option=S.FormalParameterOption.Optional)],
               outputs=[F("Y", "T"), F("final_states", "T")],
               type_constraints=[("T", ["tensor(float)", "tensor(double)"], ""), ("I", ["tensor(int64)"], "")],
               attributes=[S.Attribute("layer_id", S.AttrType.INT, "")])
    onnx.defs.register_schema(schema)


_REGISTRIES: dict[int, Any] = {}


@contextlib.contextmanager
def _exporter_registry() -> Iterator[dict[Any, Any] | None]:
    """torch's table of ONNX translations, built once per process instead of at every export (it takes
    seconds), with the placeholders' translations in it. Yields the ``custom_translation_table`` still
    to pass (None when the cached table is in use; the table itself where torch's internals differ)."""
    try:
        from torch.onnx._internal.exporter import _registration

        original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    except (ImportError, AttributeError, KeyError):  # pragma: no cover - other torch versions
        yield _translations()
        return

    def cached(cls: Any, opset_version: int = DEFAULT_OPSET) -> Any:
        if opset_version not in _REGISTRIES:
            registry = original.__func__(cls, opset_version=opset_version)
            for op, fn in _translations().items():
                registry.register_op(op, fn)
            _REGISTRIES[opset_version] = registry
        return _REGISTRIES[opset_version]

    _registration.ONNXRegistry.from_torchlib = classmethod(cached)
    try:
        yield None
    finally:
        _registration.ONNXRegistry.from_torchlib = original


@functools.cache
def _translations() -> dict[Any, Any]:
    import onnxscript

    _register_schema()
    ops = onnxscript.values.Opset(DOMAIN, 1)

    def recurrent(x, states, lengths, layer_id: int, out_size: int):
        return ops.Recurrent(x, states, lengths, layer_id=layer_id, _num_outputs=2)

    return {torch.ops.rnnkit_export.recurrent.default: recurrent}


def _placeholder_forward(self: Recurrent, input: Tensor | PackedSequence, state: Any = None,
                         lengths: Tensor | Sequence[int] | None = None) -> tuple[Tensor, Any]:
    """``Recurrent.forward`` while exporting: the same shapes, computed by one placeholder node."""
    if isinstance(input, PackedSequence):
        raise UserError(f"layer {_LAYERS[self._export_id][1]!r}: a PackedSequence input cannot be exported; "
                        f"pass the padded tensor and lengths=")
    x = input
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(1)
    elif self.batch_first:
        x = x.transpose(0, 1)
    B = x.shape[1]
    LD, H, S = self.num_layers * self.num_directions, self.hidden_size, self.cell.state_size
    if state is None:
        states = x.new_zeros(S, LD, B, H)
    else:
        parts = tuple(state) if S > 1 else (state,)
        states = torch.stack([p.unsqueeze(1) if unbatched else p for p in parts])  # (S, L*D, B, H)
    lens = None if lengths is None else torch.as_tensor(lengths).to(torch.int64)
    y, finals = torch.ops.rnnkit_export.recurrent(x, states, lens, self._export_id, self.num_directions * H)
    final = tuple(f.squeeze(1) if unbatched else f for f in finals.unbind(0))
    if unbatched:
        y = y.squeeze(1)
    elif self.batch_first:
        y = y.transpose(0, 1)
    return y, (final if S > 1 else final[0])


@contextlib.contextmanager
def _placeholders(module: nn.Module) -> Iterator[list[tuple[Recurrent, str]]]:
    """Replace every Recurrent's forward (on the instances) with the placeholder forward."""
    stacks = [(m, name) for name, m in module.named_modules() if isinstance(m, Recurrent)]
    _LAYERS.clear()
    for i, (m, name) in enumerate(stacks):
        _LAYERS[i] = (m, name)
        m._export_id = i
        m.forward = types.MethodType(_placeholder_forward, m)
    try:
        yield stacks
    finally:
        for m, _ in stacks:
            del m.forward
            del m._export_id
        _LAYERS.clear()


# ---- export ------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    """An exported model: the ONNX ``model``, how each recurrent stack was mapped, and the opset."""

    model: onnx.ModelProto
    mappings: list[LayerMapping]
    opset: int
    streaming: bool
    metadata: dict[str, str] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(self.model, str(path))
        return path

    def describe(self) -> list[str]:
        return [m.describe() for m in self.mappings]


def to_onnx(module: nn.Module, args: tuple[Tensor, ...], *, input_names: Sequence[str],
            output_names: Sequence[str], dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
            streaming: bool = False, opset: int = DEFAULT_OPSET,
            metadata: Mapping[str, Any] | None = None) -> ExportResult:
    """Export ``module(*args)`` to ONNX, every :class:`rnnkit.Recurrent` in it mapped per layer.

    Args:
        module: the model (exported in eval mode; each submodule's mode is restored afterwards).
        args: example inputs, one tensor per graph input (their sizes only serve tracing; give
            dynamic axes an example size of at least 2).
        input_names, output_names: names of the graph's inputs and outputs.
        dynamic_axes: ``{input name: {axis: symbol}}``; axes sharing a symbol have equal sizes
            (e.g. ``{"tokens": {0: "T", 1: "B"}, "h0": {1: "B"}}``).
        streaming: the module runs one time step (its stacks get T = 1 and no lengths): their
            cells are written inline instead of as a Scan; a bidirectional stack is an error.
        opset: ONNX opset of the file (default 18; lower ones are converted, if every operator
            the model needs exists there).
        metadata: extra ``key: value`` pairs stored in the file (values JSON-encoded).
    Returns:
        an :class:`ExportResult` whose ``mappings`` say which mapping each stack got.
    """
    if len(input_names) != len(args):
        raise ValueError(f"input_names: expected {len(args)} names (one per argument), got {list(input_names)}")
    dynamic_axes = dict(dynamic_axes or {})
    unknown = sorted(set(dynamic_axes) - set(input_names))
    if unknown:
        raise ValueError(f"dynamic_axes: unknown input(s) {unknown}; inputs are {list(input_names)}")
    dims: dict[str, Any] = {}
    specs = [{axis: dims.setdefault(sym, torch.export.Dim(sym, min=1)) for axis, sym in
              dynamic_axes.get(n, {}).items()} or None for n in input_names]
    dynamic_shapes = {f"arg{i}": spec for i, spec in enumerate(specs)}
    modes = [(m, m.training) for m in module.modules()]  # each its own: a child may be in eval already
    module.eval()
    try:
        with _placeholders(module) as stacks, quiet_exporter(), _exporter_registry() as table:
            if streaming:
                for m, name in stacks:
                    if m.bidirectional:
                        raise UserError(f"layer {name!r} is bidirectional: a streaming graph steps forward in "
                                        f"time only; export the sequence graph (without --streaming) instead")
            prog = torch.onnx.export(_Positional(module, len(args)), tuple(args), dynamo=True,
                                     input_names=list(input_names), output_names=list(output_names),
                                     dynamic_shapes=dynamic_shapes, custom_translation_table=table,
                                     opset_version=DEFAULT_OPSET, verbose=False)
            model = prog.model_proto
            mappings = _splice(model, dict(enumerate(stacks)), streaming)
    finally:
        for m, training in modes:
            m.training = training
    meta = dict(metadata or {})
    meta["rnnkit.graph"] = "streaming" if streaming else "sequence"
    meta["rnnkit.mapping"] = [m.describe() for m in mappings]
    meta = {k: json.dumps(v) for k, v in meta.items()}
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    model = convert_opset(model, opset, mappings)
    onnx.checker.check_model(model, full_check=True)
    return ExportResult(model, mappings, opset, streaming, meta)


class _Positional(nn.Module):
    """``module`` behind a forward with one named parameter per graph input, so torch.export can match
    each input with its dynamic axes whatever the module's own signature (``*args``, defaults)."""

    def __init__(self, module: nn.Module, n_inputs: int) -> None:
        super().__init__()
        self.inner = module

        def forward(*args: Tensor) -> Any:
            return self.inner(*args)

        forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(f"arg{i}", inspect.Parameter.POSITIONAL_OR_KEYWORD) for i in range(n_inputs)])
        self.forward = forward


def _splice(model: onnx.ModelProto, stacks: dict[int, tuple[Recurrent, str]], streaming: bool
            ) -> list[LayerMapping]:
    """Replace every placeholder node of ``model`` by the nodes of its recurrent stack."""
    graph = model.graph
    weights = Weights()
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    mappings: list[LayerMapping] = []
    calls: dict[str, int] = {}
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        layer_id = next(a.i for a in node.attribute if a.name == "layer_id")
        layer, path = stacks[layer_id]
        calls[path] = calls.get(path, 0) + 1
        b = Nodes(f"{path or 'rnn'}#{calls[path]}")
        ins = list(node.input) + [""] * (3 - len(node.input))
        mapping = stack_nodes(b, weights, layer, path, ins[0], ins[1], ins[2] or None, list(node.output),
                              streaming)
        if calls[path] == 1:
            mappings.append(mapping)
        nodes.extend(b.nodes)
        initializers.extend(b.initializers)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    graph.initializer.extend(weights.initializers.values())
    keep = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    if not any(o.domain in ("", "ai.onnx") for o in keep):
        model.opset_import.append(helper.make_opsetid("", DEFAULT_OPSET))
    return mappings


# ---- opsets ------------------------------------------------------------------------------------------
def _first_version() -> dict[str, int]:
    first: dict[str, int] = {}
    for s in onnx.defs.get_all_schemas_with_history():
        if s.domain in ("", "ai.onnx"):
            first[s.name] = min(first.get(s.name, s.since_version), s.since_version)
    return first


def convert_opset(model: onnx.ModelProto, opset: int, mappings: Sequence[LayerMapping] = ()) -> onnx.ModelProto:
    """``model`` at ``opset``: unchanged at the default, else converted; an operator that does not exist
    at ``opset`` is a :class:`UserError` naming it and the opset it needs."""
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset > newest:
        raise UserError(f"--opset: expected an integer opset up to {newest} (this onnx package's newest), "
                        f"got {opset!r}")
    if opset == DEFAULT_OPSET:
        return model
    first = _first_version()
    needs = sorted({(first.get(op, 1), op) for op in operators(model.graph.node)}, reverse=True)
    if needs and needs[0][0] > opset:
        version, op = needs[0]
        users = [m.describe() for m in mappings if op in m.operators]
        where = f" (used by {'; '.join(users)})" if users else ""
        raise UserError(f"--opset {opset}: too old for the ONNX operator {op}, which exists from opset {version}"
                        f"{where}; use --opset {version} or later (default {DEFAULT_OPSET})")
    try:
        from onnx import version_converter

        return version_converter.convert_version(model, opset)
    except Exception as e:  # the converter raises plain RuntimeErrors with its adapter's message
        why = str(e).strip().splitlines()[-1].rpartition("failed: ")[2]
        raise UserError(f"--opset {opset}: onnx's version converter cannot take this model from opset "
                        f"{DEFAULT_OPSET} to {opset} ({why}); use --opset {DEFAULT_OPSET}") from None
