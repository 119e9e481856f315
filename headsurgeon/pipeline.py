"""End-to-end steps over directories: collapse a tree or run directory.

These sit on top of every stage (split, train, collapse, card), so the CLI stays a thin shell
and the demo (demo.py) runs exactly what a user would run.
"""
from __future__ import annotations

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
    from .exporter import export
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
    from .rundir import BEST, LAST, LOCK_FILE, METRICS_FILE, RECIPE_FILE, RECOVERY, STATE_FILE, SUMMARY_FILE
    from .spec import SPEC_FILE

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
