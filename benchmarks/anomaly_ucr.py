"""UCR anomaly archive (KDD 2021) set 135, InternalBleeding16, shipped inside aeon.

Protocol of ``ANCHORS.md``: fit on the first 1,200 points (normal), score all 7,501; the labelled anomaly
is 4187-4198 and a detector hits when its top-scored point lies within 100 points of it. Runs both
``rnnkit anomaly`` detectors (LSTM prediction error, LSTM encoder-decoder reconstruction error) and
reports the UCR rule, the point-wise and point-adjusted P/R/F1 of the dynamic-threshold flags, and the
flagged intervals. Prints a table or, with --json, one JSON object per detector.

    python benchmarks/anomaly_ucr.py
    python benchmarks/anomaly_ucr.py --detectors prediction --set trainer.epochs=30 --seed 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rnnkit.tasks import anomaly as A
from rnnkit.train.config import load_config

CONFIGS = {
    "prediction": {"model.detector": "prediction", "model.hidden": 64, "model.window": 64, "model.stride": 8,
                   "trainer.epochs": 60},
    "reconstruction": {"model.detector": "reconstruction", "model.hidden": 64, "model.window": 64,
                       "model.stride": 4, "trainer.epochs": 60},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detectors", default="prediction,reconstruction")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from aeon.datasets import load_kdd_tsad_135

    from rnnkit.train.config import parse_override

    x_train, _ = load_kdd_tsad_135("train")
    x, labels = load_kdd_tsad_135("test")
    overrides = {".".join(k): v for k, v in (parse_override(s) for s in args.set)}
    if not args.json:
        print(f"{'detector':<16}{'UCR hit':>8}{'top':>7}{'point F1':>10}{'adj. F1':>9}{'flags':>7}{'time s':>8}")
    for name in args.detectors.split(","):
        cfg = load_config(A.AnomalyConfig, None, {**CONFIGS[name], "trainer.seed": args.seed, **overrides})
        t0 = time.time()
        det = A.train(x_train[:, None], cfg, None)
        scores = det.score(x[:, None])
        seconds = time.time() - t0
        r = A.evaluate(scores, labels)
        found = A.intervals(scores)
        out = {"detector": name, **r, "intervals": [[a, b] for a, b, _ in found], "seconds": round(seconds, 1),
               "config": {**CONFIGS[name], "trainer.seed": args.seed, **overrides}}
        if args.json:
            print(json.dumps(out), flush=True)
            continue
        print(f"{name:<16}{str(r['ucr_hit']):>8}{r['top_index']:>7}{r['point_f1']:>10.3f}{r['adjusted_f1']:>9.3f}"
              f"{len(found):>7}{seconds:>8.0f}", flush=True)
    if not args.json:
        print(f"labelled region: {r['label_start']}-{r['label_end']} (hit window +-100)")


if __name__ == "__main__":
    main()
