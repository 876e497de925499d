"""Typed, frozen configuration: trainer, optimizer and schedule settings, TOML loading and CLI overrides.

Every config is a frozen dataclass; a task defines its own (``model``, ``data`` sections) and nests
:class:`TrainerConfig` in it, then reuses :func:`load_config`::

    @dataclass(frozen=True)
    class CharLMConfig:
        model: ModelConfig = ModelConfig()
        data: DataConfig = DataConfig()
        trainer: TrainerConfig = TrainerConfig()

    cfg = load_config(CharLMConfig, "run.toml", ["trainer.optim.lr=3e-3", "model.hidden_size=512"])

TOML sections map to nested dataclasses (``[trainer.optim]``). Override values are parsed as TOML
values (``3e-3``, ``true``, ``"adam"``, ``[1, 2]``); a bare word that is not valid TOML is taken as a
string (``trainer.optim.name=adamw``). Unknown keys and values of the wrong type raise
:class:`~rnnkit.errors.UserError` quoting the key and the value.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import tomli_w

from ..errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings.

    Args:
        name: "sgd", "adam", "adamw" or "rmsprop".
        lr: base learning rate (the schedule multiplies it).
        momentum: SGD / RMSprop momentum.
        nesterov: Nesterov momentum (SGD; needs momentum > 0).
        weight_decay: L2 penalty (SGD, Adam, RMSprop) or decoupled decay (AdamW).
        betas: Adam / AdamW (beta1, beta2).
        eps: Adam / AdamW / RMSprop epsilon.
        alpha: RMSprop smoothing constant.
    """

    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    alpha: float = 0.99


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule; the learning rate is ``optim.lr * factor``.

    Args:
        name: "constant"; "step": ``factor = decay ** max(0, (epoch - start_epoch) // every + 1)`` from
            1-based epoch ``start_epoch`` on (Zaremba et al.: decay 0.5, start_epoch 5, every 1);
            "cosine": linear warm-up over ``warmup_steps`` then
            ``factor = min_factor + (1 - min_factor) (1 + cos(pi p)) / 2`` with p the fraction of the
            remaining steps done (``total_steps``, else the step/epoch budget; with only a minutes
            budget, p is the fraction of the wall-clock budget used, which makes the run time-dependent);
            "plateau": multiply by ``decay`` when the validation metric has not improved by
            ``threshold`` (relative) for ``patience`` evaluations, not below ``min_factor``.
        warmup_steps: linear warm-up length for any schedule (0 = none).
        decay, start_epoch, every: step and plateau settings (``decay`` is the plateau factor too).
        min_factor: floor of the factor for cosine and plateau.
        total_steps: length of the cosine schedule (default: the step budget).
        patience, threshold: plateau settings.
    """

    name: Literal["constant", "step", "cosine", "plateau"] = "constant"
    warmup_steps: int = 0
    decay: float = 0.5
    start_epoch: int = 1
    every: int = 1
    min_factor: float = 0.0
    total_steps: int | None = None
    patience: int = 2
    threshold: float = 1e-4


@dataclass(frozen=True)
class TrainerConfig:
    """Settings of :class:`~rnnkit.train.Trainer`.

    Budget (the first one reached stops the run; at least one must be set): ``steps`` optimizer steps,
    ``epochs`` passes over the training data, ``minutes`` of wall-clock training (summed over resumes).

    Args:
        batch_size: streams (TBPTT data) or samples per optimizer step and micro-batch, over all ranks.
        tbptt: k1, chunk length for stream data.
        tbptt_backward: k2 (default k1); see docs/training.md for k2 < k1 and k2 > k1.
        loss_reduction: "mean" over tokens/items, or "sum_time" (stream data: summed over the unrolled
            steps, averaged over the batch; the convention of Zaremba et al.'s lr = 1.0).
        grad_accum: micro-batches accumulated per optimizer step.
        clip_norm: clip the global gradient norm to this value (None = off); the norm before clipping
            is logged either way.
        clip_value: clamp every gradient element to [-clip_value, clip_value] (None = off).
        max_nonfinite: stop after this many non-finite steps in a row (they are skipped and counted).
        eval_every: evaluate every this many steps (0 = only at the end; also at each epoch end if
            ``eval_each_epoch``).
        metric, metric_mode: the evaluation metric that picks the best checkpoint, early stopping and
            the plateau schedule; "min" or "max".
        early_stopping: stop after this many evaluations without improvement (0 = off).
        checkpoint_every: write a checkpoint every this many steps (0 = only at the end and on best).
        keep_checkpoints: keep the newest N checkpoints plus the best.
        log_every: steps between log lines / metric records.
        precision: "fp32" or "bf16" (autocast for the forward pass).
        deterministic: torch.use_deterministic_algorithms and no cuDNN benchmarking.
        device: "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...
        tensorboard: write TensorBoard scalars to the run directory.
        drop_last: sample data: drop the last incomplete batch of each epoch.
    """

    seed: int = 0
    steps: int | None = None
    epochs: int | None = None
    minutes: float | None = None
    batch_size: int = 32
    tbptt: int = 100
    tbptt_backward: int | None = None
    loss_reduction: Literal["mean", "sum_time"] = "mean"
    grad_accum: int = 1
    clip_norm: float | None = None
    clip_value: float | None = None
    max_nonfinite: int = 10
    eval_every: int = 0
    eval_each_epoch: bool = False
    metric: str = "loss"
    metric_mode: Literal["min", "max"] = "min"
    early_stopping: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    log_every: int = 10
    precision: Literal["fp32", "bf16"] = "fp32"
    deterministic: bool = False
    device: str = "auto"
    tensorboard: bool = True
    drop_last: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        validate_trainer_config(self)


def _positive(name: str, value: Any, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value > 0 or (allow_zero and value == 0))
    if not ok:
        finite = "finite " if isinstance(value, float) and not math.isfinite(value) else ""
        what = f"a {finite}number {'>=' if allow_zero else '>'} 0"
        raise UserError(f"trainer.{name}: expected {what}{' or unset' if allow_none else ''}, got {value!r}")


def validate_trainer_config(cfg: TrainerConfig) -> None:
    """Check value ranges that the type alone does not (raises :class:`UserError`)."""
    for name in ("steps", "epochs", "minutes", "tbptt_backward", "clip_norm", "clip_value"):
        _positive(name, getattr(cfg, name), allow_none=True)
    for name in ("batch_size", "tbptt", "grad_accum", "max_nonfinite", "keep_checkpoints", "log_every"):
        _positive(name, getattr(cfg, name))
    for name in ("eval_every", "early_stopping", "checkpoint_every"):
        _positive(name, getattr(cfg, name), allow_zero=True)
    o, s = cfg.optim, cfg.schedule
    _positive("optim.lr", o.lr)
    if o.nesterov and (o.name != "sgd" or o.momentum <= 0):
        raise UserError(f"trainer.optim.nesterov: needs name='sgd' and momentum > 0, got name={o.name!r}, "
                        f"momentum={o.momentum!r}")
    if not 0.0 < s.decay <= 1.0:
        raise UserError(f"trainer.schedule.decay: expected a factor in (0, 1], got {s.decay!r}")
    for name in ("warmup_steps",):
        _positive(f"schedule.{name}", getattr(s, name), allow_zero=True)
    for name in ("start_epoch", "every", "patience"):
        _positive(f"schedule.{name}", getattr(s, name))
    _positive("schedule.total_steps", s.total_steps, allow_none=True)


# --------------------------------------------------------------------------------------------------
# generic loading / overriding / saving of nested frozen dataclasses


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to the annotated type ``tp`` or raise UserError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        real = [a for a in args if a is not type(None)]
        if type(None) in args and (value is None or (value == NONE and str not in real)):
            return None
        if len(real) == 1:  # Optional[X]: X's own message
            return _coerce(key, value, real[0])
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except UserError as e:
                errors.append(str(e))
        raise UserError(f"{key}: expected {' or '.join(_type_name(a) for a in args if a is not type(None))}"
                        f", got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise UserError(f"{key}: expected one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise UserError(f"{key}: expected a table of {tp.__name__} settings, got {value!r}")
        return _from_mapping(tp, value, prefix=key + ".")
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"{key}: expected a table, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(f"{key}", k, kt): _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"{key}: expected {len(args)} values, got {value!r}")
            out = [_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args))]
        else:
            elem = args[0] if args else Any
            out = [_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value)]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{key}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise UserError(f"{key}: expected a path, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise UserError(f"{key}: cannot read a value of type {_type_name(tp)} from {value!r}")


def _from_mapping(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        k = unknown[0]
        raise UserError(f"unknown config key {prefix}{k!s} (= {data[k]!r}); expected one of: "
                        f"{', '.join(sorted(names))}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        default = _field_default(fields[k])
        if dataclasses.is_dataclass(default) and isinstance(v, Mapping):
            # A section given partly: its other keys keep this class's default for the section
            # (e.g. a task's own trainer defaults), not the section class's bare defaults.
            v = _deep_merge(_fields_mapping(default), v)
        kwargs[k] = _coerce(prefix + k, v, hints[k])
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field missing
        raise UserError(f"{prefix or cls.__name__}: {e}") from None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _fields_mapping(cfg: Any) -> dict[str, Any]:
    """Nested dict of a dataclass instance's init fields, keeping None (unlike ``config_to_dict``)."""
    return {f.name: (_fields_mapping(getattr(cfg, f.name)) if dataclasses.is_dataclass(getattr(cfg, f.name))
                     else getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}


def _deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def config_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build config class ``cls`` from a nested mapping (e.g. parsed TOML), type-checked."""
    return _from_mapping(cls, data)


#: how a setting is written as None where its default is not (TOML has no null); ``--set key=none`` too
NONE = "none"


def config_to_dict(cfg: Any, defaults: Any = None) -> dict[str, Any]:
    """Nested plain dict of a config dataclass. TOML has no null: a ``None`` equal to its default is left
    out, any other is written as ``"none"`` (a section's defaults are its owner's: ``defaults``)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        d = _field_default(f) if defaults is None else getattr(defaults, f.name, None)
        if v is None:
            if d is not None:
                out[f.name] = NONE
            continue
        if dataclasses.is_dataclass(v):
            v = config_to_dict(v, d if dataclasses.is_dataclass(d) else None)
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, Path):
            v = str(v)
        out[f.name] = v
    return out


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``"a.b.c=value"`` into (["a", "b", "c"], parsed value)."""
    if "=" not in item:
        raise UserError(f"--set: expected KEY=VALUE (e.g. trainer.optim.lr=3e-3), got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip().removeprefix("--")
    if not key or any(not p for p in key.split(".")):
        raise UserError(f"--set: expected a dotted key before '=', got {item!r}")
    return key.split("."), _parse_value(text.strip())


def _set_nested(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for p in path[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError(f"--set {'.'.join(path)}: {p!r} is a value, not a section")
        node = nxt
    node[path[-1]] = value


def _check_paths(cls: type, path: list[str], value: Any) -> None:
    tp: Any = cls
    for i, p in enumerate(path):
        if not dataclasses.is_dataclass(tp):
            raise UserError(f"unknown config key {'.'.join(path)} (= {value!r}): "
                            f"{'.'.join(path[:i])} is not a section")
        hints = typing.get_type_hints(tp)
        if p not in hints:
            raise UserError(f"unknown config key {'.'.join(path)} (= {value!r}); expected one of: "
                            f"{', '.join(sorted(hints))}" + (f" under {'.'.join(path[:i])}" if i else ""))
        tp = hints[p]


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: Sequence[str] | Mapping[str, Any] = (), base: Mapping[str, Any] | None = None) -> T:
    """Load config class ``cls``: its defaults < ``base`` < a TOML file (optional) < ``overrides``.

    A section given in part keeps the owner's defaults for its other keys.

    Args:
        cls: a (frozen) dataclass, possibly with nested dataclass fields (sections).
        path: TOML file; None = defaults only.
        overrides: ``"section.key=value"`` strings (``--set``) or a mapping of dotted keys to values.
        base: dotted keys applied under the file, e.g. a preset (``wordlm --preset zaremba-small``).
    Returns:
        an instance of ``cls``.
    Raises:
        UserError: missing/unreadable file, TOML syntax error, unknown key, wrong type or bad value.
    """
    data: dict[str, Any] = {}
    _apply_dotted(cls, data, base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"--config: file not found: {str(p)!r}")
        try:
            data = _deep_merge(data, tomllib.loads(p.read_text(encoding="utf-8")))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"--config {str(p)!r}: not valid TOML: {e}") from None
    _apply_dotted(cls, data, overrides)
    return _from_mapping(cls, data)


def _apply_dotted(cls: type, data: dict[str, Any], overrides: Sequence[str] | Mapping[str, Any]) -> None:
    items = overrides.items() if isinstance(overrides, Mapping) else (parse_override(o) for o in overrides)
    for key, value in items:
        keys = key.split(".") if isinstance(key, str) else key
        _check_paths(cls, keys, value)
        _set_nested(data, keys, value)


def replace_config(cfg: T, **dotted: Any) -> T:
    """Copy of ``cfg`` with dotted keys replaced (``replace_config(c, **{"trainer.steps": 10})``), type-checked."""
    data = config_to_dict(cfg)
    for key, value in dotted.items():
        _check_paths(type(cfg), key.split("."), value)
        _set_nested(data, key.split("."), value)
    return _from_mapping(type(cfg), data)


def save_config(cfg: Any, run_dir: str | os.PathLike, name: str = "config.toml") -> Path:
    """Write the resolved config as TOML to ``run_dir/name`` (atomically) and return the path."""
    from .checkpoint import atomic_write_bytes

    path = Path(run_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, tomli_w.dumps(config_to_dict(cfg)).encode())
    return path


__all__ = ["OptimConfig", "ScheduleConfig", "TrainerConfig", "load_config", "save_config", "config_to_dict",
           "config_from_dict", "replace_config", "parse_override", "validate_trainer_config"]
