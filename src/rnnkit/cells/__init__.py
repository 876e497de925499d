"""Cell definitions (one file per family) and the registry of every cell and variant.

The registry maps a short name to a layer family and the keyword options that select the
variant. Tests, docs and the CLI iterate over it, so a new entry is tested and exposed at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .base import Cell
from .compile import DeclaredCell
from .declare import Declaration, DeclarationError, declare
from .gru import GRUCell
from .lstm import LSTMCell
from .rnn import ElmanCell

FAMILIES: dict[str, type[Cell]] = {"rnn": ElmanCell, "lstm": LSTMCell, "gru": GRUCell}

# Options that act inside the recurrence but are applied by the kernels, not the cell math.
REGULARISERS = ("recurrent_dropout", "zoneout")


@dataclass(frozen=True)
class CellSpec:
    """A registered cell: ``family`` plus the layer keyword options that select the variant."""

    name: str
    family: str
    summary: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def cell_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.options.items() if k not in REGULARISERS}

    @property
    def layer_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.options.items() if k in REGULARISERS}


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
    CellSpec("gru", "gru", "GRU, reset after the matmul (torch.nn.GRU / cuDNN)"),
    CellSpec("gru_cho", "gru", "GRU, reset before the matmul (Cho et al. 2014)", {"reset_after": False}),
    CellSpec("gru_ln", "gru", "layer-normalised GRU", {"layer_norm": True}),
    CellSpec("gru_cho_ln", "gru", "layer-normalised Cho GRU", {"reset_after": False, "layer_norm": True}),
    CellSpec("gru_zoneout", "gru", "GRU with zoneout on h", {"zoneout": 0.15}),
    CellSpec("gru_rdrop", "gru", "GRU with recurrent dropout", {"recurrent_dropout": 0.25}),
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


__all__ = ["Cell", "CellSpec", "Declaration", "DeclarationError", "DeclaredCell", "declare", "ElmanCell",
           "LSTMCell", "GRUCell", "REGISTRY", "FAMILIES", "make_cell"]
