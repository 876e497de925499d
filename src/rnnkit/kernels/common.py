"""What every per-layer kernel receives besides the cell, the input and the weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# dtypes the numba loops are compiled for
NUMBA_DTYPES = (torch.float32, torch.float64)


def check_numba_input(backend: str, x: Tensor) -> None:
    """A numba backend runs float32/float64 tensors on the CPU; anything else is a clear error."""
    if x.dtype not in NUMBA_DTYPES:
        from . import BACKENDS

        others = [n for n in BACKENDS if n != backend]
        raise TypeError(f"backend={backend!r} runs float32 and float64 only, got dtype {x.dtype}; "
                        f"use another dtype or one of the backends {others}")
    if x.device.type != "cpu":
        raise ValueError(f"backend={backend!r}: input is on {x.device}; expected the CPU")


@dataclass(frozen=True)
class LayerMasks:
    """Per-(layer, direction) masks, sampled by the layer so that all kernels see the same numbers.

    Attributes:
        hmask: (B, H) scale on h in the recurrent matmul (variational recurrent dropout), or None.
        keep: per state component, (T, B, H or 1): the new state is ``keep * prev + (1 - keep) * cell``.
            Zoneout and variable lengths (keep = 1 past a sequence's end) both use it. None = all 0.
        out_mask: (T, B, 1) 1 for valid steps and 0 past each length, or None.
    """

    hmask: Tensor | None = None
    keep: tuple[Tensor, ...] | None = None
    out_mask: Tensor | None = None
