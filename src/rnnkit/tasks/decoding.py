"""Decoding: turning a model's next-symbol logits into symbols.

The pieces work on logits and know nothing of the model: :func:`filter_logits` (temperature, top-k,
nucleus top-p), :func:`sample_next` (one draw, greedy at temperature 0), :func:`check_sampling` (the
settings' checks, as one-line errors) and :func:`sampling_generator` (a seeded or fresh generator).
:func:`generate` drives them with any :class:`StepModel`: ``forward`` reads the prime once, then every new
symbol is one ``step``, so a symbol costs one step, never a re-run of the prefix, and each is handed to
``on_token`` as soon as it is drawn (streaming). Decoders of other kinds (greedy and beam search over a
sequence-to-sequence decoder, CTC) belong in this module, reusing the same filtering.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor


class StepModel(Protocol):
    """A next-symbol model: ``model(x (T, B), state) -> (logits (T, B, V), state)`` over a prefix, and
    ``model.step(x_t (B,), state) -> (logits (B, V), state)`` for one symbol; ``parameters()`` and
    ``train()``/``eval()`` as an ``nn.Module``."""

    training: bool

    def __call__(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]: ...

    def step(self, x_t: Tensor, state: Any = None) -> tuple[Tensor, Any]: ...

    def parameters(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Logits (..., V) after temperature, top-k and nucleus (top-p) filtering; removed entries are -inf.

    top-p keeps the smallest set of most probable symbols whose probability sums to at least ``top_p``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0 (greedy decoding is sample_next's temperature=0), "
                         f"got {temperature}")
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p  # mass before this one >= p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> int:
    """Draw one symbol index from logits (V,); ``temperature == 0`` takes the most probable."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(filter_logits(logits.float(), temperature, top_k, top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"--temperature: expected a number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"--top-k: expected >= 0 (0 = no limit), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"--top-p: expected a probability in (0, 1], got {top_p}")


@torch.no_grad()
def generate(model: StepModel, prime: Sequence[int] | Tensor, length: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
             forbid: Sequence[int] = (), on_token: Callable[[int], None] | None = None,
             keep_logits: list[Tensor] | None = None) -> list[int]:
    """Continue ``prime`` by ``length`` sampled symbols.

    The prime runs through ``forward`` once; every further symbol is one ``model.step``. ``forbid``
    indices (e.g. the unknown symbol) are never drawn; ``on_token`` is called with each new index as
    soon as it is drawn (for streaming); ``keep_logits`` collects the (V,) logits each draw used.
    """
    check_sampling(temperature, top_k, top_p)
    prime = torch.as_tensor(prime, dtype=torch.int64)
    if prime.dim() != 1 or prime.numel() == 0:
        raise ValueError("prime: expected at least one symbol to start from")
    if length < 0:
        raise ValueError(f"--length: expected >= 0, got {length}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        logits, state = model(prime.view(-1, 1).to(device))
        logits = logits[-1, 0]
        out: list[int] = []
        forbid_idx = torch.as_tensor(list(forbid), dtype=torch.int64, device=device)
        for _ in range(length):
            if forbid_idx.numel():
                logits = logits.index_fill(0, forbid_idx, float("-inf"))
            if keep_logits is not None:
                keep_logits.append(logits.detach().cpu())
            tok = sample_next(logits, temperature, top_k, top_p, generator)
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            step_logits, state = model.step(torch.tensor([tok], device=device), state)
            logits = step_logits[0]
        return out
    finally:
        model.train(was_training)


def sampling_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or with a fresh random seed when None."""
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.seed() % 2**63))
    return g


__all__ = ["StepModel", "filter_logits", "sample_next", "check_sampling", "generate", "sampling_generator"]
