"""Exact resume: in-process interruption, a real SIGKILL of a subprocess, damaged checkpoints."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rnnkit.train import list_checkpoints, load_checkpoint
from rnnkit.train.checkpoint import CheckpointError
from rnnkit.train.toy import run

STREAM = {"batch_size": 4, "tbptt": 8, "tbptt_backward": 11, "optim.name": "adam", "optim.lr": 3e-3,
          "clip_norm": 1.0, "tensorboard": False, "log_every": 3, "schedule.name": "cosine",
          "schedule.warmup_steps": 3, "schedule.total_steps": 200}
SAMPLE = {"batch_size": 10, "grad_accum": 2, "optim.name": "sgd", "optim.lr": 0.1, "optim.momentum": 0.9,
          "tensorboard": False, "log_every": 3, "eval_every": 0}


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # toy.run uses 1 thread too (bit-exact comparisons, and a busy machine)
    yield
    torch.set_num_threads(n)


def _toml(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, str) else str(v)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs"


@pytest.mark.parametrize("kind,settings", [("stream", STREAM), ("sample", SAMPLE)])
def test_stop_and_resume_is_bit_exact(tmp_path, kind, settings):
    ref = run(str(tmp_path / "ref"), kind=kind, steps=13, **settings)
    run(str(tmp_path / "cut"), kind=kind, steps=6, checkpoint_every=3, **settings)  # epochs cross for "sample"
    resumed = run(str(tmp_path / "cut"), kind=kind, steps=13, resume=True, checkpoint_every=3, **settings)
    _assert_same(ref["params"], resumed["params"])
    assert resumed["step"] == 13
    steps = [int(line.split('"step": ')[1].split(",")[0])
             for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicated records


def _start_and_kill(out: Path, resume: bool) -> None:
    """Start the toy training in a subprocess, wait for a new checkpoint, SIGKILL it at a random moment."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    args = [sys.executable, "-m", "rnnkit.train.toy", "--out", str(out), "--set", "steps=100000",
            "--set", "checkpoint_every=1", "--set", "keep_checkpoints=2"] + (["--resume"] if resume else [])
    args += [a for k, v in STREAM.items() for a in ("--set", f"{k}={_toml(v)}")]
    before = list_checkpoints(out / "checkpoints")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while list_checkpoints(out / "checkpoints")[-1:] == before[-1:]:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        time.sleep(random.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    """Kill a training subprocess at a random moment (often inside a checkpoint write), resume, compare."""
    out = tmp_path / "killed"
    _start_and_kill(out, resume=False)
    last = list_checkpoints(out / "checkpoints")[-1][0]
    total = last + 4
    resumed = run(str(out), steps=total, resume=True, checkpoint_every=1, keep_checkpoints=2, **STREAM)
    ref = run(str(tmp_path / "ref"), steps=total, **STREAM)
    assert resumed["step"] == total
    _assert_same(ref["params"], resumed["params"])


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        i = len(data) - 20
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])


@pytest.mark.parametrize("target,how", [("safetensors", "truncate"), ("safetensors", "flip"), ("json", "truncate"),
                                        ("json", "flip")])
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, target, how):
    run(str(tmp_path / "run"), steps=6, checkpoint_every=2, **STREAM)
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [s for s, _ in ckpts] == [2, 4, 6]
    newest = ckpts[-1][1]
    _corrupt(newest.with_suffix(f".{target}"), how)
    with pytest.raises(CheckpointError):
        load_checkpoint(newest)
    with pytest.warns(RuntimeWarning, match="damaged checkpoint of step 6"):
        resumed = run(str(tmp_path / "run"), steps=9, resume=True, checkpoint_every=2, **STREAM)
    ref = run(str(tmp_path / "ref"), steps=9, **STREAM)
    _assert_same(ref["params"], resumed["params"])


def test_checkpoint_files_need_no_pickle(tmp_path):
    run(str(tmp_path / "run"), steps=2, checkpoint_every=2, **STREAM)
    _, path = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    from safetensors import safe_open

    with safe_open(str(path.with_suffix(".safetensors")), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("model.") for k in keys) and any(k.startswith("optim.") for k in keys)
    assert any(k.startswith("ranks.0.carry") for k in keys)  # the carried recurrent state
    assert path.read_text().startswith("{")


def test_find_checkpoint_best_latest_and_step(tmp_path):
    import rnnkit.train.toy as toy
    from rnnkit.errors import UserError
    from rnnkit.train import StreamData, Trainer, TrainerConfig, find_checkpoint, load_config, model_state_dict

    scores = iter([3.0, 1.0, 2.0, 2.5, 2.7])
    torch.manual_seed(0)
    ids = toy.random_tokens(801)
    model = toy.TinyLM()
    cfg = load_config(TrainerConfig, None, {"steps": 10, "batch_size": 4, "tbptt": 10, "eval_every": 2,
                                            "checkpoint_every": 2, "keep_checkpoints": 1, "tensorboard": False})
    Trainer(model, toy.StreamLMTask(), StreamData(ids[:-1], ids[1:]), cfg, tmp_path,
            evaluate=lambda m: {"loss": next(scores)}, quiet=True).fit()
    assert find_checkpoint(tmp_path).step == 10
    best = find_checkpoint(tmp_path, "best")
    assert best.step == 4 and find_checkpoint(tmp_path / "checkpoints", 4).step == 4
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [4, 10]
    final = model_state_dict(find_checkpoint(tmp_path))
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())
    assert model_state_dict(best).keys() == final.keys()
    with pytest.raises(UserError, match="one of the steps"):
        find_checkpoint(tmp_path, 6)
    assert find_checkpoint(tmp_path / "nothing") is None


def test_resume_without_checkpoint_starts_fresh_and_notes_changes(tmp_path, capfd):
    a = run(str(tmp_path / "a"), steps=3, resume=True, quiet=False, checkpoint_every=3, **STREAM)
    assert "no checkpoint" in capfd.readouterr().err
    ref = run(str(tmp_path / "b"), steps=3, **STREAM)
    _assert_same(ref["params"], a["params"])
    run(str(tmp_path / "a"), steps=4, resume=True, quiet=False, **{**STREAM, "clip_norm": 2.0})
    assert "settings differ from the checkpoint's: clip_norm" in capfd.readouterr().err


def test_loading_never_unpickles(tmp_path):
    import json as _json

    import rnnkit.train as train_pkg
    from rnnkit.train.checkpoint import save_checkpoint

    src = Path(train_pkg.__file__).parent
    for f in src.glob("*.py"):
        text = f.read_text()
        assert "torch.load" not in text and "import pickle" not in text, f.name
    # a checkpoint whose metadata points outside its directory is refused, even with valid checksums
    path = save_checkpoint(tmp_path, 1, {"model.w": torch.zeros(2)}, {"x": 1})
    outer = _json.loads(path.read_text())
    body = _json.loads(outer["body"])
    body["tensors_file"] = "../evil.safetensors"
    text = _json.dumps(body, sort_keys=True)
    import hashlib

    path.write_text(_json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest(), "body": text}))
    with pytest.raises(CheckpointError, match="outside"):
        load_checkpoint(path)


@pytest.mark.slow
def test_three_kills_in_a_row(tmp_path):
    out = tmp_path / "killed"
    for i in range(3):
        _start_and_kill(out, resume=i > 0)
    total = list_checkpoints(out / "checkpoints")[-1][0] + 3
    resumed = run(str(out), steps=total, resume=True, checkpoint_every=1, keep_checkpoints=2, **STREAM)
    _assert_same(run(str(tmp_path / "ref"), steps=total, **STREAM)["params"], resumed["params"])
