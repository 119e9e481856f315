"""End-to-end steps over directories: collapse a tree or run directory, and the demo.

These sit on top of every stage (split, train, collapse, card), so the CLI stays a thin shell
and the demo runs exactly what a user would run.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

from .errors import HeadsurgeonError


def collapse_dir(source: str | Path | None, head: int | None, output: str | Path | None, overwrite: bool = False,
                 log: Callable[[str], None] = print) -> tuple[Path, int]:
    """Collapse one head of a tree directory or a training run (default: its best head) and
    export it with its model card. Without ``source``, the most recent run under ``runs/``.

    A run's export carries the run's evaluation preprocessing in ``config.json`` (so timm's
    ``resolve_data_config`` reproduces the run's test accuracy) and is labelled with
    ``best/record.json``, written with the weights it describes, so the card's accuracies are
    those of the exported weights even if a kill left ``summary.json`` an epoch behind.
    """
    from .card import card_writer
    from .collapse import export
    from .rundir import RunDir
    from .storage import check_not_link, check_output, check_path_name
    from .tree import HeadTree

    src = _source(source, log)
    rd = RunDir(src)
    is_run = _is_run(src)
    run = recipe = seen = None
    tree_dir = src
    if is_run:  # a training run: its best checkpoint, labelled by the record written with it
        tree_dir, run, recipe, seen = _read_run(rd, log)
        if head is None:
            head = int(run["best_head"])
            h = run["heads"][head]
            log(f"run {src}: best head {head} by validation (val top-1 {h['val_top1']:.2f}%, "
                f"test top-1 {h['test_top1']:.2f}%, epoch {run['best_epoch']})")
    head = 0 if head is None else head
    out = Path(output or f"{src.name}-head{head}")
    check_path_name(out)  # before resolve(): a name the file system refuses raises ENAMETOOLONG there
    if src.resolve() == out.resolve() or out.resolve() in src.resolve().parents:
        raise HeadsurgeonError(f"-o '{out}' is the folder collapse reads from (or holds it): writing the export "
                               f"there would delete {'the run' if is_run else 'the tree'}; choose another -o")
    check_output_place(out)
    check_not_link(out)
    check_output(out, overwrite)  # before the work: a bad -o is one line, not the end of a long collapse
    tree = HeadTree.load(tree_dir)
    if is_run and _stamp(tree_dir) != seen:
        raise HeadsurgeonError(f"'{tree_dir}' was replaced while it was read (the run is still training and "
                               f"wrote a better checkpoint); run collapse again")
    model = tree.collapse(head)
    data_cfg, card_recipe = _preprocessing(rd, src, is_run, recipe, tree, log)
    names = (run or {}).get("label_names")
    export(model, out, label_names=names, overwrite=overwrite, data_config=data_cfg,
           card=card_writer(tree.spec, head, summary=run, recipe=card_recipe,
                            label_names=names, num_params=sum(p.numel() for p in model.parameters())))
    peer = tree.spec.peer(head)
    log(f"head {head} of {src} -> {peer.architecture} with {peer.model_args}; "
        f"logits verified equal to the tree's and to the reloaded export"
        + (f"; preprocessing {data_cfg['input_size'][1]}px, crop {data_cfg['crop_pct']} in config.json" if data_cfg else ""))
    return out, head


def _source(source: str | Path | None, log: Callable[[str], None]) -> Path:
    """The folder to collapse: ``source``, or the most recent run under ``runs/``."""
    if source is None:
        from .rundir import RUNS, latest_run

        found = latest_run(RUNS)
        if found is None:
            raise HeadsurgeonError(f"no training run under {RUNS}/; give a tree or run directory")
        log(f"using the most recent run: {found}")
        source = found
    src = Path(source)
    if not src.is_dir():
        raise HeadsurgeonError(f"'{source}' is not a directory; give a tree directory written by `headsurgeon split` "
                               f"or a run directory written by `headsurgeon train`")
    return src


def _is_run(src: Path) -> bool:
    """A training run's folder (not a tree's): one of the files a run writes, and no ``spec.json`` of its own."""
    from .rundir import BEST, LAST, METRICS_FILE, RECIPE_FILE, SPEC_FILE, SUMMARY_FILE

    return not (src / SPEC_FILE).exists() and any(
        (src / f).exists() for f in (SUMMARY_FILE, RECIPE_FILE, METRICS_FILE, BEST, LAST))


def _read_run(rd: Any, log: Callable[[str], None]) -> tuple[Path, dict[str, Any], Any, tuple[int, ...]]:
    """A run's ``best/`` folder, its label (see :func:`labels`), its recipe (None where absent) and the
    folder's identity as read (:func:`_stamp`)."""
    from .rundir import BEST, RECIPE_FILE, SPEC_FILE
    from .tree import SplitSpec

    src, tree_dir = rd.path, rd.best
    if not (tree_dir / SPEC_FILE).is_file():
        raise HeadsurgeonError(f"run '{src}' has no {BEST}/ checkpoint yet (no finished epoch); "
                               f"train it (`headsurgeon train --resume -o {src}`) or give a tree directory")
    heads = SplitSpec.from_json((tree_dir / SPEC_FILE).read_text(), where=str(tree_dir / SPEC_FILE)).heads
    seen = _stamp(tree_dir)
    run = labels(rd.summary(heads), rd.best_record(heads), src, log)
    recipe = rd.read_recipe() if (src / RECIPE_FILE).is_file() else None
    return tree_dir, run, recipe, seen


def _preprocessing(rd: Any, src: Path, is_run: bool, recipe: Any, tree: Any,
                   log: Callable[[str], None]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The export's ``config.json`` preprocessing and the recipe its card shows: what the run was trained
    with (``data_config.json``; runs older than it: ``recipe.yaml``); a bare tree keeps its model's
    pretrained_cfg (None). A run's ``history/epoch-NNN/`` is its run's."""
    from .data import eval_config
    from .rundir import DATA_CONFIG_FILE, HISTORY, RECIPE_FILE, RECORD_FILE, RunDir

    data_cfg = None
    if recipe is not None:  # the run's own evaluation
        data_cfg = eval_config(recipe.data, tree.spec.pretrained_cfg, tree.spec.model_args.get("in_chans", 3))
    recorded = rd.data_config() if is_run else RunDir(src.parent.parent).data_config() \
        if src.parent.name == HISTORY and (src / RECORD_FILE).is_file() else None
    card_recipe = recipe.nested() if recipe else None
    if recorded is not None:
        if data_cfg is not None and data_cfg != recorded:
            changed = ", ".join(f"{k} {data_cfg[k]} (trained with {recorded[k]})" for k in recorded
                                if data_cfg.get(k) != recorded[k])
            log(f"note: {src / RECIPE_FILE} was edited after training ({changed}); the export carries the "
                f"preprocessing the run was trained with ({src / DATA_CONFIG_FILE})")
            card_recipe["data"]["img_size"] = recorded["input_size"][1]
        data_cfg = recorded
    return data_cfg, card_recipe


def _stamp(directory: Path) -> tuple[int, ...]:
    """Identity of a checkpoint directory: a live run replaces ``best/`` by renaming a new one into place
    (a new inode), and its weights file with it. Not the folder's mtime, which any file made and removed
    in it changes (the writability probe of a -o inside it)."""
    from .tree import WEIGHTS_FILE

    st, w = directory.stat(), (directory / WEIGHTS_FILE).stat()
    return st.st_dev, st.st_ino, w.st_ino, w.st_size, w.st_mtime_ns


def _run_or_tree(d: Path) -> str | None:
    """What ``d`` is, if it is a folder headsurgeon reads: "training run" or "head tree"."""
    from .rundir import BEST, LAST, LOCK_FILE, METRICS_FILE, RECIPE_FILE, RECOVERY, SPEC_FILE, STATE_FILE, SUMMARY_FILE

    if (d / SPEC_FILE).is_file():
        return "head tree"
    has = {f for f in (LOCK_FILE, SUMMARY_FILE, METRICS_FILE, RECIPE_FILE) if (d / f).is_file()}
    # a checkpoint, or two of a run's files (one alone is too common a name: pytest's base folder holds a .lock)
    if len(has) >= 2 or any((d / c / f).is_file() for c in (BEST, LAST, RECOVERY) for f in (SPEC_FILE, STATE_FILE)):
        return "training run"
    return None


def check_output_place(out: Path) -> None:
    """Refuse an export folder that is a run or tree folder or lies inside one (``-o RUN/last
    --overwrite`` would delete the run's resume checkpoint, ``-o RUN/best/x`` would write into the
    checkpoint collapse reads). The outermost such folder is named: a run's ``last/`` is a tree too."""
    found = None
    for d in (out.resolve(), *out.resolve().parents):
        kind = _run_or_tree(d) if d.is_dir() else None
        if kind is not None:
            found = (d, kind)
    if found is not None:
        d, kind = found
        where = "is" if d == out.resolve() else "is inside"
        raise HeadsurgeonError(f"-o '{out}' {where} the {kind} '{d}': the export would replace or mix with its files "
                               f"(--overwrite would delete them); choose a -o outside it")


def labels(summary: dict[str, Any] | None, record: dict[str, Any] | None, src: Path,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """The summary to label ``best/`` with (:func:`headsurgeon.summary.merge`: ``best/record.json`` for the
    best checkpoint, ``summary.json`` for the run's progress), saying so when the two disagree.
    Runs older than records have only ``summary.json``."""
    from .summary import merge

    merged, stale = merge(summary, record)
    if merged is None:
        raise HeadsurgeonError(f"run '{src}' has neither summary.json nor best/record.json; "
                               f"give its best/ folder to collapse it without accuracies")
    if stale:
        said = "is missing" if summary is None else f"describes epoch {summary['best_epoch']}"
        log(f"note: summary.json {said} but best/ holds the weights of epoch {record['best_epoch']} (a run stopped "
            f"between its checkpoint writes); labelling them with best/record.json")
    return merged


# ----------------------------------------------------------------------------------- demo

_EVAL = textwrap.dedent("""
    # A fresh process: the model comes from timm alone (local-dir:), the test split from the run's recipe.
    import json, sys, torch, timm, yaml
    from timm.data import resolve_data_config
    model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
    assert "headsurgeon.tree" not in sys.modules
    from headsurgeon import data, recipe
    flat = recipe.from_flat(recipe.read(sys.argv[2]))
    loader = data.loader(data.splits(flat).test, flat, resolve_data_config(model=model), False, torch.device("cpu"))
    correct = n = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            n += len(y)
    print(json.dumps({"test_top1": 100.0 * correct / n, "n": n, "class": type(model).__name__}))
""")


# The demo's configuration, chosen from the evidence in docs/paper.md ("Our reproduction on digits",
# 5-fold CV x 3 seeds, the same harness as these keys): 4 independent instances (split at the input)
# are the one tree shape that beat the single model there, and most clearly under label noise
# (deployed head +2.75 +- 0.85 pp at 20 % noise, ensemble +5.32 +- 0.71); trees that share layers
# and the rescale op did not help. Settings as in that study (16 px, 25 % labelled subset, batch 32,
# 40 epochs), on the fixed 360-image test split.
DEMO_SETS = ("split.at=[input]", "split.heads=4", "loss.objective=cl", "data.label_noise=0.2",
             "data.img_size=16", "data.train_fraction=0.25", "data.batch_size=32", "epochs=40")
EVIDENCE = ("docs/paper.md, 'Our reproduction on digits' (5-fold CV x 3 seeds): 4 independent instances beat the "
            "single model at 20 % label noise by +2.75 ± 0.85 pp (deployed head, paired over 15 cells); trees that "
            "share layers, and gradient rescaling, did not help")
PLOT_FILE = "demo.png"


def demo(output: str | Path = "runs/demo", epochs: int | None = None, log: Callable[[str], None] = print,
         progress: bool | None = None) -> dict[str, Any]:
    """The main job on the embedded digits data, end to end, in the configuration the evidence favours.

    Train 4 independent instances of a small timm ResNet collaboratively (a tree split at the
    input) on digits with 20 % label noise, and the single model with the same budget; collapse
    the head chosen by validation; reload it with ``timm.create_model('local-dir:...')`` in a fresh
    process and evaluate it on the test split; print the table (each test accuracy with its
    binomial standard error, and whether the difference to the single model is resolved), plot the
    accuracy per epoch (``OUTPUT/demo.png``) and the command that pushes the model.

    ``progress``: one tqdm bar per model (None: only on a terminal); the per-epoch lines of the two
    runs are in their ``metrics.jsonl``/``summary.csv``.
    """
    from . import recipe as R
    from .storage import check_output
    from .train import train

    if epochs is not None and epochs < 1:
        raise HeadsurgeonError(f"--epochs must be at least 1, got {epochs}")
    out = Path(output)
    check_output(out, fix="remove it or pass --output DIR")
    sets = [*DEMO_SETS, *([f"epochs={epochs}"] if epochs else [])]
    flat, _ = R.load(None, sets)
    single, _ = R.load(None, [*sets, "split.at=[]", "split.heads=1", "split.fanout=null"])
    noise = f"{flat.data.label_noise:.0%} label noise on train"
    log(f"headsurgeon demo: {flat.split.heads} independent instances of {flat.model} trained collaboratively "
        f"({flat.loss.objective}) vs the single model, same budget; digits at {flat.data.img_size}px, "
        f"{noise}, {flat.epochs} epochs")
    log(f"why this setup: {EVIDENCE}")
    tree_run = _train_quietly(train, flat, "demo-tree", out / "tree", f"tree ({flat.split.heads} heads)", progress, log)
    single_run = _train_quietly(train, single, "demo-single", out / "single", "single model", progress, log)
    notes: list[str] = []
    model_dir, head = collapse_dir(out / "tree", None, out / "model", log=notes.append)
    _add_baseline(out / "tree", head, model_dir, single_run)
    proc = subprocess.run([sys.executable, "-c", _EVAL, str(model_dir.resolve()), str(out / "tree" / "recipe.yaml")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise HeadsurgeonError(f"the collapsed model failed to reload in a fresh process: {proc.stderr.strip().splitlines()[-1]}")
    reloaded = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"collapsed head {head} (best by validation) into a plain timm {reloaded['class']}, verified, and reloaded it "
        f"with timm.create_model('local-dir:...') in a fresh process: test top-1 {reloaded['test_top1']:.2f}%")
    result = {"single": single_run, "tree": tree_run, "head": head, "reloaded": reloaded, "output": str(out),
              "plot": _plot(out, head)}
    log(table(result))
    return result


def _train_quietly(train: Callable, recipe: Any, name: str, output: Path, label: str, progress: bool | None,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """Train with one tqdm bar (epochs) instead of a line per epoch."""
    import re

    from tqdm import tqdm

    bar = tqdm(total=recipe.epochs, desc=f"{label:<16}", unit="epoch", leave=True, dynamic_ncols=True,
               disable=None if progress is None else not progress)

    def on_line(message: str) -> None:
        m = re.match(r"epoch (\d+)/\d+ .*val top1 (.*?)  test", message)
        if m:
            bar.update(int(m.group(1)) - bar.n)
            bar.set_postfix_str(f"val top-1 {m.group(2)}", refresh=False)

    try:
        summary = train(recipe, name=name, output=str(output), log=on_line)
    finally:
        bar.close()
    if bar.disable:  # no terminal: one line per model instead of the bar
        b = summary["heads"][summary["best_head"]]
        log(f"{label}: {summary['epochs_done']} epochs in {summary['wall_time_s']:.0f}s, best epoch "
            f"{summary['best_epoch']}, val top-1 {b['val_top1']:.2f}%")
    return summary


def _add_baseline(run: Path, head: int, model_dir: Path, single: dict[str, Any]) -> None:
    """The card of the collapsed head, with the single model beside it (the card is not in the
    sha256 proof, so the folder stays a verified collapse output)."""
    import timm

    from .card import CARD_FILE, run_card

    model = timm.create_model(f"local-dir:{model_dir.resolve()}", pretrained=False)
    text = run_card(run, head, model_dir, baseline=single, num_params=sum(p.numel() for p in model.parameters()))
    (model_dir / CARD_FILE).write_text(text, encoding="utf-8")


def _plot(out: Path, head: int) -> str | None:
    """``demo.png``: validation and test top-1 per epoch of every head, the ensemble and the single model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .rundir import RunDir

    tree, single = RunDir(out / "tree").metrics(), RunDir(out / "single").metrics()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, split in zip(axes, ("val", "test")):
        for i in range(len(tree[0][split]["heads"])):
            ax.plot([r["epoch"] for r in tree], [r[split]["heads"][i]["top1"] for r in tree], lw=2.2 if i == head else 1,
                    alpha=1 if i == head else 0.6, label=f"head {i}" + (" (exported)" if i == head else ""))
        ax.plot([r["epoch"] for r in tree], [r[split]["ensemble"]["top1"] for r in tree], "k:", label="ensemble")
        ax.plot([r["epoch"] for r in single], [r[split]["heads"][0]["top1"] for r in single], "k-", lw=2.2,
                label="single model")
        ax.set_title(f"{'validation' if split == 'val' else 'test'} top-1 (%)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    lo = min(min(r[s]["heads"][0]["top1"] for r in single[len(single) // 4:]) for s in ("val", "test"))
    axes[0].set_ylim(max(0, lo - 10), 100)
    axes[0].legend(fontsize=8)
    fig.suptitle("headsurgeon demo: collaborative heads vs the single model (digits)")
    fig.tight_layout()
    path = out / PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def difference(a: float, b: float, n: int) -> tuple[float, float, bool]:
    """``a - b`` (pp) of two accuracies on the same ``n`` test images, the standard error of the
    difference from their binomial SEs taken as independent (conservative: the images are shared),
    and whether it is resolved (|Δ| > 2 SE)."""
    from .card import binomial_se

    se = (binomial_se(a, n) ** 2 + binomial_se(b, n) ** 2) ** 0.5
    return a - b, se, abs(a - b) > 2 * se


def table(result: dict[str, Any]) -> str:
    """The demo's closing screen: accuracies ± binomial SE, Δ to the single model, what it means,
    where the evidence is, the plot and the push command."""
    from .card import binomial_se

    s, t, head = result["single"], result["tree"], result["head"]
    n = result["reloaded"]["n"]
    base = s["heads"][0]["test_top1"]
    rows = [("single model (same budget)", s["heads"][0]["val_top1"], base, False)]
    rows += [(f"head {h['index']}" + (" (chosen by validation)" if h["index"] == head else ""),
              h["val_top1"], h["test_top1"], True) for h in t["heads"]]
    rows += [("ensemble of the heads (not one model)", t["ensemble"]["val_top1"], t["ensemble"]["test_top1"], True),
             (f"collapsed head {head}, reloaded by timm", None, result["reloaded"]["test_top1"], True)]
    w = max(len(r[0]) for r in rows)
    lines = [f"{'model':<{w}}  val top-1  test top-1 ± SE   Δ vs single ± SE", "-" * (w + 47)]
    for name, val, test, vs in rows:
        d, se, _ = difference(test, base, n)
        lines.append(f"{name:<{w}}  {'' if val is None else f'{val:8.2f}%':>9}  {test:7.2f}% ± {binomial_se(test, n):4.2f}"
                     + (f"   {d:+6.2f} ± {se:4.2f}" if vs else ""))
    d, se, resolved = difference(result["reloaded"]["test_top1"], base, n)
    lines += ["", f"Test split: {n} images, so one image is {100 / n:.2f} pp; SE is the binomial standard error, the SE of "
                  f"a difference treats the two models as independent (conservative)."]
    if resolved:
        lines.append(f"The exported head is {abs(d):.2f} pp {'above' if d > 0 else 'below'} the single model: more than "
                     f"2 SE ({2 * se:.2f} pp), a resolved difference on this test split.")
    else:
        lines.append(f"The exported head is {abs(d):.2f} pp {'above' if d >= 0 else 'below'} the single model, within "
                     f"2 SE ({2 * se:.2f} pp): one run on {n} images does not resolve the difference either way; "
                     f"the evidence is the repeated study below.")
    lines.append(f"Evidence for this setup: {EVIDENCE}.")
    o = Path(result["output"])
    if result.get("plot"):
        lines.append(f"plot (accuracy per epoch, each head vs the single model): {result['plot']}")
    lines += [f"runs: {o / 'tree'}, {o / 'single'} (metrics.jsonl, summary.csv, curves.png); "
              f"model: {o / 'model'} (config.json, model.safetensors, README.md)",
              f"push it: headsurgeon push {o / 'model'} --repo <your-namespace>/resnet10t-digits-cl"]
    return "\n".join(lines)
