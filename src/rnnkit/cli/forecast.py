"""``rnnkit forecast train|predict|backtest``: multi-step forecasting of CSV/Parquet/NumPy series."""


import csv
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import RunOptions, run_command

NAME = "forecast"
app = typer.Typer(help="Forecast time series: train, predict the next H steps, backtest against baselines.",
                  no_args_is_help=True)

# ---- flags shared by the time-series commands ---------------------------------------------------
CsvOpt = Annotated[Path, typer.Option("--csv", help="Input series: .csv, .tsv, .parquet, .npy or .npz.")]
TargetOpt = Annotated[str | None, typer.Option("--target", help="Target column(s), comma-separated "
                                               "(default: every numeric column).")]
TimeOpt = Annotated[str | None, typer.Option("--time", help="Time column (labels only; rows must be in order).")]
FillOpt = Annotated[str | None, typer.Option("--fill", help="Missing values: ffill, interpolate or zero "
                                             "(default: error).")]


def ts_config(opts: RunOptions, cls: type, flags: dict[str, Any]) -> Any:
    """Config: task defaults < --config < --set < task flags (only those given) < shared budget/seed/device flags."""
    from ..train.config import load_config

    overrides = opts.overrides(flags)
    if opts.quiet:
        overrides.setdefault("trainer.log_every", 10_000)
    return load_config(cls, opts.config, overrides)


def split_names(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _model_flags(horizon, lookback, cell, hidden, layers, decoder, head, quantiles, interval, scaler, log,
                 window_norm, season, fill, ensemble, difference) -> dict[str, Any]:
    from ..tasks.base import parse_floats

    return {"data.horizon": horizon, "data.lookback": lookback, "model.cell": cell, "model.hidden": hidden,
            "model.layers": layers, "model.decoder": decoder, "model.head": head,
            "model.quantiles": list(parse_floats(quantiles, "--quantiles")) if quantiles else None,
            "data.interval": interval, "data.scaler": scaler, "data.log": log, "data.window_norm": window_norm,
            "data.season": season, "data.fill": fill, "model.ensemble": ensemble,
            "data.difference": list(parse_floats(difference, "--difference", int)) if difference else None}


_H = typer.Option(None, "--horizon", help="Steps to forecast (H).")
_L = typer.Option(None, "--lookback", help="Input window length (L).")
_CELL = typer.Option(None, "--cell", help="Recurrent cell (see `rnnkit cells`).")
_HID = typer.Option(None, "--hidden", help="Hidden units.")
_LAY = typer.Option(None, "--layers", help="Stacked layers.")
_DEC = typer.Option(None, "--decoder", help="direct or recursive.")
_HEAD = typer.Option(None, "--head", help="point, gaussian or quantile.")
_Q = typer.Option(None, "--quantiles", help="Quantile levels, e.g. 0.1,0.5,0.9.")
_INT = typer.Option(None, "--interval", help="Prediction-interval coverage, e.g. 0.8.")
_SC = typer.Option(None, "--scaler", help="standard, minmax, robust or none (fit on training rows).")
_LOG = typer.Option(None, "--log/--no-log", help="Model log(y) (positive series).")
_WN = typer.Option(None, "--window-norm", help="none, last, mean or seasonal (per-window offset; seasonal: "
                   "learn the correction to the seasonal-naive forecast).")
_SEA = typer.Option(None, "--season", help="Seasonal period (seasonal naive, MASE, SARIMA).")
_DIFF = typer.Option(None, "--difference", help="Difference the (log) target at these lags before modelling, "
                     "e.g. 1,12 for (1-B)(1-B^12) as in the airline model; forecasts are integrated back.")
_ENS = typer.Option(None, "--ensemble", help="Average this many models trained with different seeds.")
_AUTO = typer.Option(None, "--auto/--no-auto", help="Automatic mode (the default unless a setting of the fixed "
                     "model is given: --cell --hidden --layers --decoder --head --quantiles --interval --scaler "
                     "--window-norm --ensemble, covariates, a [model]/[data] --config): season, transform and "
                     "input window chosen on a validation tail; --no-auto trains the fixed model.")
_TRANSFORM = typer.Option(None, "--transform", help="Automatic mode: the transform, e.g. none, log, d1, log+d12 "
                          "(default: chosen on the validation tail; --log/--difference set it too).")
_ID = typer.Option(None, "--id-column", help="Long format: the column naming each series (id,time,value rows); "
                   "one global model is trained over all the series.")
_PAST = typer.Option(None, "--past-covariates", help="Covariate columns observed only up to now.")
_FUT = typer.Option(None, "--future-covariates", help="Covariate columns known in the future.")


def _load(csv_path: Path, target, time_col, past, future, fill, trailing: bool = False):
    from ..data.series import load_series

    return load_series(csv_path, target, time=time_col, past=split_names(past), future=split_names(future),
                       fill=fill, name="--csv", trailing_future=trailing)


def _config_is_auto(path: Path | None) -> bool:
    """A --config file written by the automatic mode (top-level keys, an [auto] table)."""
    if path is None or not Path(path).is_file():
        return False
    import tomllib

    with open(path, "rb") as f:
        return "auto" in tomllib.load(f)


def _panel(csv_path: Path, target: str | None, time_col: str | None, id_col: str | None, fill: str | None):
    """The input of the automatic mode: every series of a .tsf file, of a long table (--id-column), or the
    target columns of a wide table (default: every numeric column but --time)."""
    from ..data.panel import Panel, panel_from_table
    from ..data.series import read_table
    from ..data.tsf import read_tsf

    if Path(csv_path).suffix.lower() == ".tsf":
        d = read_tsf(csv_path, "--csv")
        return Panel(d.names, d.series, [None] * len(d.series))
    table = read_table(csv_path, "--csv")
    names = split_names(target)
    if not names:
        names = [c for c, v in table.items() if c not in (time_col, id_col) and v.dtype.kind == "f"][:1 if id_col
                                                                                                        else None]
    return panel_from_table(table, names, id_col, time_col, fill)


def _auto_rows(panel, preds) -> tuple[list[str], list[list[Any]]]:
    """forecast.csv of the automatic mode: id, step, time (when the input has a time index), forecast."""
    import numpy as np

    with_time = panel.times[0] is not None and panel.times[0].dtype.kind in "Mf"
    rows = []
    for key, t, p in zip(panel.ids, panel.times, preds):
        if with_time:  # the grid continued: dates as text, whole numbers as integers
            nxt = t[-1] + (t[-1] - t[-2]) * np.arange(1, len(p) + 1)
            times = [str(v) for v in nxt] if t.dtype.kind == "M" else (
                [int(v) for v in nxt] if np.all(t == np.round(t)) else [float(v) for v in nxt])
        rows += [[key, h] + ([times[h - 1]] if with_time else []) + [float(v)] for h, v in enumerate(p, start=1)]
    return ["id", "step"] + (["time"] if with_time else []) + ["forecast"], rows


def _train_auto(csv_path, target, time_col, id_col, horizon, lookback, season, transform, log, difference, fill,
                opts: RunOptions) -> None:
    import numpy as np

    from ..data.series import Scaler
    from ..errors import UserError
    from ..tasks import forecast_auto as A
    from ..tasks.base import open_run_dir, parse_floats
    from ..tasks.forecast_auto import transform_name
    from ..train.config import load_config

    for flag, v in (("--epochs", opts.epochs), ("--minutes", opts.minutes), ("--resume", opts.resume or None),
                    ("--checkpoint-every", opts.checkpoint_every)):
        if v is not None:
            raise UserError(f"{flag}: the automatic mode budgets optimizer steps per fit (--steps); use --no-auto "
                            f"for {flag}")
    if transform is not None and (log is not None or difference):
        raise UserError("--transform: give either --transform or --log/--difference, not both")
    if transform is None and (log is not None or difference):
        transform = transform_name(bool(log), parse_floats(difference, "--difference", int) if difference else ())
    flags = {"horizon": horizon, "lookback": lookback, "season": season, "transform": transform,
             "seed": opts.seed, "auto.steps": opts.steps, "auto.device": opts.device}
    ov = opts.overrides(flags, section="")
    for k in ("steps", "epochs", "minutes", "checkpoint_every", "device"):
        ov.pop(k, None)
    cfg = load_config(A.AutoForecastConfig, opts.config, ov)
    panel = _panel(csv_path, target, time_col, id_col, fill)
    for name, y in zip(panel.ids, panel.values):  # values that overflow once scaled: the fixed model's error
        Scaler().fit(np.asarray(y, dtype=np.float64)[:, None], [name],
                     "--csv" if id_col is None else f"--csv (series {name!r})")
    run_dir = open_run_dir(opts.run_dir, resume=False)
    opts.info(f"automatic mode: {len(panel)} series, horizon {cfg.horizon} -> {run_dir}")
    model = A.train_auto(panel.values, cfg, None, log_fn=opts.info)
    model.save(run_dir, {"input": {"target": target, "time": time_col, "id_column": id_col, "fill": fill}})
    header, rows = _auto_rows(panel, [model.predict(y) for y in panel.values])
    ch = model.record["chosen"]
    opts.info(f"season {ch['season']}; the forecast averages {', '.join(ch['members'])} (transform:lookback:steps): "
              f"{ch['why']}")
    opts.emit({"run_dir": str(run_dir), "mode": "auto", "series": len(panel), "choices": model.record,
               "forecast_csv": str(write_csv(run_dir / "forecast.csv", header, rows))})


@app.command()
@run_command(NAME)
def train(csv_path: CsvOpt, target: TargetOpt = None, time_col: TimeOpt = None, horizon: int | None = _H,
          lookback: int | None = _L, cell: str | None = _CELL, hidden: int | None = _HID,
          layers: int | None = _LAY, decoder: str | None = _DEC, head: str | None = _HEAD,
          quantiles: str | None = _Q, interval: float | None = _INT, scaler: str | None = _SC,
          log: bool | None = _LOG, window_norm: str | None = _WN, season: int | None = _SEA,
          fill: FillOpt = None, ensemble: int | None = _ENS, difference: str | None = _DIFF,
          past_covariates: str | None = _PAST, future_covariates: str | None = _FUT,
          auto: bool | None = _AUTO, transform: str | None = _TRANSFORM, id_column: str | None = _ID, *,
          opts: RunOptions) -> None:
    """Train a forecaster on --csv; writes the model, config, and the forecast of the next H steps.

    By default the automatic mode chooses the season, the transform and the input window on a validation
    tail (printed, and in --json and model.json); a .tsf file or --id-column gives one global model over
    many series. --no-auto (or a setting of the fixed model) trains the fixed model of the config.
    """
    from ..tasks import forecast as F

    fixed = (cell, hidden, layers, decoder, head, quantiles, interval, scaler, window_norm, ensemble,
             past_covariates, future_covariates)
    if auto is None:
        auto = all(v is None for v in fixed) and (opts.config is None or _config_is_auto(opts.config))
    if auto:
        return _train_auto(csv_path, target, time_col, id_column, horizon, lookback, season, transform, log,
                           difference, fill, opts)
    if transform is not None or id_column is not None:
        from ..errors import UserError

        raise UserError("--transform and --id-column belong to the automatic mode (drop --no-auto and the fixed "
                        "model's flags)")
    cfg = ts_config(opts, F.ForecastConfig, _model_flags(horizon, lookback, cell, hidden, layers, decoder, head,
                                                         quantiles, interval, scaler, log, window_norm, season,
                                                         fill, ensemble, difference))
    series = _load(csv_path, target, time_col, past_covariates, future_covariates, cfg.data.fill)
    run_dir = opts.run_dir
    opts.info(f"training on {len(series)} rows of {series.target_names} -> {run_dir}")
    model = F.train(series, cfg, run_dir, quiet=opts.quiet, resume=opts.resume)
    result: dict[str, Any] = {"run_dir": str(run_dir), **model.meta["train"]}
    if not series.future.shape[1]:  # the next H steps need no extra input
        pred = model.predict(series)
        header, rows = F.forecast_rows(model, pred, None)
        result["forecast_csv"] = str(write_csv(run_dir / "forecast.csv", header, rows))
        result["forecast_png"] = str(F.plot_forecast(series, pred, run_dir / "forecast.png",
                                                     interval=cfg.data.interval))
    opts.emit(result)


@app.command()
@run_command(NAME, exclude=("out", "config", "set", "seed", "steps", "epochs", "minutes", "resume",
                            "checkpoint_every"))
def predict(run_dir: Annotated[Path, typer.Argument(help="Run directory of `rnnkit forecast train`.")],
            csv_path: CsvOpt, out: Annotated[Path, typer.Option("--out", help="Forecast CSV to write.")],
            time_col: TimeOpt = None, fill: FillOpt = None,
            plot: Annotated[Path | None, typer.Option("--plot", help="Also write a PNG plot.")] = None, *,
            opts: RunOptions) -> None:
    """Forecast the H steps after the end of --csv (one row per step: point forecast and interval columns).

    With known-future covariates, --csv must hold H extra rows after the last target value, with the
    target empty and the covariates filled.
    """
    from ..tasks import forecast as F
    from ..tasks.base import load_meta

    if load_meta(run_dir, NAME).get("mode") == "auto":
        from ..tasks.forecast_auto import AutoForecastModel

        auto = AutoForecastModel.load(run_dir)
        how = load_meta(run_dir, NAME)["input"]
        panel = _panel(csv_path, how["target"], time_col or how["time"], how["id_column"], fill or how["fill"])
        header, rows = _auto_rows(panel, [auto.predict(y) for y in panel.values])
        write_csv(out, header, rows)
        return opts.emit({"forecast_csv": str(out), "horizon": auto.cfg.horizon, "series": len(panel)})
    model = F.ForecastModel.load(run_dir)
    meta = model.meta
    series = F.split_future_rows(_load(csv_path, ",".join(meta["target"]), time_col, ",".join(meta["past"]),
                                       ",".join(meta["future"]), fill or model.cfg.data.fill, trailing=True))
    history, future_rows = series
    pred = model.predict(history, future_rows)
    future_time = None
    if future_rows is not None and future_rows.time is not None:
        future_time = future_rows.time[:model.cfg.data.horizon]
    header, rows = F.forecast_rows(model, pred, future_time)
    write_csv(out, header, rows)
    result: dict[str, Any] = {"forecast_csv": str(out), "horizon": len(rows), "history_rows": len(history)}
    if plot is not None:
        result["plot"] = str(F.plot_forecast(history, pred, plot, interval=model.cfg.data.interval))
    if not opts.json and not opts.quiet:
        print(",".join(header), file=sys.stderr)
    opts.emit(result)


@app.command()
@run_command(NAME)
def backtest(csv_path: CsvOpt, target: TargetOpt = None, time_col: TimeOpt = None, horizon: int | None = _H,
             folds: Annotated[int, typer.Option("--folds", help="Expanding-window folds (each H steps).")] = 1,
             sarima: Annotated[bool, typer.Option("--sarima", help="Also fit a seasonal ARIMA (statsmodels).")]
             = False, lookback: int | None = _L, cell: str | None = _CELL, hidden: int | None = _HID,
             layers: int | None = _LAY, decoder: str | None = _DEC, head: str | None = _HEAD,
             quantiles: str | None = _Q, interval: float | None = _INT, scaler: str | None = _SC,
             log: bool | None = _LOG, window_norm: str | None = _WN, season: int | None = _SEA,
             fill: FillOpt = None, ensemble: int | None = _ENS, difference: str | None = _DIFF,
             past_covariates: str | None = _PAST, future_covariates: str | None = _FUT, *,
             opts: RunOptions) -> None:
    """Expanding-window backtest: the model against naive, seasonal-naive (and SARIMA) on the last folds*H rows."""
    from ..tasks import forecast as F

    cfg = ts_config(opts, F.ForecastConfig, _model_flags(horizon, lookback, cell, hidden, layers, decoder, head,
                                                         quantiles, interval, scaler, log, window_norm, season,
                                                         fill, ensemble, difference))
    series = _load(csv_path, target, time_col, past_covariates, future_covariates, cfg.data.fill)
    run_dir = opts.run_dir
    res = F.backtest(series, cfg, run_dir, folds=folds, with_sarima=sarima, quiet=opts.quiet)
    m = res["metrics"]
    methods = [k for k in m if isinstance(m[k], dict)]
    if not opts.json:
        typer.echo(f"{'method':<16}" + "".join(f"{k:>10}" for k in ("smape", "mape", "mase", "rmse")))
        for name in methods:
            typer.echo(f"{name:<16}" + "".join(f"{m[name][k]:>10.4f}" for k in ("smape", "mape", "mase", "rmse")))
    flat = {f"{name}_{k}": v for name in methods for k, v in m[name].items()}
    flat.update(folds=m["folds"], seconds=m["seconds"], run_dir=str(run_dir),
                plot=str(Path(run_dir) / "backtest.png"))
    if opts.json:
        opts.emit(flat)
    else:
        opts.info(f"plot: {flat['plot']}")
