"""Images as sequences: IDX/PNG/NumPy readers, reading orders, the permutation, the built-in digit sets."""

import gzip
import struct

import numpy as np
import pytest

from rnnkit.data import images as I
from rnnkit.errors import UserError


def _idx_bytes(a: np.ndarray, code: int, fmt: str) -> bytes:
    """An IDX file written here by hand (header, big-endian sizes, big-endian values)."""
    return bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(fmt).tobytes()


def test_idx_pair_read_from_hand_written_files(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (5, 4, 3)).astype(np.uint8)
    y = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    (tmp_path / "img").write_bytes(_idx_bytes(X, 0x08, ">u1"))
    (tmp_path / "lab.gz").write_bytes(gzip.compress(_idx_bytes(y, 0x08, ">u1")))
    data = I.read_idx_pair(tmp_path / "img", tmp_path / "lab.gz")
    np.testing.assert_allclose(np.stack(data.images), X / 255.0)
    assert list(data.labels) == ["3", "1", "4", "1", "5"]
    f = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    (tmp_path / "f").write_bytes(_idx_bytes(f, 0x0D, ">f4"))
    np.testing.assert_array_equal(I.read_idx(tmp_path / "f"), f)
    I.write_idx(tmp_path / "w", X)
    assert (tmp_path / "w").read_bytes() == (tmp_path / "img").read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "magic", "labels_count"])
def test_corrupt_idx_is_one_line_naming_the_file(tmp_path, damage):
    X = np.zeros((4, 2, 2), np.uint8)
    raw = _idx_bytes(X, 0x08, ">u1")
    img, lab = tmp_path / "img.idx", tmp_path / "lab.idx"
    img.write_bytes(raw[:-3] if damage == "truncated" else (b"\x01" + raw[1:] if damage == "magic" else raw))
    lab.write_bytes(_idx_bytes(np.zeros(3 if damage == "labels_count" else 4, np.uint8), 0x08, ">u1"))
    with pytest.raises(UserError) as e:
        I.read_idx_pair(img, lab)
    msg = str(e.value)
    assert "\n" not in msg and (str(lab) if damage == "labels_count" else str(img)) in msg


def _png(path, a):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(a, np.uint8)).save(path)


def test_png_class_folder_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    pics = {("cat", "a.png"): rng.integers(0, 256, (5, 4)), ("dog", "b.png"): rng.integers(0, 256, (5, 4)),
            ("dog", "c.png"): rng.integers(0, 256, (5, 4))}
    for (c, f), a in pics.items():
        _png(tmp_path / "set" / c / f, a)
    data = I.read_images(tmp_path / "set")
    assert list(data.labels) == ["cat", "dog", "dog"] and data.ids == ["cat/a.png", "dog/b.png", "dog/c.png"]
    np.testing.assert_allclose(data.images[1], pics[("dog", "b.png")] / 255.0)
    _png(tmp_path / "set" / "dog" / "d.png", np.zeros((6, 4)))
    with pytest.raises(UserError, match="d.png has size"):
        I.read_images(tmp_path / "set")
    (tmp_path / "set" / "dog" / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UserError, match="d.png is not a readable PNG"):
        I.read_images(tmp_path / "set")


def test_numpy_images(tmp_path):
    X = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.savez(tmp_path / "x.npz", X=X, y=np.array(["a", "b"]))
    data = I.read_images(tmp_path / "x.npz")
    assert list(data.labels) == ["a", "b"]
    np.testing.assert_allclose(data.images[1], X[1] / 255.0)
    np.save(tmp_path / "bad.npy", np.zeros((2, 3)))
    with pytest.raises(UserError, match=r"bad.npy holds images of shape \(2, 3\)"):
        I.read_images(tmp_path / "bad.npy")


def test_reading_orders_and_permutation():
    im = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(I.to_sequence(im, "rows"), im)
    np.testing.assert_array_equal(I.to_sequence(im, "columns"), im.T)
    np.testing.assert_array_equal(I.to_sequence(im, "pixels")[:, 0], np.arange(12.0))
    perm = I.pixel_permutation(12, 7)
    assert sorted(perm.tolist()) == list(range(12)) and perm.tolist() != list(range(12))
    np.testing.assert_array_equal(perm, I.pixel_permutation(12, 7))
    np.testing.assert_array_equal(I.to_sequence(im, "pixels", perm)[:, 0], np.arange(12.0)[perm])
    seqs = I.as_sequence_set(I.ImageSet([im, im + 1], np.array([0, 1])), "pixels", permute_seed=7)
    np.testing.assert_array_equal(seqs.sequences[1][:, 0], (im + 1).ravel()[perm])
    with pytest.raises(UserError, match="--read pixels"):
        I.to_sequence(im, "rows", perm)
    with pytest.raises(UserError, match="--read"):
        I.to_sequence(im, "diagonal")


def test_builtin_digits_split_is_fixed_and_stratified():
    pytest.importorskip("sklearn", reason="scikit-learn (rnnkit[datasets]) not installed")
    tr, te = I.load_digits("train"), I.load_digits("test")
    assert (len(tr), len(te)) == (1343, 454)
    from sklearn.datasets import load_digits

    per_class = np.bincount(load_digits().target)
    test_counts = np.bincount(te.labels.astype(int))
    np.testing.assert_array_equal(test_counts, np.ceil(per_class / 4).astype(int))
    assert I.load_digits("test").images[3].tolist() == te.images[3].tolist()
    assert 0.0 <= min(x.min() for x in tr.images) and max(x.max() for x in tr.images) == 1.0


def test_digit_strings_use_disjoint_glyphs(monkeypatch):
    pytest.importorskip("sklearn", reason="scikit-learn (rnnkit[datasets]) not installed")
    lines = I.digit_strings("test", n=20)
    assert all(im.shape[0] == I.LINE_HEIGHT for im in lines.images)
    assert all(3 <= len(s) <= 8 and s.isdigit() for s in lines.labels)
    again = I.digit_strings("test", n=20)
    assert list(again.labels) == list(lines.labels)
    assert all(np.array_equal(a, b) for a, b in zip(lines.images, again.images))
    # the generator draws glyphs only from its own split: with every training glyph blanked, training
    # lines are blank and test lines are not
    Xtr, ytr, Xte, yte = I._digits_split()
    monkeypatch.setattr(I, "_digits_split", lambda: (Xtr * 0, ytr, Xte, yte))
    assert max(im.max() for im in I.digit_strings("train", n=5).images) == 0.0
    assert min(im.max() for im in I.digit_strings("test", n=5).images) > 0.5


def test_classify_cli_reads_images_in_the_runs_order(tmp_path):
    import json

    from typer.testing import CliRunner

    from rnnkit.cli.main import app

    rng = np.random.default_rng(3)
    X = rng.integers(0, 256, (40, 4, 5)).astype(np.uint8)
    y = (X[:, 0, 0] > 127).astype(np.uint8)
    (tmp_path / "img").write_bytes(_idx_bytes(X, 0x08, ">u1"))
    (tmp_path / "lab").write_bytes(_idx_bytes(y, 0x08, ">u1"))
    for i in range(6):
        _png(tmp_path / "pngs" / str(y[i]) / f"{i}.png", X[i])
    run = tmp_path / "run"
    runner = CliRunner()
    r = runner.invoke(app, ["classify", "train", "--train", str(tmp_path / "img"), "--train-labels",
                            str(tmp_path / "lab"), "--read", "pixels", "--permute", "5", "--hidden", "4",
                            "--epochs", "2", "--out", str(run), "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    assert 'read = "pixels"' in (run / "config.toml").read_text()
    assert "permute_seed = 5" in (run / "config.toml").read_text()
    from rnnkit.tasks.classify import Classifier

    model = Classifier.load(run)
    expected = model.predict_proba(I.as_sequence_set(I.ImageSet(list(X[:6] / 255.0)), "pixels", 5))
    r = runner.invoke(app, ["classify", "predict", str(run), "--input", str(tmp_path / "pngs"), "--out",
                            str(tmp_path / "p.csv"), "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    rows = [line.split(",") for line in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    order = [int(row[0].split("/")[1][:-4]) for row in rows]  # ids are <class>/<i>.png
    np.testing.assert_allclose([[float(v) for v in row[2:]] for row in rows], expected[order], atol=1e-5)
    r = runner.invoke(app, ["classify", "eval", str(run), "--test", str(tmp_path / "img"), "--quiet", "--json"])
    assert r.exit_code == 2 and "needs its labels file (--image-labels FILE)" in r.output
    r = runner.invoke(app, ["classify", "eval", str(run), "--test", str(tmp_path / "img"), "--image-labels",
                            str(tmp_path / "lab"), "--quiet", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["n"] == 40
