"""What a backend can run, read from a cell's declaration (never from a family name).

A backend states its :class:`Capability`: the pointwise operations it can compile, how many states it
carries, whether it has layer norm, or, for kernels written by hand (torch's fused ones, ``native``), that
it implements only the declarations of rnnkit's built-in RNN, LSTM and GRU variants (:func:`hand_written`).
:meth:`Capability.refuses` gives the reason a cell is out of reach.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any

from ..cells.base import Cell
from ..cells.declare import Declaration


@dataclass(frozen=True)
class Capability:
    """What a backend can run.

    Attributes:
        operations: the pointwise operations it compiles (None: every one of the language).
        max_states: the most state tensors it carries (None: any number).
        layer_norm: whether it runs layer-normalised projections and ``layer_norm(...)``.
        hand_written: it runs only the declarations of :func:`hand_written` (kernels written by hand,
            such as torch's fused ones, for rnnkit's built-in RNN, LSTM and GRU variants).
    """

    operations: frozenset[str] | None = None
    max_states: int | None = None
    layer_norm: bool = True
    hand_written: bool = False

    def refuses(self, cell: Cell) -> str | None:
        """None if the declaration of ``cell`` is within reach, else the reason it is not."""
        d = getattr(cell, "declaration", None)
        if d is None:
            return f"{cell!r} has no declaration"
        if self.hand_written:
            if hand_written(d) is None:
                return (f"its kernels are written by hand for rnnkit's built-in RNN, LSTM and GRU variants, "
                        f"and the declaration of cell {d.name!r} is not one of them")
            return None
        if self.operations is not None:
            missing = sorted(d.operations() - self.operations)
            if missing:
                return f"it has no {', '.join(missing)} (cell {d.name!r} uses them)"
        if self.max_states is not None and len(d.states) > self.max_states:
            return f"it carries at most {self.max_states} states; cell {d.name!r} has {len(d.states)}"
        if not self.layer_norm and (d.layer_norm or "layer_norm" in d.operations()):
            return f"it has no layer norm (cell {d.name!r} uses it)"
        return None


@functools.cache
def _table() -> dict[Declaration, tuple[str, dict[str, Any]]]:
    from ..cells.gru import gru_declaration
    from ..cells.lstm import lstm_declaration
    from ..cells.rnn import elman_declaration

    table: dict[Declaration, tuple[str, dict[str, Any]]] = {}
    for nl, ln in itertools.product(("tanh", "relu"), (False, True)):
        opts = {"nonlinearity": nl, "layer_norm": ln}
        table[elman_declaration(**opts)] = ("rnn", opts)
    for ra, ln in itertools.product((True, False), (False, True)):
        opts = {"reset_after": ra, "layer_norm": ln}
        table[gru_declaration(**opts)] = ("gru", opts)
    gates = ("input", "forget", "output")
    drops = [tuple(c) for n in range(4) for c in itertools.combinations(gates, n)]
    for peep, act, ln, coupled, drop in itertools.product((False, True), (True, False), (False, True),
                                                          (False, True), drops):
        if coupled and ("input" in drop or "forget" in drop):
            continue
        opts = {"peephole": peep, "coupled": coupled, "drop_gates": drop, "output_activation": act,
                "layer_norm": ln}
        table[lstm_declaration(**opts)] = ("lstm", opts)
    return table


def hand_written(d: Declaration) -> tuple[str, dict[str, Any]] | None:
    """The (family, options) of the built-in RNN, LSTM or GRU variant whose declaration is exactly ``d``,
    found by comparing declarations; None if ``d`` is none of them (no hand-written kernel implements it)."""
    return _table().get(d)
