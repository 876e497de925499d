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

import numpy as np
import onnx
import onnx.inliner
import onnx.numpy_helper
import torch
from onnx import helper
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import UserError
from ..layers import Recurrent
from .recurrent import LayerMapping, Nodes, Weights, quiet_exporter, stack_nodes, walk

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
    if self._export_streaming and self.bidirectional:
        _bidirectional_stream(self)
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


def _bidirectional_stream(self: Recurrent, *args: Any, **kwargs: Any) -> Any:
    raise UserError(f"layer {_LAYERS[self._export_id][1]!r} is bidirectional: a streaming graph steps forward in "
                    f"time only; export the sequence graph (without --streaming) instead")


@contextlib.contextmanager
def _placeholders(module: nn.Module, streaming: bool) -> Iterator[list[tuple[Recurrent, str]]]:
    """Replace every Recurrent's forward (on the instances) with the placeholder forward; in a streaming
    graph, calling a bidirectional stack (forward or step) is an error naming it."""
    stacks = [(m, name) for name, m in module.named_modules() if isinstance(m, Recurrent)]
    _LAYERS.clear()
    for i, (m, name) in enumerate(stacks):
        _LAYERS[i] = (m, name)
        m._export_id, m._export_streaming = i, streaming
        m.forward = types.MethodType(_placeholder_forward, m)
        if streaming and m.bidirectional:
            m.step = types.MethodType(_bidirectional_stream, m)
    try:
        yield stacks
    finally:
        for m, _ in stacks:
            del m.forward, m._export_id, m._export_streaming
            m.__dict__.pop("step", None)
        _LAYERS.clear()


def _user_error_in(e: BaseException) -> UserError | None:
    """The UserError that caused ``e`` (torch's exporter wraps what tracing raised), or None."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, UserError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


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
            cells are written inline instead of as a Scan; calling a bidirectional stack is an
            error naming it (an unused one, e.g. an encoder beside a decoder step, is fine).
        opset: ONNX opset of the file (default 18; older ones down to 13 are converted by
            :func:`convert_opset`, or refused naming the operator that needs a newer one).
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
        with _placeholders(module, streaming) as stacks, quiet_exporter(), _exporter_registry() as table:
            try:
                prog = torch.onnx.export(_Positional(module, len(args)), tuple(args), dynamo=True,
                                         input_names=list(input_names), output_names=list(output_names),
                                         dynamic_shapes=dynamic_shapes, custom_translation_table=table,
                                         opset_version=DEFAULT_OPSET, verbose=False)
            except Exception as e:
                found = _user_error_in(e)
                if found is None:
                    raise
                raise UserError(str(found)) from None
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
# A file is written at DEFAULT_OPSET and taken to an older opset node by node (subgraphs included): an
# operator's version there must mean the same for this node. The steps below are the changes between
# opset 13 and DEFAULT_OPSET that leave a node's meaning unchanged unless it uses what they added:
# wider type lists (the checker's type inference then checks the node's types), or an attribute whose
# default is the old behaviour, or an input turned into an attribute. Any other change stops the
# conversion at that version. (onnx's version converter has no adapter for several of these and leaves
# Scan bodies unconverted.)
_TYPES_ONLY = {("Add", 14), ("Sub", 14), ("Mul", 14), ("Div", 14), ("Relu", 14), ("CumSum", 14), ("Identity", 14),
               ("Identity", 16), ("Pow", 15), ("If", 16), ("Loop", 16), ("Scan", 16), ("Where", 16),
               ("LessOrEqual", 16), ("GreaterOrEqual", 16), ("LeakyRelu", 16), ("PRelu", 16)}
_NEW_ATTRIBUTE = {("Reshape", 14): ("allowzero", 0), ("Shape", 15): ("start", 0), ("LSTM", 14): ("layout", 0),
                  ("GRU", 14): ("layout", 0), ("RNN", 14): ("layout", 0),
                  ("ScatterElements", 16): ("reduction", b"none"), ("ScatterND", 16): ("reduction", b"none")}
_AXES_INPUT = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
               "ReduceLogSumExp", "ReduceSumSquare"}  # at 18 their axes became an input


def _attr(node: onnx.NodeProto, name: str) -> onnx.AttributeProto | None:
    return next((a for a in node.attribute if a.name == name), None)


def _drop_attr(node: onnx.NodeProto, name: str) -> None:
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep)


def _step_down(node: onnx.NodeProto, version: int, consts: Mapping[str, np.ndarray],
               apply: bool) -> list[onnx.NodeProto] | None:
    """The nodes that compute ``node`` at the version before ``version`` of its operator, or None where
    none do. Without ``apply`` only the answer counts (``node`` is left as it is)."""
    op = node.op_type
    if (op, version) in _TYPES_ONLY:
        return [node]
    if (op, version) == ("Shape", 15):  # start / end became attributes: slice the whole shape instead
        start, end = _attr(node, "start"), _attr(node, "end")
        if not apply or ((start is None or start.i == 0) and end is None):
            return [node]
        out = node.output[0]
        node.output[0] = f"{out}/shape"
        bounds = {"starts": start.i if start is not None else 0,
                  "ends": end.i if end is not None else np.iinfo(np.int64).max, "axes": 0}
        consts_nodes = [helper.make_node("Constant", [], [f"{out}/{k}"], name=f"{out}/{k}",
                                         value=onnx.numpy_helper.from_array(np.array([v], dtype=np.int64)))
                        for k, v in bounds.items()]
        _drop_attr(node, "start")
        _drop_attr(node, "end")
        return consts_nodes + [node, helper.make_node("Slice", [f"{out}/shape"] + [f"{out}/{k}" for k in bounds],
                                                      [out], name=f"{out}/slice")]
    if (op, version) in _NEW_ATTRIBUTE:
        name, default = _NEW_ATTRIBUTE[(op, version)]
        a = _attr(node, name)
        # allowzero=1 differs from the old meaning only where the target shape holds a 0
        same = op == "Reshape" and node.input[1] in consts and bool(np.all(consts[node.input[1]] != 0))
        if a is not None and onnx.helper.get_attribute_value(a) != default and not same:
            return None
        if apply:
            _drop_attr(node, name)
        return [node]
    if version == 18 and op in _AXES_INPUT:
        noop = _attr(node, "noop_with_empty_axes")
        axes = node.input[1] if len(node.input) > 1 and node.input[1] else None
        if (noop is not None and noop.i != 0) or (axes is not None and axes not in consts):
            return None
        if apply:
            _drop_attr(node, "noop_with_empty_axes")
            if axes is not None:
                node.attribute.append(helper.make_attribute("axes", [int(v) for v in consts[axes].ravel()]))
                del node.input[1:]
        return [node]
    if (op, version) == ("Split", 18):  # without `split`, Split-13 cuts into len(outputs) equal parts
        n = _attr(node, "num_outputs")
        if n is not None and (n.i != len(node.output) or (len(node.input) > 1 and node.input[1])):
            return None
        if apply:
            _drop_attr(node, "num_outputs")
        return [node]
    if (op, version) == ("Pad", 18):  # the axes input was added
        if len(node.input) > 3 and node.input[3]:
            return None
        if apply:
            del node.input[3:]
        return [node]
    return None


def _lowest(node: onnx.NodeProto, consts: Mapping[str, np.ndarray]) -> int:
    """The oldest opset at which ``node`` keeps its meaning (through the steps above)."""
    version = onnx.defs.get_schema(node.op_type, DEFAULT_OPSET).since_version
    while version > 1:
        try:
            older = onnx.defs.get_schema(node.op_type, version - 1).since_version
        except onnx.defs.SchemaError:  # the operator does not exist before
            return version
        if _step_down(node, version, consts, apply=False) is None:
            return version
        version = older
    return version


def _convert_graph(graph: onnx.GraphProto, opset: int, consts: Mapping[str, np.ndarray]) -> None:
    """Rewrite every node of ``graph`` (and of its subgraphs) into its form at ``opset``."""
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _convert_graph(a.g, opset, consts)
        done = [node]
        version = onnx.defs.get_schema(node.op_type, DEFAULT_OPSET).since_version
        while version > onnx.defs.get_schema(node.op_type, opset).since_version:
            done = done[:-1] + (_step_down(done[-1], version, consts, apply=True) or [])
            version = onnx.defs.get_schema(node.op_type, version - 1).since_version
        nodes.extend(done)
    del graph.node[:]
    graph.node.extend(nodes)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of the initializers and Constant nodes of ``graph`` and its subgraphs, by name."""
    out = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out.update(_constants(a.g))
        value = _attr(node, "value")
        if node.op_type == "Constant" and value is not None:
            out[node.output[0]] = onnx.numpy_helper.to_array(value.t)
    return out


def convert_opset(model: onnx.ModelProto, opset: int, mappings: Sequence[LayerMapping] = ()) -> onnx.ModelProto:
    """``model`` at ``opset``: unchanged at the default, else rewritten node by node (see the steps
    above); a node that needs a newer opset is a :class:`UserError` naming its operator, the layer that
    uses it, and the oldest opset the whole model can take."""
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not 1 <= opset <= newest:
        raise UserError(f"--opset: expected an integer opset from 1 up to {newest} (this onnx package's newest), "
                        f"got {opset!r}")
    if opset == DEFAULT_OPSET:
        return model
    if opset > DEFAULT_OPSET:
        raise UserError(f"--opset {opset}: the export writes opset {DEFAULT_OPSET} or older; use --opset "
                        f"{DEFAULT_OPSET} or less")
    model = onnx.inliner.inline_local_functions(model) if model.functions else model
    consts = _constants(model.graph)
    nodes = list(walk(model.graph.node))
    needs = max(((_lowest(n, consts), n.op_type) for n in nodes), default=(1, ""))
    if needs[0] > opset:
        version, op = needs
        users = [m.describe() for m in mappings if op in m.operators]
        where = f" (used by {'; '.join(users)})" if users else ""
        try:
            onnx.defs.get_schema(op, version - 1)
            why = f"whose form in this model needs opset {version}"
        except onnx.defs.SchemaError:
            why = f"which exists from opset {version}"
        raise UserError(f"--opset {opset}: too old for the ONNX operator {op}, {why}{where}; use --opset {version} "
                        f"or later (default {DEFAULT_OPSET})")
    _convert_graph(model.graph, opset, consts)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = opset
    return model
