"""Images as sequences on the built-in 8x8 digits: rows, pixel by pixel, permuted pixels.

Trains ``rnnkit classify``'s recurrent classifier (the same configuration for every reading order; the
training images are distorted before they are read, ``[image_augment]``) on the fixed split of
:func:`rnnkit.data.images.load_digits` and reports test accuracy, next to two references from
scikit-learn on the same split and the same 64 pixel values: 1-nearest-neighbour (Euclidean) and a
logistic regression (default L2, lbfgs). Prints one JSON object per line. The configuration is
``CONFIG`` (LSTM 128, noise and gain 0.1, 200 epochs on a cosine schedule) unless ``--set`` changes it.

    python benchmarks/digits_images.py                       # rows, pixels, permuted; then the references
    python benchmarks/digits_images.py --orders rows --set trainer.epochs=10
    python benchmarks/digits_images.py --orders "" --no-references --figure docs/labelling_digits.png
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from rnnkit.data.images import as_sequence_set, load_digits
from rnnkit.tasks import classify as C
from rnnkit.train.config import load_config, parse_override

ORDERS = {"rows": ("rows", None), "pixels": ("pixels", None), "permuted": ("pixels", 0)}
# one configuration for every reading order
CONFIG = {"model.kind": "recurrent", "model.hidden": 128, "data.jitter": 0.1, "data.scale": 0.1,
          "trainer.epochs": 200, "trainer.schedule.name": "cosine"}


def references() -> list[dict]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    tr, te = load_digits("train"), load_digits("test")
    Xtr = np.stack(tr.images).reshape(len(tr), -1)
    Xte = np.stack(te.images).reshape(len(te), -1)
    out = []
    for name, clf in (("1-NN", KNeighborsClassifier(1)), ("logistic regression", LogisticRegression(max_iter=5000))):
        clf.fit(Xtr, tr.labels)
        out.append({"model": name, "test_accuracy": float((clf.predict(Xte) == te.labels).mean())})
    return out


def figure(path: str) -> None:
    """One test digit and the three sequences it is read as (rows, pixels, permuted pixels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    im = load_digits("test").images[0]
    fig, axes = plt.subplots(1, 4, figsize=(12, 2.6), gridspec_kw={"width_ratios": [1, 1, 3, 3]})
    axes[0].imshow(im, cmap="gray_r")
    axes[0].set_title("8x8 image")
    axes[1].imshow(as_sequence_set(load_digits("test"), "rows").sequences[0].T, cmap="gray_r")
    axes[1].set_title("rows: T=8 of 8 values")
    axes[1].set_xlabel("step")
    for ax, (name, seed) in zip(axes[2:], (("pixels", None), ("permuted", 0))):
        seq = as_sequence_set(load_digits("test"), "pixels", seed).sequences[0][:, 0]
        ax.bar(np.arange(64), seq, width=1.0, color="k")
        ax.set_title(f"{name}: T=64, 1 value")
        ax.set_xlabel("step")
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    axes[1].set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", default=",".join(ORDERS), help="comma-separated: rows, pixels, permuted")
    ap.add_argument("--set", action="append", default=[], help="config override key=value (all orders)")
    ap.add_argument("--no-references", action="store_true", help="skip the scikit-learn references")
    ap.add_argument("--figure", help="also write the picture of one digit and its readings to this PNG")
    args = ap.parse_args()
    if args.figure:
        figure(args.figure)
    overrides = {".".join(k): v for k, v in map(parse_override, args.set)}
    for name in [o for o in args.orders.split(",") if o]:
        order, seed = ORDERS[name]
        # the recurrent classifier reading the image (the benchmark's subject), unless --set model.kind=...
        cfg = load_config(C.ClassifyConfig, None, {**CONFIG, **overrides, "data.read": order,
                                                   "data.permute_seed": seed, "trainer.log_every": 10_000})
        tr = as_sequence_set(load_digits("train"), order, seed)
        te = as_sequence_set(load_digits("test"), order, seed)
        t0 = time.time()
        model = C.train(tr, cfg, None)
        m = model.evaluate(te)
        print(json.dumps({"model": f"rnnkit classify ({name})", "T": int(tr.lengths[0]),
                          "test_accuracy": m["accuracy"], "train_s": round(time.time() - t0, 1)}), flush=True)
    for r in [] if args.no_references else references():
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
