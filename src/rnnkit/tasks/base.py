"""What every task shares: run directories, the training preamble, model files and checkpoint choice.

A task file holds its data, head and metrics; for the rest it calls these helpers:

- :func:`open_run_dir` checks that a run may write into a directory (a fresh one, or ``--resume``);
  :func:`with_budget` gives a config a default budget; :func:`reporter` is the stderr progress printer;
  :func:`check_saved_vocab` compares a resumed run's vocabulary; :func:`atomic_json` writes its outputs.
- :func:`fit` trains a model on sample data through :class:`rnnkit.train.Trainer` and restores the best
  evaluation (:func:`restore_best`); stream tasks use the Trainer directly (see :mod:`rnnkit.tasks.lm`).
- Trained sample-data models are saved as ``model.safetensors`` (weights) + ``model.json`` (task name,
  resolved config and whatever the task needs to use the model): :func:`save_trained` / :func:`load_trained`
  (:func:`save_model`, :func:`load_meta`, :func:`load_weights` underneath).
- Models of checkpointed runs are restored with :func:`load_checkpoint_into`, which chooses the
  checkpoint with :func:`rnnkit.train.checkpoint.find_checkpoint`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor, nn

from ..errors import UserError
from ..train.checkpoint import Checkpoint, atomic_write_bytes, find_checkpoint, list_checkpoints, model_state_dict

C = TypeVar("C")
V = TypeVar("V")
MODEL_FILE, META_FILE = "model.safetensors", "model.json"


# ---- run directories and the training preamble ---------------------------------------------------
def open_run_dir(run_dir: str | Path, resume: bool) -> Path:
    """``run_dir`` as a Path, after checking that this run may write into it (see
    :func:`rnnkit.train.rundir.check_run_dir`); the trainer then locks it and checks a resume."""
    from ..train.rundir import check_run_dir

    return check_run_dir(run_dir, resume)


def with_budget(cfg: C, minutes: float) -> C:
    """``cfg`` with ``trainer.minutes = minutes`` when none of steps / epochs / minutes is set."""
    from ..train.config import replace_config

    t = cfg.trainer  # type: ignore[attr-defined]
    if t.steps is None and t.epochs is None and t.minutes is None:
        return replace_config(cfg, **{"trainer.minutes": minutes})
    return cfg


def reporter(quiet: bool) -> Callable[[str], None]:
    """A function printing progress lines to stderr (nothing when ``quiet``)."""
    if quiet:
        return lambda msg: None
    return lambda msg: print(msg, file=sys.stderr, flush=True)


def atomic_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically."""
    atomic_write_bytes(path, json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8"))


def check_saved_vocab(path: Path, vocab: Any, unit: str = "symbols") -> None:
    """On resume: the vocabulary saved at ``path`` (if any) must equal ``vocab`` (same class, ``from_dict``)."""
    if not path.is_file():
        return
    saved = type(vocab).from_dict(json.loads(path.read_text(encoding="utf-8")))
    if saved != vocab:
        added = [c for c in vocab.itos if c not in saved.stoi]
        lost = [c for c in saved.itos if c not in vocab.stoi]
        raise UserError(f"--resume {str(path.parent)!r}: vocabulary mismatch: the run has {len(saved)} {unit}, "
                        f"this training text gives {len(vocab)} (new: {added[:10]!r}, missing: {lost[:10]!r}); "
                        f"resume with the same training text")


def as_user_error(exc: Exception) -> UserError:
    """A configuration error (ValueError / TypeError from a constructor) as a :class:`UserError`."""
    return exc if isinstance(exc, UserError) else UserError(str(exc))


# ---- checkpoints ---------------------------------------------------------------------------------
def choose_checkpoint(run_dir: str | Path, which: str | int = "latest") -> Checkpoint:
    """The checkpoint "latest" (newest good one), "best" (the best evaluation) or of a step, of ``run_dir``.

    Raises:
        UserError: an unknown ``which``, or the run holds no checkpoint.
    """
    run_dir = Path(run_dir)
    try:
        found = find_checkpoint(run_dir / "checkpoints", which)
    except UserError as e:
        raise UserError(f"--{e}") from None  # find_checkpoint names its argument "checkpoint"
    if found is None:
        if list_checkpoints(run_dir / "checkpoints"):
            raise UserError(f"RUN_DIR {str(run_dir)!r}: every checkpoint fails its checks (truncated or corrupted; "
                            f"see the warnings above); the run has no usable model")
        raise UserError(f"RUN_DIR {str(run_dir)!r}: holds no checkpoint (train it first, or wait for its first "
                        f"checkpoint)")
    return found


def load_checkpoint_into(model: nn.Module, run_dir: str | Path, which: str | int | Checkpoint = "latest") -> int:
    """Load the weights of a checkpoint of ``run_dir`` (chosen by :func:`choose_checkpoint`, or given) into
    ``model``; return its step. A checkpoint that does not fit is an error quoting torch's reasons."""
    found = which if isinstance(which, Checkpoint) else choose_checkpoint(run_dir, which)
    try:
        model.load_state_dict(model_state_dict(found), strict=True)
    except RuntimeError as e:
        lines = [ln.strip().rstrip(".") for ln in str(e).splitlines()[1:] if ln.strip()]  # [0]: a bare heading
        shown = "; ".join(lines[:3]) + ("; ..." if len(lines) > 3 else "")
        raise UserError(f"RUN_DIR {str(run_dir)!r}: checkpoint of step {found.step} does not fit the model of "
                        f"its config.toml ({shown or str(e)})") from None
    return found.step


def read_run(run_dir: str | Path, config_cls: type[C], read_vocab: Callable[[Any, Path], V],
             vocab_file: str = "vocab.json") -> tuple[Path, V, C]:
    """(run directory, its vocabulary, its ``config.toml`` as ``config_cls``) of a checkpointed training run.

    ``read_vocab(parsed JSON of vocab_file, run_dir)`` builds the vocabulary (and raises a
    :class:`UserError` for another task's run) before the config is read. A missing directory or file is a
    one-line error.
    """
    from ..train import config_from_dict
    from ..train.rundir import read_saved_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR {str(run_dir)!r}: no such directory (expected the --out of a training run)")
    cfg_path, vocab_path = run_dir / "config.toml", run_dir / vocab_file
    for p in (cfg_path, vocab_path):
        if not p.is_file():
            raise UserError(f"RUN_DIR {str(run_dir)!r}: not a trained run (no {p.name}); expected the --out "
                            f"directory of a finished or checkpointed training")
    try:
        parsed = json.loads(vocab_path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON (or not UTF-8)
        raise UserError(f"{str(vocab_path)!r}: not a valid vocabulary file ({e}); restore the run's "
                        f"{vocab_file}") from None
    vocab = read_vocab(parsed, run_dir)
    try:
        return run_dir, vocab, config_from_dict(config_cls, read_saved_config(run_dir))
    except UserError as e:  # a key or value the config class refuses: name the file
        msg = str(e)
        raise UserError(msg if str(cfg_path) in msg else f"{str(cfg_path)!r}: {msg}") from None


def restore_best(trainer: Any, model: nn.Module) -> int | None:
    """Load the checkpoint of the trainer's best evaluation into ``model`` when it is not the last step;
    return that step (None when nothing was restored: no evaluation, no checkpoints, or it is gone)."""
    best, directory = trainer.best_step, trainer.checkpoint_dir
    if best is None or best == trainer.step or directory is None:
        return None
    try:
        found = find_checkpoint(directory, best)
    except UserError:  # pruned: keep the final weights
        return None
    model.load_state_dict(model_state_dict(found))
    return best


def fit(model: nn.Module, task: Any, data: dict[str, Tensor], trainer_cfg: Any, run_dir: str | Path | None, *,
        evaluate: Any = None, full_config: Any = None, resume: bool = False, quiet: bool = True) -> dict[str, Any]:
    """Train ``model`` with :class:`rnnkit.train.Trainer` on sample data, then restore the weights of the
    best evaluation (when ``evaluate`` is given) and return the trainer's final metrics (``restored_step``
    added when the best weights were restored); the model ends on the CPU in eval mode."""
    from ..train import Trainer

    trainer = Trainer(model, task, data, trainer_cfg, run_dir, evaluate=evaluate, full_config=full_config,
                      resume=resume, quiet=quiet)
    result = trainer.fit()
    if evaluate is not None:
        restored = restore_best(trainer, model)
        if restored is not None:
            result["restored_step"] = restored
    model.cpu().eval()
    return result


# ---- model files -----------------------------------------------------------------------------------
def save_model(run_dir: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (weights) and ``model.json`` (everything needed to rebuild and use it)."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = run_dir / (MODEL_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(run_dir / MODEL_FILE)
    (run_dir / META_FILE).write_text(json.dumps(meta, indent=1))
    return run_dir / MODEL_FILE


def load_meta(run_dir: str | Path, task: str) -> dict[str, Any]:
    """Read ``model.json`` of a run directory, checking that it was written by ``task``."""
    from ..data.series import SeriesError

    path = Path(run_dir) / META_FILE
    if not path.is_file():
        raise SeriesError(f"RUN_DIR: {str(run_dir)!r} has no {META_FILE}; expected the --out directory of "
                          f"`rnnkit {task} train`/`fit`")
    meta = json.loads(path.read_text())
    if meta.get("task") != task:
        raise SeriesError(f"RUN_DIR: {str(run_dir)!r} holds a {meta.get('task')!r} model, expected {task!r}")
    return meta


def load_weights(run_dir: str | Path, model: nn.Module) -> nn.Module:
    """``model`` with the weights of ``run_dir/model.safetensors``, in eval mode."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(Path(run_dir) / MODEL_FILE)))
    return model.eval()


def save_trained(run_dir: str | Path, model: nn.Module, meta: dict[str, Any], config: Any, **extra: Any) -> Path:
    """:func:`save_model` with the resolved ``config`` and the task's ``extra`` entries added to ``meta``."""
    from ..train import config_to_dict

    return save_model(run_dir, model, {**meta, "config": config_to_dict(config), **extra})


def load_trained(run_dir: str | Path, task: str, config_cls: type[C]) -> tuple[dict[str, Any], C]:
    """(``model.json`` of a ``task`` run, its config rebuilt as ``config_cls``); see :func:`save_trained`."""
    from ..train import config_from_dict

    meta = load_meta(run_dir, task)
    return meta, config_from_dict(config_cls, meta["config"])


def sample_trainer(epochs: int, batch_size: int, lr: float = 3e-3) -> Any:
    """The trainer defaults of the sample-data tasks: Adam at ``lr``, clip norm 1, a log line every 50
    steps, no TensorBoard (a :class:`rnnkit.train.TrainerConfig`)."""
    from ..train.config import OptimConfig, TrainerConfig

    return TrainerConfig(epochs=epochs, batch_size=batch_size, tensorboard=False, log_every=50, clip_norm=1.0,
                         optim=OptimConfig(name="adam", lr=lr))


# ---- small helpers ---------------------------------------------------------------------------------
def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out a matplotlib figure, write it to ``path`` (PNG, 100 dpi; folders created) and close it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def parse_floats(text: str | Sequence[float] | None, arg: str, kind: type = float) -> tuple[Any, ...]:
    """``"0.1,0.5,0.9"`` -> (0.1, 0.5, 0.9) (``kind=int``: integers) with a clear error naming ``arg``."""
    from ..data.series import SeriesError

    if text is None:
        return ()
    if not isinstance(text, str):
        return tuple(kind(v) for v in text)
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        what = "integers" if kind is int else "numbers"
        raise SeriesError(f"{arg}: expected comma-separated {what}, got {text!r}") from e


__all__ = ["open_run_dir", "with_budget", "reporter", "atomic_json", "check_saved_vocab", "as_user_error",
           "choose_checkpoint", "load_checkpoint_into", "read_run", "restore_best", "fit", "save_model",
           "load_meta", "load_weights", "save_trained", "load_trained", "sample_trainer", "pyplot", "save_figure",
           "parse_floats", "MODEL_FILE", "META_FILE"]
