"""``rnnkit cells``: list every registered cell and variant and the backends that run it."""

from __future__ import annotations

import json

import torch
import typer

from ..cells import REGISTRY, make_cell
from ..kernels import LayerConfig, working_backends

NAME = "cells"
app = typer.Typer(help="List the registered cells and variants.", no_args_is_help=False,
                  invoke_without_command=True)


@app.callback(invoke_without_command=True)
def list_cells(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Print every cell in the registry with its options, states, gates and the CPU backends that run it."""
    rows = []
    for spec in REGISTRY.values():
        cell = make_cell(spec.family, 8, **spec.cell_options)
        cfg = LayerConfig(**spec.layer_options)
        rows.append({"name": spec.name, "family": spec.family_name, "summary": spec.summary,
                     "options": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.options.items()},
                     "states": list(cell.state_names), "gates": list(cell.declaration.gates),
                     "backends_cpu": working_backends(cell, cfg, torch.device("cpu"))})
    if as_json:
        typer.echo(json.dumps(rows))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        typer.echo(f"{r['name']:<{width}}  {r['summary']}  [{', '.join(r['backends_cpu'])}]")
