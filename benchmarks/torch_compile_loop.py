"""What a PyTorch user tries first: ``torch.compile`` of the cell written as a plain Python loop over time.

Side by side in one process, round-robin, median of ``--repeats`` (forward + backward of ``out.sum()``):
``torch.nn`` of the family, the plain Python loop (``rnnkit bench``'s ``loop:<family>``: the peephole
LSTM, the GRU, the tanh RNN), the same loop under ``torch.compile`` (its first call, the compile, is
reported separately), and rnnkit's ``cpu`` backend on the same cell. The shape is fixed for all calls,
so the compiled loop compiles once.

    python benchmarks/torch_compile_loop.py --T 100 --B 32 --H 256 --threads 2 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import rnnkit
from rnnkit.cli.bench import _Loop, _time_round_robin

CELLS = {"lstm": ("lstm_peephole", torch.nn.LSTM), "gru": ("gru", torch.nn.GRU), "rnn": ("rnn", torch.nn.RNN)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--families", default="lstm,gru")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    T, B, H = args.T, args.B, args.H
    result: dict = {"T": T, "B": B, "H": H, "threads": args.threads, "torch": torch.__version__,
                    "machine": platform.processor() or platform.machine(), "families": {}}
    for fam in args.families.split(","):
        cell, nn_cls = CELLS[fam]
        torch.manual_seed(0)
        mods = {"torch.nn": nn_cls(H, H), "loop": _Loop(fam, H), f"rnnkit {cell} (cpu)": rnnkit.build(cell, H, H,
                                                                                                    backend="cpu")}
        compiled = torch.compile(_Loop(fam, H))
        x = torch.randn(T, B, H, requires_grad=True)

        def call(m, x=x):
            def fn():
                out, _ = m(x)
                out.sum().backward()
            return fn

        t0 = time.perf_counter()
        call(compiled)()  # compiles forward and backward
        compile_s = time.perf_counter() - t0
        mods["loop + torch.compile"] = compiled
        names = list(mods)
        ms = _time_round_robin([call(mods[n]) for n in names], torch.device("cpu"), warmup=2, repeats=args.repeats)
        row = dict(zip(names, ms))
        result["families"][fam] = {"ms": row, "compile_s": compile_s,
                                   "x_torch_nn": {n: v / row["torch.nn"] for n, v in row.items()}}
        print(f"{fam}: " + ", ".join(f"{n} {v:.1f} ms" for n, v in row.items()) + f"; compile {compile_s:.1f} s",
              flush=True)
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
