"""What every per-layer kernel receives besides the cell, the input and the weights."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


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
