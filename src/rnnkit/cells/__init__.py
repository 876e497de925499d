"""Cell declarations and the registry of every cell and variant.

Every cell is a declaration (:func:`declare`, see :mod:`rnnkit.cells.declare`) from which step, forward
and backward are derived (:mod:`rnnkit.cells.compile`). A *family* builds a cell from variant options
(``"lstm"`` with ``peephole=True``, ...); the registry maps a short name to a family and the options that
select the variant. Tests, docs and the CLI iterate over it, so a new entry is tested and exposed at once.
A cell written by a user is a declaration in a Python file, named ``path/to/file.py:NAME`` wherever a
registry name is accepted (:func:`resolve`).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .base import Cell
from .compile import DeclaredCell
from .declare import OPERATIONS, Declaration, DeclarationError, declare
from .gru import GRUCell
from .lstm import LSTMCell
from .mut import MUT1, MUT2, MUT3
from .rnn import ElmanCell
from .slstm import SLSTM


def _declared(d: Declaration) -> Callable[..., Cell]:
    def make(hidden_size: int, *, bias: bool = True) -> Cell:
        return DeclaredCell(d, hidden_size, bias=bias)

    make.__doc__ = f"The declared cell {d.name!r} (options: bias)."
    return make


#: Family name -> cell constructor ``(hidden_size, **variant_options) -> Cell``.
FAMILIES: dict[str, Callable[..., Cell]] = {
    "rnn": ElmanCell, "lstm": LSTMCell, "gru": GRUCell,
    **{d.name: _declared(d) for d in (SLSTM, MUT1, MUT2, MUT3)},
}

# Options that act inside the recurrence but are applied by the kernels, not the cell math.
REGULARISERS = ("recurrent_dropout", "zoneout")


@dataclass(frozen=True)
class CellSpec:
    """A registered cell: ``family`` (a name of :data:`FAMILIES`, or a user's declaration) plus the layer
    keyword options that select the variant."""

    name: str
    family: str | Declaration
    summary: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def cell_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.options.items() if k not in REGULARISERS}

    @property
    def layer_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.options.items() if k in REGULARISERS}

    @property
    def family_name(self) -> str:
        return self.family if isinstance(self.family, str) else self.family.name


_SPECS = [
    CellSpec("rnn", "rnn", "Elman RNN, tanh"),
    CellSpec("rnn_relu", "rnn", "Elman RNN, relu", {"nonlinearity": "relu"}),
    CellSpec("rnn_ln", "rnn", "layer-normalised Elman RNN", {"layer_norm": True}),
    CellSpec("lstm", "lstm", "LSTM with forget gate (torch.nn.LSTM)"),
    CellSpec("lstm_fb0", "lstm", "LSTM, forget bias 0 at init", {"forget_bias": 0.0}),
    CellSpec("lstm_peephole", "lstm", "Graves peephole LSTM", {"peephole": True}),
    CellSpec("lstm_cifg", "lstm", "coupled input-forget gate, f = 1 - i", {"coupled": True}),
    CellSpec("lstm_nfg", "lstm", "no forget gate (1997 LSTM, f = 1)", {"drop_gates": ("forget",)}),
    CellSpec("lstm_nig", "lstm", "no input gate (i = 1)", {"drop_gates": ("input",)}),
    CellSpec("lstm_nog", "lstm", "no output gate (o = 1)", {"drop_gates": ("output",)}),
    CellSpec("lstm_noact", "lstm", "no output activation (h = o * c)", {"output_activation": False}),
    CellSpec("lstm_ln", "lstm", "layer-normalised LSTM (Ba et al. 2016)", {"layer_norm": True}),
    CellSpec("lstm_peephole_ln", "lstm", "peephole + layer norm", {"peephole": True, "layer_norm": True}),
    CellSpec("lstm_rdrop", "lstm", "LSTM with recurrent (variational) dropout on h",
             {"recurrent_dropout": 0.25}),
    CellSpec("lstm_zoneout", "lstm", "LSTM with zoneout on h and c", {"zoneout": 0.15}),
    CellSpec("lstm_hsig_relu", "lstm", "LSTM with hard-sigmoid gates and a relu candidate (chosen activations)",
             {"gate_activation": "hard_sigmoid", "candidate_activation": "relu"}),
    CellSpec("gru", "gru", "GRU, reset after the matmul (torch.nn.GRU / cuDNN)"),
    CellSpec("gru_cho", "gru", "GRU, reset before the matmul (Cho et al. 2014)", {"reset_after": False}),
    CellSpec("gru_ln", "gru", "layer-normalised GRU", {"layer_norm": True}),
    CellSpec("gru_cho_ln", "gru", "layer-normalised Cho GRU", {"reset_after": False, "layer_norm": True}),
    CellSpec("gru_zoneout", "gru", "GRU with zoneout on h", {"zoneout": 0.15}),
    CellSpec("gru_rdrop", "gru", "GRU with recurrent dropout", {"recurrent_dropout": 0.25}),
    CellSpec("slstm", "slstm", "xLSTM's sLSTM: exponential gates, normaliser and stabiliser (Beck et al. 2024)"),
    CellSpec("mut1", "mut1", "MUT1 of Jozefowicz et al. 2015 (input_size = hidden_size)"),
    CellSpec("mut2", "mut2", "MUT2 of Jozefowicz et al. 2015 (input_size = hidden_size)"),
    CellSpec("mut3", "mut3", "MUT3 of Jozefowicz et al. 2015"),
]
REGISTRY: dict[str, CellSpec] = {s.name: s for s in _SPECS}


def make_cell(family: str | Declaration, hidden_size: int, **options: Any) -> Cell:
    """Build the cell of ``family`` (a name of :data:`FAMILIES`) with its variant options, or of a
    declaration (:func:`declare`; only ``bias`` is an option then)."""
    if isinstance(family, Declaration):
        unknown = sorted(set(options) - {"bias"})
        if unknown:
            raise ValueError(f"{unknown[0]}: not an option of the declared cell {family.name!r} "
                             f"(a declared cell takes only bias)")
        return DeclaredCell(family, hidden_size, **options)
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {sorted(FAMILIES)} or a cell declaration, got {family!r}")
    return FAMILIES[family](hidden_size, **options)


def load_declaration(ref: str) -> Declaration:
    """The declaration ``NAME`` defined in the Python file of ``ref = "path/to/file.py:NAME"``.

    The file is run as a module (once per process and path); ``NAME`` must be a :class:`Declaration`.
    Raises :class:`~rnnkit.errors.UserError` naming the file or the name when either is wrong.
    """
    path_s, sep, name = ref.rpartition(":")
    if not sep or not path_s.endswith(".py") or not name.isidentifier():
        raise UserError(f"cell: expected a registry name ({', '.join(sorted(REGISTRY))}) or "
                        f"'path/to/file.py:NAME', got {ref!r}")
    path = Path(path_s).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"cell: file {path_s!r} not found (from {ref!r})")
    key = f"rnnkit_user_cells.{abs(hash(str(path)))}"
    module = sys.modules.get(key)
    if module is None:
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except DeclarationError:
            del sys.modules[key]
            raise
        except Exception as e:
            del sys.modules[key]
            raise UserError(f"cell: running {path_s!r} failed: {type(e).__name__}: {e}") from e
    found = getattr(module, name, None)
    if not isinstance(found, Declaration):
        have = sorted(k for k, v in vars(module).items() if isinstance(v, Declaration))
        what = "not defined" if found is None else f"a {type(found).__name__}, not a cell declaration"
        raise UserError(f"cell: {name!r} in {path_s!r} is {what}; the declarations there are {have}")
    return found


def resolve(cell: str) -> CellSpec:
    """The registry entry of ``cell``, or for ``"path/to/file.py:NAME"`` an entry for the user's declaration."""
    if not isinstance(cell, str):
        raise UserError(f"cell: expected a registry name or 'path/to/file.py:NAME', got {cell!r}")
    if cell in REGISTRY:
        return REGISTRY[cell]
    if ":" not in cell:
        raise UserError(f"cell: expected one of {sorted(REGISTRY)} or 'path/to/file.py:NAME', got {cell!r}")
    d = load_declaration(cell)
    return CellSpec(cell, d, f"user cell {d.name!r} from {cell.rpartition(':')[0]}")


__all__ = ["Cell", "CellSpec", "Declaration", "DeclarationError", "DeclaredCell", "declare", "ElmanCell",
           "LSTMCell", "GRUCell", "OPERATIONS", "REGISTRY", "FAMILIES", "make_cell", "load_declaration", "resolve"]
