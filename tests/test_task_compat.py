"""Configs and run directories written before the shared task foundation still load, and give the same
numbers. The files under tests/data were written by the code as it was before (``old_configs``: each
task's resolved config as ``config.toml`` and as the ``config`` entry of a ``model.json``; ``old_runs``:
small trained runs with the outputs that code computed in ``expected.json``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rnnkit.data.sequences import SequenceSet
from rnnkit.tasks import anomaly, charlm, classify, embed, forecast, synthetic, wordlm
from rnnkit.train import config_from_dict, config_to_dict, load_config

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data"
CONFIGS = {"charlm": charlm.CharLMConfig, "wordlm": wordlm.WordLMConfig, "experiment": synthetic.ExperimentConfig,
           "classify": classify.ClassifyConfig, "forecast": forecast.ForecastConfig,
           "anomaly": anomaly.AnomalyConfig, "embed": embed.EmbedConfig}
# keys the shared model options added to sections that did not have them, with their defaults
ADDED = {"backend": "auto", "dropout": 0.0}
# added later to the classifier: the model choice (old run directories load as "recurrent"), LSTM-FCN's
# options and the ensemble size in [model], the choice's settings in [auto]
ADDED_CLASSIFY = {"kind": "auto", "shuffle": True, "squeeze_excite": False, "branch_dropout": 0.8, "reader": "full",
                  "stride": 1, "ensemble": 1}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_old_configs_load_to_the_same_settings(name: str) -> None:
    old = json.loads((DATA / "old_configs" / f"{name}.json").read_text())
    for cfg in (load_config(CONFIGS[name], DATA / "old_configs" / f"{name}.toml"),
                config_from_dict(CONFIGS[name], old)):
        new = config_to_dict(cfg)
        added = {k: v for k, v in new["model"].items() if k not in old["model"]}
        assert added.items() <= {**ADDED, **(ADDED_CLASSIFY if name == "classify" else {})}.items()
        if name == "classify":  # sections added later: the model choice, the image distortion
            for section in ("auto", "image_augment"):
                assert new.pop(section) == config_to_dict(classify.ClassifyConfig())[section]
        assert {**new, "model": {k: v for k, v in new["model"].items() if k in old["model"]}} == old


@pytest.fixture
def old_runs(tmp_path: Path) -> Path:
    shutil.copytree(DATA / "old_runs", tmp_path / "old_runs")
    return tmp_path / "old_runs"


def _sequences(root: Path) -> SequenceSet:
    meta = json.loads((root / "sequences.json").read_text())
    flat = np.load(root / "sequences.npy")
    cuts = np.cumsum(meta["lengths"])[:-1]
    return SequenceSet(list(np.split(flat, cuts)), np.array(meta["labels"]))


def test_old_runs_reload_and_give_the_same_outputs(old_runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = json.loads((old_runs / "expected.json").read_text())
    monkeypatch.chdir(old_runs)  # the char-LM run names its text relative to here
    run = charlm.load_run("charlm")
    assert charlm.evaluate_text(run, "text.txt")["loss_nats"] == expected["charlm_text_loss_nats"]
    data = _sequences(old_runs)
    # these models run on the fused CPU kernels, whose float32 summation order may change the last bits
    # between versions; the reload itself is exact
    same = {"rtol": 1e-5, "atol": 1e-6}
    np.testing.assert_allclose(classify.Classifier.load("classify").predict_proba(data),
                               np.array(expected["classify_proba"], dtype=np.float32), **same)
    np.testing.assert_allclose(embed.Embedder.load("embed").embed(data),
                               np.array(expected["embed"], dtype=np.float32), **same)
    vals = np.sin(np.arange(120) / 3.0)[:, None]
    np.testing.assert_allclose(anomaly.Detector.load("anomaly").raw_scores(vals), np.array(expected["anomaly_raw"]),
                               **same)
