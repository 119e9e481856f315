"""``headsurgeon compare``: does collaborative training help on *this* data, by how much, ± what?

Whether a tree of heads beats the single model depends on the regime (model, data size, schedule, label
noise; ../shared/research/regime.md), so the one honest answer is a paired comparison on the user's own
recipe: one cell per (variant, noise, seed), every variant trained with the same data order, noise draw and
budget as the ``single`` baseline of its (noise, seed), the gain reported as a paired mean ± SE, McNemar on
the pooled test predictions, and the regime hint the single model's own fit implies.

Layout of a study folder ``DIR`` (every file written atomically; a finished cell is never rewritten)::

    study.json          the resolved base recipe and every variant's overrides (a rerun must match them)
    cells.jsonl         one JSON line per finished (or failed) cell, appended by the coordinator only
    cells/KEY.json      a cell's result, written by its worker (harvested by a rerun if the coordinator died)
    runs/KEY/           the cell's training run (summary.json, metrics.jsonl, best/, last/)
    predictions/KEY.npz test predictions of every head and the ensemble (best and last checkpoints)
    logs/KEY.log        the run's per-epoch lines
    report.md, compare.png

Cells run in local worker processes (``jobs``), or as Slurm jobs through submitit (``executor='slurm'``;
``'submitit-local'`` runs the same job path on this machine). submitit rather than Ray: timm users train
on Slurm clusters far more often than on Ray clusters, and submitit needs nothing but Slurm itself.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from .errors import HeadsurgeonError, first_line

STUDY_FILE, CELLS_FILE, REPORT_FILE, PLOT_FILE = "study.json", "cells.jsonl", "report.md", "compare.png"
LOCK_FILE = ".compare.lock"
BASELINE = "single"
EXECUTORS = ("process", "submitit-local", "slurm")


# ----------------------------------------------------------------------------------- variants

def builtin_sets(name: str, a: str, b: str) -> list[str]:
    """The overrides of built-in variant ``name`` for a model whose last two ``feature_info`` stages are
    ``a`` and ``b`` (``layer3``, ``layer4`` for a ResNet). Each sets the whole split and the objective, so a
    recipe's own split or objective never leaks into a named variant; ``T`` and ``beta`` stay the recipe's."""
    tree = {
        "single": (["split.at=[]", "split.heads=1"], "split.fanout=null"),
        "inst": (["split.at=[input]"], "split.fanout=null"),
        "heads": ([f"split.at=[{a}]"], "split.fanout=null"),
        "hier4": ([f"split.at=[{a}, {b}]", "split.heads=4", "split.fanout=[2, 2]"], None),
    }
    kind = {"single": ("single", None, "cl"), "inst2": ("inst", 2, "cl"), "inst4": ("inst", 4, "cl"),
            "heads2": ("heads", 2, "cl"), "heads4": ("heads", 4, "cl"), "hier4": ("hier4", None, "cl"),
            "hier4-norescale": ("hier4", None, "cl"), "ind4": ("hier4", None, "cl"), "one4": ("heads", 4, "one"),
            "dml2": ("inst", 2, "dml"), "dml4": ("inst", 4, "dml"), "kdcl2": ("inst", 2, "kdcl"),
            "kdcl4": ("hier4", None, "kdcl"), "pcl4": ("heads", 4, "pcl"), "hier4-late": ("hier4", None, "cl")}[name]
    shape, heads, objective = kind
    sets, fanout = tree[shape]
    out = [*sets, *([f"split.heads={heads}"] if heads else []), *([fanout] if fanout else []),
           f"split.rescale={'false' if name == 'hier4-norescale' else 'true'}", f"loss.objective={objective}"]
    if name == "ind4":
        out.append("loss.beta=1.0")  # cross-entropy only: multi-head training without the consensus term
    if name == "hier4-late":  # late consensus: cross-entropy first, the consensus term grows to 0.9 by the end
        out += ["loss.beta=1.0", "loss.beta_end=0.1"]
    return out


BUILTIN = ("single", "inst2", "inst4", "heads2", "heads4", "hier4", "hier4-norescale", "ind4", "one4", "dml2",
           "dml4", "kdcl2", "kdcl4", "pcl4", "hier4-late")
NEEDS_POINTS = {v for v in BUILTIN if builtin_sets(v, "A", "B") != builtin_sets(v, "X", "Y")}


def split_points(recipe: Any) -> tuple[str, str] | None:
    """The last two ``feature_info`` stages of the recipe's model that resolve in its graph (what ``headsurgeon
    nodes`` lists first), or None for a model list (peers split only at the input) or a model without two."""
    if isinstance(recipe.model, list):
        return None
    from .cut import feature_points
    from .models import create
    from .trace import allow_leaf_modules, trace

    with allow_leaf_modules(recipe.split.leaf_modules):
        m = create(recipe.model, dict(recipe.model_kwargs or {}))
        traced = trace(m)
        points = feature_points(m, traced.eval_names)
    return (points[-2], points[-1]) if len(points) >= 2 else None


def read_variants(path: str | os.PathLike) -> dict[str, list[str]]:
    """``--variants FILE``: a YAML mapping name → recipe overrides (a mapping of dotted keys, or a list of
    ``KEY=VALUE`` strings)."""
    from .recipe import read_yaml

    data = read_yaml(path, "--variants file", "give a YAML file of variant name -> recipe overrides")
    if not isinstance(data, dict) or not data:
        raise HeadsurgeonError(f"--variants {path}: expected a mapping of variant name -> overrides, e.g. "
                               f"'wide: {{model_kwargs.width: 2}}'")
    out: dict[str, list[str]] = {}
    for name, sets in data.items():
        if not isinstance(name, str) or not _NAME_OK(name):
            raise HeadsurgeonError(f"--variants {path}: variant name {name!r} must be letters, digits, '-', '_' or '.'")
        if isinstance(sets, dict):
            out[name] = [f"{k}={json.dumps(v)}" for k, v in sets.items()]
        elif isinstance(sets, list) and all(isinstance(s, str) and "=" in s for s in sets):
            out[name] = list(sets)
        else:
            raise HeadsurgeonError(f"--variants {path}: variant '{name}' must map to a mapping of recipe keys or a "
                                   f"list of KEY=VALUE strings, got {type(sets).__name__}")
    return out


def _NAME_OK(name: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name))


# ----------------------------------------------------------------------------------- cells

@dataclass(frozen=True)
class Cell:
    variant: str
    noise: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.variant}-n{self.noise:g}-s{self.seed}"


def cell_sets(variant_sets: Sequence[str], cell: Cell, fit_every: int, epochs: int) -> list[str]:
    """The ``--set`` pairs of one cell on top of the study's base recipe: the variant, the noise rate, and
    the seed that draws the noise, the init and the data order (so cells of one (noise, seed) pair)."""
    return [*variant_sets, f"data.label_noise={cell.noise:g}", f"data.noise_seed={cell.seed}", f"seed={cell.seed}",
            *([] if fit_every else [f"log.fit_every={epochs}"])]  # the last epoch's fit: the regime hint's gap


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    if not isinstance(text, str):
        seeds = list(text)
    else:
        try:
            seeds = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise HeadsurgeonError(f"--seeds '{text}': expected comma-separated integers, e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 or s > 2 ** 32 - 1 for s in seeds):
        raise HeadsurgeonError(f"--seeds {text}: give distinct integers in 0..4294967295, e.g. --seeds 0,1,2")
    return seeds


def parse_noise(text: str | Sequence[float]) -> list[float]:
    if not isinstance(text, str):
        noise = [float(x) for x in text]
    else:
        try:
            noise = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise HeadsurgeonError(f"--noise '{text}': expected comma-separated fractions, e.g. --noise 0,0.4") from None
    if not noise or len(set(noise)) != len(noise) or any(not 0 <= n < 1 or math.isnan(n) for n in noise):
        raise HeadsurgeonError(f"--noise {text}: give distinct label-noise fractions in [0, 1), e.g. --noise 0,0.4")
    return noise


def _atomic_json(path: Path, obj: Any) -> None:
    from .storage import write_text

    write_text(path, json.dumps(obj, indent=1) + "\n")


def heads_at(row: Mapping[str, Any]) -> dict[str, Any]:
    """Accuracies of one metrics row: the validation-chosen head (the engine's rule, first best), the mean
    head, the ensemble."""
    val = [h["top1"] for h in row["val"]["heads"]]
    test = [h["top1"] for h in row["test"]["heads"]]
    chosen = max(range(len(val)), key=lambda h: val[h])
    return {"chosen": chosen, "deployed": test[chosen], "deployed_val": val[chosen],
            "ensemble": row["test"]["ensemble"]["top1"], "mean_head": statistics.fmean(test),
            "best_head": max(test), "worst_head": min(test), "heads_test": test, "heads_val": val}


def evaluated_tree(run: Path, sub: str) -> Any:
    """The tree in ``run/sub`` with the weights the run evaluates: best/ holds them; last/ holds the live tree
    and, where the run has one, its EMA (pcl: its temporal mean) beside it."""
    import safetensors.torch

    from .rundir import EMA_FILE
    from .tree import HeadTree

    tree = HeadTree.load(run / sub).eval()
    if sub == "last" and (run / "last" / EMA_FILE).is_file():
        safetensors.torch.load_model(tree, str(run / "last" / EMA_FILE))
    return tree


def save_predictions(run: Path, recipe: Any, path: Path, head: int | None = None) -> dict[str, Any]:
    """Test predictions of the best and the last checkpoints into ``path`` (.npz, atomic): every head's and
    the ensemble's class (McNemar, offline ensembles of heads), the labels, and with ``head`` that head's
    logits in float16 (offline ensembles of independent runs)."""
    import numpy as np
    import torch

    from . import data as D

    test = D.splits(recipe.data).test
    arrays: dict[str, Any] = {}
    for sub in ("best", "last"):
        tree = evaluated_tree(run, sub)
        cfg = D.data_config(recipe.data, tree.spec.pretrained_cfg, tree.spec.model_args.get("in_chans", 3))
        logits, labels = [], []
        with torch.no_grad():
            for x, y in D.loader(test, recipe.data, cfg, False, torch.device("cpu")):
                logits.append(torch.stack(tree(x)))
                labels.append(y)
        z = torch.cat(logits, 1)  # [heads, N, classes], in test-set order
        dtype = torch.uint8 if z.shape[2] <= 256 else torch.int32
        arrays[f"{sub}_preds"] = torch.cat([z.argmax(2), z.mean(0).argmax(1)[None]]).to(dtype).numpy()
        if head is not None:
            arrays[f"{sub}_logits"] = z[head].to(torch.float16).numpy()
        arrays["labels"] = torch.cat(labels).to(dtype).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return {"predictions": str(path.name)}


def train_cell(recipe: Any, run: Path, name: str, log_path: Path) -> dict[str, Any]:
    """Train (or resume, or take the finished) run of one cell; returns its summary."""
    from .rundir import STATE_FILE, SUMMARY_FILE, read_summary
    from .train import train

    done = read_summary(run / SUMMARY_FILE) if (run / SUMMARY_FILE).is_file() else None
    if done and done.get("finished"):
        return done  # finished before the coordinator recorded it (a kill between the two)
    resume = (run / "last" / STATE_FILE).is_file()
    if run.exists() and not resume:
        import shutil

        shutil.rmtree(run)  # started, no checkpoint yet: nothing finished is lost
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as logf:
        return train(recipe, name=name, output=str(run), resume=resume, log=lambda m: print(m, file=logf, flush=True))


def run_cell(study: str, cell: Cell, sets: list[str], threads: int | None = None) -> dict[str, Any]:
    """One cell, in whatever process runs it (a local worker, a Slurm job): train, score, predict, write
    ``cells/KEY.json``. Errors are returned as a failed cell (one line), never raised."""
    root = Path(study)
    t0 = time.time()
    base = {"key": cell.key, "variant": cell.variant, "noise": cell.noise, "seed": cell.seed, "overrides": sets}
    try:
        import warnings

        import torch

        if threads:
            torch.set_num_threads(threads)
        warnings.filterwarnings("ignore")
        from . import recipe as R
        from .trace import allow_leaf_modules

        flat, _ = R.load(root / "recipe.yaml", sets)
        run = root / "runs" / cell.key
        with allow_leaf_modules(flat.split.leaf_modules):
            summary = train_cell(flat, run, cell.variant, root / "logs" / f"{cell.key}.log")
            history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
            evaluated = [h for h in history if "test" in h]
            fits = [h["fit"] for h in history if "fit" in h]
            best = heads_at(history[summary["best_epoch"] - 1])
            final = heads_at(evaluated[-1])
            result = {**base, "status": "ok", "run": str(Path("runs") / cell.key), "heads": len(summary["heads"]),
                      "n_test": summary["samples"]["test"], "samples": summary["samples"],
                      "flipped": summary["label_noise"]["flipped"], "epochs": flat.epochs,
                      "best_epoch": summary["best_epoch"], "best_head": summary["best_head"], "best": best,
                      "final": final, "final_epoch": evaluated[-1]["epoch"],
                      "train_top1_last": statistics.fmean(history[-1]["train_top1"]),
                      "train_s": summary["wall_time_s"]}
            if fits:
                f = fits[-1]
                result["fit_last"] = {"noisy": statistics.fmean(f["noisy"]), "true": statistics.fmean(f["true"]),
                                      "memorised": statistics.fmean(f["memorised"]) if f.get("memorised") else None}
            result.update(save_predictions(run, flat, root / "predictions" / f"{cell.key}.npz"))
    except Exception as e:  # a failed cell is data: the others go on, the rerun retries it
        result = {**base, "status": "failed", "error": f"{type(e).__name__}: {first_line(e)}"
                  if not isinstance(e, HeadsurgeonError) else first_line(e)}
    result["wall_s"] = round(time.time() - t0, 1)
    try:
        (root / "cells").mkdir(exist_ok=True)
        _atomic_json(root / "cells" / f"{cell.key}.json", result)
    except (OSError, HeadsurgeonError):  # a full disk: the coordinator still gets the result through the pool
        pass
    return result


# ----------------------------------------------------------------------------------- the study

@contextlib.contextmanager
def _study_lock(root: Path) -> Iterator[None]:
    """One coordinator per study folder: an ``flock`` held while it runs (released by the kernel when the
    process dies, even by kill -9, so there is no stale lock to clean up)."""
    import fcntl

    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HeadsurgeonError(f"study '{root}' is in use by another `headsurgeon compare`; wait for it to finish "
                                   f"(or stop it) before running this study again") from None
        yield
    finally:
        os.close(fd)


def read_cells(root: Path) -> list[dict[str, Any]]:
    """The study's cells, last line per key (a failed cell retried later is replaced by its retry)."""
    path = root / CELLS_FILE
    out: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                c = json.loads(line)
                out[c["key"]] = c
            except (json.JSONDecodeError, KeyError, TypeError):
                # a line cut by a kill or a full disk is the only line that can be partial: the last one
                raise HeadsurgeonError(f"'{path}' line {i} is not a cell record; delete that line (its cell reruns)") from None
    return list(out.values())


def _append_cell(root: Path, cell: dict[str, Any]) -> None:
    from .storage import os_error

    path = root / CELLS_FILE
    try:
        with open(path, "a") as f:
            f.write(json.dumps(cell) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise os_error(e, path) from None


def plan(recipe: str | os.PathLike | None, variants: Sequence[str], sets: Sequence[str] = (),
         variants_file: str | os.PathLike | None = None) -> tuple[Any, dict[str, list[str]]]:
    """The base recipe and every variant's overrides, validated (the recipe loads and every variant's tree
    builds) before any training starts: an unknown variant, a variant the recipe cannot take, a bad key is
    one line here, not an hour later."""
    from . import recipe as R
    from .train import check

    base, _ = R.load(recipe, sets)
    user = read_variants(variants_file) if variants_file else {}
    names = list(dict.fromkeys([BASELINE, *variants]))  # single is always the baseline
    unknown = [v for v in names if v not in BUILTIN and v not in user]
    if unknown:
        raise HeadsurgeonError(f"unknown variant(s) {', '.join(unknown)}; built-in: {', '.join(BUILTIN)}"
                               + (f"; from {variants_file}: {', '.join(user)}" if user else " (or define your own "
                                  "with --variants FILE)"))
    clash = [v for v in user if v in BUILTIN]
    if clash:
        raise HeadsurgeonError(f"--variants {variants_file}: {', '.join(clash)} is a built-in variant name; rename it")
    if base.loss.beta_end is not None and any(v not in user for v in names):
        raise HeadsurgeonError("the recipe sets loss.beta_end (a schedule of cl's beta), which would leak into the "
                               "built-in variants (ind4 would not be cross-entropy only; dml, kdcl, one and pcl refuse "
                               "it): leave it out of the recipe and compare the built-in hier4-late, or put the "
                               "schedule in a variant of your own (--variants FILE)")
    if base.tree:
        raise HeadsurgeonError(f"the recipe fixes its tree (tree: {base.tree}); compare splits the model itself: "
                               f"give the recipe a model: instead")
    points = split_points(base) if any(v in NEEDS_POINTS for v in names) else None
    peers = isinstance(base.model, list)
    out: dict[str, list[str]] = {}
    for v in names:
        if v in user:
            out[v] = user[v]
            continue
        if v in NEEDS_POINTS and points is None:
            raise HeadsurgeonError(f"variant '{v}' forks inside the model, but "
                                   + (f"the recipe's models {base.model} are peers that split only at the input"
                                      if peers else f"{base.model} has fewer than two feature_info stages")
                                   + "; use instance variants (single, inst2, inst4, dml2, dml4, kdcl2) instead")
        if peers and v != BASELINE:
            raise HeadsurgeonError(f"variant '{v}' is for one model; the recipe lists peers {base.model}: compare them "
                                   f"as a user variant (--variants FILE) against single")
        if peers:
            raise HeadsurgeonError(f"the recipe lists peers {base.model}; the single baseline needs one model: put the "
                                   f"peers in a user variant (--variants FILE) and give the recipe one model")
        out[v] = builtin_sets(v, *(points or ("input", "input")))
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory() as tmp:  # each variant loads over the base exactly as its cells will
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(base.nested(), sort_keys=True))
        for v, vs in out.items():  # every variant's recipe validates and its tree builds (no data, seconds)
            try:
                check(R.load(path, vs)[0])
            except HeadsurgeonError as e:
                raise HeadsurgeonError(f"variant '{v}' ({' '.join(vs)}) does not fit the recipe: "
                                       f"{first_line(e).replace(str(path), 'recipe')}") from None
    return base, out


def _executor(kind: str, root: Path, jobs: int, slurm: Mapping[str, Any]) -> Any:
    """A ``concurrent.futures``-like pool: ``submit(fn, *args)`` → a future with ``done()`` and ``result()``."""
    if kind == "process" and jobs == 1:
        return _Inline()
    if kind == "process":
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a fresh interpreter per worker (forking a process that already ran torch can deadlock)
        return ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                   initargs=(_gpu_slots(jobs),))
    try:
        import submitit
    except ImportError:
        raise HeadsurgeonError(f"--executor {kind} needs submitit: pip install 'headsurgeon[cluster]'") from None
    try:
        ex = submitit.AutoExecutor(folder=str(root / "submitit"), cluster="local" if kind == "submitit-local" else "slurm")
    except RuntimeError as e:  # no srun on PATH: not a Slurm machine
        raise HeadsurgeonError(f"--executor {kind}: {first_line(e)}; run it on a Slurm login node, or use "
                               f"--executor process") from None
    params = {"timeout_min": int(slurm.get("timeout_min") or 24 * 60), "cpus_per_task": int(slurm.get("cpus") or 4)}
    if kind == "slurm":
        params.update({"slurm_partition": slurm.get("partition"), "gpus_per_node": int(slurm.get("gpus") or 0),
                       "slurm_mem_gb": slurm.get("mem_gb")})
        params = {k: v for k, v in params.items() if v is not None}
    else:
        params["cpus_per_task"] = int(slurm.get("cpus") or 1)
    ex.update_parameters(name="headsurgeon-compare", **params)
    return _Submitit(ex)


class _Inline:
    """``jobs=1``: cells run in this process, one after another (as a DataLoader with ``num_workers=0``)."""

    def submit(self, fn: Callable, *args: Any) -> Any:
        from concurrent.futures import Future

        f: Future = Future()
        f.set_result(fn(*args))
        return f

    def __enter__(self) -> "_Inline":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _Submitit:
    """submitit's executor behind the same three calls as a process pool."""

    def __init__(self, ex: Any):
        self.ex = ex

    def submit(self, fn: Callable, *args: Any) -> Any:
        return _Job(self.ex.submit(fn, *args))

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass

    def __enter__(self) -> "_Submitit":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _Job:
    def __init__(self, job: Any):
        self.job = job

    def done(self) -> bool:
        return self.job.done()

    def result(self) -> Any:
        return self.job.result()


def _gpu_slots(jobs: int) -> Any:
    """A queue of worker slots: worker i sees GPU i mod count (one GPU each where there are several)."""
    import multiprocessing as mp

    q = mp.get_context("spawn").Queue()
    for i in range(jobs):
        q.put(i)
    return q


def _worker_init(slots: Any) -> None:
    slot = slots.get()
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import torch

        n = torch.cuda.device_count() if gpus is None else len([g for g in gpus.split(",") if g.strip()])
    except Exception:  # pragma: no cover
        n = 0
    if n > 1:
        ids = gpus.split(",") if gpus else [str(i) for i in range(n)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[slot % n].strip()


def compare(recipe: str | os.PathLike | None, variants: Sequence[str], output: str | os.PathLike,
            seeds: Sequence[int] | str = (0, 1, 2), noise: Sequence[float] | str = (0.0,), sets: Sequence[str] = (),
            variants_file: str | os.PathLike | None = None, jobs: int = 1, executor: str = "process",
            slurm: Mapping[str, Any] | None = None, log: Callable[[str], None] = print,
            on_cell: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every missing cell of the study in ``output`` and write its report; returns the report's numbers.

    A rerun with more seeds, noise rates or variants runs only the new cells; a finished cell is never
    rerun or rewritten; a failed one is retried. ``executor``: 'process' (``jobs`` local workers, cores/jobs
    threads each; ``jobs=1`` trains in this process), 'submitit-local' or 'slurm' (cells as submitit jobs,
    ``jobs`` at a time). Local workers are spawned processes, so a script that calls this with ``jobs > 1``
    needs the ``if __name__ == "__main__":`` guard (as for a DataLoader with workers)."""
    seed_list, noise_list, root = _check_args(executor, jobs, seeds, noise, output)
    base, var_sets = plan(recipe, variants, sets, variants_file)
    root.mkdir(parents=True, exist_ok=True)
    with _study_lock(root):
        var_sets = _open(root, base, var_sets)
        cells = {c["key"]: c for c in read_cells(root)}
        cells.update({c["key"]: c for c in _harvest(root, cells)})
        names = list(dict.fromkeys([BASELINE, *variants]))
        wanted = [Cell(v, n, s) for s in seed_list for n in noise_list for v in names]
        todo = [c for c in wanted if cells.get(c.key, {}).get("status") != "ok"]
        log(f"compare: {len(wanted)} cells ({len(wanted) - len(todo)} already finished in {root}), {len(todo)} to run "
            f"with {jobs} {'worker' if executor == 'process' else executor + ' job'}(s); variants {', '.join(names)}; "
            f"noise {', '.join(f'{n:g}' for n in noise_list)}; seeds {', '.join(map(str, seed_list))}")
        # workers share the cores; inline (jobs=1) keeps this process's threads, slurm the job's CPUs
        threads = None if executor == "slurm" or (executor == "process" and jobs == 1) else \
            max(1, (os.cpu_count() or 1) // jobs)
        t0 = time.time()
        if todo:
            with _executor(executor, root, jobs, slurm or {}) as pool:
                runs = _run_all(pool, todo, str(root), var_sets, base.log.fit_every, base.epochs, threads, jobs)
                for i, res in enumerate(runs, 1):
                    _append_cell(root, res)
                    if on_cell:
                        on_cell(res)
                    log(f"[{i}/{len(todo)} {time.time() - t0:.0f}s] {_cell_line(res)}")
        return write_report(root, log=None)


def _check_args(executor: str, jobs: Any, seeds: Any, noise: Any, output: Any) -> tuple[list[int], list[float], Path]:
    from .recipe import check_path_name
    from .storage import check_not_link

    if executor not in EXECUTORS:
        raise HeadsurgeonError(f"--executor '{executor}': choose from {', '.join(EXECUTORS)}")
    if not isinstance(jobs, int) or jobs < 1 or jobs > 256:
        raise HeadsurgeonError(f"--jobs {jobs}: give 1..256 cells at a time")
    seed_list, noise_list = parse_seeds(seeds), parse_noise(noise)
    root = Path(output)
    check_path_name(str(root), "-o")
    if root.exists() and not root.is_dir():
        raise HeadsurgeonError(f"-o '{root}' is a file; give a folder for the study")
    check_not_link(root)
    return seed_list, noise_list, root


def _open(root: Path, base: Any, var_sets: dict[str, list[str]]) -> dict[str, list[str]]:
    """Check a rerun against the study's recipe and variants (cells of another recipe would not pair) and
    record them; returns every variant the study knows."""
    import yaml

    from .storage import write_text

    text = yaml.safe_dump(base.nested(), sort_keys=True)
    p = root / STUDY_FILE
    if p.is_file():
        try:
            old = json.loads(p.read_text())
            old_recipe, old_variants = old["recipe"], dict(old["variants"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise HeadsurgeonError(f"'{p}' is unreadable ({first_line(e)}); restore it or start a new study with "
                                   f"another -o") from None
        if old_recipe != text:
            raise HeadsurgeonError(f"study '{root}' was run with another recipe (or --set); its cells would not "
                                   f"pair with these: rerun with the same recipe and --set, or choose another -o")
        changed = [v for v in var_sets if v in old_variants and old_variants[v] != var_sets[v]]
        if changed:
            raise HeadsurgeonError(f"variant(s) {', '.join(changed)} had other overrides in study '{root}' "
                                   f"({old_variants[changed[0]]}); rename the changed variant")
        var_sets = {**old_variants, **var_sets}
    write_text(root / "recipe.yaml", text)
    _atomic_json(p, {"recipe": text, "variants": var_sets, "created_by": "headsurgeon compare"})
    return var_sets


def _cell_line(res: Mapping[str, Any]) -> str:
    if res["status"] != "ok":
        return f"{res['key']} failed: {res['error']}"
    return (f"{res['key']}: deployed {res['best']['deployed']:.2f}% (epoch {res['best_epoch']}), final "
            f"{res['final']['deployed']:.2f}%, ensemble {res['best']['ensemble']:.2f}% [{res['wall_s']:.0f}s]")


def _harvest(root: Path, cells: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Cells a worker finished (cells/KEY.json) that the coordinator did not record (it was killed): appended
    now instead of retrained."""
    out = []
    d = root / "cells"
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            c = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # cut by a kill: the cell reruns (its run resumes from its last checkpoint)
        if c.get("status") == "ok" and cells.get(c.get("key"), {}).get("status") != "ok":
            _append_cell(root, c)
            out.append(c)
    return out


def _run_all(pool: Any, todo: list[Cell], root: str, var_sets: dict[str, list[str]], fit_every: int, epochs: int,
             threads: int | None, jobs: int) -> Iterator[dict[str, Any]]:
    """Cells ``jobs`` at a time; results as they finish."""
    pending = list(todo)
    running: dict[Any, Cell] = {}
    while pending or running:
        while pending and len(running) < jobs:
            c = pending.pop(0)
            try:
                running[pool.submit(run_cell, root, c, cell_sets(var_sets[c.variant], c, fit_every, epochs), threads)] = c
            except Exception as e:  # a broken pool (a worker killed): this cell and the rest fail, recorded
                yield {"key": c.key, "variant": c.variant, "noise": c.noise, "seed": c.seed, "status": "failed",
                       "error": f"{type(e).__name__}: {first_line(e)}", "wall_s": None}
        done = [f for f in running if f.done()]
        if not done:
            time.sleep(0.5)
            continue
        for f in done:
            c = running.pop(f)
            try:
                yield f.result()
            except Exception as e:  # a worker or job that died (OOM kill, Slurm timeout): the cell failed
                yield {"key": c.key, "variant": c.variant, "noise": c.noise, "seed": c.seed, "status": "failed",
                       "error": f"{type(e).__name__}: {first_line(e)}", "wall_s": None}


# ----------------------------------------------------------------------------------- statistics

def se(xs: Sequence[float]) -> float | None:
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: ``b`` images only the variant gets right, ``c`` only the baseline."""
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(b, b + c, 0.5).pvalue)


def _predictions(root: Path, cell: Mapping[str, Any]) -> Any:
    import numpy as np

    p = root / "predictions" / cell["predictions"]
    with np.load(p) as z:
        return {k: z[k] for k in z.files}


def paired(root: Path, cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (noise, variant): paired gains over ``single`` of the same (noise, seed) ± SE over seeds, for the
    deployed head (validation-chosen epoch and head), its final-epoch accuracy and the ensemble; McNemar on
    the deployed heads' test predictions pooled over seeds; wall time per cell."""
    ok = [c for c in cells if c.get("status") == "ok"]
    by = {(c["variant"], c["noise"], c["seed"]): c for c in ok}
    out: dict[str, Any] = {}
    for noise in sorted({c["noise"] for c in ok}):
        rows: dict[str, Any] = {}
        for v in dict.fromkeys(c["variant"] for c in ok if c["noise"] == noise):
            cs = sorted((c for c in ok if c["variant"] == v and c["noise"] == noise), key=lambda c: c["seed"])
            base = [by.get((BASELINE, noise, c["seed"])) for c in cs]
            pairs = [(c, b) for c, b in zip(cs, base) if b is not None]
            row: dict[str, Any] = {"cells": len(cs), "pairs": len(pairs), "seeds": [c["seed"] for c in cs],
                                   "deployed": statistics.fmean(c["best"]["deployed"] for c in cs),
                                   "final": statistics.fmean(c["final"]["deployed"] for c in cs),
                                   "ensemble": statistics.fmean(c["best"]["ensemble"] for c in cs),
                                   "wall_s": statistics.fmean(c["wall_s"] for c in cs),
                                   "heads": cs[0]["heads"]}
            if v != BASELINE and pairs:
                for what, get, get_b in (("deployed", lambda c: c["best"]["deployed"], lambda b: b["best"]["deployed"]),
                                         ("final", lambda c: c["final"]["deployed"], lambda b: b["final"]["deployed"]),
                                         ("ensemble", lambda c: c["best"]["ensemble"], lambda b: b["best"]["deployed"])):
                    d = [get(c) - get_b(b) for c, b in pairs]
                    row[f"gain_{what}"] = statistics.fmean(d)
                    row[f"se_{what}"] = se(d)
                b_n = c_n = n = 0
                for c, b in pairs:
                    pc, pb = _predictions(root, c), _predictions(root, b)
                    yc, yb = pc["best_preds"][c["best_head"]], pb["best_preds"][b["best_head"]]
                    right_c, right_b = yc == pc["labels"], yb == pb["labels"]
                    b_n += int((right_c & ~right_b).sum())
                    c_n += int((~right_c & right_b).sum())
                    n += len(right_c)
                row["mcnemar"] = {"only_variant": b_n, "only_single": c_n, "images": n, "p": mcnemar(b_n, c_n)}
            rows[v] = row
        out[f"{noise:g}"] = rows
    return out


def regime(cells: list[dict[str, Any]], noise: float) -> dict[str, Any] | None:
    """The single model's fit at its last epoch against its training labels, its test accuracy, the gap, and
    the two rules of thumb it implies (regime.md §1): the gain is ≈ 12-16 % of the generalisation gap, and
    at most what an independent ensemble gains."""
    single = [c for c in cells if c.get("status") == "ok" and c["variant"] == BASELINE and c["noise"] == noise]
    if not single:
        return None
    fit = [c["fit_last"]["noisy"] if c.get("fit_last") else c["train_top1_last"] for c in single]
    test = [c["final"]["deployed"] for c in single]
    val = [c["final"]["deployed_val"] for c in single]
    gap = statistics.fmean(fit) - statistics.fmean(test)
    out = {"train_fit": statistics.fmean(fit), "fit_is": "un-augmented fit" if single[0].get("fit_last") else
           "augmented training accuracy", "test_final": statistics.fmean(test), "val_final": statistics.fmean(val),
           "gap": gap, "val_gap": statistics.fmean(fit) - statistics.fmean(val), "predicted_gain": (0.12 * gap, 0.16 * gap)}
    mem = [c["fit_last"]["memorised"] for c in single if c.get("fit_last") and c["fit_last"].get("memorised") is not None]
    if mem:
        out["memorised"] = statistics.fmean(mem)
    return out


def summarize(root: Path) -> dict[str, Any]:
    cells = read_cells(root)
    stats = paired(root, cells)
    regimes = {k: regime(cells, float(k)) for k in stats}
    failed = [c for c in cells if c.get("status") != "ok"]
    winner = None
    best_gain = 0.0
    for k, rows in stats.items():
        for v, r in rows.items():
            g = r.get("gain_deployed")
            if g is not None and g > best_gain:
                best_gain, winner = g, (k, v)
    if winner is None:  # nothing beat the single model: the single model is the one to deploy
        k = next(iter(stats), None)
        winner = (k, BASELINE) if k is not None else None
    best_cell = None
    if winner:
        cs = [c for c in cells if c.get("status") == "ok" and c["variant"] == winner[1] and f"{c['noise']:g}" == winner[0]]
        best_cell = max(cs, key=lambda c: (c["best"]["deployed_val"], -c["seed"]))  # chosen on validation, not test
    return {"study": str(root), "stats": stats, "regime": regimes, "failed": failed,
            "winner": {"noise": winner[0], "variant": winner[1], "cell": best_cell["key"], "run": best_cell["run"]}
            if best_cell else None}


def _g(r: Mapping[str, Any], what: str) -> str:
    g, s = r.get(f"gain_{what}"), r.get(f"se_{what}")
    if g is None:
        return "–"
    return f"{g:+.2f}" + ("" if s is None else f" ± {s:.2f}")


def report_text(s: Mapping[str, Any]) -> str:
    root = Path(s["study"])
    lines = [f"# headsurgeon compare: {root}", "",
             "Paired gains over the single model in percentage points of test top-1 (+ = better), mean ± SE over "
             "seeds (paired by noise and seed: same data order, noise draw and budget). *deployed*: the head and "
             "epoch chosen on validation, what `headsurgeon collapse` exports; *final*: that head at the last "
             "epoch; *ensemble*: all heads averaged (not one model) vs the single model. McNemar: exact test on "
             "the deployed heads' test predictions, pooled over seeds (images only the variant / only single gets "
             "right; it asks whether these trained models differ on these images, while the SE over seeds also "
             "carries the training randomness, so trust the SE first).", ""]
    for k, rows in s["stats"].items():
        lines += [f"## label noise {float(k):.0%}", "",
                  "| variant | heads | seeds | deployed % | Δ deployed | Δ final | Δ ensemble | McNemar (only variant / only single, p) | s per cell |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for v, r in rows.items():
            m = r.get("mcnemar")
            mc = f"{m['only_variant']} / {m['only_single']}, p = {m['p']:.3g}" if m else "–"
            lines.append(f"| {v} | {r['heads']} | {r['cells']} | {r['deployed']:.2f} | {_g(r, 'deployed')} | "
                         f"{_g(r, 'final')} | {_g(r, 'ensemble')} | {mc} | {r['wall_s']:.0f} |")
        rg = s["regime"].get(k)
        if rg:
            lo, hi = rg["predicted_gain"]
            ens = [(v, r["gain_ensemble"]) for v, r in rows.items() if r.get("gain_ensemble") is not None]
            ceiling = max(ens, key=lambda t: t[1]) if ens else None
            lines += ["", f"Regime: the single model ends at {rg['train_fit']:.2f} % on its training labels "
                          f"({rg['fit_is']}), {rg['val_final']:.2f} % on validation and {rg['test_final']:.2f} % on "
                          f"test: a train − validation gap of {rg['val_gap']:.2f} pp, a generalisation gap (train − "
                          f"test) of {rg['gap']:.2f} pp" + (f"; it memorised {rg['memorised']:.1f} % of the flipped "
                                                            f"labels" if rg.get("memorised") is not None else "") + "."]
            small = (" The gap is small: little to gain here; long schedules, little data and noisy labels are "
                     "where collaborative training has paid off.")
            lines.append("Rule 1 (gains are ≈ 12-16 % of the gap, regime.md §1): " +
                         (f"expect ≈ {lo:+.2f} to {hi:+.2f} pp at best." + (small if rg["gap"] < 5 else "")
                          if rg["gap"] > 0 else "no gap to close: expect no gain from collaboration." + small))
            if ceiling:
                lines.append(f"Rule 2 (no gain above an independent ensemble's): the largest ensemble gain here is "
                             f"{ceiling[1]:+.2f} pp ({ceiling[0]}); a deployed-head gain is expected at 40-90 % of it.")
        lines.append("")
    if s["failed"]:
        lines += ["## failed cells (rerun the same command to retry them)", ""]
        lines += [f"- {c['key']}: {c['error']}" for c in s["failed"]] + [""]
    w = s.get("winner")
    if w:
        verdict = ("no variant beat the single model on the deployed head: deploy the single model"
                   if w["variant"] == BASELINE else f"largest mean deployed gain: {w['variant']} at {float(w['noise']):.0%} noise")
        lines += ["## winner", "", f"{verdict}; its cell chosen on validation: {w['cell']}. Collapse it with:", "",
                  f"    headsurgeon collapse {root / w['run']} -o {root / 'model'}", ""]
    lines.append(f"plot: {root / PLOT_FILE}")
    return "\n".join(lines) + "\n"


def plot(s: Mapping[str, Any], path: Path) -> str | None:
    """Paired gain ± 2 SE per variant and noise rate (deployed head, its final epoch, the ensemble)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    stats = s["stats"]
    fig, axes = plt.subplots(1, max(1, len(stats)), figsize=(5.5 * max(1, len(stats)), 3.8), squeeze=False)
    for ax, (k, rows) in zip(axes[0], stats.items()):
        names = [v for v in rows if v != BASELINE]
        for j, (what, color) in enumerate((("deployed", "C0"), ("final", "C2"), ("ensemble", "C1"))):
            ys = [rows[v].get(f"gain_{what}") for v in names]
            es = [2 * (rows[v].get(f"se_{what}") or 0) for v in names]
            xs = [i + (j - 1) * 0.2 for i in range(len(names))]
            ax.errorbar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None],
                        yerr=[e for e, y in zip(es, ys) if y is not None], fmt="o", color=color, capsize=3,
                        label=f"{what} ± 2 SE")
        ax.axhline(0, color="k", lw=1)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("gain over single (pp test top-1)")
        ax.set_title(f"label noise {float(k):.0%}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return str(path)


def write_report(root: str | os.PathLike, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """``report.md`` and ``compare.png`` from the study's cells (``compare DIR --report``)."""
    from .storage import write_text

    root = Path(root)
    if not (root / STUDY_FILE).is_file():
        raise HeadsurgeonError(f"'{root}' is not a compare study (no {STUDY_FILE}); run `headsurgeon compare "
                               f"RECIPE -o {root}` first")
    s = summarize(root)
    if not s["stats"]:
        text = f"# headsurgeon compare: {root}\n\nno finished cells yet\n"
    else:
        s["plot"] = plot(s, root / PLOT_FILE)
        text = report_text(s)
    write_text(root / REPORT_FILE, text)
    s["text"] = text
    if log:
        log(text)
    return s
