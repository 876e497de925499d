"""``rnnkit experiment``: task runs on the Trainer, config layering, errors, gradient flow, ablation grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rnnkit.cli.common import RunOptions
from rnnkit.cli.experiment import load_experiment_config
from rnnkit.cli.main import app

runner = CliRunner()
TINY = ["--hidden", "8", "--batch", "8", "--test-samples", "40", "--quiet", "--json",
        "--set", "trainer.tensorboard=false"]


def _invoke(args: list[str]):
    res = runner.invoke(app, args)
    return res


def test_adding_run_writes_the_evidence(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = _invoke(["experiment", "adding", "--length", "12", "--steps", "20", "--eval-every", "10",
                   "--out", str(out), *TINY])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["task"] == "adding" and result["steps"] == 20 and result["baseline"] == pytest.approx(1 / 6)
    assert result["test_mse"] > 0 and result["cell"] == "lstm" and result["length"] == 12
    for name in ("config.toml", "metrics.jsonl", "experiment.json", "learning_curve.png", "gradient_flow.json",
                 "gate_stats.json"):
        assert (out / name).is_file(), name
    flow = json.loads((out / "gradient_flow.json").read_text())["curves"]
    assert set(flow) == {"lstm (untrained)", "lstm (trained, 20 steps)"}
    assert all(len(v["h"]) == 12 and len(v["c"]) == 12 for v in flow.values())
    gates = json.loads((out / "gate_stats.json").read_text())
    assert set(gates["layers"][0]) == {"i", "f", "o"} and len(gates["layers"][0]["f"]["left_frac"]) == 8
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["kind"] == "eval"] == [10, 20]
    cfg = (out / "config.toml").read_text()
    assert 'task = "adding"' in cfg and "hidden_size = 8" in cfg and "clip_norm = 1.0" in cfg
    # resume continues the same run to a larger budget
    res = _invoke(["experiment", "adding", "--length", "12", "--steps", "30", "--eval-every", "10",
                   "--out", str(out), "--resume", *TINY])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["steps"] == 30


@pytest.mark.parametrize("task,metric", [("copy", "test_ce"), ("temporal-order", "test_acc"),
                                         ("agreement", "test_acc")])
def test_other_tasks_run(tmp_path: Path, task: str, metric: str) -> None:
    res = _invoke(["experiment", task, "--length", "20", "--steps", "4", "--cell", "gru", "--no-analysis",
                   "--out", str(tmp_path / task), *TINY])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["task"] == task and metric in result and result["steps"] == 4


def test_stop_at_ends_the_run_at_the_first_evaluation_that_reaches_it(tmp_path: Path) -> None:
    res = _invoke(["experiment", "adding", "--length", "8", "--steps", "50", "--eval-every", "5",
                   "--stop-at", "100", "--no-analysis", "--out", str(tmp_path / "r"), *TINY])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["steps"] == 5 and "reached" in result["stop_reason"]


def test_variant_options_reach_the_model(tmp_path: Path) -> None:
    res = _invoke(["experiment", "temporal-order", "--variant", "b", "--length", "20", "--steps", "2",
                   "--drop-gate", "forget", "--peephole", "--forget-bias", "2.5", "--out", str(tmp_path / "r"),
                   *TINY])
    assert res.exit_code == 0, res.output
    cfg = (tmp_path / "r" / "config.toml").read_text()
    assert 'drop_gates = [\n    "forget",\n]' in cfg or 'drop_gates = ["forget"]' in cfg
    assert "peephole = true" in cfg and 'variant = "b"' in cfg
    gates = json.loads((tmp_path / "r" / "gate_stats.json").read_text())
    assert set(gates["layers"][0]) == {"i", "o"}  # no forget gate to measure


def test_config_layering(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("[model]\nhidden_size = 12\ncell = \"gru\"\n[trainer]\nbatch_size = 7\n"
                    "[trainer.optim]\nlr = 0.5\n")
    opts = RunOptions(config=toml, set=("trainer.optim.lr=0.01", "model.num_layers=2"), steps=9)
    cfg = load_experiment_config(opts, "copy", {"model.hidden_size": 9, "data.length": None})
    assert cfg.model.hidden_size == 9 and cfg.model.cell == "gru" and cfg.model.num_layers == 2
    assert cfg.trainer.batch_size == 7 and cfg.trainer.optim.lr == 0.01 and cfg.trainer.steps == 9
    assert cfg.trainer.clip_norm == 1.0  # the experiment default survives a partial [trainer] table
    assert cfg.data.task == "copy" and cfg.data.length == 100


@pytest.mark.parametrize("args,needle", [
    (["experiment", "adding", "--cell", "nope"], "cell: expected one of"),
    (["experiment", "temporal-order", "--variant", "c", "--length", "30"], "variant"),
    (["experiment", "adding", "--variant", "b"], "data.variant"),
    (["experiment", "adding", "--length", "0"], "length: expected an int >= 2, got 0"),
    (["experiment", "adding", "--set", "model.colour=1"], "unknown config key model.colour"),
])
def test_user_errors_exit_2_with_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    res = _invoke([*args, "--steps", "1", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2, res.output
    assert needle in res.stderr and "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1


def test_gradient_flow_command_untrained_and_from_runs(tmp_path: Path) -> None:
    out = tmp_path / "gf"
    res = _invoke(["experiment", "gradient-flow", "--cells", "rnn,lstm", "--length", "30", "--hidden", "16",
                   "--out", str(out), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert (out / "gradient_flow.png").read_bytes()[:4] == b"\x89PNG"
    # an untrained tanh RNN loses more orders of magnitude over 30 steps than an LSTM
    assert summary["rnn (untrained) h: orders lost"] > summary["lstm (untrained) h: orders lost"] > 0
    res = _invoke(["experiment", "gradient-flow", "--from", str(out), "--out", str(tmp_path / "combined"), "--json"])
    assert res.exit_code == 0, res.output
    assert "lstm (untrained) c: decay/step" in json.loads(res.stdout)
    res = _invoke(["experiment", "gradient-flow", "--from", str(tmp_path), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no gradient_flow.json" in res.stderr


@pytest.mark.slow
def test_ablation_grid_runs_in_processes(tmp_path: Path) -> None:
    out = tmp_path / "abl"
    res = _invoke(["experiment", "ablation", "--tasks", "agreement", "--variants", "lstm,lstm_nfg",
                   "--seeds", "2", "--steps", "3", "--length", "6", "--hidden", "8", "--jobs", "2",
                   "--out", str(out), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["errors"] == []
    assert summary["table"]["agreement"]["lstm_nfg"]["n"] == 2
    assert (out / "ablation.md").is_file() and (out / "ablation_agreement.png").is_file()
    assert (out / "agreement" / "lstm" / "seed1" / "experiment.json").is_file()


@pytest.mark.slow
def test_ablation_cell_interrupted_earlier_is_continued(tmp_path: Path) -> None:
    from rnnkit.analysis.ablation import run_one

    run_dir = tmp_path / "agreement" / "lstm" / "seed0"
    first = run_one("agreement", "lstm", 0, 3, 6, 8, run_dir)
    assert "error" not in first
    (run_dir / "experiment.json").unlink()  # as if killed after its last checkpoint
    again = run_one("agreement", "lstm", 0, 6, 6, 8, run_dir)
    assert "error" not in again, again
    assert again["steps"] == 6 and (run_dir / "experiment.json").is_file()


@pytest.mark.slow
def test_lstm_and_gru_learn_short_adding_problem(tmp_path: Path) -> None:
    """T = 20: both gated cells reach a test MSE far below the 1/6 baseline within 2,000 steps."""
    for cell in ("lstm", "gru"):
        res = _invoke(["experiment", "adding", "--cell", cell, "--length", "20", "--hidden", "32", "--lr", "0.005",
                       "--steps", "2000", "--stop-at", "0.02", "--eval-every", "100", "--no-analysis",
                       "--out", str(tmp_path / cell), "--quiet", "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["test_mse"] < 0.05
