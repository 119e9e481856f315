"""Training recipes: a YAML file over embedded defaults, checked completely before any work.

The defaults *are* the digits recipe (``recipes/digits.yaml``), so ``headsurgeon train`` with no
recipe trains a 4-head tree on CPU. Keys are flat dotted names (``data.batch_size``) internally;
files nest them one level (``data: {batch_size: 64}``). ``model_kwargs`` is a free mapping.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from .errors import HeadsurgeonError

SECTIONS = ("split", "data", "loss", "optim", "sched")


@dataclass(frozen=True)
class Field:
    default: Any
    types: tuple[type, ...]
    help: str
    choices: tuple[Any, ...] | None = None
    lo: float | None = None  # inclusive unless lo_open
    hi: float | None = None  # exclusive unless hi_closed
    lo_open: bool = False
    hi_closed: bool = False
    nullable: bool = False
    length: int | None = None  # for lists


def _f(default, types, help, **kw) -> Field:
    return Field(default, types if isinstance(types, tuple) else (types,), help, **kw)


NUM = (int, float)
SCHEMA: dict[str, Field] = {
    "model": _f("resnet10t", str, "timm model name", nullable=True),
    "model_kwargs": _f({"channels": [32, 64, 128, 256], "stem_width": 16}, dict, "extra timm.create_model kwargs"),
    "pretrained": _f(False, bool, "start from timm's pretrained weights"),
    "weights": _f(None, str, "local safetensors / timm checkpoint to start from", nullable=True),
    "tree": _f(None, str, "a tree directory written by `headsurgeon split` (instead of model + split)", nullable=True),
    "split.at": _f(["layer3", "layer4"], (list, str), "split points in forward order"),
    "split.heads": _f(4, int, "number of heads", lo=1),
    "split.fanout": _f(None, list, "children per fork at each split point", nullable=True),
    "split.rescale": _f(True, bool, "gradient rescaling at forks"),
    "split.branch_init": _f(None, str, "branch initialisation", choices=("independent", "copy"), nullable=True),
    "data.dataset": _f("digits", str, "'digits' (embedded), 'fashion-mnist' (IDX files; Debian package dataset-fashion-mnist), "
                       "'folder' (ImageFolder or tar at data.root), torch/cifar10, torch/cifar100, hfds/..."),
    "data.root": _f(None, str, "dataset folder (fashion-mnist: default /usr/share/datasets/fashion-mnist, any folder "
                    "with its four IDX files, gzipped or not)", nullable=True),
    "data.download": _f(False, bool, "let torchvision/HF datasets download"),
    "data.train_split": _f("train", str, "split to train on (validation is carved from it)"),
    "data.test_split": _f("validation", str, "held-out split for test accuracy"),
    "data.num_classes": _f(None, int, "classes (default: from the dataset)", lo=2, nullable=True),
    "data.img_size": _f(32, int, "training/eval image size", lo=8),
    "data.folds": _f(None, int, "digits only: k of a fixed, class-stratified k-fold partition of all 1,797 images "
                     "(fold data.fold is the test split, the other folds the train split); null: the fixed 360-image test split",
                     lo=2, nullable=True),
    "data.fold": _f(0, int, "the test fold, 0..data.folds-1 (with data.folds)", lo=0),
    "data.val_fraction": _f(0.1, NUM, "fraction of train held out for validation", lo=0, hi=1, lo_open=True),
    "data.train_fraction": _f(1.0, NUM, "fraction of the rest of train (after the validation carve, chosen with "
                              "data.split_seed) that is trained on: a smaller labelled set", lo=0, hi=1, lo_open=True,
                              hi_closed=True),
    "data.split_seed": _f(0, int, "seed of the train/validation carve", lo=0),
    "data.stratify": _f(False, bool, "carve validation and the data.train_fraction subset class by class (the train "
                        "split's class proportions); needs a dataset that lists its labels"),
    "data.label_noise": _f(0.0, NUM, "symmetric label-noise fraction on train", lo=0, hi=1),
    "data.noise_seed": _f(0, int, "seed of the label noise", lo=0),
    "data.batch_size": _f(64, int, "batch size per process", lo=1),
    "data.eval_batch_size": _f(None, int, "eval batch size (default 2x batch_size)", lo=1, nullable=True),
    "data.workers": _f(0, int, "data loader workers per process", lo=0),
    "data.no_aug": _f(False, bool, "no training augmentation"),
    "data.scale": _f([0.7, 1.0], list, "random-resized-crop area range", length=2),
    "data.ratio": _f([0.9, 1.1], list, "random-resized-crop aspect range", length=2),
    "data.hflip": _f(0.0, NUM, "horizontal flip probability", lo=0, hi=1, hi_closed=True),
    "data.color_jitter": _f(0.0, NUM, "colour jitter strength", lo=0),
    "data.auto_augment": _f(None, str, "timm auto-augment string, e.g. rand-m9-mstd0.5", nullable=True),
    "data.mean": _f(None, list, "normalisation mean per channel (default: the model's pretrained config, averaged "
                    "over channels for a 1-channel model)", nullable=True),
    "data.std": _f(None, list, "normalisation std per channel (default as data.mean)", nullable=True),
    "data.crop_pct": _f(1.0, NUM, "eval centre-crop fraction", lo=0, hi=1, lo_open=True, hi_closed=True),
    "loss.beta": _f(0.5, NUM, "weight of the hard (label) term", lo=0, hi=1, hi_closed=True),
    "loss.temperature": _f(2.0, NUM, "soft-target temperature", lo=0, lo_open=True),
    "loss.t2": _f(False, bool, "multiply the soft term by T^2"),
    "loss.label_smoothing": _f(0.0, NUM, "label smoothing of the hard term", lo=0, hi=1),
    "optim.opt": _f("sgd", str, "timm optimizer name (create_optimizer_v2)"),
    "optim.lr": _f(0.1, NUM, "learning rate", lo=0, lo_open=True),
    "optim.momentum": _f(0.9, NUM, "momentum", lo=0, hi=1),
    "optim.weight_decay": _f(5e-4, NUM, "weight decay (not on biases/norms/no_weight_decay params)", lo=0),
    "optim.clip_grad": _f(None, NUM, "gradient-norm clipping", lo=0, lo_open=True, nullable=True),
    "sched.sched": _f("cosine", str, "timm scheduler name (create_scheduler_v2)",
                      choices=("cosine", "tanh", "step", "multistep", "plateau", "poly", "wsd", "none")),
    "sched.warmup_epochs": _f(1, int, "linear warm-up epochs", lo=0),
    "sched.warmup_lr": _f(1e-4, NUM, "warm-up start lr", lo=0),
    "sched.min_lr": _f(0.0, NUM, "final lr", lo=0),
    "sched.decay_epochs": _f(30, NUM, "step schedule period", lo=0, lo_open=True),
    "sched.decay_milestones": _f([30, 60], list, "multistep epochs"),
    "sched.decay_rate": _f(0.1, NUM, "step/multistep factor", lo=0, lo_open=True),
    "sched.step_on_epochs": _f(True, bool, "step the lr per epoch (False: per update)"),
    "epochs": _f(20, int, "training epochs", lo=1),
    "amp": _f(False, (bool, str), "mixed precision on CUDA", choices=(False, True, "bf16", "fp16")),
    "ema": _f(False, (bool, float), "EMA of weights: false, true (0.9998) or a decay", lo=0, hi=1),
    "channels_last": _f(False, bool, "channels_last memory format"),
    "compile": _f(False, (bool, str), "torch.compile (true or a backend name)"),
    "sync_bn": _f(False, bool, "SyncBatchNorm under DDP (CUDA); otherwise BN stats are averaged per epoch"),
    "seed": _f(0, int, "global seed (init, data order, augmentation)", lo=0),
    "output": _f(None, str, "run directory (default runs/<recipe>-<time>)", nullable=True),
}

# keys that may change when a run is resumed
RESUME_FREE = ("output", "data.workers", "data.download", "data.root")


def defaults() -> dict[str, Any]:
    import copy

    return {k: copy.deepcopy(f.default) for k, f in SCHEMA.items()}


def flatten(tree: dict[str, Any], where: str) -> dict[str, Any]:
    """``{data: {batch_size: 8}}`` -> ``{data.batch_size: 8}``; reject unknown keys with a hint."""
    if not isinstance(tree, dict):
        raise HeadsurgeonError(f"{where} must be a YAML mapping of recipe keys, got {type(tree).__name__}")
    out: dict[str, Any] = {}
    for key, value in tree.items():
        key = str(key)
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise HeadsurgeonError(f"{where}: '{key}' must be a mapping (e.g. {key}: {{...}}), got {value!r}")
            for sub, v in value.items():
                out[f"{key}.{sub}"] = v
        else:
            out[key] = value
    for key in out:
        if key not in SCHEMA:
            near = difflib.get_close_matches(key, list(SCHEMA), n=1, cutoff=0.5)
            near = near or difflib.get_close_matches(key.split(".")[-1], [k.split(".")[-1] for k in SCHEMA], n=1)
            hint = next((k for k in SCHEMA if near and (k == near[0] or k.endswith("." + near[0]))), None)
            raise HeadsurgeonError(f"{where}: unknown recipe key '{key}'" + (f"; did you mean '{hint}'?" if hint else ""))
    return out


def parse_set(pairs: Sequence[str]) -> dict[str, Any]:
    """``--set data.batch_size=32`` values are YAML (``true``, ``[a, b]``, ``null``)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise HeadsurgeonError(f"--set expects key=value (e.g. --set data.batch_size=32), got '{pair}'")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise HeadsurgeonError(f"--set {key}: value '{value}' is not valid YAML ({str(e).splitlines()[0]})") from None
    return flatten(_nest(out), "--set")


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        head, dot, sub = k.partition(".")
        if dot and head in SECTIONS:
            out.setdefault(head, {})[sub] = v
        else:
            out[k] = v
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """The flat recipe as nested YAML-ready data (for ``OUTPUT/recipe.yaml``)."""
    return _nest(flat)


def _describe(f: Field) -> str:
    if f.choices:
        allowed = "one of " + ", ".join(map(repr, f.choices))
    else:
        allowed = " or ".join({"int": "an integer", "float": "a number", "str": "a string", "bool": "true/false",
                               "list": "a list", "dict": "a mapping"}[t.__name__] for t in f.types)
        if float in f.types and int in f.types:
            allowed = "a number"
        if f.lo is not None or f.hi is not None:
            lo = "" if f.lo is None else f"{'>' if f.lo_open else '>='} {f.lo:g}"
            hi = "" if f.hi is None else f"{'<=' if f.hi_closed else '<'} {f.hi:g}"
            allowed += " " + " and ".join(x for x in (lo, hi) if x)
        if f.length:
            allowed += f" of {f.length} numbers"
    return allowed + (" or null" if f.nullable else "")


def _check(key: str, value: Any, f: Field, where: str) -> Any:
    bad = HeadsurgeonError(f"{where}: '{key}' is {value!r}; expected {_describe(f)} ({f.help})")
    if value is None:
        if f.nullable:
            return None
        raise bad
    if f.choices is not None:
        if value not in f.choices or (isinstance(value, bool) != any(isinstance(c, bool) and c == value for c in f.choices)):
            raise bad
        return value
    if isinstance(value, bool) and bool not in f.types:
        raise bad  # YAML true is not the number 1
    if not isinstance(value, f.types):
        if not (isinstance(value, int) and float in f.types):
            raise bad
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        if (f.lo is not None and (value < f.lo or (f.lo_open and value == f.lo))) or \
           (f.hi is not None and (value > f.hi or (not f.hi_closed and value == f.hi))):
            raise bad
    if isinstance(value, list) and f.length is not None:
        if len(value) != f.length or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise bad
    return value


def validate(flat: dict[str, Any], where: str = "recipe") -> dict[str, Any]:
    """Type/range checks per key, then the checks that involve several keys."""
    out = {k: _check(k, flat[k], SCHEMA[k], where) for k in SCHEMA}
    if isinstance(out["split.at"], str):
        out["split.at"] = [p.strip() for p in out["split.at"].split(",") if p.strip()]
    if not all(isinstance(p, str) for p in out["split.at"]):
        raise HeadsurgeonError(f"{where}: 'split.at' must be a list of module paths, e.g. [layer3, layer4]")
    if out["split.fanout"] is not None and not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                   for v in out["split.fanout"]):
        raise HeadsurgeonError(f"{where}: 'split.fanout' must be a list of positive integers, e.g. [2, 2]")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in out["sched.decay_milestones"]):
        raise HeadsurgeonError(f"{where}: 'sched.decay_milestones' must be a list of epochs, e.g. [150, 225]")
    if out["ema"] is True:
        out["ema"] = 0.9998
    if out["amp"] is True:
        out["amp"] = "bf16"
    if out["tree"] is None and not out["model"]:
        raise HeadsurgeonError(f"{where}: give 'model' (with 'split') or 'tree' (a directory from `headsurgeon split`)")
    if out["pretrained"] and out["weights"]:
        raise HeadsurgeonError(f"{where}: 'pretrained' and 'weights' both give starting weights; use one of them")
    if out["data.folds"] is not None and out["data.dataset"] != "digits":
        raise HeadsurgeonError(f"{where}: 'data.folds' partitions the digits dataset only; '{out['data.dataset']}' "
                               f"has its own test split ('data.test_split')")
    if out["data.folds"] is None and out["data.fold"] != 0:
        raise HeadsurgeonError(f"{where}: 'data.fold' is {out['data.fold']} but 'data.folds' is not set (e.g. data.folds: 5)")
    if out["data.folds"] is not None and out["data.fold"] >= out["data.folds"]:
        raise HeadsurgeonError(f"{where}: 'data.fold' is {out['data.fold']}; with data.folds {out['data.folds']} it must be "
                               f"0..{out['data.folds'] - 1}")
    for key in ("data.mean", "data.std"):
        if out[key] is not None and not (out[key] and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                          for v in out[key])):
            raise HeadsurgeonError(f"{where}: '{key}' must be a list of numbers, one per channel, e.g. [0.286]")
    if out["data.std"] is not None and any(v <= 0 for v in out["data.std"]):
        raise HeadsurgeonError(f"{where}: 'data.std' values must be > 0, got {out['data.std']}")
    if out["data.dataset"] not in ("digits", "fashion-mnist") and not out["data.root"] and not out["data.dataset"].startswith(("hfds/", "hfids/")):
        raise HeadsurgeonError(f"{where}: dataset '{out['data.dataset']}' needs 'data.root' (a folder to read or download into)")
    return out


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], set[str]]:
    """Defaults <- recipe file <- ``--set`` pairs, validated. Returns the flat recipe and the keys
    the user gave explicitly (so ``tree:`` can refuse an explicit ``split``)."""
    flat = defaults()
    given: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise HeadsurgeonError(f"recipe '{path}' does not exist; see recipes/ for examples")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise HeadsurgeonError(f"recipe '{path}' is not valid YAML: {' '.join(str(e).split())[:200]}") from None
        given.update(flatten(data, str(path)))
    _check_tree(given, str(path) if path is not None else "recipe")
    sets = parse_set(overrides)
    _check_tree(sets, "--set")
    if sets.get("tree") is not None:  # a tree from the command line replaces the file's model and split
        given = {k: v for k, v in given.items() if not _fixed_by_tree(k)}
    given.update(sets)
    if "model" in given and "model_kwargs" not in given:
        given["model_kwargs"] = {}  # the default kwargs belong to the default (digits) model
    flat.update(given)
    return validate(flat, str(path) if path is not None else "recipe"), set(given)


def _fixed_by_tree(key: str) -> bool:
    return key in ("model", "model_kwargs", "pretrained", "weights") or key.startswith("split.")


def _check_tree(layer: dict[str, Any], where: str) -> None:
    clash = [k for k in layer if _fixed_by_tree(k)] if layer.get("tree") is not None else []
    if clash:
        raise HeadsurgeonError(f"{where}: 'tree' already fixes the model and its split; remove {', '.join(clash)}")


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two flat recipes, as ``key: old -> new``."""
    keys = sorted((set(old) | set(new)) - set(RESUME_FREE))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
