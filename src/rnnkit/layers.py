"""Public recurrent layers: drop-in replacements for ``torch.nn.RNN``, ``torch.nn.LSTM``, ``torch.nn.GRU``.

Same constructor arguments, forward signature, output and state shapes and ``state_dict`` keys as
torch.nn for the weights they share, plus the variant options of :mod:`rnnkit.cells`, recurrent
regularisers, a choice of kernel (``backend``), variable-length batches via ``lengths`` (any order)
or ``PackedSequence``, and ``step()`` for streaming inference.

Shapes (time-major unless ``batch_first``): input (T, B, I) or unbatched (T, I); output
(T, B, D*H); state (L*D, B, H) per component, with L layers and D = 2 if bidirectional else 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import kernels
from .cells import make_cell
from .cells import resolve as resolve_cell
from .kernels import native
from .kernels.common import LayerMasks

StateArg = Tensor | tuple[Tensor, ...] | None


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _check_prob(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")
    return float(value)


class Recurrent(nn.Module):
    """A stack of recurrent layers of one cell; see :class:`LSTM`, :class:`GRU`, :class:`RNN`.

    The state is one tensor h for a cell with one state, else a tuple with one tensor per state of the
    cell's declaration (``(h, c)`` for the LSTM; ``layer.cell.state_names``).

    Args:
        family: a cell family of :data:`rnnkit.cells.FAMILIES` ("rnn", "lstm", "gru", "slstm", ...) or
            a :class:`rnnkit.cells.Declaration` (a cell written with :func:`rnnkit.cells.declare`).
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional: as torch.nn.
        recurrent_dropout: variational dropout on h inside the recurrence (one mask per sequence,
            Gal & Ghahramani 2016), training only.
        zoneout: probability of keeping each unit of h (and c) at its previous value per step
            (Krueger et al. 2016); at evaluation the expectation is used.
        backend: "auto" or a name from :data:`rnnkit.kernels.BACKENDS`.
        **cell_options: variant options of the family's cell (see :mod:`rnnkit.cells`).
    """

    def __init__(self, family: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, *,
                 recurrent_dropout: float = 0.0, zoneout: float = 0.0, backend: str = "auto",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 **cell_options: Any) -> None:
        super().__init__()
        self.input_size = _check_int("input_size", input_size, 1)
        self.hidden_size = _check_int("hidden_size", hidden_size, 1)
        self.num_layers = _check_int("num_layers", num_layers, 1)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = _check_prob("dropout", dropout)
        self.bidirectional = bool(bidirectional)
        self.recurrent_dropout = _check_prob("recurrent_dropout", recurrent_dropout)
        self.zoneout = _check_prob("zoneout", zoneout)
        self.cell = make_cell(family, hidden_size, bias=self.bias, **cell_options)
        self._default_options = make_cell(family, 1, bias=self.bias).options()
        for k in range(self.num_layers):
            reason = self.cell.check_input_size(input_size if k == 0 else hidden_size * self.num_directions)
            if reason is not None:
                raise ValueError(f"{'input_size' if k == 0 else f'layer {k} input'}: {reason}")
        self.layer_config = kernels.LayerConfig(self.recurrent_dropout, self.zoneout)
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a string, got {backend!r}")
        self.backend = backend
        self._resolved: dict[tuple[str, bool, torch.dtype | None, bool], str] = {}
        # Fail early on configurations that no device type can run; a backend that runs on one device
        # type only (triton: CUDA) is checked against the actual device at the first forward.
        errors = []
        for dev in ("cpu", "cuda"):
            try:
                kernels.resolve(backend, self.cell, self.layer_config, torch.device(dev))
                break
            except ValueError as e:
                errors.append(e)
        else:
            raise errors[0]
        factory = {"device": device, "dtype": dtype}
        G, GR, H, D = self.cell.gates, self.cell.rec_gates, hidden_size, self.num_directions
        self._param_names: list[dict[str, str]] = []
        for k in range(self.num_layers):
            for d in range(D):
                sfx = f"_l{k}" + ("_reverse" if d else "")
                in_size = input_size if k == 0 else H * D
                shapes = {"weight_ih": (G * H, in_size), "weight_hh": (GR * H, H)}
                if self.bias:
                    shapes.update(bias_ih=(G * H,), bias_hh=(GR * H,))
                shapes.update(self.cell.extra_shapes())
                names = {}
                for base, shape in shapes.items():
                    setattr(self, base + sfx, nn.Parameter(torch.empty(shape, **factory)))
                    names[base] = base + sfx
                self._param_names.append(names)
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """torch.nn's init, U(-1/sqrt(H), 1/sqrt(H)), then the cell's own (forget bias, norms, ...)."""
        k = 1.0 / math.sqrt(self.hidden_size)
        for names in self._param_names:
            for base, full in names.items():
                p = getattr(self, full)
                if base in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    nn.init.uniform_(p, -k, k)
                else:
                    self.cell.init_extra(base, p)
            if self.bias:
                self.cell.init_biases(getattr(self, names["bias_ih"]), getattr(self, names["bias_hh"]))

    def flatten_parameters(self) -> None:
        """No-op, for code written against torch.nn."""

    def layer_weights(self, layer: int, direction: int = 0) -> dict[str, Tensor | None]:
        """The weights of one layer/direction by base name (``weight_ih``, ``bias_hh``, extras)."""
        names = self._param_names[layer * self.num_directions + direction]
        w: dict[str, Tensor | None] = {"bias_ih": None, "bias_hh": None}
        w.update({base: self._weight(full) for base, full in names.items()})
        return w

    def _weight(self, full: str) -> Tensor:
        """Parameter ``full`` (``weight_hh_l0``...): from ``_parameters`` (a step's per-call cost), else by
        getattr (a weight reparametrized, e.g. by weight norm)."""
        p = self._parameters.get(full)
        return p if p is not None else getattr(self, full)

    def backend_for(self, device: torch.device, variable_lengths: bool = False,
                    dtype: torch.dtype | None = None, streaming: bool = False) -> str:
        """The backend this layer runs on ``device`` (``auto`` resolved), for equal or varying lengths,
        inputs of ``dtype`` (None: any), and whole sequences or one step at a time (``streaming``)."""
        key = (device.type, variable_lengths, dtype, streaming)
        if key not in self._resolved:
            self._resolved[key] = kernels.resolve(self.backend, self.cell, self.layer_config, device,
                                                  variable_lengths=variable_lengths, dtype=dtype,
                                                  streaming=streaming)
        return self._resolved[key]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if type(self) is Recurrent:  # the cell is not implied by the class name
            s = f"{self.cell.name!r}, " + s
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for name, default in (("bias", True), ("batch_first", False), ("dropout", 0.0),
                              ("bidirectional", False), ("recurrent_dropout", 0.0), ("zoneout", 0.0)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        s += "".join(f", {k}={v!r}" for k, v in self.cell.options().items() if self._default_options.get(k) != v)
        try:
            device = next(self.parameters()).device
            resolved = self.backend_for(device)
        except (StopIteration, ValueError):
            resolved = "?"
        s += f", backend={self.backend!r}" + (f" -> {resolved!r}" if self.backend == "auto" else "")
        return s

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, input: Tensor | PackedSequence, state: StateArg = None,
                lengths: Tensor | Sequence[int] | None = None) -> tuple[Tensor | PackedSequence, StateArg]:
        """Run the stack.

        Args:
            input: (T, B, I), (B, T, I) if ``batch_first``, unbatched (T, I), or a ``PackedSequence``.
            state: initial state in torch.nn layout: h0 for a one-state cell, else a tuple with one tensor
                per state ((h0, c0) for LSTM), each (L*D, B, H); zeros if None.
            lengths: (B,) valid lengths in any order (CPU or the input's device); outputs past each
                length are zero and the final state is the state at each sequence's last valid step.
        Returns:
            (output, final state), shaped as torch.nn.
        """
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("lengths: must be None when input is a PackedSequence (it carries its lengths)")
            x, lengths = pad_packed_sequence(input)
            unbatched = False
        else:
            x, unbatched = self._check_input(input)
        T, B = x.shape[0], x.shape[1]
        lens = None if lengths is None else self._check_lengths(lengths, B, T, x.device)
        pack_lens = lens if packed else None
        if lens is not None and bool((lens == T).all()):
            lens = None  # every sequence is full length: nothing to mask
        if lens is not None:
            # the kernels keep the state through padded steps as keep * old + (1 - keep) * new, and
            # 0 * nan is nan: zero the padding so nothing it holds reaches outputs, states or gradients
            valid = torch.arange(T).unsqueeze(1) < lens.unsqueeze(0)  # (T, B)
            x = torch.where(valid.to(x.device).unsqueeze(-1), x, x.new_zeros(()))
        state0 = self._check_state(state, x, B, unbatched)
        name = self.backend_for(x.device, variable_lengths=lens is not None, dtype=x.dtype, streaming=x.shape[0] == 1)
        if name == "native":
            out, final = self._run_native(x, state0, lens)
        else:
            out, final = self._run_layers(kernels.BACKENDS[name].run, x, state0, lens)
        if packed:
            out = pack_padded_sequence(out, pack_lens, enforce_sorted=False)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
            final = tuple(s.squeeze(1) for s in final)
        return out, (final if self.cell.state_size > 1 else final[0])

    def step(self, x_t: Tensor, state: StateArg = None) -> tuple[Tensor, StateArg]:
        """One time step for streaming inference: ``x_t`` (B, I) or (I,); same numbers as ``forward``."""
        if self.bidirectional:
            raise ValueError("step(): a bidirectional layer needs the whole sequence; use forward()")
        if not isinstance(x_t, Tensor):
            raise TypeError(f"x_t: expected a Tensor, got {type(x_t).__name__}")
        if x_t.dim() not in (1, 2):
            raise ValueError(f"x_t: expected shape (B, {self.input_size}) or ({self.input_size},), "
                             f"got {tuple(x_t.shape)}")
        time_dim = 1 if (self.batch_first and x_t.dim() == 2) else 0
        out, state = self.forward(x_t.unsqueeze(time_dim), state)
        return out.squeeze(time_dim), state

    # ---- validation --------------------------------------------------------------------------
    def _check_input(self, input: Any) -> tuple[Tensor, bool]:
        if not isinstance(input, Tensor):
            raise TypeError(f"input: expected a Tensor or PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            layout = "(B, T, I)" if self.batch_first else "(T, B, I)"
            raise ValueError(f"input: expected a 3-D tensor {layout} or an unbatched 2-D (T, I), "
                             f"got shape {tuple(input.shape)}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"input: expected feature size input_size={self.input_size}, "
                             f"got {input.shape[-1]} (shape {tuple(input.shape)})")
        w = self._weight(self._param_names[0]["weight_ih"])
        if input.dtype != w.dtype:
            raise TypeError(f"input: dtype {input.dtype} does not match the parameters' {w.dtype}"
                            f" (convert one of them, e.g. layer.to({input.dtype}))")
        if input.device != w.device:
            raise ValueError(f"input: on {input.device} but the parameters are on {w.device}")
        if input.shape[-2 if input.dim() == 3 and not self.batch_first else 0] == 0 and input.dim() == 3:
            raise ValueError(f"input: empty sequence (shape {tuple(input.shape)}); expected at least one step")
        if input.dim() == 2:
            if input.shape[0] == 0:
                raise ValueError(f"input: empty sequence (shape {tuple(input.shape)})")
            return input.unsqueeze(1), True
        x = input.transpose(0, 1) if self.batch_first else input
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"input: expected at least one step and one sequence, got shape {tuple(input.shape)}")
        return x, False

    def _check_lengths(self, lengths: Any, B: int, T: int, device: torch.device) -> Tensor:
        if isinstance(lengths, Tensor):
            if lengths.device.type != "cpu" and lengths.device != device:
                raise ValueError(f"lengths: on {lengths.device}; expected the CPU or the input's device {device}")
            if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
                raise TypeError(f"lengths: expected an integer tensor, got dtype {lengths.dtype}")
            lens = lengths.detach().to("cpu", torch.int64)
        elif isinstance(lengths, Sequence) and all(isinstance(v, int) and not isinstance(v, bool)
                                                   for v in lengths):
            lens = torch.tensor(list(lengths), dtype=torch.int64)
        else:
            raise TypeError(f"lengths: expected a 1-D integer tensor or a list of ints, got {lengths!r}")
        if lens.dim() != 1 or lens.shape[0] != B:
            raise ValueError(f"lengths: expected shape ({B},) (one per sequence), got {tuple(lens.shape)}")
        bad = (lens < 1) | (lens > T)
        if bool(bad.any()):
            raise ValueError(f"lengths: every value must be in [1, {T}] (the padded length); "
                             f"got {lens[bad].tolist()} at positions {bad.nonzero().flatten().tolist()}")
        return lens

    def _check_state(self, state: StateArg, x: Tensor, B: int, unbatched: bool) -> tuple[Tensor, ...]:
        """The initial state as one (L*D, B, H) tensor per state of the cell."""
        LD, H = self.num_layers * self.num_directions, self.hidden_size
        names = self.cell.state_names
        if state is None:
            return tuple(x.new_zeros(LD, B, H) for _ in names)
        if len(names) > 1:
            if not (isinstance(state, (tuple, list)) and len(state) == len(names)):
                raise TypeError(f"state: expected a tuple of {len(names)} tensors ({', '.join(n + '0' for n in names)})"
                                f" for cell {self.cell.name!r}, got {type(state).__name__}"
                                + (f" of length {len(state)}" if isinstance(state, (tuple, list)) else ""))
            parts = {f"state[{k}] ({n}0)": s for k, (n, s) in enumerate(zip(names, state))}
        else:
            if not isinstance(state, Tensor):
                raise TypeError(f"state: expected a Tensor h0, got {type(state).__name__}")
            parts = {"state (h0)": state}
        expected = (LD, H) if unbatched else (LD, B, H)
        out = []
        for name, s in parts.items():
            if not isinstance(s, Tensor):
                raise TypeError(f"{name}: expected a Tensor, got {type(s).__name__}")
            if tuple(s.shape) != expected:
                raise ValueError(f"{name}: expected shape {expected} (num_layers * num_directions, "
                                 f"{'' if unbatched else 'batch, '}hidden_size), got {tuple(s.shape)}")
            if s.dtype != x.dtype:
                raise TypeError(f"{name}: dtype {s.dtype} does not match the input's {x.dtype}")
            if s.device != x.device:
                raise ValueError(f"{name}: on {s.device} but the input is on {x.device}")
            out.append(s.unsqueeze(1) if unbatched else s)
        return tuple(out)

    # ---- running -----------------------------------------------------------------------------
    def _run_native(self, x: Tensor, state0: tuple[Tensor, ...], lens: Tensor | None):
        flat = []
        for names in self._param_names:
            flat += [self._weight(names[b]) for b in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if b in names]
        hx = state0 if len(state0) > 1 else state0[0]
        out, final = native.run_stack(self.cell.native, x, hx, flat, bias=self.bias, num_layers=self.num_layers,
                                      dropout=self.dropout, training=self.training,
                                      bidirectional=self.bidirectional, lengths=lens)
        return out, (final if isinstance(final, tuple) else (final,))

    def _masks(self, T: int, B: int, active: Tensor | None, like: Tensor) -> LayerMasks:
        H = self.hidden_size
        hmask = None
        if self.training and self.recurrent_dropout > 0:
            q = 1.0 - self.recurrent_dropout
            hmask = _bernoulli(like, (B, H), q).div_(q)
        keep = None
        if self.zoneout > 0 or active is not None:
            keep = []
            for _ in range(self.cell.state_size):
                if self.zoneout > 0 and self.training:
                    z = _bernoulli(like, (T, B, H), self.zoneout)
                else:
                    z = like.new_full((1, 1, 1), self.zoneout).expand(T, 1, 1)
                keep.append(z if active is None else 1 - active * (1 - z))
            keep = tuple(keep)
        return LayerMasks(hmask, keep, active)

    def _run_layers(self, run, x: Tensor, state0: tuple[Tensor, ...], lens: Tensor | None):
        T, B = x.shape[0], x.shape[1]
        D = self.num_directions
        active = rev = None
        if lens is not None:
            t = torch.arange(T).unsqueeze(1)
            active = (t < lens.unsqueeze(0)).to(device=x.device, dtype=x.dtype).unsqueeze(-1)  # (T, B, 1)
            if D == 2:
                # reverse each sequence within its own length; padding stays in place
                rev = torch.where(t < lens, lens - 1 - t, t).to(x.device)  # (T, B)

        def flip(seq: Tensor) -> Tensor:
            if rev is None:
                return seq.flip(0)
            return seq.gather(0, rev.unsqueeze(-1).expand(-1, -1, seq.shape[-1]))

        finals: list[list[Tensor]] = [[] for _ in range(self.cell.state_size)]
        layer_in = x
        for k in range(self.num_layers):
            outs = []
            for d in range(D):
                i = k * D + d
                s0 = tuple(s[i] for s in state0)
                masks = self._masks(T, B, active, x)
                xin = layer_in if d == 0 else flip(layer_in)
                out, sT = run(self.cell, xin, s0, self.layer_weights(k, d), masks)
                outs.append(out if d == 0 else flip(out))
                for lst, s in zip(finals, sT):
                    lst.append(s)
            layer_in = outs[0] if D == 1 else torch.cat(outs, -1)
            if self.dropout > 0 and self.training and k < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, True)
        return layer_in, tuple(torch.stack(lst) for lst in finals)


def _bernoulli(like: Tensor, shape: tuple[int, ...], p: float) -> Tensor:
    """1 with probability ``p``, else 0, in ``like``'s dtype and device: a uniform draw compared in place
    (half the time of ``bernoulli_`` on the CPU)."""
    return like.new_empty(shape).uniform_().lt_(p)


class RNN(Recurrent):
    r"""Elman RNN stack, a drop-in for ``torch.nn.RNN``: :math:`h_t = \phi(W x_t + b_{ih} + R h_{t-1} + b_{hh})`.

    Extra keyword options: ``layer_norm``, ``recurrent_dropout``, ``zoneout``, ``backend``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 *, layer_norm: bool = False, recurrent_dropout: float = 0.0, zoneout: float = 0.0,
                 backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__("rnn", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         recurrent_dropout=recurrent_dropout, zoneout=zoneout, backend=backend, device=device,
                         dtype=dtype, nonlinearity=nonlinearity, layer_norm=layer_norm)


class LSTM(Recurrent):
    r"""LSTM stack, a drop-in for ``torch.nn.LSTM`` with the studied variants (see :class:`rnnkit.cells.LSTMCell`).

    Extra keyword options: ``peephole``, ``coupled``, ``drop_gates``, ``output_activation``,
    ``forget_bias`` (default 1.0), ``layer_norm``, ``gate_activation``, ``candidate_activation``,
    ``recurrent_dropout``, ``zoneout``, ``backend``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, *,
                 peephole: bool = False, coupled: bool = False, drop_gates: Sequence[str] = (),
                 output_activation: bool = True, forget_bias: float = 1.0, layer_norm: bool = False,
                 gate_activation: str = "sigmoid", candidate_activation: str = "tanh",
                 recurrent_dropout: float = 0.0, zoneout: float = 0.0, backend: str = "auto",
                 device=None, dtype=None) -> None:
        super().__init__("lstm", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         recurrent_dropout=recurrent_dropout, zoneout=zoneout, backend=backend, device=device,
                         dtype=dtype, peephole=peephole, coupled=coupled, drop_gates=drop_gates,
                         output_activation=output_activation, forget_bias=forget_bias, layer_norm=layer_norm,
                         gate_activation=gate_activation, candidate_activation=candidate_activation)


class GRU(Recurrent):
    r"""GRU stack, a drop-in for ``torch.nn.GRU``; ``reset_after=False`` gives the Cho et al. 2014 form.

    Extra keyword options: ``reset_after``, ``layer_norm``, ``recurrent_dropout``, ``zoneout``, ``backend``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, *,
                 reset_after: bool = True, layer_norm: bool = False, recurrent_dropout: float = 0.0,
                 zoneout: float = 0.0, backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__("gru", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         recurrent_dropout=recurrent_dropout, zoneout=zoneout, backend=backend, device=device,
                         dtype=dtype, reset_after=reset_after, layer_norm=layer_norm)


LAYERS: dict[str, type[Recurrent]] = {"rnn": RNN, "lstm": LSTM, "gru": GRU}


def build(cell: str, input_size: int, hidden_size: int, **kwargs: Any) -> Recurrent:
    """Build a layer stack from a registry name (``rnnkit.cells.REGISTRY``) or a user's declaration
    ``"path/to/file.py:NAME"`` (:func:`rnnkit.cells.resolve`); ``kwargs`` override the entry's options."""
    spec = resolve_cell(cell)
    options = {**spec.options, **kwargs}
    if spec.family in LAYERS:
        return LAYERS[spec.family](input_size, hidden_size, **options)
    return Recurrent(spec.family, input_size, hidden_size, **options)
