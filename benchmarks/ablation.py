"""The ablation grid of docs/experiments.md: every synthetic task x cell variant x seed.

Same as ``rnnkit experiment ablation`` with the documented protocol as defaults (the full grid is
4 tasks x 11 variants x 3 seeds = 132 runs of 3,000 steps; hours on 2 cores). Finished runs are
reused, so the grid can be run in pieces or continued after an interruption. Writes
``OUT/ablation.json``, ``OUT/ablation.md`` (table + harm) and one bar plot per task.

    python benchmarks/ablation.py --out runs/ablation                         # the full grid
    python benchmarks/ablation.py --tasks adding,agreement --seeds 2 --steps 400 --length adding=50,agreement=20
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rnnkit.analysis.ablation import DEFAULT_VARIANTS, SYNTHETIC, parse_lengths, run_grid


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(SYNTHETIC))
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--length", default=None, help="'adding=100,copy=50,...' or one T for all (defaults: "
                                                    "adding 100, copy 50, temporal-order 100, agreement 30)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", type=Path, default=Path("runs/ablation"))
    args = ap.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    summary = run_grid(tasks, [v for v in args.variants.split(",") if v], seeds=args.seeds, steps=args.steps,
                       lengths=parse_lengths(args.length, tasks), hidden=args.hidden, jobs=args.jobs,
                       out_dir=args.out)
    print((args.out / "ablation.md").read_text())
    print(json.dumps({"ranking": summary["ranking"], "wall_s": summary["wall_s"], "errors": summary["errors"]}))
    return summary


if __name__ == "__main__":
    main()
