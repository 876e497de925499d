"""Ownership of a run directory: an exclusive OS lock, and what a resume may change.

One process at a time writes into a run directory. :func:`lock_run_dir` takes an exclusive
``fcntl.flock`` on ``run_dir/.lock`` (the file holds the owner's PID for the message a second writer
gets). The operating system drops the lock when the process ends, however it ends, so a killed run
leaves no stale lock. Within one process the lock is re-entrant: a task may hold it around its whole
command while the trainer takes it again inside.

:func:`setting_differences` lists the settings of a new config that differ from the run's saved
``config.toml``, for the message of a rejected ``--resume``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import UserError
from .config import tomllib

LOCK_FILE = ".lock"

# settings a resumed run may change freely: budgets, logging, the device (last component of a dotted key)
RESUMABLE = frozenset({"steps", "epochs", "minutes", "checkpoint_every", "log_every", "device", "tensorboard"})

_held: dict[str, list[int]] = {}  # real path of a lock file -> [fd, depth] for locks this process holds


def _acquire(path: Path) -> int:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise UserError(f"--out {str(path.parent)!r}: in use by another process (PID {holder}); wait for it to "
                        f"finish or choose another directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextmanager
def lock_run_dir(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of ``run_dir`` (created if missing) for the ``with`` block.

    Raises:
        UserError: another process holds it (the message names its PID).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    key = os.path.realpath(path)
    entry = _held.get(key)
    if entry is None:
        entry = _held[key] = [_acquire(path), 0]
    entry[1] += 1
    try:
        yield run_dir
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            os.close(entry[0])  # closing the descriptor releases the flock


def check_run_dir(run_dir: str | os.PathLike, resume: bool) -> Path:
    """``run_dir`` as a Path, after checking that a run may write into it (changes nothing).

    Raises:
        UserError: it exists and is not a directory, or it holds checkpoints and ``resume`` is False.
    """
    from .checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {str(run_dir)!r}: exists and is not a directory")
    if list_checkpoints(run_dir / "checkpoints") and not resume:
        raise UserError(f"--out {str(run_dir)!r}: the run directory already has checkpoints; pass --resume to "
                        f"continue it or choose another directory")
    return run_dir


def read_saved_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed ``config.toml`` of a run (None when there is none).

    Raises:
        UserError: the file is not valid TOML (the message names it).
    """
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{str(path)!r}: not a valid config file ({e}); restore it or start a new run") from None


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def setting_differences(old: Mapping[str, Any], new: Mapping[str, Any], *, limit: int = 8) -> list[str]:
    """``"key: old -> new"`` for every setting that differs (budgets and logging left out), sorted.

    Keys missing on one side show as ``(unset)``; past ``limit`` entries a count of the rest is added.
    """
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in set(a) | set(b) if k.rsplit(".", 1)[-1] not in RESUMABLE and a.get(k) != b.get(k))
    shown = [f"{k}: {a[k] if k in a else '(unset)'!r} -> {b[k] if k in b else '(unset)'!r}" for k in keys[:limit]]
    if len(keys) > limit:
        shown.append(f"and {len(keys) - limit} more")
    return shown


__all__ = ["lock_run_dir", "check_run_dir", "read_saved_config", "setting_differences", "LOCK_FILE", "RESUMABLE"]
