"""Images as sequences: readers, reading orders, the pixel permutation and the built-in digit sets.

Readers (grey levels scaled to [0, 1]):

* IDX (the MNIST file format, optionally gzipped): a big-endian header ``0 0 <type> <ndim>``, ``ndim``
  uint32 sizes, then the values; an images file (N, H, W) pairs with a labels file (N,).
* a folder of PNGs with one sub-folder per class (the sub-folder name is the label);
* NumPy: ``.npy`` (N, H, W) or ``.npz`` with ``X`` (N, H, W) and optionally ``y`` (N,);
* text lines: a folder of PNGs of one height with a ``labels.tsv`` (``file<TAB>label`` per line),
  for sequence labelling.

Reading orders (:func:`to_sequence`): ``rows`` (T = H steps of W values), ``columns`` (T = W steps of H
values), ``pixels`` (T = H*W steps of one value, row-major). :func:`pixel_permutation` gives the fixed
random order of the permuted-pixel benchmark; it is a pure function of (seed, H*W).

Built-in data (nothing downloaded; see docs/labelling.md):

* :func:`load_digits` — scikit-learn's handwritten digits (UCI optical digits, 1,797 images of 8x8 with
  17 grey levels), split once: within each class the images are shuffled by ``numpy.random.default_rng(0)``
  and the first 25% (rounded up) are the test set — 454 test and 1,343 training images.
* :func:`digit_strings` — lines of 3 to 8 of those digits for CTC: each glyph is scaled by a factor
  drawn from U(1, 1.5) (8 to 12 pixels square), placed at a random height in a 16-pixel-high line and
  after a random gap of 0 to 3 pixels (2-pixel margins). Training lines use only training digits, test
  lines only test digits, so no test glyph is ever seen in training.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

ORDERS = ("rows", "columns", "pixels")
DIGITS = "digits"
DIGIT_STRINGS = "digit-strings"
DIGITS_TEST_FRACTION = 0.25
LINE_HEIGHT = 16


@dataclass
class ImageSet:
    """N grey-level images in [0, 1] (each (H, W_i); all one height), optional string labels and ids."""

    images: list[np.ndarray]
    labels: np.ndarray | None = None
    ids: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.images:
            raise UserError("images: the set is empty; expected at least one image")
        if self.labels is not None:
            self.labels = np.asarray([str(v) for v in self.labels], dtype=object)
            if len(self.labels) != len(self.images):
                raise UserError(f"labels: {len(self.labels)} labels for {len(self.images)} images")
        if self.ids is None:
            self.ids = [str(i) for i in range(len(self.images))]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def height(self) -> int:
        return self.images[0].shape[0]


# ---- reading orders ----------------------------------------------------------------------------
def pixel_permutation(n_pixels: int, seed: int) -> np.ndarray:
    """The fixed random order of ``n_pixels`` pixels for ``seed`` (``numpy.random.default_rng(seed)``)."""
    return np.random.default_rng(seed).permutation(n_pixels)


def to_sequence(image: np.ndarray, order: str, permutation: np.ndarray | None = None) -> np.ndarray:
    """One (H, W) image as a (T, C) float64 sequence read by ``order`` (see the module docstring).

    ``permutation`` (pixel order only) reorders the H*W pixels before they are read.
    """
    if order not in ORDERS:
        raise UserError(f"--read: expected one of {ORDERS}, got {order!r}")
    image = np.asarray(image, dtype=np.float64)
    if permutation is not None:
        if order != "pixels":
            raise UserError(f"--permute: a pixel permutation needs --read pixels, got --read {order}")
        if len(permutation) != image.size:
            raise UserError(f"--permute: a permutation of {len(permutation)} pixels for an image of {image.size}")
    if order == "rows":
        return image
    if order == "columns":
        return image.T
    flat = image.reshape(-1)
    return (flat if permutation is None else flat[permutation])[:, None]


def as_sequence_set(data: ImageSet, order: str, permute_seed: int | None = None):
    """A :class:`rnnkit.data.sequences.SequenceSet` of the images read by ``order`` (and permuted)."""
    from .sequences import SequenceSet

    perm = None
    if permute_seed is not None:
        sizes = {im.size for im in data.images}
        if len(sizes) != 1:
            raise UserError(f"--permute: the images have different sizes {sorted(sizes)[:5]}; a fixed pixel "
                            "permutation needs one size")
        perm = pixel_permutation(sizes.pop(), permute_seed)
    shapes = {im.shape for im in data.images}
    return SequenceSet([to_sequence(im, order, perm) for im in data.images], data.labels, data.ids,
                       image_shape=shapes.pop() if len(shapes) == 1 else None)


# ---- training-time distortion ------------------------------------------------------------------
@dataclass(frozen=True)
class ImageAugment:
    r"""Random distortion of training images (section ``[image_augment]``); never applied at evaluation.

    Each image of a batch gets its own random affine map about its centre, a smooth random displacement
    field and a change of stroke thickness. With ink :math:`y = \sigma (x - b)` (:math:`b` the image's
    median grey level, its background; :math:`\sigma = \pm 1` so that ink is positive, for light ink on
    dark ground and dark ink on light ground alike), output pixel :math:`p` (column, row; centre
    :math:`c`) reads :math:`y` bilinearly at

    .. math:: p' = R(\theta)\, \begin{pmatrix}1 & s\\ 0 & 1\end{pmatrix}
              \begin{pmatrix}a_x & 0\\ 0 & a_y\end{pmatrix} (p - c) + c + \delta(p)

    with :math:`\theta \sim U(\pm\text{rotate})` degrees, shear :math:`s \sim U(\pm\text{shear})`,
    :math:`a \sim U(1 \pm \text{scale})` per axis and :math:`\delta` white noise blurred by a Gaussian of
    std ``elastic_sigma`` pixels, rescaled to an rms of ``elastic`` pixels (Simard et al. 2003). Strokes
    then move towards their 3x3 grey-level dilation (:math:`t > 0`) or erosion (:math:`t < 0`) by
    :math:`|t|`, :math:`t \sim U(\pm\text{thickness})`. Outside the image reads as background; the size
    and the labels do not change.

    Args:
        enabled: distort training images (only inputs read from images are).
        rotate, shear, scale, elastic, elastic_sigma, thickness: the strengths above (0 = off); the
            defaults are those of ``rnnkit classify``, ``rnnkit label`` sets its own for text lines.
    """

    enabled: bool = True
    rotate: float = 5.0
    shear: float = 0.15
    scale: float = 0.1
    elastic: float = 0.3
    elastic_sigma: float = 1.5
    thickness: float = 0.3

    def check(self) -> None:
        for key in ("rotate", "shear", "scale", "elastic", "elastic_sigma", "thickness"):
            v = getattr(self, key)
            limit = 90 if key == "rotate" else 10
            if not 0 <= v < limit:
                raise UserError(f"image_augment.{key}: expected a strength in [0, {limit}), got {v}")
        if self.scale >= 1 or self.thickness > 1:
            raise UserError(f"image_augment: expected scale < 1 and thickness <= 1, got scale {self.scale} and "
                            f"thickness {self.thickness}")

    def __call__(self, images, widths):
        """Distort a zero-padded batch of images (B, H, W) whose image b spans columns [0, widths[b]);
        columns past an image's width stay zero. Draws from torch's global generator."""
        import torch
        import torch.nn.functional as F

        B, H, W = images.shape
        dt, dev = images.dtype, images.device
        valid = (torch.arange(W, device=dev)[None] < widths[:, None].to(dev))[:, None, :].expand(B, H, W)
        bg = torch.stack([im[v].median() if v.any() else im.new_zeros(()) for im, v in zip(images, valid)])
        sign = torch.where(bg > 0.5, -1.0, 1.0).to(dt)
        ink = (images - bg[:, None, None]) * sign[:, None, None] * valid

        def u(n: int = B) -> torch.Tensor:
            return 2 * torch.rand(n, device=dev, dtype=dt) - 1

        th = torch.deg2rad(self.rotate * u())
        sh, ax, ay = self.shear * u(), 1 + self.scale * u(), 1 + self.scale * u()
        cos, sin = torch.cos(th), torch.sin(th)
        # A = R(th) @ [[1, sh], [0, 1]] @ diag(ax, ay)
        a11, a12 = cos * ax, (cos * sh - sin) * ay
        a21, a22 = sin * ax, (sin * sh + cos) * ay
        cx = (widths.to(dev, dt) - 1) / 2
        cy = (H - 1) / 2
        px = torch.arange(W, device=dev, dtype=dt)[None, None, :] - cx[:, None, None]
        py = torch.arange(H, device=dev, dtype=dt)[None, :, None] - cy
        sx = a11[:, None, None] * px + a12[:, None, None] * py + cx[:, None, None]
        sy = a21[:, None, None] * px + a22[:, None, None] * py + cy
        if self.elastic > 0:
            field = _smooth_noise(B, H, W, self.elastic_sigma, dev, dt)
            rms = field.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp(min=1e-12)
            field = field * (self.elastic / rms)
            sx, sy = sx + field[:, 0], sy + field[:, 1]
        grid = torch.stack([(2 * sx + 1) / W - 1, (2 * sy + 1) / H - 1], dim=-1)
        out = F.grid_sample(ink[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.thickness > 0:
            t = (self.thickness * u())[:, None, None, None]
            dil = F.max_pool2d(out, 3, stride=1, padding=1)
            ero = -F.max_pool2d(-out, 3, stride=1, padding=1)
            out = out + t.clamp(min=0) * (dil - out) + (-t).clamp(min=0) * (ero - out)
        return (bg[:, None, None] + sign[:, None, None] * out[:, 0]) * valid


class ImageSteps:
    """Maps a batch of scaled steps back to the images they were read from and forth again, so that the
    images can be distorted while training (:meth:`distort`).

    The steps (B, T, C) were read from images of ``shape`` (H, W) in ``order`` (:func:`to_sequence`, with
    ``permutation`` for pixels), scaled per feature as (v - center) / scale, and
    ``stack`` consecutive steps joined into one (columns: images of any width).
    """

    def __init__(self, center: np.ndarray, scale: np.ndarray, order: str, shape: tuple[int, int] | None = None,
                 permutation: np.ndarray | None = None, stack: int = 1) -> None:
        import torch

        if order not in ORDERS:
            raise UserError(f"--read: expected one of {ORDERS}, got {order!r}")
        if order != "columns" and shape is None:
            raise UserError(f"image augmentation: images read as {order} need their size (H, W)")
        self.center = torch.as_tensor(np.asarray(center, dtype=np.float32))
        self.scale = torch.as_tensor(np.asarray(scale, dtype=np.float32))
        self.order, self.shape, self.stack = order, shape, stack
        self.perm = None if permutation is None else torch.as_tensor(np.asarray(permutation, dtype=np.int64))
        self.inverse = None if permutation is None else torch.argsort(self.perm)

    def distort(self, x, augment_images, widths=None):
        """``x`` (B, T, C) with each image distorted by ``augment_images`` (an :class:`ImageAugment`);
        ``widths``: the number of (unstacked) steps of each image read by columns (default: all)."""
        import torch

        from .sequences import length_mask

        B, T, C = x.shape
        n = T * self.stack
        c, s = self.center.to(x.device, x.dtype), self.scale.to(x.device, x.dtype)
        if widths is None:
            widths = torch.full((B,), n if self.order == "columns" else self.shape[1], dtype=torch.long)
        mask = (length_mask(widths.to(x.device), n) if self.order == "columns"
                else torch.ones(B, n, dtype=torch.bool, device=x.device))[..., None].to(x.dtype)
        raw = (x.reshape(B, n, C // self.stack) * s + c) * mask
        if self.order == "columns":
            images = raw.transpose(1, 2)
        elif self.order == "rows":
            images = raw
        else:
            flat = raw[..., 0] if self.inverse is None else raw[..., 0][:, self.inverse.to(x.device)]
            images = flat.reshape(B, *self.shape)
        out = augment_images(images, widths)
        if self.order == "columns":
            raw = out.transpose(1, 2)
        elif self.order == "rows":
            raw = out
        else:
            flat = out.reshape(B, -1)
            raw = (flat if self.perm is None else flat[:, self.perm.to(x.device)])[..., None]
        return ((raw - c) / s * mask).reshape(B, T, C)


def training_inputs(x, lengths, augmentation: dict[str, float],
                    images: tuple[ImageSteps, ImageAugment] | None = None, widths=None):
    """A training batch (B, T, C) augmented: image inputs first distorted (``images``: how the steps map to
    images, and the distortion; ``widths`` as in :meth:`ImageSteps.distort`), then every input by
    :func:`rnnkit.data.sequences.augment` with ``augmentation``."""
    from .sequences import augment

    if images is not None:
        steps, augment_images = images
        x = steps.distort(x, augment_images, widths)
    return augment(x, lengths, **augmentation) if augmentation else x


def _smooth_noise(B: int, H: int, W: int, sigma: float, device, dtype):
    """(B, 2, H, W) white noise blurred by a Gaussian of std ``sigma`` pixels (separable, zero-padded)."""
    import torch
    import torch.nn.functional as F

    noise = torch.randn(B * 2, 1, H, W, device=device, dtype=dtype)
    if sigma <= 0:
        return noise.view(B, 2, H, W)
    r = max(1, int(round(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=device, dtype=dtype) / sigma) ** 2)
    k = k / k.sum()
    noise = F.conv2d(noise, k.view(1, 1, 1, -1), padding=(0, r))
    noise = F.conv2d(noise, k.view(1, 1, -1, 1), padding=(r, 0))
    return noise.view(B, 2, H, W)


# ---- IDX ---------------------------------------------------------------------------------------
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path, name: str = "--train") -> np.ndarray:
    """The array of one IDX file (gzipped or not), checked against its header."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{name}: file not found: {str(path)!r}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise UserError(f"{name}: {path} is a corrupt gzip file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise UserError(f"{name}: {path} is not an IDX file (expected a header 0 0 <type> <ndim>, got "
                        f"{raw[:4].hex(' ') or 'an empty file'})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise UserError(f"{name}: {path} is a corrupt IDX file (header cut short: {len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = 4 + 4 * ndim + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise UserError(f"{name}: {path} is a corrupt IDX file (header {tuple(shape)} of {dtype.name} needs "
                        f"{expected} bytes, the file has {len(raw)})")
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` (uint8, int8, int16, int32, float32 or float64) as an IDX file."""
    array = np.asarray(array)
    code = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_TYPES.items()}.get(array.dtype.newbyteorder("="))
    if code is None:
        raise UserError(f"write_idx: dtype {array.dtype} has no IDX type code")
    head = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    Path(path).write_bytes(head + array.astype(_IDX_TYPES[code]).tobytes())
    return Path(path)


def read_idx_pair(images: str | Path, labels: str | Path, name: str = "--train") -> ImageSet:
    """An images file (N, H, W) and a labels file (N,) in IDX format; uint8 images are scaled by 1/255."""
    X = read_idx(images, name)
    y = read_idx(labels, f"{name}-labels")
    if X.ndim != 3:
        raise UserError(f"{name}: {images} holds an array of shape {X.shape}; expected images (N, H, W)")
    if y.ndim != 1 or len(y) != len(X):
        raise UserError(f"{name}-labels: {labels} holds shape {y.shape}; expected ({len(X)},) labels for the "
                        f"{len(X)} images of {images}")
    return ImageSet(list(_unit_scale(X)), y)


def _unit_scale(X: np.ndarray) -> np.ndarray:
    if X.dtype == np.uint8:
        return X.astype(np.float64) / 255.0
    return X.astype(np.float64)


# ---- PNG ---------------------------------------------------------------------------------------
def read_png(path: str | Path, name: str = "--train") -> np.ndarray:
    """One PNG as an (H, W) grey-level array in [0, 1] (colour is converted to luminance)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            grey = im.convert("I;16") if im.mode in ("I", "I;16") else im.convert("L")
            a = np.asarray(grey, dtype=np.float64)
    except FileNotFoundError as e:
        raise UserError(f"{name}: file not found: {str(path)!r}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{name}: {path} is not a readable PNG ({e})") from e
    return a / (65535.0 if grey.mode == "I;16" else 255.0)


def read_png_classes(root: str | Path, name: str = "--train") -> ImageSet:
    """A folder with one sub-folder of PNGs per class; the sub-folder name is the label."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{name}: not a folder: {str(root)!r}; expected one sub-folder of PNGs per class")
    images, labels, ids = [], [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(sub.glob("*.png")):
            images.append(read_png(f, name))
            labels.append(sub.name)
            ids.append(f"{sub.name}/{f.name}")
    if not images:
        raise UserError(f"{name}: {root} has no <class>/*.png files; expected one sub-folder of PNGs per class")
    check_one_shape(images, ids, root, name)
    return ImageSet(images, np.asarray(labels), ids)


def check_one_shape(images: Sequence[np.ndarray], ids: Sequence[str], where: Path, name: str,
                    heights_only: bool = False) -> None:
    """Every image of a set must have the first one's height (and width unless ``heights_only``)."""
    ref = images[0].shape
    for im, i in zip(images, ids):
        if im.shape[0] != ref[0] or (not heights_only and im.shape != ref):
            what = "height" if heights_only else "size"
            raise UserError(f"{name}: {where / i} has {what} {im.shape[0] if heights_only else im.shape}, "
                            f"{ids[0]} has {ref[0] if heights_only else ref}; every image of a set needs one {what}")


def read_labels_tsv(path: Path, name: str) -> list[tuple[str, str]]:
    """``file<TAB>label`` lines (blank lines skipped); an empty label is an error naming the line."""
    if not path.is_file():
        raise UserError(f"{name}: no label file {str(path)!r}; expected lines 'file<TAB>label'")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, label = line.partition("\t")
        if not sep:
            raise UserError(f"{name}: {path} line {n}: expected 'file<TAB>label', got {line[:60]!r}")
        if not label.strip():
            raise UserError(f"{name}: {path} line {n}: empty label for {key!r}; every sequence needs a label")
        out.append((key.strip(), label.strip()))
    if not out:
        raise UserError(f"{name}: {path} has no labelled lines")
    return out


def read_text_lines(root: str | Path, labels: str | Path | None = None, name: str = "--train") -> ImageSet:
    """Text-line PNGs of one height listed in ``labels`` (default ``root/labels.tsv``)."""
    root = Path(root)
    path = Path(labels) if labels is not None else root / "labels.tsv"
    pairs = read_labels_tsv(path, name)
    images = [read_png(root / f, name) for f, _ in pairs]
    ids = [f for f, _ in pairs]
    check_one_shape(images, ids, root, name, heights_only=True)
    return ImageSet(images, np.asarray([lab for _, lab in pairs], dtype=object), ids)


# ---- NumPy -------------------------------------------------------------------------------------
def read_image_array(path: str | Path, name: str = "--train") -> ImageSet:
    """``.npy`` (N, H, W) or ``.npz`` with ``X`` (N, H, W) and optional ``y`` (uint8 scaled by 1/255)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{name}: file not found: {str(path)!r}")
    try:
        if path.suffix.lower() == ".npy":
            X, y = np.load(path, allow_pickle=False), None
        else:
            with np.load(path, allow_pickle=False) as z:
                if "X" not in z.files:
                    raise UserError(f"{name}: {path} has arrays {z.files}; expected 'X' (N, H, W) and optionally 'y'")
                X, y = z["X"], (z["y"] if "y" in z.files else None)
    except (ValueError, OSError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{name}: {path} is not a readable NumPy file ({e})") from e
    if X.ndim != 3:
        raise UserError(f"{name}: {path} holds images of shape {X.shape}; expected (N, H, W)")
    return ImageSet(list(_unit_scale(X)), y)


def read_images(source: str | Path, labels: str | Path | None = None, name: str = "--train",
                labels_flag: str = "--train-labels") -> ImageSet:
    """Images for classification: a PNG class folder, ``.npy``/``.npz``, or an IDX images file with its
    ``labels`` IDX file (given by ``labels_flag``)."""
    path = Path(source)
    if path.is_dir():
        return read_png_classes(path, name)
    if path.suffix.lower() in (".npy", ".npz"):
        return read_image_array(path, name)
    if labels is None:
        raise UserError(f"{name}: {path} is read as an IDX images file, which needs its labels file "
                        f"({labels_flag} FILE)")
    return read_idx_pair(path, labels, name)


# ---- built-in digits ---------------------------------------------------------------------------
def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) of scikit-learn's digits, in [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:
        raise UserError("--dataset digits needs scikit-learn (pip install 'rnnkit[datasets]')") from e
    d = sk_digits()
    X, y = d.images / 16.0, d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test = []
    for k in range(10):
        idx = rng.permutation(np.nonzero(y == k)[0])
        test.extend(idx[:int(np.ceil(DIGITS_TEST_FRACTION * len(idx)))].tolist())
    test_idx = np.array(sorted(test))
    train_idx = np.setdiff1d(np.arange(len(y)), test_idx)
    return X[train_idx], y[train_idx], X[test_idx], y[test_idx]


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise UserError(f"split: expected 'train' or 'test', got {split!r}")


def load_digits(split: str) -> ImageSet:
    """The built-in 8x8 digits (``split`` "train" or "test"; the fixed split of the module docstring)."""
    _check_split(split)
    Xtr, ytr, Xte, yte = _digits_split()
    X, y = (Xtr, ytr) if split == "train" else (Xte, yte)
    return ImageSet(list(X), y)


DIGIT_STRING_SIZES = {"train": (10000, 1), "test": (1000, 2)}  # lines, generator seed


def digit_strings(split: str, n: int | None = None, seed: int | None = None) -> ImageSet:
    """Lines of 3-8 handwritten digits (see the module docstring), labelled with their digit strings.

    Defaults: 10,000 training lines (seed 1) and 1,000 test lines (seed 2).
    """
    from scipy.ndimage import zoom

    _check_split(split)
    Xtr, ytr, Xte, yte = _digits_split()
    glyphs, classes = (Xtr, ytr) if split == "train" else (Xte, yte)
    n_default, seed_default = DIGIT_STRING_SIZES[split]
    rng = np.random.default_rng(seed_default if seed is None else seed)
    images, labels = [], []
    for _ in range(n_default if n is None else n):
        k = int(rng.integers(3, 9))
        picks = rng.integers(0, len(glyphs), size=k)
        parts, x = [], 2
        for j, g in enumerate(picks):
            size = int(round(8 * rng.uniform(1.0, 1.5)))
            glyph = np.clip(zoom(glyphs[g], size / 8, order=1), 0.0, 1.0)
            top = int(rng.integers(0, LINE_HEIGHT - glyph.shape[0] + 1))
            if j:
                x += int(rng.integers(0, 4))
            parts.append((glyph, top, x))
            x += glyph.shape[1]
        line = np.zeros((LINE_HEIGHT, x + 2))
        for glyph, top, left in parts:
            h, w = glyph.shape
            line[top:top + h, left:left + w] = np.maximum(line[top:top + h, left:left + w], glyph)
        images.append(line)
        labels.append("".join(str(int(classes[g])) for g in picks))
    return ImageSet(images, np.asarray(labels, dtype=object))


__all__ = ["ImageSet", "ImageAugment", "ImageSteps", "training_inputs", "ORDERS", "to_sequence",
           "as_sequence_set", "pixel_permutation", "read_idx", "write_idx",
           "read_idx_pair", "read_png", "read_png_classes", "read_text_lines", "read_labels_tsv",
           "read_image_array", "read_images", "load_digits", "digit_strings"]
