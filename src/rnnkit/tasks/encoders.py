"""Sequence encoders shared by the tasks on real-valued sequences: model options, pooling, and the
encoder-decoder that reconstructs a sequence in reverse order.

:class:`SequenceAutoencoder` reads (B, T, C) inputs (with optional (B,) ``lengths``) with an encoder; its
final state seeds a decoder that outputs the sequence last step first, :math:`x'_T, \\ldots, x'_1`.
Two ways of producing the first output are in use:

- ``start="state"`` (Malhotra et al. 2016, EncDec-AD): :math:`x'_T = W h^{enc}_T + b`, then the decoder
  reads :math:`x_T, \\ldots, x_2` (teacher forcing) or its own previous outputs (free running);
- ``start="zeros"`` (Srivastava et al. 2015): the decoder reads a zero vector first, then
  :math:`x_T, \\ldots, x_2` (teacher forcing) or its own previous outputs.

Its embedding of a sequence is the last layer's final hidden state of the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..data.sequences import length_mask
from ..data.series import SeriesError
from .options import RecurrentOptions

POOLS = ("last", "mean", "attention")
STARTS = ("state", "zeros")


@dataclass(frozen=True)
class SeriesModelOptions(RecurrentOptions):
    """The recurrent encoder of the time-series tasks (``hidden`` units per layer and direction, ``layers``).

    Args:
        cell, dropout, backend, forget_bias ... zoneout: see :class:`RecurrentOptions`.
        hidden: hidden units per layer and direction.
        layers: stacked layers.
    """

    SIZE_KEYS: ClassVar[tuple[str, str]] = ("hidden", "layers")

    hidden: int = 64
    layers: int = 1

    def build_encoder(self, input_size: int, bidirectional: bool = False) -> nn.Module:
        """A batch-first :class:`rnnkit.Recurrent` stack."""
        return self.build_stack(input_size, bidirectional=bidirectional, batch_first=True)


def final_hidden(state: Tensor | tuple[Tensor, Tensor], directions: int) -> Tensor:
    """The last layer's final h of every direction, (B, D*H), from a torch.nn-layout state."""
    h = state[0] if isinstance(state, tuple) else state  # (L*D, B, H)
    return torch.cat(list(h[-directions:]), dim=-1)


class Pool(nn.Module):
    """Many-to-one pooling over valid steps only.

    ``last``: the final state at each sequence's last valid step (both directions if bidirectional);
    ``mean``: the mean of the outputs over valid steps; ``attention``: :math:`\\sum_t a_t o_t` with
    :math:`a = \\mathrm{softmax}_t(v^\\top \\tanh(W o_t))`, padded steps given zero weight.
    """

    def __init__(self, mode: str, size: int, directions: int) -> None:
        super().__init__()
        if mode not in POOLS:
            raise SeriesError(f"--pool: expected one of {POOLS}, got {mode!r}")
        self.mode, self.directions = mode, directions
        if mode == "attention":
            self.proj = nn.Linear(size, size)
            self.score = nn.Linear(size, 1, bias=False)

    def forward(self, out: Tensor, state: Any, lengths: Tensor) -> Tensor:
        """``out`` (B, T, D*H) padded outputs, ``state`` the final state, ``lengths`` (B,) -> (B, D*H)."""
        if self.mode == "last":
            return final_hidden(state, self.directions)
        mask = length_mask(lengths.to(out.device), out.shape[1]).unsqueeze(-1)  # (B, T, 1)
        if self.mode == "mean":
            return (out * mask).sum(1) / lengths.to(out.device, out.dtype).unsqueeze(-1)
        e = self.score(torch.tanh(self.proj(out))).masked_fill(~mask, float("-inf"))  # (B, T, 1)
        return (torch.softmax(e, dim=1) * out).sum(1)


def reverse_within(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each (B, T, C) sequence within its length; padding stays in place. No lengths: flip time."""
    if lengths is None:
        return x.flip(1)
    T = x.shape[1]
    t = torch.arange(T, device=x.device)[None, :]
    L = lengths.to(x.device)[:, None]
    idx = torch.where(t < L, L - 1 - t, t)  # (B, T)
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class SequenceAutoencoder(nn.Module):
    """Encoder + reverse-order decoder + linear read-out for (B, T, C) sequences (see the module docstring).

    Args:
        channels: C, features per step (input and output).
        options: the recurrent stacks (encoder and decoder are built alike, unidirectional).
        start: "state" or "zeros", how the decoder produces its first output.
    """

    def __init__(self, channels: int, options: SeriesModelOptions, start: str = "state") -> None:
        super().__init__()
        if start not in STARTS:
            raise ValueError(f"start: expected one of {STARTS}, got {start!r}")
        self.start = start
        self.encoder = options.build_encoder(channels)
        self.decoder = options.build_encoder(channels)
        self.head = nn.Linear(options.hidden, channels)

    @staticmethod
    def _trim(x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Cut padding beyond the longest sequence; equal lengths need no masking (same numbers, and the
        fused kernels run without it)."""
        if lengths is None:
            return x, None
        if torch.compiler.is_exporting():  # traced for ONNX: lengths are a graph input, the mask is exact
            return x, lengths
        T = int(lengths.max())
        return x[:, :T], (None if int(lengths.min()) == T else lengths)

    def encode(self, x: Tensor, lengths: Tensor | None = None) -> Any:
        """The encoder's final state (torch.nn layout) of ``x`` (B, T, C)."""
        x, lengths = self._trim(x, lengths)
        _, state = self.encoder(x, lengths=lengths)
        return state

    def embed(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The embedding (B, H): the encoder's last-layer final hidden state."""
        return final_hidden(self.encode(x, lengths), 1)

    def reconstruct_reversed(self, x: Tensor, lengths: Tensor | None = None,
                             teacher_forcing: bool = False) -> Tensor:
        """The reconstruction in reverse order, (B, T', C) with T' the longest length: position t holds
        :math:`x'_{L-t}` of a sequence of length L (positions >= L are padding)."""
        x, mask_lengths = self._trim(x, lengths)
        _, state = self.encoder(x, lengths=mask_lengths)
        h = state[0] if isinstance(state, tuple) else state
        rev = reverse_within(x, mask_lengths)  # x_T, ..., x_1, padding
        if teacher_forcing:
            if self.start == "state":  # x'_T from the state, then inputs x_T, ..., x_2
                dec_lengths = None if mask_lengths is None else (mask_lengths - 1).clamp(min=1)
                out, _ = self.decoder(rev[:, :-1], state, lengths=dec_lengths)
                return torch.cat([self.head(h[-1]).unsqueeze(1), self.head(out)], 1)
            dec_in = torch.cat([torch.zeros_like(rev[:, :1]), rev[:, :-1]], 1)  # 0, x_T, ..., x_2
            out, _ = self.decoder(dec_in, state, lengths=mask_lengths)
            return self.head(out)
        if self.start == "state":
            rec = [self.head(h[-1])]
        else:
            o, state = self.decoder.step(torch.zeros_like(x[:, 0]), state)
            rec = [self.head(o)]
        for _ in range(x.shape[1] - 1):
            o, state = self.decoder.step(rec[-1], state)
            rec.append(self.head(o))
        return torch.stack(rec, 1)

    def loss(self, x: Tensor, lengths: Tensor) -> Tensor:
        """Mean squared error of the teacher-forced reconstruction over valid steps and channels."""
        rec = self.reconstruct_reversed(x, lengths, teacher_forcing=True)
        T = rec.shape[1]
        rev = reverse_within(x[:, :T], lengths)
        mask = length_mask(lengths.to(x.device), T).unsqueeze(-1).to(x.dtype)
        return (((rec - rev) ** 2) * mask).sum() / (mask.sum() * x.shape[-1])

    def forward(self, x: Tensor, lengths: Tensor | None = None, teacher_forcing: bool = False) -> Tensor:
        """The reconstruction (B, T', C) in the original order (padding positions are not meaningful)."""
        rec = self.reconstruct_reversed(x, lengths, teacher_forcing)
        return reverse_within(rec, None if lengths is None else self._trim(x, lengths)[1])


__all__ = ["POOLS", "SeriesModelOptions", "final_hidden", "Pool", "reverse_within", "SequenceAutoencoder"]
