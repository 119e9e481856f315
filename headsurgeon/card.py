"""The model card (``README.md``) that ``collapse`` writes beside ``config.json`` and ``model.safetensors``.

The front matter is what the Hub and timm expect (``library_name: timm``, ``pipeline_tag``,
``tags``, ``license``, ``datasets``) plus a ``headsurgeon`` block that records the sha256 of the
exported files. That block is the proof that a folder came from ``collapse``: ``push`` refuses a
folder whose block is missing or whose files no longer match it. It lives in the card rather than
in ``config.json`` because ``config.json`` is timm's file (written by ``save_for_hf``), while the
card is ours; the prose of the card may be edited freely without breaking the proof.

The card cannot know the Hub repo at collapse time, so its usage code names
:data:`REPO_PLACEHOLDER`; ``push`` fills in the repo id (:func:`for_repo`).
Only yaml and the standard library are used here: building a card needs no model.
"""
from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import yaml

from .recipe import flatten, nest
from .storage import sha256_file
from .version import __version__

if TYPE_CHECKING:
    from .tree import SplitSpec

CARD_FILE = "README.md"
VERIFIED_FILES = ("config.json", "model.safetensors")
REPO_PLACEHOLDER = "<your-namespace>/<model-name>"
MARKER = "headsurgeon"
PAPER = "https://arxiv.org/abs/1805.11761"
CITATION = """@inproceedings{song2018collaborative,
  title     = {Collaborative Learning for Deep Neural Networks},
  author    = {Song, Guocong and Chai, Wei},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2018}
}"""

# dataset names in recipes -> Hub dataset ids, only where the mapping is certain
_HUB_DATASETS = {
    "torch/cifar10": "uoft-cs/cifar10",
    "torch/cifar100": "uoft-cs/cifar100",
    "torch/mnist": "ylecun/mnist",
    "torch/fashion_mnist": "zalando-datasets/fashion_mnist",
}


def read_front_matter(text: str) -> dict[str, Any] | None:
    """The YAML mapping between the leading ``---`` lines, or None if there is none (or it is not YAML)."""
    m = re.match(r"\A---\r?\n(.*?)\r?\n---\r?\n", text, re.S)
    if not m:
        return None
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return None
    return meta if isinstance(meta, dict) else None


def for_repo(card: str, repo_id: str) -> str:
    """The card as it should read on the Hub under ``repo_id`` (usage code names the repo)."""
    return card.replace(REPO_PLACEHOLDER, repo_id)


def hub_dataset(name: str | None) -> str | None:
    """Hub id of a recipe's ``data.dataset`` where it is known (``hfds/x`` -> ``x``), else None."""
    if not name:
        return None
    if name.startswith(("hfds/", "hfids/")):
        return name.split("/", 1)[1] or None
    return _HUB_DATASETS.get(name)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _pct(v: Any) -> str:
    return f"{v:.2f}%" if isinstance(v, (int, float)) else "–"


def _code(v: Any) -> str:
    return f"`{json.dumps(v) if not isinstance(v, str) else v}`"


def build_card(spec: SplitSpec, head: int, *, summary: Mapping[str, Any] | None = None,
               recipe: Mapping[str, Any] | None = None, label_names: Sequence[str] | None = None,
               head_reason: str | None = None, files: Mapping[str, str] | None = None,
               num_params: int | None = None) -> str:
    """Model card text for head ``head`` of the tree described by ``spec``.

    Args:
        spec: the tree's :class:`~headsurgeon.tree.SplitSpec`.
        head: the collapsed head.
        summary: a training run's ``summary.json``; without it the card says that no accuracies are known.
        recipe: the run's recipe, nested (``recipe.yaml``) or flat.
        label_names: class names.
        head_reason: overrides the sentence that says why this head was chosen.
        files: the exported file names and their sha256 (the proof ``push`` checks).
        num_params: parameter count of the collapsed model.
    """
    r = flatten(dict(recipe), "recipe") if recipe else {}
    arch = spec.architecture
    model_args = dict(spec.model_args)
    num_classes = (summary or {}).get("num_classes") or model_args.get("num_classes") \
        or spec.pretrained_cfg.get("num_classes")
    size = list(spec.input_size) if spec.input_size else None
    if r.get("data.img_size"):  # a run: the size it was trained and evaluated at
        size = [(size or [3])[0], r["data.img_size"], r["data.img_size"]]
    dataset = r.get("data.dataset")
    hub_ds = hub_dataset(dataset)
    license_ = "apache-2.0"
    if r.get("pretrained") and spec.pretrained_cfg.get("license"):
        license_ = spec.pretrained_cfg["license"]

    front: dict[str, Any] = {
        "library_name": "timm",
        "license": license_,
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "timm", "headsurgeon", "collaborative-learning"],
    }
    if hub_ds:
        front["datasets"] = [hub_ds]
    front[MARKER] = {
        "version": __version__,
        "architecture": arch,
        "head": int(head),
        "heads": spec.heads,
        "trained": summary is not None,
        "files": dict(files or {}),
    }

    lines: list[str] = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    add = lines.append
    add(f"# {arch} — head {head} of a collaboratively trained head tree" if summary is not None
        else f"# {arch} — head {head} of a headsurgeon head tree")
    add("")
    what = (f"A `{arch}` image classifier" + (f" for {num_classes} classes" if num_classes else "")
            + (f" at input size {'x'.join(map(str, size))}" if size else "") + ".")
    how = (f" It was trained as head {head} of a {spec.heads}-head tree with collaborative learning "
           f"([Song & Chai, NeurIPS 2018]({PAPER})) and collapsed back into the original timm architecture by "
           f"headsurgeon."
           if summary is not None else
           f" It is head {head} of a {spec.heads}-head tree built by headsurgeon and collapsed back into "
           f"the original timm architecture without a training run, so it carries the tree's weights as they were "
           f"(e.g. an initialisation) and no accuracy is known.")
    add(what + how + " It is a plain timm model: using it needs timm only, not headsurgeon.")
    add("")

    add("## Model details")
    add("")
    add(f"- **Architecture:** `{arch}`" + (f" with `model_args` {_code(model_args)}" if model_args else ""))
    if num_classes:
        names = list(label_names or [])
        shown = ", ".join(f"`{n}`" for n in names[:20]) + (f", … ({len(names)} in all)" if len(names) > 20 else "")
        add(f"- **Classes:** {num_classes}" + (f" ({shown})" if names else ""))
    if size:
        add(f"- **Input size:** {'x'.join(map(str, size))} (channels x height x width)")
    if num_params:
        add(f"- **Parameters:** {num_params / 1e6:.2f} M")
    if dataset:
        add(f"- **Dataset:** `{dataset}`" + (f" (Hub: [{hub_ds}](https://huggingface.co/datasets/{hub_ds}))" if hub_ds else ""))
    add("")

    add("## How it was made")
    add("")
    at, fanout = spec.at, spec.fanout
    add(f"- **Head tree:** {spec.heads} heads, split at "
        + (", ".join(f"`{p}`" for p in at) if at else "no split point")
        + (f", fan-out {', '.join(map(str, fanout))}" if fanout else "")
        + f"; gradient rescaling at the forks {'on' if spec.rescale else 'off (ablation)'}"
        + f"; branch initialisation `{spec.branch_init}`"
        + (f", seed {spec.seed}" if spec.seed is not None else "") + ".")
    add("  A split point is the first module each branch owns; every head is a complete "
        f"`{arch}` that shares the layers before its split points with its siblings.")
    if r:
        add(f"- **Loss:** collaborative learning, β = {r.get('loss.beta')} (weight of the hard-label term), "
            f"T = {r.get('loss.temperature')} (soft-target temperature)"
            + (", soft term × T²" if r.get("loss.t2") else "")
            + (f", label smoothing {r['loss.label_smoothing']}" if r.get("loss.label_smoothing") else "") + ".")
        noise = r.get("data.label_noise", 0.0)
        add(f"- **Data:** `{dataset}`" + (f" at {r['data.img_size']}px" if r.get("data.img_size") else "")
            + f"; label noise {noise:g}" + (f" (seed {r.get('data.noise_seed')})" if noise else "")
            + (f"; samples {_samples((summary or {}).get('samples'))}" if (summary or {}).get("samples") else "")
            + ".")
        epochs = r.get("epochs")
        add(f"- **Training:** {epochs} epoch{'' if epochs == 1 else 's'}" + (f" ({summary.get('epochs_done')} done)" if summary and
                                                   summary.get("epochs_done") not in (None, epochs) else "")
            + f", optimizer `{r.get('optim.opt')}` lr {r.get('optim.lr')}, schedule `{r.get('sched.sched')}`, "
            f"batch size {r.get('data.batch_size')}, seed {r.get('seed')}"
            + (", EMA weights" if summary and summary.get("weights") == "ema" else "") + ".")
    elif summary is not None:
        add("- **Recipe:** not recorded with this run.")
    if summary is not None:
        add("")
        add(_results(summary, head, head_reason))
    elif head_reason:
        add(f"- **Head:** {head_reason}")
    if r:
        add("")
        add("<details><summary>The full recipe</summary>")
        add("")
        add("```yaml")
        add(yaml.safe_dump(nest(r), sort_keys=False).rstrip())
        add("```")
        add("")
        add("</details>")
    add("")

    add("## Usage")
    add("")
    add("```python")
    add("import timm")
    add("import torch")
    add("")
    add(f'model = timm.create_model("hf-hub:{REPO_PLACEHOLDER}", pretrained=True).eval()')
    add("config = timm.data.resolve_data_config({}, model=model)")
    add("transform = timm.data.create_transform(**config)")
    add("with torch.no_grad():")
    add("    probabilities = model(transform(image).unsqueeze(0)).softmax(-1)  # image: a PIL image")
    add("```")
    add("")

    add("## Software")
    add("")
    made = spec.versions
    add(f"- collapsed with headsurgeon {__version__}, timm {_version('timm')}, torch {_version('torch')}")
    if made:
        add("- head tree built with " + ", ".join(f"{k} {v}" for k, v in made.items()))
    add("")
    add("## Citation")
    add("")
    add("```bibtex")
    add(CITATION)
    add("```")
    return "\n".join(lines) + "\n"


def _samples(samples: Mapping[str, int]) -> str:
    return ", ".join(f"{v:,} {k}" for k, v in samples.items())


def _results(summary: Mapping[str, Any], head: int, reason: str | None) -> str:
    best = summary.get("best_head")
    epoch = summary.get("best_epoch")
    rows = ["## Results", "",
            f"Top-1 accuracy of every head of the tree at the best epoch ({epoch}"
            f"{' of ' + str(summary['epochs']) if summary.get('epochs') else ''}); validation is held out from the "
            f"training split, test is the dataset's held-out split.", "",
            "| head | validation top-1 | test top-1 |", "|---|---|---|"]
    for h in summary.get("heads", []):
        i = h.get("index")
        name = f"**{i} (this model)**" if i == head else str(i)
        rows.append(f"| {name} | {_pct(h.get('val_top1'))} | {_pct(h.get('test_top1'))} |")
    ens = summary.get("ensemble") or {}
    if ens:
        rows.append(f"| ensemble of all heads (mean logits; not this model) | {_pct(ens.get('val_top1'))} | "
                    f"{_pct(ens.get('test_top1'))} |")
    rows.append("")
    if reason is None:
        if head == best:
            reason = (f"head {head} has the highest validation top-1 of the {len(summary.get('heads', []))} heads at "
                      f"the best epoch; test accuracy played no part in the choice.")
        else:
            reason = f"head {head} was chosen by hand (`--head {head}`); the run's best head by validation is {best}."
    rows.append(f"**Chosen head:** {reason}")
    if summary.get("finished") is False:
        rows.append("")
        rows.append(f"The run was stopped after {summary.get('epochs_done')} of {summary.get('epochs')} epochs.")
    return "\n".join(rows)


def card_writer(spec: SplitSpec, head: int, **kwargs: Any) -> Callable[[Path], str]:
    """A callback for :func:`headsurgeon.collapse.export`: builds the card for the exported
    files in ``directory`` (after they are written and their reload verified), with their sha256."""

    def write(directory: Path) -> str:
        files = {name: sha256_file(Path(directory) / name) for name in VERIFIED_FILES}
        return build_card(spec, head, files=files, **kwargs)

    return write


def read_run(directory: str | Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """A training run directory's ``summary.json`` and ``recipe.yaml`` (None for what is absent,
    e.g. both for a plain tree directory)."""
    d = Path(directory)
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else None
    recipe = yaml.safe_load((d / "recipe.yaml").read_text()) if (d / "recipe.yaml").is_file() else None
    return summary, recipe if isinstance(recipe, dict) else None
