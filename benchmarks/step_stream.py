"""``step()`` latency in a stream: one model stepping repeatedly, as in generation or online scoring.

``rnnkit bench`` times every runner call by call in turn, so each call finds the other runners' weights in
the caches; here each runner makes ``--block`` calls in a row (its weights stay hot, as in a real stream),
the runners take turns ``--rounds`` times, and the median of all timed calls is reported, against one call
of torch.nn.LSTM / GRU / RNN (the cell's family) of the same shape on a length-1 sequence. Each rnnkit
runner uses the backend ``auto`` picks for a step.

    python benchmarks/step_stream.py --threads 1 --cells mut1,mut2,mut3,gru,rnn,lstm_peephole,slstm --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import rnnkit
from rnnkit.cli.bench import PLAIN, _torch_baseline
from rnnkit.cells import resolve as resolve_cell


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="lstm,lstm_peephole,lstm_ln,lstm_zoneout,slstm,mut1,mut2,mut3,gru,rnn")
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--block", type=int, default=200, help="timed calls in a row per runner and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    H, L = args.H, args.layers
    runners: dict[str, tuple[str, object]] = {}
    x1 = torch.randn(1, 1, H)
    for label in PLAIN.values():
        m = getattr(torch.nn, label.rsplit(".", 1)[1])(H, H, L).eval()
        runners[label] = (label, lambda m=m: m(x1))
    for name in [c for c in args.cells.split(",") if c]:
        m = rnnkit.build(name, H, H, num_layers=L).eval()
        xt = torch.randn(1, H)
        state = [m.step(xt)[1]]

        def call(m=m, state=state, xt=xt):
            _, state[0] = m.step(xt, state[0])

        label = f"{name}/{m.backend_for(xt.device, streaming=True)}"
        runners[label] = (_torch_baseline(resolve_cell(name).family_name), call)
    samples: dict[str, list[float]] = {k: [] for k in runners}
    with torch.no_grad():
        for _ in range(args.rounds):
            for label, (_, fn) in runners.items():
                for _ in range(20):
                    fn()
                for _ in range(args.block):
                    t0 = time.perf_counter()
                    fn()
                    samples[label].append(time.perf_counter() - t0)
    us = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
    rows = [{"runner": k, "H": H, "layers": L, "threads": args.threads, "us": round(u, 1),
             "x_torch_family": round(u / us[runners[k][0]], 3), "vs": runners[k][0]} for k, u in us.items()]
    for r in rows:
        print(json.dumps(r) if args.json else f"{r['runner']:24s} {r['us']:8.1f} us  {r['x_torch_family']:.2f}x {r['vs']}")
    return rows


if __name__ == "__main__":
    main()
