"""The training loop: sample batching, accumulation, clipping, schedules, non-finite steps, callbacks, logs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import TrainingError, UserError
from rnnkit.train import Schedule, ScheduleConfig, StreamData, Trainer, TrainerConfig, load_config
from rnnkit.train.toy import ClassifyTask, StreamLMTask, TinyClassifier, TinyLM, random_classification, random_tokens

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: 1 thread is faster and steadier


def cfg(**kw) -> TrainerConfig:
    base = {"tensorboard": False, "log_every": 1000}
    base.update(kw)
    return load_config(TrainerConfig, None, base)


def test_sample_training_learns():
    torch.manual_seed(0)
    data = random_classification(128, seed=0)
    model = TinyClassifier()
    with torch.no_grad():
        before = F.cross_entropy(model(data["x"]), data["y"]).item()
    result = Trainer(model, ClassifyTask(), data, cfg(epochs=15, batch_size=16, **{"optim.lr": 1e-2}), None,
                     quiet=True).fit()
    with torch.no_grad():
        after = F.cross_entropy(model(data["x"]), data["y"]).item()
    assert after < 0.7 * before
    assert result["step"] == 15 * 8 and result["epochs_done"] == 15
    assert result["stop_reason"] == "budget"


def test_grad_accum_equals_larger_batch():
    data = random_classification(32, seed=1)
    torch.manual_seed(1)
    m1 = TinyClassifier()
    m2 = TinyClassifier()
    m2.load_state_dict(m1.state_dict())
    Trainer(m1, ClassifyTask(), data, cfg(steps=2, batch_size=8, **{"optim.name": "sgd", "optim.lr": 0.5}),
            None, quiet=True).fit()
    Trainer(m2, ClassifyTask(), data, cfg(steps=2, batch_size=4, grad_accum=2,
                                           **{"optim.name": "sgd", "optim.lr": 0.5}), None, quiet=True).fit()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_item_weighted_loss_and_list_data():
    """A list of per-sample dicts is collated; (loss, n_items) weights micro-batches by items."""
    data = random_classification(20, seed=2)
    samples = [{"x": data["x"][i], "y": data["y"][i]} for i in range(20)]
    torch.manual_seed(2)
    m1, m2 = TinyClassifier(), TinyClassifier()
    m2.load_state_dict(m1.state_dict())

    class Weighted(ClassifyTask):
        def loss(self, model, batch):
            return super().loss(model, batch), batch["y"].shape[0]

    sgd = {"optim.name": "sgd", "optim.lr": 0.5}
    # 20 samples, batch 8, accumulation 3: micro-batches of 8, 8, 4 -> one step over all 20 samples
    Trainer(m1, Weighted(), samples, cfg(steps=1, batch_size=8, grad_accum=3, **sgd), None, quiet=True).fit()
    Trainer(m2, ClassifyTask(), data, cfg(steps=1, batch_size=20, **sgd), None, quiet=True).fit()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_clip_norm_logs_norm_before_clipping(tmp_path):
    torch.manual_seed(3)
    model = TinyClassifier()
    p0 = [p.detach().clone() for p in model.parameters()]
    Trainer(model, ClassifyTask(), random_classification(16), cfg(
        steps=1, batch_size=16, clip_norm=1e-3, log_every=1, **{"optim.name": "sgd", "optim.lr": 1.0}),
        tmp_path, quiet=True).fit()
    update = torch.sqrt(sum(((a - b.detach()) ** 2).sum() for a, b in zip(p0, model.parameters())))
    assert update.item() == pytest.approx(1e-3, rel=1e-4)
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["grad_norm"] > 1e-2  # the norm before clipping


def test_clip_value():
    torch.manual_seed(4)
    model = TinyClassifier()
    p0 = [p.detach().clone() for p in model.parameters()]
    Trainer(model, ClassifyTask(), random_classification(16), cfg(
        steps=1, batch_size=16, clip_value=1e-4, **{"optim.name": "sgd", "optim.lr": 1.0}), None, quiet=True).fit()
    delta = max((a - b.detach()).abs().max().item() for a, b in zip(p0, model.parameters()))
    assert delta == pytest.approx(1e-4, rel=1e-3)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_optimizers_run(name):
    torch.manual_seed(5)
    kw = {"optim.name": name, "optim.lr": 1e-2}
    if name == "sgd":
        kw.update({"optim.momentum": 0.9, "optim.nesterov": True})
    model = TinyClassifier()
    p0 = [p.detach().clone() for p in model.parameters()]
    Trainer(model, ClassifyTask(), random_classification(16), cfg(steps=2, batch_size=8, **kw), None,
            quiet=True).fit()
    assert any(not torch.equal(a, b) for a, b in zip(p0, model.parameters()))


def test_schedules():
    step = Schedule(ScheduleConfig(name="step", decay=0.5, start_epoch=5), 1.0, None)
    assert [step.lr(0, e) for e in range(1, 8)] == [1, 1, 1, 1, 0.5, 0.25, 0.125]  # Zaremba small
    every2 = Schedule(ScheduleConfig(name="step", decay=0.1, start_epoch=3, every=2), 1.0, None)
    assert [every2.lr(0, e) for e in range(1, 7)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = Schedule(ScheduleConfig(name="cosine", warmup_steps=10, min_factor=0.1), 2.0, 110)
    assert cos.lr(0, 1) == pytest.approx(0.2) and cos.lr(9, 1) == pytest.approx(2.0)
    assert cos.lr(60, 1) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert cos.lr(110, 1) == pytest.approx(0.2) and cos.lr(500, 1) == pytest.approx(0.2)
    plat = Schedule(ScheduleConfig(name="plateau", decay=0.5, patience=2, min_factor=0.2), 1.0, None)
    for v in [1.0, 0.9, 0.95, 0.91]:  # two evaluations without improvement -> halve
        plat.observe(v)
    assert plat.lr(0, 1) == 0.5
    for v in [0.95, 0.95, 0.95, 0.95, 0.95, 0.95]:
        plat.observe(v)
    assert plat.lr(0, 1) == 0.2  # floor
    with pytest.raises(UserError, match="cosine"):
        Schedule(ScheduleConfig(name="cosine"), 1.0, None)


def test_step_schedule_applied_per_epoch(tmp_path):
    torch.manual_seed(6)
    Trainer(TinyClassifier(), ClassifyTask(), random_classification(16), cfg(
        epochs=3, batch_size=8, log_every=1, **{"optim.lr": 0.4, "schedule.name": "step", "schedule.start_epoch": 2}),
        tmp_path, quiet=True).fit()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["lr"]) for r in recs] == [(1, 0.4), (1, 0.4), (2, 0.2), (2, 0.2), (3, 0.1), (3, 0.1)]


class NaNTask(ClassifyTask):
    def __init__(self, bad_steps: set[int]) -> None:
        self.bad = bad_steps
        self.calls = 0

    def loss(self, model, batch):
        self.calls += 1
        loss = super().loss(model, batch)
        return loss * float("nan") if self.calls in self.bad else loss


def test_nonfinite_steps_are_skipped_and_counted():
    torch.manual_seed(7)
    model = TinyClassifier()
    result = Trainer(model, NaNTask({2, 3}), random_classification(16), cfg(steps=5, batch_size=4), None,
                     quiet=True).fit()
    assert result["skipped_steps"] == 2 and result["step"] == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_in_a_row_stops_the_run(tmp_path):
    torch.manual_seed(8)
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        Trainer(TinyClassifier(), NaNTask({2, 3, 4}), random_classification(16),
                cfg(steps=10, batch_size=4, max_nonfinite=3, checkpoint_every=1), tmp_path, quiet=True).fit()
    from rnnkit.train import list_checkpoints

    # skipped steps leave the weights finite, so their checkpoints are good; the fatal step writes none
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [1, 2, 3]


def test_checkpoint_never_written_with_nonfinite_weights(tmp_path):
    torch.manual_seed(9)
    model = TinyClassifier()
    tr = Trainer(model, ClassifyTask(), random_classification(16), cfg(steps=1, batch_size=4), tmp_path, quiet=True)
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite weights"):
        tr.fit()
    assert not list((tmp_path / "checkpoints").glob("*.json"))


def test_callbacks_eval_best_and_early_stopping(tmp_path):
    torch.manual_seed(10)
    events: list[tuple[str, int]] = []
    scores = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])

    def evaluate(model):
        assert not model.training and not torch.is_grad_enabled()
        torch.rand(100)  # consuming RNG in evaluation must not change training
        return {"ppl": next(scores)}

    cbs = {e: (lambda tr, info, e=e: events.append((e, tr.step))) for e in
           ("step_end", "eval", "checkpoint", "epoch_end", "fit_end")}
    tr = Trainer(TinyClassifier(), ClassifyTask(), random_classification(16), cfg(
        steps=50, batch_size=8, eval_every=2, metric="ppl", early_stopping=2, keep_checkpoints=1),
        tmp_path, evaluate=evaluate, callbacks=cbs, quiet=True)
    result = tr.fit()
    assert result["stop_reason"] == "early_stopping" and result["step"] == 8
    assert result["best_ppl"] == 2.0 and result["best_step"] == 4 and result["ppl"] == 2.6
    assert [s for e, s in events if e == "eval"] == [2, 4, 6, 8]
    assert [s for e, s in events if e == "epoch_end"] == [2, 4, 6, 8]
    assert [s for e, s in events if e == "step_end"] == list(range(1, 9))
    assert events[-1] == ("fit_end", 8)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.json"))
    assert ckpts == ["step-00000004.json", "step-00000008.json"]  # the best + the newest


def test_eval_rng_does_not_change_training():
    def run(evaluate):
        torch.manual_seed(11)
        model = TinyClassifier(dropout=0.5)
        Trainer(model, ClassifyTask(), random_classification(16), cfg(steps=4, batch_size=4, eval_every=1), None,
                evaluate=evaluate, quiet=True).fit()
        return list(model.parameters())

    a = run(lambda m: {"loss": 1.0})
    b = run(lambda m: {"loss": float(torch.rand(1000).sum())})
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_run_dir_files(tmp_path):
    torch.manual_seed(12)
    ids = random_tokens(801)
    result = Trainer(TinyLM(), StreamLMTask(), StreamData(ids[:-1], ids[1:]),
                     load_config(TrainerConfig, None, {"steps": 6, "batch_size": 4, "tbptt": 10, "log_every": 2}),
                     tmp_path, evaluate=lambda m: {"loss": 2.0}, quiet=True).fit()
    assert (tmp_path / "config.toml").read_text().count("tbptt = 10") == 1
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert all(math.isfinite(r["loss"]) and r["throughput"] > 0 and r["grad_norm"] > 0 for r in train)
    assert recs[-1] == {"kind": "eval", "step": 6, "epoch": 1, "eval/loss": 2.0}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "step-00000006.json").exists()
    assert result["loss"] == 2.0 and math.isfinite(result["train_loss"])


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    kw = {"steps": 1, "batch_size": 4}
    Trainer(TinyClassifier(), ClassifyTask(), random_classification(8), cfg(**kw), tmp_path, quiet=True).fit()
    with pytest.raises(UserError, match="--resume"):
        Trainer(TinyClassifier(), ClassifyTask(), random_classification(8), cfg(**kw), tmp_path, quiet=True).fit()


def test_bad_inputs():
    with pytest.raises(UserError, match="budget"):
        Trainer(TinyClassifier(), ClassifyTask(), random_classification(8), cfg(), None)
    with pytest.raises(TypeError, match="task.forward"):
        Trainer(TinyLM(), ClassifyTask(), StreamData(torch.arange(50), torch.arange(50)), cfg(steps=1), None)
    class MeanLM(StreamLMTask):
        def loss(self, pred, y):
            return super().loss(pred, y).mean()

    ids = random_tokens(201)
    with pytest.raises(TypeError, match=r"unreduced loss of shape \(T, B\) = \(10, 4\), got \(\)"):
        Trainer(TinyLM(), MeanLM(), StreamData(ids[:-1], ids[1:]), cfg(steps=1, batch_size=4, tbptt=10), None,
                quiet=True).fit()
    with pytest.raises(UserError, match="same length"):
        StreamData(torch.arange(5), torch.arange(4))
    with pytest.raises(UserError, match="trainer.metric"):
        Trainer(TinyClassifier(), ClassifyTask(), random_classification(8), cfg(steps=1, batch_size=4), None,
                evaluate=lambda m: {"acc": 1.0}, quiet=True).fit()
    with pytest.raises(UserError, match="unknown event"):
        Trainer(TinyClassifier(), ClassifyTask(), random_classification(8), cfg(steps=1), None,
                callbacks={"on_step": lambda t, i: None})
    with pytest.raises(UserError, match="--device"):
        Trainer(TinyClassifier(), ClassifyTask(), random_classification(8), cfg(steps=1, device="tpu"), None)


def test_bf16_autocast_runs():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Flatten(), nn.Linear(18, 3))

    class Task:
        def loss(self, model, batch):
            out = model(batch["x"])
            assert out.dtype == torch.bfloat16
            return F.cross_entropy(out.float(), batch["y"])

    result = Trainer(model, Task(), random_classification(16), cfg(steps=2, batch_size=8, precision="bf16"), None,
                     quiet=True).fit()
    assert math.isfinite(result["train_loss"])


def test_minutes_budget_stops_the_run():
    torch.manual_seed(14)
    result = Trainer(TinyClassifier(), ClassifyTask(), random_classification(16),
                     cfg(minutes=1e-6, batch_size=4), None, quiet=True).fit()
    assert result["stop_reason"] == "minutes" and result["step"] == 1


def test_eval_each_epoch_and_evaluate_stream():
    from rnnkit.train import evaluate_stream

    torch.manual_seed(15)
    ids = random_tokens(401, seed=3)
    data = StreamData(ids[:-1], ids[1:])
    model, task = TinyLM(), StreamLMTask()
    seen = []

    def evaluate(m):
        out = evaluate_stream(m, task, data, batch_size=2, chunk=7)
        seen.append(out["loss"])
        return out

    result = Trainer(model, task, data, cfg(epochs=2, batch_size=4, tbptt=25, eval_each_epoch=True,
                                            **{"optim.lr": 1e-2}), None, evaluate=evaluate, quiet=True).fit()
    assert len(seen) == 2 and seen[1] < seen[0] and result["steps"] == 400
    # one chunk covering everything gives the same mean loss: the state is carried across chunks
    whole = evaluate_stream(model, task, data, batch_size=2, chunk=1000)
    assert whole["loss"] == pytest.approx(seen[-1], rel=1e-5)
    assert model.training


def test_deterministic_mode_is_scoped_to_fit():
    torch.manual_seed(16)
    assert not torch.are_deterministic_algorithms_enabled()
    seen = []

    class Task(ClassifyTask):
        def loss(self, model, batch):
            seen.append(torch.are_deterministic_algorithms_enabled())
            return super().loss(model, batch)

    Trainer(TinyClassifier(), Task(), random_classification(8), cfg(steps=1, batch_size=8, deterministic=True), None,
            quiet=True).fit()
    assert seen == [True] and not torch.are_deterministic_algorithms_enabled()


def test_all_masked_batch_is_not_a_nonfinite_step():
    torch.manual_seed(17)

    class Masked(ClassifyTask):
        def loss(self, model, batch):
            return super().loss(model, batch) * float("nan"), 0

    model = TinyClassifier()
    p0 = [p.detach().clone() for p in model.parameters()]
    result = Trainer(model, Masked(), random_classification(8), cfg(steps=3, batch_size=4, max_nonfinite=2), None,
                     quiet=True).fit()
    assert result["skipped_steps"] == 3  # no update, but not counted as divergence (max_nonfinite=2)
    assert all(torch.equal(a, b) for a, b in zip(p0, model.parameters()))


def test_plain_progress_lines_and_quiet(capfd):
    torch.manual_seed(18)
    kw = {"steps": 4, "batch_size": 4, "log_every": 2}
    Trainer(TinyClassifier(), ClassifyTask(), random_classification(16), cfg(**kw), None, progress=False).fit()
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 2
    assert lines[0].startswith("step 2/4 | epoch 1 | loss ") and "samples/s" in lines[0] and "ETA" in lines[0]
    Trainer(TinyClassifier(), ClassifyTask(), random_classification(16), cfg(**kw), None, quiet=True).fit()
    assert capfd.readouterr() == ("", "")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_training_and_exact_resume(tmp_path):
    from rnnkit.train.toy import run

    kw = {"device": "cuda", "precision": "bf16", "batch_size": 4, "tbptt": 8, "tbptt_backward": 12,
          "tensorboard": False, "deterministic": True}
    ref = run(str(tmp_path / "ref"), steps=8, **kw)
    run(str(tmp_path / "cut"), steps=4, checkpoint_every=2, **kw)
    resumed = run(str(tmp_path / "cut"), steps=8, resume=True, checkpoint_every=2, **kw)
    assert all(v.is_cuda for v in ref["params"].values())
    for k, v in ref["params"].items():
        assert torch.equal(v, resumed["params"][k]), k


def test_map_style_dataset_of_tuples():
    from torch.utils.data import TensorDataset

    data = random_classification(24, seed=4)
    ds = TensorDataset(data["x"], data["y"])

    class TupleTask:
        def loss(self, model, batch):
            x, y = batch
            return F.cross_entropy(model(x), y)

    torch.manual_seed(19)
    m1, m2 = TinyClassifier(), TinyClassifier()
    m2.load_state_dict(m1.state_dict())
    Trainer(m1, TupleTask(), ds, cfg(steps=3, batch_size=8), None, quiet=True).fit()
    Trainer(m2, ClassifyTask(), data, cfg(steps=3, batch_size=8), None, quiet=True).fit()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_cosine_over_a_minutes_budget():
    clock = [0.0]
    s = Schedule(ScheduleConfig(name="cosine", min_factor=0.0), 1.0, None, budget_s=100.0, clock=lambda: clock[0])
    assert s.lr(0, 1) == pytest.approx(1.0)
    clock[0] = 50.0
    assert s.lr(7, 1) == pytest.approx(0.5)
    clock[0] = 200.0
    assert s.lr(9, 1) == pytest.approx(0.0)
    torch.manual_seed(20)
    tr = Trainer(TinyClassifier(), ClassifyTask(), random_classification(16),
                 cfg(minutes=10.0, steps=None, batch_size=8, **{"schedule.name": "cosine"}), None, quiet=True)
    assert tr.schedule.budget_s == 600.0 and tr.elapsed_s == 0.0
