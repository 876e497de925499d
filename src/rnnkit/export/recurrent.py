"""ONNX nodes for one call of a recurrent stack (:class:`rnnkit.Recurrent`).

Each layer is mapped on its own, to one of:

* the standard ``LSTM`` / ``GRU`` / ``RNN`` operator, where the cell's math is exactly the
  operator's: the plain LSTM with any forget bias, peepholes (``P``), coupled gates (CIFG,
  ``input_forget=1``), the reset-after GRU (``linear_before_reset=1``) and the Cho GRU (``0``), the
  tanh/relu Elman RNN. Weights are re-ordered into ONNX's gate order (i, o, f, c for the LSTM and
  its peepholes i, o, f; z, r, h for the GRU); both directions of a layer share one node.
* a ``Scan`` whose body is the cell's own ``step()``, exported by torch, for every other cell
  (layer norm, dropped gates, no output activation, zoneout, and any cell added later). The layer's
  generic per-step rules are added around it: zoneout's expectation at evaluation and, with
  lengths, keeping the state past each sequence's end and zeroing the output there.

A streaming call (one time step, no lengths) uses the operator with T = 1, or the step's nodes
inline without a ``Scan``. Weights are initializers named after the module's parameters.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor

from ..cells import make_cell
from ..errors import UserError
from ..layers import Recurrent

# rnnkit gate order -> ONNX gate order (blocks of H rows)
_LSTM_ORDER = (0, 3, 1, 2)   # (i, f, g, o) -> (i, o, f, c)
_GRU_ORDER = (1, 0, 2)       # (r, z, n) -> (z, r, h)
_PEEPHOLE_ORDER = (0, 2, 1)  # (p_i, p_f, p_o) -> (P_i, P_o, P_f)
_ONNX_DTYPE = {torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE}

# Options each operator reproduces exactly, with the values it accepts; any other option (or value)
# sends the layer to the Scan of its cell's step().
_OPERATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "lstm": {"peephole": (False, True), "coupled": (False, True), "forget_bias": None,
             "drop_gates": ((),), "output_activation": (True,), "gate_activation": ("sigmoid",),
             "candidate_activation": ("tanh",), "layer_norm": (False,)},
    "gru": {"reset_after": (False, True), "layer_norm": (False,)},
    "rnn": {"nonlinearity": ("tanh", "relu"), "layer_norm": (False,)},
}


@dataclass(frozen=True)
class LayerMapping:
    """How one recurrent stack was exported (all its layers share the cell, so they share the mapping).

    Attributes:
        module: the stack's path in the exported model ("" for the model itself).
        cell: the cell and its options.
        mapping: "LSTM operator", "GRU operator", "RNN operator" or "Scan of the cell's step()"
            ("the cell's step(), inline" in a streaming graph).
        reason: why the operator could not be used (empty when it was).
        operators: the ONNX operators its nodes use (with those inside a Scan's body).
        layers, bidirectional: the stack's shape.
    """

    module: str
    cell: str
    mapping: str
    reason: str = ""
    operators: frozenset[str] = frozenset()
    layers: int = 1
    bidirectional: bool = False

    def describe(self) -> str:
        """One line, e.g. ``rnn layers 0-1 (bidirectional): lstm(peephole=True) -> LSTM operator``."""
        where = (self.module or "(model)") + (f" layers 0-{self.layers - 1}" if self.layers > 1 else " layer 0")
        where += " (bidirectional)" if self.bidirectional else ""
        return f"{where}: {self.cell} -> {self.mapping}" + (f" ({self.reason})" if self.reason else "")


def operator_for(layer: Recurrent) -> tuple[str | None, str]:
    """The ONNX operator that computes ``layer``'s cell exactly, or (None, the reason it cannot)."""
    cell = layer.cell
    accepted = _OPERATOR_OPTIONS.get(cell.family)
    if accepted is None:
        return None, f"no ONNX operator for the {cell.family!r} family"
    if layer.zoneout > 0:
        return None, f"zoneout={layer.zoneout} mixes each new state with the previous one"
    if layer.layer_weights(0)["weight_ih"].dtype != torch.float32:
        return None, f"float64: onnxruntime's {cell.family.upper()} operator computes float32 only"
    for key, value in cell.options().items():
        if key not in accepted:
            return None, f"option {key}={value!r} has no operator attribute"
        allowed = accepted[key]
        if allowed is not None and value not in allowed:
            return None, f"{key}={value!r}"
    if cell.family == "lstm" and cell.options().get("coupled") and not layer.bias:
        return None, "coupled gates without bias"  # input_forget is defined with the operator's bias
    return cell.family.upper(), ""


def cell_label(layer: Recurrent) -> str:
    defaults = make_cell(layer.cell.family, 1, bias=layer.bias).options()  # as the layer's repr
    opts = [f"{k}={v!r}" for k, v in layer.cell.options().items() if defaults.get(k) != v]
    for name in ("zoneout", "recurrent_dropout"):
        if getattr(layer, name):
            opts.append(f"{name}={getattr(layer, name)}")
    return f"{layer.cell.family}" + (f"({', '.join(opts)})" if opts else "")


# ---- graph building --------------------------------------------------------------------------------
@dataclass
class Nodes:
    """Nodes and initializers under construction, with fresh names under ``prefix``."""

    prefix: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    _count: int = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def add(self, op: str, inputs: list[str], n_out: int = 1, outputs: list[str] | None = None,
            **attrs: Any) -> list[str]:
        outs = outputs if outputs is not None else [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), **attrs))
        return outs

    def one(self, op: str, inputs: list[str], **attrs: Any) -> str:
        return self.add(op, inputs, **attrs)[0]

    def const(self, value: np.ndarray, hint: str = "const") -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64), "ints")


class Weights:
    """Initializers of a model's weights, one per (tensor, layout), shared by every use."""

    def __init__(self) -> None:
        self.initializers: dict[str, onnx.TensorProto] = {}

    def add(self, name: str, value: np.ndarray) -> str:
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.array(value, order="C"), name)
        return name


def _np(t: Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy()


def _reorder(a: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
    parts = np.split(a, len(order), axis=0)
    return np.concatenate([parts[i] for i in order], axis=0)


def _operator_weights(layer: Recurrent, k: int, path: str, weights: Weights) -> dict[str, str]:
    """W, R, B (and P) of layer ``k`` in the operator's layout, (D, G*H, in) etc., as initializers."""
    family = layer.cell.family
    order = {"lstm": _LSTM_ORDER, "gru": _GRU_ORDER, "rnn": (0,)}[family]
    per_dir = [layer.layer_weights(k, d) for d in range(layer.num_directions)]
    sfx = f"{path}.onnx_l{k}"
    out = {
        "W": weights.add(f"{sfx}.W", np.stack([_reorder(_np(w["weight_ih"]), order) for w in per_dir])),
        "R": weights.add(f"{sfx}.R", np.stack([_reorder(_np(w["weight_hh"]), order) for w in per_dir])),
    }
    if layer.bias:
        out["B"] = weights.add(f"{sfx}.B", np.stack([
            np.concatenate([_reorder(_np(w["bias_ih"]), order), _reorder(_np(w["bias_hh"]), order)])
            for w in per_dir]))
    if family == "lstm" and layer.cell.options().get("peephole"):
        out["P"] = weights.add(f"{sfx}.P", np.stack([_reorder(_np(w["weight_ch"]), _PEEPHOLE_ORDER)
                                                     for w in per_dir]))
    return out


def _operator_layer(b: Nodes, layer: Recurrent, k: int, x: str, h0: str, c0: str | None, lens32: str | None,
                    w: dict[str, str]) -> tuple[str, str, str | None]:
    """One layer through the ONNX operator: returns (output (T, B, D*H), final h (D, B, H), final c)."""
    family, D = layer.cell.family, layer.num_directions
    attrs: dict[str, Any] = {"hidden_size": layer.hidden_size,
                             "direction": "bidirectional" if D == 2 else "forward"}
    if family == "lstm" and layer.cell.options().get("coupled"):
        attrs["input_forget"] = 1
    if family == "gru":
        attrs["linear_before_reset"] = int(layer.cell.options()["reset_after"])
    if family == "rnn":
        act = "Relu" if layer.cell.options()["nonlinearity"] == "relu" else "Tanh"
        attrs["activations"] = [act] * D
    inputs = [x, w["W"], w["R"], w.get("B", ""), lens32 or "", h0]
    if family == "lstm":
        inputs += [c0, w.get("P", "")]
    while inputs and inputs[-1] == "":
        inputs.pop()
    outs = b.add(family.upper(), inputs, n_out=3 if family == "lstm" else 2, **attrs)
    y = b.one("Transpose", [outs[0]], perm=[0, 2, 1, 3])               # (T, D, B, H) -> (T, B, D, H)
    y = b.one("Reshape", [y, b.ints(0, 0, -1)])                        # (T, B, D*H)
    return y, outs[1], (outs[2] if family == "lstm" else None)


# ---- the cell's step(), exported by torch --------------------------------------------------------
_STEP_CACHE: dict[tuple, onnx.GraphProto] = {}


class _Step(torch.nn.Module):
    def __init__(self, cell: Any) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: Tensor, state: tuple[Tensor, ...], ws: dict[str, Tensor]) -> tuple[Tensor, ...]:
        w: dict[str, Tensor | None] = {"bias_ih": None, "bias_hh": None}
        w.update(ws)
        return tuple(self.cell.step(x, tuple(state), w))


@contextlib.contextmanager
def quiet_exporter():
    """Silence torch's exporter: its progress prints, log lines and its own deprecation warnings."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def step_graph(layer: Recurrent, in_size: int, dtype: torch.dtype) -> onnx.GraphProto:
    """The ONNX graph of ``layer.cell.step`` for inputs of width ``in_size``.

    Inputs ``x`` (B, in_size), the state components ``s0``, ``s1``... (B, H), then the weights as
    ``ws_<name>`` (``weight_ih``, ``bias_hh``, extras); outputs the new state components.
    Cached per cell configuration, width and dtype: the graph holds no weight values.
    """
    w0 = layer.layer_weights(0)
    names = tuple(sorted(n for n, v in w0.items() if v is not None))
    cell = layer.cell
    # the cell's identity: its class and, for declared cells, the declaration itself (two declared cells
    # share a class and may share options)
    key = (type(cell).__module__, type(cell).__qualname__, cell.family, repr(getattr(cell, "declaration", None)),
           repr(sorted(cell.options().items())), cell.hidden_size, cell.bias, in_size, dtype, names)
    if key in _STEP_CACHE:
        return _STEP_CACHE[key]
    H, S = layer.hidden_size, cell.state_size
    B = torch.export.Dim("B", min=1)
    x = torch.randn(2, in_size, dtype=dtype)
    state = tuple(torch.randn(2, H, dtype=dtype) for _ in range(S))
    ws = {}
    for n in names:
        shape = tuple(w0[n].shape)
        if n == "weight_ih":
            shape = (shape[0], in_size)
        ws[n] = torch.randn(shape, dtype=dtype)
    with quiet_exporter():
        prog = torch.onnx.export(_Step(cell), (x, state), kwargs={"ws": ws}, dynamo=True,
                                 dynamic_shapes={"x": {0: B}, "state": tuple({0: B} for _ in range(S)),
                                                 "ws": {n: None for n in names}},
                                 input_names=["x"] + [f"s{i}" for i in range(S)],
                                 output_names=[f"new_s{i}" for i in range(S)], opset_version=18, verbose=False)
    model = prog.model_proto
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    graph = model.graph
    _STEP_CACHE[key] = graph
    return graph


def _step_nodes(b: Nodes, layer: Recurrent, in_size: int, dtype: torch.dtype, w: dict[str, str | None],
                x: str, state: list[str], mask: str | None) -> tuple[list[str], str]:
    """The cell's step plus the layer's per-step rules, reading ``x``, ``state`` and ``mask`` (B, 1).

    Returns (new state names, output name). With ``mask`` (1 on valid steps) and/or zoneout ``p``:
    ``keep = 1 - mask * (1 - p)`` and ``state = keep * prev + (1 - keep) * new``; the output is
    ``state[0] * mask``.
    """
    g = step_graph(layer, in_size, dtype)
    rename: dict[str, str] = {"x": x}
    rename.update({f"s{i}": s for i, s in enumerate(state)})
    rename.update({f"ws_{n}": v for n, v in w.items() if v is not None})
    for init in g.initializer:
        t = onnx.TensorProto()
        t.CopyFrom(init)
        t.name = rename.setdefault(init.name, b.name("c"))
        b.initializers.append(t)

    def mapped(name: str) -> str:
        if name == "":
            return name
        if name not in rename:
            rename[name] = b.name("s")
        return rename[name]

    for node in g.node:
        n = onnx.NodeProto()
        n.CopyFrom(node)
        n.name = b.name("step")
        n.input[:] = [mapped(i) for i in node.input]
        n.output[:] = [mapped(o) for o in node.output]
        b.nodes.append(n)
    new = [mapped(o.name) for o in g.output]
    p = layer.zoneout
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}[dtype]
    if p > 0 or mask is not None:
        if mask is None:
            keep = b.const(np.array(p, dtype=np_dtype), "zoneout")
            move = b.const(np.array(1 - p, dtype=np_dtype), "one_minus_zoneout")
        else:
            move = mask if p == 0 else b.one("Mul", [mask, b.const(np.array(1 - p, dtype=np_dtype))])
            keep = b.one("Sub", [b.const(np.array(1, dtype=np_dtype), "one"), move])
        new = [b.one("Add", [b.one("Mul", [keep, s]), b.one("Mul", [move, n])]) for s, n in zip(state, new)]
    y = b.one("Mul", [new[0], mask]) if mask is not None else b.one("Identity", [new[0]])
    return new, y


def _scan_direction(b: Nodes, layer: Recurrent, in_size: int, dtype: torch.dtype, w: dict[str, str | None],
                    x: str, state0: list[str], mask: str | None, reverse: bool, H: int
                    ) -> tuple[str, list[str]]:
    """One direction of one layer as a Scan over the cell's step: returns (output (T, B, H), final state)."""
    onnx_t = _ONNX_DTYPE[dtype]
    body = Nodes(b.prefix + "/body")
    s_in = [b.name(f"body_s{i}") for i in range(len(state0))]
    x_in = b.name("body_x")
    m_in = b.name("body_m") if mask is not None else None
    new, y = _step_nodes(body, layer, in_size, dtype, w, x_in, s_in, m_in)
    outs = [body.one("Identity", [s]) for s in new] + [y]
    inputs = [helper.make_tensor_value_info(s, onnx_t, ["B", H]) for s in s_in]
    inputs.append(helper.make_tensor_value_info(x_in, onnx_t, ["B", in_size]))
    if m_in is not None:
        inputs.append(helper.make_tensor_value_info(m_in, onnx_t, ["B", 1]))
    graph = helper.make_graph(body.nodes, b.name("scan_body"), inputs,
                              [helper.make_tensor_value_info(o, onnx_t, None) for o in outs],
                              initializer=body.initializers)
    n_scan = 1 + (mask is not None)
    attrs: dict[str, Any] = {"body": graph, "num_scan_inputs": n_scan}
    if reverse:
        attrs["scan_input_directions"] = [1] * n_scan
        attrs["scan_output_directions"] = [1]
    res = b.add("Scan", state0 + [x] + ([mask] if mask is not None else []), n_out=len(state0) + 1, **attrs)
    return res[-1], res[:-1]


# ---- a whole stack -----------------------------------------------------------------------------------
def stack_nodes(b: Nodes, weights: Weights, layer: Recurrent, path: str, x: str, states: str,
                lengths: str | None, outputs: list[str], streaming: bool) -> LayerMapping:
    """Nodes computing ``layer(x, states, lengths)`` into ``outputs`` (y, final states).

    ``x`` is time-major (T, B, I); ``states`` stacks the cell's initial states, (S, L*D, B, H), and so
    does the second output; ``lengths`` is an int64 (B,) name or None. With ``streaming`` the call is
    one step (T = 1).
    """
    dtype = layer.layer_weights(0)["weight_ih"].dtype
    if dtype not in _ONNX_DTYPE:
        raise UserError(f"{path or 'model'}: parameters of dtype {dtype}; ONNX export takes float32 or float64 "
                        f"(convert the model with .float())")
    D, L, H, S = layer.num_directions, layer.num_layers, layer.hidden_size, layer.cell.state_size
    state0 = [b.one("Gather", [states, b.const(np.array(i, dtype=np.int64), "index")], axis=0)
              for i in range(S)]  # each (L*D, B, H)
    h0, c0 = state0[0], (state0[1] if S > 1 else None)
    op, reason = operator_for(layer)
    lens32 = mask = None
    if lengths is not None:
        if op is not None:
            lens32 = b.one("Cast", [lengths], to=TensorProto.INT32)
        else:
            T = b.one("Gather", [b.one("Shape", [x]), b.ints(0)], axis=0)            # (1,)
            T = b.one("Squeeze", [T])
            t = b.one("Range", [b.const(np.array(0, dtype=np.int64)), T, b.const(np.array(1, dtype=np.int64))])
            active = b.one("Less", [b.one("Unsqueeze", [t, b.ints(1)]), b.one("Unsqueeze", [lengths, b.ints(0)])])
            mask = b.one("Unsqueeze", [b.one("Cast", [active], to=_ONNX_DTYPE[dtype]), b.ints(2)])  # (T, B, 1)
    finals: list[list[str]] = [[] for _ in range(S)]
    layer_in = x
    for k in range(L):
        in_size = layer.input_size if k == 0 else D * H
        if op is not None:
            hk = b.one("Slice", [h0, b.ints(k * D), b.ints(k * D + D), b.ints(0)])
            ck = b.one("Slice", [c0, b.ints(k * D), b.ints(k * D + D), b.ints(0)]) if c0 is not None else None
            layer_in, hn, cn = _operator_layer(b, layer, k, layer_in, hk, ck, lens32,
                                               _operator_weights(layer, k, path, weights))
            finals[0].append(hn)
            if cn is not None:
                finals[1].append(cn)
            continue
        outs = []
        for d in range(D):
            wd = {n: (None if v is None else weights.add(_param_name(layer, path, k, d, n), _np(v)))
                  for n, v in layer.layer_weights(k, d).items()}
            idx = b.const(np.array(k * D + d, dtype=np.int64), "index")
            s0 = [b.one("Gather", [s, idx], axis=0) for s in state0]  # (B, H)
            if streaming:
                xs = b.one("Squeeze", [layer_in, b.ints(0)])
                new, y = _step_nodes(b, layer, in_size, dtype, wd, xs, s0, None)
                y = b.one("Unsqueeze", [y, b.ints(0)])
            else:
                xin = layer_in
                if d == 1 and lengths is not None:
                    xin = b.one("ReverseSequence", [layer_in, lengths], batch_axis=1, time_axis=0)
                y, new = _scan_direction(b, layer, in_size, dtype, wd, xin, s0, mask,
                                         reverse=(d == 1 and lengths is None), H=H)
                if d == 1 and lengths is not None:
                    y = b.one("ReverseSequence", [y, lengths], batch_axis=1, time_axis=0)
            outs.append(y)
            for i, s in enumerate(new):
                finals[i].append(b.one("Unsqueeze", [s, b.ints(0)]))
        layer_in = outs[0] if D == 1 else b.one("Concat", outs, axis=-1)
    b.add("Identity", [layer_in], outputs=[outputs[0]])
    per_state = [b.one("Unsqueeze", [b.one("Concat", parts, axis=0), b.ints(0)]) for parts in finals]
    b.add("Concat", per_state, outputs=[outputs[1]], axis=0)
    if op is not None:
        mapping = f"{op} operator"
    else:
        mapping = "the cell's step(), inline" if streaming else "Scan of the cell's step()"
    return LayerMapping(path, cell_label(layer), mapping, reason, frozenset(operators(b.nodes)), L, D == 2)


def walk(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    """``nodes`` and the nodes of their subgraphs (a Scan's body), depth first."""
    for node in nodes:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from walk(a.g.node)


def operators(nodes: Iterable[onnx.NodeProto]) -> Iterator[str]:
    """The op types of ``nodes`` and of the nodes of their subgraphs."""
    return (n.op_type for n in walk(nodes))


def _param_name(layer: Recurrent, path: str, k: int, d: int, base: str) -> str:
    full = f"{base}_l{k}" + ("_reverse" if d else "")  # the parameter's name in the module (torch.nn's)
    return f"{path}.{full}" if path else full
