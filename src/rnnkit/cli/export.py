"""``rnnkit export RUN_DIR --format onnx``: a trained model as an ONNX file (needs the ``export`` extra).

    rnnkit export runs/shakespeare                          # runs/shakespeare/model.onnx (sequence graph)
    rnnkit export runs/shakespeare --streaming              # runs/shakespeare/model.streaming.onnx
    rnnkit charlm sample --onnx runs/shakespeare/model.streaming.onnx --seed 1

The run directory of charlm, wordlm, classify, embed, anomaly, forecast or label. Prints the file, its
size, the opset and the mapping chosen for each recurrent layer (an ONNX LSTM/GRU/RNN operator, or a
Scan of the cell's own step).
"""

from pathlib import Path
from typing import Annotated

import typer

from .common import emit, user_errors

NAME = "export"
# A group whose callback is the command; interspersed args let RUN_DIR come before the options.
app = typer.Typer(help="Export a trained model to ONNX.", no_args_is_help=True, invoke_without_command=True,
                  context_settings={"allow_interspersed_args": True})


@app.callback(invoke_without_command=True)
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory of a training run.")],
    fmt: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
    out: Annotated[Path | None, typer.Option(
        "--out", help="Output file (default RUN_DIR/model.onnx, or model.streaming.onnx).")] = None,
    streaming: Annotated[bool, typer.Option(
        "--streaming", help="One time step with the recurrent state as inputs and outputs (generation, "
                            "online scoring) instead of whole sequences.")] = False,
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default 18).")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="latest, best or a step number.")] = "latest",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
) -> None:
    """Write the ONNX file of a trained model and say how each recurrent layer was mapped."""
    with user_errors(debug):
        from ..errors import UserError

        if fmt != "onnx":
            raise UserError(f"--format: expected 'onnx' (the only export format), got {fmt!r}")
        from ..export import DEFAULT_OPSET
        from ..export.models import export_run

        result, path, seconds = export_run(run_dir, out, streaming=streaming,
                                           opset=DEFAULT_OPSET if opset is None else opset, checkpoint=checkpoint)
        emit({"onnx": str(path), "bytes": path.stat().st_size, "graph": "streaming" if streaming else "sequence",
              "opset": result.opset, "inputs": ", ".join(i.name for i in result.model.graph.input),
              "outputs": ", ".join(o.name for o in result.model.graph.output), "export_s": round(seconds, 3),
              "layers": result.describe() if as_json else "; ".join(result.describe())}, as_json)
