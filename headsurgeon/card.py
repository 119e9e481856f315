"""The model card (``README.md``) that ``collapse`` writes beside ``config.json`` and ``model.safetensors``.

The front matter is built with huggingface_hub's ``ModelCardData``: what the Hub and timm expect
(``library_name: timm``, ``pipeline_tag``, ``tags``, ``license``, ``datasets``, ``metrics``,
``base_model`` for a run that started from pretrained weights) and a ``model-index`` of
``EvalResult``s (test top-1 and top-5 of this head; of the ensemble and of a single-model
baseline where known, named as not this model), which the Hub shows as evaluation results and
``ModelCard.load(...).data.eval_results`` reads back; plus a ``headsurgeon`` block that records
the sha256 of the exported files. That block is the proof that a folder came from ``collapse``: ``push`` refuses a
folder whose block is missing or whose files no longer match it. It lives in the card rather than
in ``config.json`` because ``config.json`` is timm's file (written by ``save_for_hf``), while the
card is ours; the prose of the card may be edited freely without breaking the proof.

The card cannot know the Hub repo at collapse time, so its usage code names
:data:`REPO_PLACEHOLDER`; ``push`` fills in the repo id (:func:`for_repo`).
Building a card needs no model (yaml, huggingface_hub and the standard library). For a run
directory the accuracies come from ``best/record.json`` (written with the ``best/`` weights, so it
describes exactly them) when present, else from ``summary.json`` (:func:`read_run`).
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
    from .spec import SplitSpec

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
    "fashion-mnist": "zalando-datasets/fashion_mnist",
}
# dataset names in recipes -> how the card and the Hub's evaluation results name them
_DATASET_NAMES = {"digits": "scikit-learn digits", "fashion-mnist": "Fashion-MNIST", "torch/cifar10": "CIFAR-10",
                  "torch/cifar100": "CIFAR-100", "torch/mnist": "MNIST", "torch/fashion_mnist": "Fashion-MNIST"}
OBJECTIVES = {"cl": "collaborative learning (Song & Chai, NeurIPS 2018)",
              "dml": "Deep Mutual Learning (Zhang et al., CVPR 2018)",
              "one": "On-the-fly Native Ensemble (Lan et al., NeurIPS 2018)",
              "kdcl": "KDCL-MinLogit (Guo et al., CVPR 2020)",
              "pcl": "Peer Collaborative Learning (Wu & Gong, AAAI 2021)"}
TASK = "image-classification"


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
               num_params: int | None = None, baseline: Mapping[str, Any] | None = None) -> str:
    """Model card text for head ``head`` of the tree described by ``spec``.

    Args:
        spec: the tree's :class:`~headsurgeon.spec.SplitSpec`.
        head: the collapsed head.
        summary: a training run's ``summary.json``; without it the card says that no accuracies are known.
        recipe: the run's recipe, nested (``recipe.yaml``) or flat.
        label_names: class names.
        head_reason: overrides the sentence that says why this head was chosen.
        files: the exported file names and their sha256 (the proof ``push`` checks).
        num_params: parameter count of the collapsed model.
        baseline: the ``summary.json`` of a single model trained with the same budget (e.g. the
            demo's), shown beside this head and in the evaluation results as not this model.
    """
    r = flatten(dict(recipe), "recipe") if recipe else {}
    peer = spec.peer(head)  # this head's own model (heterogeneous peers: one of several architectures)
    arch, pretrained_cfg = peer.architecture, peer.pretrained_cfg
    model_args = dict(peer.model_args)
    num_classes = (summary or {}).get("num_classes") or model_args.get("num_classes") \
        or pretrained_cfg.get("num_classes")
    size = list(spec.input_size) if spec.input_size else None
    if r.get("data.img_size"):  # a run: the size it was trained and evaluated at
        size = [(size or [3])[0], r["data.img_size"], r["data.img_size"]]
    lines: list[str] = _front_matter(spec, head, summary, r, files, baseline, arch, pretrained_cfg)
    lines += _intro(spec, head, summary, arch, num_classes, size)
    lines += _details(arch, model_args, num_classes, size, label_names, num_params, r.get("data.dataset"))
    lines += _how_made(spec, head, summary, r, arch, head_reason, baseline)
    lines += _usage()
    lines += _software(spec)
    return "\n".join(lines) + "\n"


def _front_matter(spec: SplitSpec, head: int, summary: Mapping[str, Any] | None, r: Mapping[str, Any],
                  files: Mapping[str, str] | None, baseline: Mapping[str, Any] | None, arch: str,
                  pretrained_cfg: Mapping[str, Any]) -> list[str]:
    """The YAML front matter: huggingface_hub's ``ModelCardData`` with the evaluation results and the
    ``headsurgeon`` block (the sha256 proof ``push`` checks)."""
    from huggingface_hub import ModelCardData

    hub_ds = hub_dataset(r.get("data.dataset"))
    license_ = "apache-2.0"
    if r.get("pretrained") and pretrained_cfg.get("license"):
        license_ = pretrained_cfg["license"]
    base_model = pretrained_cfg.get("hf_hub_id") if r.get("pretrained") else None
    block = {"version": __version__, "architecture": arch, "head": int(head), "heads": spec.heads,
             "trained": summary is not None, "files": dict(files or {})}
    if spec.peers:
        block["peers"] = [p.architecture for p in spec.peers]
    data = ModelCardData(
        library_name="timm", license=license_, pipeline_tag=TASK,
        tags=[TASK, "timm", "headsurgeon", "collaborative-learning"],
        datasets=[hub_ds] if hub_ds else None, metrics=["accuracy"] if summary is not None else None,
        base_model=base_model, model_name=REPO_PLACEHOLDER,
        eval_results=eval_results(summary, head, r, baseline) if summary is not None else None,
        **{MARKER: block})
    return ["---", data.to_yaml(), "---", ""]


def _intro(spec: SplitSpec, head: int, summary: Mapping[str, Any] | None, arch: str, num_classes: Any,
           size: list[int] | None) -> list[str]:
    """The title and what the model is: trained in a tree, or a tree's weights without a run."""
    lines = [f"# {arch} — head {head} of a collaboratively trained head tree" if summary is not None
             else f"# {arch} — head {head} of a headsurgeon head tree", ""]
    what = (f"A `{arch}` image classifier" + (f" for {num_classes} classes" if num_classes else "")
            + (f" at input size {'x'.join(map(str, size))}" if size else "") + ".")
    how = (f" It was trained as head {head} of a {spec.heads}-head tree with collaborative learning "
           f"([Song & Chai, NeurIPS 2018]({PAPER})) and collapsed back into the original timm architecture by "
           f"headsurgeon."
           if summary is not None else
           f" It is head {head} of a {spec.heads}-head tree built by headsurgeon and collapsed back into "
           f"the original timm architecture without a training run, so it carries the tree's weights as they were "
           f"(e.g. an initialisation) and no accuracy is known.")
    return [*lines, what + how + " It is a plain timm model: using it needs timm only, not headsurgeon.", ""]


def _details(arch: str, model_args: Mapping[str, Any], num_classes: Any, size: list[int] | None,
             label_names: Sequence[str] | None, num_params: int | None, dataset: str | None) -> list[str]:
    """## Model details: architecture, classes, input size, parameters, dataset."""
    hub_ds = hub_dataset(dataset)
    lines = ["## Model details", ""]
    add = lines.append
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
    return lines


def _how_made(spec: SplitSpec, head: int, summary: Mapping[str, Any] | None, r: Mapping[str, Any], arch: str,
              head_reason: str | None, baseline: Mapping[str, Any] | None) -> list[str]:
    """## How it was made: the tree, the objective, data and training, the results, the full recipe."""
    lines = ["## How it was made", ""]
    add = lines.append
    add(_tree_line(spec))
    if spec.peers:
        add(f"- **Peers:** this is head {head}, a `{arch}`, of {spec.heads} heterogeneous peers, each a whole model of "
            f"its own architecture that shares only the input with the others: "
            + ", ".join(f"head {h} `{p.architecture}`" + (" (this model)" if h == head else "")
                        for h, p in enumerate(spec.peers))
            + "." + (f" All were trained on one preprocessing: head 0's (`{spec.architecture}`) pretrained config "
                     f"with the recipe's data settings, which this export's config.json carries." if r else ""))
    else:
        add("  A split point is the first module each branch owns; every head is a complete "
            f"`{arch}` that shares the layers before its split points with its siblings.")
    objective = (summary or {}).get("objective")
    if isinstance(objective, Mapping) and objective.get("name"):
        name = objective["name"]
        params = ", ".join(f"{k} = {v}" for k, v in objective.items() if k != "name")
        add(f"- **Objective:** `{name}`, {OBJECTIVES.get(name, name)}" + (f"; {params}" if params else "") + ".")
    elif r:
        add(f"- **Loss:** collaborative learning, β = {r.get('loss.beta')} (weight of the hard-label term), "
            f"T = {r.get('loss.temperature')} (soft-target temperature)"
            + (f", β moving to {r['loss.beta_end']} by epoch {r.get('loss.beta_epochs') or r.get('epochs')} "
               f"(late consensus)" if r.get("loss.beta_end") is not None else "")
            + (", soft term × T²" if r.get("loss.t2") else "")
            + (f", label smoothing {r['loss.label_smoothing']}" if r.get("loss.label_smoothing") else "") + ".")
    if r:
        lines += _training_lines(summary, r)
    elif summary is not None:
        add("- **Recipe:** not recorded with this run.")
    if summary is not None:
        add("")
        add(_results(summary, head, head_reason, baseline))
    elif head_reason:
        add(f"- **Head:** {head_reason}")
    if r:
        lines += ["", "<details><summary>The full recipe</summary>", "", "```yaml",
                  yaml.safe_dump(nest(r), sort_keys=False).rstrip(), "```", "", "</details>"]
    add("")
    return lines


def _tree_line(spec: SplitSpec) -> str:
    at, fanout = spec.at, spec.fanout
    return (f"- **Head tree:** {spec.heads} heads, split at "
            + (", ".join(f"`{p}`" for p in at) if at else "no split point")
            + (f", fan-out {', '.join(map(str, fanout))}" if fanout else "")
            + f"; gradient rescaling at the forks {'on' if spec.rescale else 'off (ablation)'}"
            + f"; branch initialisation `{spec.branch_init}`"
            + (f", seed {spec.seed}" if spec.seed is not None else "") + ".")


def _training_lines(summary: Mapping[str, Any] | None, r: Mapping[str, Any]) -> list[str]:
    """The data and training lines of a run's recipe."""
    noise = r.get("data.label_noise", 0.0)
    data = (f"- **Data:** `{r.get('data.dataset')}`" + (f" at {r['data.img_size']}px" if r.get("data.img_size") else "")
            + f"; label noise {noise:g}" + (f" (seed {r.get('data.noise_seed')})" if noise else "")
            + (f"; samples {_samples((summary or {}).get('samples'))}" if (summary or {}).get("samples") else "")
            + ".")
    epochs = r.get("epochs")
    training = (f"- **Training:** {epochs} epoch{'' if epochs == 1 else 's'}" + (f" ({summary.get('epochs_done')} done)" if summary and
                                                                                summary.get("epochs_done") not in (None, epochs) else "")
                + f", optimizer `{r.get('optim.opt')}` lr {r.get('optim.lr')}, schedule `{r.get('sched.sched')}`, "
                f"batch size {r.get('data.batch_size')}, seed {r.get('seed')}"
                + (", EMA weights" if summary and summary.get("weights") == "ema" else "") + ".")
    return [data, training]


def _usage() -> list[str]:
    return ["## Usage", "", "```python", "import timm", "import torch", "",
            f'model = timm.create_model("hf-hub:{REPO_PLACEHOLDER}", pretrained=True).eval()',
            "config = timm.data.resolve_data_config(model=model)  # the preprocessing the model was evaluated with",
            "transform = timm.data.create_transform(**config)",
            "with torch.no_grad():",
            "    probabilities = model(transform(image).unsqueeze(0)).softmax(-1)  # image: a PIL image",
            "```", ""]


def _software(spec: SplitSpec) -> list[str]:
    """## Software (what collapsed it, what built the tree) and ## Citation."""
    lines = ["## Software", "",
             f"- collapsed with headsurgeon {__version__}, timm {_version('timm')}, torch {_version('torch')}"]
    if spec.versions:
        lines.append("- head tree built with " + ", ".join(f"{k} {v}" for k, v in spec.versions.items()))
    return [*lines, "", "## Citation", "", "```bibtex", CITATION, "```"]


def _samples(samples: Mapping[str, int]) -> str:
    return ", ".join(f"{v:,} {k}" for k, v in samples.items())


def dataset_label(recipe: Mapping[str, Any]) -> tuple[str, str, str]:
    """``(type, name, split)`` of the test split as the Hub's evaluation results name them: the Hub
    dataset id where known (else the recipe's name), a readable name, and the split."""
    r = recipe if any("." in k for k in recipe) else flatten(dict(recipe), "recipe")
    dataset = r.get("data.dataset") or "unknown"
    kind = hub_dataset(dataset) or dataset
    name = _DATASET_NAMES.get(dataset, dataset)
    if r.get("data.folds"):
        split = f"test (fold {r.get('data.fold', 0)} of {r['data.folds']})"
    elif dataset.startswith(("hfds/", "hfids/")):  # the Hub dataset's own split name
        split = r.get("data.test_split") or "test"
    else:
        split = "test"
    noise = r.get("data.label_noise") or 0
    if noise:
        name += f", {noise:.0%} symmetric label noise on train"
    return kind, name, split


def eval_results(summary: Mapping[str, Any], head: int, recipe: Mapping[str, Any] | None = None,
                 baseline: Mapping[str, Any] | None = None) -> list[Any] | None:
    """huggingface_hub ``EvalResult``s of the test split: top-1 and top-5 of head ``head``, then of
    the ensemble and of ``baseline`` (a single model's summary), whose names say they are not this model."""
    from huggingface_hub import EvalResult

    kind, name, split = dataset_label(recipe or {})
    heads = {h.get("index"): h for h in summary.get("heads", [])}
    who = [("", heads.get(head) or {})]
    if summary.get("ensemble") and len(heads) > 1:
        who.append((f", ensemble of all {len(heads)} heads (mean logits; not this model)", summary["ensemble"]))
    if baseline and baseline.get("heads"):
        who.append((", single model trained with the same budget (baseline; not this model)", baseline["heads"][0]))
    out = []
    for suffix, accs in who:
        for k, label in (("test_top1", "Top-1"), ("test_top5", "Top-5")):
            if isinstance(accs.get(k), (int, float)):
                out.append(EvalResult(task_type=TASK, task_name="Image Classification", dataset_type=kind,
                                      dataset_name=name, dataset_split=split, metric_type="accuracy",
                                      metric_value=round(float(accs[k]), 2), metric_name=f"{label} accuracy (%){suffix}",
                                      metric_config=k.split("_")[1] + ("" if not suffix else
                                                                       "-ensemble" if "ensemble" in suffix else "-baseline")))
    return out or None


def binomial_se(pct: float, n: int) -> float:
    """Standard error (percentage points) of an accuracy of ``pct`` % measured on ``n`` images."""
    p = min(max(pct / 100, 0.0), 1.0)
    return 100 * (p * (1 - p) / n) ** 0.5 if n > 0 else float("nan")


def _results(summary: Mapping[str, Any], head: int, reason: str | None,
             baseline: Mapping[str, Any] | None = None) -> str:
    best = summary.get("best_head")
    epoch = summary.get("best_epoch")
    n = (summary.get("samples") or {}).get("test")
    heads = summary.get("heads", [])
    top5 = any("test_top5" in h for h in heads)
    rows = ["## Results", "",
            f"Accuracy of every head of the tree at the best epoch ({epoch}"
            f"{' of ' + str(summary['epochs']) if summary.get('epochs') else ''}); validation is held out from the "
            f"training split, test is the dataset's held-out split"
            + (f" ({n:,} images: one image is {100 / n:.2f} pp, and the standard error of an accuracy near "
               f"{heads[0].get('test_top1', 90):.0f} % is about {binomial_se(heads[0].get('test_top1', 90), n):.1f} pp)"
               if n and heads else "") + ".", "",
            "| model | validation top-1 | test top-1 |" + (" test top-5 |" if top5 else ""),
            "|---|---|---|" + ("---|" if top5 else "")]

    def row(name: str, m: Mapping[str, Any]) -> str:
        return (f"| {name} | {_pct(m.get('val_top1'))} | {_pct(m.get('test_top1'))} |"
                + (f" {_pct(m.get('test_top5'))} |" if top5 else ""))

    for h in heads:
        i = h.get("index")
        rows.append(row(f"**head {i} (this model)**" if i == head else f"head {i}", h))
    ens = summary.get("ensemble") or {}
    if ens:
        rows.append(row("ensemble of all heads (mean logits; not this model)", ens))
    if baseline and baseline.get("heads"):
        rows.append(row("single model, same budget (baseline; not this model)", baseline["heads"][0]))
    rows.append("")
    if reason is None:
        if head == best:
            reason = (f"head {head} has the highest validation top-1 of the {len(heads)} heads at "
                      f"the best epoch; test accuracy played no part in the choice.")
        else:
            reason = f"head {head} was chosen by hand (`--head {head}`); the run's best head by validation is {best}."
    rows.append(f"**Chosen head:** {reason}")
    if summary.get("finished") is False:
        rows.append("")
        rows.append(f"The run was stopped after {summary.get('epochs_done')} of {summary.get('epochs')} epochs.")
    return "\n".join(rows)


def card_writer(spec: SplitSpec, head: int, **kwargs: Any) -> Callable[[Path], str]:
    """A callback for :func:`headsurgeon.exporter.export`: builds the card for the exported
    files in ``directory`` (after they are written and their reload verified), with their sha256."""

    def write(directory: Path) -> str:
        files = {name: sha256_file(Path(directory) / name) for name in VERIFIED_FILES}
        return build_card(spec, head, files=files, **kwargs)

    return write


def read_run(directory: str | Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """A training run directory's summary and ``recipe.yaml`` (None for what is absent, e.g. both
    for a plain tree directory). The accuracies, best epoch and head come from ``best/record.json``
    when present (written in one atomic step with the ``best/`` weights, so it describes exactly
    those weights), the run's progress (``finished``, ``epochs_done``) from ``summary.json``."""
    from .rundir import RECIPE_FILE, RunDir
    from .summary import merge

    d = Path(directory)
    summary, _ = merge(RunDir(d).summary(), RunDir(d).best_record())
    recipe = yaml.safe_load((d / RECIPE_FILE).read_text()) if (d / RECIPE_FILE).is_file() else None
    return summary, recipe if isinstance(recipe, dict) else None


def run_card(run_dir: str | Path, head: int, directory: str | Path, *, baseline: Mapping[str, Any] | None = None,
             num_params: int | None = None) -> str:
    """The card of head ``head`` of training run ``run_dir`` for the export in ``directory`` (its
    files' sha256), e.g. to add a baseline to the card ``collapse`` wrote."""
    from .rundir import BEST
    from .spec import SPEC_FILE, SplitSpec

    summary, recipe = read_run(run_dir)
    best = Path(run_dir) / ((summary or {}).get("best_dir") or BEST)
    spec = SplitSpec.from_json((best / SPEC_FILE).read_text())
    files = {name: sha256_file(Path(directory) / name) for name in VERIFIED_FILES}
    return build_card(spec, head, summary=summary, recipe=recipe, label_names=(summary or {}).get("label_names"),
                      files=files, num_params=num_params, baseline=baseline)
