r"""Activation capture: every state and gate of every layer at every step.

:func:`trace` re-runs a :class:`rnnkit.Recurrent` stack one step at a time through each cell's own
pointwise forward (the same math every kernel calls, see ``cells/``), so it sees what the fused
kernels hide: ``h`` and ``c`` per step and the gate activations (LSTM ``i, f, g, o``; GRU
``r, z, n``). It uses evaluation semantics (no dropout; zoneout at its expectation, as the layer does
in ``eval()``), and its top-layer outputs equal the layer's ``forward`` (tested).

With ``retain_grad=True`` every per-step state keeps its gradient after ``backward()``: this is how
:mod:`rnnkit.analysis.gradflow` reads :math:`\partial L / \partial h_t` and
:math:`\partial L / \partial c_t`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..cells.base import Cell
from ..layers import Recurrent


@dataclass
class Trace:
    """What :func:`trace` recorded.

    Attributes:
        family: the cell's name ("rnn", "lstm", "gru", or a declared cell's).
        steps: per layer, per step, ``{name: (B, H) tensor}`` for every state (``h``, ``c``, ...) and gate.
            The gates are the declaration's (``Declaration.gates``): dropped LSTM gates (fixed at 1) are
            absent; with ``coupled`` ``f`` is ``1 - i``.
        gate_names: the declaration's gates; ``unit_gates``: those with values in [0, 1] (sigmoids).
    """

    family: str
    steps: list[list[dict[str, Tensor]]] = field(default_factory=list)
    gate_names: tuple[str, ...] = ()
    unit_gates: tuple[str, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.steps)

    def names(self, layer: int = 0) -> list[str]:
        return list(self.steps[layer][0])

    def get(self, name: str, layer: int = -1) -> Tensor:
        """One quantity stacked over time: (T, B, H)."""
        per_step = self.steps[layer]
        if name not in per_step[0]:
            raise KeyError(f"name: {name!r} was not recorded for a {self.family} layer; "
                           f"available: {list(per_step[0])}")
        return torch.stack([s[name] for s in per_step])

    def gates(self, layer: int = -1) -> dict[str, Tensor]:
        """The gate activations of one layer, (T, B, H) each."""
        return {g: self.get(g, layer) for g in self.gate_names if g in self.steps[layer][0]}


def _rec(cell: Cell, w: dict) -> Callable[..., Tensor]:
    H = cell.hidden_size
    bounds = [0]
    for g in cell.rec_parts:
        bounds.append(bounds[-1] + g * H)
    R = w["weight_hh"]
    b = w["bias_hh"] if cell.rec_bias else None

    def rec(inp: Tensor, part: int = 0) -> Tensor:
        lo, hi = bounds[part], bounds[part + 1]
        return F.linear(inp, R[lo:hi], None if b is None else b[lo:hi])

    return rec


def trace(layer: Recurrent, x: Tensor, state=None, *, lengths: Tensor | Sequence[int] | None = None,
          retain_grad: bool = False) -> Trace:
    """Run ``layer`` over ``x`` step by step, recording states and gates of every layer.

    Args:
        layer: a unidirectional :class:`rnnkit.Recurrent` (``rnnkit.LSTM/GRU/RNN`` or ``build(...)``).
        x: input in the layer's layout, (T, B, I) or (B, T, I) if ``batch_first``.
        state: initial state as for ``layer.forward`` (zeros if None).
        lengths: (B,) valid lengths; past its length a sequence's state stays frozen, as in ``forward``.
        retain_grad: keep ``.grad`` of every recorded ``h``/``c`` (needs a graph: don't use ``no_grad``).
    Returns:
        A :class:`Trace`; ``trace(...).get("h")`` is the top layer's output, time-major (T, B, H).
    """
    if not isinstance(layer, Recurrent):
        raise TypeError(f"layer: expected an rnnkit Recurrent layer (rnnkit.LSTM/GRU/RNN), got "
                        f"{type(layer).__name__}")
    if layer.bidirectional:
        raise ValueError("layer: trace() supports unidirectional layers only (got bidirectional=True)")
    xt, unbatched = layer._check_input(x)
    T, B = xt.shape[0], xt.shape[1]
    lens = None if lengths is None else layer._check_lengths(lengths, B, T, xt.device)
    state0 = layer._check_state(state, xt, B, unbatched)
    cell = layer.cell
    zoneout = layer.zoneout
    active = None
    if lens is not None:
        active = (torch.arange(T).unsqueeze(1) < lens.unsqueeze(0)).to(xt.device, xt.dtype).unsqueeze(-1)
    out = Trace(cell.family, gate_names=cell.declaration.gates, unit_gates=cell.declaration.sigmoid_gates())
    layer_in = xt
    for k in range(layer.num_layers):
        w = layer.layer_weights(k)
        xg = cell.project_input(layer_in, w)  # (T, B, G*H)
        rec = _rec(cell, w)
        st = tuple(s[k] for s in state0)
        steps: list[dict[str, Tensor]] = []
        outs = []
        for t in range(T):
            new, named = cell.values(xg[t], st, rec, w)
            keep = zoneout if active is None else 1 - active[t] * (1 - zoneout)
            if not (isinstance(keep, float) and keep == 0.0):
                new = tuple(keep * p + (1 - keep) * n for p, n in zip(st, new))
            rec_t = dict(zip(cell.state_names, new))
            for g in out.gate_names:
                rec_t[g] = named[g].detach()
            if retain_grad:
                for s in new:
                    if s.requires_grad:
                        s.retain_grad()
            steps.append(rec_t)
            outs.append(new[0] if active is None else new[0] * active[t])
            st = new
        out.steps.append(steps)
        layer_in = torch.stack(outs)
    return out


# ---- text ------------------------------------------------------------------------------------
def text_features(text: str) -> dict[str, np.ndarray]:
    """Per-character features that interpretable units track (Karpathy et al. 2015).

    Returns ``{"inside quotes": 0/1, "line position": chars since the last newline,
    "bracket depth": nesting depth of ( [ {}``, each (len(text),), for the character at each step.
    """
    quote = np.zeros(len(text))
    pos = np.zeros(len(text))
    depth = np.zeros(len(text))
    inside, col, d = False, 0, 0
    for i, ch in enumerate(text):
        if ch == '"':
            inside = not inside
        if ch == "\n":
            col = 0
        else:
            col += 1
        if ch in "([{":
            d += 1
        elif ch in ")]}":
            d = max(0, d - 1)
        quote[i], pos[i], depth[i] = float(inside), float(col), float(d)
    return {"inside quotes": quote, "line position": pos, "bracket depth": depth}


def correlated_units(acts: np.ndarray, features: dict[str, np.ndarray], top: int = 5
                     ) -> dict[str, list[tuple[int, float]]]:
    """The ``top`` units most correlated (|Pearson r|) with each feature.

    Args:
        acts: (T, H) activations of one layer for one text.
        features: name -> (T,) feature values (e.g. from :func:`text_features`).
    Returns:
        name -> [(unit, r), ...] sorted by |r|, skipping constant features (no variance in this text).
    """
    a = np.asarray(acts, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"acts: expected shape (T, H), got {a.shape}")
    a_c = a - a.mean(0)
    a_n = np.sqrt((a_c * a_c).sum(0))
    result = {}
    for name, f in features.items():
        f = np.asarray(f, dtype=np.float64)
        if f.shape != (a.shape[0],):
            raise ValueError(f"features[{name!r}]: expected shape ({a.shape[0]},), got {f.shape}")
        f_c = f - f.mean()
        f_n = np.sqrt((f_c * f_c).sum())
        if f_n == 0:
            continue
        r = (a_c * f_c[:, None]).sum(0) / np.maximum(a_n * f_n, 1e-12)
        order = np.argsort(-np.abs(r))[:top]
        result[name] = [(int(u), float(r[u])) for u in order]
    return result


def text_activations(text: str, trace_: Trace, names: Sequence[str] = ("c", "h"), batch_index: int = 0
                     ) -> dict:
    """A (text, activations) record for the report's cell-activation viewer.

    ``trace_`` must come from running the model over ``text`` one character (or token) per step.
    Returns ``{"text": ..., "series": {"layer0/c": [[...H] * T], ...}, "correlated": {...}}``
    (JSON-ready; values rounded to 4 digits).
    """
    T = len(trace_.steps[0])
    if T != len(text):
        raise ValueError(f"text: has {len(text)} characters but the trace has {T} steps; they must match")
    series = {}
    correlated = {}
    feats = text_features(text)
    for k in range(trace_.num_layers):
        for name in names:
            if name not in trace_.steps[k][0]:
                continue
            a = trace_.get(name, k)[:, batch_index].detach().float().cpu().numpy()  # (T, H)
            key = f"layer{k}/{name}"
            series[key] = np.round(a, 4).tolist()
            correlated[key] = {f: [[u, round(r, 3)] for u, r in v]
                               for f, v in correlated_units(a, feats).items()}
    return {"text": text, "series": series, "correlated": correlated}


@torch.no_grad()
def capture_text_run(run_dir, text: str, max_chars: int = 4000) -> tuple[dict, dict | None]:
    """Run a character-LM run's model (``rnnkit charlm train``) over ``text``: the viewer's record and the
    gate statistics.

    Loads the newest checkpoint of ``run_dir`` (see :func:`rnnkit.tasks.charlm.load_run`), feeds
    ``text`` one character per step from a zero state and returns (:func:`text_activations` of every
    layer's ``c`` and ``h``, :func:`rnnkit.analysis.gates.gate_statistics` of the same run, or None for
    a cell without sigmoid gates). Characters outside the model's vocabulary are an error.
    """
    from .gates import gate_statistics

    if len(text) > max_chars:
        raise ValueError(f"text: {len(text)} characters; at most {max_chars} fit in the viewer")
    layer, x = _text_run_inputs(run_dir, text)
    tr = trace(layer, x)
    stats = gate_statistics(layer, x, traced=tr) if tr.unit_gates else None
    return text_activations(text, tr), stats


def _text_run_inputs(run_dir, text: str) -> tuple[Recurrent, Tensor]:
    """The run's recurrent stack and its inputs for ``text`` (embedded, in the layer's layout)."""
    from ..tasks.charlm import load_run

    if not text:
        raise ValueError("text: expected at least one character to run the model over, got ''")
    run = load_run(run_dir)
    unknown = run.vocab.unknown(text)
    if unknown:
        raise ValueError(f"text: characters {unknown[:10]} are not in the model's vocabulary")
    ids = run.vocab.encode(text).unsqueeze(1)  # (T, 1)
    layer = run.model.rnn
    x = run.model.embed(ids)  # (T, 1, E)
    return layer, (x.transpose(0, 1) if layer.batch_first else x)


__all__ = ["Trace", "trace", "text_features", "correlated_units", "text_activations", "capture_text_run"]
