"""Sequence embeddings: encode each sequence to a vector, cluster with k-means, project to 2-D.

Encoders: a trained classifier's pooled encoding (``rnnkit classify train`` run), or a sequence
autoencoder trained here: an encoder reads the sequence (with its length) and its final state seeds a
decoder that reconstructs the sequence in reverse order (teacher-forced, Srivastava et al. 2015 /
Malhotra et al. 2016); the embedding is the encoder's final hidden state.

Clustering: k-means (k-means++ seeding, Lloyd iterations) and the silhouette
:math:`s_i = (b_i - a_i) / \\max(a_i, b_i)` averaged over points, in plain NumPy. Projection: the first two
principal components.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.sequences import SequenceSet
from ..data.series import Scaler, SeriesError
from ..train import TrainerConfig
from . import encoders
from .base import fit, load_trained, load_weights, pyplot, sample_trainer, save_figure, save_trained
from .classify import tensors
from .encoders import SeriesModelOptions

TASK = "embed"


@dataclass(frozen=True)
class EmbedModelConfig(SeriesModelOptions):
    """Autoencoder settings (``[model]``): the recurrent encoder/decoder (see :class:`SeriesModelOptions`)."""

    hidden: int = 32


@dataclass(frozen=True)
class EmbedConfig:
    model: EmbedModelConfig = field(default_factory=EmbedModelConfig)
    scaler: str = "standard"
    trainer: TrainerConfig = field(default_factory=lambda: sample_trainer(epochs=30, batch_size=32))


class SequenceAutoencoder(encoders.SequenceAutoencoder):
    """The autoencoder of this task: its decoder starts from a zero input (Srivastava et al. 2015)."""

    def __init__(self, channels: int, cfg: EmbedModelConfig) -> None:
        super().__init__(channels, cfg, start="zeros")


class EmbedTask:
    def loss(self, model: SequenceAutoencoder, batch: dict[str, Tensor]) -> Tensor:
        return model.loss(batch["x"], batch["lengths"])


class Embedder:
    """A trained sequence autoencoder with its scaler."""

    def __init__(self, cfg: EmbedConfig, net: SequenceAutoencoder, scaler: Scaler, meta: dict[str, Any]) -> None:
        self.cfg, self.net, self.scaler, self.meta = cfg, net, scaler, meta

    @torch.no_grad()
    def embed(self, data: SequenceSet, batch_size: int = 256) -> np.ndarray:
        if data.n_channels != self.meta["channels"]:
            raise SeriesError(f"--input: {data.n_channels} channel(s), the encoder was trained on "
                              f"{self.meta['channels']}")
        t = tensors(data, self.scaler, None)
        return torch.cat([self.net.embed(t["x"][i:i + batch_size], t["lengths"][i:i + batch_size])
                          for i in range(0, len(data), batch_size)]).numpy()

    def save(self, run_dir: Path) -> None:
        save_trained(run_dir, self.net, self.meta, self.cfg, scaler=self.scaler.state())

    @classmethod
    def load(cls, run_dir: str | Path) -> Embedder:
        meta, cfg = load_trained(run_dir, TASK, EmbedConfig)
        net = SequenceAutoencoder(meta["channels"], cfg.model)
        return cls(cfg, load_weights(run_dir, net), Scaler.from_state(meta["scaler"]), meta)


def train(data: SequenceSet, cfg: EmbedConfig, run_dir: str | Path | None, *, resume: bool = False,
          quiet: bool = True) -> Embedder:
    """Train a sequence autoencoder on ``data`` (labels unused)."""
    scaler = Scaler(cfg.scaler).fit(np.concatenate(data.sequences, 0))
    batch = tensors(data, scaler, None)
    torch.manual_seed(cfg.trainer.seed)
    net = SequenceAutoencoder(data.n_channels, cfg.model)
    result = fit(net, EmbedTask(), batch, cfg.trainer, run_dir, full_config=cfg, resume=resume, quiet=quiet)
    meta = {"task": TASK, "channels": data.n_channels, "n_train": len(data),
            "train": {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}
    emb = Embedder(cfg, net, scaler, meta)
    if run_dir is not None:
        emb.save(Path(run_dir))
    return emb


def encode(data: SequenceSet, run_dir: str | Path) -> tuple[np.ndarray, str]:
    """Embeddings (N, D) of ``data`` from a trained ``classify`` or ``embed`` run, and the kind used."""
    import json

    from .base import META_FILE
    from .classify import Classifier

    meta_path = Path(run_dir) / META_FILE
    if not meta_path.is_file():
        raise SeriesError(f"--model: {str(run_dir)!r} has no model.json; expected a `rnnkit classify train` or "
                          "`rnnkit embed` run directory")
    kind = json.loads(meta_path.read_text()).get("task")
    if kind == "classify":
        model = Classifier.load(run_dir)
        if data.n_channels != model.meta["channels"]:
            raise SeriesError(f"--input: {data.n_channels} channel(s), the classifier was trained on "
                              f"{model.meta['channels']}")
        return model.embed(data), "classifier"
    if kind == TASK:
        return Embedder.load(run_dir).embed(data), "autoencoder"
    raise SeriesError(f"--model: {str(run_dir)!r} holds a {kind!r} model; expected 'classify' or 'embed'")


# ---- clustering and projection -----------------------------------------------------------------
def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 100, restarts: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """k-means with k-means++ seeding; the best of ``restarts`` runs by inertia. Returns (labels, centres)."""
    x = np.asarray(x, float)
    if not 1 <= k <= len(x):
        raise SeriesError(f"--clusters: expected 1 <= k <= {len(x)} (the number of sequences), got {k}")
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(restarts):
        c = [x[rng.integers(len(x))]]
        for _ in range(k - 1):
            d2 = np.min(((x[:, None] - np.array(c)[None]) ** 2).sum(-1), 1)
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1 / len(x))
            c.append(x[rng.choice(len(x), p=p)])
        centres = np.array(c)
        for _ in range(iters):
            lab = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
            new = np.array([x[lab == j].mean(0) if (lab == j).any() else centres[j] for j in range(k)])
            if np.allclose(new, centres):
                break
            centres = new
        lab = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        inertia = float(((x - centres[lab]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, lab, centres)
    return best[1], best[2]


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette coefficient (Euclidean); points in singleton clusters count 0. NaN for < 2 clusters."""
    x = np.asarray(x, float)
    labels = np.asarray(labels)
    ks = np.unique(labels)
    if len(ks) < 2:
        return float("nan")
    d = np.sqrt(np.maximum(((x[:, None] - x[None]) ** 2).sum(-1), 0.0))
    s = np.zeros(len(x))
    for i in range(len(x)):
        own = labels == labels[i]
        if own.sum() <= 1:
            continue
        a = d[i, own].sum() / (own.sum() - 1)
        b = min(d[i, labels == k].mean() for k in ks if k != labels[i])
        s[i] = (b - a) / max(a, b) if max(a, b) > 0 else 0.0
    return float(s.mean())


def purity(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of points whose cluster's majority label is their own label."""
    total = 0
    for k in np.unique(clusters):
        _, counts = np.unique(np.asarray(labels)[clusters == k], return_counts=True)
        total += counts.max()
    return float(total / len(clusters))


def pca2(x: np.ndarray) -> np.ndarray:
    """Projection (N, 2) on the first two principal components (zeros if the dimension is 1)."""
    z = np.asarray(x, float) - np.mean(x, 0)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    p = z @ vt[:2].T
    return p if p.shape[1] == 2 else np.concatenate([p, np.zeros((len(p), 1))], 1)


def plot_projection(p: np.ndarray, clusters: np.ndarray, path: Path, labels: np.ndarray | None = None) -> Path:
    """2-D projection coloured by cluster (and, in a second panel, by label)."""
    plt = pyplot()
    n = 2 if labels is not None else 1
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4.2), squeeze=False)
    panels = [("cluster", clusters)] + ([("label", labels)] if labels is not None else [])
    for ax, (name, c) in zip(axes[0], panels):
        for j, k in enumerate(sorted(set(c.tolist()), key=str)):
            m = c == k
            ax.scatter(p[m, 0], p[m, 1], s=12, color=f"C{j % 10}", label=str(k))
        ax.set_title(f"PCA of embeddings, by {name}")
        if len(set(c.tolist())) <= 12:
            ax.legend(fontsize=7, markerscale=1.5)
    return save_figure(fig, path)
