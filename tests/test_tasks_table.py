"""One table that every task passes: it fits a toy problem under a bound, its trained model reloads
bit-exactly (same weights, same outputs), and it leaves its input files untouched."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rnnkit.train import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: 1 thread is faster and steadier


@dataclass
class Outcome:
    """What a task case reports: its score on the toy problem and the bound it must beat, and the trained
    and the reloaded model's weights and outputs on the same input (empty weights where the task's run
    keeps only checkpoints: then the outputs compared are computed from the final weights and the reload)."""

    score: float
    bound: float
    trained: tuple[dict[str, torch.Tensor], Any]
    reloaded: tuple[dict[str, torch.Tensor], Any]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _sequences_csv(path: Path, n: int = 40, length: int = 20, seed: int = 0) -> Path:
    """Two classes of noisy sines (slow / fast), one sequence per row after its label."""
    rng = np.random.default_rng(seed)
    rows = ["label," + ",".join(f"t{i}" for i in range(length))]
    for i in range(n):
        k = i % 2
        x = np.sin(np.arange(length) * (0.2 + 0.8 * k) + rng.uniform(0, 6)) + rng.normal(0, 0.05, length)
        rows.append(f"{'ab'[k]}," + ",".join(f"{v:.4f}" for v in x))
    return _write(path, "\n".join(rows) + "\n")


# ---- the cases -------------------------------------------------------------------------------------
def charlm_inputs(tmp: Path) -> list[Path]:
    return [_write(tmp / "text.txt", "the cat sat on the mat.\n" * 120)]


def charlm_case(tmp: Path, text: Path) -> Outcome:
    from rnnkit.tasks import charlm
    from rnnkit.tasks.lm import stream_loss

    cfg = load_config(charlm.CharLMConfig, None, {
        "data.text": str(text), "data.eval_chars": 0, "model.cell": "lstm", "model.hidden_size": 32,
        "model.num_layers": 1, "model.embedding_size": 8, "trainer.steps": 120, "trainer.batch_size": 8,
        "trainer.tbptt": 24, "trainer.eval_every": 0, "trainer.tensorboard": False, "trainer.optim.lr": 0.01,
        "sample.length": 5})
    out = charlm.train(cfg, tmp / "run", quiet=True)
    run = charlm.load_run(tmp / "run")
    val = charlm.prepare_corpus(cfg.data, cfg.trainer).val_ids
    total, _ = stream_loss(run.model, val, cfg.data.eval_batch_size)
    # the final validation loss of training was computed with the final weights, which the run saved
    return Outcome(out["val_bits_per_char"], 1.0, ({}, out["val_loss_nats"] * out["val_chars"]),
                   ({}, total))


def wordlm_inputs(tmp: Path) -> list[Path]:
    return [_write(tmp / "train.txt", "a b c d e\n" * 300), _write(tmp / "valid.txt", "a b c d e\n" * 20)]


def wordlm_case(tmp: Path, train: Path, valid: Path) -> Outcome:
    from rnnkit.tasks import wordlm

    cfg = load_config(wordlm.WordLMConfig, None, {
        "data.train": str(train), "data.valid": str(valid), "model.hidden_size": 24, "model.embedding_size": 8,
        "model.num_layers": 1, "trainer.steps": 100, "trainer.batch_size": 8, "trainer.tbptt": 12,
        "trainer.eval_each_epoch": False, "trainer.tensorboard": False, "trainer.optim.lr": 0.01})
    out = wordlm.train(cfg, tmp / "run", quiet=True)
    run = wordlm.load_word_run(tmp / "run")
    again = wordlm.evaluate_run(run)
    return Outcome(out["valid_perplexity"], 1.5, ({}, out["valid_loss_nats"]),
                   ({}, again["valid_loss_nats"]))


def sequences_inputs(tmp: Path) -> list[Path]:
    return [_sequences_csv(tmp / "sequences.csv")]


def classify_case(tmp: Path, path: Path) -> Outcome:
    from rnnkit.data.sequences import read_sequences
    from rnnkit.tasks import classify as C

    data = read_sequences(path, label="label")
    cfg = load_config(C.ClassifyConfig, None, {"model.hidden": 12, "trainer.steps": 60, "trainer.epochs": None,
                                               "trainer.optim.lr": 0.02})
    model = C.train(data, cfg, tmp / "run")
    back = C.Classifier.load(tmp / "run")
    acc = model.evaluate(data)["accuracy"]
    return Outcome(1 - acc, 0.1, (_state(model.net), model.predict_proba(data)),
                   (_state(back.net), back.predict_proba(data)))


def embed_case(tmp: Path, path: Path) -> Outcome:
    from rnnkit.data.sequences import read_sequences
    from rnnkit.tasks import embed as E

    data = read_sequences(path, label="label")
    cfg = load_config(E.EmbedConfig, None, {"model.hidden": 8, "trainer.steps": 80, "trainer.epochs": None,
                                            "trainer.optim.lr": 0.02})
    model = E.train(data, cfg, tmp / "run")
    back = E.Embedder.load(tmp / "run")
    # the reconstruction error after training, relative to the data's variance (1 after scaling)
    batch = E.tensors(data, model.scaler, None)
    with torch.no_grad():
        mse = float(model.net.loss(batch["x"], batch["lengths"]))
    return Outcome(mse, 0.5, (_state(model.net), model.embed(data)), (_state(back.net), back.embed(data)))


def label_inputs(tmp: Path) -> list[Path]:
    """Feature sequences for CTC: symbol 'a' is two steps of (1, 0), 'b' two steps of (0, 1), gaps (0, 0)."""
    rng = np.random.default_rng(0)
    arrays, labels = [], []
    for _ in range(48):
        lab = "".join(rng.choice(list("ab"), rng.integers(1, 4)))
        steps = [[0.0, 0.0]] + [v for c in lab for v in ([[1.0, 0.0]] * 2 if c == "a" else [[0.0, 1.0]] * 2)
                                + [[0.0, 0.0]]]
        arrays.append(np.array(steps) + rng.normal(0, 0.05, (len(steps), 2)))
        labels.append(lab)
    T = max(len(a) for a in arrays)
    X = np.stack([np.pad(a, ((0, T - len(a)), (0, 0))) for a in arrays])
    path = tmp / "lines.npz"
    np.savez(path, X=X, lengths=np.array([len(a) for a in arrays]), labels=np.array(labels))
    return [path]


def label_case(tmp: Path, path: Path) -> Outcome:
    from rnnkit.tasks import label as L

    data = L.read_label_set(path)
    cfg = load_config(L.LabelConfig, None, {"model.hidden": 12, "model.layers": 1, "data.stack": 1,
                                            "data.val_fraction": 0.0, "trainer.steps": 120, "trainer.epochs": None,
                                            "trainer.batch_size": 16, "trainer.optim.lr": 0.02})
    model = L.train(data, cfg, tmp / "run")
    back = L.Labeller.load(tmp / "run")
    return Outcome(model.evaluate(data)["greedy_cer"], 0.1, (_state(model.net), np.concatenate(model.log_probs(data))),
                   (_state(back.net), np.concatenate(back.log_probs(data))))


def _sine_csv(path: Path, n: int = 240, spike: int | None = None) -> Path:
    t = np.arange(n)
    y = 10 + np.sin(2 * np.pi * t / 12) + np.random.default_rng(1).normal(0, 0.02, n)
    if spike is not None:
        y[spike:spike + 3] += 4.0
    return _write(path, "t,y\n" + "".join(f"{i},{v:.5f}\n" for i, v in zip(t, y)))


def forecast_inputs(tmp: Path) -> list[Path]:
    return [_sine_csv(tmp / "series.csv")]


def forecast_case(tmp: Path, path: Path) -> Outcome:
    from rnnkit.data.series import load_series
    from rnnkit.metrics import smape
    from rnnkit.tasks import forecast as F

    series = load_series(path, "y", time="t")
    cfg = load_config(F.ForecastConfig, None, {"data.lookback": 24, "data.horizon": 6, "model.hidden": 16,
                                               "trainer.steps": 150, "trainer.epochs": None,
                                               "trainer.optim.lr": 0.01})
    cut = len(series) - 6
    model = F.train(series.slice(0, cut), cfg, tmp / "run")
    back = F.ForecastModel.load(tmp / "run")
    pred = model.predict(series.slice(0, cut))["point"]
    err = smape(series.target[cut:], pred)
    return Outcome(err, 0.05, (_state(model.nets[0]), pred),
                   (_state(back.nets[0]), back.predict(series.slice(0, cut))["point"]))


def anomaly_inputs(tmp: Path) -> list[Path]:
    return [_sine_csv(tmp / "normal.csv", 400), _sine_csv(tmp / "test.csv", 240, spike=150)]


def anomaly_case(tmp: Path, normal: Path, test: Path, detector: str) -> Outcome:
    from rnnkit.data.series import load_series
    from rnnkit.tasks import anomaly as A

    values = load_series(normal, "y", time="t").target
    cfg = load_config(A.AnomalyConfig, None, {"model.detector": detector, "model.hidden": 16, "model.window": 24,
                                              "model.stride": 4, "trainer.steps": 100, "trainer.epochs": None,
                                              "trainer.optim.lr": 0.01})
    det = A.train(values, cfg, tmp / "run")
    det.save(tmp / "run")
    back = A.Detector.load(tmp / "run")
    x = load_series(test, "y", time="t").target
    raw = det.raw_scores(x)
    top = int(np.argmax(det.score(x)["score"]))
    return Outcome(abs(top - 151), 12, (_state(det.net), raw), (_state(back.net), back.raw_scores(x)))


def experiment_inputs(tmp: Path) -> list[Path]:
    return [_write(tmp / "experiment.toml", '[data]\ntask = "adding"\nlength = 6\ntest_samples = 300\n'
                   '[model]\nhidden_size = 24\n[trainer]\nsteps = 400\neval_every = 0\ntensorboard = false\n'
                   '[trainer.optim]\nlr = 0.01\n')]


def experiment_case(tmp: Path, config: Path) -> Outcome:
    from rnnkit.tasks.base import load_checkpoint_into
    from rnnkit.tasks.synthetic import ExperimentConfig, build_model, run_experiment, task_from_config

    cfg = load_config(ExperimentConfig, config)
    result = run_experiment(cfg, tmp / "run", quiet=True, analyse=False)
    task = task_from_config(cfg.data)
    model = build_model(cfg, task)
    load_checkpoint_into(model, tmp / "run")
    again = task.metrics(model, task.test_set(cfg.data.test_samples, cfg.trainer.seed))
    return Outcome(result[task.metric], task.baseline() / 4, ({}, result[task.metric]), ({}, again[task.metric]))


def seq2seq_inputs(tmp: Path) -> list[Path]:
    words = [a + b + c for a in "abcd" for b in "abcd" for c in "abc"]
    return [_write(tmp / "train.tsv", "".join(f"{w}\t{w}\n" for w in words) * 4),
            _write(tmp / "valid.tsv", "".join(f"{w}\t{w}\n" for w in words[::5]))]


def seq2seq_case(tmp: Path, train: Path, valid: Path) -> Outcome:
    from rnnkit.tasks import seq2seq

    cfg = load_config(seq2seq.Seq2SeqConfig, None, {
        "data.train": str(train), "data.valid": str(valid), "model.embedding_size": 8, "model.dropout": 0.0,
        "model.encoder.hidden_size": 16, "model.decoder.hidden_size": 16, "trainer.steps": 150,
        "trainer.batch_size": 16, "trainer.eval_every": 50, "trainer.tensorboard": False, "trainer.optim.lr": 0.01})
    out = seq2seq.train(cfg, tmp / "run", quiet=True)
    run = seq2seq.load_run(tmp / "run", checkpoint="best")
    pairs, _ = seq2seq.load_split(cfg.data, "valid")
    greedy = seq2seq.DecodeConfig(beam_size=1)
    again, _ = seq2seq.evaluate_pairs(run.model, pairs, run.vocabs, greedy, "char", text=False)
    # the final validation scores of training were computed with the best weights, which the run saved
    return Outcome(out["valid_ser"], 0.2, ({}, (out["valid_ser"], out["valid_ter"])),
                   ({}, (again["sequence_error_rate"], again["token_error_rate"])))


CASES: dict[str, tuple[Callable[[Path], list[Path]], Callable[..., Outcome]]] = {
    "charlm": (charlm_inputs, charlm_case),
    "wordlm": (wordlm_inputs, wordlm_case),
    "classify": (sequences_inputs, classify_case),
    "embed": (sequences_inputs, embed_case),
    "forecast": (forecast_inputs, forecast_case),
    "anomaly-prediction": (anomaly_inputs, lambda tmp, *paths: anomaly_case(tmp, *paths, detector="prediction")),
    "anomaly-reconstruction": (anomaly_inputs,
                               lambda tmp, *paths: anomaly_case(tmp, *paths, detector="reconstruction")),
    "experiment": (experiment_inputs, experiment_case),
    "label": (label_inputs, label_case),
    "seq2seq": (seq2seq_inputs, seq2seq_case),
}


def _digest(paths: list[Path]) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    return a == b


@pytest.mark.parametrize("name", sorted(CASES))
def test_task_fits_reloads_exactly_and_keeps_inputs(name: str, tmp_path: Path) -> None:
    make_inputs, run = CASES[name]
    inputs = make_inputs(tmp_path)
    before = _digest(inputs)
    outcome = run(tmp_path, *inputs)
    assert _digest(inputs) == before, f"{name}: an input file was changed"
    assert outcome.score <= outcome.bound, f"{name}: score {outcome.score} above the bound {outcome.bound}"
    state, out = outcome.trained
    state2, out2 = outcome.reloaded
    assert state.keys() == state2.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    assert _same(out, out2), f"{name}: the reloaded model's outputs differ"
