"""Zaremba et al. 2014 on Penn Treebank with rnnkit's presets; valid/test perplexity and wall time.

    pip install 'rnnkit[ptb]'
    python benchmarks/ptb_zaremba.py                              # small preset, 13 epochs (~40 min on 2 cores)
    python benchmarks/ptb_zaremba.py --fraction 0.01 --epochs 1   # a quick check of the pipeline

Same as ``rnnkit wordlm train --corpus ptb --preset zaremba-small --out RUN``; prints the published
figures next to the measured ones (JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from rnnkit.tasks.wordlm import PUBLISHED, WordLMConfig, preset_overrides, train
from rnnkit.train.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="zaremba-small", choices=sorted(PUBLISHED))
    ap.add_argument("--epochs", type=int, default=0, help="override the preset's epochs (0 = keep)")
    ap.add_argument("--fraction", type=float, default=1.0, help="use the first fraction of each split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    over = {"data.corpus": "ptb", "data.fraction": args.fraction, "trainer.seed": args.seed,
            "trainer.tensorboard": False}
    if args.epochs:
        over["trainer.epochs"] = args.epochs
    cfg = load_config(WordLMConfig, None, over, base=preset_overrides(args.preset))
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = train(cfg, Path(args.out or Path(tmp) / "run"), quiet=args.quiet)
    wall = time.perf_counter() - t0
    res = {"preset": args.preset, "fraction": args.fraction, "epochs": cfg.trainer.epochs, **out,
           "wall_s_total": round(wall, 1), "threads": torch.get_num_threads(), "machine": platform.processor()
           or platform.machine(), "load_average_start": load0, "load_average_end": os.getloadavg()[0]}
    pv, pt = PUBLISHED[args.preset]
    print(f"{args.preset} on PTB (fraction {args.fraction:g}, {cfg.trainer.epochs} epochs, {wall / 60:.1f} min): "
          f"valid {out['valid_perplexity']:.1f} / test {out['test_perplexity']:.1f}; published {pv} / {pt}",
          file=sys.stderr)
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
