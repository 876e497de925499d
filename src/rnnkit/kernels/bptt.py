"""Explicit backpropagation through time in torch ops: the shared skeleton every cell plugs into.

Forward: the input projections of all steps come from one matmul (``cell.project_input``, under
autograd); then per step one recurrent matmul (per recurrent part) and the cell's pointwise forward.
Backward: the steps run in reverse through the cell's derived pointwise backward; the
recurrent weight and bias gradients are accumulated afterwards with one matmul over all steps.
Only what the cell's backward needs is kept, plus each recurrent matmul's input.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..cells.base import Cell, State, Weights
from .common import LayerMasks


class _RecForward:
    """``rec(inp, part) = (inp * hmask) @ R_part^T + b_part``; remembers each input for dR."""

    def __init__(self, cell: Cell, R: Tensor, b: Tensor | None, hmask: Tensor | None) -> None:
        H = cell.hidden_size
        bounds = [0]
        for g in cell.rec_parts:
            bounds.append(bounds[-1] + g * H)
        self.R = [R[a:z] for a, z in zip(bounds, bounds[1:])]
        self.Rt = [r.t() for r in self.R]
        self.b = [None if b is None else b[a:z] for a, z in zip(bounds, bounds[1:])]
        self.hmask = hmask
        self.inputs: list[list[Tensor]] = [[] for _ in cell.rec_parts]

    def __call__(self, inp: Tensor, part: int = 0) -> Tensor:
        if self.hmask is not None:
            inp = inp * self.hmask
        self.inputs[part].append(inp)
        b = self.b[part]
        return inp @ self.Rt[part] if b is None else torch.addmm(b, inp, self.Rt[part])


class _RecBackward:
    """``rec_t(d, part) = (d @ R_part) * hmask``; remembers each ``d`` for dR and db."""

    def __init__(self, fwd: _RecForward) -> None:
        self.R = fwd.R
        self.hmask = fwd.hmask
        self.douts: list[list[Tensor]] = [[] for _ in fwd.R]

    def __call__(self, d: Tensor, part: int = 0) -> Tensor:
        self.douts[part].append(d)
        g = d @ self.R[part]
        return g if self.hmask is None else g * self.hmask


class _Recurrence(torch.autograd.Function):
    """The recurrence of one layer/direction given input pre-activations ``xg`` (T, B, G*H)."""

    @staticmethod
    def forward(ctx, cell: Cell, names: tuple[str, ...], masks: LayerMasks, xg: Tensor, R: Tensor,
                b_hh: Tensor | None, *rest: Tensor):
        n_state = cell.state_size
        state = tuple(rest[:n_state])
        extras = dict(zip(names, rest[n_state:]))
        w = {"bias_hh": b_hh, **extras}
        rec = _RecForward(cell, R, b_hh if cell.rec_bias else None, masks.hmask)
        T = xg.shape[0]
        out = xg.new_empty(T, *state[0].shape)
        saved = []
        for t in range(T):
            new, s = cell.forward(xg[t], state, rec, w)
            if masks.keep is not None:
                new = tuple(torch.lerp(n, p, k[t]) for k, p, n in zip(masks.keep, state, new))
            saved.append(s)
            out[t] = new[0]
            state = new
        if masks.out_mask is not None:
            out.mul_(masks.out_mask)
        ctx.cell, ctx.names, ctx.masks, ctx.w, ctx.rec, ctx.saved = cell, names, masks, w, rec, saved
        ctx.xg_meta = (xg.shape, xg.dtype, xg.device)
        # Clones: returned tensors must not also sit in ctx (a reference cycle would keep them alive).
        return (out, *(s.clone() for s in state))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor | None, *dfinal: Tensor | None):
        cell, masks, w, rec, saved = ctx.cell, ctx.masks, ctx.w, ctx.rec, ctx.saved
        xg_shape, dtype, device = ctx.xg_meta
        T = xg_shape[0]
        zeros = torch.zeros(xg_shape[1], cell.hidden_size, dtype=dtype, device=device)
        dstate = [zeros if d is None else d for d in dfinal]
        if dout is not None and masks.out_mask is not None:
            dout = dout * masks.out_mask
        rec_t = _RecBackward(rec)
        dxg = torch.empty(xg_shape, dtype=dtype, device=device)
        dextra: dict[str, Tensor] = {}
        for t in range(T - 1, -1, -1):
            d = list(dstate)
            if dout is not None:
                d[0] = d[0] + dout[t]
            carry = None
            if masks.keep is not None:
                carry = [k[t] * di for k, di in zip(masks.keep, d)]
                d = [di - c for di, c in zip(d, carry)]
            dxg[t], dprev, grads = cell.backward(tuple(d), saved[t], rec_t, w)
            for name, g in grads.items():
                dextra[name] = dextra[name] + g if name in dextra else g
            dstate = list(dprev) if carry is None else [p + c for p, c in zip(dprev, carry)]
        # Weight gradients: one matmul over all steps per recurrent part.
        dR_parts, db_parts = [], []
        for ins, ds in zip(rec.inputs, rec_t.douts):
            D = torch.stack(ds[::-1]).flatten(0, 1)  # (T*B, g*H), forward time order
            X = torch.stack(ins).flatten(0, 1)        # (T*B, H)
            dR_parts.append(D.t() @ X)
            db_parts.append(D.sum(0))
        dR = torch.cat(dR_parts, 0)
        db_hh = None
        if w["bias_hh"] is not None:
            db_hh = torch.cat(db_parts, 0) if cell.rec_bias else dextra.get("bias_hh")
        extras = [dextra.get(n) for n in ctx.names]
        return (None, None, None, dxg, dR, db_hh, *dstate, *extras)


def run(cell: Cell, x: Tensor, state0: State, w: Weights, masks: LayerMasks) -> tuple[Tensor, State]:
    """Run one layer in one direction over ``x`` (T, B, I); returns outputs (T, B, H) and final state."""
    xg = cell.project_input(x, w)  # (T, B, G*H): one matmul for all steps, autograd handles dW
    names = tuple(n for n in cell.extra_shapes())
    out, *state = _Recurrence.apply(cell, names, masks, xg, w["weight_hh"], w["bias_hh"], *state0,
                                    *(w[n] for n in names))
    return out, tuple(state)
