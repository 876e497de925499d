"""Shared command-line conventions for every task command (not a command group itself).

The flags every task command shares, defined once::

    --out RUN_DIR  --config FILE.toml  --set KEY=VALUE (repeatable)  --seed N
    --steps N  --epochs N  --minutes M  --resume  --checkpoint-every N
    --json  --quiet  --device auto|cpu|cuda[:N]  --debug

A task command gets all of them with one decorator and receives them as a :class:`RunOptions`::

    @app.command()
    @run_command("charlm")
    def train(corpus: Path = typer.Argument(...), *, opts: RunOptions) -> None:
        cfg = opts.load_config(CharLMConfig)           # TOML < --set < --seed/--steps/... flags
        result = Trainer(..., cfg.trainer, opts.run_dir, resume=opts.resume, quiet=opts.quiet,
                         full_config=cfg).fit()
        opts.emit(result)                              # --json: one JSON object on stdout

``run_command`` also turns user errors (:class:`~rnnkit.errors.UserError`, ``ValueError``,
``FileNotFoundError``) into one line on stderr and exit status 2, and
:class:`~rnnkit.errors.TrainingError` into one line and status 1; ``--debug`` shows the traceback.
Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ..errors import TrainingError, UserError

T = TypeVar("T")

# One Annotated alias per shared flag, for commands that declare them by hand.
OutOpt = Annotated[Path | None, typer.Option("--out", help="Run directory (default: runs/<group>-<time>).")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML config file.")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config key, e.g. --set trainer.optim.lr=3e-3 (repeatable).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (trainer.seed).")]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Budget: optimizer steps.")]
EpochsOpt = Annotated[int | None, typer.Option("--epochs", help="Budget: passes over the training data.")]
MinutesOpt = Annotated[float | None, typer.Option("--minutes", help="Budget: wall-clock minutes of training.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its newest checkpoint.")]
CheckpointEveryOpt = Annotated[int | None, typer.Option(
    "--checkpoint-every", help="Write a checkpoint every N steps.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the final metrics as one JSON object on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress output on stderr.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")]


def _json_default(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf
    if isinstance(v, Mapping):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


@dataclass(frozen=True)
class RunOptions:
    """The shared flags of one invocation."""

    group: str = "run"
    out: Path | None = None
    config: Path | None = None
    set: tuple[str, ...] = ()
    seed: int | None = None
    steps: int | None = None
    epochs: int | None = None
    minutes: float | None = None
    resume: bool = False
    checkpoint_every: int | None = None
    json: bool = False
    quiet: bool = False
    device: str | None = None
    debug: bool = False
    _created: float = field(default_factory=time.time, repr=False)

    @property
    def run_dir(self) -> Path:
        """``--out``, or ``runs/<group>-<YYYYmmdd-HHMMSS>`` when not given (``--resume`` needs --out)."""
        if self.out is not None:
            return self.out
        if self.resume:
            raise UserError("--resume: needs --out RUN_DIR (the run to continue)")
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self._created))
        return Path("runs") / f"{self.group}-{stamp}"

    def flag_overrides(self, section: str = "trainer") -> dict[str, Any]:
        """The flags that set config keys, as dotted keys under ``section`` (only flags given)."""
        pairs = {"seed": self.seed, "steps": self.steps, "epochs": self.epochs, "minutes": self.minutes,
                 "checkpoint_every": self.checkpoint_every, "device": self.device}
        prefix = f"{section}." if section else ""
        return {prefix + k: v for k, v in pairs.items() if v is not None}

    def overrides(self, flags: Mapping[str, Any] | None = None, section: str = "trainer") -> dict[str, Any]:
        """Dotted config overrides, later winning: --set, then a task's own ``flags`` (only those given,
        i.e. not None), then the shared budget/seed/device flags under ``section``."""
        from ..train.config import parse_override

        out: dict[str, Any] = {}
        for item in self.set:
            keys, value = parse_override(item)
            out[".".join(keys)] = value
        out.update({k: v for k, v in (flags or {}).items() if v is not None})
        out.update(self.flag_overrides(section))
        return out

    def load_config(self, cls: type[T], section: str = "trainer", flags: Mapping[str, Any] | None = None) -> T:
        """Load ``cls`` from its defaults < --config < :meth:`overrides` (``--set``, ``flags``, shared flags).

        ``section`` is the field of ``cls`` that holds the :class:`~rnnkit.train.TrainerConfig` ("" when
        ``cls`` is TrainerConfig itself).
        """
        from ..train.config import load_config

        return load_config(cls, self.config, self.overrides(flags, section))

    def emit(self, result: Mapping[str, Any]) -> None:
        """Print final results on stdout: one JSON object with --json, else ``key: value`` lines."""
        emit(result, as_json=self.json)

    def info(self, message: str) -> None:
        """A progress message on stderr (silenced by --quiet)."""
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)


def emit(result: Mapping[str, Any], as_json: bool) -> None:
    """Print results on stdout (JSON object or aligned ``key: value`` lines)."""
    if as_json:
        typer.echo(json.dumps(_clean(dict(result)), default=_json_default))
        return
    width = max((len(str(k)) for k in result), default=0)
    for k, v in result.items():
        shown = f"{v:.6g}" if isinstance(v, float) else v
        typer.echo(f"{str(k):<{width}}  {shown}")


def fail(message: str, code: int = 2, debug: bool = False) -> None:
    """Print ``error: message`` on stderr and exit with ``code`` (with the traceback when ``debug``)."""
    if debug:
        import traceback

        traceback.print_exc(file=sys.stderr)
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


class user_errors:
    """Context manager: user errors -> one stderr line + exit 2; TrainingError -> exit 1.

    With ``debug`` (or the environment variable ``RNNKIT_DEBUG=1``) the traceback is printed too.
    """

    def __init__(self, debug: bool = False) -> None:
        self.debug = debug or os.environ.get("RNNKIT_DEBUG", "") not in ("", "0")

    def __enter__(self) -> user_errors:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, (typer.Exit, SystemExit)):
            return False
        if isinstance(exc, KeyboardInterrupt):
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
        if isinstance(exc, TrainingError):
            fail(str(exc), 1, self.debug)
        if isinstance(exc, (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                            PermissionError)):
            fail(str(exc) or type(exc).__name__, 2, self.debug)
        return False


@contextmanager
def _owning(opts: RunOptions, trains: bool) -> Iterator[None]:
    """A training command holds the lock of its ``--out`` for the whole command, so nothing it writes
    before or after training meets another process's writes. A directory that the command created and
    left empty (it failed before writing anything) is removed again."""
    out = opts.out
    if not trains or out is None or (out.exists() and not out.is_dir()):
        yield
        return
    from ..train.rundir import LOCK_FILE, lock_run_dir

    created = not out.exists()
    with lock_run_dir(out):
        try:
            yield
        finally:
            if created and [p.name for p in out.iterdir()] == [LOCK_FILE]:
                (out / LOCK_FILE).unlink()
                out.rmdir()


_SHARED: list[tuple[str, Any, Any]] = [
    ("out", OutOpt, None), ("config", ConfigOpt, None), ("set_", SetOpt, None), ("seed", SeedOpt, None),
    ("steps", StepsOpt, None), ("epochs", EpochsOpt, None), ("minutes", MinutesOpt, None),
    ("resume", ResumeOpt, False), ("checkpoint_every", CheckpointEveryOpt, None), ("json_", JsonOpt, False),
    ("quiet", QuietOpt, False), ("device", DeviceOpt, None), ("debug", DebugOpt, False),
]


def run_command(group: str, *, exclude: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: add the shared flags to a typer command and pass them as ``opts: RunOptions``.

    The decorated function must take a keyword-only parameter ``opts``. ``exclude`` leaves flags out
    (e.g. ``("resume", "checkpoint_every")`` for a command that does not train). Errors are handled as
    in :class:`user_errors`.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        if "opts" not in sig.parameters:
            raise TypeError(f"{fn.__name__}: a run_command needs a keyword-only parameter 'opts'")
        shared = [(n, a, d) for n, a, d in _SHARED if n.rstrip("_") not in exclude]
        own = [p for name, p in sig.parameters.items() if name != "opts"]
        clash = {p.name for p in own} & {n for n, _, _ in shared}
        if clash:
            raise TypeError(f"{fn.__name__}: parameters {sorted(clash)} clash with the shared flags")
        params = own + [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a)
                        for n, a, d in shared]
        params.sort(key=lambda p: p.kind)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {n: kwargs.pop(n, d) for n, _, d in shared}
            opts = RunOptions(group=group, out=values.get("out"), config=values.get("config"),
                              set=tuple(values.get("set_") or ()), seed=values.get("seed"),
                              steps=values.get("steps"), epochs=values.get("epochs"),
                              minutes=values.get("minutes"), resume=bool(values.get("resume", False)),
                              checkpoint_every=values.get("checkpoint_every"), json=bool(values.get("json_")),
                              quiet=bool(values.get("quiet")), device=values.get("device"),
                              debug=bool(values.get("debug")))
            with user_errors(opts.debug), _owning(opts, trains="resume" not in exclude):
                return fn(*args, opts=opts, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        del wrapper.__wrapped__  # typer must see the new signature, not the original one
        return wrapper

    return deco



# flags of commands that read a run but do not train it
NOT_TRAINING = ("out", "config", "set", "steps", "epochs", "minutes", "resume", "checkpoint_every", "quiet")


def resolve_config(opts: RunOptions, cls: type, flags: dict[str, Any], base: dict[str, Any] | None = None) -> Any:
    """Config: the run's own config.toml when resuming (else --config) < --set < task flags < shared flags.

    Only flags that were given override, so a resumed run keeps its model and data settings.
    """
    from ..train.config import load_config

    path = opts.config
    if opts.resume:
        saved = opts.run_dir / "config.toml"
        if saved.is_file():
            if opts.config is not None:
                raise UserError(f"--config: not allowed with --resume; the run's own {str(saved)!r} is used "
                                f"(change settings with flags or --set)")
            path = saved
    return load_config(cls, path, opts.overrides(flags),
                       base=None if path == opts.run_dir / "config.toml" else base)


def stream_writer(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def resolve_device(name: str | None) -> str:
    """--device: ``auto`` (or none) picks CUDA when available; a CUDA device without CUDA is an error."""
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name!r}: CUDA is not available on this machine; use 'cpu' or 'auto'")
    return name


def run_or_onnx(run_dir: Path | None, onnx: Path | None, load: Callable[[], Any], load_onnx: Callable[[Path], Any],
                what: str) -> Any:
    """The run a command works on: ``load()`` of RUN_DIR, or ``load_onnx(FILE)`` of an exported ``--onnx``
    file (``what`` names it in the error when neither or both are given)."""
    if (run_dir is None) == (onnx is None):
        raise UserError(f"RUN_DIR / --onnx: give one of them (a run directory, or {what})")
    return load() if onnx is None else load_onnx(onnx)


__all__ = ["RunOptions", "run_command", "user_errors", "emit", "fail", "OutOpt", "ConfigOpt", "SetOpt",
           "SeedOpt", "StepsOpt", "EpochsOpt", "MinutesOpt", "ResumeOpt", "CheckpointEveryOpt", "JsonOpt",
           "QuietOpt", "DeviceOpt", "DebugOpt", "NOT_TRAINING", "resolve_config",
           "resolve_device", "stream_writer", "run_or_onnx"]
