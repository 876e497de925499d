"""``rnnkit embed``: encode sequences to vectors, cluster them and plot a 2-D projection."""

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from .classify import DatasetOpt, IdOpt, LabelOpt, TimeOpt, read_set
from .common import RunOptions, run_command
from .forecast import FillOpt, ts_config, write_csv

NAME = "embed"
app = typer.Typer(help="Sequence embeddings: encode, cluster (k-means, silhouette), project to 2-D.",
                  no_args_is_help=False, invoke_without_command=True)


@app.callback(invoke_without_command=True)
@run_command(NAME)
def embed(input_path: Annotated[Path | None, typer.Option("--input", help="Sequences (any classify format).")]
          = None, dataset: DatasetOpt = None,
          split: Annotated[str, typer.Option("--split", help="With --dataset: train or test.")] = "train",
          model: Annotated[Path | None, typer.Option("--model", help="Encoder: a `classify train` or `embed` run "
                                                     "directory (default: train a sequence autoencoder).")] = None,
          clusters: Annotated[int, typer.Option("--clusters", help="k of k-means.")] = 3,
          cell: Annotated[str | None, typer.Option("--cell", help="Autoencoder cell.")] = None,
          hidden: Annotated[int | None, typer.Option("--hidden", help="Autoencoder hidden units.")] = None,
          label: LabelOpt = None, id_column: IdOpt = None, time_col: TimeOpt = None, fill: FillOpt = None, *,
          opts: RunOptions) -> None:
    """Write embeddings (CSV and .npy), k-means clusters with the silhouette, and a projection PNG to --out."""
    from ..tasks import embed as E

    data = read_set(input_path, dataset, split, "--input", label, id_column, time_col, fill)
    out = opts.run_dir
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"out": str(out), "n": len(data)}
    if model is not None:
        vecs, kind = E.encode(data, model)
    else:
        cfg = ts_config(opts, E.EmbedConfig, {"model.cell": cell, "model.hidden": hidden})
        opts.info(f"training a sequence autoencoder on {len(data)} sequences -> {out}")
        emb = E.train(data, cfg, out, resume=opts.resume, quiet=opts.quiet)
        vecs, kind = emb.embed(data), "autoencoder"
        result.update({"train_" + k: v for k, v in emb.meta["train"].items() if k in ("train_loss", "step")})
    seed = opts.seed or 0
    lab, _ = E.kmeans(vecs, clusters, seed=seed)
    result.update(encoder=kind, dim=int(vecs.shape[1]), clusters=clusters, silhouette=E.silhouette(vecs, lab))
    if data.labels is not None:
        result["purity"] = E.purity(lab, data.labels)
    np.save(out / "embeddings.npy", vecs.astype(np.float32))
    header = ["id"] + (["label"] if data.labels is not None else []) + ["cluster"] + \
        [f"e{j}" for j in range(vecs.shape[1])]
    rows = [[sid] + ([str(data.labels[i])] if data.labels is not None else []) + [int(lab[i])] +
            [round(float(v), 6) for v in vecs[i]] for i, sid in enumerate(data.ids)]
    result["embeddings_csv"] = str(write_csv(out / "embeddings.csv", header, rows))
    result["plot"] = str(E.plot_projection(E.pca2(vecs), lab, out / "projection.png", data.labels))
    opts.emit(result)
