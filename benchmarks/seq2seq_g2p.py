"""English grapheme-to-phoneme on CMUdict: train ``rnnkit seq2seq`` with its defaults, score the test words.

Trains on the built-in G2P set (see ``docs/seq2seq.md`` for the split) with the task's defaults and a
cosine learning-rate schedule over ``--minutes`` of wall-clock time, then decodes the 10% test words
greedily and with beam search (``--beam`` beams) from the checkpoint with the best validation word error
rate, and prints both next to Yao & Zweig (2015):

    python benchmarks/seq2seq_g2p.py --out runs/g2p --minutes 120 --json
    python benchmarks/seq2seq_g2p.py --out runs/g2p --eval-only --json     # score an existing run

WER counts a word wrong when any phoneme differs from the reference (the first pronunciation the
dictionary lists); PER is the phoneme edit distance over the reference phonemes.
"""

from __future__ import annotations

import argparse
import json
import sys

from rnnkit.tasks import seq2seq
from rnnkit.train.config import load_config, replace_config

PUBLISHED = {"yao_zweig_2015_encoder_decoder": {"per": 0.0763, "wer": 0.2861},
             "yao_zweig_2015_bi_lstm_alignment": {"per": 0.0545, "wer": 0.2355}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="run directory")
    ap.add_argument("--minutes", type=float, default=120.0)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-only", action="store_true", help="score the run in --out without training")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override, as in `rnnkit seq2seq train --set` (repeatable)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    out: dict = {}
    if not args.eval_only:
        # the defaults, with the learning rate annealed (cosine) over the time budget
        base = {"trainer.minutes": args.minutes, "trainer.seed": args.seed,
                "trainer.schedule.name": "cosine", "trainer.checkpoint_every": 2000}
        cfg = load_config(seq2seq.Seq2SeqConfig, None, args.set, base=base)
        out["train"] = seq2seq.train(cfg, args.out, quiet=False)
    run = seq2seq.load_run(args.out, checkpoint="best")
    for name, beam in (("greedy", 1), (f"beam{args.beam}", args.beam)):
        dcfg = replace_config(run.config, **{"decode.beam_size": beam}).decode
        m = seq2seq.evaluate_run(run, split="test", decode_cfg=dcfg)
        out[name] = {"wer": m["sequence_error_rate"], "per": m["token_error_rate"], "words": m["pairs"],
                     "decode_s": m["decode_s"], "checkpoint_step": m["checkpoint_step"]}
        print(f"{name}: WER {m['sequence_error_rate']:.4f}, PER {m['token_error_rate']:.4f} on {m['pairs']} "
              f"test words", file=sys.stderr)
    out["published"] = PUBLISHED
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
