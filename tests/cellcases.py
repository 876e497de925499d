"""What tests parametrized over the cell registry need to know about each cell."""

from __future__ import annotations

import torch

from rnnkit.cells import REGISTRY, make_cell
from rnnkit.kernels.capability import hand_written


def _cell(name: str, H: int = 4):
    spec = REGISTRY[name]
    return make_cell(spec.family, H, **spec.cell_options)


#: Registered cells that the hand-written ``cpu`` / ``triton`` kernels implement.
HAND_WRITTEN = [n for n in REGISTRY if hand_written(_cell(n).declaration) is not None]


def input_size(name: str, I: int, H: int) -> int:
    """``I``, or ``H`` for a cell whose equations use the raw input (MUT1, MUT2)."""
    return H if _cell(name, H).declaration.raw_input else I


def random_state(name: str, LD: int, B: int, H: int, dtype=torch.float64, generator=None, requires_grad=True):
    """A given initial state for the layer (a tensor, or a tuple for several states). Values lie in
    [0.5, 1.5]: the sLSTM divides by its normaliser state n, which must stay away from zero."""
    parts = [(torch.rand(LD, B, H, dtype=dtype, generator=generator) + 0.5).requires_grad_(requires_grad)
             for _ in range(_cell(name).state_size)]
    return tuple(parts) if len(parts) > 1 else parts[0]
