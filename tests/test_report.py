"""The HTML report (without a browser): sections, self-containment, PNG export, the command."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rnnkit.analysis.report import build_report, curves, read_metrics
from rnnkit.cli.main import app

PNG = b"\x89PNG\r\n\x1a\n"


def _run_dir(root: Path) -> Path:
    d = root / "run"
    d.mkdir()
    with (d / "metrics.jsonl").open("w") as f:
        for s in range(1, 11):
            f.write(json.dumps({"kind": "train", "step": s * 10, "loss": 1.0 / s, "lr": 1e-3}) + "\n")
            if s % 5 == 0:
                f.write(json.dumps({"kind": "eval", "step": s * 10, "eval/test_mse": 0.5 / s}) + "\n")
        f.write('{"kind": "train", "step": 1')  # a run killed mid-write
    (d / "experiment.json").write_text(json.dumps({"task": "adding", "metric": "test_mse", "baseline": 1 / 6,
                                                   "result": {"test_mse": 0.05, "steps": 100}}))
    (d / "gradient_flow.json").write_text(json.dumps({"curves": {
        "rnn (trained)": {"h": [1e-20, 1e-10, 1.0]}, "lstm (trained)": {"h": [0.1, 0.5, 1.0], "c": [0.2, 0.3, 1]}}}))
    (d / "gate_stats.json").write_text(json.dumps({"family": "lstm", "left": 0.1, "right": 0.9, "layers": [
        {g: {"left_frac": [0.1, 0.5], "right_frac": [0.8, 0.2], "hist": [3, 1, 0, 5], "mean": 0.6}
         for g in ("i", "f", "o")}]}))
    (d / "activations.json").write_text(json.dumps({"text": "a<b", "series": {"layer0/c": [[0.1], [-0.5], [0.9]]},
                                                    "correlated": {}}))
    (d / "samples.txt").write_text("generated <text> & more")
    (d / "config.toml").write_text('[model]\ncell = "lstm"\n')
    return d


def test_metrics_curves_group_by_kind() -> None:
    recs = [{"kind": "train", "step": 1, "loss": 2.0, "lr": 0.1, "elapsed_s": 3.0},
            {"kind": "eval", "step": 1, "eval/acc": 0.5}, {"step": 2, "loss": float("nan")}, {"no_step": 1}]
    c = curves(recs)
    assert c == {"train/loss": ([1.0], [2.0]), "eval/acc": ([1.0], [0.5])}


def test_report_sections_and_self_containment(tmp_path: Path) -> None:
    d = _run_dir(tmp_path)
    assert len(read_metrics(d)) == 12  # the partial last line is skipped
    page = build_report(d)
    for anchor in ('id="learning_curve"', 'id="gradient_flow"', 'id="gate_statistics"', 'id="activations"',
                   "Configuration", "samples", "test_mse"):
        assert anchor in page
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page)  # nothing fetched from a network
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3
    assert all(base64.b64decode(b)[:8] == PNG for b in images)
    assert "generated &lt;text&gt; &amp; more" in page  # escaped
    payload = re.search(r'<script type="application/json" id="activation-data">(.*?)</script>', page, re.S)
    assert json.loads(payload.group(1))["text"] == "a<b"


def test_report_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run_dir"):
        build_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to report"):
        build_report(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "activations.json").write_text(json.dumps({"text": "abc", "series": {"layer0/h": [[1.0]]}}))
    with pytest.raises(ValueError, match="1 steps but the text has 3"):
        build_report(bad)


def test_report_command(tmp_path: Path) -> None:
    d = _run_dir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(d), "--png", str(tmp_path / "figs"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["report"] == str(d / "report.html") and (d / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert sorted(Path(p).name for p in out["png"]) == ["gate_statistics.png", "gradient_flow.png",
                                                       "learning_curve.png"]
    assert all(Path(p).read_bytes()[:8] == PNG for p in out["png"])
    res = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert "RUN_DIR" in res.stderr and "Traceback" not in res.output


@pytest.mark.slow
def test_report_capture_from_a_charlm_run(tmp_path: Path) -> None:
    """A real text model (``rnnkit charlm train`` on a small file) feeds the activation viewer."""
    text = tmp_path / "t.txt"
    text.write_text('She said "the cat [and the dog] sat."\nHe said "no."\n' * 40)
    run = tmp_path / "lm"
    res = CliRunner().invoke(app, ["charlm", "train", "--text", str(text), "--steps", "5", "--hidden", "16",
                                   "--layers", "2", "--eval-every", "5", "--out", str(run), "--quiet", "--json",
                                   "--set", "trainer.tensorboard=false"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["report", str(run), "--capture", 'He said "the dog."', "--json"])
    assert res.exit_code == 0, res.output
    act = json.loads((run / "activations.json").read_text())
    assert act["text"] == 'He said "the dog."'
    assert set(act["series"]) == {"layer0/c", "layer0/h", "layer1/c", "layer1/h"}
    assert len(act["series"]["layer1/h"]) == len(act["text"]) and len(act["series"]["layer1/h"][0]) == 16
    assert "inside quotes" in act["correlated"]["layer0/c"]
    html = (run / "report.html").read_text()
    assert 'id="activations"' in html and "Gate statistics" in html
    stats = json.loads((run / "gate_stats.json").read_text())  # Karpathy et al.'s saturation, per layer
    assert len(stats["layers"]) == 2 and set(stats["layers"][0]) == {"i", "f", "o"}
    assert len(stats["layers"][1]["f"]["right_frac"]) == 16 and sum(stats["layers"][1]["f"]["hist"]) == 16 * 18
    res = CliRunner().invoke(app, ["report", str(run), "--capture", "{unknown}"])
    assert res.exit_code == 2 and "not in the model's vocabulary" in res.stderr


def test_viewer_payload_is_quantized_per_unit_and_decodes_back() -> None:
    import base64

    import numpy as np

    from rnnkit.analysis.report import _quantized

    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 6)) * np.array([0.01, 1, 5, 0, 2, 0.5])  # (T, H), one unit all zero
    q = _quantized({"text": "x" * 50, "series": {"layer0/c": a.tolist()}})["series"]["layer0/c"]
    codes = np.frombuffer(base64.b64decode(q["q"]), dtype=np.int8).reshape(6, 50)  # unit-major
    back = (codes / 127 * np.array(q["scale"])[:, None]).T
    assert np.all(np.abs(back - a) <= np.abs(a).max(0) / 254 + 1e-9)  # half a quantization step per unit
    assert codes[3].tolist() == [0] * 50 and np.abs(codes).max() == 127


def test_validation_metrics_get_their_own_figure(tmp_path: Path) -> None:
    from rnnkit.analysis.report import figures

    d = tmp_path / "run"
    d.mkdir()
    recs = [{"kind": "train", "step": 1, "loss": 2.0}, {"kind": "eval", "step": 1, "eval/val_loss": 1.5,
                                                       "eval/val_cer": 0.4, "eval/val_seq_accuracy": 0.1}]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    figs = figures(d)
    curve_labels = {name: [line.get_label() for line in f.axes[0].get_lines()] for name, f in figs.items()}
    import matplotlib.pyplot as plt

    for f in figs.values():
        plt.close(f)
    assert curve_labels == {"learning_curve": ["train/loss", "eval/val_loss"],
                            "validation_curve": ["eval/val_cer", "eval/val_seq_accuracy"]}
