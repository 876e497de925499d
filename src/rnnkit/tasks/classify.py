"""Sequence classification: a recurrent encoder, a many-to-one pooling head and cross-entropy.

Unequal lengths are batched with zero padding plus ``lengths``: the encoder stops each sequence's state
at its last valid step and the pooling (last / mean / attention, see :class:`Pool`) only sees valid
steps, so padding never changes a prediction. Class weights
:math:`w_k = N / (K n_k)` ("balanced") counter imbalance in the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.images import ImageAugment, ImageSteps, pixel_permutation, training_inputs
from ..data.sequences import SequenceSet, label_name, pad
from ..data.series import Scaler, SeriesError
from ..metrics.classification import classification_metrics
from ..train import TrainerConfig
from .base import fit, load_trained, load_weights, pyplot, sample_trainer, save_figure, save_trained
from .classify_auto import AutoClassifySettings, choose_model, ensemble_size, final_steps
from .encoders import Pool
from .lstm_fcn import LSTMFCN, LSTMFCNConfig, Reader

TASK = "classify"


@dataclass(frozen=True)
class ClassifyModelConfig(LSTMFCNConfig):
    """Model settings (``[model]``).

    Args:
        kind: "recurrent" (encoder + pooling), "lstm_fcn" (:class:`~rnnkit.tasks.lstm_fcn.LSTMFCN`) or
            "auto" (chosen by cross-validation on the training set, see ``[auto]``; the saved config holds
            the choice).
        cell, hidden, layers, dropout, ...: the recurrent encoder, or LSTM-FCN's recurrent branch
            (:class:`SeriesModelOptions`).
        shuffle, squeeze_excite, branch_dropout: LSTM-FCN's options (:class:`LSTMFCNConfig`).
        reader, stride: how the recurrent encoder reads long series ("fold" / "dilate" with stride k; the
            plain classifier then pools the final state).
        bidirectional: read each sequence both ways (recurrent, full reading).
        pool: "last" (final state at the last valid step), "mean" or "attention".
        ensemble: networks trained (seeds ``trainer.seed``, +1, ...) whose class probabilities are averaged
            (:class:`Ensemble`); ``kind = "auto"`` sets it from ``auto.ensemble``.
    """

    kind: Literal["auto", "recurrent", "lstm_fcn"] = "auto"
    bidirectional: bool = False
    pool: Literal["last", "mean", "attention"] = "last"
    ensemble: int = 1

    def __post_init__(self) -> None:
        if self.ensemble < 1:
            raise SeriesError(f"model.ensemble: expected an int >= 1, got {self.ensemble!r}")


@dataclass(frozen=True)
class ClassifyDataConfig:
    """Data settings (``[data]``).

    Args:
        scaler: per-channel scaling fit on the training steps ("standard", "minmax", "robust", "none").
        class_weights: "none" or "balanced" (inverse class frequency in the loss).
        val_fraction: hold out this stratified fraction of the training set to pick the best epoch
            (by validation accuracy); 0 keeps the final weights.
        max_len: truncate longer sequences to this many steps (None = keep all).
        downsample: average non-overlapping blocks of this many steps (1 = off); shortens long series
            (e.g. 251 -> 63 steps with 4) so gradients travel fewer steps.
        jitter, scale, warp: training-time augmentation strengths (0 = off; :func:`rnnkit.data.sequences.augment`):
            additive noise, a random gain per sequence and channel, a smooth random gain over time.
            In scaled units; they regularise small training sets (ArrowHead: 36 sequences).
        fill: missing-value policy inside sequences.
        read: the inputs are images read as sequences in this order ("rows", "columns" or "pixels";
            :mod:`rnnkit.data.images`); None for series.
        permute_seed: images read by pixels: reorder the pixels by the fixed random permutation of this
            seed (the permuted-pixel benchmark).
    """

    scaler: Literal["standard", "minmax", "robust", "none"] = "standard"
    class_weights: Literal["none", "balanced"] = "none"
    val_fraction: float = 0.0
    max_len: int | None = None
    downsample: int = 1
    jitter: float = 0.0
    scale: float = 0.0
    warp: float = 0.0
    fill: str | None = None
    read: Literal["rows", "columns", "pixels"] | None = None
    permute_seed: int | None = None


@dataclass(frozen=True)
class ClassifyConfig:
    model: ClassifyModelConfig = field(default_factory=ClassifyModelConfig)
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    auto: AutoClassifySettings = field(default_factory=AutoClassifySettings)
    image_augment: ImageAugment = field(default_factory=ImageAugment)
    trainer: TrainerConfig = field(default_factory=lambda: sample_trainer(epochs=100, batch_size=32))


class SequenceClassifier(nn.Module):
    """Encoder + pooling + linear layer: (B, T, C) padded inputs with (B,) lengths -> (B, K) logits."""

    def __init__(self, n_channels: int, n_classes: int, cfg: ClassifyModelConfig) -> None:
        super().__init__()
        directions = 2 if cfg.bidirectional else 1
        self.reader = Reader(cfg.reader, cfg.stride) if cfg.reader != "full" else None
        if self.reader is not None and (cfg.pool != "last" or cfg.bidirectional):
            raise SeriesError(f"model.reader {cfg.reader!r}: pools the final state of a forward reading; needs "
                              f"model.pool 'last' and no bidirectional, got pool {cfg.pool!r}")
        self.encoder = cfg.build_encoder(n_channels if self.reader is None else self.reader.input_size(n_channels),
                                         cfg.bidirectional)
        self.pool = Pool(cfg.pool, cfg.hidden * directions, directions)
        self.head = nn.Linear(cfg.hidden * directions, n_classes)

    def embed(self, x: Tensor, lengths: Tensor) -> Tensor:
        """The pooled encoding (B, D*H) that the head classifies."""
        if self.reader is not None:
            return self.reader(self.encoder, x, lengths)
        if torch.compiler.is_exporting():  # traced for ONNX: lengths are a graph input, the mask is exact
            out, state = self.encoder(x, lengths=lengths)
            return self.pool(out, state, lengths)
        T = int(lengths.max())
        # equal lengths need no masking (same numbers, and the fused kernels run without it)
        out, state = self.encoder(x[:, :T], lengths=None if int(lengths.min()) == T else lengths)
        return self.pool(out, state, lengths)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        return self.head(self.embed(x, lengths))


class ClassifyTask:
    """Cross-entropy (optionally class-weighted) for the trainer, on augmented inputs while training: image
    inputs are first distorted (``images``, see :class:`~rnnkit.data.images.ImageAugment`), then every input
    gets :func:`rnnkit.data.sequences.augment`."""

    def __init__(self, weights: Tensor | None = None, augmentation: dict[str, float] | None = None,
                 images: tuple[ImageSteps, ImageAugment] | None = None) -> None:
        self.weights, self.augmentation, self.images = weights, augmentation or {}, images

    def loss(self, model: SequenceClassifier, batch: dict[str, Tensor]) -> Tensor:
        x = batch["x"]
        if model.training:
            x = training_inputs(x, batch["lengths"], self.augmentation, self.images)
        logits = model(x, batch["lengths"])
        w = None if self.weights is None else self.weights.to(logits.device)
        return F.cross_entropy(logits, batch["y"], weight=w)


# ---- data --------------------------------------------------------------------------------------
def fit_scaler(data: SequenceSet, kind: str) -> Scaler:
    return Scaler(kind).fit(np.concatenate(data.sequences, 0))


def encode_labels(labels: np.ndarray | None, classes: list[str], arg: str) -> np.ndarray:
    if labels is None:
        raise SeriesError(f"{arg}: the input has no labels; expected a label column/field")
    index = {label_name(c): i for i, c in enumerate(classes)}
    names = [label_name(v) for v in labels]
    unknown = sorted(set(names) - set(index), key=_label_key)
    if unknown:
        raise SeriesError(f"{arg}: labels {unknown[:5]} do not occur in the training set (classes {classes})")
    return np.array([index[n] for n in names], dtype=np.int64)


def class_names(labels: np.ndarray | None, arg: str = "--train") -> list[str]:
    """The sorted class names of a training set's labels (at least two)."""
    if labels is None:
        raise SeriesError(f"{arg}: the training set has no labels")
    classes = sorted({label_name(v) for v in labels}, key=_label_key)
    if len(classes) < 2:
        raise SeriesError(f"{arg}: expected at least 2 classes, got {classes}")
    return classes


def block_mean(x: np.ndarray, k: int) -> np.ndarray:
    """Average non-overlapping blocks of ``k`` steps of a (T, C) sequence (the last block may be shorter)."""
    if k <= 1:
        return x
    n = -(-len(x) // k)
    out = np.add.reduceat(x, np.arange(0, len(x), k), axis=0)
    counts = np.minimum(k, len(x) - np.arange(n) * k)[:, None]
    return out / counts


def tensors(data: SequenceSet, scaler: Scaler, max_len: int | None, downsample: int = 1) -> dict[str, Tensor]:
    if downsample < 1:
        raise SeriesError(f"data.downsample: expected an int >= 1, got {downsample}")
    seqs = [block_mean(scaler.transform(s), downsample).astype(np.float32) for s in data.sequences]
    x, lengths = pad(seqs, max_len)
    return {"x": torch.from_numpy(x), "lengths": torch.from_numpy(lengths)}


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) holding out ``fraction`` of each class (at least one when > 0)."""
    rng = np.random.default_rng(seed)
    val = []
    for k in np.unique(y):
        idx = rng.permutation(np.nonzero(y == k)[0])
        n = int(round(fraction * len(idx)))
        val.extend(idx[:min(max(n, 1), len(idx) - 1)].tolist())
    val_idx = np.array(sorted(val), dtype=np.int64)
    return np.setdiff1d(np.arange(len(y)), val_idx), val_idx


# ---- the trained model -------------------------------------------------------------------------
def build_net(cfg: ClassifyModelConfig, channels: int, n_classes: int, max_len: int) -> nn.Module:
    """The network of ``cfg.kind`` (a saved "auto", from runs that predate the choice, is the recurrent one),
    ``cfg.ensemble`` of them in an :class:`Ensemble` when more than one."""
    if cfg.ensemble > 1:
        one = replace(cfg, ensemble=1)
        return Ensemble([build_net(one, channels, n_classes, max_len) for _ in range(cfg.ensemble)])
    if cfg.kind == "lstm_fcn":
        return LSTMFCN(channels, n_classes, cfg, max_len)
    return SequenceClassifier(channels, n_classes, cfg)


class Ensemble(nn.Module):
    """Classifiers trained apart, used together: the log of their mean class probabilities (a softmax of it
    gives that mean), and their embeddings side by side."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        p = torch.stack([torch.softmax(m(x, lengths), -1) for m in self.members]).mean(0)
        return torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))

    def embed(self, x: Tensor, lengths: Tensor) -> Tensor:
        return torch.cat([m.embed(x, lengths) for m in self.members], -1)


class Classifier:
    """A trained classifier with its scaler and class names."""

    def __init__(self, cfg: ClassifyConfig, net: nn.Module, scaler: Scaler, classes: list[str],
                 meta: dict[str, Any]) -> None:
        self.cfg, self.net, self.scaler, self.classes, self.meta = cfg, net, scaler, classes, meta

    @torch.no_grad()
    def predict_proba(self, data: SequenceSet, batch_size: int = 256) -> np.ndarray:
        """(N, K) class probabilities."""
        if data.n_channels != self.meta["channels"]:
            raise SeriesError(f"input: {data.n_channels} channel(s), the model was trained on "
                              f"{self.meta['channels']}")
        t = tensors(data, self.scaler, self.cfg.data.max_len, self.cfg.data.downsample)
        out = []
        for i in range(0, len(data), batch_size):
            out.append(torch.softmax(self.net(t["x"][i:i + batch_size], t["lengths"][i:i + batch_size]), -1))
        return torch.cat(out).numpy()

    @torch.no_grad()
    def embed(self, data: SequenceSet, batch_size: int = 256) -> np.ndarray:
        """(N, D*H) pooled encodings."""
        t = tensors(data, self.scaler, self.cfg.data.max_len, self.cfg.data.downsample)
        return torch.cat([self.net.embed(t["x"][i:i + batch_size], t["lengths"][i:i + batch_size])
                          for i in range(0, len(data), batch_size)]).numpy()

    def evaluate(self, data: SequenceSet, arg: str = "--test") -> dict[str, Any]:
        y = encode_labels(data.labels, self.classes, arg)
        p = self.predict_proba(data).argmax(1)
        return classification_metrics(y, p, len(self.classes))

    def save(self, run_dir: Path) -> None:
        save_trained(run_dir, self.net, self.meta, self.cfg, classes=self.classes, scaler=self.scaler.state())

    @classmethod
    def load(cls, run_dir: str | Path) -> Classifier:
        meta, cfg = load_trained(run_dir, TASK, ClassifyConfig)
        net = build_net(cfg.model, meta["channels"], len(meta["classes"]), meta.get("input_len", 0))
        classes = [label_name(c) for c in meta["classes"]]  # (runs before whole-number labels were kept whole)
        return cls(cfg, load_weights(run_dir, net), Scaler.from_state(meta["scaler"]), classes, meta)


def train(train_set: SequenceSet, cfg: ClassifyConfig, run_dir: str | Path | None, *, resume: bool = False,
          quiet: bool = True) -> Classifier:
    """Train a classifier; with ``data.val_fraction`` > 0 the weights of the best validation accuracy are kept."""
    from ..train import replace_config

    d = cfg.data
    classes = class_names(train_set.labels)
    if not 0 <= d.val_fraction < 1:
        raise SeriesError(f"data.val_fraction: expected a fraction in [0, 1), got {d.val_fraction}")
    for key in ("jitter", "scale", "warp"):
        if not 0 <= getattr(d, key) < 10:
            raise SeriesError(f"data.{key}: expected an augmentation strength in [0, 10), got {getattr(d, key)}")
    y = encode_labels(train_set.labels, classes, "--train")
    scaler = fit_scaler(train_set, d.scaler)
    data = {**tensors(train_set, scaler, d.max_len, d.downsample), "y": torch.from_numpy(y)}
    evaluate, tcfg = None, cfg.trainer
    if d.val_fraction > 0:
        tr, va = stratified_split(y, d.val_fraction, cfg.trainer.seed)
        val = {k: v[va] for k, v in data.items()}
        data = {k: v[tr] for k, v in data.items()}

        def evaluate(model: nn.Module) -> dict[str, float]:
            dev = next(model.parameters()).device
            logits = model(val["x"].to(dev), val["lengths"].to(dev))
            return {"val_accuracy": float((logits.argmax(1).cpu() == val["y"]).float().mean()),
                    "val_loss": float(F.cross_entropy(logits.cpu(), val["y"]))}

        if tcfg.metric == "loss":
            tcfg = replace_config(tcfg, metric="val_accuracy", metric_mode="max",
                                  eval_every=tcfg.eval_every or max(1, len(tr) // tcfg.batch_size))
    weights = balanced_weights(data["y"].numpy(), len(classes)) if d.class_weights == "balanced" else None
    task = ClassifyTask(weights, {"jitter": d.jitter, "scale": d.scale, "warp": d.warp},
                        image_steps(train_set, cfg, scaler))
    T = int(data["x"].shape[1])
    choice = None
    if cfg.model.kind == "auto":
        def build(kind: str) -> nn.Module:
            return build_net(replace_config(cfg.model, kind=kind), train_set.n_channels, len(classes), T)

        choice = choose_model(build, task, data, cfg.trainer, cfg.auto)
        cfg = replace_config(cfg, **{"model.kind": choice["chosen"]})
        t, default = cfg.trainer, ClassifyConfig().trainer
        networks = cfg.auto.ensemble if t.minutes is None else 1  # a time budget is the whole run's
        if (t.steps, t.epochs, t.minutes) == (default.steps, default.epochs, default.minutes):
            # the default budget: auto.final_steps with a cosine decay for each network, as many networks
            # (up to auto.ensemble) as fit in auto.final_minutes, fewer steps if not even one does
            per_epoch = -(-len(data["y"]) // t.batch_size)
            pace = choice["candidates"][choice["chosen"]]["seconds_per_step"]
            steps, why = final_steps(cfg.auto, (t.epochs or 0) * per_epoch, pace)
            networks = ensemble_size(cfg.auto, steps, pace)
            choice["final"] = {"steps": steps, "schedule": "cosine", "networks": networks, "why": why}
            over = {"steps": steps, "epochs": None, "schedule.name": "cosine"}
            cfg = replace_config(cfg, **{f"trainer.{k}": v for k, v in over.items()})
            tcfg = replace_config(tcfg, **over)
        cfg = replace_config(cfg, **{"model.ensemble": networks})
    K = cfg.model.ensemble
    nets, results = [], []
    for k in range(K):  # network k trains with seed + k, in run_dir (k = 0) or run_dir/member<k>
        seed = cfg.trainer.seed + k
        torch.manual_seed(seed)
        nets.append(build_net(replace_config(cfg.model, ensemble=1), train_set.n_channels, len(classes), T))
        where = run_dir if (k == 0 or run_dir is None) else Path(run_dir) / f"member{k}"
        results.append(fit(nets[k], task, data, replace_config(tcfg, seed=seed), where, evaluate=evaluate,
                           full_config=cfg, resume=resume, quiet=quiet))
    net = nets[0] if K == 1 else Ensemble(nets)
    meta = {"task": TASK, "channels": train_set.n_channels, "n_train": len(train_set),
            "max_train_len": int(train_set.lengths.max()), "input_len": T, "choice": choice,
            "train": {k: v for k, v in results[0].items() if isinstance(v, (int, float, str))
                      and k != "stop_reason"}}
    model = Classifier(cfg, net, scaler, classes, meta)
    if run_dir is not None:
        model.save(Path(run_dir))
    return model


def image_steps(data: SequenceSet, cfg: ClassifyConfig, scaler: Scaler) -> tuple[ImageSteps, ImageAugment] | None:
    """The image distortion of training (``[image_augment]``) when the inputs are images of one size read
    as sequences and it is enabled; else None."""
    d, aug = cfg.data, cfg.image_augment
    if d.read is None or data.image_shape is None or not aug.enabled:
        return None
    aug.check()
    if d.downsample != 1 or (d.max_len is not None and d.max_len < int(data.lengths.max())):
        raise SeriesError(f"image_augment: distorting images needs every step of them (data.downsample 1, no "
                          f"data.max_len), got downsample {d.downsample}, max_len {d.max_len}; or set "
                          "image_augment.enabled=false")
    perm = None if d.permute_seed is None else pixel_permutation(int(np.prod(data.image_shape)), d.permute_seed)
    return ImageSteps(scaler.center, scaler.scale, d.read, data.image_shape, perm), aug


def balanced_weights(y: np.ndarray, n_classes: int) -> Tensor:
    """Class weights :math:`w_k = N / (K n_k)` (classes absent from ``y`` get weight N / K)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return torch.tensor(len(y) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


def _label_key(s: str) -> tuple[int, float | str]:
    """Numeric labels sort numerically ('2' < '10'), others alphabetically after them."""
    try:
        return (0, float(s))
    except ValueError:
        return (1, s)


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str = "confusion matrix") -> Path:
    """Confusion matrix (rows true, columns predicted) with counts, as PNG."""
    plt = pyplot()
    cm = np.asarray(cm)
    K = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * K + 2, 1.0 + 0.5 * K + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(K), classes, rotation=45, ha="right")
    ax.set_yticks(range(K), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(K):
        for j in range(K):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    ax.set_title(title)
    return save_figure(fig, path)


def format_confusion(cm: np.ndarray, classes: list[str]) -> str:
    """The confusion matrix as aligned text (rows true, columns predicted)."""
    w = max(5, *(len(c) for c in classes), *(len(str(v)) for v in np.asarray(cm).ravel()))
    lines = ["true\\pred".ljust(w) + " " + " ".join(c.rjust(w) for c in classes)]
    for c, row in zip(classes, np.asarray(cm)):
        lines.append(c.ljust(w) + " " + " ".join(str(v).rjust(w) for v in row))
    return "\n".join(lines)
