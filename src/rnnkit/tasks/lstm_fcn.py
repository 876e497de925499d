"""The LSTM-FCN family for sequence classification, and strided / dilated reading of long series.

LSTM-FCN (Karim et al. 2017) and MLSTM-FCN (Karim et al. 2019) run two branches on the same input and
classify their concatenation:

- the fully convolutional branch (FCN, Wang et al. 2017): three blocks Conv1d -> BatchNorm -> ReLU with
  128, 256, 128 filters of widths 8, 5, 3, then global average pooling over the valid steps; MLSTM-FCN adds
  a squeeze-and-excite block (Hu et al. 2018; reduction 16) after the first two blocks:
  :math:`u \\leftarrow u \\odot \\sigma(W_2\\, \\mathrm{ReLU}(W_1 \\bar u))`, :math:`\\bar u` the mean over time;
- the recurrent branch: any registered cell. With the *dimension shuffle* of the papers the cell reads the
  C channels as C time steps of T features each (a univariate series is one step of T features);
  without it, it reads the T steps as usual, optionally through a strided or dilated reader
  (:class:`Reader`). Dropout (0.8 in the papers) follows it.

Shapes: ``x`` (B, T, C) zero-padded, ``lengths`` (B,) -> logits (B, K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.sequences import length_mask
from ..data.series import SeriesError
from .encoders import SeriesModelOptions, final_hidden

READS = ("full", "fold", "dilate")


class Reader(nn.Module):
    """How a recurrent encoder reads a long sequence, with stride k.

    ``full``: every step. ``fold``: k consecutive steps become one step of k*C features
    (T/k steps, nothing dropped; the last block zero-padded). ``dilate``: the k interleaved subsequences
    :math:`x_{j}, x_{j+k}, x_{j+2k}, \\ldots` (j = 0..k-1) are read separately by the same encoder and their final
    states averaged (a dilated recurrence: each step reaches k steps back).
    """

    def __init__(self, mode: str, stride: int) -> None:
        super().__init__()
        if mode not in READS:
            raise SeriesError(f"--reader: expected one of {READS}, got {mode!r}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise SeriesError(f"--stride: expected an int >= 1, got {stride!r}")
        self.mode, self.k = mode, stride if mode != "full" else 1

    def input_size(self, channels: int) -> int:
        return channels * self.k if self.mode == "fold" else channels

    def forward(self, encoder: nn.Module, x: Tensor, lengths: Tensor) -> Tensor:
        """Final hidden state (B, H) of ``encoder`` over ``x`` (B, T, C) read this way."""
        B, T, C = x.shape
        k = self.k
        if k > 1:
            pad = (-T) % k
            x = torch.cat([x, x.new_zeros(B, pad, C)], 1) if pad else x  # (B, T', C), T' = k * ceil(T/k)
        if self.mode == "fold" and k > 1:
            x = x.reshape(B, -1, k * C)  # (B, T'/k, kC)
            lengths = (lengths + k - 1) // k
        elif self.mode == "dilate" and k > 1:
            x = x.reshape(B, -1, k, C).transpose(1, 2).reshape(B * k, -1, C)  # (B k, T'/k, C): phase j of b
            j = torch.arange(k, device=lengths.device)
            lengths = ((lengths[:, None] - j[None, :] + k - 1) // k).clamp(min=1).reshape(-1)
        equal = bool((lengths == x.shape[1]).all())
        _, state = encoder(x, lengths=None if equal else lengths)
        h = final_hidden(state, 1)
        return h.view(B, k, -1).mean(1) if self.mode == "dilate" and k > 1 else h


class SqueezeExcite(nn.Module):
    """Channel re-weighting of (B, F, T) feature maps by a gate computed from their masked time mean."""

    def __init__(self, features: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, max(1, features // reduction))
        self.fc2 = nn.Linear(max(1, features // reduction), features)

    def forward(self, u: Tensor, mask: Tensor) -> Tensor:
        mean = (u * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B, F)
        return u * torch.sigmoid(self.fc2(torch.relu(self.fc1(mean))))[..., None]


class FCN(nn.Module):
    """Three Conv1d-BatchNorm-ReLU blocks (128/256/128 filters, widths 8/5/3, 'same' padding) and global
    average pooling over valid steps: (B, T, C) -> (B, 128). Padded steps are zeroed after every block."""

    def __init__(self, channels: int, squeeze_excite: bool = False,
                 filters: tuple[int, int, int] = (128, 256, 128), widths: tuple[int, int, int] = (8, 5, 3)) -> None:
        super().__init__()
        sizes = (channels, *filters)
        self.convs = nn.ModuleList(nn.Conv1d(sizes[i], sizes[i + 1], widths[i]) for i in range(3))
        self.pads = [((w - 1) // 2, w // 2) for w in widths]  # 'same' output length, the extra zero on the right
        self.norms = nn.ModuleList(nn.BatchNorm1d(f) for f in filters)
        self.se = nn.ModuleList(SqueezeExcite(f) for f in filters[:2]) if squeeze_excite else None
        self.out_size = filters[-1]

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        mask = length_mask(lengths.to(x.device), x.shape[1])[:, None, :].to(x.dtype)  # (B, 1, T)
        u = x.transpose(1, 2)  # (B, C, T)
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            u = torch.relu(norm(conv(F.pad(u, self.pads[i])))) * mask
            if self.se is not None and i < 2:
                u = self.se[i](u, mask)
        return u.sum(-1) / mask.sum(-1)  # (B, F)


@dataclass(frozen=True)
class LSTMFCNConfig(SeriesModelOptions):
    """Settings of :class:`LSTMFCN`.

    Args:
        cell, hidden, layers, backend, forget_bias ... zoneout: the recurrent branch (any registered cell and
            its options, see :class:`~rnnkit.tasks.encoders.SeriesModelOptions`).
        shuffle: the papers' dimension shuffle (the cell reads channels as steps).
        squeeze_excite: the MLSTM-FCN squeeze-and-excite blocks.
        branch_dropout: after the recurrent branch (0.8 in the papers).
        reader, stride: how the recurrent branch reads the steps when not shuffled (:class:`Reader`).
    """

    shuffle: bool = True
    squeeze_excite: bool = False
    branch_dropout: float = 0.8
    reader: Literal["full", "fold", "dilate"] = "full"
    stride: int = 1


class LSTMFCN(nn.Module):
    """LSTM-FCN / MLSTM-FCN: (B, T, C) padded inputs with (B,) lengths -> (B, K) logits.

    ``max_len`` is the input length the shuffled recurrent branch expects (its feature size);
    longer inputs are cut to it, shorter ones zero-padded.
    """

    def __init__(self, channels: int, n_classes: int, cfg: LSTMFCNConfig, max_len: int) -> None:
        super().__init__()
        self.cfg, self.max_len = cfg, max_len
        self.reader = Reader(cfg.reader, cfg.stride)
        rnn_in = max_len if cfg.shuffle else self.reader.input_size(channels)
        self.rnn = cfg.build_encoder(rnn_in)
        self.drop = nn.Dropout(cfg.branch_dropout)
        self.fcn = FCN(channels, cfg.squeeze_excite)
        self.head = nn.Linear(cfg.hidden + self.fcn.out_size, n_classes)

    def embed(self, x: Tensor, lengths: Tensor) -> Tensor:
        """The concatenated branch outputs (B, hidden + 128)."""
        if self.cfg.shuffle:
            T = x.shape[1]
            xs = x[:, :self.max_len] if T >= self.max_len else torch.cat(
                [x, x.new_zeros(x.shape[0], self.max_len - T, x.shape[2])], 1)
            _, state = self.rnn(xs.transpose(1, 2))  # (B, C, T): C steps of T features
            h = final_hidden(state, 1)
        else:
            h = self.reader(self.rnn, x, lengths)
        return torch.cat([self.drop(h), self.fcn(x, lengths)], -1)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        return self.head(self.embed(x, lengths))
