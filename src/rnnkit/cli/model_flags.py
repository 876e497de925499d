"""Command-line flags of the shared model options (:class:`rnnkit.tasks.options.RecurrentOptions`), written
once for every command that exposes them: ``--backend`` and the cells' variant options."""

# no "from __future__ import annotations": typer reads these annotations
from typing import Annotated, Any

import typer

Backend = Annotated[str | None, typer.Option("--backend", help="Kernel: auto, native, bptt, reference.")]
Peephole = Annotated[bool | None, typer.Option("--peephole/--no-peephole", help="LSTM peepholes.")]
Coupled = Annotated[bool | None, typer.Option("--coupled/--no-coupled", help="LSTM CIFG (f = 1 - i).")]
DropGate = Annotated[list[str] | None, typer.Option(
    "--drop-gate", help="LSTM gate fixed at 1: input, forget or output (repeatable).")]
OutAct = Annotated[bool | None, typer.Option(
    "--output-activation/--no-output-activation", help="LSTM tanh on the cell output.")]
GateAct = Annotated[str | None, typer.Option(
    "--gate-activation", help="LSTM: activation of the i, f, o gates (sigmoid, hard_sigmoid, ...).")]
CandAct = Annotated[str | None, typer.Option(
    "--candidate-activation", help="LSTM: activation of the candidate g (tanh, relu, ...).")]
ForgetBias = Annotated[float | None, typer.Option("--forget-bias", help="LSTM forget-gate bias at init.")]
LayerNorm = Annotated[bool | None, typer.Option("--layer-norm/--no-layer-norm", help="Layer normalisation.")]
Nonlin = Annotated[str | None, typer.Option("--nonlinearity", help="Elman RNN: tanh or relu.")]
ResetAfter = Annotated[bool | None, typer.Option(
    "--reset-after/--reset-before", help="GRU: reset after the matmul (torch) or before (Cho et al.).")]
Zoneout = Annotated[float | None, typer.Option("--zoneout", help="Zoneout probability.")]
RecDrop = Annotated[float | None, typer.Option("--recurrent-dropout", help="Variational recurrent dropout.")]



def variant_flags(**given: Any) -> dict[str, Any]:
    """Dotted ``model.*`` overrides of the variant-option flags that were given (None = not given);
    ``drop_gates`` (the repeatable ``--drop-gate``) becomes a list."""
    out = {}
    for key, value in given.items():
        if key == "drop_gates":
            value = list(value) if value else None
        out[f"model.{key}"] = value
    return out
