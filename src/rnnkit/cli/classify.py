"""``rnnkit classify train|eval|predict``: whole-sequence classification (UCR/UEA, CSV, NumPy, bundled sets)."""

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import RunOptions, run_command
from .forecast import FillOpt, ts_config, write_csv

NAME = "classify"
app = typer.Typer(help="Classify whole sequences: train, evaluate, predict.", no_args_is_help=True)

LabelOpt = Annotated[str | None, typer.Option("--label", help="CSV label column ('none' = unlabelled; default: "
                                              "the first column if named label/class/y or non-numeric).")]
IdOpt = Annotated[str | None, typer.Option("--id-column", help="CSV long format: the sequence id column.")]
TimeOpt = Annotated[str | None, typer.Option("--time", help="CSV long format: the column ordering the steps.")]
DatasetOpt = Annotated[str | None, typer.Option("--dataset", help="A bundled set (GunPoint, ItalyPowerDemand, "
                                                "ArrowHead, BasicMotions, JapaneseVowels, MNIST1D, ...) or "
                                                "'digits' (8x8 handwritten digit images).")]
ImageLabelsOpt = Annotated[Path | None, typer.Option(
    "--image-labels", help="Images in IDX format: the labels IDX file of --train/--test/--input.")]


def read_set(path: Path | None, dataset: str | None, split: str, arg: str, label: str | None, id_col: str | None,
             time_col: str | None, fill: str | None, data_cfg: Any = None, image_labels: Path | None = None,
             labels_flag: str = "--image-labels"):
    """A SequenceSet from a file (any supported format) or a bundled set; images (``data_cfg.read`` set)
    are read as sequences in that order."""
    from ..data import images
    from ..data.sequences import load_bundled, read_sequences
    from ..errors import UserError

    if (path is None) == (dataset is None):
        raise UserError(f"{arg}: give either {arg} FILE or --dataset NAME (got "
                        f"{'both' if path is not None else 'neither'})")
    read = getattr(data_cfg, "read", None)
    if read is not None or dataset == images.DIGITS:
        pics = images.load_digits(split) if dataset == images.DIGITS else \
            images.read_images(path, image_labels, arg, labels_flag) if path is not None else None
        if pics is None:
            raise UserError(f"--dataset: {dataset!r} is not an image set; with --read use {images.DIGITS!r} or files")
        return images.as_sequence_set(pics, read or "rows", data_cfg.permute_seed)
    if dataset is not None:
        return load_bundled(dataset, split)
    return read_sequences(path, label=label, id_col=id_col, time_col=time_col, fill=fill, name=arg)


def _report(opts: RunOptions, model: Any, metrics: dict[str, Any], run_dir: Path, name: str) -> dict[str, Any]:
    from ..tasks.classify import format_confusion, plot_confusion

    png = plot_confusion(metrics["confusion_matrix"], model.classes, run_dir / f"confusion_{name}.png",
                         title=f"confusion matrix ({name})")
    if not opts.json:
        typer.echo(format_confusion(metrics["confusion_matrix"], model.classes))
    out = {k: v for k, v in metrics.items() if k != "confusion_matrix"}
    out["confusion_matrix"] = metrics["confusion_matrix"] if opts.json else json.dumps(metrics["confusion_matrix"])
    out["confusion_png"] = str(png)
    return out


@app.command()
@run_command(NAME)
def train(train_path: Annotated[Path | None, typer.Option("--train", help="Training set file.")] = None,
          test_path: Annotated[Path | None, typer.Option("--test", help="Test set file (evaluated at the end).")]
          = None, dataset: DatasetOpt = None,
          cell: Annotated[str | None, typer.Option("--cell", help="Recurrent cell (see `rnnkit cells`).")] = None,
          hidden: Annotated[int | None, typer.Option("--hidden", help="Hidden units.")] = None,
          layers: Annotated[int | None, typer.Option("--layers", help="Stacked layers.")] = None,
          bidirectional: Annotated[bool | None, typer.Option("--bidirectional/--unidirectional",
                                                             help="Read sequences both ways.")] = None,
          pool: Annotated[str | None, typer.Option("--pool", help="last, mean or attention.")] = None,
          class_weights: Annotated[str | None, typer.Option("--class-weights", help="none or balanced.")] = None,
          val_fraction: Annotated[float | None, typer.Option(
              "--val-fraction", help="Hold out this fraction to keep the best epoch.")] = None,
          scaler: Annotated[str | None, typer.Option("--scaler", help="standard, minmax, robust or none.")] = None,
          lr: Annotated[float | None, typer.Option("--lr", help="Learning rate.")] = None,
          downsample: Annotated[int | None, typer.Option(
              "--downsample", help="Average blocks of this many steps (shortens long series).")] = None,
          jitter: Annotated[float | None, typer.Option(
              "--jitter", help="Augment: additive Gaussian noise of this std (scaled units) while training.")] = None,
          scale: Annotated[float | None, typer.Option(
              "--scale", help="Augment: random gain N(1, s^2) per sequence and channel while training.")] = None,
          warp: Annotated[float | None, typer.Option(
              "--warp", help="Augment: smooth random gain over time, knots N(1, w^2), while training.")] = None,
          kind: Annotated[str | None, typer.Option(
              "--model", help="auto (default: the plain recurrent classifier or LSTM-FCN, chosen by cross-validation "
              "on the training set), recurrent or lstm_fcn. --pool, --bidirectional, --downsample imply recurrent."
          )] = None,
          reader: Annotated[str | None, typer.Option(
              "--reader", help="Long series: full, fold (k steps -> one step of k*C features) or dilate (k "
              "interleaved subsequences, states averaged) with --stride k.")] = None,
          stride: Annotated[int | None, typer.Option("--stride", help="Stride k of --reader fold|dilate.")] = None,
          read: Annotated[str | None, typer.Option(
              "--read", help="The inputs are images (IDX, PNG class folders, NPY/NPZ (N, H, W)) read as "
              "rows, columns or pixels (default rows for --dataset digits).")] = None,
          permute: Annotated[int | None, typer.Option(
              "--permute", help="With --read pixels: a fixed random pixel order from this seed.")] = None,
          image_augment: Annotated[bool | None, typer.Option(
              "--image-augment/--no-image-augment",
              help="Images: distort them while training (random affine, elastic, stroke thickness; "
                   "[image_augment]); on by default.")] = None,
          train_labels: Annotated[Path | None, typer.Option(
              "--train-labels", help="Images in IDX format: the labels IDX file of --train.")] = None,
          test_labels: Annotated[Path | None, typer.Option(
              "--test-labels", help="Images in IDX format: the labels IDX file of --test.")] = None,
          label: LabelOpt = None, id_column: IdOpt = None, time_col: TimeOpt = None, fill: FillOpt = None, *,
          opts: RunOptions) -> None:
    """Train a sequence classifier; with --test (or --dataset) report accuracy, balanced accuracy, macro F1
    and the confusion matrix (printed and PNG). The record of an automatic model choice is in --json and
    model.json (``choice``)."""
    from ..data.images import DIGITS
    from ..tasks import classify as C

    if read is None and dataset == DIGITS:
        read = "rows"
    if kind is None and any(v is not None for v in (pool, bidirectional, downsample)):
        kind = "recurrent"
    cfg = ts_config(opts, C.ClassifyConfig, {"model.kind": kind, "model.reader": reader, "model.stride": stride,
        "model.cell": cell, "model.hidden": hidden, "model.layers": layers, "model.bidirectional": bidirectional,
        "model.pool": pool, "data.class_weights": class_weights, "data.val_fraction": val_fraction,
        "data.scaler": scaler, "data.fill": fill, "trainer.optim.lr": lr, "data.downsample": downsample,
        "data.jitter": jitter, "data.scale": scale, "data.warp": warp, "data.read": read,
        "data.permute_seed": permute, "image_augment.enabled": image_augment})
    tr = read_set(train_path, dataset, "train", "--train", label, id_column, time_col, cfg.data.fill, cfg.data,
                  train_labels, "--train-labels")
    te = None
    if test_path is not None or dataset is not None:
        te = read_set(test_path, dataset, "test", "--test", label, id_column, time_col, cfg.data.fill, cfg.data,
                      test_labels, "--test-labels")
        C.encode_labels(te.labels, C.class_names(tr.labels), "--test")  # an unseen test label: say so now
    run_dir = opts.run_dir
    opts.info(f"training on {len(tr)} sequences ({tr.n_channels} channel(s), lengths {tr.lengths.min()}-"
              f"{tr.lengths.max()}) -> {run_dir}")
    model = C.train(tr, cfg, run_dir, resume=opts.resume, quiet=opts.quiet)
    result: dict[str, Any] = {"run_dir": str(run_dir), "model": model.cfg.model.kind, **model.meta["train"]}
    if model.meta.get("choice"):
        result["choice"] = model.meta["choice"]
        opts.info(f"model: {model.cfg.model.kind} ({model.meta['choice']['why']}: " + ", ".join(
            f"{k} {v['mean']:.3f}" for k, v in model.meta["choice"]["candidates"].items()) + ")")
        if "final" in model.meta["choice"]:
            opts.info(f"trained on the whole set: {model.meta['choice']['final']['why']}, cosine learning rate")
    if te is not None:
        metrics = model.evaluate(te)
        (Path(run_dir) / "test_metrics.json").write_text(json.dumps(metrics))
        result.update({f"test_{k}" if k in ("accuracy", "balanced_accuracy", "macro_f1") else k: v
                       for k, v in _report(opts, model, metrics, Path(run_dir), "test").items()})
    opts.emit(result)


@app.command("eval")
@run_command(NAME, exclude=("out", "config", "set", "seed", "steps", "epochs", "minutes", "resume",
                            "checkpoint_every", "device"))
def evaluate(run_dir: Annotated[Path, typer.Argument(help="Run directory of `rnnkit classify train`.")],
             test_path: Annotated[Path | None, typer.Option("--test", help="Labelled test file.")] = None,
             dataset: DatasetOpt = None, label: LabelOpt = None, id_column: IdOpt = None, time_col: TimeOpt = None,
             fill: FillOpt = None, image_labels: ImageLabelsOpt = None, *, opts: RunOptions) -> None:
    """Evaluate a trained classifier on a labelled set: accuracy, balanced accuracy, macro F1, confusion matrix.
    A model trained on images reads --test as images in its training order (and permutation)."""
    from ..tasks.classify import Classifier

    model = Classifier.load(run_dir)
    te = read_set(test_path, dataset, "test", "--test", label, id_column, time_col, fill or model.cfg.data.fill,
                  model.cfg.data, image_labels)
    metrics = model.evaluate(te)
    opts.emit({"n": len(te), **_report(opts, model, metrics, Path(run_dir), "eval")})


@app.command()
@run_command(NAME, exclude=("out", "config", "set", "seed", "steps", "epochs", "minutes", "resume",
                            "checkpoint_every", "device"))
def predict(run_dir: Annotated[Path, typer.Argument(help="Run directory of `rnnkit classify train`.")],
            input_path: Annotated[Path, typer.Option("--input", help="Sequences to classify (any format).")],
            out: Annotated[Path, typer.Option("--out", help="Predictions CSV: id, predicted class, probabilities.")],
            label: LabelOpt = None, id_column: IdOpt = None, time_col: TimeOpt = None, fill: FillOpt = None,
            image_labels: ImageLabelsOpt = None, *, opts: RunOptions) -> None:
    """Predict the class of every sequence in --input; one CSV row per sequence with class probabilities.
    A model trained on images reads --input as images in its training order (and permutation)."""
    from ..data.sequences import label_name
    from ..tasks.classify import Classifier

    model = Classifier.load(run_dir)
    data = read_set(input_path, None, "test", "--input", label, id_column, time_col, fill or model.cfg.data.fill,
                    model.cfg.data, image_labels)
    proba = model.predict_proba(data)
    pred = proba.argmax(1)
    header = ["id", "predicted"] + [f"p_{c}" for c in model.classes]
    rows = [[sid, model.classes[k]] + [round(float(v), 6) for v in p] for sid, k, p in zip(data.ids, pred, proba)]
    write_csv(out, header, rows)
    result: dict[str, Any] = {"predictions_csv": str(out), "n": len(rows)}
    if data.labels is not None and {label_name(y) for y in data.labels} <= set(model.classes):
        result["accuracy"] = float(sum(model.classes[k] == label_name(y) for k, y in zip(pred, data.labels))
                                   / len(rows))
    opts.emit(result)
