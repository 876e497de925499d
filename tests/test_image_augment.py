"""Training-time image distortion: shapes, padding, seeds, ink polarity, the step <-> image mapping of
label training, and that nothing is distorted outside training."""

import numpy as np
import pytest
import torch

from rnnkit.data.images import ImageAugment, ImageSteps, as_sequence_set, load_digits, pixel_permutation
from rnnkit.data.series import Scaler
from rnnkit.errors import UserError
from rnnkit.tasks import classify as C
from rnnkit.tasks import label as L

pytestmark = pytest.mark.usefixtures("one_thread")

OFF = ImageAugment(rotate=0, shear=0, scale=0, elastic=0, thickness=0)


def _lines(seed=0, B=4, H=10, W=30):
    """A zero-padded batch of bright strokes on a dark ground; line b spans widths[b] columns."""
    g = torch.Generator().manual_seed(seed)
    widths = torch.tensor([W, W - 7, W - 12, 9][:B])
    x = (torch.rand(B, H, W, generator=g) > 0.7).double()
    x = x * (torch.arange(W)[None, None] < widths[:, None, None])
    return x, widths


def test_distortion_keeps_shape_range_and_padding_and_follows_the_seed():
    x, widths = _lines()
    aug = ImageAugment()
    torch.manual_seed(3)
    a = aug(x, widths)
    torch.manual_seed(3)
    b = aug(x, widths)
    torch.manual_seed(4)
    c = aug(x, widths)
    assert a.shape == x.shape and a.dtype == x.dtype
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, x)
    assert float(a.min()) >= 0 and float(a.max()) <= 1 + 1e-12
    pad = torch.arange(x.shape[2])[None, None] >= widths[:, None, None]
    assert float(a.masked_select(pad.expand_as(a)).abs().max()) == 0.0


def test_zero_strengths_are_the_identity():
    x, widths = _lines(1)
    torch.testing.assert_close(OFF(x, widths), x, rtol=0, atol=1e-12)


def test_dark_ink_on_light_ground_is_distorted_like_light_ink():
    x, widths = _lines(2)
    valid = (torch.arange(x.shape[2])[None, None] < widths[:, None, None]).double()
    torch.manual_seed(5)
    light = ImageAugment()(x, widths)
    torch.manual_seed(5)
    dark = ImageAugment()((1 - x) * valid, widths)
    torch.testing.assert_close(dark, (1 - light) * valid)


def test_strokes_thicken_and_thin():
    x = torch.zeros(1, 9, 9, dtype=torch.float64)
    x[0, 4, 4] = 1.0
    w = torch.tensor([9])
    thick = ImageAugment(rotate=0, shear=0, scale=0, elastic=0, thickness=1.0)
    torch.manual_seed(0)
    sums = [float(thick(x, w).sum()) for _ in range(20)]
    assert max(sums) > 1.5 and min(sums) < 0.5  # dilation spreads the dot, erosion removes it


def test_bad_strengths_are_user_errors():
    with pytest.raises(UserError, match=r"image_augment.shear"):
        ImageAugment(shear=-1).check()
    with pytest.raises(UserError, match=r"scale < 1"):
        ImageAugment(scale=1.5).check()


def test_label_steps_map_back_to_the_line_images():
    """Scaled, stacked steps -> images -> steps is exact, and the images are the lines read by columns."""
    rng = np.random.default_rng(0)
    lines = [rng.random((6, w)) for w in (11, 7, 9)]
    data = L.LabelSet([im.T for im in lines], ["a", "b", "ab"], ["0", "1", "2"], "test", images=True)
    scaler = Scaler("standard").fit(np.concatenate(data.sequences, 0))
    t = L.tensors(data, scaler, stack=3)
    steps = ImageSteps(scaler.center, scaler.scale, "columns", stack=3)
    seen = []

    def spy(images, widths):
        seen.append((images.clone(), widths.clone()))
        return OFF(images, widths)

    out = steps.distort(t["x"], spy, t["columns"])
    torch.testing.assert_close(out, t["x"], rtol=0, atol=1e-5)
    images, widths = seen[0]
    assert widths.tolist() == [11, 7, 9] and images.shape == (3, 6, 12)
    for b, im in enumerate(lines):
        np.testing.assert_allclose(images[b, :, :im.shape[1]].numpy(), im, atol=1e-5)
        assert np.all(images[b, :, im.shape[1]:].numpy() == 0)


def test_label_training_distorts_images_only_while_training(monkeypatch):
    rng = np.random.default_rng(1)
    data = L.LabelSet([rng.random((12, 6)) for _ in range(4)], ["ab", "b", "a", "ba"], list("0123"), "t",
                      images=True)
    captured = {}

    def fake_fit(net, task, train_data, *a, **k):
        captured["task"], captured["data"], captured["net"] = task, train_data, net
        return {}

    monkeypatch.setattr(L, "fit", fake_fit)
    cfg = L.LabelConfig(model=L.LabelModelConfig(hidden=4, layers=1), data=L.LabelDataConfig(val_fraction=0))
    L.train(data, cfg, None)
    task, batch, net = captured["task"], captured["data"], captured["net"]
    assert task.images is not None
    net.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        a = task.loss(net, batch)
        torch.manual_seed(1)
        assert float(task.loss(net, batch)) == float(a)  # no randomness at evaluation
        net.train()
        calls = []
        monkeypatch.setattr(ImageAugment, "__call__", lambda self, im, w: calls.append(im.shape) or im)
        task.loss(net, batch)
    assert calls == [(4, 6, 12)]

    L.train(L.LabelSet(data.sequences, data.labels, data.ids, "t"), cfg, None)  # not images: no distortion
    assert captured["task"].images is None
    off = L.LabelConfig(model=cfg.model, data=cfg.data, image_augment=ImageAugment(enabled=False))
    L.train(data, off, None)
    assert captured["task"].images is None


@pytest.mark.parametrize("order,seed", [("rows", None), ("columns", None), ("pixels", None), ("pixels", 3)])
def test_classify_steps_map_back_to_the_images(order, seed):
    """Every reading order (and the pixel permutation) maps back to the very images, and forth exactly."""
    digits = load_digits("test")
    data = as_sequence_set(digits, order, seed)
    assert data.image_shape == (8, 8)
    scaler = C.fit_scaler(data, "standard")
    x = C.tensors(data, scaler, None)["x"][:5]
    perm = None if seed is None else pixel_permutation(64, seed)
    steps = ImageSteps(scaler.center, scaler.scale, order, (8, 8), perm)
    seen = []
    out = steps.distort(x, lambda im, w: seen.append(im.clone()) or OFF(im, w))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)
    np.testing.assert_allclose(seen[0].numpy(), np.stack(digits.images[:5]), atol=1e-5)


def test_classify_distorts_image_inputs_only(monkeypatch):
    captured = {}

    def fake_fit(net, task, train_data, *a, **k):
        captured["task"] = task
        return {}

    monkeypatch.setattr(C, "fit", fake_fit)
    data = as_sequence_set(load_digits("test"), "pixels", 0)
    model = C.ClassifyModelConfig(kind="recurrent", hidden=4)
    cfg = C.ClassifyConfig(model=model, data=C.ClassifyDataConfig(read="pixels", permute_seed=0))
    C.train(data, cfg, None)
    steps, aug = captured["task"].images
    assert steps.order == "pixels" and steps.shape == (8, 8) and aug == ImageAugment()
    C.train(data, C.ClassifyConfig(model=model, data=cfg.data, image_augment=ImageAugment(enabled=False)), None)
    assert captured["task"].images is None
    C.train(C.SequenceSet(data.sequences, data.labels), C.ClassifyConfig(model=model), None)  # a series set
    assert captured["task"].images is None
    with pytest.raises(UserError, match=r"image_augment: distorting images needs every step"):
        C.train(data, C.ClassifyConfig(model=model, data=C.ClassifyDataConfig(read="pixels", downsample=2)), None)
