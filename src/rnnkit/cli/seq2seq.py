"""``rnnkit seq2seq train|eval|translate``: recurrent encoder-decoders with attention and beam search.

    rnnkit seq2seq train --out runs/g2p --minutes 60          # built-in English G2P (CMUdict)
    rnnkit seq2seq eval runs/g2p --beam-size 5 --json         # the G2P test split
    echo hello | rnnkit seq2seq translate runs/g2p             # streams one output line per input line
    echo hello | rnnkit seq2seq translate --onnx runs/g2p/model.encoder.onnx   # onnxruntime (rnnkit export)
    rnnkit seq2seq train --train pairs.tsv --target-tokens space --out runs/mt
"""

# no "from __future__ import annotations": typer reads these annotations through run_command's wrapper
import sys
from pathlib import Path
from typing import Annotated

import typer

from .common import NOT_TRAINING, RunOptions, resolve_config, resolve_device, run_command, run_or_onnx, stream_writer
from .model_flags import Backend, ForgetBias, LayerNorm, RecDrop, Zoneout, variant_flags

NAME = "seq2seq"
app = typer.Typer(help="Sequence-to-sequence: encoder-decoder with attention, greedy and beam decoding.",
                  no_args_is_help=True)

RunDirArg = Annotated[Path, typer.Argument(help="Run directory written by `seq2seq train --out`.")]
CheckpointOpt = Annotated[str, typer.Option("--checkpoint", help="best (by validation), latest or a step number.")]
BeamOpt = Annotated[int | None, typer.Option("--beam-size", help="Beams; 1 = greedy (the run's decode.beam_size).")]
PenaltyOpt = Annotated[float | None, typer.Option("--length-penalty", help="Alpha of the beam length "
                                                  "normalisation ((5 + n) / 6)^alpha.")]
DecodeBatchOpt = Annotated[int | None, typer.Option("--decode-batch-size", help="Sequences decoded together.")]


def _decode_cfg(run, beam_size, length_penalty, batch_size):
    from ..train.config import replace_config

    flags = {"decode.beam_size": beam_size, "decode.length_penalty": length_penalty,
             "decode.batch_size": batch_size}
    return replace_config(run.config, **{k: v for k, v in flags.items() if v is not None}).decode


@app.command()
@run_command("seq2seq")
def train(
    train_file: Annotated[Path | None, typer.Option("--train", help="Pairs file: source<TAB>target per line "
                                                    "(.csv: comma-separated); default: built-in English G2P "
                                                    "(CMUdict).")] = None,
    valid: Annotated[Path | None, typer.Option("--valid", help="Validation pairs (default: 5% of --train).")] = None,
    source_tokens: Annotated[str | None, typer.Option(help="char or space (char).")] = None,
    target_tokens: Annotated[str | None, typer.Option(help="char or space (char).")] = None,
    too_long: Annotated[str | None, typer.Option(help="Pairs over the length limits: drop (and count) or error.")
                        ] = None,
    max_source_len: Annotated[int | None, typer.Option(help="Longest source kept, in tokens (100).")] = None,
    max_target_len: Annotated[int | None, typer.Option(help="Longest target kept, in tokens (100).")] = None,
    encoding: Annotated[str | None, typer.Option(help="Encoding of the pairs files (utf-8).")] = None,
    cell: Annotated[str | None, typer.Option(help="Cell of encoder and decoder, any of `rnnkit cells` (lstm).")
                    ] = None,
    hidden_size: Annotated[int | None, typer.Option("--hidden-size", "--hidden",
                                                    help="Hidden units of encoder (per direction) and decoder.")
                           ] = None,
    layers: Annotated[int | None, typer.Option(help="Layers of encoder and decoder.")] = None,
    forget_bias: ForgetBias = None,
    layer_norm: LayerNorm = None,
    zoneout: Zoneout = None,
    recurrent_dropout: RecDrop = None,
    backend: Backend = None,
    embedding_size: Annotated[int | None, typer.Option(help="Token embedding width (128).")] = None,
    bidirectional: Annotated[bool | None, typer.Option("--bidirectional/--unidirectional",
                                                       help="Bidirectional encoder (yes).")] = None,
    attention: Annotated[str | None, typer.Option(help="none, additive or multiplicative (multiplicative).")
                         ] = None,
    input_feeding: Annotated[bool | None, typer.Option("--input-feeding/--no-input-feeding",
                                                       help="Feed the attentional vector to the next step.")
                             ] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout on embeddings and attentional vectors (0.2).")
                       ] = None,
    scheduled_sampling: Annotated[float | None, typer.Option(help="Final probability of feeding the model's own "
                                                             "token (0).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Pairs per step (64).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (1e-3).")] = None,
    clip: Annotated[float | None, typer.Option(help="Clip the global gradient norm (5).")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate on the validation pairs every N steps (1000).")
                          ] = None,
    *,
    opts: RunOptions,
) -> None:
    """Train an encoder-decoder (default budget 10 minutes); final validation loss and error rates."""
    from ..tasks import seq2seq

    shared = {"model.cell": cell, "model.hidden_size": hidden_size, "model.num_layers": layers,
              **variant_flags(forget_bias=forget_bias, layer_norm=layer_norm, zoneout=zoneout,
                              recurrent_dropout=recurrent_dropout, backend=backend)}
    both = {k.replace("model.", f"model.{side}.", 1): v for k, v in shared.items() for side in ("encoder", "decoder")}
    flags = {
        "data.train": str(train_file) if train_file is not None else None,
        "data.valid": str(valid) if valid is not None else None, "data.source_tokens": source_tokens,
        "data.target_tokens": target_tokens, "data.too_long": too_long, "data.max_source_len": max_source_len,
        "data.max_target_len": max_target_len, "data.encoding": encoding, **both,
        "model.embedding_size": embedding_size, "model.bidirectional": bidirectional,
        "model.attention": attention, "model.input_feeding": input_feeding, "model.dropout": dropout,
        "objective.scheduled_sampling": scheduled_sampling, "trainer.batch_size": batch_size,
        "trainer.optim.lr": lr, "trainer.clip_norm": clip, "trainer.eval_every": eval_every,
    }
    cfg = resolve_config(opts, seq2seq.Seq2SeqConfig, flags)
    opts.emit(seq2seq.train(cfg, opts.run_dir, resume=opts.resume, quiet=opts.quiet))


@app.command("eval")
@run_command("seq2seq", exclude=NOT_TRAINING)
def eval_(
    run_dir: RunDirArg,
    test: Annotated[Path | None, typer.Option("--test", help="Pairs file to score (default: the run's test "
                                              "split; built-in G2P: its fixed test words).")] = None,
    split: Annotated[str, typer.Option(help="Built-in data: which split to score (test, valid, train).")] = "test",
    beam_size: BeamOpt = None,
    length_penalty: PenaltyOpt = None,
    decode_batch_size: DecodeBatchOpt = None,
    predictions: Annotated[Path | None, typer.Option(help="Write source, reference and output per line (TSV).")
                           ] = None,
    checkpoint: CheckpointOpt = "best",
    *,
    opts: RunOptions,
) -> None:
    """Exact-match accuracy, sequence and token error rates (WER / PER for G2P); BLEU and chrF for text."""
    from ..tasks import seq2seq

    run = seq2seq.load_run(run_dir, checkpoint=checkpoint, device=resolve_device(opts.device))
    dcfg = _decode_cfg(run, beam_size, length_penalty, decode_batch_size)
    opts.emit(seq2seq.evaluate_run(run, str(test) if test is not None else None, split, dcfg, predictions))


@app.command()
@run_command("seq2seq", exclude=NOT_TRAINING + ("json", "seed"))
def translate(
    run_dir: Annotated[Path | None, typer.Argument(help="Run directory written by `seq2seq train --out` "
                                                   "(or --onnx).")] = None,
    onnx: Annotated[Path | None, typer.Option(
        "--onnx", help="Decode with onnxruntime from the encoder file written by `rnnkit export RUN_DIR` "
                       "(model.encoder.onnx; its decoder file lies next to it) instead of the run's PyTorch "
                       "model.")] = None,
    input_file: Annotated[Path | None, typer.Option("--input", help="One source per line (default: stdin).")
                          ] = None,
    beam_size: BeamOpt = None,
    length_penalty: PenaltyOpt = None,
    decode_batch_size: DecodeBatchOpt = None,
    attention_dir: Annotated[Path | None, typer.Option(help="Write each line's attention as DIR/NNNNN.png "
                                                       "(heat map) and DIR/NNNNN.json (weights).")] = None,
    encoding: Annotated[str, typer.Option(help="Encoding of --input.")] = "utf-8",
    checkpoint: CheckpointOpt = "best",
    *,
    opts: RunOptions,
) -> None:
    """Translate each input line; outputs stream to stdout, one line each, in input order.

    From stdin, each line is translated as soon as it is read (a pipe or a terminal both work); from
    --input, lines are decoded in batches of --decode-batch-size.
    """
    from ..data.pairs import decode_line, read_lines, tokenize
    from ..tasks import seq2seq

    def load_onnx(path):
        from ..export.runner import seq2seq_run

        return seq2seq_run(path)

    run = run_or_onnx(run_dir, onnx, lambda: seq2seq.load_run(run_dir, checkpoint=checkpoint,
                                                              device=resolve_device(opts.device)),
                      load_onnx, "an exported encoder graph")
    src_kind = run.config.data.sides()[0]
    if input_file is not None:
        lines = ((f"{input_file}:{i}", s) for i, s in read_lines(input_file, encoding))
        dcfg = _decode_cfg(run, beam_size, length_penalty, decode_batch_size)
    else:
        lines = ((f"<stdin>:{i}", decode_line(raw, f"<stdin>:{i}", encoding))
                 for i, raw in enumerate(sys.stdin.buffer, 1))
        dcfg = _decode_cfg(run, beam_size, length_penalty, decode_batch_size or 1)
    lower = run.config.data.builtin  # the G2P words are lower case
    sources = ((where, tokenize(s.lower() if lower else s, src_kind)) for where, s in lines if s.strip())
    seq2seq.translate(run, sources, dcfg, write=stream_writer, attention_dir=attention_dir)
