"""Embeddings: k-means, silhouette, projection, the sequence autoencoder, the CLI."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rnnkit.cli.main import app
from rnnkit.data.series import SeriesError
from rnnkit.tasks import embed as E
from rnnkit.tasks.encoders import reverse_within

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: 1 thread is faster and steadier


def _blobs(seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0, 0], [5, 5, 0], [0, 5, 5]], float)
    y = np.repeat(np.arange(3), 30)
    return centres[y] + rng.normal(0, 0.3, (90, 3)), y


def test_kmeans_recovers_blobs_and_silhouette_is_high():
    x, y = _blobs()
    lab, centres = E.kmeans(x, 3, seed=1)
    assert E.purity(lab, y) == 1.0 and centres.shape == (3, 3)
    assert E.silhouette(x, lab) > 0.8
    assert E.silhouette(x, np.random.default_rng(0).integers(0, 3, 90)) < 0.1
    with pytest.raises(SeriesError, match="--clusters"):
        E.kmeans(x, 0)


def test_silhouette_matches_sklearn():
    skm = pytest.importorskip("sklearn.metrics", reason="scikit-learn (rnnkit[datasets]) not installed")
    x, _ = _blobs(1)
    lab = np.random.default_rng(2).integers(0, 4, 90)
    assert E.silhouette(x, lab) == pytest.approx(skm.silhouette_score(x, lab), rel=1e-9)


def test_pca_projection_keeps_the_main_direction():
    t = np.linspace(-1, 1, 50)
    x = np.stack([t, 2 * t, 0.01 * np.sin(7 * t)], 1)
    p = E.pca2(x)
    assert p.shape == (50, 2) and abs(np.corrcoef(p[:, 0], t)[0, 1]) > 0.999


def test_reverse_within_and_masked_loss_ignore_padding():
    x = torch.arange(1.0, 7.0).view(1, 6, 1).repeat(2, 1, 1)
    lengths = torch.tensor([6, 3])
    r = reverse_within(x, lengths)
    assert r[0, :, 0].tolist() == [6, 5, 4, 3, 2, 1] and r[1, :3, 0].tolist() == [3, 2, 1]
    torch.manual_seed(0)
    net = E.SequenceAutoencoder(1, E.EmbedModelConfig(hidden=5))
    g = x.clone()
    g[1, 3:] = 1e4
    clean = x.clone()
    clean[1, 3:] = 0
    torch.testing.assert_close(net.loss(g, lengths), net.loss(clean, lengths))
    torch.testing.assert_close(net.embed(g, lengths), net.embed(clean, lengths))


def _csv(path, n=30, seed=0):
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        f.write("label," + ",".join(f"t{i}" for i in range(20)) + "\n")
        for i in range(n):
            k = i % 2
            x = np.sin(np.arange(20) * (0.2 + 0.8 * k)) + rng.normal(0, 0.05, 20)
            f.write(f"{'ab'[k]}," + ",".join(f"{v:.4f}" for v in x) + "\n")
    return path


def test_cli_autoencoder_and_classifier_encoders(tmp_path):
    runner = CliRunner()
    data = _csv(tmp_path / "d.csv")
    r = runner.invoke(app, ["embed", "--input", str(data), "--clusters", "2", "--hidden", "6", "--steps", "15",
                            "--out", str(tmp_path / "e"), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["encoder"] == "autoencoder" and res["dim"] == 6 and -1 <= res["silhouette"] <= 1
    assert np.load(tmp_path / "e" / "embeddings.npy").shape == (30, 6)
    header = (tmp_path / "e" / "embeddings.csv").read_text().splitlines()[0]
    assert header.startswith("id,label,cluster,e0") and (tmp_path / "e" / "projection.png").is_file()
    # reuse the trained autoencoder, then a classifier's encoder
    r = runner.invoke(app, ["embed", "--input", str(data), "--model", str(tmp_path / "e"), "--clusters", "3",
                            "--out", str(tmp_path / "e2"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["clusters"] == 3
    r = runner.invoke(app, ["classify", "train", "--train", str(data), "--hidden", "6", "--steps", "30", "--lr",
                            "0.02", "--out", str(tmp_path / "c"), "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["embed", "--input", str(data), "--model", str(tmp_path / "c"), "--clusters", "2",
                            "--out", str(tmp_path / "e3"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["encoder"] == "classifier"
    r = runner.invoke(app, ["embed", "--input", str(data), "--model", str(tmp_path), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "model.json" in r.stderr
