r"""Sequence labelling with CTC: a recurrent stack reads a sequence and emits its label string, unaligned.

Model: a (bidirectional, multi-layer) stack of any registered cell, then a linear layer to the K label
symbols plus the blank and a log-softmax per step; the loss is ``torch.nn.functional.ctc_loss`` with each
sequence's input length and label length (mean over the batch of the per-label-symbol loss). Decoding
and the character n-gram model are in :mod:`rnnkit.tasks.decoding`; the metrics (character and word
error rate, sequence accuracy) in :mod:`rnnkit.metrics.text`.

Inputs (:func:`read_label_set`):

* a folder with a ``labels.tsv`` (``file<TAB>label`` per line) whose files are PNG images of text lines
  of one height (read column by column: T = width, one feature per pixel row), CSV files (one row per
  step, one numeric column per feature; a header row is allowed) or ``.npy`` arrays (T, C);
* an ``.npz`` with ``X`` (N, T, C), optionally ``lengths`` (N,) and ``labels`` (N,) strings; or a label
  file ``index<TAB>label`` (index 0..N-1);
* the built-in handwritten digit strings (:func:`rnnkit.data.images.digit_strings`).

The alphabet is the set of characters of the training labels (sorted; index 0 is the blank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.images import (
    DIGIT_STRINGS,
    ImageAugment,
    ImageSteps,
    digit_strings,
    read_labels_tsv,
    read_png,
    to_sequence,
    training_inputs,
)
from ..data.sequences import pad
from ..data.series import Scaler, read_table
from ..errors import UserError
from ..metrics.text import text_metrics
from ..train import TrainerConfig
from .base import fit, load_trained, load_weights, open_run_dir, pyplot, sample_trainer, save_figure, save_trained
from .decoding import CTC_BLANK, CharNGram, ctc_beam_search, ctc_min_steps, greedy_ctc
from .encoders import SeriesModelOptions

TASK = "label"
LABELS_FILE = "train_labels.txt"


@dataclass(frozen=True)
class LabelModelConfig(SeriesModelOptions):
    """Model settings (``[model]``).

    Args:
        cell, hidden, layers, dropout, ...: the recurrent stack (:class:`SeriesModelOptions`).
        bidirectional: read each sequence both ways.
    """

    hidden: int = 128
    layers: int = 2
    dropout: float = 0.25
    bidirectional: bool = True


@dataclass(frozen=True)
class LabelDataConfig:
    """Data settings (``[data]``).

    Args:
        scaler: per-feature scaling fit on the training steps ("standard", "minmax", "robust", "none").
        stack: concatenate this many consecutive steps into one (T -> ceil(T / stack) steps of
            stack * C features; the last one zero-padded); shortens what the recurrence runs through.
        val_fraction: hold out this fraction of the training set to keep the weights of the best
            validation CER (greedy decoding); 0 keeps the final weights.
        jitter, scale: training-time augmentation (:func:`rnnkit.data.sequences.augment`, in scaled units):
            additive Gaussian noise of this std, a random gain N(1, s^2) per sequence and feature.
    """

    scaler: Literal["standard", "minmax", "robust", "none"] = "standard"
    stack: int = 3
    val_fraction: float = 0.05
    jitter: float = 0.1
    scale: float = 0.1


@dataclass(frozen=True)
class DecodeConfig:
    """Decoding settings (``[decode]``) used by eval and predict.

    Args:
        decoder: "greedy" (best path) or "beam" (prefix beam search).
        beam_width: prefixes kept per step.
        lm_order: order of the character n-gram model estimated from the training labels (0 = none).
        lm_weight, length_bonus: :math:`\\alpha` and :math:`\\beta` of the beam score.
    """

    decoder: Literal["greedy", "beam"] = "beam"
    beam_width: int = 16
    lm_order: int = 0
    lm_weight: float = 0.5
    length_bonus: float = 0.0


@dataclass(frozen=True)
class LabelConfig:
    model: LabelModelConfig = field(default_factory=LabelModelConfig)
    data: LabelDataConfig = field(default_factory=LabelDataConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    image_augment: ImageAugment = field(default_factory=lambda: ImageAugment(  # for text lines
        rotate=3.0, shear=0.3, scale=0.1, elastic=0.5, elastic_sigma=2.0, thickness=0.5))
    trainer: TrainerConfig = field(default_factory=lambda: sample_trainer(epochs=30, batch_size=32))


class CTCModel(nn.Module):
    """Recurrent stack + linear layer + log-softmax: (B, T, C) with (B,) lengths -> (B, T, K+1) log probs."""

    def __init__(self, n_features: int, n_symbols: int, cfg: LabelModelConfig) -> None:
        super().__init__()
        self.encoder = cfg.build_encoder(n_features, cfg.bidirectional)
        self.head = nn.Linear(cfg.hidden * (2 if cfg.bidirectional else 1), n_symbols + 1)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        if torch.compiler.is_exporting():  # traced for ONNX: lengths are a graph input, the mask is exact
            out, _ = self.encoder(x, lengths=lengths)
            return torch.log_softmax(self.head(out), dim=-1)
        T = int(lengths.max())
        # equal lengths need no masking (same numbers, and the fused kernels run without it)
        out, _ = self.encoder(x[:, :T], lengths=None if int(lengths.min()) == T else lengths)
        return torch.log_softmax(self.head(out), dim=-1)  # (B, T, K+1)


class CTCTask:
    """The CTC loss for the trainer (mean over the batch of the loss divided by each label's length), on
    augmented inputs while training: image inputs are first distorted (``images``, see
    :class:`~rnnkit.data.images.ImageAugment`), then every input gets :func:`rnnkit.data.sequences.augment`."""

    def __init__(self, augmentation: dict[str, float] | None = None,
                 images: tuple[ImageSteps, ImageAugment] | None = None) -> None:
        self.augmentation, self.images = augmentation or {}, images

    def loss(self, model: CTCModel, batch: dict[str, Tensor]) -> Tensor:
        x = batch["x"]
        if model.training:
            x = training_inputs(x, batch["lengths"], self.augmentation, self.images, batch["columns"])
        logp = model(x, batch["lengths"])
        return F.ctc_loss(logp.transpose(0, 1), batch["targets"], batch["lengths"], batch["target_lengths"],
                          blank=CTC_BLANK, reduction="mean")


# ---- data --------------------------------------------------------------------------------------
@dataclass
class LabelSet:
    """N feature sequences (T_i, C) with their label strings (None when unlabelled) and where each came from;
    ``images``: the sequences are images read column by column (one feature per pixel row)."""

    sequences: list[np.ndarray]
    labels: list[str] | None
    ids: list[str]
    source: str
    images: bool = False

    def __len__(self) -> int:
        return len(self.sequences)

    def where(self, i: int) -> str:
        """The file (and sample) of sequence ``i``, for error messages."""
        return f"{self.source} sample {self.ids[i]!r}"

    @property
    def n_features(self) -> int:
        return self.sequences[0].shape[1]


def _read_step_file(path: Path, name: str) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".png":
        return to_sequence(read_png(path, name), "columns")
    if not path.is_file():
        raise UserError(f"{name}: file not found: {str(path)!r}")
    if suffix == ".npy":
        try:
            a = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UserError(f"{name}: {path} is not a readable .npy file ({e})") from e
        a = np.asarray(a, dtype=np.float64)
        if a.ndim not in (1, 2):
            raise UserError(f"{name}: {path} holds shape {a.shape}; expected a sequence (T, C)")
        return a.reshape(len(a), -1)
    if suffix == ".csv":
        table = read_table(path, name)
        bad = [c for c, v in table.items() if v.dtype.kind != "f"]
        if bad:
            raise UserError(f"{name}: {path} column {bad[0]!r} is not numeric; expected one row per step and "
                            "one numeric column per feature")
        return np.stack(list(table.values()), axis=1).astype(np.float64)
    raise UserError(f"{name}: {path}: unsupported file type {suffix!r}; expected .png, .csv or .npy")


def read_label_set(source: str | Path, labels: str | Path | None = None, name: str = "--train",
                   require_labels: bool = True, split: str = "train") -> LabelSet:
    """Read labelled sequences (see the module docstring); ``source`` may be ``"digit-strings"`` (the
    built-in lines of ``split``)."""
    if str(source) == DIGIT_STRINGS:
        data = digit_strings(split)
        return LabelSet([to_sequence(im, "columns") for im in data.images], list(data.labels), data.ids,
                        DIGIT_STRINGS, images=True)
    path = Path(source)
    if path.is_dir():
        label_path = Path(labels) if labels is not None else path / "labels.tsv"
        if not require_labels and labels is None and not label_path.is_file():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".csv", ".npy"))
            if not files:
                raise UserError(f"{name}: {path} has no .png, .csv or .npy files")
            pairs = [(p.name, None) for p in files]
        else:
            pairs = read_labels_tsv(label_path, name)
        seqs = [_read_step_file(path / f, name) for f, _ in pairs]
        ids = [f for f, _ in pairs]
        heights = {s.shape[1] for s in seqs}
        if len(heights) != 1:
            odd = next(i for i, s in enumerate(seqs) if s.shape[1] != seqs[0].shape[1])
            what = "height" if ids[0].lower().endswith(".png") else "number of features"
            raise UserError(f"{name}: {path / ids[odd]} has {what} {seqs[odd].shape[1]}, {ids[0]} has "
                            f"{seqs[0].shape[1]}; every sequence of a set needs one {what}")
        labs = [lab for _, lab in pairs]
        png = [f.lower().endswith(".png") for f in ids]
        return LabelSet(seqs, None if labs[0] is None else labs, ids, str(path), images=all(png))
    if path.suffix.lower() != ".npz":
        raise UserError(f"{name}: {str(path)!r} is neither a folder nor an .npz file (nor {DIGIT_STRINGS!r})")
    if not path.is_file():
        raise UserError(f"{name}: file not found: {str(path)!r}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "X" not in z.files:
                raise UserError(f"{name}: {path} has arrays {z.files}; expected 'X' (N, T, C), optionally "
                                "'lengths' and 'labels'")
            X = np.asarray(z["X"], dtype=np.float64)
            lengths = z["lengths"] if "lengths" in z.files else None
            labs = [str(v) for v in z["labels"]] if "labels" in z.files else None
    except (ValueError, OSError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{name}: {path} is not a readable .npz file ({e})") from e
    if X.ndim == 2:
        X = X[..., None]
    if X.ndim != 3:
        raise UserError(f"{name}: {path} 'X' has shape {X.shape}; expected (N, T, C)")
    seqs = [x[:int(n)] for x, n in zip(X, lengths)] if lengths is not None else list(X)
    if labels is not None:
        table = dict(read_labels_tsv(Path(labels), name))
        missing = [str(i) for i in range(len(seqs)) if str(i) not in table]
        if missing:
            raise UserError(f"{name}: {labels} has no label for sequence index {missing[0]} of {path}")
        labs = [table[str(i)] for i in range(len(seqs))]
    if labs is not None:
        empty = [i for i, lab in enumerate(labs) if not lab.strip()]
        if empty:
            raise UserError(f"{name}: {path} sample {empty[0]}: empty label; every sequence needs a label")
    if labs is None and require_labels:
        raise UserError(f"{name}: {path} has no 'labels' array; give a label file (--labels FILE)")
    return LabelSet(seqs, labs, [str(i) for i in range(len(seqs))], str(path))


class Alphabet:
    """Label characters <-> indices 1..K (0 is the CTC blank)."""

    def __init__(self, symbols: str) -> None:
        self.symbols = symbols
        self.index = {c: i + 1 for i, c in enumerate(symbols)}

    @classmethod
    def from_labels(cls, labels: list[str]) -> Alphabet:
        return cls("".join(sorted(set("".join(labels)))))

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, data: LabelSet, arg: str) -> list[list[int]]:
        """Every label as indices; a symbol outside the alphabet is an error naming the sample."""
        if data.labels is None:
            raise UserError(f"{arg}: {data.source} has no labels; expected a labelled set")
        out = []
        for i, lab in enumerate(data.labels):
            unknown = [c for c in lab if c not in self.index]
            if unknown:
                raise UserError(f"{arg}: {data.where(i)}: label {lab!r} has symbol {unknown[0]!r}, which is not in "
                                f"the model's alphabet {self.symbols!r}")
            out.append([self.index[c] for c in lab])
        return out

    def decode(self, indices: tuple[int, ...]) -> str:
        return "".join(self.symbols[k - 1] for k in indices)


def stacked_length(T: int, stack: int) -> int:
    return -(-T // stack)


def stack_steps(x: np.ndarray, k: int) -> np.ndarray:
    """(T, C) -> (ceil(T/k), k*C): each step holds k consecutive steps (zero-padded at the end)."""
    if k == 1:
        return x
    T, C = x.shape
    out = np.zeros((stacked_length(T, k) * k, C), dtype=x.dtype)
    out[:T] = x
    return out.reshape(-1, k * C)


def check_feasible(data: LabelSet, targets: list[list[int]], stack: int, arg: str) -> None:
    """CTC needs at least :func:`min_steps` steps per label (after stacking); name the first sample
    that has fewer."""
    for i, (s, t) in enumerate(zip(data.sequences, targets)):
        need, have = ctc_min_steps(t), stacked_length(len(s), stack)
        if have < need:
            via = f" ({len(s)} before data.stack={stack})" if stack > 1 else ""
            raise UserError(f"{arg}: {data.where(i)} has {have} steps{via}, but its label {data.labels[i]!r} needs "
                            f"at least {need} (CTC: one step per symbol plus a blank between repeats)")


def tensors(data: LabelSet, scaler: Scaler, stack: int, targets: list[list[int]] | None = None) -> dict[str, Tensor]:
    x, lengths = pad([stack_steps(scaler.transform(s).astype(np.float32), stack) for s in data.sequences])
    out = {"x": torch.from_numpy(x), "lengths": torch.from_numpy(lengths),
           "columns": torch.tensor([len(s) for s in data.sequences])}  # steps before stacking
    if targets is not None:
        S = max(len(t) for t in targets)
        tg = np.zeros((len(targets), S), dtype=np.int64)
        for i, t in enumerate(targets):
            tg[i, :len(t)] = t
        out.update(targets=torch.from_numpy(tg), target_lengths=torch.tensor([len(t) for t in targets]))
    return out


# ---- the trained model -------------------------------------------------------------------------
class Labeller:
    """A trained CTC model with its scaler, alphabet and the training labels (for the n-gram model)."""

    def __init__(self, cfg: LabelConfig, net: CTCModel, scaler: Scaler, alphabet: Alphabet,
                 train_labels: list[str], meta: dict[str, Any]) -> None:
        self.cfg, self.net, self.scaler, self.alphabet, self.meta = cfg, net, scaler, alphabet, meta
        self.train_labels = train_labels
        self._lms: dict[int, CharNGram] = {}

    def lm(self, order: int) -> CharNGram | None:
        """The character n-gram model of the training labels (None for order 0)."""
        if order <= 0:
            return None
        if order not in self._lms:
            enc = [[self.alphabet.index[c] for c in lab] for lab in self.train_labels]
            self._lms[order] = CharNGram(enc, len(self.alphabet), order)
        return self._lms[order]

    def _check(self, data: LabelSet, arg: str) -> None:
        if data.n_features != self.meta["features"]:
            raise UserError(f"{arg}: {data.source} has {data.n_features} feature(s) per step, the model was trained "
                            f"on {self.meta['features']}")

    @torch.no_grad()
    def log_probs(self, data: LabelSet, arg: str = "--input", batch_size: int = 128) -> list[np.ndarray]:
        """Per sequence, the (T_i, K+1) log probabilities."""
        self._check(data, arg)
        t = tensors(data, self.scaler, self.cfg.data.stack)
        out = []
        for i in range(0, len(data), batch_size):
            lp = self.net(t["x"][i:i + batch_size], t["lengths"][i:i + batch_size]).numpy()
            out.extend(p[:n] for p, n in zip(lp, t["lengths"][i:i + batch_size].tolist()))
        return out

    def decode(self, log_probs: list[np.ndarray], decode: DecodeConfig | None = None) -> list[str]:
        d = decode or self.cfg.decode
        if d.decoder == "greedy":
            return [self.alphabet.decode(greedy_ctc(lp)) for lp in log_probs]
        if d.decoder != "beam":
            raise UserError(f"decode.decoder: expected 'greedy' or 'beam', got {d.decoder!r}")
        if d.beam_width < 1:
            raise UserError(f"decode.beam_width: expected an int >= 1, got {d.beam_width}")
        lm = self.lm(d.lm_order)
        return [self.alphabet.decode(ctc_beam_search(lp, d.beam_width, lm, d.lm_weight, d.length_bonus))
                for lp in log_probs]

    def evaluate(self, data: LabelSet, arg: str = "--test", decode: DecodeConfig | None = None) -> dict[str, Any]:
        """CER, WER and sequence accuracy of greedy decoding and of ``decode`` (default: the run's) when
        that is a beam search (keys ``greedy_*`` and ``beam_*``)."""
        from ..train import replace_config

        d = decode or self.cfg.decode
        self.alphabet.encode(data, arg)
        lps = self.log_probs(data, arg)
        refs = list(data.labels)
        out: dict[str, Any] = {"n": len(data)}
        for key, dec in (("greedy", replace_config(d, decoder="greedy")), ("beam", d)):
            if dec.decoder == "greedy" and key == "beam":
                continue
            out.update({f"{key}_{k}": v for k, v in text_metrics(refs, self.decode(lps, dec)).items()})
        return out

    def save(self, run_dir: Path) -> None:
        save_trained(run_dir, self.net, self.meta, self.cfg, alphabet=self.alphabet.symbols,
                     scaler=self.scaler.state())
        (run_dir / LABELS_FILE).write_text("\n".join(self.train_labels) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, run_dir: str | Path) -> Labeller:
        meta, cfg = load_trained(run_dir, TASK, LabelConfig)
        alphabet = Alphabet(meta["alphabet"])
        net = CTCModel(meta["features"] * cfg.data.stack, len(alphabet), cfg.model)
        labels = (Path(run_dir) / LABELS_FILE).read_text(encoding="utf-8").splitlines()
        return cls(cfg, load_weights(run_dir, net), Scaler.from_state(meta["scaler"]), alphabet, labels, meta)


def train(train_set: LabelSet, cfg: LabelConfig, run_dir: str | Path | None, *, resume: bool = False,
          quiet: bool = True) -> Labeller:
    """Train a CTC model; with ``data.val_fraction`` > 0 the weights of the best validation CER are kept."""
    from ..train import replace_config

    if run_dir is not None:
        run_dir = open_run_dir(run_dir, resume)
    d = cfg.data
    if not 0 <= d.val_fraction < 1:
        raise UserError(f"data.val_fraction: expected a fraction in [0, 1), got {d.val_fraction}")
    if train_set.labels is None:
        raise UserError(f"--train: {train_set.source} has no labels")
    alphabet = Alphabet.from_labels(train_set.labels)
    targets = alphabet.encode(train_set, "--train")
    if d.stack < 1:
        raise UserError(f"data.stack: expected an int >= 1, got {d.stack}")
    check_feasible(train_set, targets, d.stack, "--train")
    scaler = Scaler(d.scaler).fit(np.concatenate(train_set.sequences, 0))
    data = tensors(train_set, scaler, d.stack, targets)
    evaluate, tcfg = None, cfg.trainer
    if d.val_fraction > 0:
        perm = np.random.default_rng(cfg.trainer.seed).permutation(len(train_set))
        n_val = max(1, int(round(d.val_fraction * len(train_set))))
        va, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        if len(tr) == 0:
            raise UserError(f"data.val_fraction={d.val_fraction} leaves no training sequence")
        val = {k: v[va] for k, v in data.items()}
        data = {k: v[tr] for k, v in data.items()}
        val_refs = [train_set.labels[i] for i in va]

        def evaluate(model: nn.Module) -> dict[str, float]:
            dev = next(model.parameters()).device
            lp = model(val["x"].to(dev), val["lengths"].to(dev))
            loss = F.ctc_loss(lp.transpose(0, 1), val["targets"].to(dev), val["lengths"].to(dev),
                              val["target_lengths"].to(dev), blank=CTC_BLANK, reduction="mean")
            lp = lp.cpu().numpy()
            hyps = [alphabet.decode(greedy_ctc(p[:n])) for p, n in zip(lp, val["lengths"].tolist())]
            m = text_metrics(val_refs, hyps)
            return {"val_loss": float(loss), "val_cer": m["cer"], "val_seq_accuracy": m["seq_accuracy"]}

        if tcfg.metric == "loss":
            tcfg = replace_config(tcfg, metric="val_cer", metric_mode="min",
                                  eval_every=tcfg.eval_every or max(1, -(-len(tr) // tcfg.batch_size)))
    torch.manual_seed(cfg.trainer.seed)
    net = CTCModel(train_set.n_features * d.stack, len(alphabet), cfg.model)
    images = None
    if train_set.images and cfg.image_augment.enabled:
        cfg.image_augment.check()
        images = (ImageSteps(scaler.center, scaler.scale, "columns", stack=d.stack), cfg.image_augment)
    task = CTCTask({"jitter": d.jitter, "scale": d.scale}, images)
    result = fit(net, task, data, tcfg, run_dir, evaluate=evaluate,
                 full_config=cfg, resume=resume, quiet=quiet)
    meta = {"task": TASK, "features": train_set.n_features, "n_train": len(train_set),
            "train": {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and k != "stop_reason"}}
    model = Labeller(cfg, net, scaler, alphabet, list(train_set.labels), meta)
    if run_dir is not None:
        model.save(run_dir)
    return model


# ---- plots -------------------------------------------------------------------------------------
def plot_alignment(sequence: np.ndarray, log_probs: np.ndarray, alphabet: Alphabet, path: Path,
                   title: str = "", stack: int = 1) -> Path:
    """The input (features over time, e.g. a text line's columns) above the per-step probability of each
    label symbol and of the blank (dashed), sharing the time axis (``stack`` input steps per output step)."""
    plt = pyplot()
    T = len(log_probs)
    p = np.exp(log_probs)
    fig, (ax0, ax1) = plt.subplots(2, 1, sharex=True, figsize=(max(6.0, T / 10), 4.5),
                                   gridspec_kw={"height_ratios": [1, 1.4]})
    ax0.imshow(np.asarray(sequence).T, aspect="auto", cmap="gray", interpolation="nearest",
               extent=(-0.5, len(sequence) / stack - 0.5, sequence.shape[1] - 0.5, -0.5))
    ax0.set_ylabel("feature")
    ax0.set_title(title)
    ax1.plot(np.arange(T), p[:, 0], "k--", lw=1)
    cmap = plt.get_cmap("tab10" if len(alphabet) <= 10 else "tab20")
    for k, c in enumerate(alphabet.symbols, start=1):
        if p[:, k].max() < 0.05:
            continue
        color = cmap(k % cmap.N)
        ax1.plot(np.arange(T), p[:, k], color=color, lw=1.5)
        q = np.concatenate([[0.0], p[:, k], [0.0]])
        for t in np.nonzero((q[1:-1] > 0.5) & (q[1:-1] >= q[:-2]) & (q[1:-1] > q[2:]))[0]:  # each peak
            ax1.text(t, min(1.0, p[t, k]) + 0.02, c, color=color, ha="center", va="bottom", fontsize=9)
    ax1.set_ylim(0, 1.12)
    ax1.set_xlabel("output step" + (f" ({stack} input steps each)" if stack > 1 else ""))
    ax1.set_ylabel("p(symbol | step)\n(dashed: blank)")
    return save_figure(fig, path)
