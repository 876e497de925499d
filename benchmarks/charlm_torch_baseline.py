"""Plain PyTorch char-LM baseline of docs ANCHORS: torch.nn.LSTM 2x256, embedding 64, batch 32, 100-step chunks.

Adam 2e-3, gradient clipping at global norm 5, state carried across chunks (char-rnn), a wall-clock
budget (5 minutes by default). Data and the validation measurement are rnnkit's (same corpus, same split,
same stream evaluation as ``rnnkit charlm``) so the two runs are compared on equal terms; everything
else is a hand-written loop with no rnnkit code.

    python benchmarks/charlm_torch_baseline.py --minutes 5 --json

Prints progress to stderr and, with ``--json``, one JSON object on stdout:
``{"val_loss_nats", "val_bits_per_char", "chars_per_s", "steps", "train_chars", "seconds", ...}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.data.text import CharVocab, load_corpus, split_text
from rnnkit.tasks.lm import stream_loss


class CharLSTM(nn.Module):
    def __init__(self, vocab: int, emb: int = 64, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden, layers)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, x, state=None):
        out, state = self.rnn(self.embedding(x), state)  # (T, B, H)
        return self.decoder(out), state


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=None, help="corpus file/dir (default: built-in Shakespeare)")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=0, help="stop after this many steps (0 = time budget only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    text, name = load_corpus(args.text)
    train_text, val_text = split_text(text, args.val_fraction)
    vocab = CharVocab.from_text(train_text)
    ids = vocab.encode(train_text)
    val_ids = vocab.encode(val_text)
    B, T = args.batch, args.chunk
    L = (ids.numel() - 1) // B
    xs = ids[:B * L].view(B, L).t().contiguous()  # (L, B): column b is a contiguous stream
    ys = ids[1:B * L + 1].view(B, L).t().contiguous()

    model = CharLSTM(len(vocab), hidden=args.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(f"corpus {name}: {len(train_text):,} train / {len(val_text):,} val chars, vocab {len(vocab)}",
          file=sys.stderr)
    budget = args.minutes * 60
    steps = chars = 0
    state = None
    t_pos = 0
    start = time.perf_counter()
    last_log = start
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= budget or (args.steps and steps >= args.steps):
            break
        if t_pos + 1 >= L:  # new epoch: streams restart from a zero state
            t_pos, state = 0, None
        x, y = xs[t_pos:t_pos + T], ys[t_pos:t_pos + T]
        t_pos += x.shape[0]
        if state is not None:
            state = tuple(s.detach() for s in state)
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        steps += 1
        chars += y.numel()
        if time.perf_counter() - last_log > 30:
            last_log = time.perf_counter()
            print(f"step {steps} loss {loss.item():.3f} {chars / (last_log - start):,.0f} chars/s",
                  file=sys.stderr)
    seconds = time.perf_counter() - start
    total, n = stream_loss(model, val_ids)
    res = {"script": "charlm_torch_baseline", "val_loss_nats": total / n, "val_bits_per_char": total / n / math.log(2),
           "val_chars": n, "chars_per_s": chars / seconds, "steps": steps, "train_chars": chars,
           "seconds": seconds, "threads": torch.get_num_threads(), "hidden": args.hidden, "batch": B,
           "chunk": T, "lr": args.lr, "seed": args.seed}
    print(f"val {res['val_loss_nats']:.4f} nats/char ({res['val_bits_per_char']:.3f} bits), "
          f"{res['chars_per_s']:,.0f} chars/s, {steps} steps in {seconds:.0f} s", file=sys.stderr)
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
