"""rnnkit's automatic classifier (no flags) against 1-NN-DTW and the published FCN accuracies.

Sets: the UCR/UEA classification sets shipped inside aeon (official train/test splits; nothing downloaded).
For each: ``rnnkit classify train``'s default configuration, unchanged for every set (``model.kind = "auto"``:
3-fold cross-validation on the training set between the plain recurrent classifier and LSTM-FCN, then the
winner trained on the whole training set for ``auto.final_steps`` with a cosine learning rate, fewer if they
would exceed ``auto.final_minutes``, up to ``auto.ensemble`` times with new seeds, probabilities averaged),
1-NN with full-window DTW measured here with aeon (independent dependent-DTW for multivariate sets), and
the published 1-NN-DTW (UCR archive) and FCN (Fawaz et al. 2019) accuracies where known (``ANCHORS.md``).

    python benchmarks/classify_peers.py                          # every set
    python benchmarks/classify_peers.py --sets GunPoint --json
    python benchmarks/classify_peers.py --quick                  # a few steps per model (checks it runs)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from rnnkit.data.sequences import SequenceSet, load_bundled, pad
from rnnkit.tasks import classify as C
from rnnkit.train.config import load_config

SETS = ("GunPoint", "ItalyPowerDemand", "ArrowHead", "OSULeaf", "UnitTest", "BasicMotions", "JapaneseVowels",
        "ACSF1", "PickupGestureWiimoteZ")
PUBLISHED = {  # set: (1-NN-DTW, FCN) accuracies, None where no figure is recorded
    "GunPoint": (0.913, 1.000), "ItalyPowerDemand": (0.955, 0.961), "ArrowHead": (0.800, 0.843),
    "OSULeaf": (0.612, 0.977), "JapaneseVowels": (None, 0.993),
}


def one_nn_dtw(tr: SequenceSet, te: SequenceSet) -> float:
    """Accuracy of 1-NN with full-window DTW (aeon), on sequences padded to one length by repeating the last
    value (aeon's DTW wants equal lengths in one array)."""
    from aeon.classification.distance_based import KNeighborsTimeSeriesClassifier

    def arr(s: SequenceSet, T: int) -> np.ndarray:
        x, lengths = pad(s.sequences, None)
        out = np.zeros((len(s), x.shape[2], T))
        for i, (q, n) in enumerate(zip(s.sequences, lengths)):
            out[i, :, :n] = q.T
            out[i, :, n:] = q[-1][:, None]
        return out

    T = max(int(tr.lengths.max()), int(te.lengths.max()))
    clf = KNeighborsTimeSeriesClassifier(n_neighbors=1, distance="dtw")
    clf.fit(arr(tr, T), np.asarray(tr.labels))
    return float((clf.predict(arr(te, T)) == np.asarray(te.labels)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-dtw", action="store_true", help="skip the measured 1-NN-DTW")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quick = {"auto.steps": 5, "auto.folds": 2, "trainer.steps": 5, "trainer.epochs": None} if args.quick else {}
    cfg = load_config(C.ClassifyConfig, None, quick)
    rows = []
    for name in [s for s in args.sets.split(",") if s]:
        tr, te = load_bundled(name, "train"), load_bundled(name, "test")
        t0 = time.time()
        model = C.train(tr, cfg, None)
        seconds = time.time() - t0
        acc = model.evaluate(te)["accuracy"]
        choice = model.meta["choice"]
        dtw = None if args.no_dtw else one_nn_dtw(tr, te)
        pub_dtw, pub_fcn = PUBLISHED.get(name, (None, None))
        row = {"set": name, "n_train": len(tr), "n_test": len(te), "length": int(tr.lengths.max()),
               "channels": tr.n_channels, "accuracy": acc, "chosen": choice["chosen"],
               "cv": {k: v["mean"] for k, v in choice["candidates"].items()},
               "cv_seconds": round(sum(v["seconds"] for v in choice["candidates"].values()), 1),
               "final_steps": model.cfg.trainer.steps, "networks": model.cfg.model.ensemble, "dtw_measured": dtw,
               "dtw_published": pub_dtw, "fcn_published": pub_fcn, "seconds": round(seconds, 1)}
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if args.json:
        return
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"{'set':<18}{'T':>6}{'rnnkit':>8}{'chosen':>10}{'DTW here':>10}{'DTW pub':>9}{'FCN pub':>9}{'s':>7}")
    for r in rows:
        print(f"{r['set']:<18}{r['length']:>6}{r['accuracy']:>8.3f}{r['chosen']:>10}{fmt(r['dtw_measured']):>10}"
              f"{fmt(r['dtw_published']):>9}{fmt(r['fcn_published']):>9}{r['seconds']:>7.0f}")


if __name__ == "__main__":
    main()
