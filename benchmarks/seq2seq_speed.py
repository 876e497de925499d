"""Teacher-forced training throughput: ``rnnkit seq2seq`` against a plain torch.nn.LSTM encoder-decoder.

Both sides train the same model on the same batches of the built-in G2P training words (pairs of equal
source length, as ``rnnkit seq2seq train`` batches them; ``--random-batches`` for random ones, where the
baseline packs the padded sources) with Adam and clipping at global norm 5:

- rnnkit: :class:`rnnkit.tasks.seq2seq.Seq2Seq` (bidirectional encoder, multiplicative attention, the
  task's defaults unless overridden) trained through :class:`rnnkit.train.Trainer`, as the command does;
- baseline: the same architecture written with ``torch.nn.LSTM`` / ``nn.Linear`` only, in a hand-written
  loop (no rnnkit code in the model or the loop).

Each side first runs ``--warmup`` steps, then ``--steps`` timed steps; pairs per second are reported, and
their ratio (rnnkit / baseline; the target is >= 1 / 1.2). Run on a quiet machine::

    python benchmarks/seq2seq_speed.py --steps 200 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnkit.data.pairs import PAD_ID, Vocab, cmudict_pairs, encode_pairs
from rnnkit.tasks.seq2seq import Buckets, Seq2Seq, Seq2SeqModelConfig, Seq2SeqTask, StackConfig, trim


class PlainSeq2Seq(nn.Module):
    """torch.nn only: bi-LSTM encoder, tanh bridge to the decoder's (h0, c0), LSTM decoder, general
    attention h_t^T W m_s, attentional vector tanh(W_c [c_t; h_t]), output layer."""

    def __init__(self, V_src: int, V_tgt: int, E: int, He: int, Hd: int, layers: int) -> None:
        super().__init__()
        self.src_emb = nn.Embedding(V_src, E, padding_idx=PAD_ID)
        self.tgt_emb = nn.Embedding(V_tgt, E, padding_idx=PAD_ID)
        self.encoder = nn.LSTM(E, He, layers, bidirectional=True)
        self.bridge_h = nn.Linear(2 * He, layers * Hd)
        self.bridge_c = nn.Linear(2 * He, layers * Hd)
        self.decoder = nn.LSTM(E, Hd, layers)
        self.W_a = nn.Linear(2 * He, Hd, bias=False)
        self.combine = nn.Linear(2 * He + Hd, Hd, bias=False)
        self.out = nn.Linear(Hd, V_tgt)
        self.layers, self.Hd = layers, Hd

    def forward(self, src, src_len, tgt_in):
        S, B = src.shape
        emb = self.src_emb(src)
        if bool((src_len == S).all()):
            mem, (h, _) = self.encoder(emb)
        else:
            packed, (h, _) = self.encoder(pack_padded_sequence(emb, src_len.cpu(), enforce_sorted=False))
            mem, _ = pad_packed_sequence(packed, total_length=S)
        top = torch.cat([h[-2], h[-1]], -1)  # (B, 2He)
        h0 = torch.tanh(self.bridge_h(top)).view(B, self.layers, self.Hd).transpose(0, 1).contiguous()
        c0 = torch.tanh(self.bridge_c(top)).view(B, self.layers, self.Hd).transpose(0, 1).contiguous()
        dec, _ = self.decoder(self.tgt_emb(tgt_in), (h0, c0))  # (T, B, Hd)
        m = mem.transpose(0, 1)  # (B, S, 2He)
        q = dec.transpose(0, 1)  # (B, T, Hd)
        scores = q @ self.W_a(m).transpose(1, 2)
        mask = torch.arange(S).unsqueeze(0) < src_len.unsqueeze(1)
        w = torch.softmax(scores.masked_fill(~mask.unsqueeze(1), float("-inf")), -1)
        att = torch.tanh(self.combine(torch.cat([w @ m, q], -1)))
        return self.out(att).transpose(0, 1)


def time_baseline(model, batches, warmup, steps, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    pairs, t0 = 0, None
    for i in range(warmup + steps):
        if i == warmup:
            t0, pairs = time.perf_counter(), 0
        src, src_len, tgt_in, tgt_out, mask = trim(batches[i % len(batches)])
        logits = model(src, src_len, tgt_in)
        per = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), reduction="none")
        loss = (per * mask.flatten()).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        pairs += src.shape[1]
    return pairs / (time.perf_counter() - t0)


def time_rnnkit(model, batches, warmup, steps, lr):
    from rnnkit.train import OptimConfig, Trainer, TrainerConfig

    def run(n):
        data = [batches[i % len(batches)] for i in range(n)]
        cfg = TrainerConfig(batch_size=1, steps=n, clip_norm=5.0, log_every=10**6, tensorboard=False,
                            optim=OptimConfig(name="adam", lr=lr))
        trainer = Trainer(model, Seq2SeqTask(), data, cfg, None, quiet=True)
        t0 = time.perf_counter()
        trainer.fit()
        return sum(b["src"].shape[0] for b in data) / (time.perf_counter() - t0)

    run(warmup)
    return run(steps)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--embedding", type=int, default=Seq2SeqModelConfig.embedding_size)
    ap.add_argument("--hidden", type=int, default=StackConfig.hidden_size, help="encoder (per direction) and decoder")
    ap.add_argument("--layers", type=int, default=StackConfig.num_layers)
    ap.add_argument("--random-batches", action="store_true", help="random batches instead of equal source lengths")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pairs = cmudict_pairs("train")
    sv, tv = Vocab.build(p.source for p in pairs), Vocab.build(p.target for p in pairs)
    data = encode_pairs(pairs, sv, tv)
    g = torch.Generator().manual_seed(0)
    if args.random_batches:
        perm = torch.randperm(len(pairs), generator=g)
        batches = [{k: v[idx] for k, v in data.items()} for idx in perm.split(args.batch_size)]
    else:
        bk = Buckets(data, args.batch_size, seed=0)
        batches = [bk[int(i)] for i in torch.randperm(len(bk), generator=g)]
    n = args.warmup + args.steps
    batches = batches[:n]

    stack = StackConfig(hidden_size=args.hidden, num_layers=args.layers)
    cfg = Seq2SeqModelConfig(embedding_size=args.embedding, encoder=stack, decoder=stack, dropout=0.0)
    torch.manual_seed(0)
    ours = Seq2Seq(len(sv), len(tv), cfg)
    torch.manual_seed(0)
    plain = PlainSeq2Seq(len(sv), len(tv), args.embedding, args.hidden, args.hidden, args.layers)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_plain = sum(p.numel() for p in plain.parameters())
    print(f"parameters: rnnkit {n_ours:,}, baseline {n_plain:,}; {args.steps} timed steps of {args.batch_size} pairs",
          file=sys.stderr)
    base = time_baseline(plain, batches, args.warmup, args.steps, 1e-3)
    mine = time_rnnkit(ours, batches, args.warmup, args.steps, 1e-3)
    out = {"rnnkit_pairs_per_s": mine, "baseline_pairs_per_s": base, "ratio": mine / base,
           "parameters_rnnkit": n_ours, "parameters_baseline": n_plain, "steps": args.steps,
           "batch_size": args.batch_size, "random_batches": args.random_batches, "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>22}  {v:.4g}" if isinstance(v, float) else f"{k:>22}  {v}")
    return out


if __name__ == "__main__":
    main()
