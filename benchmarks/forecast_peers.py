"""rnnkit's automatic forecaster (no flags but the horizon) against statsforecast, Darts and neuralforecast.

Data (all shipped inside aeon, nothing downloaded): Airline (last 36 months held out), Lynx (last 14 years),
ShampooSales (last 12 months), M1 yearly (181 series, the Monash horizon 6: the last 6 values of every
series held out). Every method sees the same training part and forecasts the held-out part in one go.

Methods:
- ``rnnkit``: :func:`rnnkit.tasks.forecast_auto.auto_fit` with no user choice (season detected, transform and
  input window chosen on a validation tail, global model over the M1 series);
- ``SeasonalNaive``, ``AutoETS``, ``AutoARIMA``: statsforecast, ``season_length`` = the set's period;
- ``Darts-LSTM``: Darts ``RNNModel(model="LSTM")`` with its documented defaults (hidden 25, one layer,
  100 epochs, training_length 24) on MinMax-scaled data as in Darts' examples; the required input_chunk_length
  is the set's period (4 for yearly data), cut to fit the shortest series;
- ``NF-LSTM``: neuralforecast ``LSTM(h=H)`` with its defaults (2 x 128 encoder, robust scaler, 1000 steps)
  except ``input_size`` (its default -1 leaves no training window here): 2H with start padding.

Scores: sMAPE (fraction) and MASE (in-sample scale of the lag-m naive forecast, m = the set's period; m = 1 on
M1 yearly as in the Monash archive), averaged over the series of a set, and wall time per method and set.
The peers need ``pip install 'rnnkit[bench]'``; a method whose package is missing is reported as such.

    python benchmarks/forecast_peers.py                              # every set, every method
    python benchmarks/forecast_peers.py --sets Airline --methods rnnkit,SeasonalNaive --json
    python benchmarks/forecast_peers.py --quick                      # smoke test: short training everywhere
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from rnnkit.data.tsf import aeon_tsf, read_tsf
from rnnkit.metrics import mase, smape
from rnnkit.tasks.forecast_auto import AutoSettings, auto_fit

#: set -> (horizon, period used by the peers, seasonal naive and MASE)
SETS = {"Airline": (36, 12), "Lynx": (14, 10), "ShampooSales": (12, 12), "M1yearly": (6, 1)}
METHODS = ("rnnkit", "SeasonalNaive", "AutoETS", "AutoARIMA", "Darts-LSTM", "NF-LSTM")
#: Godahewa et al. 2021 (Monash forecasting archive), mean MASE on M1 yearly, horizon 6
MONASH_M1_YEARLY_MASE = {"ETS": 3.771, "TBATS": 3.499, "ARIMA": 4.479, "N-BEATS": 4.384, "DeepAR": 4.603}


def load(name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(training parts, held-out parts) of the set's series."""
    import aeon

    horizon = SETS[name][0]
    if name == "M1yearly":
        ys = read_tsf(aeon_tsf("m1_yearly_dataset")).series
    else:
        path = Path(aeon.__file__).parent / "datasets" / "data" / name / f"{name}.csv"
        rows = [line.split(",") for line in path.read_text().splitlines()[1:] if line.strip()]
        ys = [np.array([float(r[-1]) for r in rows])]
    return [y[:-horizon] for y in ys], [y[-horizon:] for y in ys]


# ---- methods: (training parts, horizon, period, quick) -> forecasts -------------------------------
def run_rnnkit(train: list[np.ndarray], h: int, m: int, quick: bool) -> tuple[list[np.ndarray], dict]:
    s = AutoSettings(steps=60, ensemble=1) if quick else AutoSettings()
    model, record = auto_fit(train, h, s)
    return [model.predict(y) for y in train], record


def _long_frame(train: Sequence[np.ndarray]):
    import pandas as pd

    return pd.DataFrame({"unique_id": np.concatenate([[str(i)] * len(y) for i, y in enumerate(train)]),
                         "ds": np.concatenate([np.arange(len(y)) for y in train]),
                         "y": np.concatenate(train).astype(np.float64)})


def _by_id(frame, column: str, n: int) -> list[np.ndarray]:
    frame = frame.reset_index() if "unique_id" not in frame.columns else frame
    return [frame.loc[frame["unique_id"] == str(i), column].to_numpy(np.float64) for i in range(n)]


def _statsforecast(model_name: str) -> Callable:
    def run(train: list[np.ndarray], h: int, m: int, quick: bool) -> tuple[list[np.ndarray], dict]:
        import statsforecast.models as sm
        from statsforecast import StatsForecast

        model = getattr(sm, model_name)(season_length=m)
        sf = StatsForecast(models=[model], freq=1, n_jobs=1)
        out = sf.forecast(df=_long_frame(train), h=h)
        return _by_id(out, model_name, len(train)), {"season_length": m}
    return run


def run_darts(train: list[np.ndarray], h: int, m: int, quick: bool) -> tuple[list[np.ndarray], dict]:
    from darts import TimeSeries
    from darts.dataprocessing.transformers import Scaler
    from darts.models import RNNModel

    shortest = min(len(y) for y in train)
    icl = max(1, min(m if m > 1 else 4, shortest - 2))
    tl = max(icl + 1, min(24, shortest - 1))  # training_length (default 24) must exceed input_chunk_length
    series = [TimeSeries.from_values(y.astype(np.float32)) for y in train]
    scaler = Scaler()
    scaled = scaler.fit_transform(series)
    kw = {"n_epochs": 2} if quick else {}
    model = RNNModel(model="LSTM", input_chunk_length=icl, training_length=tl, random_state=0,
                     pl_trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False, "logger": False,
                                        "enable_model_summary": False}, **kw)
    model.fit(scaled if len(scaled) > 1 else scaled[0], verbose=False)
    pred = model.predict(h, series=scaled if len(scaled) > 1 else scaled[0], verbose=False)
    pred = scaler.inverse_transform(pred if isinstance(pred, list) else [pred])
    return [p.values()[:, 0].astype(np.float64) for p in pred], {"input_chunk_length": icl, "training_length": tl}


def run_neuralforecast(train: list[np.ndarray], h: int, m: int, quick: bool) -> tuple[list[np.ndarray], dict]:
    from neuralforecast import NeuralForecast
    from neuralforecast.models import LSTM

    kw = {"max_steps": 5} if quick else {}
    # input_size's default (-1) leaves no training window on these series; 2h is the usual choice in
    # neuralforecast's examples, with start padding so that short series give windows too
    model = LSTM(h=h, input_size=2 * h, start_padding_enabled=True, random_seed=0, enable_progress_bar=False,
                 logger=False, enable_model_summary=False, accelerator="cpu", **kw)
    nf = NeuralForecast(models=[model], freq=1)
    nf.fit(df=_long_frame(train))
    out = nf.predict()
    return _by_id(out, "LSTM", len(train)), {"input_size": 2 * h, "start_padding_enabled": True}


RUNNERS: dict[str, Callable] = {"rnnkit": run_rnnkit, "SeasonalNaive": _statsforecast("SeasonalNaive"),
                                "AutoETS": _statsforecast("AutoETS"), "AutoARIMA": _statsforecast("AutoARIMA"),
                                "Darts-LSTM": run_darts, "NF-LSTM": run_neuralforecast}


def score(train: list[np.ndarray], test: list[np.ndarray], pred: list[np.ndarray], m: int) -> dict[str, float]:
    return {"smape": float(np.mean([smape(t, p) for t, p in zip(test, pred)])),
            "mase": float(np.mean([mase(t, p, y, m) for y, t, p in zip(train, test, pred)]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--quick", action="store_true", help="a few training steps per model (checks the script runs)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--json", action="store_true", help="one JSON object per (set, method) instead of the table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("NIXTLA_ID_AS_COL", "1")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows = []
    for name in [s for s in args.sets.split(",") if s]:
        h, m = SETS[name]
        train, test = load(name)
        for method in [x for x in args.methods.split(",") if x]:
            t0 = time.time()
            try:
                pred, info = RUNNERS[method](train, h, m, args.quick)
            except ImportError as e:
                rows.append({"set": name, "method": method, "error": f"not installed: {e.name}"})
                continue
            row = {"set": name, "method": method, **score(train, test, pred, m),
                   "seconds": round(time.time() - t0, 1), "info": info}
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if args.json:
        return
    print(f"{'set':<13}{'method':<15}{'sMAPE':>9}{'MASE':>9}{'seconds':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['set']:<13}{r['method']:<15}  {r['error']}")
        else:
            print(f"{r['set']:<13}{r['method']:<15}{r['smape']:>9.4f}{r['mase']:>9.3f}{r['seconds']:>9.1f}")
    if "M1yearly" in args.sets:
        print("Monash archive, M1 yearly mean MASE: " + ", ".join(f"{k} {v}" for k, v in MONASH_M1_YEARLY_MASE.items()))


if __name__ == "__main__":
    main()
