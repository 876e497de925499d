"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint of step s is two files in ``run_dir/checkpoints/``::

    step-00000123.safetensors   every tensor (weights "model.*", optimizer state "optim.*", carried
                                recurrent state "state.*", RNG states "rng.*")
    step-00000123.json          everything else + the SHA-256 of the .safetensors file and of itself

Each file is written to a temporary name, fsynced and renamed; the JSON is written last, so a checkpoint
exists only once both files are complete (and the metadata is serialized, as strict JSON, before either
is written). Loading checks both checksums and the metadata's required entries; a damaged newest
checkpoint is skipped with a warning and the previous good one is used. Loading never unpickles or runs code:
safetensors holds raw tensors, and the JSON is parsed with :mod:`json`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8,})\.json$")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename (then fsync the directory)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64(data: bytes) -> str:
    """Bytes -> base64 text (for RNG states kept in JSON)."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


# ---------------------------------------------------------------------------- nested state <-> flat tensors


def flatten_state(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """Move every tensor of a nested dict/list/tuple into ``tensors`` (keys ``prefix.path``).

    Returns a JSON-able skeleton in which each tensor is replaced by ``{"__tensor__": key}`` and each
    tuple by ``{"__tuple__": [...]}``; :func:`unflatten_state` inverts it.
    """
    if isinstance(obj, Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint: unsupported key type {type(k).__name__} at {prefix}")
            out[f"{type(k).__name__[0]}:{k}"] = flatten_state(v, f"{prefix}.{k}", tensors)
        return {"__dict__": out}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
            return {"__float__": repr(obj)}
        return obj
    raise TypeError(f"checkpoint: cannot store a value of type {type(obj).__name__} at {prefix}")


def unflatten_state(obj: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__dict__" in obj:
            out: dict[Any, Any] = {}
            for k, v in obj["__dict__"].items():
                kind, _, name = k.partition(":")
                out[int(name) if kind == "i" else name] = unflatten_state(v, tensors)
            return out
        raise ValueError(f"checkpoint: malformed entry {obj!r:.80}")
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


# ---------------------------------------------------------------------------- files


@dataclass
class Checkpoint:
    """A loaded checkpoint: its step, the tensors and the JSON metadata (tensors still referenced by key)."""

    step: int
    path: Path
    tensors: dict[str, Tensor]
    meta: dict[str, Any]


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or fails its checksum."""


def save_checkpoint(directory: str | os.PathLike, step: int, tensors: Mapping[str, Tensor],
                    meta: Mapping[str, Any]) -> Path:
    """Write ``step-<step>.safetensors`` and ``step-<step>.json`` atomically; return the JSON path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    blob = st_save({k: v.contiguous() for k, v in tensors.items()})
    stem = f"step-{step:08d}"
    body = dict(meta)
    body.update(format=FORMAT_VERSION, step=step, tensors_file=f"{stem}.safetensors",
                tensors_sha256=_sha256(blob))
    text = json.dumps(body, sort_keys=True, allow_nan=False)  # raises before anything is written
    wrapped = json.dumps({"sha256": _sha256(text.encode()), "body": text})
    atomic_write_bytes(directory / f"{stem}.safetensors", blob)
    atomic_write_bytes(directory / f"{stem}.json", wrapped.encode())
    return directory / f"{stem}.json"


def load_checkpoint(json_path: str | os.PathLike) -> Checkpoint:
    """Read and verify one checkpoint (raises :class:`CheckpointError` if it is damaged)."""
    json_path = Path(json_path)
    try:
        outer = json.loads(json_path.read_text(encoding="utf-8"))
        text = outer["body"]
        if _sha256(text.encode()) != outer["sha256"]:
            raise CheckpointError(f"{json_path.name}: metadata checksum mismatch")
        meta = json.loads(text)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{json_path.name}: unreadable metadata ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{json_path.name}: malformed metadata (a {type(meta).__name__}, not a table)")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{json_path.name}: unknown format {meta.get('format')!r}")
    for key, tp in (("step", int), ("tensors_file", str), ("tensors_sha256", str)):
        if not isinstance(meta.get(key), tp) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"{json_path.name}: malformed metadata ({key} = {meta.get(key)!r:.40})")
    tfile = json_path.parent / str(meta["tensors_file"])
    if tfile.parent != json_path.parent or "/" in str(meta["tensors_file"]):
        raise CheckpointError(f"{json_path.name}: tensors file outside the checkpoint directory")
    try:
        blob = tfile.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{tfile.name}: unreadable ({e})") from None
    if _sha256(blob) != meta["tensors_sha256"]:
        raise CheckpointError(f"{tfile.name}: checksum mismatch (truncated or corrupted)")
    try:
        tensors = st_load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{tfile.name}: not a valid safetensors file ({e})") from None
    return Checkpoint(int(meta["step"]), json_path, tensors, meta)


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, json path) of every checkpoint in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    out = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_good_checkpoint(directory: str | os.PathLike,
                           decode: Callable[[Checkpoint], Any] | None = None) -> Checkpoint | None:
    """The newest checkpoint that passes its checks; damaged newer ones are reported with a warning.

    ``decode(checkpoint)``, when given, is a further check (reading the entries its user needs); a
    :class:`CheckpointError` from it marks the checkpoint damaged as well.
    """
    for step, path in reversed(list_checkpoints(directory)):
        try:
            found = load_checkpoint(path)
            if decode is not None:
                decode(found)
            return found
        except CheckpointError as e:
            warnings.warn(f"skipping damaged checkpoint of step {step}: {e}; trying the previous one",
                          RuntimeWarning, stacklevel=2)
    return None


def prune_checkpoints(directory: str | os.PathLike, keep_last: int, keep_steps: set[int]) -> None:
    """Delete all checkpoints but the newest ``keep_last`` and those of ``keep_steps``; drop stale temp files."""
    directory = Path(directory)
    ckpts = list_checkpoints(directory)
    keep = {s for s, _ in ckpts[-keep_last:]} | set(keep_steps)
    for step, path in ckpts:
        if step not in keep:
            path.unlink(missing_ok=True)  # JSON first: the checkpoint disappears atomically
            path.with_suffix(".safetensors").unlink(missing_ok=True)
    for p in directory.glob("step-*.safetensors"):  # left by a run killed between its two files
        if not p.with_suffix(".json").exists() and int(p.stem.split("-")[1]) < max(keep, default=0):
            p.unlink(missing_ok=True)
    for p in directory.glob(".*.tmp"):
        try:
            pid = int(p.name.rsplit(".", 2)[-2])
        except ValueError:
            continue
        if pid != os.getpid():
            p.unlink(missing_ok=True)


def find_checkpoint(run_dir: str | os.PathLike, which: str | int = "latest") -> Checkpoint | None:
    """A checkpoint of a run directory (or of its ``checkpoints/`` folder), verified.

    Args:
        which: "latest" (newest good one; damaged newer ones are skipped with a warning), "best" (the
            best evaluation recorded by the newest good checkpoint; the newest if none was recorded), or
            a step number.
    Returns:
        the checkpoint, or None when the directory holds none.
    Raises:
        UserError: unknown ``which`` or a step that has no checkpoint.
    """
    from ..errors import UserError

    directory = Path(run_dir)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    steps = dict(list_checkpoints(directory))
    if which == "latest" or which == "best":
        good = latest_good_checkpoint(directory)
        if which == "latest" or good is None:
            return good
        best = good.meta.get("best_step")
        return load_checkpoint(steps[best]) if best in steps and best != good.step else good
    step = int(which) if isinstance(which, int) or str(which).isdigit() else None
    if step is None or step not in steps:
        raise UserError(f"checkpoint: expected 'latest', 'best' or one of the steps {sorted(steps)}, got {which!r}")
    return load_checkpoint(steps[step])


def model_state_dict(checkpoint: Checkpoint) -> dict[str, Tensor]:
    """The model's ``state_dict`` stored in a checkpoint (for ``model.load_state_dict``)."""
    return {k[len("model."):]: v for k, v in checkpoint.tensors.items() if k.startswith("model.")}


def tensor_is_finite(tensors: Mapping[str, Tensor]) -> bool:
    """True when every floating-point tensor is finite."""
    return all(torch.isfinite(t).all().item() for t in tensors.values() if t.is_floating_point())


__all__ = ["atomic_write_bytes", "save_checkpoint", "load_checkpoint", "list_checkpoints",
           "latest_good_checkpoint", "prune_checkpoints", "Checkpoint", "CheckpointError",
           "flatten_state", "unflatten_state", "b64", "unb64", "tensor_is_finite", "find_checkpoint",
           "model_state_dict"]
