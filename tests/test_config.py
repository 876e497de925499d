"""Configuration: TOML loading, overrides, type and key errors, saving; the shared CLI flags."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from rnnkit.cli.common import RunOptions, run_command
from rnnkit.errors import TrainingError, UserError
from rnnkit.train import OptimConfig, TrainerConfig, load_config, replace_config, save_config


@dataclass(frozen=True)
class ModelCfg:
    cell: str = "lstm"
    hidden_size: int = 64
    layers: tuple[int, ...] = (1,)
    data_path: Path | None = None
    weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskCfg:
    model: ModelCfg = field(default_factory=ModelCfg)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def test_defaults_and_frozen():
    cfg = load_config(TaskCfg)
    assert cfg.trainer.optim == OptimConfig() and cfg.model.hidden_size == 64
    with pytest.raises(AttributeError):
        cfg.model.hidden_size = 3  # type: ignore[misc]


def test_toml_then_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[model]\nhidden_size = 200\ndata_path = "x/y.txt"\n'
                 '[trainer]\nsteps = 10\nclip_norm = 5\n[trainer.optim]\nname = "sgd"\nlr = 1\n'
                 '[trainer.schedule]\nname = "step"\nstart_epoch = 5\n')
    cfg = load_config(TaskCfg, p, ["trainer.optim.lr=0.5", "model.cell=gru", "trainer.optim.betas=[0.8, 0.9]",
                                   "--model.layers=[2, 3]"])
    assert cfg.model == ModelCfg("gru", 200, (2, 3), Path("x/y.txt"))
    assert load_config(TaskCfg, None, ["model.weights={a = 1, b = 0.5}"]).model.weights == {"a": 1.0, "b": 0.5}
    with pytest.raises(UserError, match=r"model\.weights\.a: expected a number, got 'x'"):
        load_config(TaskCfg, None, ['model.weights={a = "x"}'])
    assert cfg.trainer.steps == 10 and cfg.trainer.clip_norm == 5.0 and isinstance(cfg.trainer.clip_norm, float)
    assert cfg.trainer.optim.name == "sgd" and cfg.trainer.optim.lr == 0.5 and cfg.trainer.optim.betas == (0.8, 0.9)
    assert cfg.trainer.schedule.start_epoch == 5


@pytest.mark.parametrize("overrides,match", [
    (["model.hiden_size=3"], r"unknown config key model\.hiden_size \(= 3\)"),
    (["trainer.optim.lr=fast"], r"trainer\.optim\.lr: expected a number, got 'fast'"),
    (["model.hidden_size=2.5"], r"model\.hidden_size: expected an integer, got 2\.5"),
    (["trainer.optim.name=adagrad"], r"trainer\.optim\.name: expected one of .*'adam'.* got 'adagrad'"),
    (["trainer.deterministic=1"], r"trainer\.deterministic: expected true or false, got 1"),
    (["model.hidden_size.x=1"], r"model\.hidden_size is not a section"),
    (["trainer.optim.betas=[0.9]"], r"expected 2 values"),
    (["trainer.batch_size=0"], r"trainer\.batch_size: expected a number > 0, got 0"),
    (["trainer.optim.nesterov=true"], r"nesterov: needs name='sgd' and momentum > 0"),
    (["trainer.steps"], r"--set: expected KEY=VALUE"),
])
def test_override_errors_quote_key_and_value(overrides, match):
    with pytest.raises(UserError, match=match):
        load_config(TaskCfg, None, overrides)


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_config(TaskCfg, tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nx = ")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(TaskCfg, bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[trainer]\nlearning_rate = 0.1\n")
    with pytest.raises(UserError, match=r"unknown config key trainer\.learning_rate \(= 0\.1\)"):
        load_config(TaskCfg, unknown)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[trainer]\nsteps = "many"\n')
    with pytest.raises(UserError, match=r"trainer\.steps: expected an integer, got 'many'"):
        load_config(TaskCfg, wrong)


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(TaskCfg, None, ["trainer.steps=7", "model.data_path=a.txt", "trainer.optim.name=adamw"])
    path = save_config(cfg, tmp_path)
    assert path == tmp_path / "config.toml"
    assert load_config(TaskCfg, path) == cfg
    assert replace_config(cfg, **{"trainer.optim.lr": 0.1}).trainer.optim.lr == 0.1


def test_a_none_that_is_not_the_default_survives_saving(tmp_path):
    """TOML has no null: a None where the owner's default is a value is written "none" and read back as None
    (a task's trainer of 100 epochs, set to train by steps alone, must resume the same way)."""

    @dataclass(frozen=True)
    class Task:
        trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(epochs=100, clip_norm=1.0))

    cfg = replace_config(Task(), **{"trainer.epochs": None, "trainer.steps": 50})
    assert (cfg.trainer.epochs, cfg.trainer.steps, cfg.trainer.clip_norm) == (None, 50, 1.0)
    text = save_config(cfg, tmp_path).read_text()
    assert 'epochs = "none"' in text and "clip_value" not in text  # a None equal to its default is left out
    assert load_config(Task, tmp_path / "config.toml") == cfg
    assert load_config(Task, None, ["trainer.clip_norm=none"]).trainer.clip_norm is None
    with pytest.raises(UserError, match="trainer.steps: expected an integer, got 'abc'"):
        load_config(Task, None, ["trainer.steps=abc"])


# ------------------------------------------------------------------------------------------------ CLI common

app = typer.Typer()


@app.command()
@run_command("demo")
def train(name: str = typer.Argument("x"), *, opts: RunOptions) -> None:
    cfg = opts.load_config(TaskCfg)
    run_dir = opts.run_dir
    if name == "diverge":
        raise TrainingError("loss is nan")
    opts.info("progress line")
    opts.emit({"name": name, "steps": cfg.trainer.steps, "seed": cfg.trainer.seed, "lr": cfg.trainer.optim.lr,
               "out": str(run_dir), "resume": opts.resume, "nan": float("nan")})


@app.command()
def other() -> None:
    """A second command, so that typer keeps sub-command names."""


runner = CliRunner()


def test_cli_flags_map_to_config(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[trainer]\nsteps = 3\nseed = 1\n")
    res = runner.invoke(app, ["train", "abc", "--config", str(p), "--set", "trainer.optim.lr=0.25", "--seed", "9",
                              "--out", str(tmp_path / "run"), "--resume", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"name": "abc", "steps": 3, "seed": 9, "lr": 0.25, "out": str(tmp_path / "run"), "resume": True,
                   "nan": None}
    res = runner.invoke(app, ["train", "--steps", "5", "--quiet"])
    assert res.exit_code == 0 and "progress line" not in res.output
    assert "steps   5\n" in res.stdout and "runs/demo-" in res.stdout


@pytest.mark.parametrize("argv,code,match", [
    (["train", "--set", "trainer.optim.lr=abc"], 2, "error: trainer.optim.lr: expected a number, got 'abc'"),
    (["train", "--set", "trainer.nope=1"], 2, "error: unknown config key trainer.nope"),
    (["train", "--steps", "0"], 2, "error: trainer.steps: expected a number > 0"),
    (["train", "--resume"], 2, "error: --resume: needs --out"),
    (["train", "--config", "/nonexistent.toml"], 2, "error: --config: file not found"),
    (["train", "diverge"], 1, "error: loss is nan"),
])
def test_cli_errors_are_one_line(argv, code, match):
    res = runner.invoke(app, argv)
    assert res.exit_code == code
    lines = res.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(match), res.stderr
    assert "Traceback" not in res.output


def test_cli_debug_shows_traceback():
    res = runner.invoke(app, ["train", "--steps", "0", "--debug"])
    assert res.exit_code == 2 and "Traceback" in res.stderr and "UserError" in res.stderr


def test_run_command_needs_opts():
    with pytest.raises(TypeError, match="opts"):
        run_command("x")(lambda a: None)


def test_partial_section_override_keeps_the_owner_defaults():
    """Overriding one trainer key keeps a task's own trainer defaults for the other keys."""
    import dataclasses

    from rnnkit.train import TrainerConfig, load_config

    @dataclasses.dataclass(frozen=True)
    class TaskCfg:
        trainer: TrainerConfig = dataclasses.field(
            default_factory=lambda: TrainerConfig(clip_norm=1.0, batch_size=7))

    cfg = load_config(TaskCfg, overrides=["trainer.seed=3"])
    assert (cfg.trainer.seed, cfg.trainer.clip_norm, cfg.trainer.batch_size) == (3, 1.0, 7)
