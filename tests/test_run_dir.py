"""A run directory is only changed by a run allowed to own it: resume checks, the lock, strict JSON,
damaged checkpoint metadata, and the trainer's progress state saved and restored whole."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rnnkit.errors import TrainingError, UserError
from rnnkit.train import StreamData, Trainer, TrainerConfig, list_checkpoints, load_checkpoint, load_config
from rnnkit.train.checkpoint import atomic_write_bytes
from rnnkit.train.monitor import restore_record, strict_record
from rnnkit.train.rundir import lock_run_dir, setting_differences
from rnnkit.train.toy import StreamLMTask, TinyLM, random_tokens, run
from rnnkit.train.trainer import TrainState

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {"batch_size": 4, "tbptt": 8, "optim.name": "adam", "optim.lr": 3e-3, "tensorboard": False, "log_every": 2}


def snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a run directory (but its lock) with its bytes and modification time."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


def trainer(run_dir, *, hidden=16, resume=False, evaluate=None, **kw) -> Trainer:
    cfg = load_config(TrainerConfig, None, {**BASE, **kw})
    torch.manual_seed(0)
    ids = random_tokens(801, seed=1)
    return Trainer(TinyLM(hidden=hidden), StreamLMTask(), StreamData(ids[:-1], ids[1:]), cfg, run_dir,
                   resume=resume, quiet=True, evaluate=evaluate)


# ------------------------------------------------------------------------------------ rejected resume


@pytest.mark.parametrize("change,expected", [
    ({"hidden": 32}, "weights differ (head.weight: (11, 16) in the checkpoint, (11, 32) now"),  # not in the config
    ({"batch_size": 8}, "batch_size: 4 -> 8"),
    ({"tbptt": 16}, "tbptt: 8 -> 16"),
    ({"optim.name": "sgd"}, "name: 'adam' -> 'sgd'"),
])
def test_rejected_resume_changes_nothing_and_names_the_setting(tmp_path, change, expected):
    trainer(tmp_path, steps=4, checkpoint_every=2).fit()
    before = snapshot(tmp_path)
    kw = {"steps": 6, "checkpoint_every": 2, **change}
    with pytest.raises(UserError, match="does not fit this run") as e:
        trainer(tmp_path, resume=True, **kw).fit()
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert snapshot(tmp_path) == before
    # the run is intact: it resumes with its own settings
    assert trainer(tmp_path, resume=True, steps=6, checkpoint_every=2).fit()["step"] == 6


def test_setting_differences_lists_old_and_new_values():
    old = {"model": {"hidden_size": 32, "cell": "lstm"}, "trainer": {"steps": 20, "lr": 0.1}}
    new = {"model": {"hidden_size": 64, "cell": "lstm"}, "trainer": {"steps": 40, "lr": 0.1}, "extra": 1}
    assert setting_differences(old, new) == ["extra: '(unset)' -> 1", "model.hidden_size: 32 -> 64"]
    many = setting_differences({f"k{i}": i for i in range(12)}, {}, limit=3)
    assert len(many) == 4 and many[-1] == "and 9 more"


# ------------------------------------------------------------------------------------ the lock


HOLD = "import sys, time; from rnnkit.train.rundir import lock_run_dir\nwith lock_run_dir(sys.argv[1]):\n" \
       "    print('locked', flush=True); time.sleep(60)\n"


def test_second_writer_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"in use by another process \(PID {holder.pid}\)"):
            trainer(tmp_path, steps=2).fit()
        assert not list_checkpoints(tmp_path / "checkpoints") and not (tmp_path / "config.toml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert trainer(tmp_path, steps=2).fit()["step"] == 2


def test_lock_is_reentrant_within_a_process_and_released(tmp_path):
    with lock_run_dir(tmp_path), lock_run_dir(tmp_path):
        trainer(tmp_path, steps=1).fit()  # the trainer takes the lock its task already holds
    import fcntl

    fd = os.open(tmp_path / ".lock", os.O_RDWR)  # a new open file: it conflicts with any flock still held
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_a_training_command_locks_a_new_out_for_its_whole_run_and_removes_it_if_left_empty(tmp_path):
    from rnnkit.cli.common import RunOptions, _owning

    new = tmp_path / "new"
    with _owning(RunOptions(out=new), trains=True):
        assert (new / ".lock").read_text().strip() == str(os.getpid())
        other = subprocess.run([sys.executable, "-c", HOLD, str(new)], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
        assert f"PID {os.getpid()}" in other.stderr  # a second writer is refused before the trainer starts
    assert not new.exists()  # failed before writing anything: nothing is left behind
    with _owning(RunOptions(out=new), trains=True):
        (new / "config.toml").write_text("")
    assert (new / "config.toml").exists()


# ------------------------------------------------------------------------------------ non-finite values


def strict_loads(text: str):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_infinite_eval_loss_is_recorded_as_null_with_a_flag(tmp_path):
    values = iter([1.0, math.inf, math.nan])
    trainer(tmp_path, steps=6, eval_every=2, checkpoint_every=2,
            evaluate=lambda m: {"loss": next(values)}).fit()
    evals = [r for r in map(strict_loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"]
    assert [r["eval/loss"] for r in evals] == [1.0, None, None]
    assert [r.get("nonfinite") for r in evals] == [None, {"eval/loss": "inf"}, {"eval/loss": "nan"}]
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2, 4, 6]
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))
    for _, path in list_checkpoints(tmp_path / "checkpoints"):
        strict_loads(json.loads(path.read_text())["body"])
    meta = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[1][1]).meta
    assert meta["progress"]["last_eval"] == {"loss": None}
    assert TrainState.from_json(meta["progress"]).last_eval["loss"] == math.inf
    assert TrainState.from_json(meta["progress"]).best == 1.0


def test_strict_record_round_trip():
    rec = {"loss": math.inf, "n": 3, "m": {"a": -math.inf, "b": 1.5}, "x": math.nan}
    out = strict_record(rec)
    strict_loads(json.dumps(out, allow_nan=False))
    back = restore_record(json.loads(json.dumps(out)))
    assert back["loss"] == math.inf and back["m"] == {"a": -math.inf, "b": 1.5} and math.isnan(back["x"])


@pytest.mark.parametrize("lr,match", [(math.inf, "finite number > 0"), (math.nan, "finite number > 0"),
                                      (1e300, "beyond the range")])
def test_learning_rates_that_cannot_train_are_rejected(tmp_path, lr, match):
    with pytest.raises(UserError, match=match):
        trainer(tmp_path, steps=2, **{"optim.name": "sgd", "optim.lr": lr}).fit()


# ------------------------------------------------------------------------------------ damaged metadata


def rewrite_meta(path: Path, edit) -> None:
    """Change a checkpoint's metadata and re-seal it with a valid checksum."""
    import hashlib

    body = json.loads(json.loads(path.read_text())["body"])
    edit(body)
    text = json.dumps(body, sort_keys=True)
    atomic_write_bytes(path, json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest(),
                                         "body": text}).encode())


@pytest.mark.parametrize("edit", [
    lambda b: b.pop("optimizer"),
    lambda b: b.pop("tensors_file"),
    lambda b: b["progress"].pop("epoch"),
    lambda b: b["progress"].update(step="four"),
    lambda b: b.update(ranks="nothing"),
    lambda b: b.update(rng_python=[3]),
    lambda b: b.clear() or b.update(format=1),
], ids=["optimizer", "tensors_file", "epoch", "step-type", "ranks", "rng", "empty"])
def test_valid_checksum_but_malformed_content_falls_back(tmp_path, edit):
    run(str(tmp_path / "run"), steps=4, checkpoint_every=2, **BASE)
    newest = list_checkpoints(tmp_path / "run" / "checkpoints")[-1][1]
    rewrite_meta(newest, edit)
    with pytest.warns(RuntimeWarning, match="damaged checkpoint of step 4"):
        resumed = run(str(tmp_path / "run"), steps=6, resume=True, checkpoint_every=2, **BASE)
    ref = run(str(tmp_path / "ref"), steps=6, **BASE)
    assert all(torch.equal(ref["params"][k], v) for k, v in resumed["params"].items())


def test_all_checkpoints_malformed_is_one_clear_error(tmp_path):
    run(str(tmp_path / "run"), steps=2, checkpoint_every=2, **BASE)
    rewrite_meta(list_checkpoints(tmp_path / "run" / "checkpoints")[-1][1], lambda b: b.pop("schedule"))
    with pytest.warns(RuntimeWarning), pytest.raises(TrainingError, match="no usable checkpoint"):
        run(str(tmp_path / "run"), steps=4, resume=True, **BASE)


# ------------------------------------------------------------------------------------ the progress state


def test_progress_state_is_saved_and_restored_whole(tmp_path):
    """Every TrainState field is in the checkpoint and comes back: a field added to the structure is
    saved and restored, and nothing else lists them."""
    tr = trainer(tmp_path, steps=1)
    tr.fit()
    distinct = {"step": 1, "epoch": 7, "batch_index": 2, "skipped_steps": 5, "nonfinite_in_a_row": 1,
                "best": 0.25, "best_step": 1, "evals_without_improvement": 4, "elapsed_s": 12.5,
                "last_eval": {"loss": math.inf, "acc": 0.5}, "last_eval_step": 1, "train_loss": math.nan}
    assert set(distinct) == {f.name for f in dataclasses.fields(TrainState)}, "give the new field a value here"
    tr.state = TrainState(**distinct)
    tr._t_start = time.perf_counter()
    tr.last_checkpoint_step = None
    tr.run_dir = tmp_path / "again"
    tr._save()
    found = load_checkpoint(list_checkpoints(tmp_path / "again" / "checkpoints")[-1][1])
    assert set(found.meta["progress"]) - {"nonfinite"} == set(distinct)
    fresh = trainer(tmp_path / "other", steps=1)
    fresh.state = dataclasses.replace(fresh.state, epoch=1, batch_index=2)  # the decoded run must fit the data
    fresh.load_checkpoint(found)
    got = dataclasses.asdict(fresh.state)
    assert math.isnan(got.pop("train_loss")) and got.pop("elapsed_s") >= 12.5
    want = {k: v for k, v in distinct.items() if k not in ("train_loss", "elapsed_s")}
    assert got == want


# ------------------------------------------------------------------------------------ the command line


def test_cli_rejected_resume_is_one_line_and_the_run_still_works(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from rnnkit.cli.main import app

    monkeypatch.setenv("RNNKIT_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "small.txt"
    text.write_text("the cat sat on the mat. " * 200, encoding="utf-8")
    out = tmp_path / "R"
    tiny = ["--layers", "1", "--embedding-size", "4", "--batch-size", "4", "--tbptt", "10", "--quiet",
            "--set", "trainer.tensorboard=false", "--out", str(out)]
    runner = CliRunner()
    ok = runner.invoke(app, ["charlm", "train", "--text", str(text), "--steps", "4", "--hidden-size", "8", *tiny])
    assert ok.exit_code == 0, ok.output
    before = snapshot(out)
    for change, shown in ((["--hidden-size", "16"], "model.hidden_size: 8 -> 16"),
                          (["--hidden-size", "8", "--cell", "gru"], "model.cell: "),
                          (["--hidden-size", "8", "--batch-size", "2"], "trainer.batch_size: 4 -> 2")):
        res = runner.invoke(app, ["charlm", "train", "--text", str(text), "--resume", "--steps", "6", *tiny, *change])
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and shown in lines[0], res.output
        assert "Traceback" not in res.output
        assert snapshot(out) == before
    res = runner.invoke(app, ["charlm", "sample", str(out), "--length", "5", "--seed", "1"])
    assert res.exit_code == 0, res.output
