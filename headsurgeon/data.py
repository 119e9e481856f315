"""Datasets and loaders for training: train / validation (carved from train) / test, label noise.

Everything goes through timm's ``create_dataset`` / ``create_loader`` / transforms, except the
``digits`` dataset (scikit-learn's bundled 8x8 handwritten digits, real data that needs no
download), which is served as PIL images so the same timm transforms resize it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from .errors import HeadsurgeonError

DIGITS_TEST = 360  # fixed held-out digits test split (20%), independent of every recipe seed


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


class Digits(Dataset):
    """scikit-learn's handwritten digits as RGB PIL images (values 0..16 scaled to 0..255).

    Without ``folds``: a fixed 1,437 train / 360 test split. With ``folds=k``: fold ``fold`` of
    :func:`digits_folds` is the test split and the other k-1 folds are the train split.
    """

    def __init__(self, split: str, folds: int | None = None, fold: int = 0):
        from sklearn.datasets import load_digits

        d = load_digits()
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

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        img = Image.fromarray(self.images[i], mode="L").convert("RGB")
        return (self.transform(img) if self.transform else img), self.targets[i]


class View(Dataset):
    """A subset of a dataset with its own transform and optional label noise.

    ``torch.utils.data.Subset`` has no ``transform`` for ``create_loader`` to set, and the
    train and validation subsets of one base dataset need different transforms.
    Noisy labels are ``(label + offset) % C`` with a per-sample offset in 1..C-1: uniform over
    the *other* classes, without reading every sample's label up front.
    """

    def __init__(self, base: Dataset, indices: Sequence[int], offsets: dict[int, int] | None = None,
                 num_classes: int = 0):
        self.base, self.indices = base, list(indices)
        self.offsets, self.num_classes = offsets or {}, num_classes
        self.transform = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img, target = self.base[self.indices[i]]
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


def _base(name: str, root: str | None, split: str, download: bool, folds: int | None = None, fold: int = 0) -> Dataset:
    if name == "digits":
        return Digits(split, folds, fold)
    from timm.data import create_dataset

    if root and not os.path.exists(root) and not download:
        raise HeadsurgeonError(f"dataset root '{root}' does not exist; point data.root at the data "
                               f"(or --set data.download=true for torch/... and hfds/... datasets)")
    try:
        ds = create_dataset(name, root=root, split=split, download=download, is_training=False)
    except Exception as e:  # timm/torchvision/datasets raise many types; one line is enough here
        raise HeadsurgeonError(f"cannot open dataset '{name}' (split '{split}') at '{root}': "
                               f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    if isinstance(ds, torch.utils.data.IterableDataset):
        raise HeadsurgeonError(f"dataset '{name}' is a streaming dataset; use an ImageFolder, torch/... or hfds/... dataset")
    if len(ds) == 0:
        raise HeadsurgeonError(f"dataset '{name}' split '{split}' at '{root}' has no samples")
    return ds


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


def splits(recipe: dict[str, Any]) -> Splits:
    """Train / validation / test views; the validation carve and the noise have fixed seeds."""
    name, root, dl = recipe["data.dataset"], recipe["data.root"], recipe["data.download"]
    folds = (recipe.get("data.folds"), recipe.get("data.fold", 0))
    train_base = _base(name, root, recipe["data.train_split"], dl, *folds)
    test_base = _base(name, root, recipe["data.test_split"], dl, *folds)
    classes = recipe["data.num_classes"] or _num_classes(train_base)
    if not classes:
        raise HeadsurgeonError(f"cannot tell how many classes '{name}' has; set data.num_classes")
    n = len(train_base)
    n_val = max(1, round(recipe["data.val_fraction"] * n))
    if n_val >= n:
        raise HeadsurgeonError(f"data.val_fraction {recipe['data.val_fraction']} leaves no training samples out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(recipe["data.split_seed"])).tolist()
    rest = order[n_val:]
    keep = max(1, round(float(recipe.get("data.train_fraction", 1.0)) * len(rest)))
    val_idx, train_idx = sorted(order[:n_val]), sorted(rest[:keep])  # rest is in random order: a random subset
    frac = float(recipe["data.label_noise"])
    g = torch.Generator().manual_seed(recipe["data.noise_seed"])
    flip = torch.randperm(len(train_idx), generator=g)[: round(frac * len(train_idx))].tolist()
    offsets = {i: int(o) for i, o in zip(flip, torch.randint(1, classes, (len(flip),), generator=g).tolist())}
    return Splits(
        train=View(train_base, train_idx, offsets, classes),
        val=View(train_base, val_idx),
        test=View(test_base, range(len(test_base))),
        num_classes=classes,
        noise={"fraction": frac, "flipped": len(offsets), "seed": recipe["data.noise_seed"]},
        label_names=(lambda n: n if n and len(n) == classes else None)(label_names(train_base)),
    )


def shard(view: View, rank: int, world: int) -> View:
    """Every ``world``-th sample: exact distributed evaluation (no padded duplicates)."""
    return View(view.base, view.indices[rank::world], view.offsets and {
        i // world: o for i, o in view.offsets.items() if i % world == rank}, view.num_classes)


def loader(view: View, recipe: dict[str, Any], data_cfg: dict[str, Any], training: bool, device: torch.device,
           distributed: bool = False) -> torch.utils.data.DataLoader:
    """timm's ``create_loader`` with the recipe's augmentation; training loaders shuffle."""
    from timm.data import create_loader

    size = recipe["data.img_size"]
    bs = recipe["data.batch_size"] if training else (recipe["data.eval_batch_size"] or 2 * recipe["data.batch_size"])
    if training and len(view) < bs * (2 if distributed else 1):
        raise HeadsurgeonError(f"{len(view)} training samples are fewer than one batch of {bs}; lower data.batch_size")
    return create_loader(
        view, input_size=(3, size, size), batch_size=bs, is_training=training, no_aug=recipe["data.no_aug"],
        scale=tuple(recipe["data.scale"]), ratio=tuple(recipe["data.ratio"]), hflip=recipe["data.hflip"],
        color_jitter=recipe["data.color_jitter"], auto_augment=recipe["data.auto_augment"],
        interpolation=data_cfg.get("interpolation", "bilinear"), mean=data_cfg["mean"], std=data_cfg["std"],
        crop_pct=recipe["data.crop_pct"], num_workers=recipe["data.workers"],
        distributed=distributed and training, device=device, use_prefetcher=device.type == "cuda",
        pin_memory=device.type == "cuda",
        # fresh workers each epoch draw their seeds from the (checkpointed) torch RNG, so a resumed
        # run augments exactly like an uninterrupted one
        persistent_workers=False,
    )
