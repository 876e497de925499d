"""Airline passengers (Box-Jenkins series G, shipped inside aeon): the last 36 months held out.

Protocol of ``ANCHORS.md``: train on the first 108 months, forecast the next 36 in one go, score sMAPE /
MAPE / MASE (seasonal period 12) / RMSE against the seasonal-naive (period 12) and last-value naive
forecasts and the Box-Jenkins airline model ARIMA(0,1,1)(0,1,1)_12 on logs fitted with statsmodels on
the same 108 months. The rnnkit model is ``rnnkit forecast``'s recursive LSTM (one-step model, 36-step
rollout through ``step()``) on the seasonal difference of the log values (year-on-year growth, minus each
window's last value), averaged over an ensemble of seeds (``--ensemble``). Prints a table (or one JSON
object with --json).

    python benchmarks/forecast_airline.py                      # the configuration in docs/results.md
    python benchmarks/forecast_airline.py --ensemble 1 --seed 3
    python benchmarks/forecast_airline.py --set data.lookback=36 --set model.cell=gru
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from rnnkit.data.series import load_series
from rnnkit.metrics import forecast_metrics
from rnnkit.tasks import forecast as F
from rnnkit.train.config import load_config

DEFAULTS = {"data.horizon": 36, "data.season": 12, "data.lookback": 24, "data.log": True, "data.difference": [12],
            "data.window_norm": "last", "model.decoder": "recursive", "model.cell": "lstm", "model.hidden": 32,
            "trainer.epochs": 150, "trainer.batch_size": 16, "trainer.optim.lr": 0.005}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ensemble", type=int, default=5, help="models averaged (seeds seed..seed+N-1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy box)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from aeon.datasets import load_airline

    y = load_airline()
    series = load_series({"Passengers": y})
    hist, fut = series.slice(0, 108), series.slice(108, 144)
    from rnnkit.train.config import parse_override

    overrides = {**DEFAULTS, "model.ensemble": args.ensemble, "trainer.seed": args.seed,
                 **{".".join(k): v for k, v in (parse_override(s) for s in args.set)}}
    cfg = load_config(F.ForecastConfig, None, overrides)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as run_dir:
        model = F.train(hist, cfg, run_dir)
        pred = model.predict(hist)
    seconds = time.time() - t0
    tr, te = hist.target, fut.target[:, 0]
    forecasts = {"rnnkit": pred["point"][:, 0], "seasonal_naive": F.seasonal_naive(tr, 36, 12)[:, 0],
                 "naive": F.naive(tr, 36)[:, 0], "sarima_airline": F.sarima(tr, 36, 12, log=True)[:, 0]}
    rows = {name: forecast_metrics(te, f, tr[:, 0], 12) for name, f in forecasts.items()}
    result = {"config": overrides, "metrics": rows, "train_seconds": round(seconds, 1), "members": len(model.nets)}
    if len(model.nets) > 1:  # spread of the single members
        single = []
        for net in model.nets:
            one = F.ForecastModel(model.cfg, model.tf, [net], model.meta)
            single.append(forecast_metrics(te, one.predict(hist)["point"][:, 0], tr[:, 0], 12)["smape"])
        result["member_smape"] = [round(v, 4) for v in single]
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'method':<16}{'sMAPE':>9}{'MAPE':>9}{'MASE':>9}{'RMSE':>9}")
    for name, m in rows.items():
        print(f"{name:<16}{m['smape']:>9.4f}{m['mape']:>9.4f}{m['mase']:>9.3f}{m['rmse']:>9.2f}")
    if "member_smape" in result:
        s = np.array(result["member_smape"])
        print(f"single members: sMAPE {s.mean():.4f} +- {s.std():.4f} (min {s.min():.4f}, max {s.max():.4f})")
    print(f"training: {seconds:.0f} s for {len(model.nets)} model(s)")


if __name__ == "__main__":
    main()
