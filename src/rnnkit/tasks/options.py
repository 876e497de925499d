"""The model options every task shares: which registered cell, its variant options, sizes, dropout, backend.

A task's ``[model]`` config section is a frozen dataclass that subclasses :class:`RecurrentOptions` and
adds its own head options. The recurrent stack's size is read from the fields named in ``SIZE_KEYS``:
``hidden_size`` / ``num_layers`` (language models, experiments), or ``hidden`` / ``layers`` (the time-series
tasks, whose configs and run directories have always used these keys).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..cells import REGULARISERS
from ..cells import resolve as resolve_cell
from ..errors import UserError
from ..layers import LAYERS, build

VARIANT_OPTIONS = ("forget_bias", "peephole", "coupled", "drop_gates", "output_activation", "gate_activation",
                   "candidate_activation", "layer_norm", "reset_after", "nonlinearity", "recurrent_dropout", "zoneout")


@dataclass(frozen=True)
class RecurrentOptions:
    """The recurrent stack of a task's model (fields shared by every ``[model]`` section).

    Args:
        cell: a name from ``rnnkit.cells.REGISTRY`` (``rnnkit cells`` lists them), or a cell the user
            declared in a Python file, ``"path/to/file.py:NAME"`` (see ``docs/cells.md``).
        dropout: between stacked layers (tasks may apply it elsewhere too, e.g. the language model).
        backend: kernel of the recurrent stack ("auto" or a name from ``rnnkit.kernels.BACKENDS``).
        forget_bias ... zoneout: variant options passed to :func:`rnnkit.build` when set; None keeps the
            registry entry's value (see ``docs/cells.md``).

    Subclasses declare the size fields named by ``SIZE_KEYS`` (hidden units, stacked layers).
    """

    SIZE_KEYS: ClassVar[tuple[str, str]] = ("hidden_size", "num_layers")

    cell: str = "lstm"
    dropout: float = 0.0
    backend: str = "auto"
    forget_bias: float | None = None
    peephole: bool | None = None
    coupled: bool | None = None
    drop_gates: tuple[str, ...] | None = None
    output_activation: bool | None = None
    gate_activation: str | None = None
    candidate_activation: str | None = None
    layer_norm: bool | None = None
    reset_after: bool | None = None
    nonlinearity: str | None = None
    recurrent_dropout: float | None = None
    zoneout: float | None = None

    @property
    def stack_hidden(self) -> int:
        """Hidden units per layer and direction."""
        return getattr(self, self.SIZE_KEYS[0])

    @property
    def stack_layers(self) -> int:
        """Stacked layers."""
        return getattr(self, self.SIZE_KEYS[1])

    def cell_options(self) -> dict[str, Any]:
        """The variant options that are set (not None), for :func:`rnnkit.build`."""
        return {k: getattr(self, k) for k in VARIANT_OPTIONS if getattr(self, k) is not None}

    def check_cell(self) -> None:
        """Raise ValueError for an unknown cell or a variant option its family does not take.

        ``cell`` is a registry name or a user's declaration ``"path/to/file.py:NAME"``
        (:func:`rnnkit.cells.resolve`); a declared cell takes only the regularisers as options.
        """
        try:
            spec = resolve_cell(self.cell)
        except UserError as e:
            raise UserError(f"model.{e}") from None
        family = spec.family_name
        layer = LAYERS.get(spec.family) if isinstance(spec.family, str) else None
        accepted = set(inspect.signature(layer).parameters) if layer is not None else set(REGULARISERS)
        wrong = sorted(k for k in self.cell_options() if k not in accepted)
        if wrong:
            allowed = [k for k in VARIANT_OPTIONS if k in accepted]
            raise ValueError(f"model.{wrong[0]}: not an option of cell {self.cell!r} ({family}); "
                             f"its variant options are {allowed}")

    def build_stack(self, input_size: int, **layer_args: Any) -> nn.Module:
        """The recurrent stack (:func:`rnnkit.build`) for ``input_size`` features per step.

        ``layer_args`` go to the layer as they are (``batch_first``, ``bidirectional``, ...). Dropout
        between layers is applied only when there is more than one layer.
        """
        self.check_cell()
        layers = self.stack_layers
        return build(self.cell, input_size, self.stack_hidden, num_layers=layers,
                     dropout=self.dropout if layers > 1 else 0.0, backend=self.backend,
                     **self.cell_options(), **layer_args)


__all__ = ["VARIANT_OPTIONS", "RecurrentOptions"]
