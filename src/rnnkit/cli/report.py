"""``rnnkit report RUN_DIR``: a self-contained HTML page of a run (figures embedded, no network needed).

    rnnkit report runs/adding-lstm                    # writes runs/adding-lstm/report.html
    rnnkit report runs/adding-lstm --png plots/       # also exports every figure as PNG
    rnnkit report runs/charlm --capture-file page.txt # text model: add the cell-activation viewer
"""

from pathlib import Path
from typing import Annotated

import typer

from .common import emit, user_errors

NAME = "report"
# A group whose callback is the command; interspersed args let RUN_DIR come before the options.
app = typer.Typer(help="Build the HTML report of a run directory.", no_args_is_help=True,
                  invoke_without_command=True, context_settings={"allow_interspersed_args": True})


@app.callback(invoke_without_command=True)
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (from any rnnkit training command).")],
    out: Annotated[Path | None, typer.Option("--out", help="HTML file (default RUN_DIR/report.html).")] = None,
    png: Annotated[Path | None, typer.Option("--png", help="Also write every figure as PNG into this folder.")]
    = None,
    capture: Annotated[str | None, typer.Option(
        "--capture", help="Text model runs (charlm): run the model over this text and add the cell-activation "
                          "viewer and gate statistics (writes RUN_DIR/activations.json, gate_stats.json).")] = None,
    capture_file: Annotated[Path | None, typer.Option(
        "--capture-file", help="As --capture, with the text read from a file (UTF-8).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
) -> None:
    """Write the report page (learning curves, gradient flow, gate statistics, activations, samples, config)."""
    with user_errors(debug):
        from ..analysis.report import export_pngs, write_report

        if not run_dir.is_dir():
            raise FileNotFoundError(f"RUN_DIR: {str(run_dir)!r} is not a directory")
        if capture is not None and capture_file is not None:
            raise ValueError("--capture / --capture-file: give one of them, not both")
        if capture_file is not None:
            capture = capture_file.read_text(encoding="utf-8")
        if capture is not None:
            import json

            from ..analysis.capture import capture_text_run

            act, stats = capture_text_run(run_dir, capture)
            (run_dir / "activations.json").write_text(json.dumps(act, separators=(",", ":")))
            if stats is not None:
                (run_dir / "gate_stats.json").write_text(json.dumps(stats))
        path = write_report(run_dir, out)
        result = {"report": str(path), "bytes": path.stat().st_size}
        if png is not None:
            result["png"] = [str(p) for p in export_pngs(run_dir, png)]
        emit(result, as_json)
