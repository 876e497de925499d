"""``rnnkit label train|eval|predict``: sequence labelling with CTC (text-line images, feature sequences)."""

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import RunOptions, run_command
from .forecast import ts_config, write_csv

NAME = "label"
app = typer.Typer(help="Label unsegmented sequences with CTC: train, evaluate, predict.", no_args_is_help=True)

LabelsOpt = Annotated[Path | None, typer.Option(
    "--labels", help="Label file 'file<TAB>label' (default: labels.tsv in the input folder).")]
DecoderOpt = Annotated[str | None, typer.Option("--decoder", help="greedy (best path) or beam (prefix beam search).")]
BeamOpt = Annotated[int | None, typer.Option("--beam-width", help="Beam search: prefixes kept per step.")]
LmOrderOpt = Annotated[int | None, typer.Option(
    "--lm-order", help="Beam search: order of the character n-gram model of the training labels (0 = none).")]
LmWeightOpt = Annotated[float | None, typer.Option("--lm-weight", help="Beam search: weight of the n-gram model.")]
AlignOpt = Annotated[int, typer.Option("--alignments", help="Plot the CTC alignment of this many lines.")]
NO_TRAINING = ("out", "config", "set", "seed", "steps", "epochs", "minutes", "resume", "checkpoint_every", "device")


def _decode_config(model: Any, decoder: str | None, beam: int | None, lm_order: int | None,
                   lm_weight: float | None) -> Any:
    from ..train import replace_config

    given = {"decoder": decoder, "beam_width": beam, "lm_order": lm_order, "lm_weight": lm_weight}
    return replace_config(model.cfg.decode, **{k: v for k, v in given.items() if v is not None})


def _evaluate(opts: RunOptions, model: Any, data: Any, run_dir: Path, name: str, decode: Any,
              alignments: int) -> dict[str, Any]:
    """Metrics of ``data`` (written to ``<name>_metrics.json``) and alignment plots of its first lines."""
    from ..tasks.label import plot_alignment

    metrics = model.evaluate(data, "--test", decode)
    (run_dir / f"{name}_metrics.json").write_text(json.dumps(metrics))
    if alignments > 0:
        subset = type(data)(data.sequences[:alignments], data.labels[:alignments], data.ids[:alignments],
                            data.source)
        lps = model.log_probs(subset)
        hyps = model.decode(lps, decode)
        for i, (seq, lp, ref, hyp) in enumerate(zip(subset.sequences, lps, subset.labels, hyps)):
            plot_alignment(seq, lp, model.alphabet, run_dir / f"alignment_{name}_{i}.png",
                           title=f"{subset.ids[i]}: label {ref!r}, decoded {hyp!r}", stack=model.cfg.data.stack)
    return {f"{name}_{k}" if k != "n" else f"n_{name}": v for k, v in metrics.items()}


@app.command()
@run_command(NAME)
def train(train_path: Annotated[str, typer.Option(
              "--train", help="Training set: a folder (labels.tsv + PNG/CSV/NPY files), an .npz, or digit-strings.")],
          test_path: Annotated[str | None, typer.Option(
              "--test", help="Test set (same forms), evaluated at the end.")] = None,
          labels: LabelsOpt = None,
          test_labels: Annotated[Path | None, typer.Option("--test-labels", help="Label file of --test.")] = None,
          cell: Annotated[str | None, typer.Option("--cell", help="Recurrent cell (see `rnnkit cells`).")] = None,
          hidden: Annotated[int | None, typer.Option("--hidden", help="Hidden units per direction.")] = None,
          layers: Annotated[int | None, typer.Option("--layers", help="Stacked layers.")] = None,
          bidirectional: Annotated[bool | None, typer.Option("--bidirectional/--unidirectional",
                                                             help="Read sequences both ways.")] = None,
          lr: Annotated[float | None, typer.Option("--lr", help="Learning rate.")] = None,
          image_augment: Annotated[bool | None, typer.Option(
              "--image-augment/--no-image-augment",
              help="Distort training images (random affine, elastic, stroke thickness; [image_augment]); "
                   "on by default for image inputs.")] = None,
          decoder: DecoderOpt = None, beam_width: BeamOpt = None, lm_order: LmOrderOpt = None,
          lm_weight: LmWeightOpt = None, alignments: AlignOpt = 3, *, opts: RunOptions) -> None:
    """Train a CTC labeller; with --test report CER, WER and sequence accuracy (greedy and beam) and plot
    the alignment of the first test lines."""
    from ..tasks import label as L

    cfg = ts_config(opts, L.LabelConfig, {
        "model.cell": cell, "model.hidden": hidden, "model.layers": layers, "model.bidirectional": bidirectional,
        "trainer.optim.lr": lr, "image_augment.enabled": image_augment,
        "decode.decoder": decoder, "decode.beam_width": beam_width,
        "decode.lm_order": lm_order, "decode.lm_weight": lm_weight})
    tr = L.read_label_set(train_path, labels, "--train")
    te = L.read_label_set(test_path, test_labels, "--test", split="test") if test_path is not None else None
    run_dir = Path(opts.run_dir)
    lengths = [len(s) for s in tr.sequences]
    opts.info(f"training on {len(tr)} sequences ({tr.n_features} feature(s), lengths {min(lengths)}-"
              f"{max(lengths)}) -> {run_dir}")
    model = L.train(tr, cfg, run_dir, resume=opts.resume, quiet=opts.quiet)
    result: dict[str, Any] = {"run_dir": str(run_dir), "alphabet": model.alphabet.symbols, **model.meta["train"]}
    if te is not None:
        result.update(_evaluate(opts, model, te, run_dir, "test", cfg.decode, alignments))
    opts.emit(result)


@app.command("eval")
@run_command(NAME, exclude=NO_TRAINING)
def evaluate(run_dir: Annotated[Path, typer.Argument(help="Run directory of `rnnkit label train`.")],
             test_path: Annotated[str, typer.Option("--test", help="Labelled set (folder, .npz or digit-strings).")],
             labels: LabelsOpt = None, decoder: DecoderOpt = None, beam_width: BeamOpt = None,
             lm_order: LmOrderOpt = None, lm_weight: LmWeightOpt = None, alignments: AlignOpt = 0, *,
             opts: RunOptions) -> None:
    """Evaluate a trained labeller: CER, WER and sequence accuracy with greedy decoding and with the chosen
    decoder (the run's unless given)."""
    from ..tasks.label import Labeller, read_label_set

    model = Labeller.load(run_dir)
    te = read_label_set(test_path, labels, "--test", split="test")
    decode = _decode_config(model, decoder, beam_width, lm_order, lm_weight)
    opts.emit(_evaluate(opts, model, te, Path(run_dir), "eval", decode, alignments))


@app.command()
@run_command(NAME, exclude=NO_TRAINING)
def predict(run_dir: Annotated[Path, typer.Argument(help="Run directory of `rnnkit label train`.")],
            input_path: Annotated[str, typer.Option("--input", help="Sequences to label (folder or .npz).")],
            out: Annotated[Path, typer.Option("--out", help="Predictions CSV: id, decoded label.")],
            labels: LabelsOpt = None, decoder: DecoderOpt = None, beam_width: BeamOpt = None,
            lm_order: LmOrderOpt = None, lm_weight: LmWeightOpt = None, *, opts: RunOptions) -> None:
    """Decode every sequence of --input; one CSV row per sequence (a folder needs no label file here)."""
    from ..tasks.label import Labeller, read_label_set

    model = Labeller.load(run_dir)
    data = read_label_set(input_path, labels, "--input", require_labels=False, split="test")
    hyps = model.decode(model.log_probs(data, "--input"),
                        _decode_config(model, decoder, beam_width, lm_order, lm_weight))
    write_csv(out, ["id", "predicted"], [[i, h] for i, h in zip(data.ids, hyps)])
    opts.emit({"predictions_csv": str(out), "n": len(hyps)})
