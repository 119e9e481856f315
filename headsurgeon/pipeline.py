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
    from .data import eval_config
    from .rundir import BEST, RunDir
    from .storage import check_output
    from .tree import SPEC_FILE, HeadTree, SplitSpec

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
    rd = RunDir(src)
    is_run = not (src / SPEC_FILE).exists() and any(
        (src / f).exists() for f in ("summary.json", "recipe.yaml", "metrics.jsonl", BEST, "last"))
    run = recipe = data_cfg = None
    tree_dir = src
    if is_run:  # a training run: its best checkpoint, labelled by the record written with it
        tree_dir = rd.best
        if not (tree_dir / SPEC_FILE).is_file():
            raise HeadsurgeonError(f"run '{src}' has no {BEST}/ checkpoint yet (no finished epoch); "
                                   f"train it (`headsurgeon train --resume -o {src}`) or give a tree directory")
        heads = SplitSpec.from_json((tree_dir / SPEC_FILE).read_text(), where=str(tree_dir / SPEC_FILE)).heads
        seen = _stamp(tree_dir)
        run = labels(rd.summary(heads), rd.best_record(heads), src, log)
        recipe = rd.read_recipe() if (src / "recipe.yaml").is_file() else None
        if head is None:
            head = int(run["best_head"])
            h = run["heads"][head]
            log(f"run {src}: best head {head} by validation (val top-1 {h['val_top1']:.2f}%, "
                f"test top-1 {h['test_top1']:.2f}%, epoch {run['best_epoch']})")
    head = 0 if head is None else head
    out = Path(output or f"{src.name}-head{head}")
    check_output(out, overwrite)  # before the work: a bad -o is one line, not the end of a long collapse
    tree = HeadTree.load(tree_dir)
    if is_run and _stamp(tree_dir) != seen:
        raise HeadsurgeonError(f"'{tree_dir}' was replaced while it was read (the run is still training); "
                               f"run collapse again")
    model = tree.collapse(head)
    if recipe is not None:  # the run's own evaluation; a bare tree keeps its model's pretrained_cfg
        data_cfg = eval_config(recipe, tree.spec.pretrained_cfg, tree.spec.model_args.get("in_chans", 3))
    names = (run or {}).get("label_names")
    export(model, out, label_names=names, overwrite=overwrite, data_config=data_cfg,
           card=card_writer(tree.spec, head, summary=run, recipe=recipe.nested() if recipe else None,
                            label_names=names, num_params=sum(p.numel() for p in model.parameters())))
    log(f"head {head} of {src} -> {tree.spec.architecture} with {tree.spec.model_args}; "
        f"logits verified equal to the tree's and to the reloaded export"
        + (f"; preprocessing {data_cfg['input_size'][1]}px, crop {data_cfg['crop_pct']} in config.json" if data_cfg else ""))
    return out, head


def _stamp(directory: Path) -> tuple[int, ...]:
    """Identity of a checkpoint directory: a live run replaces ``best/`` by renaming a new one into place."""
    st = directory.stat()
    return st.st_ino, st.st_mtime_ns


BEST_KEYS = ("best_epoch", "best_head", "heads", "ensemble")  # what a summary says about the best checkpoint


def labels(summary: dict[str, Any] | None, record: dict[str, Any] | None, src: Path,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """The summary to label ``best/`` with: ``summary.json`` for the run's progress, ``best/record.json``
    (written in one atomic step with the weights) for everything about the best checkpoint.
    Runs older than records have only ``summary.json``."""
    if record is None:
        if summary is None:
            raise HeadsurgeonError(f"run '{src}' has neither summary.json nor best/record.json; "
                                   f"give its best/ folder to collapse it without accuracies")
        return summary
    if summary is None or any(summary.get(k) != record.get(k) for k in BEST_KEYS):
        said = "is missing" if summary is None else f"describes epoch {summary['best_epoch']}"
        log(f"note: summary.json {said} but best/ holds the weights of epoch {record['best_epoch']} (a run stopped "
            f"between its checkpoint writes); labelling them with best/record.json")
    return {**(summary or record), **{k: record[k] for k in BEST_KEYS if k in record}}


# ----------------------------------------------------------------------------------- demo

_EVAL = textwrap.dedent("""
    # A fresh process: the model comes from timm alone (local-dir:), the test split from the run's recipe.
    import json, sys, torch, timm, yaml
    from timm.data import resolve_data_config
    model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
    assert "headsurgeon.tree" not in sys.modules
    from headsurgeon import data, recipe
    flat = recipe.validate(recipe.flatten(yaml.safe_load(open(sys.argv[2])), "recipe"))
    loader = data.loader(data.splits(flat).test, flat, resolve_data_config(model=model), False, torch.device("cpu"))
    correct = n = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            n += len(y)
    print(json.dumps({"test_top1": 100.0 * correct / n, "n": n, "class": type(model).__name__}))
""")


def demo(output: str | Path = "runs/demo", epochs: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The main job on the embedded digits data, end to end.

    Split a small timm ResNet at two points into 4 heads and train it collaboratively; train the
    single model with the same budget; collapse the head chosen by validation; reload it with
    ``timm.create_model('local-dir:...')`` in a fresh process and evaluate it on the test split.
    """
    from . import recipe as R
    from .storage import check_output
    from .train import train

    out = Path(output)
    check_output(out, fix="remove it or pass --output DIR")
    flat, _ = R.load(None, [f"epochs={epochs}"] if epochs else [])
    single = dict(flat, **{"split.at": [], "split.heads": 1, "split.fanout": None})
    log(f"[1/4] training a {flat['split.heads']}-head tree of {flat['model']} split at "
        f"{','.join(flat['split.at'])} on digits ({flat['epochs']} epochs)")
    tree_run = train(flat, name="demo-tree", output=str(out / "tree"), log=log)
    log(f"[2/4] training the single {flat['model']} with the same budget")
    single_run = train(single, name="demo-single", output=str(out / "single"), log=log)
    log("[3/4] collapsing the best head into a plain timm model")
    model_dir, head = collapse_dir(out / "tree", None, out / "model", log=log)
    log("[4/4] reloading it with timm.create_model('local-dir:...') in a fresh process and evaluating it")
    proc = subprocess.run([sys.executable, "-c", _EVAL, str(model_dir.resolve()), str(out / "tree" / "recipe.yaml")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise HeadsurgeonError(f"the collapsed model failed to reload in a fresh process: {proc.stderr.strip().splitlines()[-1]}")
    reloaded = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {"single": single_run, "tree": tree_run, "head": head, "reloaded": reloaded, "output": str(out)}
    log(table(result))
    return result


def table(result: dict[str, Any]) -> str:
    s, t, head = result["single"], result["tree"], result["head"]
    rows = [("single model (same budget)", s["heads"][0]["val_top1"], s["heads"][0]["test_top1"])]
    rows += [(f"tree head {h['index']}" + (" (chosen by validation)" if h["index"] == head else ""),
              h["val_top1"], h["test_top1"]) for h in t["heads"]]
    rows += [("tree ensemble (mean of logits)", t["ensemble"]["val_top1"], t["ensemble"]["test_top1"]),
             (f"collapsed head {head}, reloaded by timm", None, result["reloaded"]["test_top1"])]
    w = max(len(r[0]) for r in rows)
    lines = [f"{'model':<{w}}  val top-1  test top-1", "-" * (w + 23)]
    for name, val, test in rows:
        lines.append(f"{name:<{w}}  {'' if val is None else f'{val:8.2f}%':>9}  {test:9.2f}%")
    o = Path(result["output"])
    lines += ["", f"outputs: {o / 'tree'} (tree run: summary.json, metrics.jsonl, curves.png), {o / 'single'} (single model),",
              f"         {o / 'model'} (collapsed head: config.json, model.safetensors, README.md)",
              f"load it: timm.create_model('local-dir:{(o / 'model').resolve()}', pretrained=True)"]
    return "\n".join(lines)
