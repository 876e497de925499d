"""The generated CPU loops (``backend="cpu"``) against the hand-written ones (``cpu_hand``), side by side.

For each cell and shape (T = 100, B in {8, 32, 64}, H in {128, 256, 512}): the two backends alternate call by
call, forward (no_grad) and forward + backward of ``out.sum()``, and the ratio of their medians over
``--repeats`` rounds is printed (generated / hand-written time). Only these two runners take turns, so the
ratios are steadier than in ``rnnkit bench``'s round-robin over every runner.

    python benchmarks/cpu_generated_vs_hand.py --cells rnn,lstm,lstm_peephole,lstm_ln --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import rnnkit


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="rnn,lstm,lstm_peephole,lstm_ln,lstm_zoneout,gru,gru_cho,gru_ln")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", default=None, help="write the ratios to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res: dict[str, dict[str, float]] = {}
    for H in (128, 256, 512):
        for B in (8, 32, 64):
            x = torch.randn(100, B, H, requires_grad=True)
            for name in args.cells.split(","):
                mods = {}
                for be in ("cpu_hand", "cpu"):
                    torch.manual_seed(0)
                    mods[be] = rnnkit.build(name, H, H, backend=be)
                t = {be: {"fwd": [], "fwdbwd": []} for be in mods}
                for m in mods.values():
                    for _ in range(2):
                        out, _ = m(x)
                        out.sum().backward()
                for _ in range(args.repeats):
                    for be, m in mods.items():
                        with torch.no_grad():
                            t0 = time.perf_counter()
                            m(x)
                            t1 = time.perf_counter()
                        out, _ = m(x)
                        out.sum().backward()
                        t2 = time.perf_counter()
                        t[be]["fwd"].append(t1 - t0)
                        t[be]["fwdbwd"].append(t2 - t1)
                r = {k: statistics.median(t["cpu"][k]) / statistics.median(t["cpu_hand"][k]) for k in ("fwd", "fwdbwd")}
                res[f"{name} B={B} H={H}"] = r
                print(f"{name} B={B} H={H}: fwd {r['fwd']:.2f} fwd+bwd {r['fwdbwd']:.2f}", flush=True)
    ratios = [v for r in res.values() for v in r.values()]
    print(f"median {statistics.median(ratios):.3f}, max {max(ratios):.2f}, above 1.05: "
          f"{sum(v > 1.05 for v in ratios)} of {len(ratios)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
