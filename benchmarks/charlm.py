"""rnnkit's default char-LM vs the plain torch.nn.LSTM script, same corpus, split and budget.

Runs ``rnnkit charlm train``'s default configuration (through the Python API, no evaluation during
training) and then ``charlm_torch_baseline.py`` for the same budget, one after the other, and prints
validation nats/char and training characters/s side by side (JSON with ``--json``).

    python benchmarks/charlm.py --minutes 5            # the comparison of docs/results.md
    python benchmarks/charlm.py --steps 400            # equal steps instead of equal time
    python benchmarks/charlm.py --only rnnkit --set trainer.optim.lr=3e-3

Throughput on a shared machine is unreliable: run it on an idle one and report the load (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import charlm_torch_baseline  # noqa: E402

from rnnkit.tasks.charlm import CharLMConfig, train  # noqa: E402
from rnnkit.train.config import load_config, parse_override  # noqa: E402


def run_rnnkit(args: argparse.Namespace) -> dict:
    over = {"trainer.eval_every": 0, "trainer.seed": args.seed, "trainer.tensorboard": False,
            "trainer.log_every": 100, "data.val_fraction": args.val_fraction}
    if args.steps:
        over["trainer.steps"] = args.steps
    else:
        over["trainer.minutes"] = args.minutes
    if args.text:
        over["data.text"] = args.text
    for item in args.set:
        keys, value = parse_override(item)
        over[".".join(keys)] = value
    cfg = load_config(CharLMConfig, None, over)
    with tempfile.TemporaryDirectory() as d:
        out = train(cfg, Path(d) / "run", quiet=args.quiet)
    out["script"] = "rnnkit charlm (default)"
    out["overrides"] = args.set
    return out


def run_torch(args: argparse.Namespace) -> dict:
    argv = ["--seed", str(args.seed), "--val-fraction", str(args.val_fraction), "--minutes", str(args.minutes)]
    if args.steps:
        argv += ["--steps", str(args.steps), "--minutes", "1e9"]
    if args.text:
        argv += ["--text", args.text]
    return charlm_torch_baseline.main(argv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=0, help="equal step budget instead of minutes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", default=None, help="corpus (default: built-in Shakespeare)")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--only", choices=["rnnkit", "torch"], default=None)
    ap.add_argument("--set", action="append", default=[], help="override a key of rnnkit's config")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    results = []
    if args.only in (None, "rnnkit"):
        results.append(run_rnnkit(args))
    if args.only in (None, "torch"):
        results.append(run_torch(args))
    load = max(load, os.getloadavg()[0])
    budget = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
    print(f"\nbudget {budget}, {torch.get_num_threads()} threads, 1-min load average up to {load:.1f}",
          file=sys.stderr)
    print(f"{'script':<28} {'val nats/char':>13} {'bits/char':>9} {'chars/s':>9} {'steps':>6}", file=sys.stderr)
    for r in results:
        print(f"{r['script']:<28} {r['val_loss_nats']:>13.4f} {r['val_bits_per_char']:>9.3f} "
              f"{r['chars_per_s']:>9,.0f} {r['steps']:>6}", file=sys.stderr)
    if args.json:
        print(json.dumps({"budget": budget, "threads": torch.get_num_threads(), "load_average_max": load,
                          "results": results}))


if __name__ == "__main__":
    main()
