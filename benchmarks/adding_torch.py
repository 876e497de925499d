"""Reference run for the adding problem: a plain ``torch.nn.LSTM`` loop, no rnnkit training code.

The protocol of ``ANCHORS.md``: 128 units, batch 50, Adam lr 1e-3, clip the global gradient norm
at 1, fresh sequences every step (``rnnkit.tasks.synthetic.AddingTask``, Arjovsky et al. form),
test MSE on 1,000 held-out sequences every ``--eval-every`` steps; stops when the test MSE is below
``--target`` or the budget is spent. Prints one JSON object.

    python benchmarks/adding_torch.py --length 100 --steps 6000            # torch.nn.LSTM
    python benchmarks/adding_torch.py --length 100 --impl rnnkit --cell gru  # rnnkit layer, same loop
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import nn

from rnnkit.tasks.synthetic import AddingTask


class Net(nn.Module):
    def __init__(self, impl: str, cell: str, hidden: int) -> None:
        super().__init__()
        if impl == "torch":
            rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell]
            self.rnn = rnn_cls(2, hidden, batch_first=True)
        else:
            import rnnkit

            self.rnn = rnnkit.build(cell, 2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=6000, help="step budget")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock budget")
    ap.add_argument("--target", type=float, default=0.01)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--impl", choices=("torch", "rnnkit"), default="torch")
    ap.add_argument("--cell", default="lstm", help="lstm/gru/rnn for torch; any registry name for rnnkit")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task = AddingTask(length=args.length)
    gen = torch.Generator().manual_seed(args.seed)
    test = task.test_set(1000, args.seed)
    net = Net(args.impl, args.cell, args.hidden)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    curve = []
    reached = None
    t0 = time.perf_counter()
    step = 0
    while step < args.steps:
        if args.minutes is not None and time.perf_counter() - t0 > 60 * args.minutes:
            break
        batch = task.sample(args.batch, gen)
        loss = nn.functional.mse_loss(net(batch["x"]), batch["y"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), args.clip)
        opt.step()
        step += 1
        if step % args.eval_every == 0:
            with torch.no_grad():
                mse = float(nn.functional.mse_loss(net(test["x"]), test["y"]))
            wall = time.perf_counter() - t0
            curve.append({"step": step, "test_mse": mse, "wall_s": round(wall, 2)})
            print(f"step {step}  train {loss.item():.4f}  test {mse:.4f}  {wall:.0f}s", file=sys.stderr)
            if mse < args.target:
                reached = {"step": step, "wall_s": round(wall, 2)}
                break
    result = {"impl": args.impl, "cell": args.cell, "length": args.length, "hidden": args.hidden,
              "batch": args.batch, "steps": step, "wall_s": round(time.perf_counter() - t0, 2),
              "final_test_mse": curve[-1]["test_mse"] if curve else None, "target": args.target,
              "reached": reached, "baseline": task.baseline(), "threads": torch.get_num_threads(),
              "curve": curve}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
