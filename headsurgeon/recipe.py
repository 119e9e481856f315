"""Training recipes: a YAML file over embedded defaults, checked completely before any work.

A recipe is a frozen pydantic model (:class:`Recipe`) with one nested section per concern
(``split``, ``data``, ``loss``, ``optim``, ``sched``); code reads ``recipe.data.batch_size``.
Users write the same nesting in YAML, or dotted keys on the command line (``--set
data.batch_size=32``). The defaults *are* the digits recipe (``recipes/digits.yaml``), so
``headsurgeon train`` with no recipe trains a 4-head tree on CPU.

Validation is strict (YAML ``true`` is not the number 1), reports every bad key of a file at
once in one line, and names the nearest known key for a typo. The JSON Schema of the model
(``headsurgeon recipe --schema``, ``recipes/recipe.schema.json``) lets editors complete and
check recipe files.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Sequence

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import HeadsurgeonError, first_line

SECTIONS = ("split", "data", "loss", "optim", "sched", "log")
# keys that may change when a run is resumed
RESUME_FREE = ("output", "parallel", "data.workers", "data.download", "data.root", "log.tensorboard", "log.wandb",
               "log.wandb_project", "log.wandb_entity")
EMA_DEFAULT = 0.9998


# What a recipe may hold once its aliases are expanded: the largest recipe has a few hundred values. An alias
# names a node, so ``b: [*a, *a, ...]`` nests copies: 9 levels of 9 aliases (a "billion laughs" of 560 bytes)
# expand to 9^9 values, which validation and error messages then walk (hours, or all the memory).
YAML_VALUES_MAX = 100_000
YAML_DEPTH_MAX = 100


def _bound(root: yaml.Node) -> None:
    """Refuse a document that expands (through its aliases) to more than ``YAML_VALUES_MAX`` values, or
    that contains itself (a recursive alias, ``a: &x [*x]``). Counted on the composed node graph, each
    node once (linear in the text), before anything is constructed, validated or printed."""
    size: dict[int, int] = {}
    entered: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        kids = [n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        if done:
            size[id(node)] = 1 + sum(size[id(k)] for k in kids)
            entered.discard(id(node))
            if size[id(node)] > YAML_VALUES_MAX:
                raise yaml.composer.ComposerError(
                    None, None, f"its aliases (*name) expand to more than {YAML_VALUES_MAX:,} values, more than any "
                    f"recipe holds (a YAML alias bomb?); write the values out", node.start_mark)
            continue
        if id(node) in size:
            continue
        entered.add(id(node))
        stack.append((node, True))
        for k in kids:
            if id(k) in entered:
                raise yaml.composer.ComposerError(
                    None, None, "a recursive alias: a value contains itself (an alias *name inside the value "
                    "that &name marks); a recipe value must be finite", k.start_mark)
            if id(k) not in size:
                stack.append((k, False))


class _Loader(yaml.SafeLoader):
    """YAML as people write recipes: ``1e-6`` is a number (PyYAML's YAML 1.1 reads it as a string), and a
    key given twice in one mapping is an error (PyYAML keeps the last silently). Aliases are bounded
    (:func:`_bound`); a list or mapping used as a key is an error."""

    def compose_document(self):
        node = super().compose_document()
        _bound(node)
        return node

    def fetch_flow_collection_start(self, TokenClass):
        # PyYAML's scanner revisits every open [ or { at each token: 5,000 nested brackets (10 kB) take
        # seconds, 50,000 hours. Recipes nest a few levels.
        if self.flow_level >= YAML_DEPTH_MAX:
            raise yaml.scanner.ScannerError(None, None, f"values nested more than {YAML_DEPTH_MAX} levels deep",
                                            self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, (yaml.MappingNode, yaml.SequenceNode)):
                raise yaml.constructor.ConstructorError(
                    None, None, f"a {'mapping' if isinstance(key_node, yaml.MappingNode) else 'list'} is used as a "
                    f"key; recipe keys are names (epochs, data: {{batch_size: 32}})", key_node.start_mark)
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError:  # PyYAML composes nested values recursively
        raise yaml.YAMLError("values nested too deeply (more than Python's recursion limit)") from None


def _csv(value: Any) -> Any:
    """``--set split.at=layer3,layer4`` is a convenience for the list."""
    return [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value


def _peer_list(value: Any) -> Any:
    """``--set model=resnet18,mobilenetv3_small_100`` is a convenience for the list of peers."""
    return [p.strip() for p in value.split(",")] if isinstance(value, str) and "," in value else value


# Bounds of what numpy, torch and the file system take, checked here rather than deep inside them.
SEED_MAX = 2**32 - 1  # numpy's seeds are uint32 (np.random.seed(2**32) is a ValueError inside timm's random_seed)
IMG_SIZE_MAX = 4096  # 4x the largest input of any timm pretrained model (1024): a probe of 2 images at 100,000 px is 240 GB
HEADS_MAX = 256  # trees in the literature have 2-8 heads; each head is a copy of its branch (weights, grads, optimizer state)
STEP_BYTES_MAX = 2**40  # 1 TiB: more than one machine holds (the estimate of one step's activations below)

Prob = Annotated[float, Field(ge=0, le=1)]
Pair = Annotated[list[float], Field(min_length=2, max_length=2)]
Stats = Annotated[list[float], Field(min_length=1)]


class _Section(BaseModel):
    # strict: no silent coercion (a YAML bool is not an int); frozen: a run's recipe does not change
    # allow_inf_nan=False: no NaN or infinity in any float key (lr: .inf, scale: [.nan, 1] reach timm and torch otherwise)
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, protected_namespaces=(), validate_default=True,
                              allow_inf_nan=False)


class SplitCfg(_Section):
    at: Annotated[list[str], BeforeValidator(_csv)] = Field(["layer3", "layer4"],
                                                             description="split points in forward order")
    heads: int = Field(4, ge=1, le=HEADS_MAX, description="number of heads")
    fanout: list[Annotated[int, Field(ge=1)]] | None = Field(None, description="children per fork at each split point")
    rescale: bool = Field(True, description="gradient rescaling at forks")
    branch_init: Literal["independent", "copy"] | None = Field(None, description="branch initialisation")
    leaf_modules: list[Annotated[str, Field(pattern=r"^[\w.]+:[\w.]+$", title="module:Class")]] = Field(
        [], description="module classes to keep whole when tracing, as module:Class (e.g. "
        "timm.models.gemma4_vit:Gemma4VitEncoder): parts torch.fx cannot trace")


DATASETS = ("digits", "fashion-mnist", "folder")  # folder: an ImageFolder or tar at data.root
DATASET_PREFIXES = ("torch/", "hfds/", "hfids/", "tfds/", "wds/")  # timm's create_dataset sources


class DataCfg(_Section):
    dataset: str = Field("digits", description="'digits' (embedded), 'fashion-mnist' (IDX files; Debian package "
                         "dataset-fashion-mnist), 'folder' (ImageFolder or tar at data.root), torch/cifar10, "
                         "torch/cifar100, hfds/...")
    root: str | None = Field(None, description="dataset folder (fashion-mnist: default /usr/share/datasets/fashion-mnist, "
                             "any folder with its four IDX files, gzipped or not)")
    download: bool = Field(False, description="let torchvision/HF datasets download")
    train_split: str = Field("train", description="split to train on (validation is carved from it)")
    test_split: str = Field("validation", description="held-out split for test accuracy")
    num_classes: int | None = Field(None, ge=2, description="classes (default: from the dataset)")
    img_size: int = Field(32, ge=8, le=IMG_SIZE_MAX, description="training/eval image size")
    folds: int | None = Field(None, ge=2, description="digits only: k of a fixed, class-stratified k-fold partition of "
                              "all 1,797 images (fold data.fold is the test split, the other folds the train split); "
                              "null: the fixed 360-image test split")
    fold: int = Field(0, ge=0, description="the test fold, 0..data.folds-1 (with data.folds)")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="fraction of train held out for validation")
    train_fraction: float = Field(1.0, gt=0, le=1, description="fraction of the rest of train (after the validation "
                                  "carve, chosen with data.split_seed) that is trained on: a smaller labelled set")
    split_seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of the train/validation carve")
    stratify: bool = Field(False, description="carve validation and the data.train_fraction subset class by class (the "
                           "train split's class proportions); needs a dataset that lists its labels")
    label_noise: float = Field(0.0, ge=0, lt=1, description="symmetric label-noise fraction on train")
    noise_seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of the label noise")
    val_noise: bool = Field(False, description="the validation split's labels carry the same symmetric noise "
                            "(data.label_noise, its own draw from data.noise_seed): early stopping and head choice as a "
                            "user whose held-out labels are as noisy as the training labels would make them")
    batch_size: int = Field(64, ge=1, description="batch size per process")
    eval_batch_size: int | None = Field(None, ge=1, description="eval batch size (default 2x batch_size)")
    workers: int = Field(0, ge=0, description="data loader workers per process")
    no_aug: bool = Field(False, description="no training augmentation")
    scale: Pair = Field([0.7, 1.0], description="random-resized-crop area range")
    ratio: Pair = Field([0.9, 1.1], description="random-resized-crop aspect range")
    hflip: Prob = Field(0.0, description="horizontal flip probability")
    color_jitter: float = Field(0.0, ge=0, description="colour jitter strength")
    auto_augment: str | None = Field(None, description="timm auto-augment string, e.g. rand-m9-mstd0.5")
    mean: Stats | None = Field(None, description="normalisation mean per channel (default: the model's pretrained "
                               "config, averaged over channels for a 1-channel model)")
    std: Stats | None = Field(None, description="normalisation std per channel (default as data.mean)")
    crop_pct: float = Field(1.0, gt=0, le=1, description="eval centre-crop fraction")
    mixup: float = Field(0.0, ge=0, description="mixup alpha (timm --mixup; 0: off)")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha (timm --cutmix; 0: off)")
    cutmix_minmax: Pair | None = Field(None, description="cutmix min/max box ratio; overrides data.cutmix (timm "
                                       "--cutmix-minmax)")
    mixup_prob: Prob = Field(1.0, description="probability of mixup or cutmix per batch (timm --mixup-prob)")
    mixup_switch_prob: Prob = Field(0.5, description="probability of cutmix instead of mixup when both are on "
                                    "(timm --mixup-switch-prob)")
    mixup_mode: Literal["batch", "pair", "elem"] = Field("batch", description="how mixup/cutmix parameters are "
                                                         "drawn: per batch, pair or element (timm --mixup-mode)")
    mixup_off_epoch: int = Field(0, ge=0, description="turn mixup/cutmix off from this epoch on (0: never; timm "
                                 "--mixup-off-epoch)")
    reprob: Prob = Field(0.0, description="random erasing probability (timm --reprob)")
    remode: Literal["pixel", "const", "rand"] = Field("pixel", description="random erasing mode (timm --remode)")
    recount: int = Field(1, ge=1, description="random erasing count (timm --recount)")

    @field_validator("std")
    @classmethod
    def _positive(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError(f"'data.std' values must be > 0, got {v}")
        return v

    @field_validator("scale", "ratio")
    @classmethod
    def _crop_range(cls, v: list[float], info: Any) -> list[float]:
        """timm's RandomResizedCrop draws the area from scale and the log aspect from ratio: a zero or negative
        bound is a math domain error in a worker, lo > hi or an area above 1 silently never crops as asked."""
        lo, hi = v
        top = 1.0 if info.field_name == "scale" else None
        if not 0 < lo <= hi or (top is not None and hi > top):
            raise ValueError(f"'data.{info.field_name}' is {v}; expected [lo, hi] with 0 < lo <= hi"
                             + (" <= 1 (fractions of the image area)" if top else " (aspect ratios, e.g. [0.75, 1.33])"))
        return v

    @field_validator("cutmix_minmax")
    @classmethod
    def _box_range(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not 0 <= v[0] < v[1] <= 1:
            raise ValueError(f"'data.cutmix_minmax' is {v}; expected [min, max] box ratios with 0 <= min < max <= 1")
        return v

    @field_validator("auto_augment")
    @classmethod
    def _policy(cls, v: str | None) -> str | None:
        """Parsed by timm's own parsers, as its create_transform dispatches them, so a policy timm cannot read is
        refused here instead of in the first training batch."""
        if v is None:
            return v
        from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

        hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
        try:
            if not v:
                raise ValueError("empty")
            ignored = [c for c in v.split("-")[1:] if not re.search(r"\d", c) and not (v.startswith("rand") and
                                                                                       c.startswith("t"))]
            if v.startswith(("rand", "augmix")) and ignored:  # timm skips a section without a number silently
                raise ValueError(f"section '{ignored[0]}' has no number, and timm would ignore it")
            if v.startswith("rand"):
                rand_augment_transform(v, hparams)
            elif v.startswith("augmix"):
                augment_and_mix_transform(v, {**hparams, "translate_pct": 0.3})
            else:
                auto_augment_transform(v, hparams)
        except Exception as e:  # timm asserts (AssertionError), or a bad number in a section (ValueError)
            why = str(e).strip().splitlines()[0][:80] if str(e).strip() else type(e).__name__
            raise ValueError(f"'data.auto_augment' is {v!r}, which timm cannot parse ({why}); use a timm policy such "
                             f"as rand-m9-mstd0.5, augmix-m5-w4-d2, original or v0 (or null)") from None
        return v


class LossCfg(_Section):
    objective: str = Field(
        "cl", description="the training objective, by its name in headsurgeon.objectives.OBJECTIVES (the registry "
        "every name, parameter default and card line comes from): cl: the paper's (Song & Chai 2018); dml: Deep "
        "Mutual Learning; one: On-the-fly Native Ensemble (a learned gate over the heads, not part of the collapsed "
        "model); kdcl: KDCL-MinLogit; pcl: Peer Collaborative Learning (a peer-ensemble classifier over the heads' "
        "features, not part of the collapsed model, and a temporal mean (EMA) of the tree, which is what is "
        "evaluated and exported); an objective registered with @register before the recipe is read "
        "(docs/objectives.md, Adding an objective)",
        json_schema_extra=lambda schema: schema.update(enum=list(_builtin_objectives())))
    beta: Prob = Field(0.5, description="cl only: weight of the hard (label) term")
    beta_end: Prob | None = Field(None, description="cl only: late consensus: beta moves linearly from 'beta' at the "
                                  "first epoch to this at epoch 'beta_epochs' (e.g. beta 1, beta_end 0.1: "
                                  "cross-entropy first, consensus late; null: beta throughout)")
    beta_epochs: int = Field(0, ge=0, description="cl only, with beta_end: the epoch (1-based) at which beta reaches "
                             "beta_end and stays, at most 'epochs' (0: the run's last epoch; a finished run resumed with more epochs "
                             "then stretches the schedule as it does the lr's)")
    temperature: float | None = Field(None, gt=0, description="soft-target temperature (null: the objective's own "
                                      "default: cl 2, dml 1, one 3, kdcl 3, pcl 3)")
    t2: bool = Field(False, description="cl only: multiply the soft term by T^2 (dml/one/kdcl/pcl always do)")
    ramp: int = Field(0, ge=0, description="dml/one/kdcl/pcl: epochs of the exp(-5(1-e/ramp)^2) ramp-up of the soft "
                      "terms (0: full weight from the start; ONE's official scripts use 80)")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="pcl only: decay of the temporal mean (EMA) of the tree, "
                             "after a warm-up min(1 - 1/(step + 1), ema_decay) (the PCL re-implementation's 0.999); "
                             "pcl evaluates and exports that temporal mean, so the 'ema' key stays off")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the hard term")

    @field_validator("objective")
    @classmethod
    def _registered(cls, v: str) -> str:
        names = _objective_names()
        if v not in names:
            near = difflib.get_close_matches(v, names, n=1)
            raise ValueError(f"'loss.objective' is {v!r}, not a registered objective; choose one of "
                             f"{', '.join(names)}" + (f" (did you mean {near[0]}?)" if near else ""))
        return v


def _builtin_objectives() -> tuple[str, ...]:
    from .objectives import BUILTIN

    return BUILTIN


def _objective_names() -> list[str]:
    """The registry's names (headsurgeon.objectives imports torch, so only when a recipe is checked)."""
    from .objectives import OBJECTIVES

    return sorted(OBJECTIVES)


class OptimCfg(_Section):
    opt: str = Field("sgd", description="timm optimizer name (create_optimizer_v2)")
    lr: float = Field(0.1, gt=0, description="learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay (not on biases/norms/no_weight_decay params)")
    opt_eps: float | None = Field(None, gt=0, description="optimizer epsilon (default: the optimizer's; timm --opt-eps)")
    opt_betas: list[Annotated[float, Field(ge=0, lt=1)]] | None = Field(
        None, min_length=1, max_length=3, description="optimizer betas (default: the optimizer's; timm --opt-betas)")
    clip_grad: float | None = Field(None, gt=0, description="gradient clipping threshold (timm --clip-grad)")
    clip_mode: Literal["norm", "value", "agc"] = Field("norm", description="gradient clipping mode (timm --clip-mode)")
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise lr decay over the original model's "
                                      "layer groups (timm --layer-decay)")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step (timm --grad-accum-steps)")

    @field_validator("opt")
    @classmethod
    def _known_opt(cls, v: str) -> str:
        from timm.optim import list_optimizers

        known = list_optimizers()
        name = v.lower().split("_", 1)[-1] if v.lower().startswith("lookahead_") else v.lower()
        if name not in known:
            near = difflib.get_close_matches(name, known, n=3)
            raise ValueError(f"'optim.opt' is {v!r}, not a timm optimizer" +
                             (f"; did you mean {', '.join(near)}?" if near else " (timm.optim.list_optimizers())"))
        return v


class SchedCfg(_Section):
    sched: Literal["cosine", "tanh", "step", "multistep", "plateau", "poly", "wsd", "none"] = Field(
        "cosine", description="timm scheduler name (create_scheduler_v2)")
    warmup_epochs: int = Field(1, ge=0, description="linear warm-up epochs")
    warmup_lr: float = Field(1e-4, ge=0, description="warm-up start lr")
    min_lr: float = Field(0.0, ge=0, description="final lr")
    decay_epochs: float = Field(30, gt=0, description="step schedule period")
    decay_milestones: list[int] = Field([30, 60], description="multistep epochs")
    decay_rate: float = Field(0.1, gt=0, description="step/multistep factor")
    step_on_epochs: bool = Field(True, description="step the lr per epoch (False: per update)")


# log.<key> -> (module that must be importable, the pip extra that installs it)
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def missing(key: str) -> str | None:
    """One line naming the extra to install when ``log.<key>`` cannot work here, else None."""
    module, extra = EXTRAS[key]
    if importlib.util.find_spec(module) is None:
        return (f"'log.{key}: true' needs the {module} package, which is not installed; "
                f"pip install 'headsurgeon[{extra}]' (or set log.{key}: false)")
    return None


def missing_extras(log: "LogCfg") -> list[str]:
    """The one check that the trackers a recipe's ``log`` section turns on are installed: a line per
    missing extra (the recipe refuses them when it is read, the trackers again when they start)."""
    return [m for m in (missing(k) for k in EXTRAS if getattr(log, k)) if m]


class LogCfg(_Section):
    tensorboard: bool = Field(False, description="TensorBoard event files in RUN/tensorboard (optional extra "
                              "headsurgeon[tensorboard])")
    wandb: bool = Field(False, description="a Weights & Biases run with the recipe as its config, files in RUN/wandb "
                        "(optional extra headsurgeon[wandb]; WANDB_MODE=offline keeps it on this machine)")
    wandb_project: str = Field("headsurgeon", min_length=1, description="W&B project")
    wandb_entity: str | None = Field(None, description="W&B entity (user or team; null: the login's default)")
    fit_every: int = Field(0, ge=0, description="every N epochs (and at the last), evaluate the un-augmented training "
                           "images: each head's top-1 against the (noisy) labels trained on and against the true labels, "
                           "and the share of flipped labels predicted as their noisy label (memorised); metrics.jsonl "
                           "'fit' (0: off). Costs one pass over the training images")

    @model_validator(mode="after")
    def _installed(self) -> "LogCfg":
        problems = missing_extras(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Recipe(_Section):
    """One training run: the model and its split, data, loss, optimizer, schedule and runtime."""

    model: Annotated[str | list[Annotated[str, Field(min_length=1)]] | None, BeforeValidator(_peer_list)] = Field(
        "resnet10t", description="timm model name, or a list of them: heterogeneous peers, head i the whole of model i, "
        "split at the input (split.at defaults to [input] and split.heads to the list's length; the data "
        "preprocessing is the first model's; docs/concepts.md, Heterogeneous peers)")
    model_kwargs: dict[str, Any] | list[dict[str, Any]] = Field(
        {"channels": [32, 64, 128, 256], "stem_width": 16},
        description="extra timm.create_model kwargs; with a list of models, one mapping for every model or a list "
        "of one mapping per model")
    pretrained: bool = Field(False, description="start from timm's pretrained weights")
    weights: str | None = Field(None, description="local safetensors / timm checkpoint to start from")
    tree: str | None = Field(None, description="a tree directory written by `headsurgeon split` (instead of model + split)")
    split: SplitCfg = SplitCfg()
    data: DataCfg = DataCfg()
    loss: LossCfg = LossCfg()
    optim: OptimCfg = OptimCfg()
    sched: SchedCfg = SchedCfg()
    log: LogCfg = LogCfg()
    epochs: int = Field(20, ge=1, description="training epochs")
    eval_every: int = Field(1, ge=1, description="evaluate validation and test every N epochs and at the last one "
                            "(the best checkpoint is chosen among those epochs; metrics.jsonl rows in between hold "
                            "training metrics only): a long schedule whose evaluation costs as much as its training")
    amp: Literal[False, True, "bf16", "fp16"] = Field(False, description="mixed precision on CUDA (true: bf16)")
    ema: bool | Annotated[float, Field(ge=0, lt=1)] = Field(False, description=f"EMA of weights: false, true "
                                                            f"({EMA_DEFAULT}) or a decay")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto: CUDA when present, else "
                                                           "MPS when present, else CPU (timm --device)")
    recovery_interval: int = Field(0, ge=0, description="also checkpoint every N optimizer steps within an epoch "
                                   "(recovery/, only the latest kept; 0: off; timm --recovery-interval); --resume "
                                   "continues from it bit-identically")
    checkpoint_hist: int = Field(1, ge=1, description="keep the N best epochs as history/epoch-NNN/ tree directories "
                                 "(with record.json; collapse takes any of them); 1: best/ only (timm --checkpoint-hist)")
    grad_checkpointing: bool = Field(False, description="recompute every tree segment in the backward pass instead "
                                     "of storing its activations (timm --grad-checkpointing)")
    channels_last: bool = Field(False, description="channels_last memory format")
    compile: bool | str = Field(False, description="torch.compile (true or a backend name)")
    parallel: Literal["ddp", "fsdp", "instances"] = Field(
        "ddp", description="how torchrun's ranks hold the tree: ddp (each the whole tree), fsdp (FSDP2: each 1/N of "
        "every segment), instances (instance i on rank i, only logits exchanged; trees split at input or peers)")
    sync_bn: bool = Field(False, description="SyncBatchNorm under DDP (CUDA); otherwise BN stats are averaged per epoch")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="global seed (init, data order, augmentation)")
    output: str | None = Field(None, description="run directory (default runs/<recipe>-<time>)")

    @field_validator("output")
    @classmethod
    def _path_name(cls, v: str | None) -> str | None:
        if v is not None:
            check_path_name(v, "'output'")
        return v

    @field_validator("compile")
    @classmethod
    def _backend(cls, v: Any) -> Any:
        if isinstance(v, str):
            import torch._dynamo

            if v not in torch._dynamo.list_backends(exclude_tags=()):
                raise ValueError(f"'compile' is {v!r}, not a torch.compile backend here; one of "
                                 f"{', '.join(torch._dynamo.list_backends())} (or true)")
        return v

    @field_validator("amp")
    @classmethod
    def _amp(cls, v: Any) -> Any:
        return "bf16" if v is True else v

    @field_validator("ema")
    @classmethod
    def _ema(cls, v: Any) -> Any:
        return EMA_DEFAULT if v is True else v

    @model_validator(mode="before")
    @classmethod
    def _peers_split(cls, data: Any) -> Any:
        """A list of models forks at the input, one head each: what split.at and split.heads default to."""
        if isinstance(data, dict) and isinstance(_peer_list(data.get("model")), list):
            split = data.get("split", {})
            if isinstance(split, dict):
                data = {**data, "split": {"at": ["input"], "heads": len(_peer_list(data["model"])), **split}}
        return data

    @model_validator(mode="after")
    def _together(self) -> "Recipe":
        """The checks that involve several keys."""
        if self.tree is None and not self.model:
            raise ValueError("give 'model' (with 'split') or 'tree' (a directory from `headsurgeon split`)")
        self._check_peers()
        if self.pretrained and self.weights:
            raise ValueError("'pretrained' and 'weights' both give starting weights; use one of them")
        if self.eval_every > 1 and self.sched.sched == "plateau":
            raise ValueError(f"'eval_every' is {self.eval_every} but sched.sched 'plateau' steps on every epoch's "
                             f"validation accuracy; use eval_every: 1 or another schedule")
        from .objectives import OBJECTIVES

        if OBJECTIVES[self.loss.objective].needs_mean_logits and self.ema is not False:
            raise ValueError(f"'ema' is set but loss.objective '{self.loss.objective}' keeps its own temporal mean (EMA) "
                             "of the tree, which "
                             "is evaluated and exported; set its decay with 'loss.ema_decay' and leave 'ema' off")
        if self.loss.beta_end is not None and "beta_end" not in {f.name for f in fields(OBJECTIVES[self.loss.objective])}:
            raise ValueError(f"'loss.beta_end' schedules cl's beta; loss.objective '{self.loss.objective}' has no beta "
                             f"(use loss.objective: cl, or leave beta_end out)")
        if self.loss.beta_epochs and self.loss.beta_end is None:
            raise ValueError("'loss.beta_epochs' is set but 'loss.beta_end' is not; give beta_end (the beta it moves to)")
        if self.loss.beta_epochs > self.epochs:
            raise ValueError(f"'loss.beta_epochs' is {self.loss.beta_epochs} but the run has {self.epochs} epochs, so "
                             f"beta would never reach beta_end; use at most {self.epochs} (0: the last epoch)")
        self._check_data()
        return self

    def _check_peers(self) -> None:
        """A list of models is heterogeneous peers: one per head, forked once at the input."""
        if isinstance(self.model, list):
            n, s = len(self.model), self.split
            if n < 2:
                raise ValueError(f"'model' lists {n} model(s); a list is heterogeneous peers, one per head: list two "
                                 f"or more, or give one name")
            if s.at != ["input"]:
                raise ValueError(f"'model' lists {n} models, peers that share only the input: 'split.at' must be "
                                 f"[input] (or left out), got {s.at}")
            if s.heads != n:
                raise ValueError(f"'split.heads' is {s.heads} but 'model' lists {n} models, one per head; leave "
                                 f"split.heads out or list {s.heads} models")
            if s.fanout not in (None, [n]):
                raise ValueError(f"'split.fanout' is {s.fanout}; {n} peers fork once at the input (leave it out)")
            if s.branch_init == "copy":
                raise ValueError("'split.branch_init' copy does not apply to peers of different models (leave it out)")
            if self.weights:
                raise ValueError("'weights' is one checkpoint for one model; peers of different models cannot share it")
            if isinstance(self.model_kwargs, list) and len(self.model_kwargs) != n:
                raise ValueError(f"'model_kwargs' lists {len(self.model_kwargs)} mappings for {n} models; give one "
                                 f"per model, or one mapping for all of them")
        elif isinstance(self.model_kwargs, list):
            raise ValueError("'model_kwargs' is a list (one mapping per model) but 'model' is one name; give a mapping")

    def _check_data(self) -> None:
        """The data section against itself (folds, dataset and root, CutMix boxes) and the step's memory."""
        d = self.data
        if d.folds is not None and d.dataset != "digits":
            raise ValueError(f"'data.folds' partitions the digits dataset only; '{d.dataset}' has its own test split "
                             f"('data.test_split')")
        if d.folds is None and d.fold != 0:
            raise ValueError(f"'data.fold' is {d.fold} but 'data.folds' is not set (e.g. data.folds: 5)")
        if d.folds is not None and d.fold >= d.folds:
            raise ValueError(f"'data.fold' is {d.fold}; with data.folds {d.folds} it must be 0..{d.folds - 1}")
        if d.dataset not in DATASETS and not d.dataset.startswith(DATASET_PREFIXES):  # timm reads any other name as a folder
            raise ValueError(f"unknown data.dataset '{d.dataset}'; use one of {', '.join(DATASETS)} or a "
                             f"{'/, '.join(p.rstrip('/') for p in DATASET_PREFIXES)}/ name (e.g. torch/cifar10)")
        if d.dataset not in ("digits", "fashion-mnist") and not d.root and not d.dataset.startswith(("hfds/", "hfids/")):
            raise ValueError(f"dataset '{d.dataset}' needs 'data.root' (a folder to read or download into)")
        if d.cutmix_minmax is not None and int(d.img_size * d.cutmix_minmax[0]) >= int(d.img_size * d.cutmix_minmax[1]):
            raise ValueError(f"'data.cutmix_minmax' {d.cutmix_minmax} at data.img_size {d.img_size} gives boxes of "
                             f"{int(d.img_size * d.cutmix_minmax[0])} to {int(d.img_size * d.cutmix_minmax[1])} px: "
                             f"timm draws from [min, max) and needs max > min there; widen the range")
        # A lower bound of what one step holds: every head keeps at least one input-sized fp32 activation per image
        # (a tree split at the input is `heads` whole models). Above what any machine holds it cannot be allocated.
        batch = max(d.batch_size, d.eval_batch_size or 2 * d.batch_size)
        need = batch * 3 * d.img_size ** 2 * 4 * self.split.heads
        if need > STEP_BYTES_MAX:
            raise ValueError(f"data.img_size {d.img_size} with a batch of {batch} and {self.split.heads} heads needs at "
                             f"least {need / 2**40:,.1f} TiB for one step's activations (batch x 3 x img_size^2 x 4 bytes "
                             f"x heads), more than a machine holds; lower data.img_size, data.batch_size / "
                             f"data.eval_batch_size or split.heads")

    def flat(self) -> dict[str, Any]:
        """Dotted keys (``data.batch_size``) to values: the form of ``--set``, diffs and the docs."""
        return flatten(self.model_dump(mode="json"), "recipe")

    def nested(self) -> dict[str, Any]:
        """YAML-ready data (``OUTPUT/recipe.yaml``)."""
        return self.model_dump(mode="json")


def check_path_name(path: str, what: str) -> None:
    """A path the file system can take (:func:`headsurgeon.storage.path_name_problem`), as a schema error."""
    from .storage import path_name_problem

    problem = path_name_problem(path, what)
    if problem:
        raise ValueError(problem)


# ------------------------------------------------------------------------------- keys and their docs

def _fields() -> Iterator[tuple[str, Any]]:
    for name, f in Recipe.model_fields.items():
        if name in SECTIONS:
            for sub, sf in f.annotation.model_fields.items():
                yield f"{name}.{sub}", sf
        else:
            yield name, f


def _properties() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every dotted key: the one source of the 'allowed' text of docs and errors."""
    schema = Recipe.model_json_schema()
    out = {}
    for name, prop in schema["properties"].items():
        ref = prop.get("$ref") or next((a["$ref"] for a in prop.get("allOf", []) if "$ref" in a), None)
        if ref:
            for sub, sp in schema["$defs"][ref.split("/")[-1]]["properties"].items():
                out[f"{name}.{sub}"] = sp
        else:
            out[name] = prop
    return out


_TYPES = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true/false",
          "array": "a list", "object": "a mapping"}


def _allowed(prop: dict[str, Any]) -> str:
    options = prop.get("anyOf", [prop])
    nullable = any(o.get("type") == "null" for o in options)
    parts = []
    for o in (o for o in options if o.get("type") != "null"):
        if "enum" in o or "const" in o:
            parts.append("one of " + ", ".join(map(repr, o.get("enum", [o.get("const")]))))
            continue
        text = _TYPES.get(o.get("type"), "a value")
        bounds = [f"{op} {o[k]:g}" if isinstance(o[k], float) else f"{op} {o[k]}" for k, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="),
                                                  ("exclusiveMaximum", "<")) if k in o]
        if bounds:
            text += " " + " and ".join(bounds)
        if o.get("type") == "array":
            item = _TYPES.get(o.get("items", {}).get("type"), "value").split(" ", 1)[-1]
            if "pattern" in o.get("items", {}):  # a string of a given form: its title names the form
                item = f"{o['items'].get('title', o['items']['pattern'])} {item}"
            n = o.get("minItems")
            text = (f"a list of {n} {item}s" if n is not None and n == o.get("maxItems") else f"a list of {item}s")
        parts.append(text)
    return " or ".join(parts) + (" or null" if nullable else "")


def key_docs() -> list[dict[str, Any]]:
    """Every recipe key with its default, allowed values and meaning (the docs' recipe table)."""
    props = _properties()
    return [{"key": k, "default": props[k].get("default"), "allowed": _allowed(props[k]), "help": f.description or ""}
            for k, f in _fields()]


def json_schema() -> dict[str, Any]:
    """The JSON Schema of recipe files, for editors (``# yaml-language-server: $schema=...``)."""
    schema = Recipe.model_json_schema()
    schema["title"] = "headsurgeon training recipe"
    return schema


# ------------------------------------------------------------------------------- reading recipes

def flatten(tree: Any, where: str) -> dict[str, Any]:
    """``{data: {batch_size: 8}}`` -> ``{data.batch_size: 8}`` (unknown keys are reported by validation)."""
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
    return out


# Names users bring from timm's train.py, torchvision's references and common usage that no spelling
# distance finds ('learning_rate' is nearer 'clip_grad' than 'lr').
_SYNONYMS = {"learning_rate": "lr", "wd": "weight_decay", "optimizer": "opt", "bs": "batch_size",
             "num_epochs": "epochs", "image_size": "img_size", "input_size": "img_size", "smoothing": "label_smoothing",
             "num_heads": "heads", "temp": "temperature", "model_name": "model"}


def _hint(key: str, known: list[str]) -> str:
    last = key.split(".")[-1]
    last = _SYNONYMS.get(last, last)
    same = [k for k in known if k.split(".")[-1] == last]  # the right name in the wrong section, or none
    if len(same) == 1:
        return f"; did you mean '{same[0]}'?"
    key = key[: len(key) - len(key.split(".")[-1])] + last
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    near = near or difflib.get_close_matches(key.split(".")[-1], [k.split(".")[-1] for k in known], n=1)
    hint = next((k for k in known if near and (k == near[0] or k.endswith("." + near[0]))), None)
    return f"; did you mean '{hint}'?" if hint else ""


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys back into sections (the inverse of :func:`flatten`)."""
    out: dict[str, Any] = {}
    for k, v in flat.items():
        head, dot, sub = k.partition(".")
        if dot and head in SECTIONS:
            out.setdefault(head, {})[sub] = v
        else:
            out[k] = v
    return out


def from_flat(flat: dict[str, Any], where: str = "recipe") -> Recipe:
    """Validate dotted keys over the defaults; every error of the input in one line."""
    try:
        return Recipe.model_validate(nest(flat))
    except ValidationError as e:
        raise HeadsurgeonError(f"{where}: " + "; ".join(_messages(e, flat))) from None


def _messages(e: ValidationError, flat: dict[str, Any]) -> list[str]:
    props, docs = _properties(), {d["key"]: d["help"] for d in key_docs()}
    out: list[str] = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc[:2]) if loc and loc[0] in SECTIONS and len(loc) > 1 else (loc[0] if loc else "")
        if err["type"] == "extra_forbidden":
            msg = f"unknown recipe key '{key}'" + _hint(key, list(props))
        elif err["type"] == "finite_number" and key in props:
            msg = (f"'{key}' is {flat.get(key, err['input'])!r}: NaN and infinity are not allowed; expected "
                   f"{_allowed(props[key])} ({docs[key]})")
        elif err["type"] == "value_error" or key not in props:
            msg = str(err.get("ctx", {}).get("error", err["msg"])) if err["type"] == "value_error" else err["msg"]
        else:
            msg = f"'{key}' is {flat.get(key, err['input'])!r}; expected {_allowed(props[key])} ({docs[key]})"
        if msg not in out:
            out.append(msg)
    return out


def parse_set(pairs: Sequence[str]) -> dict[str, Any]:
    """``--set data.batch_size=32`` values are YAML (``true``, ``[a, b]``, ``null``)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise HeadsurgeonError(f"--set expects key=value (e.g. --set data.batch_size=32), got '{pair}'")
        try:
            out[key.strip()] = _yaml(value)
        except yaml.YAMLError as e:
            raise HeadsurgeonError(f"--set {key}: value '{value}' is not valid YAML ({first_line(e)})") from None
    return flatten(nest(out), "--set")


def read_yaml(path: str | Path, what: str = "recipe", hint: str = "see recipes/ for examples") -> Any:
    """A YAML file through the recipe's bounded loader (alias bombs, deep nesting refused): one line on error."""
    p = Path(path)
    if not p.is_file():
        raise HeadsurgeonError(f"{what} '{path}' does not exist; {hint}")
    try:
        return _yaml(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise HeadsurgeonError(f"{what} '{path}' is not valid YAML: {' '.join(str(e).split())[:200]}") from None


def read(path: str | Path, where: str | None = None) -> dict[str, Any]:
    """A recipe file's own keys, flat (no defaults)."""
    data = read_yaml(path)
    if data is None:  # an empty file is a mistake (or a truncated copy), not a request for the defaults
        raise HeadsurgeonError(f"recipe '{path}' is empty: give it keys (recipes/ has examples), or leave the recipe "
                               f"out to train the built-in digits defaults")
    return flatten(data, where or str(path))


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> tuple[Recipe, set[str]]:
    """Defaults <- recipe file <- ``--set`` pairs, validated. Returns the recipe and the dotted keys
    the user gave explicitly."""
    where = str(path) if path is not None else "recipe"
    given = read(path) if path is not None else {}
    _check_tree(given, where)
    sets = parse_set(overrides)
    _check_tree(sets, "--set")
    if sets.get("tree") is not None:  # a tree from the command line replaces the file's model and split
        given = {k: v for k, v in given.items() if not _fixed_by_tree(k)}
    given.update(sets)
    if "model" in given and "model_kwargs" not in given:
        given["model_kwargs"] = {}  # the default kwargs belong to the default (digits) model
    return from_flat(given, where), set(given)


def _fixed_by_tree(key: str) -> bool:
    return key in ("model", "model_kwargs", "pretrained", "weights") or key.startswith("split.")


def _check_tree(layer: dict[str, Any], where: str) -> None:
    clash = [k for k in layer if _fixed_by_tree(k)] if layer.get("tree") is not None else []
    if clash:
        raise HeadsurgeonError(f"{where}: 'tree' already fixes the model and its split; remove {', '.join(clash)}")


def diff(old: Recipe, new: Recipe) -> list[str]:
    """Keys whose values differ between two recipes, as ``key: old -> new`` (resume-free keys ignored)."""
    a, b = old.flat(), new.flat()
    keys = sorted((set(a) | set(b)) - set(RESUME_FREE))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"
