"""``rnnkit export RUN_DIR --format onnx``: a trained model as an ONNX file (needs the ``export`` extra).

    rnnkit export runs/shakespeare                          # runs/shakespeare/model.onnx (sequence graph)
    rnnkit export runs/shakespeare --streaming              # runs/shakespeare/model.streaming.onnx
    rnnkit charlm sample --onnx runs/shakespeare/model.streaming.onnx --seed 1
    rnnkit export runs/g2p                                  # runs/g2p/model.encoder.onnx + model.decoder.onnx
    echo hello | rnnkit seq2seq translate --onnx runs/g2p/model.encoder.onnx

The run directory of charlm, wordlm, seq2seq, classify, embed, anomaly, forecast or label. Prints the file, its
size, the opset and the mapping chosen for each recurrent layer (an ONNX LSTM/GRU/RNN operator, or a
Scan of the cell's own step).
"""

import json
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
        "--out", help="Output file (default RUN_DIR/model.onnx, or model.streaming.onnx; a seq2seq run writes "
                      "OUT's stem + .encoder.onnx and .decoder.onnx).")] = None,
    streaming: Annotated[bool, typer.Option(
        "--streaming", help="One time step with the recurrent state as inputs and outputs (generation, "
                            "online scoring) instead of whole sequences.")] = False,
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default 18).")] = None,
    checkpoint: Annotated[str | None, typer.Option(
        "--checkpoint", help="latest, best or a step number (default: latest; seq2seq: best).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
) -> None:
    """Write the ONNX file(s) of a trained model and say how each recurrent layer was mapped."""
    with user_errors(debug):
        from ..errors import UserError

        if fmt != "onnx":
            raise UserError(f"--format: expected 'onnx' (the only export format), got {fmt!r}")
        from ..export import DEFAULT_OPSET
        from ..export.models import export_run

        files = export_run(run_dir, out, streaming=streaming, opset=DEFAULT_OPSET if opset is None else opset,
                           checkpoint=checkpoint)
        summary: dict = {}
        for f in files:  # one file, or a seq2seq run's encoder and decoder: their keys get the role
            role = f.result.metadata.get("rnnkit.graph_role")
            pre = f"{json.loads(role)}_" if role else ""
            layers = f.result.describe()
            summary.update({f"{pre}onnx": str(f.path), f"{pre}bytes": f.path.stat().st_size,
                            f"{pre}graph": "streaming" if f.result.streaming else "sequence",
                            f"{pre}inputs": ", ".join(i.name for i in f.result.model.graph.input),
                            f"{pre}outputs": ", ".join(o.name for o in f.result.model.graph.output),
                            f"{pre}export_s": round(f.seconds, 3),
                            f"{pre}layers": layers if as_json else "; ".join(layers)})
        summary["opset"] = files[0].result.opset
        emit(summary, as_json)
