"""``step()`` latency in a stream: one model stepping repeatedly, as in generation or online scoring.

``rnnkit bench`` times every runner call by call in turn, so each call finds the other runners' weights in
the caches; here each runner makes ``--block`` calls in a row (its weights stay hot, as in a real stream)
and the runners take turns ``--rounds`` times (:func:`rnnkit.cli.bench.run_step_latency`). Each cell runs on
the backend ``auto`` picks for a step, against one call of torch.nn.LSTM / GRU / RNN (its family) of the
same shape on a length-1 sequence.

    python benchmarks/step_stream.py --threads 1 --cells mut1,mut2,mut3,gru,rnn,lstm_peephole,slstm --json
"""

from __future__ import annotations

import argparse
import json

import torch

from rnnkit.cli.bench import auto_choice, run_step_latency


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
    cpu = torch.device("cpu")
    cells = [c for c in args.cells.split(",") if c]
    rows = run_step_latency(cells, (args.H,), cpu, backends=sorted({auto_choice(c, cpu, True) for c in cells}),
                            calls=args.block * args.rounds, log=lambda _: None, layers=args.layers, block=args.block)
    rows = [r for r in rows if r["backend"] == "torch" or r["backend"] == auto_choice(r["cell"], cpu, True)]
    for r in rows:
        r["threads"] = args.threads
        print(json.dumps(r) if args.json else f"{r['label']:24s} {r['us']:8.1f} us  {r['x_torch_family']:.2f}x family")
    return rows


if __name__ == "__main__":
    main()
