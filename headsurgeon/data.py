"""Datasets and loaders for training: train / validation (carved from train) / test, label noise.

Everything goes through timm's ``create_dataset`` / ``create_loader`` / transforms, except two
real datasets that need no download and are served as PIL images so the same timm transforms
resize them: ``digits`` (scikit-learn's bundled 8x8 handwritten digits) and ``fashion-mnist``
(the IDX files of Debian's ``dataset-fashion-mnist`` package, or any folder holding them).
"""
from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import HeadsurgeonError, first_line

if TYPE_CHECKING:
    from .recipe import DataCfg

DIGITS_TEST = 360  # fixed held-out digits test split (20%), independent of every recipe seed
DIGITS_TEST_SPLITS = ("test", "validation", "val")  # names of digits' test split


def digits_folds(targets: Sequence[int], folds: int) -> list[int]:
    """The fold (0..folds-1) of every sample: a fixed-seed shuffle, then dealt out class by class, so
    each fold holds every class in proportion and fold sizes differ by at most one. Independent of
    every recipe seed, so fold k is the same test set for every run."""
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0)).tolist()
    order.sort(key=lambda i: int(targets[i]))  # stable: shuffled within each class
    fold = [0] * len(targets)
    for j, i in enumerate(order):
        fold[i] = j % folds
    return fold


class _GreyImages(Dataset):
    """Grey uint8 images (``images``: [N, H, W]) with int ``targets``, served as PIL 'L' images through
    ``transform`` as torchvision's datasets serve them, so timm's transforms apply unchanged."""

    images: np.ndarray
    targets: list[int]
    classes: list[str]
    transform: Any = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        img = Image.fromarray(self.images[i], mode="L")
        return (self.transform(img) if self.transform else img), self.targets[i]


class Digits(_GreyImages):
    """scikit-learn's handwritten digits as grey PIL images (values 0..16 scaled to 0..255).

    Without ``folds``: a fixed 1,437 train / 360 test split. With ``folds=k``: fold ``fold`` of
    :func:`digits_folds` is the test split and the other k-1 folds are the train split.
    """

    def __init__(self, split: str, folds: int | None = None, fold: int = 0):
        from sklearn.datasets import load_digits

        d = load_digits()
        if split not in ("train", *DIGITS_TEST_SPLITS):
            raise HeadsurgeonError(f"digits has splits 'train' and 'test', not '{split}'; set data.train_split / "
                                   f"data.test_split to one of them")
        if folds:
            of = digits_folds(d.target.tolist(), folds)
            idx = [i for i, f in enumerate(of) if (f == fold) == (split != "train")]
        else:
            order = torch.randperm(len(d.target), generator=torch.Generator().manual_seed(0)).tolist()
            idx = order[-DIGITS_TEST:] if split != "train" else order[:-DIGITS_TEST]
        self.indices = list(idx)  # positions in scikit-learn's load_digits()
        self.images = (d.images[idx] * (255.0 / 16.0)).round().astype("uint8")
        self.targets = [int(t) for t in d.target[idx]]
        self.classes = [str(i) for i in range(10)]
        self.transform = None


FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # where `apt-get install dataset-fashion-mnist` puts it
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_MISSING = ("install the Debian package (apt-get install dataset-fashion-mnist) or point data.root at a folder "
            "holding the four IDX files")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One IDX file (gzipped or not) as a uint8 array, its header checked against its length.

    The format is MNIST's big-endian IDX: 2 zero bytes, a type byte (0x08 = uint8), the number of
    dimensions, one big-endian uint32 per dimension, then the data. We read it ourselves because
    torchvision's ``FashionMNIST`` wants a ``FashionMNIST/raw/`` layout and downloads otherwise.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise HeadsurgeonError(f"cannot read '{path}': {type(e).__name__}: {e} (a corrupt or truncated file? "
                               f"reinstall it: {_MISSING})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] not in (1, 3):
        raise HeadsurgeonError(f"'{path}' is not a uint8 IDX file of labels or images (bad header); {_MISSING}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    start, count = 4 + 4 * ndim, int(np.prod(dims))
    if len(raw) != start + count:
        raise HeadsurgeonError(f"'{path}' holds {len(raw) - start} bytes of data but its header says {dims} "
                               f"({count} bytes): truncated or corrupt; {_MISSING}")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims)


def _idx_path(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise HeadsurgeonError(f"Fashion-MNIST file '{stem}[.gz]' is missing in '{root}'; {_MISSING}")


class FashionMNIST(_GreyImages):
    """Fashion-MNIST (Xiao et al. 2017) from its four IDX files: 60,000 train / 10,000 test 28x28
    grey images, 10 classes. ``split`` 'train' reads the train files; 'test', 'validation' and 't10k'
    read the test files (our validation split is carved from train, never from these)."""

    def __init__(self, split: str, root: str | os.PathLike | None = None):
        folder = Path(root or FASHION_MNIST_ROOT)
        if not folder.is_dir():
            raise HeadsurgeonError(f"Fashion-MNIST folder '{folder}' does not exist; {_MISSING}")
        which = "train" if split == "train" else "test" if split in ("test", "validation", "val", "t10k") else None
        if which is None:
            raise HeadsurgeonError(f"Fashion-MNIST has splits 'train' and 'test', not '{split}'; set data.train_split / "
                                   f"data.test_split to one of them")
        images, labels = (read_idx(_idx_path(folder, stem)) for stem in _IDX_FILES[which])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise HeadsurgeonError(f"Fashion-MNIST '{which}' files in '{folder}' disagree: images {list(images.shape)}, "
                                   f"labels {list(labels.shape)}; {_MISSING}")
        if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise HeadsurgeonError(f"Fashion-MNIST labels in '{folder}' go up to {int(labels.max())}; expected 0..9")
        self.images, self.targets = images, [int(t) for t in labels]
        self.classes = list(FASHION_MNIST_CLASSES)
        self.transform = None


# PIL's modes of 16-bit (and 32-bit integer) grey images: converting them to 'L' or 'RGB' clips every value
# above 255 to white, so they are scaled to 8 bits first. 'I' is read as 16-bit (0..65535), as PIL reads
# 16-bit PNGs in some versions.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(img: Any) -> Any:
    """A 16-bit grey PIL image as an 8-bit 'L' one (0..65535 -> 0..255, rounded); any other image unchanged."""
    if getattr(img, "mode", None) not in WIDE_MODES:
        return img
    from PIL import Image

    a = np.asarray(img).astype(np.float64)
    return Image.fromarray((a / 257.0).round().clip(0, 255).astype(np.uint8), mode="L")


class BadImage(HeadsurgeonError):
    """An image file of a folder dataset that cannot be decoded. torch's DataLoader re-raises an exception
    of a worker process as ``type(e)(<its whole traceback>)``: this keeps the one line it started as."""

    def __init__(self, message: str = ""):
        if "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


class _Images(Dataset):
    """timm's ``ImageDataset`` read strictly: a file that cannot be decoded (empty, truncated, not an image,
    unreadable) or a decompression bomb is an error naming it, where timm logs one warning and silently
    serves the next sample instead (a wrong image under the broken one's label). 16-bit images are scaled
    to 8 bits (:func:`to_8bit`) before timm's conversion to its ``input_img_mode`` would clip them."""

    def __init__(self, ds: Any):
        self.ds = ds

    def __getattr__(self, name: str) -> Any:  # reader, filename(s), class_to_idx ...: the wrapped dataset's
        if name == "ds":
            raise AttributeError(name)
        return getattr(self.ds, name)

    def __len__(self) -> int:
        return len(self.ds)

    def _name(self, i: int) -> str:
        try:
            return str(self.ds.filename(i, absolute=True))
        except Exception:  # a reader without file names
            return f"sample {i}"

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image, UnidentifiedImageError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                f, target = self.ds.reader[i][:2]
                try:
                    img = Image.open(f)
                    img.load()
                finally:
                    if hasattr(f, "close"):
                        f.close()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage(f"image '{self._name(i)}' is too large for PIL ({first_line(e)}); it may be a "
                           f"decompression bomb: remove it (or shrink it below Image.MAX_IMAGE_PIXELS = "
                           f"{Image.MAX_IMAGE_PIXELS:,} pixels), then run again") from None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError ... for a file it cannot decode
            path = self._name(i)
            try:
                empty = os.path.getsize(path) == 0
            except OSError:
                empty = False
            why = ("an empty file" if empty else "not an image PIL can identify" if isinstance(e, UnidentifiedImageError)
                   else f"{type(e).__name__}: {first_line(e, 120)}")
            raise BadImage(f"image '{path}' cannot be read ({why}): an empty, truncated or broken file, or not an "
                           f"image; remove it (rm '{path}') or replace it, then run again") from None
        img = to_8bit(img)
        mode = getattr(self.ds, "input_img_mode", "RGB")
        if mode and img.mode != mode:
            img = img.convert(mode)
        return img, (-1 if target is None else target)


class View(Dataset):
    """A subset of a dataset with its own transform and optional label noise.

    ``torch.utils.data.Subset`` has no ``transform`` for ``create_loader`` to set, and the
    train and validation subsets of one base dataset need different transforms.
    Noisy labels are ``(label + offset) % C`` with a per-sample offset in 1..C-1: uniform over
    the *other* classes, without reading every sample's label up front.
    ``mode`` converts PIL images ('L' for a 1-channel model, 'RGB' for 3): grey datasets feed
    any model, and a colour dataset feeds an ``in_chans=1`` one.
    """

    def __init__(self, base: Dataset, indices: Sequence[int], offsets: dict[int, int] | None = None,
                 num_classes: int = 0):
        self.base, self.indices = base, list(indices)
        self.offsets, self.num_classes = offsets or {}, num_classes
        self.transform = None
        self.mode = "RGB"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img, target = self.base[self.indices[i]]
        img = to_8bit(img)  # a 16-bit image converted as it is would be clipped to white
        if self.mode and getattr(img, "mode", self.mode) != self.mode:
            img = img.convert(self.mode)
        if i in self.offsets:
            target = (int(target) + self.offsets[i]) % self.num_classes
        return (self.transform(img) if self.transform else img), target


@dataclass
class Splits:
    train: View
    val: View
    test: View
    num_classes: int
    noise: dict[str, Any] = field(default_factory=dict)
    label_names: list[str] | None = None

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _base(name: str, root: str | None, split: str, download: bool, folds: int | None = None, fold: int = 0,
          key: str = "data.train_split") -> Dataset:
    if name == "digits":
        return Digits(split, folds, fold)
    if name == FASHION_MNIST:
        return FashionMNIST(split, root)
    from timm.data import create_dataset

    if root and not os.path.exists(root) and not download:
        raise HeadsurgeonError(f"dataset root '{root}' does not exist; point data.root at the data "
                               f"(or --set data.download=true for torch/... and hfds/... datasets)")
    if name == "folder" and root and os.path.isdir(root):
        _check_split_folder(root, split, key)
    try:
        ds = create_dataset(name, root=root, split=split, download=download, is_training=False)
    except Exception as e:  # timm/torchvision/datasets raise many types; one line is enough here
        raise HeadsurgeonError(f"cannot open dataset '{name}' (split '{split}') at '{root}': "
                               f"{type(e).__name__}: {first_line(e)}") from None
    if isinstance(ds, torch.utils.data.IterableDataset):
        raise HeadsurgeonError(f"dataset '{name}' is a streaming dataset; use an ImageFolder, torch/... or hfds/... dataset")
    if len(ds) == 0:
        raise HeadsurgeonError(f"dataset '{name}' split '{split}' at '{root}' has no samples")
    _check_folder(ds)
    from timm.data import ImageDataset

    return _Images(ds) if isinstance(ds, ImageDataset) else ds


def _check_split_folder(root: str, split: str, key: str) -> None:
    """An image folder's split is the sub-folder ``<root>/<split>`` (or one of timm's synonyms: val, valid,
    eval, ...). Without one timm reads ``root`` itself as the split: the other splits' folders become classes,
    or, for a root of class folders, training and test are the same images."""
    try:
        from timm.data.dataset_factory import _search_split
    except ImportError:  # pragma: no cover (a timm without it)
        def _search_split(r: str, s: str) -> str:
            return os.path.join(r, s) if os.path.exists(os.path.join(r, s)) else r
    if os.path.normpath(_search_split(root, split)) != os.path.normpath(root):
        return
    subs = sorted(e.name for e in os.scandir(root) if e.is_dir())
    has = f"its sub-folders are {', '.join(subs[:4])}{', ...' if len(subs) > 4 else ''}" if subs else "it has no sub-folders"
    raise HeadsurgeonError(f"image folder '{root}' has no '{split}' split folder ({key} '{split}'; {has}); data.root "
                           f"must hold <split>/<class>/<image>: add '{os.path.join(root, split)}' or set {key} to "
                           f"the split folder's name")


def _check_folder(ds: Dataset) -> None:
    """An image folder holds ``<split>/<class>/<image>``: timm labels any other image by its folder's
    name (a stray ``curves.png`` at the top becomes class '', ``runs/x/curves.png`` class 'x')."""
    reader = getattr(ds, "reader", None)
    samples, top = getattr(reader, "samples", None), getattr(reader, "root", None)
    if not isinstance(samples, list) or not top or not os.path.isdir(top):
        return
    stray = [rel for rel in (os.path.relpath(str(s[0]), top) for s in samples) if len(Path(rel).parts) != 2]
    if stray:
        raise HeadsurgeonError(f"image folder '{top}' has {len(stray)} image(s) outside a class sub-folder "
                               f"(e.g. '{stray[0]}'); every image must sit in <class>/<file> there: move or delete them")


def label_names(ds: Dataset) -> list[str] | None:
    """Class names in label order, where the dataset has them (digits, ImageFolder, torchvision)."""
    for obj in (ds, getattr(ds, "reader", None)):
        c2i = getattr(obj, "class_to_idx", None)
        if isinstance(c2i, dict) and c2i:
            return [str(k) for k, _ in sorted(c2i.items(), key=lambda kv: kv[1])]
        classes = getattr(obj, "classes", None)
        if isinstance(classes, (list, tuple)) and classes:
            return [str(c) for c in classes]
    return None


def _num_classes(ds: Dataset) -> int | None:
    for obj in (ds, getattr(ds, "reader", None)):
        for attr in ("class_to_idx", "classes"):
            v = getattr(obj, attr, None)
            if v:
                return len(v)
    return None


def carve(ds: Dataset, val_fraction: float, train_fraction: float, seed: int,
          stratify: bool) -> tuple[list[int], list[int]]:
    """Validation and training indices of ``ds``: one seeded shuffle; the first ``val_fraction`` is
    validation, then a ``train_fraction`` share of the rest is trained on. ``stratify`` does this
    class by class (the same shuffle, each class's share rounded), so validation and the labelled
    subset keep the train split's class proportions."""
    n = len(ds)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    if stratify:
        targets = getattr(ds, "targets", None)
        if targets is None or len(targets) != n:
            raise HeadsurgeonError("data.stratify needs a dataset that lists its labels (digits, fashion-mnist, "
                                   "torch/...); set data.stratify=false")
        groups: dict[int, list[int]] = {}
        for i in order:
            groups.setdefault(int(targets[i]), []).append(i)
        cuts = [(g, max(1, round(val_fraction * len(g)))) for g in groups.values()]
        val = [i for g, k in cuts for i in g[:k]]
        train = [i for g, k in cuts for i in g[k:][:max(1, round(train_fraction * (len(g) - k)))]]
        if any(k >= len(g) for g, k in cuts):
            raise HeadsurgeonError(f"data.val_fraction {val_fraction} leaves a class with no training samples")
        return sorted(val), sorted(train)
    n_val = max(1, round(val_fraction * n))
    if n_val >= n:
        raise HeadsurgeonError(f"data.val_fraction {val_fraction} leaves no training samples out of {n}")
    rest = order[n_val:]
    keep = max(1, round(train_fraction * len(rest)))
    return sorted(order[:n_val]), sorted(rest[:keep])  # rest is in random order: a random subset


def _section(data: Any) -> "DataCfg":
    """A recipe's ``data`` section; a whole recipe is still taken (code written before these functions
    took the section: user scripts, the demo's fresh-process evaluation)."""
    return getattr(data, "data", data)


def splits(data: "DataCfg") -> Splits:
    """Train / validation / test views of the recipe's ``data`` section; the validation carve and the
    noise have fixed seeds."""
    d = _section(data)
    name, root, dl = d.dataset, d.root, d.download
    folds = (d.folds, d.fold)
    tr, te = d.train_split, d.test_split
    if tr == te or (name in ("digits", FASHION_MNIST) and tr != "train"):  # the test split is never trained on
        raise HeadsurgeonError(f"data.train_split '{tr}' would train on the test images of '{name}'"
                               + (f" ('{te}' is the test split)" if tr == te else "; its training split is 'train'")
                               + "; validation is carved from the training split")
    train_base = _base(name, root, tr, dl, *folds)
    test_base = _base(name, root, te, dl, *folds, key="data.test_split")
    for base, s in ((train_base, tr), (test_base, te)):  # an empty test split would be evaluated as 0/0: NaN accuracy
        if len(base) == 0:
            raise HeadsurgeonError(f"the '{s}' split of '{name}'" + (f" at '{root}'" if root else "") + " has no "
                                   "samples; its accuracy would be 0/0: give a dataset with images in every split")
    classes = _classes(d, train_base, test_base)
    val_idx, train_idx = carve(train_base, d.val_fraction, d.train_fraction,
                               d.split_seed, d.stratify)
    frac = d.label_noise
    offsets, val_offsets = _noise(d, len(train_idx), len(val_idx), classes)
    return Splits(
        train=View(train_base, train_idx, offsets, classes),
        val=View(train_base, val_idx, val_offsets, classes),
        test=View(test_base, range(len(test_base))),
        num_classes=classes,
        noise={"fraction": frac, "flipped": len(offsets), "seed": d.noise_seed,
               **({"val_flipped": len(val_offsets)} if d.val_noise else {})},
        label_names=(lambda n: n if n and len(n) == classes else None)(label_names(train_base)),
    )


def _classes(d: "DataCfg", train_base: Dataset, test_base: Dataset) -> int:
    """The class count: ``data.num_classes``, else what the dataset lists or its labels reach; checked
    against the dataset (no outputs that never see a label, at least 2, the same classes in both splits)."""
    name, root, tr, te = d.dataset, d.root, d.train_split, d.test_split
    listed = _num_classes(train_base)  # the classes the dataset lists (class folders, torchvision's classes)
    found = listed
    targets = getattr(train_base, "targets", None)
    found = max(found or 0, (max(int(t) for t in targets) + 1) if targets is not None and len(targets) else 0) or None
    given = d.num_classes
    if given and found and given < found:
        raise HeadsurgeonError(f"data.num_classes is {given} but '{name}' has {found} classes (labels 0..{found - 1}); "
                               f"set data.num_classes: {found} or leave it out")
    if given and listed and given > listed:  # outputs no label reaches; symmetric noise would flip labels into them
        raise HeadsurgeonError(f"data.num_classes is {given} but '{name}' lists {listed} class{'es' * (listed != 1)}"
                               + (f" ({', '.join(label_names(train_base)[:5])}{', ...' if listed > 5 else ''})"
                                  if label_names(train_base) else "")
                               + f": {given - listed} outputs would never see a label and label noise would flip "
                               f"labels into them; set data.num_classes: {listed} or leave it out")
    if given and found and given > found:  # no class list, only the labels: the highest may be absent from train
        warnings.warn(f"data.num_classes is {given} but the labels of '{name}' ('{tr}') go up to {found - 1}; "
                      f"outputs {found}..{given - 1} never see a training label")
    classes = given or found
    if not classes:
        raise HeadsurgeonError(f"cannot tell how many classes '{name}' has; set data.num_classes")
    if classes < 2:
        names = label_names(train_base)
        raise HeadsurgeonError(f"'{name}' has {classes} class" + (f" ({names[0]})" if names else "")
                               + (f" in '{root}'" if root else "") + "; a classifier needs at least 2"
                               + (" (an image folder: one sub-folder per class in each split)" if name == "folder"
                                  else ""))
    a, b = label_names(train_base), label_names(test_base)
    if a and b and a != b:  # image folders index classes per split, by the sub-folders each one has
        missing = sorted(set(a) ^ set(b))[:3]
        raise HeadsurgeonError(f"the '{tr}' and '{te}' splits of '{name}' list different classes (e.g. {missing}); "
                               f"class indices would not match between them")
    return classes


def _noise(d: "DataCfg", n_train: int, n_val: int, classes: int) -> tuple[dict[int, int], dict[int, int]]:
    """The symmetric label noise of train (and, with ``data.val_noise``, of validation): position ->
    label offset, drawn from ``data.noise_seed``."""
    frac = d.label_noise
    g = torch.Generator().manual_seed(d.noise_seed)
    flip = torch.randperm(n_train, generator=g)[: round(frac * n_train)].tolist()
    offsets = {i: int(o) for i, o in zip(flip, torch.randint(1, classes, (len(flip),), generator=g).tolist())}
    val_offsets: dict[int, int] = {}
    if d.val_noise and frac > 0:  # drawn after train's, so train's draw is the same with or without it
        vflip = torch.randperm(n_val, generator=g)[: round(frac * n_val)].tolist()
        val_offsets = {i: int(o) for i, o in zip(vflip, torch.randint(1, classes, (len(vflip),), generator=g).tolist())}
    return offsets, val_offsets


def shard(view: View, rank: int, world: int) -> View:
    """Every ``world``-th sample: exact distributed evaluation (no padded duplicates)."""
    return View(view.base, view.indices[rank::world], view.offsets and {
        i // world: o for i, o in view.offsets.items() if i % world == rank}, view.num_classes)


def data_config(data: "DataCfg", pretrained_cfg: dict[str, Any] | None, in_chans: int = 3) -> dict[str, Any]:
    """The preprocessing of a run: timm's ``resolve_data_config`` of the model's pretrained config,
    with the model's channel count and the ``data`` section's ``mean``/``std`` where given.

    For a 1-channel model without ``data.mean``, the 3-channel mean/std are averaged: a 1-channel
    tensor normalised with 3-value statistics would silently broadcast to 3 channels.
    """
    from timm.data import resolve_data_config

    d = _section(data)
    size = d.img_size
    cfg = dict(resolve_data_config(args={"img_size": size}, pretrained_cfg=pretrained_cfg or {}))
    cfg["input_size"] = (in_chans, size, size)
    for key in ("mean", "std"):
        given = getattr(d, key)
        value = tuple(float(v) for v in (given if given is not None else cfg[key]))
        if given is None and len(value) != in_chans:
            value = (sum(value) / len(value),) * in_chans
        if len(value) != in_chans:
            raise HeadsurgeonError(f"data.{key} has {len(value)} values but the model takes {in_chans} channels")
        cfg[key] = value
    return cfg


def eval_config(data: "DataCfg", pretrained_cfg: dict[str, Any] | None, in_chans: int = 3) -> dict[str, Any]:
    """The run's evaluation preprocessing (what :func:`loader` does for val/test) as timm
    ``pretrained_cfg`` keys: an export carrying them is evaluated by ``resolve_data_config(model=m)`` +
    ``create_transform(**cfg)`` exactly as the run evaluated it, not at the base model's ImageNet size."""
    cfg = data_config(data, pretrained_cfg, in_chans)
    return {"input_size": tuple(cfg["input_size"]), "interpolation": cfg.get("interpolation", "bilinear"),
            "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "crop_pct": _section(data).crop_pct,
            "crop_mode": "center"}  # create_loader's default crop_mode (None) is 'center'


def loader(view: View, data: "DataCfg", data_cfg: dict[str, Any], training: bool, device: torch.device,
           distributed: bool = False) -> torch.utils.data.DataLoader:
    """timm's ``create_loader`` with the ``data`` section's augmentation; training loaders shuffle."""
    from timm.data import create_loader

    d = _section(data)
    size, chans = d.img_size, data_cfg["input_size"][0]
    view.mode = {1: "L", 3: "RGB"}.get(chans)  # other channel counts: the dataset's own images
    bs = d.batch_size if training else (d.eval_batch_size or 2 * d.batch_size)
    if training and len(view) < bs * (2 if distributed else 1):
        raise HeadsurgeonError(f"{len(view)} training samples are fewer than one batch of {bs}; lower data.batch_size")
    return create_loader(
        view, input_size=(chans, size, size), batch_size=bs, is_training=training, no_aug=d.no_aug,
        scale=tuple(d.scale), ratio=tuple(d.ratio), hflip=d.hflip,
        color_jitter=d.color_jitter, auto_augment=d.auto_augment,
        interpolation=data_cfg.get("interpolation", "bilinear"), mean=data_cfg["mean"], std=data_cfg["std"],
        crop_pct=d.crop_pct, num_workers=d.workers,
        re_prob=d.reprob, re_mode=d.remode, re_count=d.recount,
        distributed=distributed and training, device=device, use_prefetcher=device.type == "cuda",
        pin_memory=device.type == "cuda",
        # fresh workers each epoch draw their seeds from the (checkpointed) torch RNG, so a resumed
        # run augments exactly like an uninterrupted one
        persistent_workers=False,
    )
