"""``rnnkit anomaly fit|score``: detect abnormal behaviour in a series from a model of normal behaviour."""

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from .common import RunOptions, run_command, run_or_onnx
from .forecast import CsvOpt, FillOpt, split_names, ts_config, write_csv

NAME = "anomaly"
app = typer.Typer(help="Anomaly detection: fit on normal data, score new data (batch or streaming).",
                  no_args_is_help=True)

ColumnOpt = Annotated[str | None, typer.Option("--column", help="Value column(s), comma-separated (default: every "
                                               "numeric column except --time/--labels).")]
TimeOpt = Annotated[str | None, typer.Option("--time", help="Time column (copied to the output).")]


def _values(path: Path, column: str | None, exclude: list[str], fill: str | None, names: list[str] | None = None
            ) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    from ..data.series import SeriesError, fill_missing, numeric_columns, read_table

    table = read_table(path, "--csv")
    cols = names or split_names(column) or [c for c, v in table.items() if c not in exclude and v.dtype.kind == "f"]
    if not cols:
        raise SeriesError(f"--column: no numeric column in {list(table)}")
    return fill_missing(numeric_columns(table, cols, "--column"), fill, "--csv", cols), cols, table


@app.command("fit")
@run_command(NAME)
def fit_cmd(csv_path: CsvOpt, column: ColumnOpt = None, time_col: TimeOpt = None,
            detector: Annotated[str | None, typer.Option("--detector", help="prediction or reconstruction.")] = None,
            cell: Annotated[str | None, typer.Option("--cell", help="Recurrent cell.")] = None,
            hidden: Annotated[int | None, typer.Option("--hidden", help="Hidden units.")] = None,
            window: Annotated[int | None, typer.Option("--window", help="Training chunk / window length.")] = None,
            threshold: Annotated[str | None, typer.Option("--threshold", help="quantile or dynamic.")] = None,
            quantile: Annotated[float | None, typer.Option("--quantile", help="Static threshold quantile.")] = None,
            fill: FillOpt = None, *, opts: RunOptions) -> None:
    """Fit a detector on --csv, which holds normal behaviour only."""
    from ..tasks import anomaly as A

    cfg = ts_config(opts, A.AnomalyConfig, {
        "model.detector": detector, "model.cell": cell, "model.hidden": hidden, "model.window": window,
        "data.threshold": threshold, "data.quantile": quantile, "data.fill": fill})
    values, cols, _ = _values(csv_path, column, [time_col] if time_col else [], cfg.data.fill)
    from ..data.series import check_not_constant

    check_not_constant(values, cols, "--column")
    run_dir = opts.run_dir
    opts.info(f"fitting a {cfg.model.detector} detector on {len(values)} rows of {cols} -> {run_dir}")
    det = A.train(values, cfg, run_dir, resume=opts.resume, quiet=opts.quiet)
    det.meta["columns"] = cols
    det.save(Path(run_dir))
    opts.emit({"run_dir": str(run_dir), "static_threshold": det.meta["static_threshold"], **det.meta["train"]})


@app.command()
@run_command(NAME, exclude=("out", "config", "set", "seed", "steps", "epochs", "minutes", "resume",
                            "checkpoint_every", "device"))
def score(run_dir: Annotated[Path | None, typer.Argument(help="Run directory of `rnnkit anomaly fit` (or --onnx).")
                             ] = None,
          onnx: Annotated[Path | None, typer.Option(
              "--onnx", help="Score with onnxruntime from a prediction detector exported by `rnnkit export "
                             "RUN_DIR [--streaming]` instead of the run's PyTorch model; --stream keeps its "
                             "state next to the file.")] = None,
          *, csv_path: CsvOpt, out: Annotated[Path, typer.Option("--out", help="Scores CSV: one row per point.")],
          labels: Annotated[str | None, typer.Option("--labels", help="Label column (1 = anomalous): report "
                                                      "P/R/F1 and the UCR rule.")] = None,
          time_col: TimeOpt = None,
          threshold: Annotated[str | None, typer.Option("--threshold", help="Override: quantile or dynamic.")]
          = None,
          stream: Annotated[bool, typer.Option("--stream", help="Continue from the state saved by the last "
                                               "--stream call (prediction detector) and save it again.")] = False,
          reset: Annotated[bool, typer.Option("--reset", help="With --stream: start from a fresh state.")] = False,
          plot: Annotated[Path | None, typer.Option("--plot", help="PNG plot (default: next to --out).")] = None,
          margin: Annotated[int, typer.Option("--margin", help="UCR rule: points around the label.")] = 100,
          fill: FillOpt = None, opts: RunOptions) -> None:
    """Score every point of --csv: writes score and flag per row, the flagged intervals and a plot."""
    import dataclasses

    from ..tasks import anomaly as A

    def load_onnx(path: Path) -> A.Detector:
        from ..export.runner import anomaly_detector

        return anomaly_detector(path)

    det = run_or_onnx(run_dir, onnx, lambda: A.Detector.load(run_dir), load_onnx,
                      "an exported prediction detector")
    if threshold is not None:
        if threshold not in ("quantile", "dynamic"):
            raise ValueError(f"--threshold: expected 'quantile' or 'dynamic', got {threshold!r}")
        det.cfg = dataclasses.replace(det.cfg, data=dataclasses.replace(det.cfg.data, threshold=threshold))
    exclude = [c for c in (time_col, labels) if c]
    values, cols, table = _values(csv_path, None, exclude, fill or det.cfg.data.fill, det.meta.get("columns"))
    if stream:
        scorer = det.stream()
        state_path = Path(run_dir) / A.STREAM_FILE if onnx is None else onnx.with_suffix("." + A.STREAM_FILE)
        if state_path.is_file() and not reset:
            scorer.load(state_path)
        first = scorer.seen
        scores = scorer.update(values)
        scorer.save(state_path)
    else:
        first = 0
        scores = det.score(values)
    index = np.arange(first, first + len(values))
    header = ["index"] + (["time"] if time_col else []) + cols + ["score", "raw_score", "flag"]
    y = None
    if labels is not None:
        from ..data.series import numeric_columns

        y = numeric_columns(table, [labels], "--labels")[:, 0]
        header.append("label")
    rows = []
    for i in range(len(values)):
        row: list[Any] = [int(index[i])] + ([table[time_col][i]] if time_col else [])
        row += [float(v) for v in values[i]] + [float(scores["score"][i]), float(scores["raw"][i]),
                                                int(scores["flag"][i])]
        if y is not None:
            row.append(int(y[i]))
        rows.append(row)
    write_csv(out, header, rows)
    found = A.intervals(scores)
    iv_path = out.with_name(out.stem + "_intervals.csv")
    write_csv(iv_path, ["start", "end", "max_score"], [[int(a) + first, int(b) + first, s] for a, b, s in found])
    png = A.plot_scores(values, scores, plot or out.with_suffix(".png"), y, title=f"{Path(csv_path).name}: "
                        f"{det.cfg.model.detector} detector")
    result: dict[str, Any] = {"scores_csv": str(out), "intervals_csv": str(iv_path), "plot": str(png),
                              "points": len(values), "flagged_points": int(scores["flag"].sum()),
                              "intervals": len(found)}
    if y is not None:
        result.update(A.evaluate(scores, y, margin))
    if not opts.json and found and not opts.quiet:
        opts.info("flagged intervals: " + json.dumps([[int(a) + first, int(b) + first] for a, b, _ in found[:10]])
                  + (" ..." if len(found) > 10 else ""))
    opts.emit(result)
