"""BPTT engines and the dispatch that picks one per (cell configuration, device).

Backends:
    reference  autograd through the cell's plain-torch ``step()``; every cell; the oracle.
    bptt       explicit BPTT in torch ops with the backward derived from each cell's declaration; every cell.
    native     torch's fused kernels (oneDNN / cuDNN) via ``torch._VF``; plain LSTM, GRU, RNN only.
    cpu        fused numba loops generated from the cell's declaration (:mod:`.cpu`); every cell, on the CPU.
    triton     Triton kernels generated from the cell's declaration (:mod:`.triton_backend`); every cell, on CUDA.
    triton_persistent  the same, each time loop in one launch with R on chip; small H, on CUDA.

Each backend states what it can run as a :class:`~rnnkit.kernels.capability.Capability` read from the
cell's declaration (operations, state count, layer norm; ``native``, whose kernels are written by hand:
exactly the declarations they implement), plus device, dtype and regulariser checks. ``auto`` picks the
fastest correct backend. An unsupported (configuration, backend) pair raises a ``ValueError`` that lists
the backends that would work: there is no silent fallback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..cells.base import Cell
from . import bptt, reference
from .capability import Capability

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerConfig:
    """What, beyond the cell, decides which backends can run a layer."""

    recurrent_dropout: float = 0.0
    zoneout: float = 0.0


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    # Returns None when the backend can run the configuration, else the reason it cannot.
    unsupported: Callable[[Cell, LayerConfig, torch.device], str | None]
    # Per-layer runner (``run(cell, x, state0, w, masks)``), or None for whole-stack backends.
    run: Callable | None = None
    # The dtypes it runs (None: any); ``auto`` passes over it for others, an explicit request raises when run.
    dtypes: tuple[torch.dtype, ...] | None = None
    # What it can run, from the cell's declaration.
    capability: Capability = Capability()
    # ``auto`` tries it before every other backend for the cells this returns True for, per device type.
    preferred: Callable[[Cell, torch.device], bool] | None = None
    # The same for one time step at a time (``step()``, streaming): per-call costs decide there.
    preferred_step: Callable[[Cell, torch.device], bool] | None = None

    def refuses(self, cell: Cell, cfg: LayerConfig, device: torch.device) -> str | None:
        """None if this backend can run ``cell`` with ``cfg`` on ``device``, else the reason."""
        return self.capability.refuses(cell) or self.unsupported(cell, cfg, device)


def _always(cell: Cell, cfg: LayerConfig, device: torch.device) -> str | None:
    return None


#: The torch functions that run as a chain of per-step ATen ops on the CPU (no oneDNN kernel): slower
#: than the fused ``cpu`` loops over a sequence, faster for one step (fewer per-call costs), while the
#: LSTM's oneDNN kernel sets itself up on every call and loses to the ``cpu`` loops for one step
#: (docs/kernels.md, "Which backend auto picks").
ATEN_ON_CPU = ("gru", "rnn_tanh", "rnn_relu")


def _native_steps_faster(cell: Cell, device: torch.device) -> bool:
    return device.type == "cpu" and cell.native in ATEN_ON_CPU


def _native_unsupported(cell: Cell, cfg: LayerConfig, device: torch.device) -> str | None:
    if cell.native is None:
        return f"torch has no fused kernel for {cell!r}"
    if cfg.recurrent_dropout or cfg.zoneout:
        return "torch's fused kernels have no recurrent dropout or zoneout"
    return None


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", "autograd through step() (oracle)", _always, reference.run),
    "bptt": Backend("bptt", "explicit BPTT in torch ops", _always, bptt.run),
    "native": Backend("native", "torch fused kernels (oneDNN / cuDNN)", _native_unsupported, None,
                      capability=Capability(hand_written=True), preferred_step=_native_steps_faster),
}

# Preference order of ``auto`` per device type; the first backend that supports the configuration wins.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("native", "bptt"),
    "cuda": ("native", "bptt"),
}

# Backends ``auto`` tries last when a batch has sequences of different lengths, per device type:
# oneDNN has no packed-sequence path, so torch runs the slower generic kernel (measured 2.7x slower
# than the fused ``cpu`` backend at T=100, B=32, H=128 fwd+bwd).
AUTO_AVOID_WITH_LENGTHS: dict[str, tuple[str, ...]] = {"cpu": ("native",)}

def register(backend: Backend, *, auto_before: dict[str, str] | None = None) -> None:
    """Add a backend; ``auto_before={"cpu": "bptt"}`` makes ``auto`` try it before that backend (and
    ``backend.preferred`` before any other for the cells it selects)."""
    BACKENDS[backend.name] = backend
    for dev, before in (auto_before or {}).items():
        order = list(AUTO_ORDER.get(dev, ()))
        if backend.name in order:
            order.remove(backend.name)
        order.insert(order.index(before) if before in order else len(order), backend.name)
        AUTO_ORDER[dev] = tuple(order)


def working_backends(cell: Cell, cfg: LayerConfig, device: torch.device) -> list[str]:
    return [n for n, b in BACKENDS.items() if b.refuses(cell, cfg, device) is None]


def resolve(requested: str, cell: Cell, cfg: LayerConfig, device: torch.device, *,
            variable_lengths: bool = False, dtype: torch.dtype | None = None, streaming: bool = False) -> str:
    """Name of the backend that will run ``cell`` on ``device``; raises if ``requested`` cannot.

    Only ``auto`` looks at the workload: ``variable_lengths`` (the batch has sequences of different
    lengths), ``dtype`` (the input's; None: any) and ``streaming`` (one time step per call, as ``step()``
    makes: backends are then preferred by ``preferred_step``).
    """
    if requested == "auto":
        order = AUTO_ORDER.get(device.type, ("bptt",))

        def preferred(b: Backend) -> bool:
            rule = b.preferred_step if streaming else b.preferred
            return rule is not None and rule(cell, device)

        first = tuple(n for n in order if preferred(BACKENDS[n]))
        order = first + tuple(n for n in order if n not in first)
        if variable_lengths:
            avoid = AUTO_AVOID_WITH_LENGTHS.get(device.type, ())
            order = tuple(n for n in order if n not in avoid) + tuple(n for n in order if n in avoid)
        for name in order:
            b = BACKENDS.get(name)
            if b is None or (dtype is not None and b.dtypes is not None and dtype not in b.dtypes):
                continue
            if b.refuses(cell, cfg, device) is None:
                log.debug("backend auto -> %s for %r on %s", name, cell, device)
                return name
        return "bptt"
    if requested not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {sorted(BACKENDS)}, got {requested!r}")
    reason = BACKENDS[requested].refuses(cell, cfg, device)
    if reason is not None:
        raise ValueError(f"backend={requested!r} cannot run {cell!r} with {cfg} on {device}: {reason}. "
                         f"Backends that can: {working_backends(cell, cfg, device)} (or 'auto')")
    return requested


__all__ = ["BACKENDS", "AUTO_ORDER", "Backend", "Capability", "LayerConfig", "register", "resolve",
           "working_backends"]

from . import cpu  # noqa: E402,F401,I001  (registers backend="cpu", tried by auto before bptt)

from . import triton_backend  # noqa: E402,F401  (registers backend="triton"; imports triton lazily)

