"""Truncated-BPTT stream batching (char-rnn / Zaremba layout).

A long sequence of N items (token ids ``(N,)`` or feature rows ``(N, F)``) is cut into B contiguous
streams of length ``L = N // B`` (the remainder is dropped) and laid out time-major::

    data  = a0 a1 ... a(L-1) | b0 b1 ... b(L-1) | ... (B streams)
    out   = (L, B, ...)  with out[t, s] = data[s * L + t]

Column s is read top to bottom, so the recurrent state of stream s after step t is the right initial
state for step t + 1: a trainer carries it across chunks and resets it only at the start of an epoch.
With data-parallel training each rank takes a contiguous block of the B columns.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..errors import UserError


def batchify(data: Tensor, num_streams: int, *, rank: int = 0, world_size: int = 1) -> Tensor:
    """Lay out ``data`` (N, ...) as ``num_streams`` parallel streams, time-major.

    Args:
        data: tensor with the time axis first.
        num_streams: B, the global number of streams (must be divisible by ``world_size``).
        rank, world_size: keep only this rank's block of ``B / world_size`` streams.
    Returns:
        (L, B / world_size, ...) view-compatible copy with ``L = N // B``.
    """
    if not isinstance(data, Tensor) or data.dim() < 1:
        raise UserError(f"stream data: expected a tensor with a leading time dimension, got {data!r:.80}")
    if num_streams < 1 or num_streams % world_size:
        raise UserError(f"batch_size: expected a positive multiple of the number of processes ({world_size}),"
                        f" got {num_streams}")
    L = data.shape[0] // num_streams
    if L < 2:
        raise UserError(f"stream data: {data.shape[0]} steps are too few for batch_size={num_streams} "
                        f"streams (need at least 2 steps per stream)")
    x = data[: L * num_streams].reshape(num_streams, L, *data.shape[1:]).transpose(0, 1)  # (L, B, ...)
    per = num_streams // world_size
    return x[:, rank * per:(rank + 1) * per].contiguous()


@dataclass(frozen=True)
class Segment:
    """A piece ``[start, end)`` of a TBPTT window, run by one call of the task's forward.

    ``detach_before``: the recurrent state is detached before this segment (a gradient cut);
    ``loss``: the segment's predictions count in the loss (False for the recomputed prefix when k2 > k1).
    """

    start: int
    end: int
    detach_before: bool
    loss: bool


@dataclass(frozen=True)
class ChunkPlan:
    """How one TBPTT(k1, k2) update runs: window ``[window, end)``, loss on ``[start, end)``.

    ``next_window``: where the next chunk's window starts; the state there (detached) is carried.
    """

    window: int
    start: int
    end: int
    next_window: int
    segments: tuple[Segment, ...]


def chunk_bounds(length: int, k1: int) -> list[tuple[int, int]]:
    """The chunks ``[i k1, min((i + 1) k1, L))`` of a stream of ``length`` steps."""
    return [(s, min(s + k1, length)) for s in range(0, length, k1)]


def window_start(start: int, k1: int, k2: int) -> int:
    """First step of the window that serves the chunk starting at ``start``: ``max(0, start - max(0, k2 - k1))``."""
    return max(0, start - max(0, k2 - k1))


def tbptt_plan(length: int, k1: int, k2: int, index: int) -> ChunkPlan:
    """The forward plan of chunk ``index`` of a stream of ``length`` steps under TBPTT(k1, k2).

    The window runs from ``window_start`` (its initial state is the one saved by the previous chunk,
    detached) to the chunk end; the loss is taken on the chunk only; when k2 < k1 the state is also
    detached at ``end - k2, end - 2 k2, ...`` inside the chunk. Segment boundaries fall on the chunk
    start, the cuts and the next window start, so the carried state can be read between segments.
    See docs/training.md for the diagram.
    """
    bounds = chunk_bounds(length, k1)
    if not 0 <= index < len(bounds):
        raise IndexError(f"chunk index {index} out of range for {len(bounds)} chunks")
    start, end = bounds[index]
    ws = window_start(start, k1, k2)
    nxt = window_start(bounds[index + 1][0], k1, k2) if index + 1 < len(bounds) else end
    cuts = {end - j * k2 for j in range(1, (end - start) // k2 + 1)}
    cuts = {c for c in cuts if start < c < end}
    points = sorted({ws, start, end, nxt} | cuts)
    segs = tuple(Segment(a, b, detach_before=a in cuts, loss=a >= start) for a, b in zip(points[:-1], points[1:]))
    return ChunkPlan(ws, start, end, nxt, segs)


def stream_steps(data: Tensor, num_streams: int) -> int:
    """Steps per stream, ``N // B``."""
    return int(data.shape[0]) // int(num_streams)


def count_tokens(targets: Tensor) -> int:
    """Number of (time, stream) positions in a time-major chunk."""
    return int(targets.shape[0] * targets.shape[1])


__all__ = ["batchify", "Segment", "ChunkPlan", "chunk_bounds", "window_start", "tbptt_plan", "stream_steps",
           "count_tokens"]
