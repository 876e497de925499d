"""torch's own fused recurrences (oneDNN on CPU, cuDNN on GPU) through ``torch._VF``.

Runs a whole stack (all layers and directions, inter-layer dropout included) in one call, exactly
as ``torch.nn.LSTM/GRU/RNN`` do. Only the plain cells are available: see ``Cell.native``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence


def run_stack(fn_name: str, x: Tensor, hx: Tensor | tuple[Tensor, Tensor], flat_weights: list[Tensor],
              *, bias: bool, num_layers: int, dropout: float, training: bool, bidirectional: bool,
              lengths: Tensor | None) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
    """Run the stack over time-major ``x`` (T, B, I); ``lengths`` (B,) on the CPU or None.

    ``flat_weights`` are ordered as torch.nn's ``_flat_weights`` (per layer and direction:
    w_ih, w_hh, b_ih, b_hh). Returns (out (T, B, D*H), final state in torch.nn layout).
    """
    fn = getattr(torch._VF, fn_name)
    is_lstm = fn_name == "lstm"
    args = (flat_weights, bias, num_layers, float(dropout), training, bidirectional)
    if lengths is None:
        hx_arg = list(hx) if is_lstm else hx
        result = fn(x, hx_arg, *args, False)
        out, hidden = result[0], result[1:] if is_lstm else result[1]
        return out, tuple(hidden) if is_lstm else hidden
    packed: PackedSequence = pack_padded_sequence(x, lengths, enforce_sorted=False)
    order = packed.sorted_indices
    if is_lstm:
        hx_arg = [h.index_select(1, order) for h in hx]
    else:
        hx_arg = hx.index_select(1, order)
    result = fn(packed.data, packed.batch_sizes, hx_arg, *args)
    out_packed = PackedSequence(result[0], packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    out, _ = pad_packed_sequence(out_packed, total_length=x.shape[0])
    back = packed.unsorted_indices
    if is_lstm:
        return out, (result[1].index_select(1, back), result[2].index_select(1, back))
    return out, result[1].index_select(1, back)
