"""Data-parallel training: 2 processes (torchrun, gloo on loopback) equal 1 process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rnnkit.train import latest_good_checkpoint
from rnnkit.train.toy import run

pytestmark = pytest.mark.slow  # two torchrun launches: ~20-60 s on a busy 2-core machine

STREAM = {"batch_size": 4, "tbptt": 8, "tbptt_backward": 11, "optim.name": "adam", "optim.lr": 3e-3,
          "clip_norm": 1.0, "tensorboard": False}
SAMPLE = {"batch_size": 10, "grad_accum": 2, "optim.name": "sgd", "optim.lr": 0.1, "optim.momentum": 0.9,
          "tensorboard": False}


def _torchrun(out, kind: str, settings: dict, resume: bool = False) -> None:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "rnnkit.train.toy", "--out", str(out), "--kind", kind, "--dropout", "0"]
    if resume:
        args.append("--resume")
    for k, v in settings.items():
        text = str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, str) else str(v)
        args += ["--set", f"{k}={text}"]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("kind,settings", [("stream", STREAM), ("sample", SAMPLE)])
def test_two_processes_match_one_and_resume(tmp_path, kind, settings):
    out = tmp_path / "ddp"
    _torchrun(out, kind, {**settings, "steps": 4, "checkpoint_every": 2}, )
    _torchrun(out, kind, {**settings, "steps": 8, "checkpoint_every": 2}, resume=True)  # distributed resume
    ckpt = latest_good_checkpoint(out / "checkpoints")
    assert ckpt.step == 8 and ckpt.meta["world_size"] == 2
    ddp = {k[len("model."):]: v for k, v in ckpt.tensors.items() if k.startswith("model.")}
    n = torch.get_num_threads()
    try:
        single = run(None, kind=kind, dropout=0.0, steps=8, **settings)["params"]
    finally:
        torch.set_num_threads(n)
    assert ddp.keys() == single.keys()
    for k in ddp:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    moved = run(None, kind=kind, dropout=0.0, steps=1, **settings)["params"]
    assert any(not torch.allclose(moved[k], single[k]) for k in single)  # the comparison is not vacuous
