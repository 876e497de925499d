"""Sequence classification on the UCR/UEA sets shipped inside aeon and on MNIST-1D (generated locally).

For each set: train ``rnnkit classify``'s model on the official train split, report accuracy, balanced
accuracy and macro F1 on the official test split, next to the published 1-NN-DTW and FCN (Fawaz et al.
2019) accuracies of ``ANCHORS.md`` (MNIST-1D: the paper's GRU 0.91). Prints a table or, with --json,
one JSON object per set.

    python benchmarks/classify_ucr.py                                # every set, default configurations
    python benchmarks/classify_ucr.py --sets GunPoint --set trainer.epochs=500
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rnnkit.data.sequences import load_bundled
from rnnkit.tasks import classify as C
from rnnkit.train.config import load_config

PUBLISHED = {  # 1-NN-DTW, FCN
    "GunPoint": (0.913, 1.000), "ItalyPowerDemand": (0.955, 0.961), "ArrowHead": (0.800, 0.843),
    "BasicMotions": (None, None), "JapaneseVowels": (None, 0.993), "MNIST1D": (None, None),
}
GRU_MNIST1D = 0.91

# per-set settings (the rest are ClassifyConfig defaults: LSTM, Adam, clip 1)
CONFIGS = {
    "GunPoint": {"model.hidden": 64, "trainer.epochs": 400, "trainer.batch_size": 25},
    "ItalyPowerDemand": {"model.hidden": 32, "trainer.epochs": 100, "trainer.batch_size": 16},
    "ArrowHead": {"model.hidden": 64, "data.downsample": 4, "data.jitter": 0.2, "data.scale": 0.2, "data.warp": 0.2,
                  "trainer.epochs": 3000, "trainer.batch_size": 12},
    "BasicMotions": {"model.hidden": 32, "trainer.epochs": 100, "trainer.batch_size": 8},
    "JapaneseVowels": {"model.hidden": 64, "trainer.epochs": 40, "trainer.batch_size": 16},
    "MNIST1D": {"model.cell": "gru", "model.hidden": 128, "trainer.epochs": 30, "trainer.batch_size": 64,
                "trainer.optim.lr": 0.003},
}


def run(name: str, overrides: dict) -> dict:
    cfg = load_config(C.ClassifyConfig, None, {**CONFIGS.get(name, {}), **overrides})
    tr, te = load_bundled(name, "train"), load_bundled(name, "test")
    t0 = time.time()
    model = C.train(tr, cfg, None)
    seconds = time.time() - t0
    m = model.evaluate(te)
    dtw, fcn = PUBLISHED.get(name, (None, None))
    return {"set": name, "n_train": len(tr), "n_test": len(te), "accuracy": m["accuracy"],
            "balanced_accuracy": m["balanced_accuracy"], "macro_f1": m["macro_f1"], "1nn_dtw": dtw, "fcn": fcn,
            "train_seconds": round(seconds, 1), "train_loss": model.meta["train"].get("train_loss"),
            "config": {**CONFIGS.get(name, {}), **overrides}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="GunPoint,ItalyPowerDemand,ArrowHead,BasicMotions,JapaneseVowels,MNIST1D")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE for every set")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from rnnkit.train.config import parse_override

    overrides = {".".join(k): v for k, v in (parse_override(s) for s in args.set)}
    if not args.json:
        print(f"{'set':<18}{'acc':>7}{'bal.acc':>9}{'macroF1':>9}{'1NN-DTW':>9}{'FCN':>7}{'time s':>8}")
    for name in args.sets.split(","):
        r = run(name, overrides)
        if args.json:
            print(json.dumps(r), flush=True)
            continue
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        ref = fmt(r["1nn_dtw"]) if name != "MNIST1D" else f"GRU {GRU_MNIST1D}"
        print(f"{name:<18}{r['accuracy']:>7.3f}{r['balanced_accuracy']:>9.3f}{r['macro_f1']:>9.3f}{ref:>9}"
              f"{fmt(r['fcn']):>7}{r['train_seconds']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
